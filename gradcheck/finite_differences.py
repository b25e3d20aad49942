"""Central finite differences of the meta-objective F(θ) = L_Q(θ + γ(φ_K(θ) − θ)), in float64.

F is evaluated by running the student with the real ``torch.optim`` optimizer on a float64 copy
of the model's tensors — fresh copies of its frozen parameters and buffers for every evaluation,
so a forward that writes them in place cannot carry one evaluation into the next — with no code
shared with the oracle's differentiable unroll. The user's model is never touched.

**The directional check.** Along a unit direction u let f(t) = F(θ + tu), and

    D(s) = (f(s) − f(−s)) / 2s,    E(s) = (f(s) + f(−s)) / 2 − f(0)

its odd and even parts. An evaluation returns f(t) + r(t), r its rounding error.

* Smooth f (Taylor): D(s) = f'(0) + c s² + e s⁴ + … and E(s) = a₂ s² + a₄ s⁴ + a₆ s⁶ + …,
  with c = f'''(0)/3!, e = f⁽⁵⁾(0)/5!, a_k = f⁽ᵏ⁾(0)/k!.
* Rounding: |r| ≤ δ = κ ε M, with ε = 2⁻⁵², M the largest |f| evaluated along u and κ = 64
  (``NOISE``). Measured on the test models (tanh/softplus MLPs up to 101,508 parameters,
  conv + BatchNorm, a ReLU MLP, a 4-conv ReLU net) from sixth differences of f at spacing 10⁻⁶
  — there the smooth part contributes s⁶f⁽⁶⁾ ≈ 10⁻³⁶, and independent errors have variance
  C(12,6)σ² = 924σ² — the standard deviation σ of r lies between 0.02 ε|F| and 9 ε|F|: κ = 64
  covers 4σ with room. Rounding moves D(s) by at most δ/s.
* Singularities: through ReLU or max-pooling the inner gradient jumps where a unit switches, so
  f has small steps and kinks. A step J at t₀ ∈ (−s, s) adds J/2s to D(s): at s = 10⁻⁶ a step
  of 10⁻¹¹ moves D(s) by 5·10⁻⁶, far beyond the error bound of a smooth f (about δ/s ≈
  1.4·10⁻⁸ M there). They are detected, not assumed away.

*Smoothness test* at step s, from f(0) (once per check) and f(±s/2), f(±s), f(±2s) (six
evaluations per direction). The two combinations

    C(s) = D(2s) − 5 D(s) + 4 D(s/2)        G(s) = 64 E(s/2) − 20 E(s) + E(2s)

cancel the terms a smooth f has up to s² (C: f'(0) and c; "D(2s) − D(s) ≈ 4 (D(s) − D(s/2))")
and up to s⁴ (G: a₂ and a₄), leaving C = 11.25 e s⁴ and G = 45 a₆ s⁶, small against
D(2s) − D(s) = 3cs² + 15es⁴ and E(2s) − 4E(s) = 12a₄s⁴ + 60a₆s⁶ once s is small enough; rounding
adds at most 2δ(1/4s + 5/2s + 4/s) = 13.5 δ/s to C and (64 + 20 + 1 + 45) δ = 130 δ to G.
A step J at t₀ > 0 (t₀ < 0 is symmetric) instead makes C = 1.75 J/s, −2.25 J/s or J/4s and
G = 22.5 J, −9.5 J or J/2 for t₀ in (0, s/2), [s/2, s) or [s, 2s), that is |C| / |D(2s) − D(s)|
= 7, 9 or 1 and |G| / |E(2s) − 4E(s)| = 15, 6.3 or 1. f counts as smooth at s when

    |C| ≤ ¼ |D(2s) − D(s)| + 13.5 δ/s    and    |G| ≤ ¼ |E(2s) − 4E(s)| + 130 δ

(¼ = ``SMOOTH``, below the ratio 1 of any single step). A kink (f' jumps at t₀) escapes one of
the two only at isolated positions (C vanishes at t₀ = 8s/9), and several singularities can
cancel by chance: on simulated f made of 0.5 to 32 steps or kinks within 2s (uniform
positions, Gaussian sizes, 10⁵ trials each) both tests passed in at most 0.21% of the trials,
and D(s) then fell outside the error bound E below in at most 0.04%. Singularities too small for
the tests (|J| below a few hundred ε M) move D(s) by at most |C|/3.5, which E includes; a smooth
f whose s⁴ or s⁶ terms are not yet negligible fails the test too, correctly.

Where f is not smooth at h the direction is retried at h/10 and then h/100 (``STEPS``): the
number of singularities within 2s of θ is proportional to s, so each tenth of the step removes
about nine in ten of them, while rounding (δ/s) grows ten-fold — at h/100 = 10⁻⁸ it is
≈ 1.4·10⁻⁶ M, as large as the errors worth detecting (a gradient off by 10⁻⁵ relative moves
⟨g, u⟩ by about 10⁻⁵ ‖g‖/√n), so smaller steps would trade kinks for noise.
A direction smooth at none of them is INCONCLUSIVE, reported with its differences and never as
a mismatch.

*Verdict* along a direction smooth at s: the numerical value is D(s), with error bound

    E = |D(2s) − D(s)| + |C| + δ/s

— three times the s² truncation error of D(s) (the factor also covers the s⁴ term and the noise
in the estimate), any undetected singular part, and rounding — and ⟨g, u⟩ agrees when

    |⟨g, u⟩ − D(s)| ≤ E + rtol · max(|D(s)|, ‖g‖/√n),

where ‖g‖/√n is the typical size of ⟨g, u⟩ for a random unit u in n dimensions (so directions
nearly orthogonal to g do not make the test arbitrarily strict), and rtol is the candidate's
own precision, from the one table every checker uses (:mod:`gradcheck.tolerances`; 1e-9 for
float64, 1e-3 for float32, 5e-2 for 16-bit floats): the numerical error is bounded by E, never
folded into rtol. The check passes when every conclusive direction agrees and at least half are
conclusive.

The step h is ``step`` (default 10⁻⁶) in :func:`check` and :func:`meta_gradient` — not to be
confused with the machine epsilon ε above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .models import common_random_numbers, conventions, refuse_unsupported
from .parameters import Adapt, flat, unflat
from .rates import coordinates
from .settings import InnerLoop, InnerOptimizer, LearningRate
from .state import preserved
from .student import Student, converted
from .task import Tasks, as_tasks
from .tolerances import default_rtol

__all__ = ["Differences", "Direction", "DirectionalReport", "check", "meta_gradient", "meta_objective"]

EPS64 = torch.finfo(torch.float64).eps
NOISE = 64.0  # κ: the rounding error of one evaluation of F is at most κ ε max|F|
SMOOTH = 0.25  # f is smooth at s when |C| ≤ SMOOTH · |D(2s) − D(s)| + … (and the same for G)
STEPS = (1.0, 0.1, 0.01)  # the steps tried, as fractions of h, until F is smooth at one


def meta_objective(
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
) -> tuple[Callable[[Tensor], float], Tensor]:
    """F as a function of the flat float64 vector of its coordinates — the trainable parameters,
    then the learned rates that are not parameters (:mod:`gradcheck.rates`) — and their values.

    F is the mean over tasks of L_Q(φ_T), or of Σ_k w_k L_Q(φ_{k+1}) for ``query_weights``. The
    model's tensors are copied in float64, and so is the data of a model that is not float64
    already; a closure task cannot be converted, so it is accepted only with a float64 model
    (build its data in float64).
    """
    loop = _loop(steps, inner_lr, leap, inner_optimizer, adapt, per_step_lr, query_weights, step_kwarg)
    return _objective(model, task_or_tasks, loop)


def _loop(
    steps: int,
    inner_lr: LearningRate,
    leap: float,
    inner_optimizer: InnerOptimizer,
    adapt: Adapt,
    per_step_lr: bool,
    query_weights: Sequence[float] | None,
    step_kwarg: str | None,
) -> InnerLoop:
    return InnerLoop.given(
        steps,
        inner_lr,
        leap,
        inner_optimizer,
        adapt=adapt,
        per_step_lr=per_step_lr,
        query_weights=query_weights,
        step_kwarg=step_kwarg,
    )


def _objective(
    model: nn.Module, task_or_tasks: Tasks, loop: InnerLoop
) -> tuple[Callable[[Tensor], float], Tensor]:
    """:func:`meta_objective` under the settings ``loop`` (every field but first_order: F has
    no first-order variant)."""
    tasks = as_tasks(task_or_tasks)
    refuse_unsupported(model, tasks, by="finite differences")
    student = Student.read(model, dtype=torch.float64, loop=loop)
    tasks = converted(tasks, model, torch.float64, "finite differences")
    coordinates = student.coordinates

    def objective(x: Tensor) -> float:
        start = unflat(x, coordinates)
        with preserved(model):
            total = 0.0
            for task in tasks:  # every task from the same seeded generator state: fixed Dropout masks
                with common_random_numbers(model):
                    total += student.objective(task, loop, start=start)
        return total / len(tasks)

    return objective, flat(coordinates)


def meta_gradient(
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
    step: float = 1e-6,
    max_parameters: int = 20_000,
) -> dict[str, Tensor]:
    """Central differences (F(θ + h eᵢ) − F(θ − h eᵢ)) / 2h for every coordinate, in float64,
    with h = ``step``; compare them with a candidate at
    :data:`gradcheck.tolerances.COORDINATEWISE`.

    Costs 2n evaluations of F (each K + 1 forward/backward passes per task): meant for small
    models; above ``max_parameters`` use :func:`check`. Learned rates are coordinates too
    (keyed as the oracle keys them).
    """
    refuse_unsupported(model, as_tasks(task_or_tasks), by="finite differences")
    loop = _loop(steps, inner_lr, leap, inner_optimizer, adapt, per_step_lr, query_weights, step_kwarg)
    theta = _coordinates(model, loop)
    n = sum(p.numel() for p in theta.values())
    if n > max_parameters:
        raise ValueError(
            f"the model has {n} trainable parameters; coordinate-wise finite differences need "
            f"{2 * n} meta-objective evaluations (limit max_parameters={max_parameters}): use "
            "finite_differences.check for a directional check"
        )
    objective, x0 = _objective(model, task_or_tasks, loop)
    x, g = x0.clone(), torch.empty_like(x0)
    for i in range(n):
        x[i] = x0[i] + step
        f_plus = objective(x)
        x[i] = x0[i] - step
        f_minus = objective(x)
        x[i] = x0[i]
        g[i] = (f_plus - f_minus) / (2 * step)
    return unflat(g, {k: p.detach() for k, p in theta.items()})


@dataclass(frozen=True)
class Differences:
    """f(t) = F(θ + tu) at t = −2s, −s, −s/2, 0, s/2, s, 2s, and what it says (module docstring)."""

    step: float
    values: tuple[float, ...]  # f(−2s), f(−s), f(−s/2), f(0), f(s/2), f(s), f(2s)

    @property
    def central(self) -> tuple[float, float, float]:
        """D(s/2), D(s), D(2s)."""
        v, s = self.values, self.step
        return (v[4] - v[2]) / s, (v[5] - v[1]) / (2 * s), (v[6] - v[0]) / (4 * s)

    @property
    def even(self) -> tuple[float, float, float]:
        """E(s/2), E(s), E(2s)."""
        v = self.values
        return (v[4] + v[2]) / 2 - v[3], (v[5] + v[1]) / 2 - v[3], (v[6] + v[0]) / 2 - v[3]

    @property
    def numerical(self) -> float:
        """D(s), the numerical directional derivative at this step."""
        return self.central[1]

    @property
    def rounding(self) -> float:
        """δ, the bound on the rounding error of one evaluation of f."""
        return NOISE * EPS64 * max(abs(f) for f in self.values)

    @property
    def tests(self) -> tuple[tuple[str, float, float], tuple[str, float, float]]:
        """(name, |residual|, allowed) for C and G."""
        (d1, d2, d4), (e1, e2, e4) = self.central, self.even
        c, g = d4 - 5 * d2 + 4 * d1, 64 * e1 - 20 * e2 + e4
        return (
            ("D(2s) − 5D(s) + 4D(s/2)", abs(c), SMOOTH * abs(d4 - d2) + 13.5 * self.rounding / self.step),
            ("64E(s/2) − 20E(s) + E(2s)", abs(g), SMOOTH * abs(e4 - 4 * e2) + 130 * self.rounding),
        )

    @property
    def smooth(self) -> bool:
        return all(residual <= allowed for _, residual, allowed in self.tests)

    @property
    def error(self) -> float:
        """E, the bound on |D(s) − f'(0)|: truncation, any undetected singularity, rounding."""
        _, full, double = self.central
        return abs(double - full) + self.tests[0][1] + self.rounding / self.step

    def __str__(self) -> str:
        d = ", ".join(f"{v:.9e}" for v in self.central)
        tests = ", ".join(f"|{name}| = {r:.2e} {'≤' if r <= a else '>'} {a:.2e}" for name, r, a in self.tests)
        return f"at s={self.step:g}: D(s/2), D(s), D(2s) = {d}; {tests}"


