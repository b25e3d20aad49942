"""Meta-training with any estimator: ``meta_backward(tasks)`` fills ``p.grad`` for an outer optimizer.

:class:`MetaLearner` runs every estimator of :mod:`lazymaml.estimators` — and exact second-order
MAML, ``"maml"``, by the project's own unroll — through the same machinery, so that methods are
compared on their maths alone. A meta-batch of data tasks of equal shapes runs as one batched
computation (:mod:`lazymaml.batched`); anything else runs task by task on the building blocks of
:mod:`lazymaml.estimators`. With ``process_group`` the mean is over every task of every rank
(:mod:`lazymaml.distributed`).

Batching (``batched=``):

* ``"auto"`` (default) — batched when it applies and is faster, decided once, on the first
  meta-batch of B ≥ 2 tasks that could be batched (its result is the sequential path's):

  1. the batched path runs on sub-batches of its first 2 tasks and of its first task, untimed:
     this absorbs the one-time warm-up of each shape (the first ``vmap`` trace, kernel and
     allocator set-up: seconds in a fresh process, against milliseconds afterwards — warming up
     only the 2-task shape left the first 1-task call carrying it, which made the fixed cost look
     like the whole meta-batch's and chose the 8× slower sequential path on a loaded machine), and
     a failure here means sequential for good;
  2. the whole meta-batch runs sequentially, timed: t_seq, and these are the returned results;
  3. the batched path runs on 1 and on 2 tasks, alternately, timed, keeping the fastest of
     each (t_1, t_2): at least two rounds, more (at most 5) while the rounds together have cost
     less than t_seq, so that short, noise-prone measurements are repeated and long ones not;
  4. batched from then on if t_1 + (B − 1)·max(t_2 − t_1, 0) — the batched time of B tasks as
     a fixed cost plus a cost per task, the two read off the sub-batches — is below t_seq;
     otherwise sequential, said once with a :class:`SequentialFallback` warning.

  The probe never holds more than 2 tasks batched, so its peak memory is that of a batched
  meta-batch of 2 (a few times one sequential task's; the 4-conv network holds about 1.8 times
  more per task batched than sequentially), however large B is; it costs the warm-up, which the
  batched path pays anyway, and about one more meta-batch's time. ``seconds`` holds the
  estimates per task. On CPU, convolutional networks are usually faster sequentially (vmap turns
  per-task weights into grouped convolutions), MLPs batched. Where batching does not apply it
  runs sequentially, saying why with one :class:`SequentialFallback` warning per kind of reason
  (the learner, the model, the tasks) and learner. A single task runs sequentially;
* ``True`` — batched or an exception naming why not (at construction where that is known then);
* ``False`` — always sequential.

It applies to the estimators "maml", "truncated", "first_order", "lazy", "lazy_horizon" and
"reptile" (not "imaml": its conjugate gradient stops per task), with an inner optimizer that has a pure
update (``"sgd"``, ``"adam"`` or a spec of :mod:`gradcheck.optim`), to data tasks
(:class:`~gradcheck.task.Task`, the same loss, equal shapes, or ``Task.stack``), on models that
:func:`lazymaml.batched.refusal` accepts — and not with learned inner rates, ``query_weights`` or
``step_kwarg``, which run task by task. When the batched result is not finite, or the batched
computation raises, the tasks rerun sequentially: a user's error then surfaces with the
sequential path's message; if the sequential run succeeds, the learner says so and stays
sequential — unless the sequential result is just as non-finite (a meta-gradient that is nan
where every loss is finite), which is returned as it is, batching kept.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from gradcheck.models import refuse_unsupported
from gradcheck.parameters import Adapt, flat
from gradcheck.rates import Rates, coordinates
from gradcheck.settings import InnerLoop, InnerOptimizer, JacobianStep, LearningRate
from gradcheck.state import preserved
from gradcheck.student import Student
from gradcheck.task import Task, TaskBatch, TaskLike, Tasks, as_tasks

from . import batched as batching
from . import distributed
from . import estimators as registry

__all__ = ["LazyMAML", "MetaLearner", "SequentialFallback"]

_PARTS = ("support inputs", "support targets", "query inputs", "query targets")
PROBE_ROUNDS = 5  # batched="auto": at most this many timed rounds of the sub-batches of 1 and 2 tasks
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

    "maml", "first_order", "lazy" and "lazy_horizon" also take learned inner rates (``inner_lr``
    a tensor or {name: tensor}, :mod:`gradcheck.rates`; ``per_step_lr`` for a step dimension),
    ``query_weights`` (F = Σ_k w_k L_Q(φ_{k+1})) and ``step_kwarg`` (the step index passed to the
    model). :meth:`meta_backward` writes a learned rate's meta-gradient into its ``.grad``: the
    parameter's for a rate the model owns, the rate tensor's (a leaf) otherwise.

    The model's buffers are never written by the inner loop: BatchNorm running statistics stay
    as they were (like ``higher`` and learn2learn clones, the inner loop runs on copies), so
    evaluate in train mode (transductive batch statistics, as MAML does) or on :meth:`adapt`'s
    student, whose buffers are the ones its own K steps produced.
    """

    def __init__(
        self,
        model: nn.Module,
        steps: int,
        inner_lr: LearningRate,
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
        per_step_lr: bool = False,
        query_weights: Sequence[float] | None = None,
        step_kwarg: str | None = None,
    ) -> None:
        self.entry = entry = registry.get(estimator)
        options: dict[str, Any] = dict(
            jacobian_step=jacobian_step,
            horizon=horizon,
            lam=lam,
            cg_iterations=cg_iterations,
            cg_tol=cg_tol,
            per_step_lr=per_step_lr,
            query_weights=query_weights,  # InnerLoop checks it and makes it a tuple
            step_kwarg=step_kwarg,
        )
        defaults = {"jacobian_step": "single", "per_step_lr": False}
        given = {
            n: v for n, v in options.items() if v is not None and not (n in defaults and v == defaults[n])
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
        refuse_unsupported(model, by="MetaLearner")
        self.model, self.estimator, self.batched = model, entry.name, batched
        loop = InnerLoop.given(steps, inner_lr, leap, inner_optimizer, adapt=adapt, **given)
        self.loop = entry.settings(loop)
        self.cannot_batch = self._static_refusal()
        if batched is True and self.cannot_batch:
            raise ValueError(f"batched=True, but {self.cannot_batch}")
        self.process_group = process_group
        student = Student.read(model, loop=self.loop)  # refuse a bad adapt or rate now, not later
        self._rates = self._rate_targets()  # and a learned rate whose .grad cannot be written
        if process_group is not None:
            distributed.check_group(process_group)
            distributed.check_same_parameters(student.coordinates, process_group)
        self._said: set[str] = set()
        self.decided = batched != "auto"  # whether auto's probe has run (never: True or False)
        self.seconds: dict[str, float] = {}  # auto's estimates per task of B: "batched", "sequential"
        self.clock: Callable[[], float] = time.perf_counter

    def _static_refusal(self) -> str | None:
        """Why no meta-batch can be batched with these settings, or None."""
        if self.entry.not_batched:
            return f"estimator={self.estimator!r} is not batched ({self.entry.not_batched})"
        # learned rates, a multi-step loss and a step index: the sequential path only
        unbatched = [{"inner_lr": "learned inner rates"}.get(s, s) for s in self.loop.extended]
        if unbatched:
            return f"{' and '.join(unbatched)} are not batched (lazymaml.batched vmaps over θ alone)"
        if not self.loop.update().pure:
            return (
                f"inner_optimizer={self.loop.inner_optimizer!r} is not batched (only names and specs "
                "of gradcheck.optim: a factory's optimizer writes its own tensors)"
            )
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
        except Exception as error:  # e.g. out of memory: the sequential path may still run
            return "tasks", f"the tasks cannot be stacked: {type(error).__name__}: {error}"

    def _say(self, kind: str, message: str) -> None:
        if self.batched is True:
            raise ValueError(f"batched=True, but {message}")
        if kind != "off" and kind not in self._said:
            self._said.add(kind)
            warnings.warn(
                f"MetaLearner runs sequentially: {message}",
                SequentialFallback,
                stacklevel=registry._caller_stacklevel(),  # the user's line, however deep the call
            )

    def _sequential(self, student: Student, tasks: Sequence[TaskLike]) -> tuple[dict[str, Tensor], Tensor]:
        results = [registry.per_task(self.entry, student, task, self.loop) for task in tasks]
        sums = {n: torch.stack([g[n] for g, _, _ in results]).sum(0) for n in student.coordinates}
        return sums, torch.stack([loss for _, loss, _ in results])

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

    def _batched(
        self, student: Student, batch: TaskBatch, statistics: bool
    ) -> tuple[dict[str, Tensor], Tensor] | str:
        """The batched results, or why the batched computation failed (it raised, or returned
        something not finite): then :meth:`_rerun` takes over."""
        try:
            estimate = batching.estimate(self.entry, student, batch, self.loop, statistics)
            failure = None if estimate.finite() else _NOT_FINITE
        except Exception as error:  # the sequential rerun reports a user's error clearly
            failure = f"the batched computation raised {type(error).__name__}: {error}"
        return (estimate.sums, estimate.losses) if failure is None else failure

    def _probe(
        self, student: Student, batch: TaskBatch, statistics: bool
    ) -> tuple[dict[str, Tensor], Tensor]:
        """``batched="auto"``'s one decision (the class docstring's steps 1–4); the results are the
        sequential path's on the whole meta-batch."""
        one, two = _head(batch, 1), _head(batch, 2)
        for sub in (two, one):  # 1: the warm-up of both sub-batch shapes, untimed
            warm = self._batched(student, sub, statistics)
            if isinstance(warm, str):
                return self._rerun(student, batch, warm)
        sequential, result = self._timed(student, lambda: self._sequential(student, list(batch)))  # 2
        self.decided = True

        def run(sub: TaskBatch) -> Callable[[], batching.Estimate]:
            return lambda: batching.estimate(self.entry, student, sub, self.loop, statistics)

        t1 = t2 = math.inf  # 3
        spent, rounds = 0.0, 0
        try:
            while rounds < PROBE_ROUNDS and (rounds < 2 or spent < sequential):
                (a, _), (b, _) = self._timed(student, run(one)), self._timed(student, run(two))
                t1, t2, spent, rounds = min(t1, a), min(t2, b), spent + a + b, rounds + 1
        except Exception as error:  # 2 tasks batched, but not 1: sequential, for good
            self.cannot_batch = f"the batched computation raised {type(error).__name__}: {error}"
            self._say("learner", self.cannot_batch)
            return result
        size = len(batch)
        batched = t1 + (size - 1) * max(t2 - t1, 0.0)  # 4
        self.seconds = {"batched": batched / size, "sequential": sequential / size}
        if batched >= sequential:
            per_batched, per_sequential = (1e3 * self.seconds[p] for p in ("batched", "sequential"))
            self.cannot_batch = (
                f"measured {per_batched:.3g} ms per task batched (B = {size}, estimated from sub-batches "
                f"of 1 and 2 tasks), {per_sequential:.3g} ms sequentially"
            )
            self._say("learner", self.cannot_batch)
        return result

    def _rerun(self, student: Student, batch: TaskBatch, failure: str) -> tuple[dict[str, Tensor], Tensor]:
        """After a batched ``failure``: the tasks sequentially (a user's error raises here, with the
        sequential path's message); if that succeeds, the failure said and sequential from now on
        — unless the failure was a non-finite result and the sequential one is just as
        non-finite (a gradient that is nan where every loss is finite): then batching was not at
        fault, and the same values are returned without a word."""
        result = self._sequential(student, list(batch))
        if failure == _NOT_FINITE and not bool(torch.isfinite(flat(result[0])).all()):
            return result
        self.cannot_batch = failure
        self._say("learner", failure)
        return result

    def _estimate(
        self,
        student: Student,
        tasks: list[TaskLike] | TaskBatch,
        batch: TaskBatch | tuple[str, str],
        statistics: bool,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The gradients summed over the tasks and the query losses stacked: batched where
        :meth:`_batch` stacked them into ``batch``, else sequentially (``batch`` says why)."""
        if not isinstance(batch, TaskBatch):
            _check_devices(tasks, student)
            self._say(*batch)
            return self._sequential(student, list(tasks))
        _check_devices(batch, student)  # Task.stack put every task on task 0's device
        if not self.decided:
            return self._probe(student, batch, statistics)
        result = self._batched(student, batch, statistics)
        return self._rerun(student, batch, result) if isinstance(result, str) else result

    def meta_backward(self, task_or_tasks: Tasks) -> Tensor:
        """Accumulate the mean meta-gradient over the tasks into ``p.grad``; return the mean query
        loss L_Q(φ_T) (also for Reptile, which never uses it). With ``process_group``, both are means
        over every task of every rank. Nothing is written unless every task (every rank) succeeds."""
        student = Student.read(self.model, loop=self.loop)
        try:  # whatever fails on this rank, the other ranks are told (they would wait forever)
            tasks = _tasks(task_or_tasks)
            model_refusal, statistics = batching.refusal(self.model)
            batch = self._batch(tasks, model_refusal)
            # stacked, the tasks all have task 0's dtypes: the batch's four tensors are checked
            every = batch if isinstance(batch, TaskBatch) else tasks
            refuse_unsupported(self.model, every, by="MetaLearner.meta_backward")
            targets = dict(self._rates)
            with preserved(self.model):
                sums, losses = self._estimate(student, tasks, batch, statistics)
        except Exception:
            if self.process_group is not None:
                distributed.withdraw(student.coordinates, self.process_group)
            raise
        loss = losses.sum()
        if self.process_group is None:
            mean, loss = {n: s / len(losses) for n, s in sums.items()}, loss / len(losses)
        else:
            mean, loss = distributed.mean_over_ranks(sums, loss, len(losses), self.process_group)
        targets.update((n, p) for n, p in self.model.named_parameters() if n in mean)
        with torch.no_grad():
            for name, p in targets.items():
                if p.grad is None:
                    p.grad = mean[name].to(p.dtype)
                else:
                    p.grad.add_(mean[name].to(p.dtype))
        return loss.detach()

    def _rate_targets(self) -> dict[str, Tensor]:
        """{key: the caller's rate tensor} for the learned rates that are not parameters of the
        model (read once, at construction): :meth:`meta_backward` writes their
        meta-gradient into their ``.grad``. A rate that is not a leaf (computed from another
        tensor) is refused: its ``.grad`` is not kept."""
        if not isinstance(self.loop.inner_lr, Rates):
            return {}
        every, _, _ = coordinates(self.model, self.loop.adapt, self.loop.inner_lr, self.loop.steps)
        params = {n for n, _ in self.model.named_parameters()}
        targets = {key: t for key, t in every.items() if key not in params}
        stems = [key for key, t in targets.items() if not t.is_leaf]
        if stems:
            raise ValueError(
                f"learned rate {stems[0]!r} is not a leaf tensor (it is computed from another one): "
                "MetaLearner writes meta-gradients into .grad, which only a leaf keeps; pass the leaf "
                "(e.g. an nn.Parameter) or use lazymaml.estimators.run for the gradient itself"
            )
        return targets

    def adapt(self, task: TaskLike) -> nn.Module:
        """A copy of the model holding the student φ_K after K inner steps on ``task`` (the proximal
        student for "imaml"), with the buffers those steps produced."""
        student = Student.read(self.model, loop=self.loop)
        _check_devices([task], student)
        with preserved(self.model):
            phi, untrained = student.run(
                task, self.loop, proximal=self.loop.lam if self.entry.proximal else 0.0
            )
        adapted = _copy(self.model)
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
        inner_lr: LearningRate,
        *,
        adapt: Adapt = None,
        leap: float = 1.0,
        jacobian_step: JacobianStep = "single",
        inner_optimizer: InnerOptimizer = "sgd",
        batched: bool | Literal["auto"] = "auto",
        process_group: distributed.ProcessGroup | None = None,
        per_step_lr: bool = False,
        query_weights: Sequence[float] | None = None,
        step_kwarg: str | None = None,
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
            per_step_lr=per_step_lr,
            query_weights=query_weights,
            step_kwarg=step_kwarg,
        )


_NOT_FINITE = "the batched result is not finite where the sequential one is"


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


def _tasks(task_or_tasks: Tasks) -> list[TaskLike] | TaskBatch:
    """The meta-batch as a list of tasks (a TaskBatch as it is); a list of data tasks without
    :func:`~gradcheck.task.as_tasks`' protocol checks (an ``isinstance`` against a runtime
    protocol costs microseconds per task, a quarter of the batched path's own overhead)."""
    if isinstance(task_or_tasks, TaskBatch):
        return task_or_tasks
    if type(task_or_tasks) is list and task_or_tasks and all(type(t) is Task for t in task_or_tasks):
        return list(task_or_tasks)
    return as_tasks(task_or_tasks)


def _head(batch: TaskBatch, size: int) -> TaskBatch:
    """The first ``size`` tasks of ``batch``, as a batch (views, no copy)."""
    (xs, ys), (xq, yq) = batch.support, batch.query
    return TaskBatch((xs[:size], ys[:size]), (xq[:size], yq[:size]), batch.loss)


def _copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy``, also of a model whose modules hold non-leaf tensors as plain attributes
    (``torch.nn.utils.prune`` and the hook-based ``weight_norm``/``spectral_norm`` recompute
    ``weight`` on every forward; deepcopy refuses non-leaf tensors): those are copied detached,
    and the hooks recompute them on the next forward."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)
