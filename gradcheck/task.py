"""A few-shot task: what the inner loop fits (support) and what the meta-objective scores (query).

A task is anything with two losses, each a function of *a model* — a callable that evaluates the
network at whatever parameters the caller is differentiating (θ, an inner-loop iterate φ_k, the
teacher φ_T). Every estimator and checker consumes tasks only through :class:`TaskLike`:

* :class:`Task` — data: ``L_S(f) = loss(f(x_s), y_s)`` and ``L_Q(f) = loss(f(x_q), y_q)``;
* :class:`ClosureTask` — the two losses given as closures (``Task.from_closures``);
* :class:`TaskBatch` — a meta-batch of data tasks of equal shapes, stacked (``Task.stack``).

Entry points take ``task_or_tasks``: one task, a sequence of them, or a :class:`TaskBatch`; the
meta-gradient of several tasks is the *mean* of theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["ClosureTask", "Loss", "Model", "Task", "TaskBatch", "TaskLike", "Tasks", "as_tasks"]

Model = Callable[..., Any]
"""The network at some parameters: call it like the module (``f(x)``)."""
Loss = Callable[[Tensor, Tensor], Tensor]
Closure = Callable[[Model], Tensor]


@runtime_checkable
class TaskLike(Protocol):
    """What every entry point needs of a task: the two losses of a model ``f``, and conversion."""

    def support_loss(self, f: Model) -> Tensor:
        """L_S(f), the loss the inner loop descends."""
        ...

    def query_loss(self, f: Model) -> Tensor:
        """L_Q(f), the loss the meta-objective scores."""
        ...

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> TaskLike:
        """The task with floating-point data in ``dtype`` and everything on ``device``."""
        ...


def _pair(batch: object, which: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"Task {which} must be a pair (inputs, targets), got {type(batch).__name__}")
    x, y = batch
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        raise TypeError(f"Task {which} must hold tensors, got ({type(x).__name__}, {type(y).__name__})")
    return x, y


def _convert(t: Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> Tensor:
    """Floating tensors to ``dtype``; integer ones (class labels) keep theirs; all to ``device``."""
    return t.to(device=device, dtype=dtype if t.is_floating_point() else None)


@dataclass(frozen=True, init=False)
class Task:
    """Support and query batches plus a loss: ``L_S(f) = loss(f(x_s), y_s)``, ``L_Q`` likewise."""

    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]
    loss: Loss

    def __init__(self, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor], loss: Loss) -> None:
        if not callable(loss):
            raise TypeError(f"Task loss must be callable, got {type(loss).__name__}")
        object.__setattr__(self, "support", _pair(support, "support"))
        object.__setattr__(self, "query", _pair(query, "query"))
        object.__setattr__(self, "loss", loss)

    @staticmethod
    def from_closures(support_loss: Closure, query_loss: Closure) -> ClosureTask:
        """A task given directly by ``support_loss(f)`` and ``query_loss(f)``."""
        return ClosureTask(support_loss, query_loss)

    @staticmethod
    def stack(tasks: Sequence[Task]) -> TaskBatch:
        """A meta-batch of tasks with equal shapes and the same loss, stacked along a new dim 0."""
        return TaskBatch.of(tasks)

    def support_loss(self, f: Model) -> Tensor:
        """L_S(f) = loss(f(x_s), y_s): what the inner loop descends, ``f`` the model at φ_k."""
        x, y = self.support
        return self.loss(f(x), y)

    def query_loss(self, f: Model) -> Tensor:
        """L_Q(f) = loss(f(x_q), y_q): what the meta-objective scores, ``f`` the model at φ_T."""
        x, y = self.query
        return self.loss(f(x), y)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Task:
        """A copy with floating-point data cast to ``dtype`` and everything moved to ``device``.

        Targets that are not floating point (class labels) keep their dtype.
        """
        xs, ys = (_convert(t, dtype, device) for t in self.support)
        xq, yq = (_convert(t, dtype, device) for t in self.query)
        return Task((xs, ys), (xq, yq), self.loss)

    def __repr__(self) -> str:
        (xs, ys), (xq, yq) = self.support, self.query
        return (
            f"Task(support={tuple(xs.shape)}->{tuple(ys.shape)}, query={tuple(xq.shape)}->{tuple(yq.shape)})"
        )


@dataclass(frozen=True)
class ClosureTask:
    """A task given by two closures, each receiving the model at the parameters being differentiated.

    A closure should only *call* ``f`` (``f(x)``), never read or write the model's attributes.
    Its data lives out of reach, so it cannot be converted: build it in the dtype you need.
    """

    support: Closure
    query: Closure

    def __post_init__(self) -> None:
        for name, fn in (("support_loss", self.support), ("query_loss", self.query)):
            if not callable(fn):
                raise TypeError(f"Task.from_closures: {name} must be callable, got {type(fn).__name__}")

    def support_loss(self, f: Model) -> Tensor:
        """L_S(f): the support closure called with ``f``, the model at the inner iterate."""
        return self.support(f)

    def query_loss(self, f: Model) -> Tensor:
        """L_Q(f): the query closure called with ``f``, the model at the teacher."""
        return self.query(f)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ClosureTask:
        """Always refused: the closures hold their data out of reach."""
        raise TypeError(
            "a closure task cannot be converted to another dtype/device: its data lives inside the "
            "closures; build the closures (and the model) in the wanted dtype"
        )

    def __repr__(self) -> str:
        return "Task.from_closures(...)"


def _differing(tasks: list[Task]) -> None:
    """Raise ``ValueError`` naming the first task whose loss, or a tensor's shape, dtype or
    device, differs from task 0's (nothing if none does)."""
    first = tasks[0]
    for i, t in enumerate(tasks):
        if t.loss is not first.loss:
            raise ValueError(f"Task.stack: task {i} has a different loss from task 0")
        for a, b, what in zip((*t.support, *t.query), (*first.support, *first.query), _PARTS):
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                raise ValueError(
                    f"Task.stack: task {i}'s {what} is {tuple(a.shape)} {a.dtype} on {a.device}, task "
                    f"0's is {tuple(b.shape)} {b.dtype} on {b.device}; stacking needs equal shapes"
                )


