"""gradcheck.student: the graph-free inner loop, the teacher's leap, and the loss checks.

The student's trajectory φ_0, φ_1, …, φ_K is compared with an SGD (or Adam, or proximal SGD)
loop written here on ``torch.func.functional_call`` with its own copies of the buffers — no
optimizer object, no project code beyond ``Task``. Both sides perform the same float64
operations, up to the order of the summations inside the gradients (rounding differences ~1e-16
per operation, measured below 1e-15 after four steps), so they are compared to rtol 1e-12,
atol 1e-14; a step of the wrong size, on the wrong parameters or from the wrong point changes
φ at the 1e-3 level. Where the two sides perform literally the same operation (the leap at γ = 1,
two runs of the same student) equality is exact.
"""

import pytest
import torch
from torch.func import functional_call

from gradcheck import Task
from gradcheck.settings import InnerLoop
from gradcheck.student import Student, apply_leap, checked_loss, converted, support_loss_at
from tests.helpers import (
    F64,
    Spare,
    adapted_names,
    assert_same_state,
    conv_bn,
    image_task,
    mlp,
    model_state,
    regression_task,
    stats_net,
    stats_task,
)

RTOL, ATOL = 1e-12, 1e-14


def hand_written(model, task, steps, lr, adapt=None, start=None, proximal=0.0, adam=False):
    """φ_0 … φ_K and the buffers after K support forwards, by an explicit loop (test-side code).

    SGD: φ ← φ − α ∇_A L_S(φ) [+ λ(φ − φ_0)]; Adam as Kingma & Ba write it (torch's defaults).
    """
    adapted = adapted_names(model, adapt)
    phi = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    phi.update({n: t.detach().clone() for n, t in (start or {}).items()})
    anchor = {n: t.clone() for n, t in phi.items()}
    fixed = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    m = {n: torch.zeros_like(phi[n]) for n in adapted}
    v = {n: torch.zeros_like(phi[n]) for n in adapted}
    path = [dict(phi)]
    for k in range(1, steps + 1):
        leaves = {n: t.clone().requires_grad_(n in adapted) for n, t in phi.items()}
        loss = task.support_loss(lambda x, p=leaves: functional_call(model, {**p, **fixed, **buffers}, (x,)))
        grads = dict(zip(adapted, torch.autograd.grad(loss, [leaves[n] for n in adapted])))
        phi = dict(phi)
        for n, g in grads.items():
            g = g + proximal * (phi[n] - anchor[n]) if proximal else g
            if adam:
                m[n] = 0.9 * m[n] + 0.1 * g
                v[n] = 0.999 * v[n] + 0.001 * g * g
                m_hat, v_hat = m[n] / (1 - 0.9**k), v[n] / (1 - 0.999**k)
                phi[n] = phi[n] - lr * m_hat / (v_hat.sqrt() + 1e-8)
            else:
                phi[n] = phi[n] - lr * g
        path.append(phi)
    return path, buffers


