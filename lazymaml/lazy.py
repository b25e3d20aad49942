"""The lazy meta-gradient (Jamal, Wang & Gong, ICCV 2021), one Hessian-vector product at θ.

The student takes K steps with no graph, the teacher leaps to φ_T = θ + γ(φ_K − θ), and the
meta-gradient is taken as though one differentiable step of size η had led from θ to φ_T:

    g_lazy = (I − η E_A ∇²L_S(θ))ᵀ v = v − η ∇_θ ⟨E_A ∇L_S(θ), v⟩,    v = ∇L_Q(φ_T).

η is chosen by ``jacobian_step``: ``"single"`` (the default) is γα, with which g_lazy equals
the exact MAML meta-gradient at K = 1; ``"horizon"`` is γKα ((I − αH)^K to first order); a
float is η itself. With K = 0 no step is taken and g = v. Memory and backward cost do not depend
on K.
"""

from __future__ import annotations

import math
from numbers import Real

from torch import Tensor, nn

from gradcheck.parameters import Adapt, task_mean
from gradcheck.settings import InnerLoop, InnerOptimizer
from gradcheck.state import preserved
from gradcheck.student import Student
from gradcheck.task import TaskLike, Tasks, as_tasks

from .derivatives import hvp, query_gradient

__all__ = ["JacobianStep", "lazy_gradient", "meta_gradient", "resolve_jacobian_step"]

JacobianStep = str | float
"""η: ``"single"`` (γα), ``"horizon"`` (γKα) or a float ≥ 0."""


def resolve_jacobian_step(jacobian_step: JacobianStep, loop: InnerLoop) -> float:
    """η for ``jacobian_step``: "single" → γα, "horizon" → γKα, a float → itself; 0 when K = 0."""
    if isinstance(jacobian_step, str):
        if jacobian_step not in ("single", "horizon"):
            raise ValueError(f'jacobian_step must be "single", "horizon" or a float, got {jacobian_step!r}')
        eta = loop.leap * loop.inner_lr * (loop.steps if jacobian_step == "horizon" else 1)
    elif isinstance(jacobian_step, Real) and not isinstance(jacobian_step, bool):
        if not (math.isfinite(jacobian_step) and jacobian_step >= 0):
            raise ValueError(f"jacobian_step as a float (η) must be finite and >= 0, got {jacobian_step}")
        eta = float(jacobian_step)
    else:
        raise TypeError(f'jacobian_step must be "single", "horizon" or a float, got {jacobian_step!r}')
    return eta if loop.steps > 0 else 0.0


def lazy_gradient(
    student: Student, task: TaskLike, loop: InnerLoop, eta: float
) -> tuple[dict[str, Tensor], Tensor]:
    """g_lazy on one task for an already-read student and checked settings, and L_Q(φ_T).

    ``eta`` = 0 gives v = ∇L_Q(φ_T), first-order MAML at the teacher.
    """
    phi_t, frozen = student.teacher(task, loop)
    v, loss = query_gradient(student, task, phi_t, frozen)
    if eta == 0:
        return v, loss
    h = hvp(student, task, student.theta, v)
    return {n: v[n] - eta * h[n] for n in v}, loss


def meta_gradient(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    jacobian_step: JacobianStep = "single",
    inner_optimizer: InnerOptimizer = "sgd",
) -> dict[str, Tensor]:
    """The lazy meta-gradient, keyed like ``model.named_parameters()`` (every trainable one).

    ``inner_optimizer``: "sgd" (the default), "adam", or any factory
    ``params -> torch.optim.Optimizer`` — nothing is differentiated through the student, so
    any optimizer works; η is still derived from ``inner_lr``. For several tasks, the mean.
    The model is left exactly as it was, also when this raises.
    """
    loop = InnerLoop(steps, inner_lr, leap, inner_optimizer)
    eta = resolve_jacobian_step(jacobian_step, loop)
    tasks = as_tasks(task_or_tasks)
    student = Student.read(model, adapt)
    with preserved(model):
        return task_mean([lazy_gradient(student, task, loop, eta)[0] for task in tasks])
