"""A model that writes its own frozen parameters and buffers in forward, and the guarantee that
none of it reaches the user's model or leaks from one evaluation into the next.

``stats_net`` keeps BatchNorm-like statistics twice — as frozen ``nn.Parameter``s
(requires_grad=False) and as buffers — and writes both in place in every training forward,
through ``.data``, which does not bump the autograd version counter: only a comparison by value
sees it. Its first layer normalises the input with the statistics it has just updated (they
depend on the data and on how many forwards ran, never on θ), so F depends on the whole history
of writes: one evaluation of F that started from another's leftovers would change F, and the
finite differences with it. Its hidden layer normalises with the batch's own statistics, as
BatchNorm does in training, and keeps its running statistics for eval mode.

The foundation copies everything (``parameters.state``), starts every run of the inner loop from
fresh copies (``Student.fresh``) and restores by value (``state.preserved``). The tests below
fail on the pre-0.2 foundation, where the student's frozen parameters were views of the model's,
only buffers were copied per run, and ``preserved`` restored parameters by version counter only.

Tolerance: finite differences agree with the oracle to rtol 1e-6, atol 1e-9 (h = 1e-6 in
float64: error ≈ ε|F|/h + h²|F'''|/6 ≈ 1e-10, see test_finite_differences.py); a leak between
the evaluations at θ ± h e_i shifts F by O(1e-2) and the difference quotient by O(1e4).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcheck import Task, compare, finite_differences, oracle
from gradcheck.parameters import copies
from gradcheck.settings import InnerLoop
from gradcheck.state import Snapshot, preserved
from gradcheck.student import Student
from tests.helpers import assert_same_state, model_state, with_gradients

F64 = torch.float64


class Statistics(nn.Module):
    """Running statistics kept as frozen parameters (``mean``, ``var``: a cumulative average) and
    as buffers (``running_mean``, ``running_var``: momentum 0.1; ``count``), all written in place
    through ``.data`` in training. ``running=True`` normalises with the statistics just written,
    otherwise with the batch's own (BatchNorm in training); in eval mode with ``mean``/``var``."""

    def __init__(self, features: int, running: bool):
        super().__init__()
        self.running = running
        self.mean = nn.Parameter(torch.zeros(features, dtype=F64), requires_grad=False)
        self.var = nn.Parameter(torch.ones(features, dtype=F64), requires_grad=False)
        self.register_buffer("running_mean", torch.zeros(features, dtype=F64))
        self.register_buffer("running_var", torch.ones(features, dtype=F64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            mean, var = x.detach().mean(0), x.detach().var(0)
            self.count.data += 1
            self.mean.data.lerp_(mean, 1.0 / int(self.count))
            self.var.data.lerp_(var, 1.0 / int(self.count))
            self.running_mean.data.lerp_(mean, 0.1)
            self.running_var.data.lerp_(var, 0.1)
        if self.running or not self.training:
            return (x - self.mean) / (self.var + 1e-5).sqrt()
        return (x - x.mean(0)) / (x.var(0) + 1e-5).sqrt()


def stats_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        Statistics(3, running=True), nn.Linear(3, 6), Statistics(6, running=False), nn.Tanh(), nn.Linear(6, 2)
    ).to(F64)
    with torch.no_grad():  # statistics as a model mid-training has them
        for m in (net[0], net[2]):
            m.mean.uniform_(-0.5, 0.5)
            m.var.uniform_(0.5, 2.0)
            m.running_mean.copy_(m.mean)
            m.running_var.copy_(m.var)
            m.count.fill_(3)
    return net


def stats_task(seed=0):
    g = torch.Generator().manual_seed(seed)

    def batch(n):
        x = 2 * torch.randn(n, 3, generator=g, dtype=F64) + 1
        return x, torch.sin(x[:, :2])

    return Task(batch(6), batch(7), F.mse_loss)


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


@pytest.mark.parametrize("dtype", [None, F64, torch.float32])
def test_state_copies_every_tensor_never_a_view(dtype):
    """``parameters.state`` on the no-cast path too (float64 model, dtype None or float64)."""
    model = stats_net()
    before = model_state(model)
    params, buffers = copies(model, dtype)
    originals = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, copy in {**params, **buffers}.items():
        assert copy.data_ptr() != originals[name].data_ptr(), name
        copy.add_(1)
    assert_same_state(before, model_state(model))


def test_student_runs_start_from_fresh_copies_and_never_write_the_model():
    model, task = stats_net().train(), stats_task()
    before = model_state(model)
    student = Student.read(model)
    loop = InnerLoop(3, 0.2)
    first, second = student.run(task, loop), student.run(task, loop)
    for a, b in zip(first, second):  # the second run did not start where the first left off
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(first[1]["0.mean"], model[0].mean)  # the run did write its copies
    assert int(first[1]["0.count"]) == int(model[0].count) + 3  # one support forward per step
    assert_same_state(before, model_state(model))


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
