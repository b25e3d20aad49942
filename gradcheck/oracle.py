"""The exact meta-gradient: differentiate L_Q(φ_T(θ)) through all K inner steps, with ``higher``.

    g_exact = ∇_θ L_Q(θ + γ(φ_K(θ) − θ)) = [(1 − γ) I + γ T_0ᵀ T_1ᵀ … T_{K−1}ᵀ] v,
    T_k = I − α E_A ∇²L_S(φ_k),  v = ∇L_Q(φ_T)          (SGD inner loop)

``first_order=True`` treats every inner gradient as a constant (dφ_K/dθ = I), giving the
first-order MAML gradient ∇L_Q(φ_T).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._higher import DIFFERENTIABLE, higher
from .inner_loop import QUERY_WHAT, check_hyperparameters, checked, support_what
from .parameters import Adapt, dense, resolve_adapt, trainable
from .state import preserved
from .task import Task


def _constant(grads: list[Tensor | None]) -> list[Tensor | None]:
    return [None if g is None else g.detach() for g in grads]


@torch.enable_grad()  # also when the caller is inside torch.no_grad()
def meta_gradient(
    model: nn.Module,
    task: Task,
    steps: int,
    inner_lr: float,
    adapt: Adapt = None,
    first_order: bool = False,
    leap: float = 1.0,
    inner_optimizer: str = "sgd",
) -> dict[str, Tensor]:
    """The exact K-step MAML meta-gradient, keyed like ``model.named_parameters()``.

    Every trainable parameter is present (zeros where the objective does not depend on it);
    parameters outside ``adapt`` get their direct term and the cross terms through the inner
    loop. ``inner_optimizer`` is ``"sgd"`` or ``"adam"`` (identical trajectory to
    ``torch.optim.Adam``). The model is left exactly as it was, also when this raises.
    """
    check_hyperparameters(steps, inner_lr, leap)
    if inner_optimizer not in DIFFERENTIABLE:
        raise ValueError(
            f"the oracle differentiates exactly through inner_optimizer in {sorted(DIFFERENTIABLE)}, "
            f"not {inner_optimizer!r}"
        )
    theta = trainable(model)
    adapted = resolve_adapt(model, adapt)
    optimizer_class, differentiable_class = DIFFERENTIABLE[inner_optimizer]
    with preserved(model):
        # copy_initial_weights=False: the fast weights start as clones *attached* to θ
        # (higher's default detaches them and silently drops every term through θ).
        fmodel = higher.monkeypatch(model, copy_initial_weights=False, track_higher_grads=True)
        start = fmodel.fast_params
        optimizer = differentiable_class(
            optimizer_class([theta[n] for n in adapted], lr=inner_lr),
            model.parameters(),
            fmodel=fmodel,
            track_higher_grads=True,
        )
        for k in range(steps):
            loss = checked(task.support_loss(fmodel), support_what(k, steps))
            optimizer.step(loss, grad_callback=_constant if first_order else None)
        if leap != 1:
            fmodel.update_params([p + leap * (q - p) for p, q in zip(start, fmodel.fast_params)])
        loss = checked(task.query_loss(fmodel), QUERY_WHAT)
        grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
    return dense(theta, grads)