def _differences(
    objective: Callable[[Tensor], float], x0: Tensor, f0: float, u: Tensor, step: float
) -> Differences:
    """f at x0 + t u for t = ±s/2, ±s, ±2s (s = ``step``), with f(0) = ``f0`` given."""
    ts = (step / 2, step, 2 * step)
    below = [objective(x0 - t * u) for t in reversed(ts)]
    above = [objective(x0 + t * u) for t in ts]
    return Differences(step, (*below, f0, *above))


@dataclass(frozen=True)
class Direction:
    """One random direction u: the analytical ⟨g, u⟩ against central differences of F.

    ``tried`` holds the differences at h, then at h/10 and h/100 as long as F was not smooth; the
    direction is conclusive when the last is smooth, and is judged on that D(s).
    """

    analytic: float
    tried: tuple[Differences, ...]
    relative: float  # rtol · max(|D(s)|, ‖g‖/√n)

    @property
    def conclusive(self) -> bool:
        return self.tried[-1].smooth

    @property
    def step(self) -> float:
        return self.tried[-1].step

    @property
    def numerical(self) -> float:
        return self.tried[-1].numerical

    @property
    def numerical_error(self) -> float:
        return self.tried[-1].error

    @property
    def tolerance(self) -> float:
        return self.numerical_error + self.relative

    @property
    def error(self) -> float:
        return abs(self.analytic - self.numerical)

    @property
    def ok(self) -> bool:
        """Conclusive, and the analytical value agrees."""
        return self.conclusive and self.error <= self.tolerance

    @property
    def failed(self) -> bool:
        """Conclusive, and the analytical value disagrees."""
        return self.conclusive and self.error > self.tolerance

    @property
    def reason(self) -> str | None:
        """Why the direction is inconclusive; None when it is conclusive."""
        if self.conclusive:
            return None
        return "the meta-objective is not smooth within 2s along u: " + "; ".join(map(str, self.tried))


