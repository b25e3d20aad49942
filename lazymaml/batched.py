"""A meta-batch as one computation: ``torch.func.vmap`` over tasks of an estimator's own function.

For B data tasks of equal shapes (a :class:`~gradcheck.task.TaskBatch`), θ enters unbatched and
each task's data batched, and the registry entry's ``per_task`` — the very function the
sequential path calls (:mod:`lazymaml.estimators`) — runs once for all of them, its losses
unchecked (a check would branch on data, which vmap forbids): the caller checks that everything
returned is finite, and reruns the tasks sequentially — whose checks name the step — when it is
not. Gradients come from ``torch.func`` alone — ordinary autograd through a vmapped
``torch.func.grad`` is wrong for batch and instance norm on torch 2.13 — except in the outside
layout (below), which only models without normalisation get; and, where the model
holds normalisation layers or a forward this module cannot vouch for,
:class:`~lazymaml.normalization.BatchStatistics` keeps them from updating running statistics
(which vmap refuses, and which no loss reads). :func:`refusal` says which models are batched.

**Two layouts.** The *inside* layout (the default) is the one above: every derivative, also
``differentiate``'s outer gradient of the unrolled inner loop (exact MAML), is ``torch.func``
inside the vmap, one per task. The *outside* layout — that of functorch's MAML example — takes
that outer gradient by one ordinary autograd backward of the summed per-task values after the
vmap (:class:`~lazymaml.derivatives.OutsideObjective`; the inner loop's ``torch.func.grad``
inside the vmap stays differentiable), which saves a level of transforms per task. It gives
the same sum of gradients in exact arithmetic, but autograd through a vmap is wrong for batch
and instance norm on torch 2.13 (a test pins that defect), so it is used only where
:func:`why_inside` vouches for it — all of:

* the entry declares that it returns ``differentiate``'s gradient of θ as it is
  (:attr:`~lazymaml.estimators.Estimator.outside`: ``maml`` and ``truncated``);
* plain SGD in the inner loop (``loop.is_sgd``), not ``first_order``;
* every module of the model is exactly of a type in :data:`OUTSIDE` (the verified types less
  every normalisation layer, dropout and the containers that only a custom forward can call),
  none has hooks or an instance-level ``forward``, and no global module hook is registered;
* the loss is one of :data:`OUTSIDE_LOSSES` (a user's loss function may call anything).

Anything else — BatchNorm, InstanceNorm, LayerNorm, GroupNorm, a module of any other type (a
user's network class included), hooks, Adam — runs the inside layout. The property tests pin
the outside layout to the sequential path and to an independent ``torch.func`` unroll (float64)
on MLPs and convolutional networks covering every type of :data:`OUTSIDE`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from gradcheck.parameters import dense
from gradcheck.settings import InnerLoop
from gradcheck.student import Student
from gradcheck.task import Task, TaskBatch

from .derivatives import DEFERRED, FuncObjective, OutsideObjective, Params
from .estimators import Estimator
from .normalization import BatchStatistics

__all__ = [
    "BATCH_STATISTICS",
    "OUTSIDE",
    "OUTSIDE_LOSSES",
    "VERIFIED",
    "Estimate",
    "estimate",
    "refusal",
    "why_inside",
]

VERIFIED: frozenset[type[nn.Module]] = frozenset(
    {
        nn.Sequential,
        nn.ModuleList,
        nn.ModuleDict,
        nn.ParameterList,
        nn.ParameterDict,
        nn.Identity,
        nn.Flatten,
        nn.Unflatten,
        nn.Linear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.MaxPool1d,
        nn.MaxPool2d,
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.ReLU,
        nn.LeakyReLU,
        nn.ELU,
        nn.GELU,
        nn.SiLU,
        nn.Tanh,
        nn.Sigmoid,
        nn.Softplus,
        nn.Softmax,
        nn.LogSoftmax,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.Dropout,
    }
)
"""Module types (exactly these, not subclasses) whose batched forward the tests compare with the
sequential path and the oracle. ``nn.Dropout`` only in eval mode or with p = 0."""

BATCH_STATISTICS: frozenset[type[nn.Module]] = frozenset(
    {nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d}
)
"""Normalisation layers with batch statistics: verified too, run under
:class:`~lazymaml.normalization.BatchStatistics`."""

OUTSIDE: frozenset[type[nn.Module]] = VERIFIED - {
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Dropout,
    nn.ModuleList,
    nn.ModuleDict,
    nn.ParameterList,
    nn.ParameterDict,
}
"""Module types (exactly these) the outside layout is used with: no normalisation, no dropout,
and no container that only a custom forward (a type outside this set) can call. The tests
cover each in a model that takes the outside layout."""

OUTSIDE_LOSSES: tuple[object, ...] = (F.mse_loss, F.cross_entropy)
"""The loss functions (these very functions) the outside layout is used with."""


def why_inside(entry: Estimator, loop: InnerLoop, model: nn.Module, loss: object) -> str | None:
    """Why ``entry`` on ``model`` with ``loop`` and ``loss`` runs the inside layout, or None: then
    the outside layout (the module docstring's rule)."""
    if not entry.outside:
        return f"estimator {entry.name!r} does not return differentiate's gradient of θ as it is"
    if not loop.is_sgd or loop.first_order:
        return "the inner loop is not plain second-order SGD"
    if loss not in OUTSIDE_LOSSES:
        return "the loss is not one of OUTSIDE_LOSSES"
    if any(getattr(nn.modules.module, h) for h in _GLOBAL_HOOKS):
        return "a global module hook is registered"
    for name, module in model.named_modules():
        where = f"module {name!r}" if name else "the model"
        if type(module) not in OUTSIDE:
            return f"{where} is a {type(module).__name__}, not a type in OUTSIDE"
        if any(getattr(module, h) for h in _HOOKS) or "forward" in vars(module):
            return f"{where} has hooks or its own forward"
    return None


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def refusal(model: nn.Module) -> tuple[str | None, bool]:
    """Why the batched path will not run ``model`` (None if it will), and whether it needs
    :class:`~lazymaml.normalization.BatchStatistics`.

    Refused: a module with forward or backward hooks, dropout that is active, and a module of a
    type outside :data:`VERIFIED` and :data:`BATCH_STATISTICS` that owns parameters or buffers
    (its forward may do anything with them). A module of another type that owns none (a user's
    network class, whose forward composes verified modules and functions) is batched under
    ``BatchStatistics``, which also catches ``F.batch_norm`` called by hand.
    """
    statistics = False
    for name, module in model.named_modules():
        kind, where = type(module), f"module {name!r}" if name else "the model"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{where} has forward hooks", statistics
        if module._backward_hooks or module._backward_pre_hooks:
            return f"{where} has backward hooks (autograd hooks cannot run under vmap)", statistics
        if kind in BATCH_STATISTICS:
            statistics = True
        elif kind in VERIFIED:
            if kind is nn.Dropout and module.training and module.p > 0:
                return f"{where} is an active nn.Dropout (random per task)", statistics
        elif module._parameters or module._buffers:
            return (
                f"{where} is a {kind.__name__}, a module type with its own tensors not verified batched",
                statistics,
            )
        else:
            statistics = True
    return None, statistics


@dataclass(frozen=True)
class Estimate:
    """The B tasks' results: their gradients summed, their losses stacked."""

    sums: dict[str, Tensor]  # name → the sum over the tasks of their gradients, every trainable parameter
    scores: Tensor  # [B, K + 1]: L_S(φ_0), …, L_S(φ_{K−1}) and L_Q(φ_T), each task's losses

    @property
    def losses(self) -> Tensor:
        """[B]: L_Q(φ_T)."""
        return self.scores[:, -1]

    @property
    def support_losses(self) -> list[Tensor]:
        """K tensors [B]: L_S(φ_k) for k = 0, …, K − 1."""
        return list(self.scores[:, :-1].unbind(1))

    def finite(self) -> bool:
        """Whether every loss and every gradient entry is finite (a task's non-finite gradient
        makes the sum non-finite): one concatenation, one test, one synchronisation (a test per
        tensor costs a few kernel launches each, P + 1 of them)."""
        parts = [self.scores, *self.sums.values()]
        return bool(torch.isfinite(torch.cat([p.reshape(-1) for p in parts])).all())


def estimate(
    entry: Estimator, student: Student, batch: TaskBatch, loop: InnerLoop, statistics: bool
) -> Estimate:
    """``entry.per_task`` on every task of ``batch`` at once (``loop`` as ``entry.settings``
    returned it), under ``BatchStatistics`` if ``statistics``; in the outside layout where
    :func:`why_inside` allows it."""
    outside = not statistics and why_inside(entry, loop, student.model, batch.loss) is None
    theta = student.theta
    leaves = {n: t.detach().requires_grad_(True) for n, t in theta.items()} if outside else {}

    def one(
        theta: Params, untrained: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor
    ) -> tuple[Params, Tensor]:
        task = Task((xs, ys), (xq, yq), batch.loss)
        if outside:
            f: FuncObjective = OutsideObjective(student, task, loop, theta, leaves)
        else:
            f = FuncObjective(student, task, loop, checked=False)
        g, loss, losses = entry.per_task(f, theta, untrained)
        return g, torch.stack([*losses, loss])  # one output for the K + 1 losses

    (xs, ys), (xq, yq) = batch.support, batch.query
    with BatchStatistics() if statistics else contextlib.nullcontext(), torch.set_grad_enabled(outside):
        g, scores = vmap(one, in_dims=(None, None, 0, 0, 0, 0))(theta, student.fresh(), xs, ys, xq, yq)
        if not outside:
            return Estimate({n: t.sum(0) for n, t in g.items()}, scores)
        if g.keys() != {DEFERRED}:
            raise RuntimeError(f"estimator {entry.name!r} did not return differentiate's gradient as it is")
        grads = torch.autograd.grad(g[DEFERRED].sum(), list(leaves.values()), allow_unused=True)
    return Estimate(dense(leaves, grads), scores.detach())
