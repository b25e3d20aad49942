"""The exact meta-gradient: differentiate L_Q(φ_T(θ)) through all K inner steps, with ``higher``.

    g_exact = ∇_θ L_Q(θ + γ(φ_K(θ) − θ)) = [(1 − γ) I + γ T_0ᵀ T_1ᵀ … T_{K−1}ᵀ] v,
    T_k = I − α E_A ∇²L_S(φ_k),  v = ∇L_Q(φ_T)          (SGD inner loop)

``first_order=True`` treats every inner gradient as a constant (dφ_K/dθ = I), giving the
first-order MAML gradient ∇L_Q(φ_T). For several tasks the result is the mean over them.

:func:`meta_gradient` is the public entry point; it builds the settings once and calls
:func:`gradient`, which takes them as one :class:`gradcheck.settings.InnerLoop` — the form the
other checkers (:func:`gradcheck.validate`, :func:`gradcheck.diagnose`) call, varying the
settings with ``loop.replace(...)``.

**Hooked models.** ``higher``'s patched copy of a module keeps none of its forward, pre-forward or
backward hooks, so on a model that has them (``torch.nn.utils.prune``, the hook-based
``weight_norm``/``spectral_norm``, a user's hook) it would differentiate a different function.
Such a model is differentiated by :func:`_unrolled` instead: the same inner loop written directly
over ``torch.func.functional_call``, which runs the model's own modules — hooks included — at the
fast weights. On a model without hooks the two agree to rounding (tests/gradcheck/test_oracle.py).

**Buffers** are the model's own in both paths: written in place or reassigned in ``forward``
(``self.count = self.count + 1``), a buffer carries across the K support forwards and into the
query forward, and is restored afterwards.

**Randomness**: each task's unroll runs from the seeded state of
:func:`gradcheck.models.common_random_numbers`, so a model with Dropout gives one reproducible
draw — the one a candidate drawing in the same order gets — and the caller's generator state is
left as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ._higher import DIFFERENTIABLE, higher
from .models import common_random_numbers, hooks, refuse_unsupported
from .optim import InnerUpdate
from .parameters import Adapt, dense, task_mean, trainable
from .rates import Schedule, coordinates
from .settings import InnerLoop, InnerOptimizer, LearningRate
from .state import preserved
from .student import QUERY_LOSS, checked_loss, query_loss_at, support_loss_at
from .task import TaskLike, Tasks, as_tasks

__all__ = ["meta_gradient"]


class _Root(nn.Module):
    """The user's model as the only child of a plain module, for ``higher`` to patch.

    ``higher`` enumerates parameters with ``module.parameters()``; a model that overrides it (a
    common hand-written MAML returns only ``self.vars``) would desynchronise higher's bookkeeping.
    This root's ``parameters()`` is ``nn.Module``'s, which walks the registered tensors.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.model(*args, **kwargs)


def _constant(grads: list[Tensor | None]) -> list[Tensor | None]:
    return [None if g is None else g.detach() for g in grads]


def _task_gradient(
    model: nn.Module,
    task: TaskLike,
    loop: InnerLoop,
    theta: Mapping[str, Tensor],
    adapted: tuple[str, ...],
) -> list[Tensor | None]:
    spec = loop.spec()  # a name's, a spec's or a recognised factory's
    optimizer_class, differentiable_class = DIFFERENTIABLE[type(spec)]
    root = _Root(model)
    # copy_initial_weights=False: the fast weights start as clones *attached* to θ
    # (higher's default detaches them and silently drops every term through θ).
    fmodel = higher.monkeypatch(root, copy_initial_weights=False, track_higher_grads=True)
    start = fmodel.fast_params
    optimizer = differentiable_class(
        optimizer_class([theta[n] for n in adapted], lr=loop.lr("the oracle"), **spec.options()),
        list(root.parameters()),
        fmodel=fmodel,
        track_higher_grads=True,
    )
    for k in range(loop.steps):
        loss = checked_loss(task.support_loss(fmodel), support_loss_at(k, loop.steps))
        optimizer.step(loss, grad_callback=_constant if loop.first_order else None)
    if loop.leap != 1:
        fmodel.update_params([p + loop.leap * (q - p) for p, q in zip(start, fmodel.fast_params)])
    loss = checked_loss(task.query_loss(fmodel), QUERY_LOSS)
    return list(torch.autograd.grad(loss, list(theta.values()), allow_unused=True))


