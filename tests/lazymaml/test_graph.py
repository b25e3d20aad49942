"""lazymaml.graph: the straight-through leap ψ(θ), whose value is the teacher φ_T and whose
Jacobian is I − η E_A ∇²L_S(θ), so that backpropagating L_Q(ψ) gives (I − η E_A H)ᵀ ∇L_Q(φ_T).

Checked against a dense computation written here on the flat-vector model (tests.helpers.Flat):
an SGD unroll for φ_T, ``torch.autograd.functional.hessian`` for H, and (I − η E_A H)ᵀ v formed
as a matrix product; and against the Hessian-vector-product form of lazymaml.meta_gradient.

Tolerances: ψ's value is θ − (θ − φ_T), within an ulp of φ_T (|θ| < 2 here: atol 1e-15 where
φ_T is the student's own, rtol 1e-12, atol 1e-14 against the unroll written here); gradients
are the same float64 quantity by different sequences of operations, rtol 1e-10, atol 1e-13
(measured below 1e-14). A lost stop-gradient or a wrong η changes them at the 1e-3 level.
"""

import pytest
import torch

import lazymaml
from gradcheck import compare
from gradcheck.settings import InnerLoop
from gradcheck.student import Student
from tests.helpers import Flat, conv_bn, image_task, mlp, regression_task

RTOL, ATOL = 1e-10, 1e-13


def dense_lazy(model, task, steps, alpha, leap, eta, adapt, teacher=None):
    """φ_T and (I − η E_A H)ᵀ ∇L_Q(φ_T), H = ∇²L_S(θ), computed densely (test-side code)."""
    flat = Flat(model, task, adapt)
    if teacher is None:
        phi = flat.theta.clone()
        for _ in range(steps):
            point = phi.clone().requires_grad_()
            (grad,) = torch.autograd.grad(flat.support(point), point)
            phi = phi - alpha * flat.mask * grad
        teacher = flat.theta + leap * (phi - flat.theta)
    else:
        teacher = torch.cat([teacher[n].reshape(-1) for n in flat.names])
    point = teacher.clone().requires_grad_()
    (v,) = torch.autograd.grad(flat.query(point), point)
    hessian = torch.autograd.functional.hessian(flat.support, flat.theta)
    jacobian = torch.eye(len(v), dtype=v.dtype) - eta * flat.mask[:, None] * hessian
    return flat.named(teacher), flat.named(jacobian.T @ v)


@pytest.mark.parametrize("adapt", [None, "head", "body"])
@pytest.mark.parametrize(("eta", "value"), [("single", 0.6 * 0.3), ("horizon", 0.6 * 3 * 0.3), (0.05, 0.05)])
def test_value_is_the_teacher_and_gradient_the_one_step_jacobian_transposed(adapt, eta, value):
    model, task = mlp([2, 4, 3, 1], "softplus"), regression_task()
    f = lazymaml.straight_through(model, task, 3, 0.3, adapt=adapt, leap=0.6, jacobian_step=eta)
    teacher, want = dense_lazy(model, task, 3, 0.3, 0.6, value, adapt)
    for n, t in teacher.items():
        torch.testing.assert_close(f.tensors[n].detach(), t, rtol=1e-12, atol=1e-14, msg=n)
    task.query_loss(f).backward()  # into the model's own .grad (None before)
    compare({n: p.grad for n, p in model.named_parameters()}, want).assert_close(RTOL, ATOL)


def test_a_given_teacher_is_used_as_is():
    """With ``teacher`` given, no student runs: ψ has its value, the gradient is taken at it, and
    the statistics are the model's as read."""
    model, task = conv_bn().train(), image_task()
    g = torch.Generator().manual_seed(0)
    teacher = {
        n: p.detach() + 0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype)
        for n, p in model.named_parameters()
    }
    f = lazymaml.straight_through(model, task, 2, 0.2, adapt="head", teacher=teacher)
    _, want = dense_lazy(model, task, 2, 0.2, 1.0, 0.2, "head", teacher)
    for n, t in teacher.items():
        torch.testing.assert_close(f.tensors[n].detach(), t, rtol=0, atol=1e-15, msg=n)
    for n, b in model.named_buffers():
        assert torch.equal(f.tensors[n], b), n
    theta = list(model.parameters())
    got = dict(zip(dict(model.named_parameters()), torch.autograd.grad(task.query_loss(f), theta)))
    compare(got, want).assert_close(RTOL, ATOL)


def test_statistics_are_left_as_the_student_left_them():
    model, task = conv_bn().train(), image_task()
    f = lazymaml.straight_through(model, task, 3, 0.2)
    _, frozen = Student.read(model).run(task, InnerLoop(3, 0.2))
    for n in dict(model.named_buffers()):
        assert torch.equal(f.tensors[n], frozen[n]), n
    assert int(f.tensors["1.num_batches_tracked"]) == int(model[1].num_batches_tracked) + 3


def test_straight_through_needs_every_trainable_parameter():
    model, task = conv_bn(), image_task()
    teacher = {n: p.detach() for n, p in model.named_parameters() if n != "4.bias"}
    with pytest.raises(ValueError, match=r"missing \['4.bias'\]"):
        lazymaml.straight_through(model, task, 1, 0.1, teacher=teacher)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("adapt", [None, "head", "body"])
@pytest.mark.parametrize("eta", ["single", "horizon", 0.05])
def test_straight_through_graph_equals_hvp_form(steps, adapt, eta):
    model, task = conv_bn().train(), image_task()
    alpha, leap = 0.2, 0.7
    phi_t, _ = Student.read(model, adapt).teacher(task, InnerLoop(steps, alpha, leap))
    theta = dict(model.named_parameters())
    f = lazymaml.straight_through(model, task, steps, alpha, adapt=adapt, leap=leap, jacobian_step=eta)
    for n in theta:
        torch.testing.assert_close(f.tensors[n], phi_t[n], rtol=0, atol=1e-15)  # value: the teacher
    graph = dict(zip(theta, torch.autograd.grad(task.query_loss(f), list(theta.values()))))
    lazy_g = lazymaml.meta_gradient(model, task, steps, alpha, adapt=adapt, leap=leap, jacobian_step=eta)
    compare(graph, lazy_g).assert_close(RTOL, ATOL)
