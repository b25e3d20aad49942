"""Every meta-gradient estimator, defined once, in one registry.

An :class:`Estimator` is one per-task function ``per_task(objective, theta, untrained) ->
(gradient, L_Q(φ_T), [L_S(φ_k)])`` written with :class:`~lazymaml.derivatives.Objective` (one
task's losses and derivatives, by autograd or by ``torch.func``), plus what it supports: whether
it may be batched, which inner optimizers it accepts, which settings it reads. The sequential
path (:func:`run`, and :class:`lazymaml.MetaLearner` task by task) calls ``per_task`` once per
task; the batched path (:mod:`lazymaml.batched`) is ``torch.func.vmap`` of the very same
function. With v = ∇L_Q(φ_T), φ_T = θ + γ(φ_K − θ) and T_k = I − α E_A ∇²L_S(φ_k):

================  =========================================================  =================
name              g                                                           reads
================  =========================================================  =================
``maml``          ∇_θ L_Q(φ_T(θ)) through all K steps                          —
``truncated``     [(1 − γ)I + γ T_{K−T}ᵀ…T_{K−1}ᵀ] v (last T steps)            ``horizon``
``first_order``   v                                                           —
``lazy``          v − η ∇_θ⟨E_A∇L_S(θ), v⟩                                     ``jacobian_step``
``lazy_horizon``  the same with η = γKα                                       —
``reptile``       (θ − φ_K)/(Kα)                                              —
``imaml``         g_A = (I + H_AA/λ)⁻¹ v_A, g_B = v_B − H_BA g_A/λ at the      ``lam``,
                  proximal φ_K; (1 − γ) v + γ g                               ``cg_iterations``,
                                                                              ``cg_tol``
``maml_hvp``      exact MAML as [(1 − γ)I + γ T_0ᵀ…T_{K−1}ᵀ] v: HVPs at the    —
                  stored student points, T_{K−1}ᵀ first (every point kept)
``maml_hvp_sqrt`` the same, every ⌈√K⌉-th point kept, the rest recomputed      —
``truncated_hvp`` ``truncated``'s gradient by the same HVPs (last T steps)     ``horizon``
================  =========================================================  =================

"maml", "first_order", "lazy" and "lazy_horizon" also read learned inner rates, ``query_weights``
and ``step_kwarg`` (:data:`LEARNED`; the others refuse them by name): ``theta`` then holds the
learned rates that are not parameters too, and each gets its meta-gradient (exact for "maml";
−Λ_{k+1} ⊙ g_k with the inner gradients held constant for "first_order" and "lazy").

Each also has a function with the project's calling convention (the lazy one is
:func:`lazymaml.meta_gradient`) — ``(model, task_or_tasks,
steps, inner_lr, *, adapt, leap, inner_optimizer, …)`` — that returns ``{name: gradient}`` for
every trainable parameter (for several tasks, the mean) and leaves the model as it was.
:func:`register` adds an estimator; it then runs everywhere an estimator is named: here,
:class:`~lazymaml.MetaLearner` (sequential and batched), the report, and as a validation
reference. The maths, derived: ``docs/``.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from torch import Tensor, nn

from gradcheck.models import refuse_unsupported
from gradcheck.parameters import Adapt, dense, flat, task_mean, unflat
from gradcheck.rates import Schedule
from gradcheck.settings import InnerLoop, InnerOptimizer, LearningRate
from gradcheck.state import preserved
from gradcheck.student import Student, apply_leap
from gradcheck.task import TaskLike, Tasks, as_tasks

from .derivatives import AutogradObjective, Objective, Params

__all__ = [
    "LEARNED",
    "LEARNED_SETTINGS",
    "REGISTRY",
    "ConvergenceWarning",
    "Estimator",
    "PerTask",
    "Result",
    "as_function",
    "first_order",
    "get",
    "imaml",
    "lazy_horizon",
    "maml",
    "maml_hvp",
    "maml_hvp_sqrt",
    "register",
    "reptile",
    "run",
    "sqrt_interval",
    "stored_point",
    "truncated",
    "truncated_hvp",
]

Result = tuple[Params, Tensor, list[Tensor]]
"""One task's estimate: ``{name: gradient}`` for every trainable parameter, L_Q(φ_T) and the K
support losses L_S(φ_k) (what the batched path checks for finiteness)."""

PerTask = Callable[[Objective, Params, Params], Result]
"""``per_task(objective, theta, untrained)``: one task's :data:`Result`."""

