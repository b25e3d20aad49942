"""Run a user's meta-gradient implementation against the oracle on a list of tasks.

``candidate_fn(model, task, steps, inner_lr)`` returns ``{name: gradient}``, or ``None`` to have
the gradient read from ``p.grad`` (cleared before each call). With ``meta_batch=True`` it is
called once as ``candidate_fn(model, tasks, steps, inner_lr)`` and must produce the meta-batch
gradient, the *mean* over tasks. Whatever the candidate does to the model (BatchNorm statistics,
parameters, train/eval mode) is reported as a failure and undone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import oracle
from .compare import Report, compare
from .parameters import Adapt, trainable
from .settings import InnerOptimizer
from .state import Snapshot
from .task import Tasks, as_tasks

__all__ = ["Candidate", "Validation", "validate"]

Candidate = Callable[[nn.Module, Any, int, float], "Mapping[str, Tensor] | None"]


@dataclass(frozen=True)
class Validation:
    """Per-task reports (empty with ``meta_batch=True``), the mean over tasks, and side effects."""

    tasks: list[Report]
    overall: Report
    side_effects: list[str]

    def ok(self, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        reports = (*self.tasks, self.overall)
        return not self.side_effects and all(r.ok(rtol, atol) for r in reports)

    def summary(self, rtol: float = 1e-5, atol: float = 1e-8) -> str:
        lines = []
        for i, r in enumerate(self.tasks):
            verdict = "ok" if r.ok(rtol, atol) else "FAIL"
            lines.append(
                f"task {i}: cosine {r.overall.cosine:.7f}, rel.err {r.overall.rel_error:.2e}  {verdict}"
            )
        lines.append(f"mean over tasks ({'ok' if self.overall.ok(rtol, atol) else 'FAIL'}):")
        lines.append(self.overall.table(rtol, atol))
        lines += [f"side effect on the model: {s}" for s in self.side_effects]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def assert_close(self, rtol: float = 1e-5, atol: float = 1e-8) -> None:
        if not self.ok(rtol, atol):
            raise AssertionError(
                f"candidate disagrees with the oracle (rtol={rtol:g}, atol={atol:g})\n"
                f"{self.summary(rtol, atol)}"
            )


def _mean(grads: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The mean over tasks of the entries every task has with one shape (the others are then
    reported missing by :func:`compare`)."""
    first = grads[0]
    return {
        k: torch.stack([g[k] for g in grads]).mean(0)
        for k in first
        if all(k in g and g[k].shape == first[k].shape for g in grads)
    }


def _call(
    candidate_fn: Candidate,
    model: nn.Module,
    arg: Any,
    steps: int,
    inner_lr: float,
    side_effects: list[str],
    label: str,
) -> Mapping[str, Tensor]:
    """One candidate call on a model with cleared gradients; its changes are recorded and undone."""
    theta = trainable(model)
    for p in model.parameters():
        p.grad = None
    snapshot = Snapshot(model)
    try:
        returned = candidate_fn(model, arg, steps, inner_lr)
        from_grad = returned is None
        out: Mapping[str, Tensor] = (
            returned
            if returned is not None
            else {
                n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for n, p in theta.items()
            }
        )
        changes = snapshot.changes()
    finally:
        snapshot.restore()
    side_effects += [f"{label}: {c}" for c in changes if not (from_grad and c.kind == "gradient")]
    return out


@torch.enable_grad()  # the candidate differentiates, whatever the caller's grad mode
def validate(
    candidate_fn: Candidate,
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    first_order: bool = False,
    inner_optimizer: InnerOptimizer = "sgd",
    meta_batch: bool = False,
) -> Validation:
    """Compare ``candidate_fn`` with :func:`gradcheck.oracle.meta_gradient` on every task.

    The model is left exactly as it was, whatever the candidate does.
    """
    tasks = as_tasks(task_or_tasks)
    references = [
        oracle.meta_gradient(
            model,
            t,
            steps,
            inner_lr,
            adapt=adapt,
            leap=leap,
            first_order=first_order,
            inner_optimizer=inner_optimizer,
        )
        for t in tasks
    ]
    reference = _mean(references)
    side_effects: list[str] = []
    outer = Snapshot(model)
    try:
        if meta_batch:
            candidate = _call(candidate_fn, model, tasks, steps, inner_lr, side_effects, "meta-batch")
            return Validation([], compare(candidate, reference), side_effects)
        candidates = [
            _call(candidate_fn, model, t, steps, inner_lr, side_effects, f"task {i}")
            for i, t in enumerate(tasks)
        ]
    finally:
        outer.restore()
    reports = [compare(c, r) for c, r in zip(candidates, references)]
    return Validation(reports, compare(_mean(candidates), reference), side_effects)