@dataclass(frozen=True)
class TaskBatch:
    """B data tasks with equal shapes and one loss: ``support = (X_s, Y_s)`` with a leading dim B.

    What a batched (``torch.func.vmap``) meta-batch implementation consumes: ``batch.support[0][i]``
    is task i's support inputs. ``batch[i]`` and iteration give the tasks back.
    """

    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]
    loss: Loss

    @classmethod
    def of(cls, tasks: Sequence[Task]) -> TaskBatch:
        tasks = list(tasks)
        if not tasks:
            raise ValueError("Task.stack needs at least one task")
        if not all(isinstance(t, Task) for t in tasks):
            kinds = sorted({type(t).__name__ for t in tasks})
            raise TypeError(f"Task.stack needs data tasks (Task), got {kinds}")
        first = tasks[0]
        parts = list(zip(*((*t.support, *t.query) for t in tasks)))  # support x, y, query x, y
        # torch.stack checks shapes and devices, but would promote dtypes: those are checked here
        if any(t.loss is not first.loss for t in tasks) or any(
            a.dtype != part[0].dtype for part in parts for a in part
        ):
            _differing(tasks)
        try:
            xs, ys, xq, yq = (torch.stack(part) for part in parts)
        except RuntimeError:
            _differing(tasks)  # names the task whose shape or device differs
            raise
        return cls((xs, ys), (xq, yq), first.loss)

    def __len__(self) -> int:
        return len(self.support[0])

    def __getitem__(self, i: int) -> Task:
        (xs, ys), (xq, yq) = self.support, self.query
        return Task((xs[i], ys[i]), (xq[i], yq[i]), self.loss)

    def __iter__(self) -> Iterator[Task]:
        return (self[i] for i in range(len(self)))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> TaskBatch:
        (xs, ys), (xq, yq) = self.support, self.query
        xs, ys, xq, yq = (_convert(t, dtype, device) for t in (xs, ys, xq, yq))
        return TaskBatch((xs, ys), (xq, yq), self.loss)


_PARTS = ("support inputs", "support targets", "query inputs", "query targets")

Tasks = TaskLike | Sequence[TaskLike] | TaskBatch
"""What ``task_or_tasks`` accepts."""


def as_tasks(task_or_tasks: Tasks) -> list[TaskLike]:
    """One task, a sequence of tasks or a :class:`TaskBatch`, as a non-empty list of tasks."""
    if isinstance(task_or_tasks, TaskBatch):
        return list(task_or_tasks)
    if isinstance(task_or_tasks, TaskLike):
        return [task_or_tasks]
    if isinstance(task_or_tasks, (str, bytes)) or not isinstance(task_or_tasks, Sequence):
        raise TypeError(
            "task_or_tasks must be a task (Task, Task.from_closures, anything with support_loss and "
            f"query_loss), a sequence of them or Task.stack(...), got {type(task_or_tasks).__name__}"
        )
    tasks = list(task_or_tasks)
    if not tasks:
        raise ValueError("task_or_tasks is empty: at least one task is needed")
    bad = [i for i, t in enumerate(tasks) if not isinstance(t, TaskLike)]
    if bad:
        raise TypeError(f"task_or_tasks[{bad[0]}] is a {type(tasks[bad[0]]).__name__}, not a task")
    return tasks
