"""The inner learner without a graph (the "student"), and the loss checks every estimator applies.

Student: φ_0 = θ, φ_{k+1} = φ_k − α E_A ∇L_S(φ_k) for plain SGD, or one step of any
``torch.optim`` optimizer over the adapted parameters A. Teacher's leap: φ_T = θ + γ(φ_K − θ).
No graph is kept between steps, so memory does not grow with K; this is the forward trajectory
that the finite-difference checks evaluate (with the real ``torch.optim`` optimizer, sharing no
code with the estimators' functional inner loop).

A :class:`Student` reads the user's model once — copies of θ, of the *untrained* tensors (the
parameters with ``requires_grad=False`` and the buffers) and the adapted set A — and from then on
evaluates it functionally: the model itself is only ever read, and every run of the inner loop
starts from fresh copies of the untrained tensors, so a forward that writes them in place
(BatchNorm statistics) cannot leak between runs.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .parameters import Adapt, Functional, copies, tied
from .rates import Schedule, coordinates
from .settings import InnerLoop
from .task import TaskLike

__all__ = [
    "QUERY_LOSS",
    "Student",
    "apply_leap",
    "checked_loss",
    "converted",
    "query_loss_at",
    "support_loss_at",
]

QUERY_LOSS = "query loss L_Q(φ_T)"


def query_loss_at(k: int, loop: InnerLoop) -> str:
    """How the query loss scored at φ_k is named in error messages."""
    if loop.query_weights is None:
        return QUERY_LOSS
    return f"query loss L_Q(φ_{k}) after inner step {k} of {loop.steps} (weight {loop.scored()[k]:g})"


def support_loss_at(k: int, steps: int) -> str:
    """How inner step k's support loss is named in error messages."""
    return f"support loss L_S(φ_{k}) at inner step {k + 1} of {steps}"


