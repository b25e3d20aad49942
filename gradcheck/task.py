"""A few-shot task: what the inner loop fits (support) and what the meta-objective scores (query).

A task is two losses, each a function of *a model* — a callable that evaluates the network at
whatever parameters the caller is differentiating (θ, an inner-loop iterate φ_k, the teacher φ_T).
Every estimator and checker in this project consumes tasks only through ``support_loss(f)`` and
``query_loss(f)``, so the data form and the closure form behave identically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Closure = Callable[[Callable[..., Any]], Tensor]


def _pair(batch: Any, which: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"Task {which} must be a pair (inputs, targets), got {type(batch).__name__}")
    x, y = batch
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        raise TypeError(f"Task {which} must hold tensors, got ({type(x).__name__}, {type(y).__name__})")
    return x, y


class Task:
    """Support and query batches plus a loss: ``L_S(f) = loss(f(x_s), y_s)``, ``L_Q`` likewise.

    ``Task.from_closures`` accepts arbitrary losses instead. A closure receives a callable that
    behaves like the model evaluated at the parameters being differentiated; it should only
    *call* it (``f(x)``), never read or write the model's attributes.
    """

    def __init__(
        self,
        support: tuple[Tensor, Tensor],
        query: tuple[Tensor, Tensor],
        loss: Callable[[Tensor, Tensor], Tensor],
    ) -> None:
        if not callable(loss):
            raise TypeError(f"Task loss must be callable, got {type(loss).__name__}")
        self.support = _pair(support, "support")
        self.query = _pair(query, "query")
        self.loss = loss
        self._closures: tuple[Closure, Closure] | None = None

    @classmethod
    def from_closures(cls, support_loss: Closure, query_loss: Closure) -> Task:
        """A task given directly by ``support_loss(f)`` and ``query_loss(f)``."""
        for name, fn in (("support_loss", support_loss), ("query_loss", query_loss)):
            if not callable(fn):
                raise TypeError(f"Task.from_closures: {name} must be callable")
        task = cls.__new__(cls)
        task.support = task.query = None
        task.loss = None
        task._closures = (support_loss, query_loss)
        return task

    @property
    def is_closure(self) -> bool:
        return self._closures is not None

    def support_loss(self, f: Callable[..., Any]) -> Tensor:
        if self._closures is not None:
            return self._closures[0](f)
        x, y = self.support
        return self.loss(f(x), y)

    def query_loss(self, f: Callable[..., Any]) -> Tensor:
        if self._closures is not None:
            return self._closures[1](f)
        x, y = self.query
        return self.loss(f(x), y)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Task:
        """A copy with floating-point data cast to ``dtype`` and everything moved to ``device``.

        Targets that are not floating point (class labels) keep their dtype. Closure tasks hold
        their data out of reach and cannot be converted: build them in the wanted dtype instead.
        """
        if self._closures is not None:
            raise TypeError(
                "a closure task cannot be converted to another dtype/device: its data lives "
                "inside the closures; build the closures (and the model) in the wanted dtype"
            )

        def convert(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Task(tuple(map(convert, self.support)), tuple(map(convert, self.query)), self.loss)

    def __repr__(self) -> str:
        if self._closures is not None:
            return "Task.from_closures(...)"
        shapes = [tuple(t.shape) for t in (*self.support, *self.query)]
        return f"Task(support={shapes[0]}->{shapes[1]}, query={shapes[2]}->{shapes[3]})"
