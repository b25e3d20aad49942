"""gradcheck — is this meta-gradient right?

* :mod:`gradcheck.oracle` — the exact K-step MAML meta-gradient (second order, via ``higher``);
* :mod:`gradcheck.finite_differences` — float64 central differences of the meta-objective;
* :func:`compare` / :func:`validate` — per-parameter reports of how far a candidate is from a
  reference (the oracle by default), what it did to the model, and :func:`diagnose` — what it
  computes instead;
* :mod:`gradcheck.tolerances` — the one tolerance table, by dtype, all of them default to.

The foundation every estimator here and in :mod:`lazymaml` is built on is public too:
:mod:`gradcheck.task` (tasks), :mod:`gradcheck.settings` (K, α, γ, checked once),
:mod:`gradcheck.parameters` (θ and the adapted set), :mod:`gradcheck.student` (the graph-free
inner loop) and :mod:`gradcheck.state` (the model is left as it was).
"""

from . import finite_differences, oracle, testing, tolerances
from .compare import Report, compare
from .diagnose import Diagnosis, diagnose
from .task import ClosureTask, Task, TaskBatch, TaskLike
from .validate import Validation, validate

__all__ = [
    "ClosureTask",
    "Diagnosis",
    "Report",
    "Task",
    "TaskBatch",
    "TaskLike",
    "Validation",
    "compare",
    "diagnose",
    "finite_differences",
    "oracle",
    "testing",
    "tolerances",
    "validate",
]
