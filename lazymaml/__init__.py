"""lazymaml — the lazy (teacher–student leap) meta-gradient of Jamal, Wang & Gong (ICCV 2021).

* :func:`meta_gradient` — K graph-free student steps, one Hessian-vector product at θ;
* :func:`straight_through` — the same gradient as a graph (ψ with value φ_T, one-step Jacobian);
* :class:`MetaLearner` — meta-training with any estimator (lazy, MAML, first-order, Reptile, …),
  meta-batches batched with ``torch.func.vmap``, optionally over ``torch.distributed`` ranks:
  ``meta_backward(tasks)`` fills ``p.grad``; :class:`LazyMAML` is its lazy preset;
* :func:`deviation_bound` — the proven bound on ‖g_exact − g_lazy‖;
* :mod:`lazymaml.estimators` — first-order MAML, Reptile, truncated backprop, iMAML beside it.

Every entry point takes ``(model, task_or_tasks, steps, inner_lr, *, …)``; tasks, settings and
the graph-free student come from :mod:`gradcheck` (imports flow lazymaml → gradcheck only).
"""

from . import estimators
from .bound import BoundTerms, bound_terms, deviation_bound
from .derivatives import hvp, query_gradient
from .graph import straight_through
from .lazy import JacobianStep, meta_gradient
from .learner import LazyMAML, MetaLearner, SequentialFallback

__all__ = [
    "BoundTerms",
    "JacobianStep",
    "LazyMAML",
    "MetaLearner",
    "SequentialFallback",
    "bound_terms",
    "deviation_bound",
    "estimators",
    "hvp",
    "meta_gradient",
    "query_gradient",
    "straight_through",
]