def assert_close(got, want, rtol=RTOL, atol=ATOL):
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n].detach(), want[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("adapt", [None, "head", "body"])
def test_trajectory_is_the_hand_written_sgd_loop(adapt):
    model, task = mlp([2, 4, 3, 1], "softplus"), regression_task()
    student, loop = Student.read(model, adapt), InnerLoop(4, 0.3)
    path, _ = hand_written(model, task, 4, 0.3, adapt)
    frozen = student.fresh()
    # the yielded dict is live (the optimizer steps its tensors in place): copy each φ_k
    got = [{n: t.detach().clone() for n, t in phi.items()} for phi in student.trajectory(task, loop, frozen)]
    assert len(got) == len(path) == 5
    for k, (phi, want) in enumerate(zip(got, path)):
        assert_close(phi, want)
        if k > 0:  # every step moved the adapted parameters, and only those
            moved = {n for n in phi if not torch.equal(phi[n], got[k - 1][n])}
            assert moved == set(adapted_names(model, adapt))


@pytest.mark.parametrize("train", [True, False])
def test_run_on_batchnorm_updates_the_copies_of_the_statistics_as_the_module_would(train):
    """φ_K and the running statistics after K support forwards (train mode: each forward writes
    them; eval mode: none does) equal the hand-written loop's, which lets BatchNorm write its own
    copies through ``functional_call``."""
    model, task = conv_bn().train(train), image_task()
    before = model_state(model)
    phi, frozen = Student.read(model).run(task, InnerLoop(3, 0.2))
    path, buffers = hand_written(model, task, 3, 0.2)
    assert_close(phi, path[-1])
    assert_close(frozen, buffers)
    assert int(frozen["1.num_batches_tracked"]) == int(model[1].num_batches_tracked) + 3 * train
    assert_same_state(before, model_state(model))


def test_run_from_a_start_and_the_teacher_leaps_from_that_start():
    model, task = mlp([2, 4, 1]), regression_task()
    g = torch.Generator().manual_seed(3)
    start = {
        n: p.detach() + 0.1 * torch.randn(p.shape, generator=g, dtype=F64)
        for n, p in model.named_parameters()
    }
    student, loop = Student.read(model), InnerLoop(3, 0.25, leap=0.4)
    path, _ = hand_written(model, task, 3, 0.25, start=start)
    phi, _ = student.run(task, loop, start)
    assert_close(phi, path[-1])
    teacher, _ = student.teacher(task, loop, start)
    assert_close(teacher, {n: start[n] + 0.4 * (path[-1][n] - start[n]) for n in start})


@pytest.mark.parametrize("adapt", [None, "head"])
def test_proximal_student_descends_the_regularised_loss(adapt):
    model, task = mlp([2, 4, 1], "tanh"), regression_task()
    phi, _ = Student.read(model, adapt).run(task, InnerLoop(4, 0.2), proximal=3.0)
    path, _ = hand_written(model, task, 4, 0.2, adapt, proximal=3.0)
    assert_close(phi, path[-1])
    plain, _ = hand_written(model, task, 4, 0.2, adapt)
    assert (phi["2.weight"] - plain[-1]["2.weight"]).abs().max() > 1e-3  # λ made a difference


def test_adam_student_is_adam_as_written():
    """The student runs torch.optim.Adam; it is compared with Adam written out (rtol 1e-10: the
    bias corrections are applied in another order, ~1e-15 relative per step)."""
    model, task = mlp([2, 4, 1], "tanh"), regression_task()
    phi, _ = Student.read(model).run(task, InnerLoop(5, 0.05, inner_optimizer="adam"))
    path, _ = hand_written(model, task, 5, 0.05, adam=True)
    assert_close(phi, path[-1], rtol=1e-10, atol=1e-13)


def test_teacher_is_the_leap_from_theta():
    model, task = mlp([2, 4, 1]), regression_task()
    student = Student.read(model, "head")
    path, _ = hand_written(model, task, 3, 0.3, "head")
    theta = {n: p.detach() for n, p in model.named_parameters()}
    teacher, _ = student.teacher(task, InnerLoop(3, 0.3, leap=0.25))
    assert_close(teacher, {n: t + 0.25 * (path[-1][n] - t) for n, t in theta.items()})
    full, _ = student.teacher(task, InnerLoop(3, 0.3))
    phi, _ = student.run(task, InnerLoop(3, 0.3))
    assert all(torch.equal(full[n], phi[n]) for n in phi)  # γ = 1: exactly φ_K


def test_apply_leap_values_and_derivatives():
    g = torch.Generator().manual_seed(0)
    theta = {"a": torch.randn(3, generator=g, dtype=F64).requires_grad_(), "b": torch.randn(2, dtype=F64)}
    phi = {"a": torch.randn(3, generator=g, dtype=F64).requires_grad_(), "b": torch.zeros(2, dtype=F64)}
    same = apply_leap(theta, {**phi, "extra": torch.ones(1)}, 1.0)
    assert same.keys() == theta.keys() and all(same[n] is phi[n] for n in theta)
    leapt = apply_leap(theta, phi, 0.3)
    torch.testing.assert_close(leapt["b"], 0.7 * theta["b"], rtol=1e-15, atol=0)
    d_theta, d_phi = torch.autograd.grad(leapt["a"].sum(), [theta["a"], phi["a"]])
    torch.testing.assert_close(d_theta, torch.full((3,), 0.7, dtype=F64), rtol=1e-15, atol=0)
    torch.testing.assert_close(d_phi, torch.full((3,), 0.3, dtype=F64), rtol=1e-15, atol=0)


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


def test_trajectory_writes_the_frozen_mapping_it_is_given_and_nothing_else():
    model, task = conv_bn().train(), image_task()
    student = Student.read(model)
    kept = {n: t.clone() for n, t in student.untrained.items()}
    frozen = student.fresh()
    assert all(frozen[n] is not student.untrained[n] for n in frozen)
    for _ in student.trajectory(task, InnerLoop(2, 0.1), frozen):
        pass
    assert not torch.equal(frozen["1.running_mean"], kept["1.running_mean"])
    assert all(torch.equal(student.untrained[n], kept[n]) for n in kept)  # the read copies: untouched


def test_read_splits_theta_from_the_other_tensors_and_casts():
    model = conv_bn().float()
    model[0].weight.requires_grad_(False)
    student = Student.read(model, "head", torch.float64)
    assert list(student.theta) == ["0.bias", "1.weight", "1.bias", "4.weight", "4.bias"]
    assert set(student.untrained) == {"0.weight", *dict(model.named_buffers())}
    assert student.adapted == ("4.weight", "4.bias")
    assert student.dtype == F64 and student.untrained["0.weight"].dtype == F64
    assert student.untrained["1.num_batches_tracked"].dtype == torch.long


def test_checked_loss_names_what_it_checked():
    what = support_loss_at(1, 3)
    assert what == "support loss L_S(φ_1) at inner step 2 of 3"
    loss = torch.tensor(0.5)
    assert checked_loss(loss, what) is loss
    with pytest.raises(TypeError, match=r"support loss L_S\(φ_1\) at inner step 2 of 3 must be a tensor"):
        checked_loss(0.5, what)
    with pytest.raises(ValueError, match=r"must be a scalar \(0-dim\) tensor, got shape \(2,\)"):
        checked_loss(torch.ones(2), what)
    for bad in ("nan", "inf", "-inf"):
        with pytest.raises(FloatingPointError, match=rf"inner step 2 of 3 is {bad}"):
            checked_loss(torch.tensor(float(bad)), what)


def test_converted_casts_data_tasks_only_when_the_model_is_not_in_the_dtype():
    task = image_task(dtype=torch.float32)
    tasks = [task]
    assert converted(tasks, conv_bn(), F64, "the checks") is tasks  # already float64: no copy
    (cast,) = converted(tasks, conv_bn(dtype=torch.float32), F64, "the checks")
    assert cast.support[0].dtype == F64 and cast.support[1].dtype == torch.long
    closure = Task.from_closures(lambda f: f(task.support[0]).sum(), lambda f: f(task.query[0]).sum())
    with pytest.raises(ValueError, match=r"the checks need torch.float64, and parameters \['0.weight'"):
        converted([closure], conv_bn(dtype=torch.float32), F64, "the checks")


def test_a_parameter_the_support_loss_never_reads_gets_no_step_but_the_proximal_pull():
    model, task = Spare(), regression_task()
    start = {"spare": torch.zeros(3, dtype=F64)}
    phi, _ = Student.read(model).run(task, InnerLoop(2, 0.5), start)
    assert torch.equal(phi["spare"], start["spare"])
    assert not torch.equal(phi["linear.weight"], model.linear.weight.detach())
    # λ(φ − φ_0) alone acts on it, and φ_0 is the start: still no motion
    phi, _ = Student.read(model).run(task, InnerLoop(2, 0.5), start, proximal=1.0)
    assert torch.equal(phi["spare"], start["spare"])


class _Counting(torch.nn.Module):
    """A buffer reassigned in forward, not written in place."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1).double()
        self.register_buffer("count", torch.zeros((), dtype=F64))

    def forward(self, x):
        self.count = self.count + 1
        return self.linear(x) * self.count


def test_a_reassigned_buffer_carries_like_an_in_place_one():
    """One buffer semantics: K support forwards and the query forward on one untrained mapping
    see the count 1, 2, …, K + 1; the model's own buffer is never written."""
    model, task = _Counting(), regression_task()
    student = Student.read(model)
    phi, untrained = student.run(task, InnerLoop(3, 0.1))
    assert untrained["count"].item() == 3
    student.at(phi, untrained)(task.query[0])
    assert untrained["count"].item() == 4
    assert model.count.item() == 0
    frozen = dict(untrained)  # a read-only view: nothing to carry into, nothing written
    from types import MappingProxyType

    student.at(phi, MappingProxyType(frozen))(task.query[0])
    assert frozen["count"].item() == 4
