"""lazymaml.derivatives: v = ∇L_Q(φ), E_A ∇L_S with its graph, and the Hessian-vector product
∇²L_S(θ) E_Aᵀ u — against a dense Hessian (``torch.autograd.functional.hessian`` of the model as
a function of one flat vector, tests.helpers.Flat) and against finite differences.

Tolerances: dense and Hessian-vector-product computations are the same float64 quantity by
different sequences of operations (rounding ~1e-16 per operation, measured below 1e-14), compared
to rtol 1e-10, atol 1e-13; a missing mixed term or a missing projection changes entries at the
1e-2 level. Finite differences: rtol 1e-6, atol 1e-9 (central, h = 1e-6, error ~1e-10).
"""

import pytest
import torch

import lazymaml
from gradcheck import Task, compare
from gradcheck.student import Student
from lazymaml.derivatives import AutogradObjective, FuncObjective, hvp, query_gradient, support_gradient
from tests.helpers import (
    F64,
    Flat,
    Spare,
    adapted_names,
    conv_bn,
    image_task,
    mlp,
    regression_task,
    stats_net,
    stats_task,
)

RTOL, ATOL = 1e-10, 1e-13


def random_like(tensors, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in tensors.items()}


PROBLEMS = {
    "mlp": lambda: (mlp([3, 5, 2], "softplus"), regression_task(inputs=3, outputs=2)),
    "conv+BatchNorm": lambda: (conv_bn().train(), image_task()),
}


BACKENDS = {"autograd": AutogradObjective, "torch.func": FuncObjective}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("adapt", [None, "head", "body"])
def test_hvp_is_the_dense_hessian_times_the_projected_vector(backend, problem, adapt):
    """∇_θ ⟨E_A ∇L_S(θ), u⟩ = H E_Aᵀ u over every trainable parameter: the rows outside A (the
    ANIL body, the BOIL head) carry the mixed term ∂²L_S/∂θ_B∂θ_A u_A. Both backends, one product
    and several from one first derivative."""
    model, task = PROBLEMS[problem]()
    student = Student.read(model, adapt)
    u = random_like(student.theta)
    objective = BACKENDS[backend](student, task)
    got = objective.hvp(student.theta, student.fresh(), u)
    again = objective.hvps(student.theta, student.fresh())(u, last=True)
    compare(again, got).assert_close(RTOL, ATOL)
    flat = Flat(model, task, adapt)
    hessian = torch.autograd.functional.hessian(flat.support, flat.theta, vectorize=True)
    want = flat.named(hessian @ (flat.mask * torch.cat([u[n].reshape(-1) for n in flat.names])))
    compare(got, want).assert_close(RTOL, ATOL)
    outside = [n for n in student.theta if n not in adapted_names(model, adapt)]
    for n in outside:  # the mixed term is there, and not zero
        assert torch.count_nonzero(got[n]) > 0, n


def test_hvp_starts_from_fresh_statistics_every_time():
    """``stats_net`` normalises with the statistics its forward has just written: an HVP that wrote
    the student's read copies would change them, and the next HVP with them."""
    model, task = stats_net().train(), stats_task()
    student = Student.read(model)
    kept = {n: t.clone() for n, t in student.untrained.items()}
    u = random_like(student.theta)
    first, second = hvp(student, task, student.theta, u), hvp(student, task, student.theta, u)
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert all(torch.equal(student.untrained[n], kept[n]) for n in kept)


def test_several_products_from_one_graph():
    model, task = mlp([3, 5, 2], "tanh"), regression_task(inputs=3, outputs=2)
    student = Student.read(model, "body")
    product = AutogradObjective(student, task).hvps(student.theta, student.fresh())
    vectors = [random_like(student.theta, seed) for seed in range(3)]
    got = [product(u, last=i == 2) for i, u in enumerate(vectors)]
    for u, h in zip(vectors, got):
        compare(h, hvp(student, task, student.theta, u)).assert_close(RTOL, ATOL)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        product(vectors[0])  # last=True released the graph


