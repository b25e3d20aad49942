"""Approximate meta-gradients to set beside the lazy one, all measured against the same oracle.

Each has the project's calling convention — ``(model, task_or_tasks, steps, inner_lr, *, adapt,
leap, inner_optimizer)`` plus its own keyword options — returns ``{name: gradient}`` for every
trainable parameter (for several tasks, the mean) and leaves the model exactly as it was.
v = ∇L_Q(φ_T).

* ``first_order``  g = v                                   (first-order MAML)
* ``reptile``      g = (θ − φ_K) / (Kα)                    (Reptile's direction; ignores L_Q)
* ``truncated``    g = [(1 − γ)I + γ T_{K−T}ᵀ…T_{K−1}ᵀ] v  (backprop through the last T steps)
* ``imaml``        g_A = (I + H_AA/λ)⁻¹ v_A, g_B = v_B − H_BA g_A / λ at the proximal φ_K
* ``lazy``         g = v − γα ∇⟨E_A∇L_S(θ), v⟩             (:func:`lazymaml.meta_gradient`)
* ``lazy_horizon`` g = v − γKα ∇⟨E_A∇L_S(θ), v⟩

Their per-task building blocks (:data:`PerTask`: one task, an already-read student, checked
settings) are what :class:`lazymaml.MetaLearner` runs on its sequential path:
:func:`lazymaml.lazy.lazy_gradient` (lazy, and first-order with η = 0), :func:`reptile_direction`,
:func:`truncated_gradient` and :func:`implicit_gradient`.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from types import FrameType

import torch
from torch import Tensor, nn

from gradcheck.parameters import Adapt, dense, flat, task_mean, unflat
from gradcheck.settings import InnerLoop, InnerOptimizer
from gradcheck.state import preserved
from gradcheck.student import QUERY_LOSS, Student, apply_leap, checked_loss, support_loss_at
from gradcheck.task import TaskLike, Tasks, as_tasks

from .derivatives import hessian_vector_products, query_gradient
from .lazy import lazy_gradient, meta_gradient

__all__ = [
    "ESTIMATORS",
    "ConvergenceWarning",
    "Estimator",
    "PerTask",
    "first_order",
    "imaml",
    "lazy_horizon",
    "reptile",
    "truncated",
]

Estimator = Callable[..., dict[str, Tensor]]


class ConvergenceWarning(RuntimeWarning):
    """An iterative solve (iMAML's conjugate gradient) stopped before reaching its tolerance."""


PerTask = Callable[[Student, TaskLike], tuple[dict[str, Tensor], Tensor]]
"""One task's estimate for an already-read student: ``{name: gradient}`` for every trainable
parameter, and the query loss L_Q(φ_T) (detached). The building block the learner runs per task."""


def _mean(
    model: nn.Module,
    task_or_tasks: Tasks,
    adapt: Adapt,
    gradient: Callable[[Student, TaskLike], dict[str, Tensor]],
) -> dict[str, Tensor]:
    """The mean over tasks of ``gradient(student, task)``, the model read once and left as it was."""
    tasks = as_tasks(task_or_tasks)
    student = Student.read(model, adapt)
    with preserved(model):
        return task_mean([gradient(student, task) for task in tasks])


def _caller_stacklevel() -> int:
    """``stacklevel`` for a warning issued by the caller of this function: the first frame
    outside the ``lazymaml`` package (the user's line), however deep the call came from."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("lazymaml"):
        frame, level = frame.f_back, level + 1
    return level


def _displacement(
    student: Student, task: TaskLike, loop: InnerLoop
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """(θ − φ_K)/(Kα) on one task (zero at K = 0), with φ_K and the tensors the run left."""
    phi, frozen = student.run(task, loop)
    scale = 1 / (loop.steps * loop.inner_lr) if loop.steps else 0.0
    return {n: (t - phi[n]) * scale for n, t in student.theta.items()}, phi, frozen


def reptile_direction(student: Student, task: TaskLike, loop: InnerLoop) -> tuple[dict[str, Tensor], Tensor]:
    """Reptile's direction on one task, and L_Q(φ_T): Reptile itself never reads the query set,
    but the learner reports the same loss for every estimator."""
    direction, phi, frozen = _displacement(student, task, loop)
    with torch.no_grad():
        phi_t = apply_leap(student.theta, phi, loop.leap)
        loss = checked_loss(task.query_loss(student.at(phi_t, frozen)), QUERY_LOSS)
    return direction, loss


def check_horizon(horizon: int | None, loop: InnerLoop) -> int:
    """T for ``horizon`` (None → K), refused unless an integer in [0, K]."""
    horizon = loop.steps if horizon is None else horizon
    if isinstance(horizon, bool) or not isinstance(horizon, int) or not 0 <= horizon <= loop.steps:
        raise ValueError(f"horizon must be an integer in [0, steps={loop.steps}], got {horizon!r}")
    return horizon


@torch.enable_grad()
def truncated_gradient(
    student: Student, task: TaskLike, loop: InnerLoop, horizon: int
) -> tuple[dict[str, Tensor], Tensor]:
    """Backpropagation through the last ``horizon`` SGD steps on one task, and L_Q(φ_T)."""
    frozen = student.fresh()
    trajectory = student.trajectory(task, loop, frozen)  # numbered out of K in errors
    for _ in range(loop.steps - horizon + 1):
        start = next(trajectory)
    theta = {n: t.detach().requires_grad_(True) for n, t in student.theta.items()}
    phi = {n: t + (start[n] - t).detach() for n, t in theta.items()}  # value φ_{K−T}, Jacobian I
    for k in range(loop.steps - horizon, loop.steps):
        loss = checked_loss(task.support_loss(student.at(phi, frozen)), support_loss_at(k, loop.steps))
        grads = torch.autograd.grad(
            loss, [phi[n] for n in student.adapted], create_graph=True, allow_unused=True
        )
        for n, g in zip(student.adapted, grads):
            if g is not None:
                phi[n] = phi[n] - loop.inner_lr * g
    phi_t = apply_leap(theta, phi, loop.leap)
    loss = checked_loss(task.query_loss(student.at(phi_t, frozen)), QUERY_LOSS)
    gradient = dense(theta, torch.autograd.grad(loss, list(theta.values()), allow_unused=True))
    return gradient, loss.detach()


def first_order(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
) -> dict[str, Tensor]:
    """First-order MAML: g = ∇L_Q(φ_T), the inner loop's Jacobian taken as the identity."""
    loop = InnerLoop(steps, inner_lr, leap, inner_optimizer)
    return _mean(model, task_or_tasks, adapt, lambda s, t: lazy_gradient(s, t, loop, 0.0)[0])


def reptile(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
) -> dict[str, Tensor]:
    """Reptile's direction g = (θ − φ_K)/(Kα) (γ cancels; zero outside A and at K = 0)."""
    loop = InnerLoop(steps, inner_lr, leap, inner_optimizer)
    return _mean(model, task_or_tasks, adapt, lambda s, t: _displacement(s, t, loop)[0])


def truncated(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
    horizon: int | None = None,
) -> dict[str, Tensor]:
    """Backpropagation through the last T = ``horizon`` SGD steps (default T = K: exact MAML).

    The first K − T steps run without a graph and count as the identity (T = 0 is first-order
    MAML); the last T are unrolled with ``torch.func.functional_call`` and differentiated.
    """
    loop = InnerLoop(steps, inner_lr, leap, inner_optimizer)
    loop.require("sgd", by="truncated backpropagation")
    horizon = check_horizon(horizon, loop)
    return _mean(model, task_or_tasks, adapt, lambda s, t: truncated_gradient(s, t, loop, horizon)[0])


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


def check_lam(lam: float) -> float:
    """λ, refused unless a finite real > 0."""
    if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam (the proximal strength λ) must be > 0, got {lam!r}")
    return float(lam)


def implicit_gradient(
    student: Student, task: TaskLike, loop: InnerLoop, lam: float, cg_iterations: int, cg_tol: float
) -> tuple[dict[str, Tensor], Tensor]:
    """iMAML's meta-gradient on one task (see :func:`imaml`), and L_Q(φ_T)."""
    phi, frozen = student.run(task, loop, proximal=lam)
    phi_t = apply_leap(student.theta, phi, loop.leap)
    v, loss = query_gradient(student, task, phi_t, frozen)
    products = hessian_vector_products(student, task, phi, frozen)
    like = {n: v[n] for n in student.adapted}

    def operator(x: Tensor) -> Tensor:  # x ↦ (I + H_AA/λ) x on the adapted coordinates
        h = products(unflat(x, like))
        return x + flat(h[n] for n in student.adapted) / lam

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
            ConvergenceWarning,
            stacklevel=_caller_stacklevel(),
        )
    g_a = unflat(x, like)
    h = products(g_a, last=True)
    g = {n: g_a[n] if n in g_a else v[n] - h[n] / lam for n in v}
    return {n: (1 - loop.leap) * v[n] + loop.leap * g[n] for n in v}, loss


