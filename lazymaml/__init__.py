"""lazymaml — the lazy (teacher–student leap) meta-gradient of Jamal, Wang & Gong (ICCV 2021).

* :func:`meta_gradient` — K graph-free student steps, one Hessian-vector product at θ;
* :func:`straight_through` — the same gradient as a graph (ψ with value φ_T, one-step Jacobian);
* :class:`LazyMAML` — meta-training: ``meta_backward(tasks)`` fills ``p.grad``;
* :func:`deviation_bound` — the proven bound on ‖g_exact − g_lazy‖;
* :mod:`lazymaml.estimators` — first-order MAML, Reptile, truncated backprop, iMAML beside it.

Every entry point takes ``(model, task_or_tasks, steps, inner_lr, *, …)``; tasks, settings and
the graph-free student come from :mod:`gradcheck` (imports flow lazymaml → gradcheck only).
"""

from . import estimators
from .bound import BoundTerms, bound_terms, deviation_bound
from .derivatives import hvp, query_gradient
from .graph import straight_through
from .lazy import JacobianStep, meta_gradient, resolve_jacobian_step
from .learner import LazyMAML

__all__ = [
    "BoundTerms",
    "JacobianStep",
    "LazyMAML",
    "bound_terms",
    "deviation_bound",
    "estimators",
    "hvp",
    "meta_gradient",
    "query_gradient",
    "resolve_jacobian_step",
    "straight_through",
]
