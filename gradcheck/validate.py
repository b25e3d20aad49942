"""Run a user's meta-gradient implementation against a reference — the exact oracle unless told
otherwise: the gradient's verdict, what the candidate did to the model, and what it computes
instead — reported separately.

**The reference** is :func:`gradcheck.oracle.meta_gradient` with ``reference=None``, or a callable
``reference(model, task_or_tasks, steps, inner_lr, **settings) -> {name: tensor}`` (the calling
convention of :mod:`gradcheck.diagnose`), called once per task; every output line names it: "the
oracle", or "the reference 'lazy'" after the callable's ``__name__``.

**The candidate** is ``candidate_fn(model, task_or_tasks, steps, inner_lr)`` returning
``{name: gradient}``, or ``None`` to have the gradient read from ``p.grad`` (cleared before each
call). ``inner_lr`` is passed exactly as given to ``validate``: a float, or learned rates (a
tensor or a mapping, :mod:`gradcheck.rates`); a candidate that needs ``per_step_lr``,
``query_weights`` or ``step_kwarg`` knows them itself (bind them with ``functools.partial``), as
the reference is told them. A learned rate's meta-gradient is expected under the oracle's key —
its parameter name for a rate the model holds (learn2learn's ``lrs.*``), else ``"inner_lr"`` or
``"inner_lr.<name>"``; a candidate returning ``None`` leaves it in the rate tensor's ``.grad``,
which is cleared before each call and restored, with the rate's value, afterwards. It is called
once per task, with that task. With ``meta_batch=True`` it takes a meta-batch
and must return the *mean* over its tasks: it is called once per task with a one-task meta-batch
(``[task]``, or ``Task.stack([task])`` when given a ``TaskBatch``) for the per-task rows, and once
with the whole meta-batch as given, for the overall verdict — B + 1 calls for B tasks.

**The gradient verdict** (``gradient_ok``) holds when every per-task report and the report of
the mean over tasks pass :meth:`gradcheck.Report.ok` at ``rtol``/``atol`` — by default the
candidate's precision and 0, the one policy of :mod:`gradcheck.tolerances` (docs/verification.md,
"Tolerances").

**Side effects**: whatever the candidate changed on the model (BatchNorm running statistics,
parameters, ``.grad`` when it returned a dict, ``requires_grad``, train/eval mode), each tensor or
module once under its first name — a shared submodule is not listed twice — with the largest
change over all calls and in how many calls it happened. All of it is undone. ``ok`` is strict
(gradient and no side effects); ``assert_close(..., allow_side_effects=True)`` checks the gradient
alone.

**The reference checks itself** (``check_reference``): before the candidate is judged, the
reference's mean over tasks is checked against directional finite differences of the
meta-objective on the user's own model and tasks (:func:`gradcheck.finite_differences.check`,
:data:`REFERENCE_DIRECTIONS` directions, 1 + 6 evaluations of F each). No list of torch's
derivative defects can be complete — on torch 2.13 CPU the second derivative of
``torch._weight_norm`` is wrong, and the oracle with it — so when the reference disagrees with
finite differences the verdict is "cannot verify on this model", never PASS and never FAIL of the
candidate, and the diagnosis is skipped. ``check_reference=None`` (the default) checks the oracle
(not with ``first_order=True``, which is not the derivative of F) and leaves a user's reference
unchecked (it may be an approximation by design); ``True`` checks any reference, ``False`` none.
``Validation.reference_check`` holds the directional report, ``reference_note`` what it says.

**Randomness**: every reference evaluation and every candidate call runs from the same seeded
generator state (:func:`gradcheck.models.common_random_numbers`): a candidate that draws its random
numbers in the reference's order — the support forward at each inner step, then the query forward
— sees the same Dropout masks. The caller's generator state is left as it was.

**The diagnosis** (:func:`gradcheck.diagnose`) of the mean over tasks — or, when some tasks pass
and others fail, of the first failing task alone: what the candidate computes instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import finite_differences
from .compare import Report, compare
from .diagnose import Diagnosis, Reference, ReferenceFunction
from .diagnose import run as _diagnose
from .models import common_random_numbers, conventions, hooks, random_modules, refuse_unsupported
from .parameters import Adapt, trainable
from .rates import Rates
from .settings import InnerLoop, InnerOptimizer, LearningRate
from .state import Change, Snapshot
from .task import Task, TaskBatch, TaskLike, Tasks, as_tasks
from .tolerances import ATOL, default_rtol

__all__ = ["REFERENCE_DIRECTIONS", "Candidate", "SideEffect", "Validation", "validate"]

REFERENCE_DIRECTIONS = 2
"""Directions of the reference's self-check (docs/verification.md, "The reference checks itself")."""

