"""Approximate meta-gradients to set beside the lazy one, all measured against the same oracle.

Each has ``lazymaml.meta_gradient``'s calling convention — ``(model, task, steps, inner_lr, *,
leap, adapt, inner_optimizer)`` plus its own keyword options — returns ``{name: gradient}`` for
every trainable parameter and leaves the model exactly as it was. v = ∇L_Q(φ_T).

* ``first_order``  g = v                                   (first-order MAML)
* ``reptile``      g = (θ − φ_K) / (Kα)                    (Reptile's direction; ignores L_Q)
* ``truncated``    g = [(1 − γ)I + γ T_{K−T}ᵀ…T_{K−1}ᵀ] v  (backprop through the last T steps)
* ``imaml``        g_A = (I + H_AA/λ)⁻¹ v_A, g_B = v_B − H_BA g_A / λ at the proximal φ_K
* ``lazy``         g = v − γα ∇⟨E_A∇L_S(θ), v⟩             (:func:`lazymaml.meta_gradient`)
* ``lazy_horizon`` g = v − γKα ∇⟨E_A∇L_S(θ), v⟩
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gradcheck.inner_loop import (
    QUERY_WHAT,
    InnerOptimizer,
    Problem,
    apply_leap,
    check_hyperparameters,
    checked,
    support_what,
)
from gradcheck.parameters import Adapt, dense, flat, unflat
from gradcheck.state import preserved
from gradcheck.task import Task

from .derivatives import hessian_vector_products, query_gradient
from .lazy import meta_gradient, meta_gradient_and_loss

Estimator = Callable[..., dict[str, Tensor]]


def first_order(
    model: nn.Module,
    task: Task,
    steps: int,
    inner_lr: float,
    *,
    leap: float = 1.0,
    adapt: Adapt = None,
    inner_optimizer: InnerOptimizer = None,
) -> dict[str, Tensor]:
    """First-order MAML: g = ∇L_Q(φ_T), the inner loop's Jacobian taken as the identity."""
    return meta_gradient_and_loss(
        model, task, steps, inner_lr, leap, adapt=adapt, inner_optimizer=inner_optimizer, first_order=True
    )[0]


def reptile(
    model: nn.Module,
    task: Task,
    steps: int,
    inner_lr: float,
    *,
    leap: float = 1.0,
    adapt: Adapt = None,
    inner_optimizer: InnerOptimizer = None,
) -> dict[str, Tensor]:
    """Reptile's direction g = (θ − φ_K)/(Kα) (γ cancels; zero outside A and at K = 0)."""
    check_hyperparameters(steps, inner_lr, leap)
    problem = Problem.read(model, task, adapt)
    with preserved(model):
        phi, _ = problem.student(steps, inner_lr, inner_optimizer)
    scale = 1 / (steps * inner_lr) if steps else 0.0
    return {n: (t - phi[n]) * scale for n, t in problem.theta.items()}


@torch.enable_grad()
def truncated(
    model: nn.Module,
    task: Task,
    steps: int,
    inner_lr: float,
    *,
    leap: float = 1.0,
    adapt: Adapt = None,
    horizon: int | None = None,
) -> dict[str, Tensor]:
    """Backpropagation through the last T = ``horizon`` SGD steps (default T = K: exact MAML).

    The first K − T steps run without a graph and count as the identity (T = 0 is first-order
    MAML); the last T are unrolled with ``torch.func.functional_call`` and differentiated.
    """
    check_hyperparameters(steps, inner_lr, leap)
    horizon = steps if horizon is None else horizon
    if isinstance(horizon, bool) or not isinstance(horizon, int) or not 0 <= horizon <= steps:
        raise ValueError(f"horizon must be an integer in [0, steps={steps}], got {horizon!r}")
    problem = Problem.read(model, task, adapt)
    with preserved(model):
        buffers = problem.fresh_buffers()
        student = problem.trajectory(steps, inner_lr, buffers=buffers)  # numbered out of K in errors
        start = next(itertools.islice(student, steps - horizon, None))
        theta = {n: t.detach().requires_grad_(True) for n, t in problem.theta.items()}
        phi = {n: t + (start[n] - t).detach() for n, t in theta.items()}  # value φ_{K−T}, Jacobian I
        for k in range(steps - horizon, steps):
            loss = checked(problem.task.support_loss(problem.at(phi, buffers)), support_what(k, steps))
            grads = torch.autograd.grad(
                loss, [phi[n] for n in problem.adapted], create_graph=True, allow_unused=True
            )
            for n, g in zip(problem.adapted, grads):
                if g is not None:
                    phi[n] = phi[n] - inner_lr * g
        phi_t = apply_leap(theta, phi, leap)
        loss = checked(problem.task.query_loss(problem.at(phi_t, buffers)), QUERY_WHAT)
        grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
    return dense(theta, grads)


