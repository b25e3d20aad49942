"""A meta-batch as one computation: ``torch.func.vmap`` over tasks of a functional inner loop.

For B data tasks of equal shapes (a :class:`~gradcheck.task.TaskBatch`), θ enters unbatched and
each task's data batched; per task, with ``torch.func.grad`` and nothing else,

    φ_0 = θ,  φ_{k+1} = φ_k − α E_A ∇L_S(φ_k)      (or one step of ``torch.optim.Adam``'s update)
    lazy, first-order   g = v − η ∇_θ⟨E_A ∇L_S(θ), v⟩,  v = ∇L_Q(φ_T)     (first-order: η = 0)
    reptile             g = (θ − φ_K)/(Kα)
    maml, truncated     g = ∇_θ L_Q(φ_T(θ)), differentiating the last T steps (T = K: MAML)

with φ_T = θ + γ(φ_K − θ): the maths of :mod:`lazymaml.estimators`, each task's result equal to the
sequential one up to rounding. Gradients come from ``torch.func`` alone — ordinary autograd
through a vmapped ``torch.func.grad`` is wrong for batch and instance norm on torch 2.13 — and,
where the model holds normalisation layers or a forward this module cannot vouch for,
:class:`~lazymaml.normalization.BatchStatistics` keeps them from updating running statistics
(which vmap refuses, and which no loss reads). :func:`refusal` says which models are batched.

Nothing here checks the losses (a check would branch on data, which vmap forbids): the caller
checks that everything returned is finite, and reruns the tasks sequentially — whose checks name
the step — when it is not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad, grad_and_value, vmap

from gradcheck.settings import InnerLoop
from gradcheck.student import Student, apply_leap
from gradcheck.task import Task, TaskBatch

from .normalization import BatchStatistics

__all__ = ["NORMALISATION", "VERIFIED", "Estimate", "estimate", "refusal"]

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

NORMALISATION: frozenset[type[nn.Module]] = frozenset(
    {nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d}
)
"""Verified too, run under :class:`~lazymaml.normalization.BatchStatistics`."""


def refusal(model: nn.Module) -> tuple[str | None, bool]:
    """Why the batched path will not run ``model`` (None if it will), and whether it needs
    :class:`~lazymaml.normalization.BatchStatistics`.

    Refused: a module with forward hooks, dropout that is active, and a module of a type outside
    :data:`VERIFIED` and :data:`NORMALISATION` that owns parameters or buffers (its forward may do
    anything with them). A module of another type that owns none (a user's network class, whose
    forward composes verified modules and functions) is batched under ``BatchStatistics``, which
    also catches ``F.batch_norm`` called by hand.
    """
    statistics = False
    for name, module in model.named_modules():
        kind, where = type(module), f"module {name!r}" if name else "the model"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{where} has forward hooks", statistics
        if kind in NORMALISATION:
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
        """Whether every loss and every gradient entry is finite (one synchronisation)."""
        parts = [self.losses, *self.support_losses, *self.gradients.values()]
        return bool(torch.stack([torch.isfinite(p).all() for p in parts]).all())


Params = dict[str, Tensor]


class _Inner:
    """One task's functional inner loop, built inside the vmapped function."""

    def __init__(self, student: Student, task: Task, loop: InnerLoop) -> None:
        self.student, self.task, self.loop = student, task, loop
        self.adapted = student.adapted

    def support(self, adapted: Params, point: Mapping[str, Tensor], frozen: Params) -> Tensor:
        """L_S at ``point`` with the adapted tensors replaced by ``adapted`` (what grad differentiates)."""
        return self.task.support_loss(self.student.at({**point, **adapted}, frozen))

    def query(self, point: Params, frozen: Params) -> Tensor:
        return self.task.query_loss(self.student.at(point, frozen))

    def support_gradient(self, point: Params, frozen: Params) -> tuple[Params, Tensor]:
        """E_A ∇L_S(point) and L_S(point)."""
        return grad_and_value(self.support)({n: point[n] for n in self.adapted}, point, frozen)

    def descend(self, point: Params, frozen: Params, steps: int) -> tuple[Params, list[Tensor]]:
        """``steps`` steps of the inner optimizer from ``point``; differentiable if ``point`` is."""
        phi, losses = dict(point), []
        adam = _Adam(self.loop, phi, self.adapted) if self.loop.inner_optimizer == "adam" else None
        for _ in range(steps):
            g, loss = self.support_gradient(phi, frozen)
            losses.append(loss)
            if adam is None:
                phi.update({n: phi[n] - self.loop.inner_lr * g[n] for n in self.adapted})
            else:
                phi.update(adam.step(phi, g))
        return phi, losses


