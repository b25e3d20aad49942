"""Meta-training with any estimator: ``meta_backward(tasks)`` fills ``p.grad`` for an outer optimizer.

:class:`MetaLearner` runs every estimator of :mod:`lazymaml.estimators` — and exact second-order
MAML, ``"maml"``, by a ``torch.func`` unroll — through the same machinery, so that methods are
compared on their maths alone. A meta-batch of data tasks of equal shapes runs as one batched
computation (:mod:`lazymaml.batched`); anything else runs task by task on the building blocks of
:mod:`lazymaml.estimators`. With ``process_group`` the mean is over every task of every rank
(:mod:`lazymaml.distributed`).

Batching (``batched=``):

* ``"auto"`` (default) — batched when it applies and is faster: the first meta-batch of two or
  more tasks runs batched, the next one sequentially, each timed, and the faster path runs from
  then on (on CPU, convolutional networks are often faster sequentially: vmap turns per-task
  weights into grouped convolutions); otherwise sequential, saying why with one
  :class:`SequentialFallback` warning per reason and learner. A single task runs sequentially;
* ``True`` — batched or an exception naming why not (at construction where that is known then);
* ``False`` — always sequential.

It applies to the estimators "maml", "truncated", "first_order", "lazy", "lazy_horizon" and
"reptile" (not "imaml": its conjugate gradient stops per task), with ``inner_optimizer="sgd"``
(or ``"adam"`` for the estimators that do not differentiate the student), to data tasks
(:class:`~gradcheck.task.Task`, the same loss, equal shapes, or ``Task.stack``), on models that
:func:`lazymaml.batched.refusal` accepts. When the batched result is not finite, or the batched
computation raises, the tasks rerun sequentially: a user's error then surfaces with the
sequential path's message; if the sequential run succeeds, the learner says so and stays
sequential.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from gradcheck.parameters import Adapt
from gradcheck.settings import InnerLoop, InnerOptimizer, JacobianStep
from gradcheck.state import preserved
from gradcheck.student import Student
from gradcheck.task import Task, TaskBatch, TaskLike, Tasks, as_tasks

from . import batched as batching
from . import distributed
from . import estimators as registry

__all__ = ["LazyMAML", "MetaLearner", "SequentialFallback"]

_PARTS = ("support inputs", "support targets", "query inputs", "query targets")
_T = TypeVar("_T")
_OPTIONS = ("jacobian_step", "horizon", "lam", "cg_iterations", "cg_tol")  # an estimator's own settings


class SequentialFallback(UserWarning):
    """``batched="auto"`` ran a meta-batch task by task; the message says why."""


class MetaLearner:
    """Meta-learner around ``model``: ``meta_backward(tasks)`` then ``outer_optimizer.step()``.

    ``estimator``: a name of :data:`lazymaml.estimators.REGISTRY` (or an entry) — "maml" (exact
    second order, differentiating all K steps), "truncated" (the last ``horizon`` steps),
    "first_order", "lazy" (η from ``jacobian_step``), "lazy_horizon" (η = γKα), "reptile",
    "imaml" (``lam``, ``cg_iterations``, ``cg_tol``). ANIL and BOIL are ``adapt="head"`` and
    ``adapt="body"``. Settings are checked here, once; an option the estimator does not read is
    refused.

    The model's buffers are never written by the inner loop: BatchNorm running statistics stay
    as they were (like ``higher`` and learn2learn clones, the inner loop runs on copies), so
    evaluate in train mode (transductive batch statistics, as MAML does) or on :meth:`adapt`'s
    student, whose buffers are the ones its own K steps produced.
    """

    def __init__(
        self,
        model: nn.Module,
        steps: int,
        inner_lr: float,
        *,
        estimator: str | registry.Estimator = "lazy",
        adapt: Adapt = None,
        leap: float = 1.0,
        jacobian_step: JacobianStep = "single",
        inner_optimizer: InnerOptimizer = "sgd",
        batched: bool | Literal["auto"] = "auto",
        process_group: distributed.ProcessGroup | None = None,
        horizon: int | None = None,
        lam: float | None = None,
        cg_iterations: int | None = None,
        cg_tol: float | None = None,
    ) -> None:
        self.entry = entry = registry.get(estimator)
        options: dict[str, Any] = dict(
            jacobian_step=jacobian_step, horizon=horizon, lam=lam, cg_iterations=cg_iterations, cg_tol=cg_tol
        )
        given = {
            n: v for n, v in options.items() if v is not None and not (n == "jacobian_step" and v == "single")
        }
        wrong = [n for n in given if n not in entry.reads]
        if wrong:
            readers = [e.name for e in registry.REGISTRY.values() if wrong[0] in e.reads]
            raise ValueError(
                f"{wrong[0]}= is a setting of estimator {' or '.join(map(repr, readers)) or 'none'}, "
                f"not of {entry.name!r}"
            )
        if batched not in (True, False, "auto"):
            raise ValueError(f'batched must be True, False or "auto", got {batched!r}')
        self.model, self.estimator, self.batched = model, entry.name, batched
        loop = InnerLoop(steps, inner_lr, leap, inner_optimizer, adapt=adapt, **given)
        self.loop = entry.settings(loop)
        self.cannot_batch = self._static_refusal()
        if batched is True and self.cannot_batch:
            raise ValueError(f"batched=True, but {self.cannot_batch}")
        self.process_group = process_group
        student = Student.read(model, adapt)  # refuse a bad adapt now, not at the first meta-batch
        if process_group is not None:
            distributed.check_group(process_group)
            distributed.check_same_parameters(student.theta, process_group)
        self._said: set[str] = set()
        self.seconds: dict[str, float] = {}  # per task, on the first batched and sequential meta-batches
        self.clock: Callable[[], float] = time.perf_counter

    def _static_refusal(self) -> str | None:
        """Why no meta-batch can be batched with these settings, or None."""
        if self.entry.not_batched:
            return f"estimator={self.estimator!r} is not batched ({self.entry.not_batched})"
        if not self.loop.update().pure:
            return f"inner_optimizer={self.loop.inner_optimizer!r} is not batched (only 'sgd' and 'adam')"
        return None

    def _batch(
        self, tasks: Sequence[TaskLike] | TaskBatch, model_refusal: str | None
    ) -> TaskBatch | tuple[str, str]:
        """The meta-batch stacked for the batched path, or (kind, message): why it runs sequentially."""
        if self.batched is False:
            return "off", "batched=False"
        if self.batched == "auto" and len(tasks) == 1:
            return "off", "one task"
        if self.cannot_batch:
            return "learner", self.cannot_batch
        if model_refusal:
            return "model", model_refusal
        if isinstance(tasks, TaskBatch):
            return tasks
        data = [t for t in tasks if isinstance(t, Task)]
        if len(data) < len(tasks):
            return "tasks", "the meta-batch holds tasks that are not data tasks (Task), e.g. closure tasks"
        try:
            return Task.stack(data)  # the message names the first task that differs
        except ValueError as error:
            return "tasks", f"the tasks cannot be stacked: {error}"

    def _say(self, kind: str, message: str) -> None:
        if self.batched is True:
            raise ValueError(f"batched=True, but {message}")
        if kind != "off" and kind not in self._said:
            self._said.add(kind)
            warnings.warn(f"MetaLearner runs sequentially: {message}", SequentialFallback, stacklevel=4)

    def _sequential(self, student: Student, tasks: Sequence[TaskLike]) -> tuple[dict[str, Tensor], Tensor]:
        results = [registry.per_task(self.entry, student, task, self.loop) for task in tasks]
        gradients = {n: torch.stack([g[n] for g, _, _ in results]) for n in student.theta}
        return gradients, torch.stack([loss for _, loss, _ in results])

    def _timed(self, student: Student, run: Callable[[], _T]) -> tuple[float, _T]:
        """``run()`` and the seconds it took (the device synchronised)."""
        device = next(iter(student.theta.values())).device
        start = self.clock()
        result = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type != "cpu" and hasattr(torch, "accelerator"):  # torch >= 2.6: any accelerator
            torch.accelerator.synchronize(device)
        return self.clock() - start, result

    def _estimate(
        self, student: Student, tasks: list[TaskLike] | TaskBatch
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Per-task gradients and query losses, stacked over tasks, batched where possible."""
        model_refusal, statistics = batching.refusal(self.model)
        batch = self._batch(tasks, model_refusal)
        if not isinstance(batch, TaskBatch):
            self._say(*batch)
            return self._sequential(student, list(tasks))
        if self.batched == "auto" and "batched" in self.seconds and "sequential" not in self.seconds:
            seconds, result = self._timed(student, lambda: self._sequential(student, list(batch)))
            self.seconds["sequential"] = seconds / len(batch)
            batched, sequential = (1e3 * self.seconds[path] for path in ("batched", "sequential"))
            if sequential < batched:
                self.cannot_batch = (
                    f"measured {batched:.3g} ms per task batched, {sequential:.3g} ms sequentially"
                )
                self._say("learner", self.cannot_batch)
            return result
        probe = self.batched == "auto" and "batched" not in self.seconds  # time it (synchronises)

        def run() -> batching.Estimate:
            return batching.estimate(self.entry, student, batch, self.loop, statistics)

        try:
            seconds, estimate = self._timed(student, run) if probe else (0.0, run())
            failure = (
                None if estimate.finite() else "the batched result is not finite where the sequential one is"
            )
        except Exception as error:  # the sequential rerun below reports a user's error clearly
            failure = f"the batched computation raised {type(error).__name__}: {error}"
        if failure is None:
            if probe:
                self.seconds["batched"] = seconds / len(batch)
            return estimate.gradients, estimate.losses
        gradients, losses = self._sequential(student, list(batch))  # raises a user's error clearly
        self.cannot_batch = failure
        self._say("learner", failure)  # and from now on, sequential
        return gradients, losses

    def meta_backward(self, task_or_tasks: Tasks) -> Tensor:
        """Accumulate the mean meta-gradient over the tasks into ``p.grad``; return the mean query
        loss L_Q(φ_T) (also for Reptile, which never uses it). With ``process_group``, both are means
        over every task of every rank. Nothing is written unless every task (every rank) succeeds."""
        tasks = task_or_tasks if isinstance(task_or_tasks, TaskBatch) else as_tasks(task_or_tasks)
        student = Student.read(self.model, self.loop.adapt)
        try:
            _check_devices(tasks, student)
            with preserved(self.model):
                gradients, losses = self._estimate(student, tasks)
        except Exception:
            if self.process_group is not None:
                distributed.withdraw(student.theta, self.process_group)
            raise
        sums, loss = {n: g.sum(0) for n, g in gradients.items()}, losses.sum()
        if self.process_group is None:
            mean, loss = {n: s / len(losses) for n, s in sums.items()}, loss / len(losses)
        else:
            mean, loss = distributed.mean_over_ranks(sums, loss, len(losses), self.process_group)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in mean:
                    if p.grad is None:
                        p.grad = mean[name].to(p.dtype)
                    else:
                        p.grad.add_(mean[name].to(p.dtype))
        return loss.detach()

    def adapt(self, task: TaskLike) -> nn.Module:
        """A copy of the model holding the student φ_K after K inner steps on ``task`` (the proximal
        student for "imaml"), with the buffers those steps produced."""
        student = Student.read(self.model, self.loop.adapt)
        _check_devices([task], student)
        with preserved(self.model):
            phi, untrained = student.run(
                task, self.loop, proximal=self.loop.lam if self.entry.proximal else 0.0
            )
        adapted = copy.deepcopy(self.model)
        tensors = {**dict(adapted.named_parameters()), **dict(adapted.named_buffers())}
        with torch.no_grad():
            for name, value in {**phi, **untrained}.items():
                tensors[name].copy_(value)
        for p in adapted.parameters():
            p.grad = None
        return adapted