ANY = None  # Estimator.optimizers: any inner optimizer (nothing is differentiated through it)


class ConvergenceWarning(RuntimeWarning):
    """An iterative solve (iMAML's conjugate gradient) stopped before reaching its tolerance."""


@dataclass(frozen=True)
class Estimator:
    """One registry entry: the per-task function and what it supports.

    ``optimizers``: the inner optimizers it accepts (``None``: any, also a ``torch.optim``
    factory — it never differentiates the student); ``not_batched``: why ``vmap`` of ``per_task``
    is not allowed, or None where it is (then only with a pure update, :mod:`gradcheck.optim`);
    ``proximal``:
    whether its student is iMAML's proximal one (``lam``); ``reads``:
    the settings beyond K, α, γ, ``adapt`` and ``inner_optimizer`` that it reads — a learner
    refuses any other one it is given; ``configure``: the settings it runs with when those are
    derived from others (``lazy_horizon``: η = γKα); ``outside``: its gradient is
    ``objective.differentiate``'s with respect to θ, returned as it is — so the batched path may
    take it by one autograd backward after the ``vmap`` (:mod:`lazymaml.batched`'s outside
    layout) where it vouches for that.
    """

    name: str
    per_task: PerTask
    summary: str
    optimizers: tuple[str, ...] | None = ANY
    not_batched: str | None = None
    reads: frozenset[str] = frozenset()
    configure: Callable[[InnerLoop], InnerLoop] | None = None
    proximal: bool = False  # the student minimises L_S(φ) + (λ/2)‖φ_A − θ_A‖² (iMAML)
    outside: bool = False  # per_task returns differentiate's gradient of θ as it is (see below)

    def settings(self, loop: InnerLoop) -> InnerLoop:
        """``loop`` as this estimator runs it, refused where it cannot (an optimizer it does not
        take; learned rates, ``query_weights`` or ``step_kwarg`` where it does not read them)."""
        for setting in loop.extended:
            if setting not in self.reads:
                takers = sorted(e.name for e in REGISTRY.values() if setting in e.reads)
                what = LEARNED_SETTINGS[setting]
                raise ValueError(
                    f"estimator {self.name!r} does not take {what}; the estimators that do: {takers}"
                )
        if self.optimizers is not ANY:
            loop.require(*self.optimizers, by=f"estimator {self.name!r}")
        return self.configure(loop) if self.configure else loop


REGISTRY: dict[str, Estimator] = {}
"""Every estimator by name."""

LEARNED_SETTINGS = {
    "inner_lr": "learned inner rates (inner_lr as a tensor or a mapping, per_step_lr)",
    "query_weights": "query_weights (the multi-step loss)",
    "step_kwarg": "step_kwarg (the step index passed to the model)",
}
"""The settings an entry reads only if ``reads`` names them (``"inner_lr"`` there means learned
rates: every entry takes one float α)."""
LEARNED = frozenset({*LEARNED_SETTINGS, "per_step_lr"})
"""What an entry that takes learned rates, a multi-step loss and a step index reads."""


def register(estimator: Estimator) -> Estimator:
    """Add ``estimator`` to :data:`REGISTRY` (refusing a name that is taken); returns it."""
    if estimator.name in REGISTRY:
        raise ValueError(f"an estimator named {estimator.name!r} is registered already")
    REGISTRY[estimator.name] = estimator
    return estimator


