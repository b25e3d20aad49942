"""Central finite differences of the meta-objective F(θ) = L_Q(θ + γ(φ_K(θ) − θ)), in float64.

F is evaluated by running the student with the real ``torch.optim`` optimizer on a float64 copy
of the model's tensors — no code shared with the oracle's differentiable unroll, and the user's
model is never touched.

Step size and tolerance. The central difference D(h) = (F(θ+hu) − F(θ−hu)) / 2h has truncation
error ≈ h²|F'''|/6 and rounding error ≈ ε|F|/h (ε = 2⁻⁵² in float64), so h ≈ (3ε|F|/|F'''|)^⅓
is optimal; the default h = 1e-6 gives errors around 1e-10 for O(1) losses. :func:`check`
does not guess: per direction it also evaluates D(2h) and takes |D(2h) − D(h)| (three times the
truncation error of D(h), plus the rounding noise of both) + 4ε|F|/h as the error of the
numerical value, then accepts the analytic value when

    |⟨g, u⟩ − D(h)| ≤ numerical error + rtol · max(|D(h)|, ‖g‖/√n),

where ‖g‖/√n is the typical size of ⟨g, u⟩ for a random unit u in n dimensions (so directions
nearly orthogonal to g do not make the test arbitrarily strict), and rtol reflects the
candidate's own precision: 1e-6 for float64, 1e-3 for float32, 5e-2 for 16-bit floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .parameters import Adapt, flat, trainable, unflat
from .settings import InnerLoop, InnerOptimizer
from .state import preserved
from .student import QUERY_LOSS, Student, checked_loss, converted
from .task import Tasks, as_tasks

__all__ = ["Direction", "DirectionalReport", "check", "meta_gradient", "meta_objective"]

EPS64 = torch.finfo(torch.float64).eps
RTOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def meta_objective(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
) -> tuple[Callable[[Tensor], float], Tensor]:
    """F as a function of the flat float64 vector of trainable parameters, and θ as that vector.

    F(θ) is the mean over tasks of L_Q(φ_T(θ)). The model's tensors are copied in float64, and
    so is the data of a model that is not float64 already; a closure task cannot be converted,
    so it is accepted only with a float64 model (build its data in float64).
    """
    loop = InnerLoop(steps, inner_lr, leap, inner_optimizer)
    tasks = as_tasks(task_or_tasks)
    student = Student.read(model, adapt, torch.float64)
    tasks = converted(tasks, model, torch.float64, "finite differences")
    theta = student.theta

    def objective(x: Tensor) -> float:
        start = unflat(x, theta)
        with preserved(model):
            total = 0.0
            for task in tasks:
                phi_t, frozen = student.teacher(task, loop, start=start)
                total += checked_loss(task.query_loss(student.at(phi_t, frozen)), QUERY_LOSS).item()
        return total / len(tasks)

    return objective, flat(theta)


def meta_gradient(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
    eps: float = 1e-6,
    max_parameters: int = 20_000,
) -> dict[str, Tensor]:
    """Central differences (F(θ + h eᵢ) − F(θ − h eᵢ)) / 2h for every coordinate, in float64.

    Costs 2n evaluations of F (each K + 1 forward/backward passes per task): meant for small
    models; above ``max_parameters`` use :func:`check`.
    """
    theta = trainable(model)
    n = sum(p.numel() for p in theta.values())
    if n > max_parameters:
        raise ValueError(
            f"the model has {n} trainable parameters; coordinate-wise finite differences need "
            f"{2 * n} meta-objective evaluations (limit max_parameters={max_parameters}): use "
            "finite_differences.check for a directional check"
        )
    objective, x0 = meta_objective(
        model, task_or_tasks, steps, inner_lr, adapt=adapt, leap=leap, inner_optimizer=inner_optimizer
    )
    x, g = x0.clone(), torch.empty_like(x0)
    for i in range(n):
        x[i] = x0[i] + eps
        f_plus = objective(x)
        x[i] = x0[i] - eps
        f_minus = objective(x)
        x[i] = x0[i]
        g[i] = (f_plus - f_minus) / (2 * eps)
    return unflat(g, {k: p.detach() for k, p in theta.items()})


@dataclass(frozen=True)
class Direction:
    """One random direction u: analytic ⟨g, u⟩ against the central difference D(h)."""

    analytic: float
    numerical: float
    numerical_error: float
    tolerance: float

    @property
    def error(self) -> float:
        return abs(self.analytic - self.numerical)

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


@dataclass(frozen=True)
class DirectionalReport:
    """The result of :func:`check`: one row per direction."""

    directions: list[Direction]
    eps: float
    rtol: float

    def ok(self) -> bool:
        return all(d.ok for d in self.directions)

    def __str__(self) -> str:
        head = (
            f"{'u':>3}  {'analytic <g,u>':>16}  {'numerical':>16}  {'num. error':>10}  "
            f"{'|difference|':>12}  {'allowed':>9}"
        )
        rows = [
            f"{i:>3}  {d.analytic:>16.9e}  {d.numerical:>16.9e}  {d.numerical_error:>10.2e}  "
            f"{d.error:>12.2e}  {d.tolerance:>9.2e}{'' if d.ok else '  FAIL'}"
            for i, d in enumerate(self.directions)
        ]
        verdict = "ok" if self.ok() else "MISMATCH"
        summary = f"directional check (central differences, h={self.eps:g}, rtol={self.rtol:g}): {verdict}"
        return "\n".join([summary, head, *rows])

    def assert_close(self) -> None:
        """Raise an AssertionError showing numerical vs analytical values unless every row passes."""
        if not self.ok():
            raise AssertionError(f"meta-gradient disagrees with finite differences\n{self}")


def _as_vector(gradient: Mapping[str, Tensor], theta: Mapping[str, Tensor]) -> Tensor:
    missing = [n for n in theta if n not in gradient]
    unexpected = [n for n in gradient if n not in theta]
    wrong = [n for n in theta if n in gradient and gradient[n].shape != theta[n].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            "gradient does not match the model's trainable parameters: "
            f"missing {missing}, unexpected {unexpected}, wrong shape {wrong}"
        )
    return flat(gradient[n].detach().to("cpu", torch.float64) for n in theta)


def check(
    gradient: Mapping[str, Tensor],
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
    directions: int = 8,
    seed: int = 0,
    eps: float = 1e-6,
    rtol: float | None = None,
) -> DirectionalReport:
    """Compare ⟨g, u⟩ with central differences of F along ``directions`` seeded unit vectors.

    Costs 4 evaluations of F per direction (D(h) and D(2h)), whatever the model's size. ``rtol``
    defaults to the candidate's precision (see the module docstring).
    """
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
        raise ValueError(f"directions must be a positive integer, got {directions!r}")
    theta = trainable(model)
    g = _as_vector(gradient, theta)
    if rtol is None:
        rtol = max(RTOL.get(t.dtype, 5e-2) for t in gradient.values())
    objective, x0 = meta_objective(
        model, task_or_tasks, steps, inner_lr, adapt=adapt, leap=leap, inner_optimizer=inner_optimizer
    )
    generator = torch.Generator().manual_seed(seed)
    typical = g.norm().item() / math.sqrt(g.numel())
    f0 = abs(objective(x0))
    rows = []
    for _ in range(directions):
        u = torch.randn(g.numel(), generator=generator, dtype=torch.float64)
        u = (u / u.norm()).to(x0.device)

        def central(h: float, u: Tensor = u) -> float:
            return (objective(x0 + h * u) - objective(x0 - h * u)) / (2 * h)

        d1, d2 = central(eps), central(2 * eps)
        noise = abs(d2 - d1) + 4 * EPS64 * f0 / eps
        analytic = torch.dot(g, u.cpu()).item()
        rows.append(Direction(analytic, d1, noise, noise + rtol * max(abs(d1), typical)))
    return DirectionalReport(rows, eps, rtol)