class LazyMAML(MetaLearner):
    """The lazy preset: ``MetaLearner(model, steps, inner_lr, estimator="lazy", …)``."""

    def __init__(
        self,
        model: nn.Module,
        steps: int,
        inner_lr: float,
        *,
        adapt: Adapt = None,
        leap: float = 1.0,
        jacobian_step: JacobianStep = "single",
        inner_optimizer: InnerOptimizer = "sgd",
        batched: bool | Literal["auto"] = "auto",
        process_group: distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__(
            model,
            steps,
            inner_lr,
            estimator="lazy",
            adapt=adapt,
            leap=leap,
            jacobian_step=jacobian_step,
            inner_optimizer=inner_optimizer,
            batched=batched,
            process_group=process_group,
        )


def _check_devices(tasks: Sequence[TaskLike] | TaskBatch, student: Student) -> None:
    """Refuse data on another device than the model's (when the model lives on one device)."""
    devices = {t.device for t in student.theta.values()}
    if len(devices) != 1:
        return
    (device,) = devices
    batches = [tasks] if isinstance(tasks, TaskBatch) else tasks
    for i, task in enumerate(batches):
        if isinstance(task, (Task, TaskBatch)):
            for tensor, part in zip((*task.support, *task.query), _PARTS):
                if tensor.device != device:
                    raise ValueError(
                        f"task {i}'s {part} are on {tensor.device}, the model's parameters on {device}: "
                        f"move the task (task.to(device={str(device)!r})) or the model"
                    )
