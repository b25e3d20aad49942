"""gradcheck — is this meta-gradient right?

* :mod:`gradcheck.oracle` — the exact K-step MAML meta-gradient (second order, via ``higher``);
* :mod:`gradcheck.finite_differences` — float64 central differences of the meta-objective;
* :func:`compare` / :func:`validate` — per-parameter reports of how far a candidate is.
"""

from . import finite_differences, oracle
from .compare import Report, compare
from .task import Task
from .validate import Validation, validate

__all__ = ["Report", "Task", "Validation", "compare", "finite_differences", "oracle", "validate"]
