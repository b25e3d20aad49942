"""gradcheck.state: ``preserved`` restores and ``Snapshot`` reports a model by value — also a
model that writes its own frozen parameters and buffers in forward — so none of it reaches the
user's model or leaks from one evaluation into the next.

``stats_net`` (tests.helpers) keeps BatchNorm-like statistics twice — as frozen
``nn.Parameter``s (requires_grad=False) and as buffers — and writes both in place in every
training forward, through ``.data``, which does not bump the autograd version counter: only a
comparison by value sees it. Its first layer normalises the input with the statistics it has
just updated (they depend on the data and on how many forwards ran, never on θ), so F depends on
the whole history of writes: one evaluation of F that started from another's leftovers would
change F, and the finite differences with it. Its hidden layer normalises with the batch's own
statistics, as BatchNorm does in training, and keeps its running statistics for eval mode.

The foundation copies everything (``parameters.state``: tests/gradcheck/test_parameters.py),
starts every run of the inner loop from fresh copies (``Student.fresh``:
tests/gradcheck/test_student.py) and restores by value (``state.preserved``: here); the last two
tests check the chain end to end. They fail on the pre-0.2 foundation, where the student's
frozen parameters were views of the model's, only buffers were copied per run, and
``preserved`` restored parameters by version counter only.

Tolerance: finite differences agree with the oracle to rtol 1e-6, atol 1e-9 (h = 1e-6 in
float64: error ≈ ε|F|/h + h²|F'''|/6 ≈ 1e-10, see test_finite_differences.py); a leak between
the evaluations at θ ± h e_i shifts F by O(1e-2) and the difference quotient by O(1e4).
"""

import contextlib

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import lazymaml
from gradcheck import Task, compare, finite_differences, oracle
from gradcheck.state import Snapshot, preserved
from tests.helpers import assert_same_state, conv_bn, model_state, stats_net, stats_task, with_gradients

FROZEN = ["0.mean", "0.var", "2.mean", "2.var"]
BUFFERS = ["0.running_mean", "0.running_var", "0.count", "2.running_mean", "2.running_var", "2.count"]


def test_the_forward_writes_frozen_parameters_and_buffers_without_bumping_versions():
    """The premise of every test here: without a comparison by value, the writes are invisible."""
    model, (x, _) = stats_net(), stats_task().support
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    versions = {n: t._version for n, t in tensors.items()}
    before = {n: t.detach().clone() for n, t in tensors.items()}
    model(x)
    assert {n for n, t in tensors.items() if not torch.equal(t, before[n])} == {*FROZEN, *BUFFERS}
    assert {n: t._version for n, t in tensors.items()} == versions


@pytest.mark.parametrize("fail", [False, True])
def test_preserved_restores_frozen_parameters_and_buffers_by_value(fail):
    model = with_gradients(stats_net().train())
    before = model_state(model)
    x = stats_task().support[0]

    def block():
        with preserved(model):
            model(x).sum().backward()  # writes statistics and .grad
            model[2].mean.requires_grad_(True)
            model.eval()
            if fail:
                raise KeyError("inside")

    if fail:
        with pytest.raises(KeyError, match="inside"):
            block()
    else:
        block()
    assert_same_state(before, model_state(model))


def test_snapshot_reports_each_written_tensor_once_with_its_change():
    model = stats_net().train()
    shared = nn.Sequential(model, model[0])  # the input statistics reachable under two names
    snapshot = Snapshot(shared)
    assert snapshot.changes() == []
    model(stats_task().support[0])
    changes = snapshot.changes()
    names = [c.name for c in changes]
    assert sorted(names) == sorted(f"0.{n}" for n in [*FROZEN, *BUFFERS]) and len(set(names)) == len(names)
    assert all(c.what == "modified" and c.max_abs > 0 for c in changes)
    count = next(c for c in changes if c.name == "0.0.count")
    assert (count.kind, count.max_abs) == ("buffer", 1.0)
    snapshot.restore()
    assert snapshot.changes() == []


@pytest.mark.parametrize("train", [True, False])
def test_finite_differences_agree_with_the_oracle(train):
    """F(θ + h e_i) and F(θ − h e_i) start from the same statistics: a leak would show here."""
    model, task = with_gradients(stats_net().train(train)), stats_task()
    before = model_state(model)
    exact = oracle.meta_gradient(model, task, 3, 0.2)
    fd = finite_differences.meta_gradient(model, task, 3, 0.2)
    compare(fd, exact).assert_close(1e-6, 1e-9)
    finite_differences.check(exact, model, task, 3, 0.2).assert_close()
    assert_same_state(before, model_state(model))


def test_the_meta_objective_is_the_same_however_often_it_is_evaluated():
    model, task = stats_net().train(), stats_task()
    objective, x0 = finite_differences.meta_objective(model, task, 3, 0.2)
    first = objective(x0)
    objective(x0 + 1e-3)
    assert objective(x0) == first


