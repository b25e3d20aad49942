"""A meta-batch as one computation: ``torch.func.vmap`` over tasks of an estimator's own function.

For B data tasks of equal shapes (a :class:`~gradcheck.task.TaskBatch`), θ enters unbatched and
each task's data batched, and the registry entry's ``per_task`` — the very function the
sequential path calls (:mod:`lazymaml.estimators`) — runs once for all of them, its losses
unchecked (a check would branch on data, which vmap forbids): the caller checks that everything
returned is finite, and reruns the tasks sequentially — whose checks name the step — when it is
not. Gradients come from ``torch.func`` alone — ordinary autograd through a vmapped
``torch.func.grad`` is wrong for batch and instance norm on torch 2.13 — and, where the model
holds normalisation layers or a forward this module cannot vouch for,
:class:`~lazymaml.normalization.BatchStatistics` keeps them from updating running statistics
(which vmap refuses, and which no loss reads). :func:`refusal` says which models are batched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vmap

from gradcheck.settings import InnerLoop
from gradcheck.student import Student
from gradcheck.task import Task, TaskBatch

from .derivatives import FuncObjective, Params
from .estimators import Estimator, Result
from .normalization import BatchStatistics

__all__ = ["BATCH_STATISTICS", "VERIFIED", "Estimate", "estimate", "refusal"]

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
    """Per-task results, stacked over the B tasks."""

    gradients: dict[str, Tensor]  # name → [B, *shape], every trainable parameter
    losses: Tensor  # [B]: L_Q(φ_T)
    support_losses: list[Tensor]  # K tensors [B]: L_S(φ_k), for the finite check

    def finite(self) -> bool:
        """Whether every loss and every gradient entry is finite: one concatenation, one test, one
        synchronisation (a test per tensor costs a few kernel launches each, K + P + 1 of them)."""
        parts = [self.losses, *self.support_losses, *self.gradients.values()]
        return bool(torch.isfinite(torch.cat([p.reshape(-1) for p in parts])).all())


def estimate(
    entry: Estimator, student: Student, batch: TaskBatch, loop: InnerLoop, statistics: bool
) -> Estimate:
    """``entry.per_task`` on every task of ``batch`` at once (``loop`` as ``entry.settings``
    returned it), under ``BatchStatistics`` if ``statistics``."""

    def one(theta: Params, untrained: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Result:
        objective = FuncObjective(student, Task((xs, ys), (xq, yq), batch.loss), loop, checked=False)
        return entry.per_task(objective, theta, untrained)

    (xs, ys), (xq, yq) = batch.support, batch.query
    with BatchStatistics() if statistics else contextlib.nullcontext(), torch.no_grad():
        g, loss, losses = vmap(one, in_dims=(None, None, 0, 0, 0, 0))(
            student.theta, student.fresh(), xs, ys, xq, yq
        )
    return Estimate(g, loss, losses)