def _unrolled(
    model: nn.Module,
    task: TaskLike,
    loop: InnerLoop,
    theta: Mapping[str, Tensor],
    adapted: tuple[str, ...],
    schedule: Schedule | None = None,
) -> list[Tensor | None]:
    """:func:`_task_gradient` without ``higher``: the inner loop over ``functional_call``, which
    runs the model's hooks, stepped by the pure update of the inner optimizer's spec (the same
    :mod:`gradcheck.optim` functions higher's differentiable optimizers call, with the same
    options) or by learned rates (:mod:`gradcheck.rates`); first-order treats every inner
    gradient as a constant. The objective is L_Q(φ_T), or Σ_k w_k L_Q(φ_{k+1}) for
    ``query_weights``; a ``step_kwarg`` tells the model the step. Differentiated with respect to
    θ and to the learned rates that are not parameters (in that order)."""
    update: InnerUpdate | None = None if schedule else loop.spec().update(loop.lr("the oracle"))
    rates = schedule.coordinates(theta) if schedule else {}
    phi = dict(theta)

    def f(*args: object, **kwargs: object) -> object:
        return torch.func.functional_call(model, phi, args, kwargs)

    scored = loop.scored()
    objective: Tensor | None = None

    def score(k: int) -> None:
        nonlocal objective
        loss = checked_loss(task.query_loss(loop.indexed(f, max(k - 1, 0))), query_loss_at(k, loop))
        objective = scored[k] * loss if objective is None else objective + scored[k] * loss

    state = update.init({n: phi[n] for n in adapted}) if update else None
    for k in range(loop.steps):
        loss = checked_loss(task.support_loss(loop.indexed(f, k)), support_loss_at(k, loop.steps))
        leaves = [phi[n] for n in adapted]
        grads = torch.autograd.grad(loss, leaves, create_graph=not loop.first_order, allow_unused=True)
        given = {n: g.detach() if loop.first_order else g for n, g in zip(adapted, grads) if g is not None}
        if schedule is None:
            assert update is not None
            phi, state = update.step(phi, given, state)
        else:
            phi = schedule.step(phi, given, k, {**theta, **rates})
        if k + 1 in scored and loop.steps != k + 1:
            score(k + 1)
    if loop.leap != 1:
        phi = {n: t + loop.leap * (phi[n] - t) for n, t in theta.items()}
    score(loop.steps)
    assert objective is not None
    return list(torch.autograd.grad(objective, [*theta.values(), *rates.values()], allow_unused=True))


@torch.enable_grad()  # also when the caller is inside torch.no_grad()
def gradient(model: nn.Module, task_or_tasks: Tasks, loop: InnerLoop) -> dict[str, Tensor]:
    """:func:`meta_gradient` under the settings ``loop`` (every field the oracle reads: steps,
    inner_lr, per_step_lr, leap, inner_optimizer, adapt, first_order, query_weights, step_kwarg)."""
    tasks = as_tasks(task_or_tasks)
    refuse_unsupported(model, tasks, by="the oracle")
    loop.require(*DIFFERENTIABLE, by="the oracle")
    every, adapted, schedule = coordinates(model, loop.adapt, loop.inner_lr, loop.steps)
    theta = trainable(model)
    functional = schedule is not None or loop.query_weights is not None or loop.step_kwarg is not None
    out = []
    for task in tasks:  # every task from the model as it is: buffers restored between tasks
        with preserved(model), common_random_numbers(model):
            if functional or hooks(model):
                grads = _unrolled(model, task, loop, theta, adapted, schedule)
            else:
                grads = _task_gradient(model, task, loop, theta, adapted)
            out.append(dense(every, grads))
    return task_mean(out)


def meta_gradient(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: LearningRate,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    first_order: bool = False,
    inner_optimizer: InnerOptimizer = "sgd",
    per_step_lr: bool = False,
    query_weights: Sequence[float] | None = None,
    step_kwarg: str | None = None,
) -> dict[str, Tensor]:
    """The exact K-step MAML meta-gradient, keyed like ``model.named_parameters()``.

    Every trainable parameter is present (zeros where the objective does not depend on it);
    parameters outside ``adapt`` get their direct term and the cross terms through the inner
    loop. ``inner_optimizer`` is ``"sgd"``, ``"adam"``, a spec of :mod:`gradcheck.optim` or a
    factory of one of those ``torch.optim`` classes. ``inner_lr`` may hold learned rates
    (:mod:`gradcheck.rates`; ``per_step_lr`` for a step dimension): each learned rate gets its
    meta-gradient, under its parameter name or ``"inner_lr[.<name>]"``. ``query_weights`` makes
    the objective Σ_k w_k L_Q(φ_{k+1}); ``step_kwarg`` passes the step index to the model. For
    several tasks, the mean. The model is left exactly as it was, also when this raises.
    """
    loop = InnerLoop.given(
        steps,
        inner_lr,
        leap,
        inner_optimizer,
        adapt=adapt,
        first_order=first_order,
        per_step_lr=per_step_lr,
        query_weights=query_weights,
        step_kwarg=step_kwarg,
    )
    return gradient(model, task_or_tasks, loop)