def test_snapshot_reports_every_kind_of_change_and_restores_it():
    """Each kind of change a forward or closure could make, reported by name and undone."""
    model = with_gradients(conv_bn().train())
    before = model_state(model)
    snapshot = Snapshot(model)
    model[0].weight.grad = None
    model[0].bias.grad.add_(0.25)
    model[4].bias.requires_grad_(False)
    model[1].eval()
    model[4].weight = nn.Parameter(model[4].weight.detach().clone())
    with torch.no_grad():
        model[1].running_mean.add_(0.5)
    assert sorted(snapshot.differences()) == sorted(
        [
            "gradient 0.weight.grad changed (max |change| inf)",
            "gradient 0.bias.grad changed (max |change| 0.25)",
            "requires_grad 4.bias.requires_grad changed",
            "mode 1 switched to eval",
            "parameter 4.weight replaced",
            "buffer 1.running_mean modified (max |change| 0.5)",
        ]
    )
    snapshot.restore()
    assert snapshot.changes() == []
    assert_same_state(before, model_state(model))


def _pruned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    x = torch.randn(6, 2, dtype=torch.float64)
    task = Task((x, torch.sin(x[:, :1])), (x + 0.1, torch.cos(x[:, :1])), nn.functional.mse_loss)
    model(x)  # the pruning hook has written model[0].weight = weight_orig * weight_mask
    return model, task


@pytest.mark.filterwarnings("ignore::lazymaml.SequentialFallback")
@pytest.mark.parametrize(
    "call",
    [
        lambda m, t: finite_differences.check(oracle.meta_gradient(m, t, 3, 0.1), m, t, 3, 0.1),
        lambda m, t: (  # it writes p.grad by design: cleared again here
            lazymaml.MetaLearner(m, 3, 0.1, estimator="reptile").meta_backward([t, t]),
            m.zero_grad(set_to_none=True),
        ),
        lambda m, t: lazymaml.meta_gradient(m, t, 3, 0.1),
    ],
    ids=["finite_differences.check", "MetaLearner(reptile)", "lazymaml.meta_gradient"],
)
def test_a_pruned_layers_plain_weight_attribute_is_restored(call):
    """``prune`` recomputes ``module.weight`` (a plain attribute) in a forward pre-hook: a forward
    at perturbed or adapted parameters leaves it holding their product until the user's next
    forward. The snapshot restores plain tensor attributes too."""
    model, task = _pruned()
    before, weight = model_state(model), model[0].weight.detach().clone()
    call(model, task)
    assert torch.equal(model[0].weight, weight)
    assert_same_state(before, model_state(model))


def test_a_rebound_attribute_and_a_replaced_buffer_are_each_one_change():
    model, _ = _pruned()
    bn = nn.BatchNorm1d(3).double()
    model.add_module("norm", bn)
    snapshot = Snapshot(model)
    model[0].weight = model[0].weight * 2  # rebinds the plain attribute
    old = bn.running_mean
    old.add_(0.5)  # written in place, and then
    bn._buffers["running_mean"] = old + 0.5  # replaced: still one change for the tensor
    changes = snapshot.changes()
    assert [(c.kind, c.name, c.what) for c in changes] == [
        ("buffer", "norm.running_mean", "replaced"),
        ("attribute", "0.weight", "replaced"),
    ]
    assert changes[0].max_abs == pytest.approx(1.0)
    snapshot.restore()
    assert not snapshot.changes()


def test_preserved_undoes_every_kind_of_change_one_at_a_time_and_together():
    """preserved's guard (one flat copy per dtype, compared once) keeps what a Snapshot restores:
    each kind of change below is reported by a Snapshot when unguarded, and none is left after
    the guarded block — also when the block raises."""

    changes = [
        lambda m: m[0].weight.detach().add_(1.0),  # a value, in place
        lambda m: m[1].running_mean.fill_(3.0),  # a buffer
        lambda m: setattr(m[0].bias, "data", torch.zeros(7, dtype=torch.float64)),  # a new shape
        lambda m: m[4].weight.grad.mul_(2.0),  # a gradient's value
        lambda m: setattr(m[4].bias, "grad", None),  # a gradient replaced
        lambda m: m[4].weight.requires_grad_(False),
        lambda m: setattr(m[4], "bias", torch.nn.Parameter(m[4].bias.detach().clone())),  # a registration
        lambda m: m.eval(),
        lambda m: setattr(m[0], "cached", m[0].cached * 2),  # a plain tensor attribute rebound
        lambda m: m[0].cached.add_(1.0),  # ... or written in place
    ]

    def vandalise(model, only=None):
        for change in changes if only is None else [only]:
            change(model)

    def build():
        model = with_gradients(conv_bn().train())
        model[0].cached = torch.ones(3, dtype=torch.float64)  # as prune keeps module.weight
        return model

    vandalised = build()
    snapshot = Snapshot(vandalised)
    vandalise(vandalised)
    kinds = {c.kind for c in snapshot.changes()}
    assert kinds == {"parameter", "buffer", "gradient", "requires_grad", "mode", "attribute"}, kinds

    for only in [None, *changes]:  # all at once, and each alone
        for raises in (False, True):
            model = build()
            before = model_state(model)
            snapshot = Snapshot(model)
            with pytest.raises(KeyError) if raises else contextlib.nullcontext(), preserved(model):
                vandalise(model, only)
                if raises:
                    raise KeyError("in the block")
            assert snapshot.changes() == []
            assert_same_state(before, model_state(model))
