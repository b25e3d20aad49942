import pytest
import torch
from torch import nn

from gradcheck.parameters import Functional, copies, flat, resolve_adapt, tied, trainable, unflat
from gradcheck.state import preserved
from gradcheck.student import Student
from tests.helpers import F64, assert_same_state, conv_bn, model_state, stats_net


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3))
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(self.norm(self.encoder(x)))


def test_presets():
    model = conv_bn()
    assert resolve_adapt(model, None) == ("0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias")
    assert resolve_adapt(model, "head") == ("4.weight", "4.bias")
    assert resolve_adapt(model, "body") == ("0.weight", "0.bias", "1.weight", "1.bias")


def test_head_is_the_last_module_with_trainable_parameters():
    model = conv_bn()
    model[4].requires_grad_(False)
    assert resolve_adapt(model, "head") == ("1.weight", "1.bias")
    assert "4.weight" not in trainable(model)


def test_names_prefixes_predicates():
    model = Named()
    assert resolve_adapt(model, "encoder") == (
        "encoder.0.weight",
        "encoder.0.bias",
        "encoder.2.weight",
        "encoder.2.bias",
    )
    assert resolve_adapt(model, ["encoder.2", "norm.bias"]) == (
        "encoder.2.weight",
        "encoder.2.bias",
        "norm.bias",
    )
    assert resolve_adapt(model, lambda n: n.endswith("bias")) == (
        "encoder.0.bias",
        "encoder.2.bias",
        "norm.bias",
        "head.bias",
    )
    # a prefix matches whole components only: "encoder.0" must not select "encoder.0x..."
    assert resolve_adapt(model, "encoder.0") == ("encoder.0.weight", "encoder.0.bias")


def test_preset_that_is_also_a_module_name():
    model = Named()  # its last module *is* called head: no ambiguity
    assert resolve_adapt(model, "head") == ("head.weight", "head.bias")
    assert resolve_adapt(model, ["head"]) == ("head.weight", "head.bias")


def test_ambiguous_preset_is_refused():
    class HeadFirst(Named):
        def __init__(self):
            super().__init__()
            self.tail = nn.Linear(1, 1)  # registered last: the preset "head" means tail

    with pytest.raises(ValueError, match="ambiguous"):
        resolve_adapt(HeadFirst(), "head")
    assert resolve_adapt(HeadFirst(), ["head"]) == ("head.weight", "head.bias")


def test_copies_buffers_and_casts():
    model = conv_bn().float()
    params, buffers = copies(model, torch.float64)
    assert all(t.dtype == torch.float64 for t in params.values())
    assert buffers["1.num_batches_tracked"].dtype == torch.long
    buffers["1.running_mean"].add_(1)
    assert not torch.equal(buffers["1.running_mean"].float(), model[1].running_mean)


def test_copies_without_a_cast_too():
    """No cast is no excuse for a view: a forward writing in place must write the copies."""
    model = conv_bn()
    params, buffers = copies(model)
    assert params["0.weight"].data_ptr() != model[0].weight.data_ptr()
    assert buffers["1.running_mean"].data_ptr() != model[1].running_mean.data_ptr()
    buffers["1.running_mean"].add_(1)
    params["0.weight"].add_(1)
    assert not torch.equal(buffers["1.running_mean"], model[1].running_mean)
    assert not torch.equal(params["0.weight"], model[0].weight)


@pytest.mark.parametrize("dtype", [None, F64, torch.float32])
def test_copies_every_tensor_never_a_view(dtype):
    """``parameters.copies`` on the no-cast path too (float64 model, dtype None or float64)."""
    model = stats_net()
    before = model_state(model)
    params, buffers = copies(model, dtype)
    originals = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, copy in {**params, **buffers}.items():
        assert copy.data_ptr() != originals[name].data_ptr(), name
        copy.add_(1)
    assert_same_state(before, model_state(model))


def test_functional_view_and_flat_roundtrip():
    model = conv_bn().eval()
    params, buffers = copies(model)
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(Functional(model, params, buffers)(x), model(x))
    vector = flat(params)
    assert vector.numel() == sum(p.numel() for p in model.parameters())
    back = unflat(vector, params)
    assert all(torch.equal(back[n], params[n]) for n in params)