def get(name: str | Estimator) -> Estimator:
    """The registry entry ``name`` (an :class:`Estimator` is returned as it is)."""
    if isinstance(name, Estimator):
        return name
    if name not in REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def run(estimator: str | Estimator, model: nn.Module, task_or_tasks: Tasks, loop: InnerLoop) -> Params:
    """``estimator``'s meta-gradient: the mean over the tasks, sequentially, the model read once
    (adapted set ``loop.adapt``) and left exactly as it was, also when this raises."""
    entry = get(estimator)
    loop = entry.settings(loop)
    tasks = as_tasks(task_or_tasks)
    refuse_unsupported(model, tasks, by=f"estimator {entry.name!r}")
    student = Student.read(model, loop=loop)
    with preserved(model):
        return task_mean([per_task(entry, student, task, loop)[0] for task in tasks])


@torch.no_grad()
def per_task(entry: Estimator, student: Student, task: TaskLike, loop: InnerLoop) -> Result:
    """``entry`` on one task, losses checked: the sequential path (``loop`` as ``entry.settings``
    returned it). The model's tensors are never written (``student`` holds copies). ``theta`` is
    the student's coordinates: θ, then the learned rates that are not parameters."""
    objective = AutogradObjective(student, task, loop, checked=True)
    gradient, loss, losses = entry.per_task(objective, student.coordinates, student.fresh())
    return gradient, loss.detach(), losses


# --- the estimators ------------------------------------------------------------------------


def _lazy_step(loop: InnerLoop, schedule: Schedule | None, name: str, j: int) -> float | Tensor:
    """η_j[name], the lazy step of the point φ_j seen as one step from θ: a float η itself;
    "single" γα_0 (the first step's rate); "horizon" γ(α_0 + … + α_{j−1}) (γjα for one α);
    0 at j = 0 (no step)."""
    step = loop.jacobian_step
    if j == 0:
        return 0.0
    if not isinstance(step, str):
        return step
    ks = range(j) if step == "horizon" else range(1)
    if schedule is None:
        return loop.leap * loop.lr("the lazy step η") * len(ks)
    total = schedule.rate(name, 0)
    for k in ks[1:]:
        total = total + schedule.rate(name, k)
    return loop.leap * total


def _lazy_task(f: Objective, theta: Params, untrained: Params) -> Result:
    """g = V − ∇_θ⟨E_A∇L_S(θ), Σ_j w_j η_j ⊙ v_j⟩ with v_j = ∇L_Q(φ_j) at the scored points
    (φ_T alone by default: g = v − η H E_A v), V = Σ_j w_j v_j; a learned rate gets
    ∂F/∂α_k ≈ −Λ_{k+1} ⊙ g_k, Λ_{k+1} = Σ_{j>k} w_j v_j (γv at φ_T), the trajectory's gradients
    g_k held constant (first-order MAML's rate gradient). η = 0: first-order MAML."""
    loop = f.loop
    assert loop is not None
    steps, scored, schedule = loop.steps, loop.scored(), f.student.schedule
    start = {n: theta[n] for n in f.student.theta}
    learned = schedule is not None and bool(schedule.keys)
    queries: dict[int, tuple[Params, Tensor]] = {}
    taken: list[Params] = []  # g_k, for the rates' gradient

    def visit(k: int, phi: Params, g: Params) -> None:
        if learned:
            taken.append(g)
        if k + 1 in scored and k + 1 != steps:
            queries[k + 1] = f.query_gradient(phi, untrained, k + 1)

    phi, losses = f.descend(start, untrained, steps, visit=visit)
    queries[steps] = f.query_gradient(apply_leap(start, phi, loop.leap), untrained, steps)
    (first, w0), *rest = sorted(scored.items())
    v, loss = {n: w0 * t for n, t in queries[first][0].items()}, w0 * queries[first][1]
    for j, w in rest:
        v = {n: v[n] + w * queries[j][0][n] for n in v}
        loss = loss + w * queries[j][1]
    g = v
    if not (loop.jacobian_step == 0 or steps == 0):
        along = {n: _weighted(loop, schedule, n, scored, queries) for n in f.adapted}
        h = f.hvp(start, f.student.fresh(), along)
        g = {n: v[n] - h[n] for n in v}
    if learned:
        assert schedule is not None
        rates = _rate_gradient(schedule, loop, scored, {j: q[0] for j, q in queries.items()}, taken)
        g = {**g, **{key: g[key] + r if key in g else r for key, r in rates.items()}}
    return {n: g[n] for n in theta}, loss, losses