@dataclass(frozen=True)
class DirectionalReport:
    """The result of :func:`check`: one row per direction, at the requested ``step`` h and the
    candidate's ``rtol``."""

    directions: list[Direction]
    step: float
    rtol: float
    notes: tuple[str, ...] = ()  # the model's autograd conventions (gradcheck.models.conventions)

    @property
    def failed(self) -> list[int]:
        """The directions along which the analytical value disagrees."""
        return [i for i, d in enumerate(self.directions) if d.failed]

    @property
    def inconclusive(self) -> list[int]:
        """The directions along which F is not smooth at any step tried."""
        return [i for i, d in enumerate(self.directions) if not d.conclusive]

    def ok(self) -> bool:
        """Every conclusive direction agrees, and at least half of them are conclusive."""
        return not self.failed and 2 * len(self.inconclusive) <= len(self.directions)

    def __str__(self) -> str:
        n, failed, inconclusive = len(self.directions), self.failed, self.inconclusive
        verdict = "ok" if self.ok() else "MISMATCH" if failed else "INCONCLUSIVE"
        summary = (
            f"directional check (central differences, step h={self.step:g}, rtol={self.rtol:g}): {verdict} — "
            f"{n - len(failed) - len(inconclusive)} agree, {len(failed)} disagree, "
            f"{len(inconclusive)} inconclusive of {n}"
        )
        head = (
            f"{'u':>3}  {'step':>7}  {'analytical <g,u>':>16}  {'numerical D(s)':>16}  "
            f"{'num. error':>10}  {'|difference|':>12}  {'allowed':>9}"
        )
        rows = []
        for i, d in enumerate(self.directions):
            start = f"{i:>3}  {d.step:>7.0e}  {d.analytic:>16.9e}  "
            if not d.conclusive:
                rows.append(f"{start}{'inconclusive':>16}")
                continue
            rows.append(
                f"{start}{d.numerical:>16.9e}  {d.numerical_error:>10.2e}  {d.error:>12.2e}  "
                f"{d.tolerance:>9.2e}{'' if d.ok else '  FAIL'}"
            )
        notes = [f"u {i} inconclusive: {self.directions[i].reason}" for i in inconclusive]
        notes += [f"note: autograd convention, not the derivative: {n}" for n in self.notes]
        return "\n".join([summary, head, *rows, *notes])

    def assert_close(self) -> None:
        """Raise an AssertionError showing numerical vs analytical values unless :meth:`ok`."""
        if self.ok():
            return
        lines = [
            f"u {i}: numerical {d.numerical:.9e} (± {d.numerical_error:.1e}, step {d.step:g}) vs "
            f"analytical {d.analytic:.9e}: |difference| {d.error:.2e} > allowed {d.tolerance:.2e}"
            for i, d in ((i, self.directions[i]) for i in self.failed)
        ]
        if not self.failed:
            conclusive = len(self.directions) - len(self.inconclusive)
            lines.append(
                f"only {conclusive} of {len(self.directions)} directions are conclusive (at least half "
                "must be): check more directions, or a smaller step"
            )
        raise AssertionError(
            "\n".join(["meta-gradient disagrees with finite differences", *lines, str(self)])
        )