Candidate = Callable[[nn.Module, Any, int, Any], "Mapping[str, Tensor] | None"]
"""``candidate_fn(model, task_or_tasks, steps, inner_lr) -> {name: gradient} | None``; ``inner_lr``
as the caller gave it (a float, or the learned rates' tensor or mapping)."""


@dataclass(frozen=True)
class SideEffect:
    """One thing the candidate changed on the model, over all its calls: ``change`` (the largest
    ``max_abs`` seen) and in how many of the ``of`` calls it happened."""

    change: Change
    calls: int
    of: int

    @property
    def name(self) -> str:
        return self.change.name

    def __str__(self) -> str:
        return f"{self.change}, in {self.calls} of {self.of} candidate calls"


@dataclass(frozen=True)
class Validation:
    """Per-task reports, the report of the mean over tasks, side effects and the diagnosis.

    ``rtol`` and ``atol`` are the tolerances the verdict and the diagnosis used (the methods take
    others); the diagnosis is of the mean over tasks, or of task ``diagnosed_task`` alone when
    some tasks pass and others fail; ``reference`` names what the candidate was compared with.
    """

    tasks: list[Report]
    overall: Report
    side_effects: list[SideEffect]
    diagnosis: Diagnosis | None
    rtol: float
    atol: float
    diagnosed_task: int | None = None
    reference: str = "the oracle"
    reference_check: finite_differences.DirectionalReport | None = None
    reference_note: str = "the reference was not checked against finite differences"
    notes: tuple[str, ...] = ()

    @property
    def reference_disagrees(self) -> bool:
        """The reference itself disagrees with finite differences: the candidate cannot be judged."""
        return self.reference_check is not None and bool(self.reference_check.failed)

    def _tolerances(self, rtol: float | None, atol: float | None) -> tuple[float, float]:
        return (self.rtol if rtol is None else rtol, self.atol if atol is None else atol)

    def gradient_ok(self, rtol: float | None = None, atol: float | None = None) -> bool:
        """Every per-task report and the mean's pass (side effects aside)."""
        if self.reference_disagrees:
            return False
        rtol, atol = self._tolerances(rtol, atol)
        return all(r.ok(rtol, atol) for r in (*self.tasks, self.overall))

    def ok(self, rtol: float | None = None, atol: float | None = None) -> bool:
        """Strict: the gradient passes and the candidate left no side effect."""
        return self.gradient_ok(rtol, atol) and not self.side_effects

    def headline(self, rtol: float | None = None, atol: float | None = None) -> str:
        """One line: "gradient PASS against the oracle, side effects none" or "gradient FAIL against
        the reference 'lazy', side effects 3"."""
        if self.reference_disagrees:
            return (
                f"cannot verify on this model: {self.reference} disagrees with finite differences, "
                f"side effects {len(self.side_effects) or 'none'}"
            )
        gradient = "PASS" if self.gradient_ok(rtol, atol) else "FAIL"
        return (
            f"gradient {gradient} against {self.reference}, side effects {len(self.side_effects) or 'none'}"
        )

    def summary(self, rtol: float | None = None, atol: float | None = None) -> str:
        """The headline, the diagnosis, the per-task lines, the mean's table and the side effects."""
        rtol, atol = self._tolerances(rtol, atol)
        lines = [f"{self.headline(rtol, atol)}  (rtol={rtol:g}, atol={atol:g})"]
        if self.diagnosis is not None:
            scope = "" if self.diagnosed_task is None else f" of task {self.diagnosed_task} (some tasks pass)"
            lines.append(str(self.diagnosis).replace("diagnosis", f"diagnosis{scope}", 1))
        lines.append(f"reference check: {self.reference_note}")
        if self.reference_disagrees and self.reference_check is not None:
            lines.append(str(self.reference_check))
        lines += [f"note: {n}" for n in self.notes]
        for i, r in enumerate(self.tasks):
            verdict = "ok" if r.ok(rtol, atol) else "FAIL"
            lines.append(
                f"task {i}: cosine {r.overall.cosine:.7f}, rel.err {r.overall.rel_error:.2e}  {verdict}"
            )
        lines.append(f"mean over tasks ({'ok' if self.overall.ok(rtol, atol) else 'FAIL'}):")
        lines.append(self.overall.table(rtol, atol))
        lines += [
            f"side effect on {'the inner rates' if s.change.kind.startswith('rate') else 'the model'}: {s}"
            for s in self.side_effects
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def assert_close(
        self, rtol: float | None = None, atol: float | None = None, *, allow_side_effects: bool = False
    ) -> None:
        """Raise an AssertionError carrying :meth:`summary` unless the gradient passes and, unless
        ``allow_side_effects``, the candidate left no side effect."""
        if not (self.gradient_ok(rtol, atol) if allow_side_effects else self.ok(rtol, atol)):
            rtol, atol = self._tolerances(rtol, atol)
            if self.reference_disagrees:
                raise AssertionError(
                    f"cannot verify the candidate on this model: {self.reference} disagrees with "
                    f"finite differences\n{self.summary(rtol, atol)}"
                )
            raise AssertionError(
                f"candidate disagrees with {self.reference} (rtol={rtol:g}, atol={atol:g})\n"
                f"{self.summary(rtol, atol)}"
            )


def _mean(grads: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The mean over tasks of the entries every task has with one shape (the others are then
    reported missing by :func:`compare`)."""
    first = grads[0]
    return {
        k: torch.stack([g[k] for g in grads]).mean(0)
        for k in first
        if all(isinstance(g.get(k), Tensor) and g[k].shape == first[k].shape for g in grads)
    }


def _module_names(model: nn.Module) -> dict[str, str]:
    """Each name a module is reachable under (as :class:`Change` names modes) -> its first name."""
    first: dict[int, str] = {}
    out = {}
    for prefix, m in model.named_modules(remove_duplicate=False):
        name = prefix or type(m).__name__
        out[name] = first.setdefault(id(m), name)
    return out


def _side_effects(model: nn.Module, calls: list[list[Change]]) -> list[SideEffect]:
    """Each change once — modes of a shared module under one name — aggregated over the calls."""
    modules = _module_names(model)
    seen: dict[tuple[str, str, str], list[Change]] = {}
    for changes in calls:
        once: dict[tuple[str, str, str], Change] = {}
        for c in changes:
            name = modules.get(c.name, c.name) if c.kind == "mode" else c.name
            once.setdefault((c.kind, name, c.what), Change(c.kind, name, c.what, c.max_abs))
        for key, c in once.items():
            seen.setdefault(key, []).append(c)
    out = []
    for changes in seen.values():
        sizes = [c.max_abs for c in changes if c.max_abs is not None]
        first = changes[0]
        largest = Change(first.kind, first.name, first.what, max(sizes) if sizes else None)
        out.append(SideEffect(largest, len(changes), len(calls)))
    return out


class _Rates:
    """The learned rates that are not parameters of the model (key → tensor), held for one
    candidate call: ``.grad`` cleared before it, the value, ``.grad`` and ``requires_grad``
    restored after it, and what the call changed reported like a parameter's change."""

    def __init__(self, rates: Mapping[str, Tensor]) -> None:
        unique = {id(t): (k, t) for k, t in reversed(list(rates.items()))}  # each tensor once
        self.rates = rates
        self.held = [
            (k, t, t.detach().clone(), t.grad, t.requires_grad) for k, t in unique.values() if t.is_leaf
        ]
        for _, t, _, _, _ in self.held:
            t.grad = None

    def gradients(self) -> dict[str, Tensor]:
        """The rates' ``.grad`` as the call left it (zero where it wrote none)."""
        return {
            k: torch.zeros_like(t) if t.grad is None else t.grad.detach().clone()
            for k, t in self.rates.items()
        }

    def changes(self) -> list[Change]:
        out = []
        for k, t, value, _, requires_grad in self.held:
            if not torch.equal(t.detach(), value):
                out.append(Change("rate", k, "modified", (t.detach() - value).abs().max().item()))
            if t.grad is not None:
                out.append(Change("rate gradient", f"{k}.grad", "changed"))
            if t.requires_grad != requires_grad:
                out.append(Change("rate", f"{k}.requires_grad", "changed"))
        return out

    def restore(self) -> None:
        with torch.no_grad():
            for _, t, value, grad, requires_grad in self.held:
                if not torch.equal(t.detach(), value):
                    t.copy_(value)
                t.requires_grad_(requires_grad)
                t.grad = grad


def _call(
    candidate_fn: Candidate,
    model: nn.Module,
    arg: Any,
    loop: InnerLoop,
    rates: Mapping[str, Tensor],
    rate_keys: tuple[str, ...] = (),
) -> tuple[Mapping[str, Tensor], list[Change]]:
    """One candidate call on a model with cleared gradients: its gradient and its changes (undone).
    ``rates``: the learned rates outside the model, whose ``.grad`` is read like ``p.grad``;
    ``rate_keys``: every learned rate's key (a None there is a missing gradient)."""
    theta = trainable(model)
    for p in model.parameters():
        p.grad = None
    snapshot = Snapshot(model)
    held = _Rates(rates)
    try:
        with common_random_numbers(model):  # the reference's random numbers (module docstring)
            returned = candidate_fn(model, arg, loop.steps, loop.given_lr)
        if isinstance(returned, Mapping):  # None for a learned rate (autograd's unused): no gradient
            returned = {k: g for k, g in returned.items() if g is not None or k not in rate_keys}
        out: Mapping[str, Tensor] = (
            returned
            if returned is not None
            else {
                **{
                    n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                    for n, p in theta.items()
                },
                **held.gradients(),
            }
        )
        changes = snapshot.changes() + held.changes()
    finally:
        try:
            snapshot.restore()
        finally:
            held.restore()
    if returned is None:  # writing p.grad is how such a candidate answers
        changes = [c for c in changes if c.kind not in ("gradient", "rate gradient")]
    return out, changes


def _one_task_batches(task_or_tasks: Tasks, tasks: list[TaskLike]) -> list[Any]:
    """Each task as a meta-batch of one, in the form the candidate was given the meta-batch."""
    if isinstance(task_or_tasks, TaskBatch):
        return [Task.stack([t]) for t in task_or_tasks]
    return [[t] for t in tasks]


@dataclass(frozen=True)
class _Run:
    """The candidate's answers: per task, for the whole meta-batch, and every call's changes."""

    per_task: list[Mapping[str, Tensor]]
    mean: Mapping[str, Tensor]
    changes: list[list[Change]]


def _references(reference: Reference) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """The reference on every task alone, and their mean."""
    per_task = []
    for t in reference.tasks:
        with common_random_numbers(reference.model):
            per_task.append(reference.on(t)())
    return per_task, _mean(per_task)


def _check_reference(
    source: Reference, mean: Mapping[str, Tensor], check: bool | None
) -> tuple[finite_differences.DirectionalReport | None, str]:
    """The reference's mean against directional finite differences, and what that says."""
    if check is None:
        check = source.is_oracle and not source.loop.first_order
        if not check:
            why = "first_order=True is not the derivative of F" if source.is_oracle else "a user's reference"
            return None, f"not checked against finite differences ({why}; check_reference=True to check)"
    if not check:
        return None, "not checked against finite differences (check_reference=False)"
    if source.loop.first_order:
        raise ValueError("check_reference=True: a first-order reference is not the derivative of F")
    loop = source.loop
    start = time.perf_counter()
    try:
        report = finite_differences.check(
            mean,
            source.model,
            source.task_or_tasks,
            loop.steps,
            loop.given_lr,
            adapt=loop.adapt,
            leap=loop.leap,
            inner_optimizer=loop.inner_optimizer,
            per_step_lr=loop.per_step_lr,
            query_weights=loop.query_weights,
            step_kwarg=loop.step_kwarg,
            directions=REFERENCE_DIRECTIONS,
        )
    except (TypeError, ValueError) as error:  # e.g. closure tasks on a float32 model
        return None, f"could not be checked against finite differences: {error}"
    n = len(report.directions)
    evaluations = 1 + 6 * sum(len(d.tried) for d in report.directions)
    cost = f" ({evaluations} evaluations of F, {time.perf_counter() - start:.2g} s)"
    if report.failed:
        return report, (
            f"{source.name} DISAGREES with finite differences along {len(report.failed)} of {n} "
            "directions: a derivative defect in torch (or a model whose autograd gradient is a "
            "convention, see the notes) — the candidate cannot be judged against it on this model" + cost
        )
    if not report.ok():
        return report, f"inconclusive: finite differences are not smooth along enough of {n} directions{cost}"
    return report, f"{source.name} agrees with finite differences along {n} of {n} directions{cost}"


def _notes(model: nn.Module, meta_batch: bool, loop: InnerLoop) -> tuple[str, ...]:
    """What the model's kind (gradcheck.models) and hooked learned rates mean for this verdict."""
    out = [f"autograd convention: {c}" for c in conventions(model)]
    if isinstance(loop.inner_lr, Rates):
        hooked_rates = [k or "inner_lr" for k, t in loop.inner_lr.tensors.items() if t._backward_hooks]
        if hooked_rates:
            out.append(
                f"autograd convention: learned rates {hooked_rates} have a tensor hook (register_hook) — "
                "a hook that changes the gradient it is given makes the oracle's rate gradient differ "
                "from the derivative finite differences measure"
            )
    hooked = hooks(model)
    if hooked:
        out.append(
            "hooks run by the oracle's functional_call unroll (higher's copy would drop them): "
            + "; ".join(hooked)
        )
    random = random_modules(model)
    if random:
        out.append(
            "the model draws random numbers (" + ", ".join(random) + "): the reference and every "
            "candidate call start from one seeded generator state; a candidate that draws them in "
            "another order than support forward at each step, then query, is not compared like with like"
            + (
                "; with meta_batch=True the whole-batch call draws them across tasks in one sequence, "
                "which per-task references cannot match"
                if meta_batch
                else ""
            )
        )
    return tuple(out)


def _candidate_calls(candidate_fn: Candidate, source: Reference, meta_batch: bool) -> _Run:
    """The candidate on every task (as a one-task meta-batch with ``meta_batch``) and, with
    ``meta_batch``, once on the whole meta-batch; the model restored after every call."""
    model, task_or_tasks, loop = source.model, source.task_or_tasks, source.loop
    tasks = as_tasks(task_or_tasks)
    outer = Snapshot(model)
    try:
        arguments: list[Any] = _one_task_batches(task_or_tasks, tasks) if meta_batch else list(tasks)
        results = [_call(candidate_fn, model, a, loop, source.external, source.rate_keys) for a in arguments]
        per_task = [g for g, _ in results]
        if meta_batch:
            whole = task_or_tasks if isinstance(task_or_tasks, (TaskBatch, Sequence)) else tasks
            results.append(_call(candidate_fn, model, whole, loop, source.external, source.rate_keys))
            mean = results[-1][0]
        else:
            mean = _mean(per_task)
    finally:
        outer.restore()
    return _Run(per_task, mean, [changes for _, changes in results])


def _diagnosis(
    reference: Reference,
    run: _Run,
    truths: tuple[list[dict[str, Tensor]], dict[str, Tensor]],
    reports: list[Report],
    rtol: float,
    atol: float,
) -> tuple[Diagnosis, int | None]:
    """The diagnosis of the mean over tasks — or, when some tasks pass and others fail, of the
    first failing task alone — and that task's index (None for the mean)."""
    per_task, mean = truths
    failing = [i for i, r in enumerate(reports) if not r.ok(rtol, atol)]
    if failing and len(failing) < len(reports):  # a bug some tasks escape: diagnose one alone
        task = failing[0]
        alone = reference.on(reference.tasks[task])
        return _diagnose(run.per_task[task], alone, rtol=rtol, atol=atol, truth=per_task[task]), task
    return _diagnose(run.mean, reference, rtol=rtol, atol=atol, truth=mean), None


@torch.enable_grad()  # the candidate differentiates, whatever the caller's grad mode
def validate(
    candidate_fn: Candidate,
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
    meta_batch: bool = False,
    rtol: float | None = None,
    atol: float = ATOL,
    diagnosis: bool = True,
    reference: ReferenceFunction | None = None,
    check_reference: bool | None = None,
) -> Validation:
    """Compare ``candidate_fn`` with the reference — :func:`gradcheck.oracle.meta_gradient`
    unless ``reference`` is given (module docstring) — on every task.

    ``rtol`` defaults to the candidate's precision (1e-9 for float64) and ``atol`` to 0
    (:mod:`gradcheck.tolerances`); ``diagnosis=False`` skips the diagnosis (the reference calls
    it makes when the gradient fails). ``check_reference`` (module docstring): None checks the
    oracle against finite differences first, True any reference, False none. ``inner_lr`` may
    hold learned rates (a tensor or a mapping; ``per_step_lr`` for a step dimension),
    ``query_weights`` makes the objective the multi-step loss and ``step_kwarg`` passes the step
    index to the model (:class:`gradcheck.settings.InnerLoop`); the candidate is called with
    ``inner_lr`` as given (module docstring). The model, and the rate tensors, are left exactly
    as they were, whatever the candidate does.
    """
    refuse_unsupported(model, as_tasks(task_or_tasks), by="validate")
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
    source = Reference(reference, model, task_or_tasks, loop)
    truths = _references(source)
    checked, note = _check_reference(source, truths[1], check_reference)
    run = _candidate_calls(candidate_fn, source, meta_batch)
    reports = [compare(c, r, rates=source.rate_keys) for c, r in zip(run.per_task, truths[0])]
    overall = compare(run.mean, truths[1], rates=source.rate_keys)
    rtol = default_rtol(run.mean) if rtol is None else rtol
    wrong_reference = checked is not None and bool(checked.failed)
    diagnose_now = diagnosis and not wrong_reference
    found, task = _diagnosis(source, run, truths, reports, rtol, atol) if diagnose_now else (None, None)
    effects = _side_effects(model, run.changes)
    notes = _notes(model, meta_batch, loop)
    return Validation(reports, overall, effects, found, rtol, atol, task, source.name, checked, note, notes)