def _weighted(
    loop: InnerLoop,
    schedule: Schedule | None,
    name: str,
    scored: Mapping[int, float],
    queries: Mapping[int, tuple[Params, Tensor]],
) -> Tensor:
    """Σ_j w_j η_j[name] ⊙ v_j[name]: what one HVP at θ takes for every scored point at once."""
    total: Tensor | None = None
    for j, w in scored.items():
        term = w * _lazy_step(loop, schedule, name, j) * queries[j][0][name]
        total = term if total is None else total + term
    assert total is not None
    return total


@torch.enable_grad()
def _rate_gradient(
    schedule: Schedule,
    loop: InnerLoop,
    scored: Mapping[int, float],
    queries: Mapping[int, Params],
    taken: list[Params],
) -> Params:
    """{key: ∂F/∂rate} with φ_{k+1} = φ_k − α_k ⊙ g_k and the g_k constants: the gradient of
    −Σ_k Σ_n ⟨Λ_{k+1}[n] ⊙ g_k[n], α_k[n]⟩ with respect to each learned rate tensor (so a rate
    shared by entries, parameters or steps sums their terms)."""
    leaves: dict[str, Tensor] = {}
    for name, key in schedule.keys.items():
        if key not in leaves:
            leaves[key] = schedule.rates[name].detach().requires_grad_(True)
    adjoint = {n: torch.zeros_like(t) for n, t in taken[-1].items()} if taken else {}
    total: Tensor | None = None
    for k in reversed(range(len(taken))):
        if k + 1 in scored:
            c = scored[k + 1] * (loop.leap if k + 1 == loop.steps else 1.0)
            adjoint = {n: a + c * queries[k + 1][n] for n, a in adjoint.items()}
        for n, gk in taken[k].items():
            if n in schedule.keys:
                term = -(adjoint[n] * gk * schedule.rate(n, k, leaves)).sum()
                total = term if total is None else total + term
    if total is None:
        return {key: torch.zeros_like(t) for key, t in leaves.items()}
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return dense(leaves, grads)


def _reptile_task(f: Objective, theta: Params, untrained: Params) -> Result:
    """(θ − φ_K)/(Kα), zero at K = 0; L_Q(φ_T) is reported, never used."""
    assert f.loop is not None
    phi, losses = f.descend(theta, untrained, f.loop.steps)
    scale = 1 / (f.loop.steps * f.loop.lr("reptile")) if f.loop.steps else 0.0
    loss = f.query(apply_leap(theta, phi, f.loop.leap), untrained)
    return {n: (t - phi[n]) * scale for n, t in theta.items()}, loss, losses


def _truncated_task(f: Objective, theta: Params, untrained: Params) -> Result:
    """∇_θ L_Q(φ_T) through the last T steps; the first K − T count as the identity. With learned
    rates (``theta`` holds those that are not parameters) also ∇_α, and with ``query_weights``
    of F = Σ_k w_k L_Q(φ_{k+1}) (T = K then: exact MAML)."""
    loop = f.loop
    assert loop is not None
    steps, horizon, scored = loop.steps, loop.truncation, loop.scored()
    names = f.student.theta
    start, early = f.descend({n: theta[n] for n in names}, untrained, steps - horizon)

    def objective(t: Params, untrained: Params) -> tuple[Tensor, list[Tensor]]:
        # value φ_{K−T}, Jacobian I (φ_0 = θ itself when T = K)
        phi = {n: t[n] + (start[n] - theta[n]) if horizon < steps else t[n] for n in names}
        rates = {key: r for key, r in t.items() if key not in names}
        terms: list[Tensor] = []

        def visit(k: int, point: Params, g: Params) -> None:
            if k + 1 in scored and k + 1 != steps:
                terms.append(scored[k + 1] * f.query(point, untrained, k + 1))

        phi, late = f.descend(phi, untrained, horizon, first=steps - horizon, rates=rates, visit=visit)
        final = f.query(apply_leap({n: t[n] for n in names}, phi, loop.leap), untrained)
        value = final if loop.query_weights is None else scored[steps] * final
        for term in reversed(terms):
            value = term + value
        return value, late

    g, loss, late = f.differentiate(objective, theta, untrained)
    return g, loss, early + late


