"""The lazy meta-gradient (Jamal, Wang & Gong, ICCV 2021), one Hessian-vector product at θ.

The student takes K steps with no graph, the teacher leaps to φ_T = θ + γ(φ_K − θ), and the
meta-gradient is taken as though one differentiable step of size η had led from θ to φ_T:

    g_lazy = (I − η E_A ∇²L_S(θ))ᵀ v = v − η ∇_θ ⟨E_A ∇L_S(θ), v⟩,    v = ∇L_Q(φ_T).

η = γα ("single", the default: then g_lazy equals the exact MAML meta-gradient at K = 1),
η = γKα ("horizon": (I − αH)^K to first order), or a given float. With K = 0 no step is taken
and g = v. Memory and backward cost do not depend on K.
"""

from __future__ import annotations

import math
from numbers import Real

from torch import Tensor, nn

from gradcheck.inner_loop import InnerOptimizer, Problem, check_hyperparameters
from gradcheck.parameters import Adapt
from gradcheck.state import preserved
from gradcheck.task import Task

from .derivatives import hvp, query_gradient

JacobianStep = str | float


def step_size(jacobian_step: JacobianStep, steps: int, inner_lr: float, leap: float) -> float:
    """η for ``jacobian_step``: "single" → γα, "horizon" → γKα, a float → itself; 0 when K = 0."""
    if isinstance(jacobian_step, str):
        if jacobian_step not in ("single", "horizon"):
            raise ValueError(f'jacobian_step must be "single", "horizon" or a float, got {jacobian_step!r}')
        eta = leap * inner_lr * (steps if jacobian_step == "horizon" else 1)
    elif isinstance(jacobian_step, Real) and not isinstance(jacobian_step, bool):
        if not (math.isfinite(jacobian_step) and jacobian_step >= 0):
            raise ValueError(f"jacobian_step as a float (η) must be finite and >= 0, got {jacobian_step}")
        eta = float(jacobian_step)
    else:
        raise TypeError(f'jacobian_step must be "single", "horizon" or a float, got {jacobian_step!r}')
    return eta if steps > 0 else 0.0


def meta_gradient_and_loss(
    model: nn.Module,
    task: Task,
    steps: int,
    inner_lr: float,
    leap: float = 1.0,
    jacobian_step: JacobianStep = "single",
    adapt: Adapt = None,
    inner_optimizer: InnerOptimizer = None,
    first_order: bool = False,
) -> tuple[dict[str, Tensor], Tensor]:
    """:func:`meta_gradient` and the query loss L_Q(φ_T); ``first_order=True`` returns g = v."""
    check_hyperparameters(steps, inner_lr, leap)
    eta = step_size(jacobian_step, steps, inner_lr, leap)
    problem = Problem.read(model, task, adapt)
    with preserved(model):
        phi_t, buffers = problem.teacher(steps, inner_lr, leap, inner_optimizer)
        v, loss = query_gradient(problem, phi_t, buffers)
        if first_order or eta == 0:
            return v, loss
        h = hvp(problem, problem.theta, v)
    return {n: v[n] - eta * h[n] for n in v}, loss


def meta_gradient(
    model: nn.Module,
    task: Task,
    steps: int,
    inner_lr: float,
    leap: float = 1.0,
    jacobian_step: JacobianStep = "single",
    adapt: Adapt = None,
    inner_optimizer: InnerOptimizer = None,
) -> dict[str, Tensor]:
    """The lazy meta-gradient, keyed like ``model.named_parameters()`` (every trainable one).

    ``inner_optimizer``: ``None``/"sgd" (SGD at ``inner_lr``), "adam", or any factory
    ``params -> torch.optim.Optimizer`` — nothing is differentiated through the student, so
    any optimizer works; η is still derived from ``inner_lr``. ``adapt`` as in the oracle.
    The model is left exactly as it was, also when this raises.
    """
    return meta_gradient_and_loss(model, task, steps, inner_lr, leap, jacobian_step, adapt, inner_optimizer)[
        0
    ]
