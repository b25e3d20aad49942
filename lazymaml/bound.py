"""A proven bound on ‖g_exact − g_lazy‖, from exact Hessians along the student's trajectory.

With H_k = ∇²L_S(φ_k), T_0 = I − α E_A H_0, v = ∇L_Q(φ_T) and spectral norms,

    ‖g_exact − g_lazy‖ ≤ [ γ ‖T_0‖ (∏_{k=1}^{K−1} (1 + α‖E_A H_k‖) − 1) + |η − γα| ‖E_A H_0‖ ] ‖v‖

because g_exact − g_lazy = γ T_0ᵀ (Q − I) v + (η − γα) H_0 E_Aᵀ v with Q = T_1ᵀ…T_{K−1}ᵀ, and
‖Q − I‖ ≤ ∏(1 + α‖E_A H_k‖) − 1 by expanding the product. It is 0 at K = 1 with η = γα, and
holds for any twice-differentiable loss with an SGD student. Hessians are dense (n × n) and
computed in float64: for small models.

For one α, γ and task the student's trajectory for K steps is the first K steps of the
trajectory for any longer horizon, so :func:`horizon_terms` computes the terms for several K
from one trajectory: the Hessians of the longest, each once, and ‖v‖ at each K's teacher. The
numbers are the very ones :func:`bound_terms` computes for each K alone (the same float64
operations on the same points); only the repeated work is gone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradcheck.parameters import Adapt, flat, unflat
from gradcheck.settings import InnerLoop, InnerOptimizer, JacobianStep
from gradcheck.state import preserved
from gradcheck.student import Student, apply_leap, converted, support_loss_at
from gradcheck.task import TaskLike, Tasks, as_tasks

from .derivatives import query_gradient, support_gradient

__all__ = ["BoundTerms", "bound_terms", "deviation_bound", "horizon_terms", "parameter_count"]


def _projected_hessian(
    student: Student, task: TaskLike, point: dict[str, Tensor], mask: Tensor, what: str
) -> Tensor:
    """E_A ∇²L_S(point), one dense row per trainable coordinate (rows outside A are zero)."""
    x = flat({n: point[n] for n in student.theta}).requires_grad_(True)
    grads = support_gradient(student, task, unflat(x, student.theta), student.fresh(), what)
    grad = flat(
        torch.zeros_like(student.theta[n]) if g is None else g for n, g in zip(student.adapted, grads)
    )
    rows = torch.zeros(x.numel(), x.numel(), dtype=x.dtype, device=x.device)
    index = mask.nonzero().flatten()
    if grad.requires_grad:
        basis = torch.eye(len(index), dtype=x.dtype, device=x.device)
        (block,) = torch.autograd.grad(
            grad, x, basis, is_grads_batched=True, allow_unused=True, materialize_grads=True
        )
        rows[index] = block
    return rows


@dataclass(frozen=True)
class BoundTerms:
    """What the bound is made of, for one model, task, K, α and γ: it then costs nothing per η."""

    loop: InnerLoop
    t0_norm: float  # ‖T_0‖ = ‖I − α E_A H_0‖
    hessian_norms: tuple[float, ...]  # ‖E_A H_k‖ for k = 0 … K − 1
    v_norm: float  # ‖∇L_Q(φ_T)‖

    def bound(self, jacobian_step: JacobianStep = "single") -> float:
        """The bound on ‖g_exact − g_lazy‖ for the lazy Jacobian step ``jacobian_step`` (η)."""
        eta = self.loop.replace(jacobian_step=jacobian_step).eta
        if not self.hessian_norms:  # K = 0: no step, lazy is exact
            return 0.0
        alpha, gamma = self.loop.lr("the bound"), self.loop.leap
        growth = math.prod(1 + alpha * h for h in self.hessian_norms[1:]) - 1
        first = abs(eta - gamma * alpha) * self.hessian_norms[0]
        return (gamma * self.t0_norm * growth + first) * self.v_norm


def bound_terms(
    model: nn.Module,
    task: TaskLike,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
    max_parameters: int = 4000,
) -> BoundTerms:
    """Spectral norms of the projected Hessians along the SGD student's trajectory, and ‖v‖."""
    loop = InnerLoop(steps, inner_lr, leap, inner_optimizer)
    loop.require("sgd", by="the deviation bound")
    return _terms(model, task, loop, (steps,), adapt, max_parameters)[steps]