def _caller_stacklevel() -> int:
    """``stacklevel`` for a warning issued by the caller of this function: the first frame
    outside the ``lazymaml`` package (the user's line), however deep the call came from."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("lazymaml"):
        frame, level = frame.f_back, level + 1
    return level


def _conjugate_gradient(
    operator: Callable[[Tensor], Tensor], b: Tensor, iterations: int, tol: float
) -> tuple[Tensor, float, int]:
    """Solve operator(x) = b for a symmetric positive definite operator.

    Returns x, the relative residual ‖b − Ax‖/‖b‖ reached, and the iterations used.
    """
    x, r = torch.zeros_like(b), b.clone()
    p, rr, norm_b = r.clone(), torch.dot(r, r), b.norm().item()
    for i in range(iterations):
        residual = rr.sqrt().item() / norm_b if norm_b else 0.0
        if residual <= tol:
            return x, residual, i
        ap = operator(p)
        curvature = torch.dot(p, ap)
        if curvature <= 0:
            raise ValueError(
                f"conjugate gradient: the operator is not positive definite (pᵀAp = {curvature:.3e})"
            )
        step = rr / curvature
        x, r = x + step * p, r - step * ap
        rr, rr_old = torch.dot(r, r), rr
        p = r + (rr / rr_old) * p
    return x, rr.sqrt().item() / norm_b, iterations


def _implicit_task(f: Objective, theta: Params, untrained: Params) -> Result:
    """iMAML: CG on (I + H_AA/λ) g_A = v_A with Hessian-vector products at the proximal φ_K."""
    loop = f.loop
    assert loop is not None
    phi, losses = f.descend(theta, untrained, loop.steps, proximal=loop.lam)  # entry.proximal
    v, loss = f.query_gradient(apply_leap(theta, phi, loop.leap), untrained)
    products = f.hvps(phi, untrained)
    like = {n: v[n] for n in f.adapted}

    def operator(x: Tensor) -> Tensor:  # x ↦ (I + H_AA/λ) x on the adapted coordinates
        h = products(unflat(x, like))
        return x + flat(h[n] for n in f.adapted) / loop.lam

    try:
        x, residual, used = _conjugate_gradient(operator, flat(like), loop.cg_iterations, loop.cg_tol)
    except ValueError as error:
        raise ValueError(
            "iMAML: I + H/λ is not positive definite at the adapted parameters (the support loss "
            f"has curvature below −λ there); increase lam (now {loop.lam})"
        ) from error
    if residual > loop.cg_tol:
        warnings.warn(
            f"iMAML: conjugate gradient stopped at relative residual {residual:.2e} > "
            f"cg_tol={loop.cg_tol:g} after {used} iterations; raise cg_iterations or lam",
            ConvergenceWarning,
            stacklevel=_caller_stacklevel(),
        )
    g_a = unflat(x, like)
    h = products(g_a, last=True)
    g = {n: g_a[n] if n in g_a else v[n] - h[n] / loop.lam for n in v}
    return {n: (1 - loop.leap) * v[n] + loop.leap * g[n] for n in v}, loss, losses


def _eta_zero(loop: InnerLoop) -> InnerLoop:
    return loop.replace(jacobian_step=0.0)


def _eta_horizon(loop: InnerLoop) -> InnerLoop:
    return loop.replace(jacobian_step="horizon")


def _all_steps(loop: InnerLoop) -> InnerLoop:
    return loop.replace(horizon=None)


for _entry in (
    Estimator(
        "maml",
        _truncated_task,
        "exact second-order MAML: ∇_θ L_Q(φ_T(θ)) through all K steps",
        optimizers=("sgd", "adam"),
        reads=LEARNED,
        configure=_all_steps,
        outside=True,
    ),
    Estimator(
        "truncated",
        _truncated_task,
        "backpropagation through the last T = horizon SGD steps (the first K − T as the identity)",
        optimizers=("sgd",),
        reads=frozenset({"horizon"}),
        outside=True,
    ),
    Estimator(
        "first_order", _lazy_task, "first-order MAML: v = ∇L_Q(φ_T)", reads=LEARNED, configure=_eta_zero
    ),
    Estimator(
        "lazy",
        _lazy_task,
        "the lazy meta-gradient: v − η ∇_θ⟨E_A∇L_S(θ), v⟩",
        reads=frozenset({"jacobian_step"}) | LEARNED,
    ),
    Estimator(
        "lazy_horizon",
        _lazy_task,
        "the lazy meta-gradient with η = γKα",
        reads=LEARNED,
        configure=_eta_horizon,
    ),
    Estimator("reptile", _reptile_task, "Reptile's direction (θ − φ_K)/(Kα)"),
    Estimator(
        "imaml",
        _implicit_task,
        "implicit MAML: the proximal fixed point's Jacobian, by conjugate gradient",
        not_batched="its conjugate gradient stops per task",
        reads=frozenset({"lam", "cg_iterations", "cg_tol"}),
        proximal=True,
    ),
):
    register(_entry)


# --- the stored-point product: exact MAML by Hessian-vector products (the brake) -------------


Every = int | Callable[[int], int]
"""A checkpoint interval m ≥ 1, or a function of K giving it (``sqrt_interval``)."""


def sqrt_interval(steps: int) -> int:
    """m = ⌈√K⌉ (at least 1): ⌈K/m⌉ + m ≤ 2⌈√K⌉ + 1 stored points, at most K − ⌈K/m⌉ extra steps."""
    return math.isqrt(steps - 1) + 1 if steps > 1 else 1


def _trajectory(
    f: Objective, theta: Params, untrained: Params, steps: int, every: int
) -> tuple[Params, list[Tensor], dict[int, tuple[Params, Params]]]:
    """The student's ``steps`` SGD steps without a graph; every ``every``-th point φ_k (k = 0, m,
    2m, …) is kept with a copy of the untrained tensors as step k found them."""
    phi, losses, kept = dict(theta), [], {}
    for k in range(steps):
        if k % every == 0:
            kept[k] = (phi, {n: t.clone() for n, t in untrained.items()})
        phi, loss = f.descend(phi, untrained, 1, first=k)
        losses += loss
    return phi, losses, kept


def _segment(
    f: Objective, start: tuple[Params, Params], first: int, count: int
) -> list[tuple[Params, Params]]:
    """The points φ_first … φ_{first+count−1} (each with its untrained tensors), recomputed from
    the checkpoint ``start`` = (φ_first, u_first) by the same SGD steps as the forward sweep."""
    phi, untrained = start[0], {n: t.clone() for n, t in start[1].items()}
    points = []
    for k in range(first, first + count):
        points.append((phi, {n: t.clone() for n, t in untrained.items()}))
        if k < first + count - 1:
            phi, _ = f.descend(phi, untrained, 1, first=k)
    return points


def _reverse_task(f: Objective, theta: Params, untrained: Params, every: Every, last: int | None) -> Result:
    """g = (1 − γ) v + γ T_{K−T}ᵀ … T_{K−1}ᵀ v with T_kᵀ w = w − α ∇_φ⟨E_A∇L_S(φ_k), w⟩, applied
    T_{K−1}ᵀ first at the stored (or recomputed) points; T = ``last`` (None: all K, exact MAML)."""
    loop = f.loop
    assert loop is not None
    steps = loop.steps
    horizon = steps if last is None else last
    m = every(steps) if callable(every) else every
    phi, losses, kept = _trajectory(f, theta, untrained, steps, m)
    v, loss = f.query_gradient(apply_leap(theta, phi, loop.leap), untrained)
    w = {n: loop.leap * t for n, t in v.items()}
    first = steps - horizon  # the first differentiated step; those before it count as I
    for start in sorted((c for c in kept if c + m > first), reverse=True):
        begin = max(start, first)
        points = _segment(f, kept[start], start, min(start + m, steps) - start)[begin - start :]
        for point, state in reversed(points):
            h = f.hvp(point, state, w)
            w = {n: w[n] - loop.lr("the stored-point HVP product") * h[n] for n in w}
    if loop.leap == 1:
        return w, loss, losses
    return {n: (1 - loop.leap) * v[n] + w[n] for n in v}, loss, losses


def stored_point(checkpoint_every: Every = 1, horizon: bool = False, name: str | None = None) -> Estimator:
    """The stored-point product as an :class:`Estimator`: exact MAML (SGD student) by reverse
    accumulation of Hessian-vector products at the student's own points, one support-gradient
    graph at a time. ``checkpoint_every`` = m keeps every m-th point and recomputes the others
    from the nearest kept one (O(K/m + m) parameter copies for ≤ K extra steps); ``horizon``: it
    reads ``horizon`` = T and differentiates the last T steps only (the truncated gradient).

    The registry holds ``maml_hvp`` (m = 1), ``maml_hvp_sqrt`` (m = ⌈√K⌉) and ``truncated_hvp``
    (m = 1, T = ``horizon``); this builds any other m (for ``MetaLearner(estimator=...)``, which
    takes an :class:`Estimator` as well as a name). m is fixed per entry because
    :class:`~gradcheck.settings.InnerLoop` has no field for it.
    """
    if not callable(checkpoint_every) and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(
            f"checkpoint_every must be an integer ≥ 1 or a function of K, got {checkpoint_every!r}"
        )

    def per_task(f: Objective, theta: Params, untrained: Params) -> Result:
        assert f.loop is not None
        return _reverse_task(f, theta, untrained, checkpoint_every, f.loop.truncation if horizon else None)

    every = getattr(checkpoint_every, "__name__", checkpoint_every)
    label = name or f"maml_hvp_every{every}" + ("_truncated" if horizon else "")
    summary = (
        f"the stored-point product: {'truncated' if horizon else 'exact'} MAML by HVPs at the "
        f"student's points, checkpoint interval {every}"
    )
    return Estimator(
        label,
        per_task,
        summary,
        optimizers=("sgd",),
        reads=frozenset({"horizon"}) if horizon else frozenset(),
        configure=None if horizon else _all_steps,
    )


for _entry in (
    stored_point(1, name="maml_hvp"),
    stored_point(sqrt_interval, name="maml_hvp_sqrt"),
    stored_point(1, horizon=True, name="truncated_hvp"),
):
    register(_entry)


def maml_hvp(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
) -> Params:
    """Exact MAML (SGD student) by reverse HVPs at the K stored student points: the same
    gradient as :func:`maml`, with one step's autograd graph and K parameter copies."""
    return _call(
        "maml_hvp",
        model,
        task_or_tasks,
        steps,
        inner_lr,
        adapt=adapt,
        leap=leap,
        inner_optimizer=inner_optimizer,
    )