def _conjugate_gradient(
    operator: Callable[[Tensor], Tensor], b: Tensor, iterations: int, tol: float
) -> tuple[Tensor, float, int]:
    """Solve operator(x) = b for a symmetric positive definite operator.

    Returns x, the relative residual ‖b − Ax‖/‖b‖ reached, and the iterations used.
    """
    x, r = torch.zeros_like(b), b.clone()
    p, rr, norm_b = r.clone(), torch.dot(r, r), b.norm().item()
    for i in range(iterations):
        residual = rr.sqrt().item() / norm_b if norm_b else 0.0
        if residual <= tol:
            return x, residual, i
        ap = operator(p)
        curvature = torch.dot(p, ap)
        if curvature <= 0:
            raise ValueError(
                f"conjugate gradient: the operator is not positive definite (pᵀAp = {curvature:.3e})"
            )
        step = rr / curvature
        x, r = x + step * p, r - step * ap
        rr, rr_old = torch.dot(r, r), rr
        p = r + (rr / rr_old) * p
    return x, rr.sqrt().item() / norm_b, iterations


def imaml(
    model: nn.Module,
    task: Task,
    steps: int,
    inner_lr: float,
    *,
    leap: float = 1.0,
    adapt: Adapt = None,
    inner_optimizer: InnerOptimizer = None,
    lam: float = 1.0,
    cg_iterations: int = 20,
    cg_tol: float = 1e-10,
) -> dict[str, Tensor]:
    """Implicit MAML (Rajeswaran et al., 2019): the student minimises L_S(φ) + (λ/2)‖φ_A − θ_A‖²;
    its fixed point's Jacobian gives g_A = (I + H_AA/λ)⁻¹ v_A (conjugate gradient with
    Hessian-vector products at φ_K) and g_B = v_B − H_BA g_A / λ; with γ < 1 the result is
    (1 − γ) v + γ of that. Warns when CG stops above ``cg_tol`` (relative residual).
    """
    check_hyperparameters(steps, inner_lr, leap)
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam (the proximal strength λ) must be > 0, got {lam!r}")
    problem = Problem.read(model, task, adapt)
    with preserved(model):
        phi, buffers = problem.student(steps, inner_lr, inner_optimizer, proximal=lam)
        phi_t = apply_leap(problem.theta, phi, leap)
        v, _ = query_gradient(problem, phi_t, buffers)
        products = hessian_vector_products(problem, phi, buffers)
        like = {n: v[n] for n in problem.adapted}

        def operator(x: Tensor) -> Tensor:  # x ↦ (I + H_AA/λ) x on the adapted coordinates
            h = products(unflat(x, like))
            return x + flat(h[n] for n in problem.adapted) / lam

        try:
            x, residual, used = _conjugate_gradient(operator, flat(like), cg_iterations, cg_tol)
        except ValueError as error:
            raise ValueError(
                "iMAML: I + H/λ is not positive definite at the adapted parameters (the support loss "
                f"has curvature below −λ there); increase lam (now {lam})"
            ) from error
        if residual > cg_tol:
            warnings.warn(
                f"iMAML: conjugate gradient stopped at relative residual {residual:.2e} > cg_tol={cg_tol:g} "
                f"after {used} iterations; raise cg_iterations or lam",
                RuntimeWarning,
                stacklevel=2,
            )
        g_a = unflat(x, like)
        h = products(g_a, last=True)
    implicit = {n: g_a[n] if n in g_a else v[n] - h[n] / lam for n in v}
    return {n: (1 - leap) * v[n] + leap * implicit[n] for n in v}


ESTIMATORS: dict[str, Estimator] = {
    "first_order": first_order,
    "reptile": reptile,
    "truncated": truncated,
    "imaml": imaml,
    "lazy": meta_gradient,
    "lazy_horizon": functools.partial(meta_gradient, jacobian_step="horizon"),
}
