"""A proven bound on ‖g_exact − g_lazy‖, from exact Hessians along the student's trajectory.

With H_k = ∇²L_S(φ_k), T_0 = I − α E_A H_0, v = ∇L_Q(φ_T) and spectral norms,

    ‖g_exact − g_lazy‖ ≤ [ γ ‖T_0‖ (∏_{k=1}^{K−1} (1 + α‖E_A H_k‖) − 1) + |η − γα| ‖E_A H_0‖ ] ‖v‖

because g_exact − g_lazy = γ T_0ᵀ (Q − I) v + (η − γα) H_0 E_Aᵀ v with Q = T_1ᵀ…T_{K−1}ᵀ, and
‖Q − I‖ ≤ ∏(1 + α‖E_A H_k‖) − 1 by expanding the product. It is 0 at K = 1 with η = γα, and
holds for any twice-differentiable loss with an SGD student. Hessians are dense (n × n) and
computed in float64: for small models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradcheck.parameters import Adapt, flat, unflat
from gradcheck.settings import InnerLoop, InnerOptimizer, JacobianStep
from gradcheck.state import preserved
from gradcheck.student import Student, converted, support_loss_at
from gradcheck.task import TaskLike, Tasks, as_tasks

from .derivatives import query_gradient, support_gradient

__all__ = ["BoundTerms", "bound_terms", "deviation_bound"]


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
        alpha, gamma = self.loop.inner_lr, self.loop.leap
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
    return _terms(model, task, loop, adapt, max_parameters)


@torch.enable_grad()  # the Hessians are differentiated also when the caller is inside torch.no_grad()
def _terms(
    model: nn.Module, task: TaskLike, loop: InnerLoop, adapt: Adapt, max_parameters: int
) -> BoundTerms:
    student = Student.read(model, adapt, torch.float64)
    (task,) = converted([task], model, torch.float64, "the bound's dense Hessians")
    n = sum(t.numel() for t in student.theta.values())
    if n > max_parameters:
        raise ValueError(f"the bound needs dense {n}×{n} Hessians; limit max_parameters={max_parameters}")
    mask = flat({k: torch.full_like(t, float(k in student.adapted)) for k, t in student.theta.items()})
    norms, t0 = [], 0.0
    with preserved(model):
        untrained = student.fresh()
        for k, phi in enumerate(student.trajectory(task, loop, untrained)):
            if k == loop.steps:
                break
            projected = _projected_hessian(student, task, phi, mask, support_loss_at(k, loop.steps))
            norms.append(torch.linalg.matrix_norm(projected, ord=2).item())
            if k == 0:
                eye = torch.eye(n, dtype=projected.dtype, device=projected.device)
                t0 = torch.linalg.matrix_norm(eye - loop.inner_lr * projected, ord=2).item()
        phi_t, untrained = student.teacher(task, loop)
        v, _ = query_gradient(student, task, phi_t, untrained)
    return BoundTerms(loop, t0, tuple(norms), flat(v).norm().item())


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
    bounds = [_terms(model, t, loop, adapt, max_parameters).bound(jacobian_step) for t in tasks]
    return sum(bounds) / len(bounds)
