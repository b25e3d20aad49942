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

from collections.abc import Sequence

from torch import Tensor, nn

from gradcheck.parameters import Adapt
from gradcheck.settings import InnerLoop, InnerOptimizer, JacobianStep, LearningRate
from gradcheck.task import Tasks

from . import estimators

__all__ = ["JacobianStep", "meta_gradient"]


def meta_gradient(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: LearningRate,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    jacobian_step: JacobianStep = "single",
    inner_optimizer: InnerOptimizer = "sgd",
    per_step_lr: bool = False,
    query_weights: Sequence[float] | None = None,
    step_kwarg: str | None = None,
) -> dict[str, Tensor]:
    """The lazy meta-gradient, keyed like ``model.named_parameters()`` (every trainable one):
    the registry's ``"lazy"`` estimator.

    ``inner_optimizer``: "sgd" (the default), "adam", or any factory
    ``params -> torch.optim.Optimizer`` — nothing is differentiated through the student, so
    any optimizer works; η is still derived from ``inner_lr``. For several tasks, the mean.
    The model is left exactly as it was, also when this raises.

    Learned rates (``inner_lr`` a tensor or a mapping, :mod:`gradcheck.rates`; plain SGD): the
    Jacobian step is I − diag(η) E_A ∇²L_S(θ) with η = γα_0 (the first step's rates) for
    "single", γ(α_0 + … + α_{K−1}) for "horizon"; each learned rate gets the gradient
    −γ Σ_k v ⊙ ∇L_S(φ_k) reduced to its shape (keyed as the oracle keys it). ``query_weights``:
    the sum of the lazy gradients of each scored φ_{k+1} (one HVP at θ). ``step_kwarg`` passes the
    step index to the model. Exact MAML's gradient, rates included, at K = 1 with "single".
    """
    loop = InnerLoop.given(
        steps,
        inner_lr,
        leap,
        inner_optimizer,
        adapt=adapt,
        jacobian_step=jacobian_step,
        per_step_lr=per_step_lr,
        query_weights=query_weights,
        step_kwarg=step_kwarg,
    )
    return estimators.run("lazy", model, task_or_tasks, loop)