def _coordinates(model: nn.Module, loop: InnerLoop) -> dict[str, Tensor]:
    """F's coordinates on the model: θ, then the learned rates that are not parameters."""
    return coordinates(model, loop.adapt, loop.inner_lr, loop.steps)[0]


def _as_vector(gradient: Mapping[str, Tensor], theta: Mapping[str, Tensor]) -> Tensor:
    missing = [n for n in theta if n not in gradient]
    unexpected = [n for n in gradient if n not in theta]
    wrong = [n for n in theta if n in gradient and gradient[n].shape != theta[n].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            "gradient does not match the meta-objective's coordinates (the trainable parameters "
            "and any learned rates): "
            f"missing {missing}, unexpected {unexpected}, wrong shape {wrong}"
        )
    return flat(gradient[n].detach().to("cpu", torch.float64) for n in theta)


def check(
    gradient: Mapping[str, Tensor],
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
    directions: int = 8,
    seed: int = 0,
    step: float = 1e-6,
    rtol: float | None = None,
) -> DirectionalReport:
    """Compare ⟨g, u⟩ with central differences of F along ``directions`` seeded unit vectors.

    Costs 1 + 6 evaluations of F per direction (f(0) once; f(±h/2), f(±h), f(±2h), h = ``step``)
    and 6 more per retry at a smaller step where F is not smooth, whatever the model's size.
    ``rtol`` defaults to the candidate's precision (:func:`gradcheck.tolerances.default_rtol`,
    the one policy of docs/verification.md, "Tolerances"), added to the error bound E.
    """
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
        raise ValueError(f"directions must be a positive integer, got {directions!r}")
    refuse_unsupported(model, as_tasks(task_or_tasks), by="finite differences")
    loop = _loop(steps, inner_lr, leap, inner_optimizer, adapt, per_step_lr, query_weights, step_kwarg)
    g = _as_vector(gradient, _coordinates(model, loop))
    rtol = default_rtol(gradient) if rtol is None else rtol
    objective, x0 = _objective(model, task_or_tasks, loop)
    generator = torch.Generator().manual_seed(seed)
    typical = g.norm().item() / math.sqrt(g.numel())
    f0 = objective(x0)
    rows = []
    for _ in range(directions):
        u = torch.randn(g.numel(), generator=generator, dtype=torch.float64)
        u = u / u.norm()
        tried: list[Differences] = []
        for fraction in STEPS:
            tried.append(_differences(objective, x0, f0, u.to(x0.device), fraction * step))
            if tried[-1].smooth:
                break
        relative = rtol * max(abs(tried[-1].numerical), typical)
        rows.append(Direction(torch.dot(g, u).item(), tuple(tried), relative))
    return DirectionalReport(rows, step, rtol, tuple(conventions(model)))