def maml_hvp_sqrt(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
) -> Params:
    """:func:`maml_hvp` keeping every ⌈√K⌉-th point and recomputing the others (≤ 2⌈√K⌉ + 1
    parameter copies, fewer than K extra student steps)."""
    return _call(
        "maml_hvp_sqrt",
        model,
        task_or_tasks,
        steps,
        inner_lr,
        adapt=adapt,
        leap=leap,
        inner_optimizer=inner_optimizer,
    )


def truncated_hvp(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
    horizon: int | None = None,
) -> Params:
    """:func:`truncated`'s gradient (the last T = ``horizon`` steps; default all K) by reverse
    HVPs at the T stored points instead of their unrolled graphs."""
    return _call(
        "truncated_hvp",
        model,
        task_or_tasks,
        steps,
        inner_lr,
        adapt=adapt,
        leap=leap,
        inner_optimizer=inner_optimizer,
        horizon=horizon,
    )


# --- the calling convention ----------------------------------------------------------------


def _call(
    name: str, model: nn.Module, task_or_tasks: Tasks, steps: int, inner_lr: Any, **settings: Any
) -> Params:
    """The registry entry ``name`` with a public function's arguments (its ``locals()``)."""
    return run(name, model, task_or_tasks, InnerLoop.given(steps, inner_lr, **settings))


