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

from gradcheck.inner_loop import Problem, check_hyperparameters, support_what
from gradcheck.parameters import Adapt, flat, unflat
from gradcheck.state import preserved
from gradcheck.task import Task

from .derivatives import query_gradient, support_gradient
from .lazy import JacobianStep, step_size


def _projected_hessian(problem: Problem, point: dict[str, Tensor], mask: Tensor, what: str) -> Tensor:
    """E_A ∇²L_S(point), one dense row per trainable coordinate (rows outside A are zero)."""
    x = flat({n: point[n] for n in problem.trainable}).requires_grad_(True)
    grads = support_gradient(problem, unflat(x, problem.theta), problem.fresh_buffers(), what)
    grad = flat(
        torch.zeros_like(problem.params[n]) if g is None else g for n, g in zip(problem.adapted, grads)
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

    inner_lr: float
    leap: float
    t0_norm: float  # ‖T_0‖ = ‖I − α E_A H_0‖
    hessian_norms: tuple[float, ...]  # ‖E_A H_k‖ for k = 0 … K − 1
    v_norm: float  # ‖∇L_Q(φ_T)‖

    def bound(self, eta: float) -> float:
        """The bound on ‖g_exact − g_lazy‖ for the lazy Jacobian step η."""
        if not self.hessian_norms:  # K = 0: no step, lazy is exact
            return 0.0
        growth = math.prod(1 + self.inner_lr * h for h in self.hessian_norms[1:]) - 1
        first = abs(eta - self.leap * self.inner_lr) * self.hessian_norms[0]
        return (self.leap * self.t0_norm * growth + first) * self.v_norm


def bound_terms(
    model: nn.Module,
    task: Task,
    steps: int,
    inner_lr: float,
    leap: float = 1.0,
    adapt: Adapt = None,
    max_parameters: int = 4000,
) -> BoundTerms:
    """Spectral norms of the projected Hessians along the SGD student's trajectory, and ‖v‖."""
    check_hyperparameters(steps, inner_lr, leap)
    problem = Problem.read(model, task, adapt, torch.float64)
    n = sum(t.numel() for t in problem.theta.values())
    if n > max_parameters:
        raise ValueError(f"the bound needs dense {n}×{n} Hessians; limit max_parameters={max_parameters}")
    mask = flat({k: torch.full_like(t, float(k in problem.adapted)) for k, t in problem.theta.items()})
    norms, t0 = [], 0.0
    with preserved(model):
        for k, phi in enumerate(problem.trajectory(steps, inner_lr)):
            if k == steps:
                break
            projected = _projected_hessian(problem, phi, mask, support_what(k, steps))
            norms.append(torch.linalg.matrix_norm(projected, ord=2).item())
            if k == 0:
                eye = torch.eye(n, dtype=projected.dtype, device=projected.device)
                t0 = torch.linalg.matrix_norm(eye - inner_lr * projected, ord=2).item()
        phi_t, buffers = problem.teacher(steps, inner_lr, leap)
        v, _ = query_gradient(problem, phi_t, buffers)
    return BoundTerms(inner_lr, leap, t0, tuple(norms), flat(v).norm().item())


def deviation_bound(
    model: nn.Module,
    task: Task,
    steps: int,
    inner_lr: float,
    leap: float = 1.0,
    jacobian_step: JacobianStep = "single",
    adapt: Adapt = None,
    max_parameters: int = 4000,
) -> float:
    """The SPEC §2 bound on ‖g_exact − g_lazy‖ for this model and task (SGD student)."""
    check_hyperparameters(steps, inner_lr, leap)
    eta = step_size(jacobian_step, steps, inner_lr, leap)
    return bound_terms(model, task, steps, inner_lr, leap, adapt, max_parameters).bound(eta)