def horizon_terms(
    model: nn.Module,
    task: TaskLike,
    horizons: Sequence[int],
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
    max_parameters: int = 4000,
    on_hessian: Callable[[int], None] | None = None,
) -> dict[int, BoundTerms]:
    """:func:`bound_terms` for every K in ``horizons``, from one trajectory of max(horizons) steps.

    Each dense Hessian ‖E_A H_k‖ (k < max K) is computed once and shared by every K > k, ‖T_0‖
    once, ‖v‖ at each K's own teacher: equal to ``bound_terms`` for each K, at the cost of the
    longest alone. ``on_hessian(n)`` is called after each n × n Hessian (for a progress bar).
    """
    if not horizons:
        return {}
    loop = InnerLoop(max(horizons), inner_lr, leap, inner_optimizer)
    loop.require("sgd", by="the deviation bound")
    for k in horizons:
        loop.replace(steps=k)  # refuse a bad K before any work
    return _terms(model, task, loop, tuple(horizons), adapt, max_parameters, on_hessian)


def parameter_count(model: nn.Module) -> int:
    """n, the size of the bound's dense n × n Hessians: the number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.enable_grad()  # the Hessians are differentiated also when the caller is inside torch.no_grad()
def _terms(
    model: nn.Module,
    task: TaskLike,
    loop: InnerLoop,
    horizons: tuple[int, ...],
    adapt: Adapt,
    max_parameters: int,
    on_hessian: Callable[[int], None] | None = None,
) -> dict[int, BoundTerms]:
    """The terms for each K in ``horizons`` (each ≤ loop.steps) along one trajectory of loop.steps."""
    student = Student.read(model, adapt, torch.float64)
    (task,) = converted([task], model, torch.float64, "the bound's dense Hessians")
    n = sum(t.numel() for t in student.theta.values())
    if n > max_parameters:
        raise ValueError(f"the bound needs dense {n}×{n} Hessians; limit max_parameters={max_parameters}")
    mask = flat({k: torch.full_like(t, float(k in student.adapted)) for k, t in student.theta.items()})
    norms, t0, v_norms = [], 0.0, {}
    with preserved(model):
        untrained = student.fresh()
        for k, phi in enumerate(student.trajectory(task, loop, untrained)):
            if k in horizons:  # K = k: the teacher of k steps, with the tensors as k steps left them
                phi_k = {name: t.detach().clone() for name, t in phi.items()}
                phi_t = apply_leap(student.theta, phi_k, loop.leap)
                v, _ = query_gradient(student, task, phi_t, {u: t.clone() for u, t in untrained.items()})
                v_norms[k] = flat(v).norm().item()
            if k == loop.steps:
                break
            projected = _projected_hessian(student, task, phi, mask, support_loss_at(k, loop.steps))
            norms.append(torch.linalg.matrix_norm(projected, ord=2).item())
            if k == 0:
                eye = torch.eye(n, dtype=projected.dtype, device=projected.device)
                t0 = torch.linalg.matrix_norm(eye - loop.lr("the bound") * projected, ord=2).item()
            if on_hessian is not None:
                on_hessian(n)
    return {
        k: BoundTerms(loop.replace(steps=k), t0 if k else 0.0, tuple(norms[:k]), v_norms[k]) for k in horizons
    }


def deviation_bound(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    jacobian_step: JacobianStep = "single",
    inner_optimizer: InnerOptimizer = "sgd",
    max_parameters: int = 4000,
) -> float:
    """The proven bound on ‖g_exact − g_lazy‖ for this model and task (SGD student).

    Derived in the module docstring; written out in docs/mathematics.md.

    For several tasks, the mean of their bounds: it bounds the deviation of the mean gradients
    (triangle inequality).
    """
    loop = InnerLoop(steps, inner_lr, leap, inner_optimizer)
    loop.require("sgd", by="the deviation bound")
    loop.replace(jacobian_step=jacobian_step)  # refuse a bad η before any work
    tasks = as_tasks(task_or_tasks)
    bounds = [
        _terms(model, t, loop, (steps,), adapt, max_parameters)[steps].bound(jacobian_step) for t in tasks
    ]
    return sum(bounds) / len(bounds)