def checked_loss(loss: object, what: str) -> Tensor:
    """``loss`` if it is a finite scalar tensor; otherwise an exception that says ``what`` it was."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(loss).__name__}")
    if loss.ndim != 0:
        raise ValueError(
            f"{what} must be a scalar (0-dim) tensor, got shape {tuple(loss.shape)}; "
            "reduce it, e.g. with .mean()"
        )
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what} is {loss.item()}")
    return loss


def apply_leap(theta: Mapping[str, Tensor], phi: Mapping[str, Tensor], leap: float) -> dict[str, Tensor]:
    """The teacher φ_T = θ + γ(φ_K − θ) (exactly φ_K when γ = 1); differentiable if its inputs are."""
    if leap == 1:
        return {n: phi[n] for n in theta}
    return {n: t + leap * (phi[n] - t) for n, t in theta.items()}


def converted(tasks: list[TaskLike], model: nn.Module, dtype: torch.dtype, why: str) -> list[TaskLike]:
    """``tasks`` with their data in ``dtype`` when ``model`` is not in ``dtype`` already (it will be
    evaluated on a converted copy); a closure task cannot be converted and is refused, naming ``why``."""
    other = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype]
    if not other:
        return tasks
    try:
        return [t.to(dtype) for t in tasks]
    except TypeError as error:
        raise ValueError(
            f"{why} need {dtype}, and parameters {other[:3]} are not {dtype}: use a converted copy "
            f"of the model (copy.deepcopy(model).to({dtype})) with data of that dtype; {error}"
        ) from error


@dataclass(frozen=True)
class Student:
    """A model read once: θ, copies of its other tensors, and the adapted set A ⊆ θ.

    ``theta`` holds the trainable parameters (names of ``model.named_parameters()``), ``untrained``
    every other parameter and every buffer; ``adapted`` names A; ``schedule`` the learned inner
    rates (copies; None for one float α), which the student steps with instead of ``torch.optim``.
    """

    model: nn.Module
    theta: dict[str, Tensor]
    untrained: dict[str, Tensor]
    adapted: tuple[str, ...]
    schedule: Schedule | None = None

    @classmethod
    def read(
        cls,
        model: nn.Module,
        adapt: Adapt = None,
        dtype: torch.dtype | None = None,
        loop: InnerLoop | None = None,
    ) -> Student:
        """Copy ``model``'s tensors (cast to ``dtype`` if given) and resolve ``adapt`` — and, where
        ``loop`` is given, its ``adapt`` and learned rates (:func:`gradcheck.rates.coordinates`)."""
        inner_lr, steps = (loop.inner_lr, loop.steps) if loop is not None else (1.0, 0)
        every, adapted, schedule = coordinates(
            model, loop.adapt if loop is not None else adapt, inner_lr, steps
        )
        params, buffers = copies(model, dtype)
        theta = {n: params.pop(n) for n in every if n in params}
        return cls(model, theta, {**params, **buffers}, adapted, schedule and schedule.cast(dtype))

    @property
    def coordinates(self) -> dict[str, Tensor]:
        """θ followed by the learned rates that are not parameters: what F is a function of."""
        return {**self.theta, **(self.schedule.coordinates(self.theta) if self.schedule else {})}

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.theta.values())).dtype

    def fresh(self) -> dict[str, Tensor]:
        """New copies of the non-trainable tensors, for one run of the inner loop to update."""
        return {n: t.clone() for n, t in self.untrained.items()}

    def at(self, point: Mapping[str, Tensor], untrained: Mapping[str, Tensor]) -> Functional:
        """The model evaluated at ``point`` (trainable tensors) with ``untrained`` (the others).

        The one buffer semantics: a buffer the forward updates — in place, or by reassignment
        (``self.count = self.count + 1``) — carries into the next call on the same ``untrained``
        (across the K support forwards and into the query forward): an in-place update writes the
        tensor in ``untrained``; a reassigned one is written back into ``untrained`` when it is a
        mutable mapping (:class:`gradcheck.parameters.Functional`'s ``carry``).
        """
        carry = untrained if isinstance(untrained, MutableMapping) else None
        names, ties, model = self.buffer_names, self.ties, self.model
        return Functional(model, self.theta, untrained, point, carry=carry, buffer_names=names, ties=ties)

    # Read from the model at the first use, once (:meth:`at` runs at every inner step): like θ's
    # names, the model's structure is taken as fixed for the life of the student.
    @functools.cached_property
    def buffer_names(self) -> tuple[str, ...]:
        """The names of the model's buffers."""
        return tuple(n for n, _ in self.model.named_buffers())

    @functools.cached_property
    def ties(self) -> bool:
        """Whether the model holds a tensor under two names (:func:`~gradcheck.parameters.tied`)."""
        return tied(self.model)

    @torch.enable_grad()
    def trajectory(
        self,
        task: TaskLike,
        loop: InnerLoop,
        untrained: dict[str, Tensor],
        start: Mapping[str, Tensor] | None = None,
        proximal: float = 0.0,
    ) -> Iterator[dict[str, Tensor]]:
        """Yield the student's parameters φ_0, φ_1, …, φ_K on ``task``, computed without a graph.

        φ_0 is θ, or ``start`` where given (it may also give learned rates, by their keys). The
        adapted tensors are copied before the optimizer writes them; ``untrained`` is updated in
        place, as BatchNorm running statistics are. ``proximal`` = λ > 0 minimises
        L_S(φ) + (λ/2)‖φ_A − φ_0,A‖² instead (iMAML). The yielded dict is live: it holds φ_k until
        the next step.
        """
        values = {**self.coordinates, **(start or {})}
        phi = {n: values[n].detach() for n in self.theta}
        anchors = [phi[n] for n in self.adapted]
        leaves = [phi[n].clone().requires_grad_(True) for n in self.adapted]
        phi.update(zip(self.adapted, leaves))
        optimizer = None if self.schedule else loop.optimizer(leaves)
        f = self.at(phi, untrained)
        yield phi
        for k in range(loop.steps):
            loss = checked_loss(task.support_loss(loop.indexed(f, k)), support_loss_at(k, loop.steps))
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            for name, leaf, grad, anchor in zip(self.adapted, leaves, grads, anchors):
                if proximal:
                    pull = proximal * (leaf.detach() - anchor)
                    grad = pull if grad is None else grad + pull
                if optimizer is None:
                    if grad is not None:
                        assert self.schedule is not None
                        with torch.no_grad():
                            leaf.sub_(self.schedule.rate(name, k, values) * grad)
                else:
                    leaf.grad = grad
            if optimizer is not None:
                optimizer.step()
            yield phi

    @torch.no_grad()
    def objective(self, task: TaskLike, loop: InnerLoop, start: Mapping[str, Tensor] | None = None) -> float:
        """F on ``task`` without a graph: L_Q(φ_T), or Σ_k w_k L_Q(φ_{k+1}) for ``query_weights``,
        each query loss told the step index of the step before it (``step_kwarg``)."""
        untrained = self.fresh()
        scored = loop.scored()
        origin = {n: (start or {}).get(n, t) for n, t in self.theta.items()}
        total = 0.0
        for k, phi in enumerate(self.trajectory(task, loop, untrained, start)):
            if k in scored:
                point = apply_leap(origin, phi, loop.leap) if k == loop.steps else phi
                loss = task.query_loss(loop.indexed(self.at(point, untrained), max(k - 1, 0)))
                total += scored[k] * checked_loss(loss, query_loss_at(k, loop)).item()
        return total

    def run(
        self,
        task: TaskLike,
        loop: InnerLoop,
        start: Mapping[str, Tensor] | None = None,
        proximal: float = 0.0,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """φ_K (detached, every trainable name) and the non-trainable tensors as K steps left them."""
        untrained = self.fresh()
        *_, phi = self.trajectory(task, loop, untrained, start, proximal)
        return {n: t.detach() for n, t in phi.items()}, untrained

    def teacher(
        self, task: TaskLike, loop: InnerLoop, start: Mapping[str, Tensor] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """φ_T = θ + γ(φ_K − θ) (exactly φ_K when γ = 1), and the tensors as the student left them."""
        phi, untrained = self.run(task, loop, start)
        origin = {n: (start or {}).get(n, t) for n, t in self.theta.items()}
        return apply_leap(origin, phi, loop.leap), untrained
