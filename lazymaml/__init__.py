"""lazymaml — the lazy (teacher–student leap) meta-gradient of Jamal, Wang & Gong (ICCV 2021).

* :func:`meta_gradient` — K graph-free student steps, one Hessian-vector product at θ;
* :func:`straight_through` — the same gradient as a graph (ψ with value φ_T, one-step Jacobian);
* :class:`LazyMAML` — meta-training: ``meta_backward(tasks)`` fills ``p.grad``;
* :func:`deviation_bound` — the proven bound on ‖g_exact − g_lazy‖.
"""

from .bound import BoundTerms, bound_terms, deviation_bound
from .derivatives import hvp, query_gradient
from .lazy import meta_gradient, step_size
from .leap import straight_through
from .learner import LazyMAML

__all__ = [
    "BoundTerms",
    "LazyMAML",
    "bound_terms",
    "deviation_bound",
    "hvp",
    "meta_gradient",
    "query_gradient",
    "step_size",
    "straight_through",
]