class PrefixNames(nn.Module):
    """Module names that are string prefixes of one another: ``block1`` / ``block10``, ``head_proj``
    registered before ``head`` (so the preset "head" is ``head``, whose name prefixes ``head_proj``)."""

    def __init__(self):
        super().__init__()
        self.block10 = nn.Linear(2, 2)
        self.block1 = nn.Linear(2, 2)
        self.head_proj = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(self.head_proj(self.block1(self.block10(x))))


def test_prefixes_match_whole_name_components_only():
    model = PrefixNames()
    assert resolve_adapt(model, "block1") == ("block1.weight", "block1.bias")
    assert resolve_adapt(model, ["block10"]) == ("block10.weight", "block10.bias")
    assert resolve_adapt(model, "head_proj") == ("head_proj.weight", "head_proj.bias")


def test_head_preset_owns_only_its_own_module():
    model = PrefixNames()
    assert resolve_adapt(model, "head") == ("head.weight", "head.bias")
    assert "head_proj.weight" in resolve_adapt(model, "body")


def test_sequential_with_ten_and_more_layers():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])
    assert resolve_adapt(model, ["1"]) == ("1.weight", "1.bias")
    assert resolve_adapt(model, "head") == ("10.weight", "10.bias")


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(1, 1, bias=False).double()
        self.b = self.a  # one submodule, registered under two names

    def forward(self, x):
        return self.a(x) + 10 * self.b(x)


def test_torch_functional_call_on_a_module_registered_twice_leaves_the_passed_tensor_behind():
    """A torch 2.13 defect, pinned: ``torch.func.functional_call`` on a submodule registered under
    two names does not put the module's own parameter back afterwards — the model keeps the
    tensor it was called with. (If a torch upgrade fixes it, this test fails: the pin is then
    obsolete.) Every entry point here runs under ``gradcheck.state.preserved``, which restores
    registrations: the model-kind table's "submodule registered twice" row checks that."""
    model = _Twice()
    with torch.no_grad():
        model.a.weight.fill_(1.0)
    original = model.a.weight
    x = torch.ones(1, 1, dtype=torch.float64)
    out = torch.func.functional_call(model, {"a.weight": torch.full((1, 1), 2.0, dtype=torch.float64)}, (x,))
    assert out.item() == 22.0
    assert model.a.weight is not original and model.a.weight.item() == 2.0  # the defect
    model = _Twice()
    before = model_state(model)
    with preserved(model):
        Functional(model, {"a.weight": torch.full((1, 1), 3.0, dtype=torch.float64)})(x)
    assert_same_state(before, model_state(model))


class _TiedBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)
        self.register_buffer("scale", torch.ones(1))
        self.inner = nn.Module()
        self.inner.register_buffer("scale", self.scale)  # one buffer, two names


def test_tied_finds_a_tensor_registered_under_two_names():
    """``tied`` decides whether ``functional_call`` must untie names (Functional's ``ties``)."""
    assert not tied(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    assert tied(_Twice())  # a submodule registered twice
    shared = nn.Linear(2, 2)
    assert tied(nn.Sequential(shared, nn.ReLU(), shared))
    weights = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    weights[1].weight = weights[0].weight  # tied weights
    assert tied(weights)
    assert tied(_TiedBuffer())
    both = nn.Module()
    both.lin = nn.Linear(1, 1)
    both.sub = nn.Module()
    both.sub.register_buffer("w", both.lin.weight)  # a parameter registered as a buffer too
    assert tied(both)


def test_a_model_with_tied_weights_is_evaluated_with_every_name_set():
    """Setting one name of a tied pair sets both, as the model itself computes: the student says
    the model is tied, and the functional call unties it (with ``ties=False`` the second name
    would keep the model's own tensor)."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)).double()
    model[1].weight = model[0].weight
    x = torch.ones(1, 1, dtype=F64)
    value = {"0.weight": torch.full((1, 1), 3.0, dtype=F64)}
    assert Functional(model, value)(x).item() == 9.0
    student = Student.read(model)
    assert student.ties
    assert student.at(value, student.fresh())(x).item() == 9.0