def maml(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: LearningRate,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
    per_step_lr: bool = False,
    query_weights: Sequence[float] | None = None,
    step_kwarg: str | None = None,
) -> Params:
    """Exact second-order MAML by the project's own unroll (SGD or Adam inner loop); with learned
    rates (plain SGD) also their meta-gradients, keyed as the oracle keys them."""
    return _call("maml", **locals())


def truncated(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
    horizon: int | None = None,
) -> Params:
    """Backpropagation through the last T = ``horizon`` SGD steps (default T = K: exact MAML);
    T = 0 is first-order MAML."""
    return _call("truncated", **locals())


def first_order(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: LearningRate,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
    per_step_lr: bool = False,
    query_weights: Sequence[float] | None = None,
    step_kwarg: str | None = None,
) -> Params:
    """First-order MAML: g = ∇L_Q(φ_T), the inner loop's Jacobian taken as the identity."""
    return _call("first_order", **locals())


def lazy_horizon(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: LearningRate,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
    per_step_lr: bool = False,
    query_weights: Sequence[float] | None = None,
    step_kwarg: str | None = None,
) -> Params:
    """The lazy meta-gradient with η = γKα (``jacobian_step="horizon"``)."""
    return _call("lazy_horizon", **locals())


def reptile(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
) -> Params:
    """Reptile's direction g = (θ − φ_K)/(Kα) (γ cancels; zero outside A and at K = 0)."""
    return _call("reptile", **locals())


