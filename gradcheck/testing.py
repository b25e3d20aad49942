"""Meta-gradient checks for your own test suite (needs no hypothesis).

* :class:`Problem` — a model, its tasks and the inner-loop settings, in one frozen value (what
  :func:`gradcheck.strategies.problems` draws; build one by hand for an example test);
* :func:`assert_meta_gradient` — :func:`gradcheck.validate` on a problem, raising an
  AssertionError that carries the whole validation summary (verdict, diagnosis, per-parameter
  table, side effects) when the candidate is wrong.

The candidate has the :func:`gradcheck.validate` signature ``(model, task, steps, inner_lr)``;
a problem's ``adapt``, ``leap``, ``per_step_lr``, ``query_weights`` and ``step_kwarg``, where they
differ from their defaults (``None``, ``1.0``, ``False``, ``None``, ``None``), are passed to it as
keywords of the same names, so a plain MAML is checked on plain problems and an implementation
that takes ``adapt=``/``leap=``/… on the others. ``inner_lr`` is passed as the problem holds it: a
float, or learned rates (a tensor or {name: tensor}, :mod:`gradcheck.rates`), whose
meta-gradients the candidate returns under the oracle's keys (``"inner_lr"``,
``"inner_lr.<name>"``, or a rate parameter's own name).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .diagnose import ReferenceFunction
from .parameters import Adapt
from .settings import LearningRate
from .task import Tasks, as_tasks
from .validate import Candidate, Validation, validate

__all__ = ["Problem", "assert_meta_gradient"]


@dataclass(frozen=True, eq=False)
class Problem:
    """A meta-gradient problem: ``model``, ``tasks`` (one task, a sequence or ``Task.stack``),
    ``steps`` K, ``inner_lr`` α (a float, or learned rates: a tensor or {name: tensor}),
    ``adapt`` (None, "head", "body", names, a predicate), ``leap`` γ, and the settings of
    :class:`gradcheck.settings.InnerLoop` for learned rates and MAML++: ``per_step_lr``,
    ``query_weights``, ``step_kwarg``. ``label`` says how it was made (shown in its repr, so in
    hypothesis's report)."""

    model: nn.Module
    tasks: Tasks
    steps: int
    inner_lr: LearningRate
    adapt: Adapt = None
    leap: float = 1.0
    label: str = ""
    per_step_lr: bool = False
    query_weights: tuple[float, ...] | None = None
    step_kwarg: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        as_tasks(self.tasks)  # a TypeError / ValueError now rather than inside the check

    @property
    def options(self) -> dict[str, Any]:
        """The settings that differ from their defaults, as keyword arguments (``adapt``, ``leap``,
        ``per_step_lr``, ``query_weights``, ``step_kwarg``)."""
        out: dict[str, Any] = {}
        if self.adapt is not None:
            out["adapt"] = self.adapt
        if self.leap != 1.0:
            out["leap"] = self.leap
        if self.per_step_lr:
            out["per_step_lr"] = True
        if self.query_weights is not None:
            out["query_weights"] = self.query_weights
        if self.step_kwarg is not None:
            out["step_kwarg"] = self.step_kwarg
        return out

    @property
    def rates(self) -> str:
        """How ``inner_lr`` is given: its value for a float; for learned rates their kind and shapes."""
        lr = self.inner_lr
        if isinstance(lr, Tensor):
            return f"a learned rate of shape {tuple(lr.shape)}"
        if isinstance(lr, Mapping):
            shapes = ", ".join(f"{n}: {tuple(t.shape)}" for n, t in lr.items())
            return f"learned rates {{{shapes}}}"
        return repr(lr)

    def __repr__(self) -> str:
        what = self.label or type(self.model).__name__
        n = len(as_tasks(self.tasks))
        more = "".join(f", {k}={v!r}" for k, v in self.options.items() if k not in ("adapt", "leap"))
        return (
            f"Problem({what}, {n} task{'s' * (n != 1)}, steps={self.steps}, inner_lr={self.rates}, "
            f"adapt={self.adapt!r}, leap={self.leap!r}{more})"
        )


def assert_meta_gradient(
    candidate_fn: Candidate,
    problem: Problem,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    allow_side_effects: bool = False,
    meta_batch: bool = False,
    diagnosis: bool = True,
    reference: ReferenceFunction | None = None,
) -> Validation:
    """Check ``candidate_fn`` on ``problem`` against the exact oracle — or ``reference``, any
    implementation with the calling convention (e.g. ``lazymaml.estimators.as_function("lazy")``
    for a lazy implementation) — and return the validation.

    Raises an AssertionError carrying :meth:`gradcheck.Validation.summary` unless the gradient
    agrees (``rtol`` defaults to the candidate's precision: 1e-9 for float64) and, unless
    ``allow_side_effects``, the candidate left the model as it found it. ``meta_batch=True``
    hands the candidate whole meta-batches (see :func:`gradcheck.validate`); ``diagnosis=False``
    skips the diagnosis of a wrong gradient.
    """
    if not isinstance(problem, Problem):
        raise TypeError(
            f"problem must be a gradcheck.testing.Problem, got {type(problem).__name__}: "
            "build one with Problem(model, tasks, steps, inner_lr, adapt=..., leap=...)"
        )
    options = problem.options
    candidate = functools.partial(candidate_fn, **options) if options else candidate_fn
    result = validate(
        candidate,
        problem.model,
        problem.tasks,
        problem.steps,
        problem.inner_lr,
        adapt=problem.adapt,
        leap=problem.leap,
        per_step_lr=problem.per_step_lr,
        query_weights=problem.query_weights,
        step_kwarg=problem.step_kwarg,
        meta_batch=meta_batch,
        rtol=rtol,
        atol=atol,
        diagnosis=diagnosis,
        reference=reference,
    )
    result.assert_close(allow_side_effects=allow_side_effects)
    return result