def imaml(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
    lam: float = 1.0,
    cg_iterations: int = 20,
    cg_tol: float = 1e-10,
) -> dict[str, Tensor]:
    """Implicit MAML (Rajeswaran et al., 2019): the student minimises L_S(φ) + (λ/2)‖φ_A − θ_A‖²;
    its fixed point's Jacobian gives g_A = (I + H_AA/λ)⁻¹ v_A (conjugate gradient with
    Hessian-vector products at φ_K) and g_B = v_B − H_BA g_A / λ; with γ < 1 the result is
    (1 − γ) v + γ of that. Warns when CG stops above ``cg_tol`` (relative residual).
    """
    loop = InnerLoop(steps, inner_lr, leap, inner_optimizer)
    lam = check_lam(lam)
    return _mean(
        model, task_or_tasks, adapt, lambda s, t: implicit_gradient(s, t, loop, lam, cg_iterations, cg_tol)[0]
    )


def lazy_horizon(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
) -> dict[str, Tensor]:
    """The lazy meta-gradient with η = γKα (``jacobian_step="horizon"``)."""
    return meta_gradient(
        model,
        task_or_tasks,
        steps,
        inner_lr,
        adapt=adapt,
        leap=leap,
        jacobian_step="horizon",
        inner_optimizer=inner_optimizer,
    )


ESTIMATORS: dict[str, Estimator] = {
    "first_order": first_order,
    "reptile": reptile,
    "truncated": truncated,
    "imaml": imaml,
    "lazy": meta_gradient,
    "lazy_horizon": lazy_horizon,
}