def test_hvp_is_zero_where_the_support_loss_is_linear_in_the_adapted_parameters():
    model = torch.nn.Linear(2, 1).double()
    x = torch.randn(5, 2, dtype=F64)
    task = Task.from_closures(lambda f: f(x).sum(), lambda f: f(x).pow(2).sum())
    student = Student.read(model)
    got = hvp(student, task, student.theta, random_like(student.theta))
    assert got.keys() == student.theta.keys()
    assert all(torch.equal(got[n], torch.zeros_like(t)) for n, t in student.theta.items())


@pytest.mark.parametrize("train", [True, False])
def test_query_gradient_at_a_point_with_the_given_statistics(train):
    """v = ∇L_Q(φ) at φ ≠ θ, with running statistics that differ from the model's (they matter in
    eval mode), against the flat-vector model evaluated with the same statistics."""
    model, task = conv_bn().train(train), image_task()
    student = Student.read(model)
    point = {
        n: t + d for (n, t), d in zip(student.theta.items(), random_like(student.theta, 1, 0.1).values())
    }
    frozen = student.fresh()
    frozen["1.running_mean"] += 0.2
    v, loss = query_gradient(student, task, point, frozen)
    flat = Flat(model, task)
    flat.buffers["1.running_mean"] = frozen["1.running_mean"].clone()
    x = torch.cat([point[n].reshape(-1) for n in flat.names]).requires_grad_()
    want_loss = flat.query(x)
    (want,) = torch.autograd.grad(want_loss, x)
    compare(v, flat.named(want)).assert_close(RTOL, ATOL)
    torch.testing.assert_close(loss, want_loss.detach(), rtol=RTOL, atol=0)
    assert not loss.requires_grad


def test_query_gradient_is_zero_for_a_parameter_the_loss_never_reads():
    model, task = Spare(), regression_task()
    student = Student.read(model)
    v, _ = query_gradient(student, task, student.theta, student.fresh())
    assert torch.equal(v["spare"], torch.zeros(3, dtype=F64)) and torch.count_nonzero(v["linear.weight"]) > 0


def test_support_gradient_keeps_its_graph_for_the_adapted_names_only():
    model, task = Spare(), regression_task()
    student = Student.read(model, ["linear.weight", "spare"])
    point = {n: t.clone().requires_grad_() for n, t in student.theta.items()}
    grads = dict(zip(student.adapted, support_gradient(student, task, point, student.fresh())))
    assert list(grads) == ["spare", "linear.weight"] and grads["spare"] is None  # L_S does not read it
    weight = grads["linear.weight"]
    x, y = task.support
    (want,) = torch.autograd.grad(
        torch.nn.functional.mse_loss(x @ point["linear.weight"].T + point["linear.bias"], y),
        point["linear.weight"],
    )
    torch.testing.assert_close(weight, want, rtol=RTOL, atol=ATOL)
    assert weight.requires_grad  # second derivatives flow back to the point
    (mixed,) = torch.autograd.grad(weight.sum(), point["linear.bias"])
    assert mixed.abs().item() > 0


def test_hvp_equals_finite_differences_of_the_support_gradient():
    model, task = mlp([3, 6, 2], "softplus"), regression_task(inputs=3, outputs=2)
    student = Student.read(model, "head")
    g = torch.Generator().manual_seed(0)
    u = {n: torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in student.theta.items()}
    h = lazymaml.hvp(student, task, student.theta, u)

    def gradient(shift):  # ∇L_S at θ + shift·E_Aᵀu, first order only
        point = {
            n: (t + shift * u[n] if n in student.adapted else t).requires_grad_()
            for n, t in student.theta.items()
        }
        loss = task.support_loss(student.at(point, student.fresh()))
        return dict(zip(point, torch.autograd.grad(loss, list(point.values()))))

    eps = 1e-6
    plus, minus = gradient(eps), gradient(-eps)
    fd = {n: (plus[n] - minus[n]) / (2 * eps) for n in plus}
    compare(h, fd).assert_close(rtol=1e-6, atol=1e-9)
    assert torch.count_nonzero(h["0.weight"]) > 0  # the body gets its mixed second-derivative term