def imaml(
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    inner_optimizer: InnerOptimizer = "sgd",
    lam: float = 1.0,
    cg_iterations: int = 20,
    cg_tol: float = 1e-10,
) -> Params:
    """Implicit MAML (Rajeswaran et al., 2019): the student minimises L_S(φ) + (λ/2)‖φ_A − θ_A‖²;
    its fixed point's Jacobian gives g_A = (I + H_AA/λ)⁻¹ v_A (conjugate gradient with
    Hessian-vector products at φ_K) and g_B = v_B − H_BA g_A / λ; with γ < 1 the result is
    (1 − γ) v + γ of that. Warns when CG stops above ``cg_tol`` (relative residual).
    """
    return _call("imaml", **locals())


def as_function(name: str | Estimator, **options: Any) -> Callable[..., Mapping[str, Tensor]]:
    """The registry entry ``name`` with fixed ``options`` as a function of the calling convention
    ``(model, task_or_tasks, steps, inner_lr, **settings)`` — e.g. to hand to a checker."""
    entry = get(name)

    def estimate(
        model: nn.Module, task_or_tasks: Tasks, steps: int, inner_lr: float, **settings: Any
    ) -> Params:
        return run(entry, model, task_or_tasks, InnerLoop.given(steps, inner_lr, **{**options, **settings}))

    estimate.__name__ = entry.name
    # the estimator-specific settings a checker may vary (gradcheck.diagnose), less those fixed here
    estimate.settings = tuple(sorted(entry.reads & {"jacobian_step"} - options.keys()))  # type: ignore[attr-defined]
    return estimate