class _Adam:
    """``torch.optim.Adam``'s update (its defaults), written functionally for one task."""

    def __init__(self, loop: InnerLoop, point: Params, adapted: tuple[str, ...]) -> None:
        group = loop.optimizer([torch.zeros(0, requires_grad=True)]).param_groups[0]
        self.lr, (self.beta1, self.beta2), self.eps = loop.inner_lr, group["betas"], group["eps"]
        self.m = {n: torch.zeros_like(point[n]) for n in adapted}
        self.v = {n: torch.zeros_like(point[n]) for n in adapted}
        self.t = 0

    def step(self, point: Params, g: Params) -> Params:
        self.t += 1
        correction1, correction2 = 1 - self.beta1**self.t, (1 - self.beta2**self.t) ** 0.5
        out = {}
        for n, gn in g.items():
            self.m[n] = torch.lerp(self.m[n], gn, 1 - self.beta1)
            self.v[n] = self.v[n] * self.beta2 + (1 - self.beta2) * gn * gn
            denom = self.v[n].sqrt() / correction2 + self.eps
            out[n] = point[n] - (self.lr / correction1) * self.m[n] / denom
        return out


PerTask = Callable[[_Inner, Params, Params], tuple[Params, Tensor, list[Tensor]]]


def lazy(eta: float) -> PerTask:
    """The lazy meta-gradient with step η (η = 0: first-order MAML)."""

    def per_task(inner: _Inner, theta: Params, frozen: Params) -> tuple[Params, Tensor, list[Tensor]]:
        phi, losses = inner.descend(theta, frozen, inner.loop.steps)
        v, loss = grad_and_value(inner.query)(apply_leap(theta, phi, inner.loop.leap), frozen)
        if eta == 0:
            return v, loss, losses

        def along_v(point: Params, frozen: Params) -> Tensor:  # ⟨E_A ∇L_S(point), v⟩
            g, _ = inner.support_gradient(point, frozen)
            return torch.stack([(g[n] * v[n]).sum() for n in inner.adapted]).sum()

        h = grad(along_v)(theta, frozen)
        return {n: v[n] - eta * h[n] for n in v}, loss, losses

    return per_task


def reptile(inner: _Inner, theta: Params, frozen: Params) -> tuple[Params, Tensor, list[Tensor]]:
    """(θ − φ_K)/(Kα), and L_Q(φ_T) as every estimator reports it."""
    phi, losses = inner.descend(theta, frozen, inner.loop.steps)
    scale = 1 / (inner.loop.steps * inner.loop.inner_lr) if inner.loop.steps else 0.0
    loss = inner.query(apply_leap(theta, phi, inner.loop.leap), frozen)
    return {n: (t - phi[n]) * scale for n, t in theta.items()}, loss, losses


def unrolled(horizon: int) -> PerTask:
    """∇_θ L_Q(φ_T) through the last ``horizon`` steps (the first K − T count as the identity)."""

    def per_task(inner: _Inner, theta: Params, frozen: Params) -> tuple[Params, Tensor, list[Tensor]]:
        start, early = inner.descend(theta, frozen, inner.loop.steps - horizon)

        def objective(t: Params, frozen: Params) -> tuple[Tensor, list[Tensor]]:
            phi = {n: t[n] + (start[n] - theta[n]) for n in t}  # value φ_{K−T}, Jacobian I
            phi, late = inner.descend(phi, frozen, horizon)
            return inner.query(apply_leap(t, phi, inner.loop.leap), frozen), late

        g, (loss, late) = grad_and_value(objective, has_aux=True)(theta, frozen)
        return g, loss, early + late

    return per_task


def estimate(
    student: Student, batch: TaskBatch, loop: InnerLoop, per_task: PerTask, statistics: bool
) -> Estimate:
    """``per_task`` on every task of ``batch`` at once, under ``BatchStatistics`` if ``statistics``."""

    def one(
        theta: Params, frozen: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor
    ) -> tuple[Params, Tensor, list[Tensor]]:
        inner = _Inner(student, Task((xs, ys), (xq, yq), batch.loss), loop)
        return per_task(inner, theta, frozen)

    (xs, ys), (xq, yq) = batch.support, batch.query
    with BatchStatistics() if statistics else contextlib.nullcontext(), torch.no_grad():
        g, loss, losses = vmap(one, in_dims=(None, None, 0, 0, 0, 0))(
            student.theta, student.fresh(), xs, ys, xq, yq
        )
    return Estimate(g, loss, losses)
