"""What a candidate meta-gradient computes instead, when it is not the reference's.

The discrepancies found in real MAML code fall into a few classes, each the exact meta-gradient
of a nearby setting. :func:`diagnose` computes the reference — the oracle by default — as g_h
under such hypotheses h and names the first that explains the candidate c to the checking
tolerance — ``compare(c, g_h).ok(rtol, atol)``, the same test as the verdict — in this order
(reference calls in brackets), each setting computed once:

=====================  ===============================================  ======================
label                  hypothesis [reference calls]                     typical cause
=====================  ===============================================  ======================
``exact``              c = g [0]                                        —
``no_meta_gradient``   ‖c‖ ≤ atol + rtol ‖g‖ [0]                         θ detached (``higher``'s
                                                                        copy_initial_weights);
                                                                        lazy: d built with θ's
                                                                        graph
``rates_detached``     learned rates: θ's part of g, the rates'         ``.detach()``/``.item()``
                       gradients 0 (or missing) [0]                     on α; an optimizer that
                                                                        does not see the rates
``scaled``             c = s g, s = ⟨c, g⟩/⟨g, g⟩ (least squares) [0]    sum over B tasks, not
                                                                        the mean (s = B)
``first_order``        first-order MAML [1] (the oracle; a lazy         ``create_graph=False``;
                       reference: η = 0); with rates, their             a hook returning d
                       first-order gradients too
``last_step_only``     ``query_weights``: L_Q(φ_K) alone, weight 1      the multi-step loss
                       or w_{K−1} [1]                                   never switched on
``per_step_rates_      per-step rates collapsed to α′_k = α_0, the      ``lr[0]`` at every step;
shared``               rate gradient summed into index 0 [1]            the step index not used
``adapt``              the presets (all, head, body), all but the       BatchNorm's affine
                       modules of one type [1 each]                     parameters not adapted;
                                                                        ANIL vs MAML
``steps``              K − 1, K + 1; K′ = 1 for a reference other       an off-by-one; hooks
                       than the oracle when K > 2 [1 each]              that never substitute d
``leap``               lazy: γ′ = γα at η unchanged [1]                 d not divided by α
``jacobian_step``      lazy: η′ by a 1-D fit, γKα probed first [≤ 8]    (θ − φ)/s stepped by s
``inner_lr``           α′ by a 1-D fit of ‖c − g(α′)‖ [≤ 8]             α held in float32;
                                                                        α applied twice
``adapt``              all but / only / also each module [1 each]       one layer left out
``leap``               γ′ ∈ (0, 1] by the same fit [≤ 8]                 the teacher's fraction
``unexplained``        none of these                                    —
=====================  ===============================================  ======================

**Learned rates, a multi-step loss, a step index** (:mod:`gradcheck.rates`): a hypothesis that
cannot be run under them is skipped and named in ``Diagnosis.skipped`` (and in an unexplained
detail) — K + 1 with a step index (the model may have no step K) or a multi-step loss (no
weight for it), K′ steps with fewer than K′ per-step rates, the α′ fit for learned rates, the γ′
fit with a multi-step loss, and, with rates per parameter, the adapted sets that add a parameter
without a rate. K′ steps with more than K′ + 1 per-step rates run on the first K′ + 1 (the
others then get no gradient); K − 1 with a multi-step loss keeps the first K − 1 weights.

Every hypothesis but ``scaled`` changes one setting of the reference (``loop.replace(...)`` on
its :class:`gradcheck.settings.InnerLoop`), so one that explains c to rtol = 1e-9 pins the cause:
two different settings agree that closely only by accident.

**The reference** is the exact oracle unless ``reference=`` names another: a callable
``reference(model, task_or_tasks, steps, inner_lr, **settings) -> {name: tensor}`` (e.g. one of
:mod:`lazymaml`'s estimators), called with ``adapt``, ``leap`` and ``inner_optimizer`` and any
other :class:`~gradcheck.settings.InnerLoop` field that differs from its default — never
``first_order``, which only the oracle has. Every hypothesis that varies a setting applies to it
by calling it with the changed setting. The text names the reference: "the oracle", or "the
reference 'lazy'" after the callable's ``__name__`` — never "the oracle" for another one.

**A lazy reference** declares the estimator-specific settings it accepts as the tuple
``reference.settings`` (:func:`lazymaml.estimators.as_function` sets ``("jacobian_step",)`` for
the lazy estimator; gradcheck never imports lazymaml). With ``jacobian_step`` declared, the
diagnosis also varies η: η = 0 is first-order MAML (label ``first_order``), γ′ = γα with η held
is a derived gradient not divided by α (label ``leap``), and η′ is fitted (label
``jacobian_step``, the probe γKα first: ``"horizon"``). Any reference other than the oracle also
gets K′ = 1 (for K > 2): a lazy implementation whose hooks never substitute d computes one-step
MAML. One lazy mistake is left out because no setting of the reference expresses it: the
one-step Jacobian taken at φ_K instead of θ (I − ηH(φ_K)) — the lazy estimator always takes its
Hessian at θ, so a hypothesis for it would need a computation of its own, not the reference's.

**The 1-D fit** (α in log space, so α′ > 0; γ directly, clipped to (0, 1]) is secant
Gauss–Newton: with J the difference quotient of the last two evaluated gradients, the next x is
x + ⟨c − g(x), J⟩/⟨J, J⟩ (the least-squares step of the linearised residual), at most 1 away.
Its first probe is the requested value rounded to float32, so the α of a float32 tensor — a
relative deviation of ~1e-8 — costs one reference call; a general α′ takes a few, the error
shrinking superlinearly. A fit gives up as soon as its step would remove less than a tenth of
‖c − g(x)‖: the discrepancy is then not along the curve.

When nothing explains c, the diagnosis names the closest hypothesis (smallest ‖c − g_h‖/‖g‖),
the parameters with the largest share of ‖c − g‖², and any parameter whose true gradient is ≈0
(:meth:`gradcheck.Report.negligible`) but the candidate's is not — the signature of a wrong
normalisation backward.

``rtol`` defaults to the candidate's precision and ``atol`` to 0, the policy of
:mod:`gradcheck.tolerances` (docs/verification.md, "Tolerances").
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import oracle
from ._higher import DIFFERENTIABLE
from .compare import Report, compare
from .parameters import Adapt, flat, resolve_adapt, trainable
from .rates import Rates, coordinates
from .settings import InnerLoop, InnerOptimizer, LearningRate
from .state import preserved
from .task import Tasks, as_tasks
from .tolerances import ATOL, default_rtol

__all__ = ["LABELS", "Diagnosis", "ReferenceFunction", "diagnose"]

LABELS = (
    "exact",
    "scaled",
    "no_meta_gradient",
    "first_order",
    "rates_detached",
    "per_step_rates_shared",
    "last_step_only",
    "adapt",
    "steps",
    "inner_lr",
    "leap",
    "jacobian_step",
    "unexplained",
)
FIT_CALLS = 8  # reference evaluations per 1-D fit, the starting probe included
STALL = 0.9  # a fit stops when its next step would leave more than this share of ‖c − g(x)‖
_NORMALISATION_LAYER_PREFIXES = ("BatchNorm", "GroupNorm", "LayerNorm", "InstanceNorm")
"""Class-name prefixes of the normalisation layers, whose affine parameters get their own hint."""

ReferenceFunction = Callable[..., Mapping[str, Tensor]]
"""``reference(model, task_or_tasks, steps, inner_lr, **settings) -> {name: tensor}``."""

_PASSED_ALWAYS = ("adapt", "leap", "inner_optimizer")
_VARIABLE = ("jacobian_step",)
"""The estimator-specific settings a reference may declare it accepts (``function.settings``)."""
_NOT_FOR_REFERENCES = ("steps", "inner_lr", "first_order", *_PASSED_ALWAYS)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(InnerLoop)}


@dataclass(frozen=True)
class Diagnosis:
    """What the candidate computes: ``label`` (one of :data:`LABELS`) and a sentence, ``detail``.

    ``settings`` holds the settings under which the reference reproduces the candidate
    (``{"steps": 4}``, ``{"inner_lr": 0.10000000149}``, ``{"adapt": (...)}``,
    ``{"first_order": True}``), ``scale`` the factor for ``"scaled"``; ``residual`` is
    ‖c − g_h‖/‖g‖ for the explaining hypothesis h (for ``"unexplained"``, the closest one, named
    by ``hypothesis``); ``disagree`` names the parameters with the largest share of ‖c − g‖²;
    ``reference`` names what the candidate was compared with ("the oracle" or "the reference
    'lazy'"); ``oracle_calls`` (the reference's calls) and ``seconds`` are the cost;
    ``skipped`` says which hypotheses could not be run under these settings, and why (an
    unexplained diagnosis says so in its detail).
    """

    label: str
    detail: str
    hypothesis: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    scale: float | None = None
    residual: float = 0.0
    disagree: tuple[str, ...] = ()
    oracle_calls: int = 0
    seconds: float = 0.0
    reference: str = "the oracle"
    skipped: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"diagnosis: {self.label} — {self.detail}"


class Reference:
    """The reference meta-gradient on fixed tasks — the exact oracle, or a user's
    :data:`ReferenceFunction` — under settings near the requested ``loop``, each computed once
    (the cache is keyed by the :class:`InnerLoop` itself). Used by :func:`diagnose` and
    :func:`gradcheck.validate`; ``loop.adapt`` is resolved to parameter names once, here."""

    def __init__(
        self, function: ReferenceFunction | None, model: nn.Module, task_or_tasks: Tasks, loop: InnerLoop
    ) -> None:
        if function is None:
            loop.require(*DIFFERENTIABLE, by="the oracle")
        elif not callable(function):
            raise TypeError(
                "reference must be None (the oracle) or a callable "
                f"(model, task_or_tasks, steps, inner_lr, **settings) -> {{name: tensor}}, got {function!r}"
            )
        elif loop.first_order:
            raise ValueError(
                "first_order=True applies to the oracle only (reference=None); "
                f"{_name(function)} computes its own estimator"
            )
        self.function, self.model, self.task_or_tasks = function, model, task_or_tasks
        self.tasks = as_tasks(task_or_tasks)
        every, self.adapted, self.schedule = coordinates(model, loop.adapt, loop.inner_lr, loop.steps)
        theta = trainable(model)
        self.external = {k: t for k, t in every.items() if k not in theta}
        """The learned rates that are not parameters of the model, by their meta-gradient keys."""
        self.rate_keys = tuple(dict.fromkeys(self.schedule.keys.values())) if self.schedule else ()
        """The meta-gradient keys of every learned rate (a model's own rate: its parameter name)."""
        owned = set(self.schedule.keys.values()) & set(theta) if self.schedule else set()
        self.adaptable = tuple(n for n in theta if n not in owned)
        """The trainable parameters other than the model's own rates (which are never adapted)."""
        self.loop = loop.replace(adapt=self.adapted)
        self.name = _name(function)
        self.varies = _declared(function)
        self.cache: dict[InnerLoop, dict[str, Tensor]] = {}
        self.calls = 0

    @property
    def is_oracle(self) -> bool:
        return self.function is None

    def on(self, task_or_tasks: Tasks) -> Reference:
        """The same reference and settings on other tasks (a cache of its own)."""
        return Reference(self.function, self.model, task_or_tasks, self.loop)

    def __call__(self, loop: InnerLoop | None = None) -> dict[str, Tensor]:
        """The reference meta-gradient under ``loop`` (by default the requested settings)."""
        loop = self.loop if loop is None else loop
        if loop not in self.cache:
            self.calls += 1
            self.cache[loop] = self._compute(loop)
        return self.cache[loop]

    def _compute(self, loop: InnerLoop) -> dict[str, Tensor]:
        if self.function is None:
            return oracle.gradient(self.model, self.task_or_tasks, loop)
        settings = {name: getattr(loop, name) for name in _PASSED_ALWAYS}
        settings |= {
            name: getattr(loop, name)
            for name in _DEFAULTS
            if name not in _NOT_FOR_REFERENCES and getattr(loop, name) != _DEFAULTS[name]
        }
        with preserved(self.model):
            out = self.function(self.model, self.task_or_tasks, loop.steps, loop.given_lr, **settings)
        if not isinstance(out, Mapping) or not all(isinstance(t, Tensor) for t in out.values()):
            raise TypeError(f"{self.name} must return {{name: tensor}}, got {type(out).__name__}")
        return {n: t.detach() for n, t in out.items()}


def _declared(function: ReferenceFunction | None) -> frozenset[str]:
    """The settings of :data:`_VARIABLE` that ``function`` declares it accepts, as the tuple
    ``function.settings`` (e.g. ``("jacobian_step",)``, set by ``lazymaml.estimators.as_function``
    for the lazy estimator); a name that is no such setting is refused."""
    if function is None:
        return frozenset()
    declared = getattr(function, "settings", ())
    if isinstance(declared, str) or not all(isinstance(n, str) for n in declared):
        raise TypeError(f"{_name(function)}.settings must be a tuple of setting names, got {declared!r}")
    unknown = sorted(set(declared) - set(_VARIABLE))
    if unknown:
        raise ValueError(
            f"{_name(function)}.settings names {unknown}: the diagnosis varies only {list(_VARIABLE)}"
        )
    return frozenset(declared)


def _name(function: ReferenceFunction | None) -> str:
    if function is None:
        return "the oracle"
    return f"the reference {getattr(function, '__name__', type(function).__name__)!r}"


@dataclass(frozen=True)
class _Hypothesis:
    """A nearby setting, or a changed candidate: the reference under ``loop.replace(**change)``,
    times ``scale``; ``detail`` says what the candidate then computes and ``hint`` a likely cause."""

    label: str
    description: str
    detail: str
    hint: str = ""
    change: Mapping[str, Any] = field(default_factory=dict)
    scale: float = 1.0
    transform: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None
    """What the candidate's gradient is made of the reference's (rates zeroed, summed, padded)."""

    def gradient(self, reference: Reference, truth: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        base = reference(reference.loop.replace(**self.change)) if self.change else truth
        if self.transform is not None:
            base = self.transform(base)
        # a learned rate the varied setting leaves out (not adapted) gets no gradient: zero
        base = {**{n: torch.zeros_like(t) for n, t in truth.items() if n not in base}, **base}
        return base if self.scale == 1 else {n: self.scale * t.double() for n, t in base.items()}

    def what(self, reference: str) -> str:
        """The hypothesis with the reference named: "4 × the oracle", "the oracle with K = 4"."""
        return self.description if not self.change else f"{reference} with {self.description}"

    def explanation(self, reference: str) -> str:
        sentence = self.detail + (f": {self.hint}" if self.hint else "")
        return sentence if not self.change else f"{sentence} ({self.what(reference)} explains it)"


def _names(chosen: tuple[str, ...], limit: int = 6) -> str:
    shown = ", ".join(chosen[:limit])
    return shown + (f", … ({len(chosen)} in all)" if len(chosen) > limit else "")


def _adapted_sets(
    model: nn.Module, requested: tuple[str, ...], names: tuple[str, ...]
) -> tuple[list[_Hypothesis], list[_Hypothesis]]:
    """Adapted sets near the requested one A, in two tiers — the presets and the modules of one
    type (few, likely), then one module at a time (three per module) — no set twice, never A.
    ``names`` are the parameters that may be adapted (the trainable ones but a model's rates)."""
    owners: dict[str, tuple[str, ...]] = {}  # module prefix -> its trainable parameters
    kinds: dict[str, str] = {}  # module prefix -> its class name
    for prefix, module in model.named_modules():
        mine = tuple(n for n in names if n.rpartition(".")[0] == prefix)
        if mine:
            owners[prefix], kinds[prefix] = mine, type(module).__name__
    wanted = "all parameters" if requested == names else f"the requested {{{_names(requested)}}}"

    def without(members: Iterable[str], among: tuple[str, ...] = requested) -> tuple[str, ...]:
        return tuple(n for n in among if n not in set(members))

    Sets = list[tuple[str, tuple[str, ...], str]]  # (what, the adapted names, a likely cause)
    likely: Sets = [("all parameters (MAML)", names, "MAML's inner loop where a subset was asked for")]
    for preset, what, why in (
        ("head", "the head only (ANIL)", "ANIL's head-only inner loop"),
        ("body", "all but the head (BOIL)", "BOIL's inner loop"),
    ):
        with contextlib.suppress(ValueError):  # a single parametrised module has no body
            chosen = tuple(n for n in resolve_adapt(model, preset) if n in names)
            likely.append((what, chosen, why))
    for kind in dict.fromkeys(kinds.values()):
        members = [n for prefix, mine in owners.items() if kinds[prefix] == kind for n in mine]
        why = f"the {kind} modules' parameters kept out of the inner loop"
        if kind.startswith(_NORMALISATION_LAYER_PREFIXES):
            why = f"{kind}'s affine parameters kept out of the inner loop"
        likely.append((f"all but the {kind} modules", without(members), why))
        likely.append((f"all but the {kind} modules", without(members, names), why))
    per_module: Sets = []
    for prefix, mine in owners.items():
        label = repr(prefix) if prefix else "the root module"
        per_module.append((f"all but module {label}", without(mine), f"module {label} left out"))
        per_module.append((f"only module {label}", mine, f"only module {label} adapted"))
        per_module.append(
            (
                f"A and module {label}",
                tuple(n for n in names if n in requested or n in mine),
                f"{label} added",
            )
        )
    seen = {requested, ()}

    def hypotheses(sets: Sets) -> list[_Hypothesis]:
        out = []
        for what, chosen, why in sets:
            if chosen not in seen:
                seen.add(chosen)
                detail = f"the candidate adapts {what} in the inner loop ({_names(chosen)}), not {wanted}"
                out.append(_Hypothesis("adapt", f"adapt = {what}", detail, f"e.g. {why}", {"adapt": chosen}))
        return out

    return hypotheses(likely), hypotheses(per_module)


def _secant(
    evaluate: Callable[[float], Tensor],
    candidate: Tensor,
    start: tuple[float, Tensor],
    probe: float,
    bounds: tuple[float, float],
    max_step: float,
) -> Iterator[float]:
    """Secant Gauss–Newton on x ↦ ‖c − g(x)‖ from ``start`` = (x₀, g(x₀)): yields each x at which
    it evaluates g (``probe`` first), at most :data:`FIT_CALLS` of them. Gives up when the
    linearised step would remove less than a tenth of the residual (``STALL``): then c − g(x) is
    not along the curve, and no x explains it."""
    points = [start]
    x = probe
    for _ in range(FIT_CALLS):
        yield x
        points.append((x, evaluate(x)))
        (xa, ga), (xb, gb) = points[-2], points[-1]
        slope = (gb - ga) / (xb - xa)
        curvature = torch.dot(slope, slope).item()
        if not curvature:
            return
        residual = candidate - gb
        step = torch.dot(residual, slope).item() / curvature
        if (residual - step * slope).norm() > STALL * residual.norm():
            return
        x = min(max(xb + max(-max_step, min(max_step, step)), bounds[0]), bounds[1])
        if not math.isfinite(x) or x == xb:
            return


def _float32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def _near(x: float, value: float, rel: float = 1e-6) -> bool:
    return abs(x - value) <= rel * abs(value)


_ONE_STEP_HINT = (
    "the teacher's value is one SGD step: your hooks change the backward, not ψ — a hook on θ "
    "registered after the inner autograd.grad never fires, and one on the inner-gradient tensors "
    "rewrites only the gradient flowing back into them"
)


def _eta_hint(found: float, loop: InnerLoop) -> str:
    horizon = loop.replace(jacobian_step="horizon").eta
    if loop.steps > 1 and _near(found, horizon):
        return (
            'η = γKα, jacobian_step="horizon" — e.g. the derived gradient (θ − φ_K)/(Kα) stepped by Kα '
            "(lazymaml's lazy_horizon)"
        )
    return (
        "a derived gradient (θ − φ_K)/s followed by one step of size s is jacobian_step=s "
        f"(here s = {found:.9g})"
    )


def _scale_hint(scale: float, tasks: int, inner_lr: float | None) -> str:
    if tasks > 1 and _near(scale, tasks):
        return f"the sum over the {tasks} tasks instead of their mean"
    if tasks > 1 and _near(scale, 1 / tasks):
        return f"divided by the number of tasks ({tasks}) once too often"
    if _near(scale, -1.0):
        return "the sign is flipped (the loss negated, or a step up the meta-gradient)"
    if inner_lr is not None and (_near(scale, inner_lr) or _near(scale, 1 / inner_lr)):
        return "a stray factor of the inner learning rate"
    return ""


def _lr_hint(found: float, inner_lr: float) -> str:
    rounded = _float32(inner_lr)
    if rounded != inner_lr and abs(found - rounded) <= 1e-3 * abs(rounded - inner_lr):
        return f"α rounded to float32 ({rounded!r}), e.g. α stored as a float32 tensor"
    if _near(found, inner_lr**2):
        return "α² — the learning rate applied twice"
    return ""


def _shares(report: Report, count: int = 3) -> tuple[tuple[str, ...], str]:
    """The parameters with the largest share of ‖c − r‖², and a phrase listing them."""
    total = sum(r.abs_error**2 for r in report.rows) or 1.0
    worst = [r for r in sorted(report.rows, key=lambda r: -r.abs_error)[:count] if r.abs_error > 0]
    phrase = ", ".join(f"{r.name} ({100 * r.abs_error**2 / total:.0f}% of |c − g|²)" for r in worst)
    return tuple(r.name for r in worst), phrase


def _zero_rows(report: Report, rtol: float, atol: float) -> str:
    """A sentence about the parameters whose true meta-gradient is ≈0 and the candidate's is not."""
    rows = [r for r in report.rows if report.negligible(r) and not report.passes(r, rtol, atol)]
    if not rows:
        return ""
    largest = max(r.candidate_norm for r in rows)
    return (
        f"; {', '.join(r.name for r in rows)} should get ≈0 (e.g. biases a normalisation subtracts out) but "
        f"get up to |c| = {largest:.1e}: suspect the normalisation layer's backward (one known cause: "
        "torch.func.grad under vmap through BatchNorm, differentiated again by autograd)"
    )


@torch.enable_grad()
def diagnose(
    candidate_gradient: Mapping[str, Tensor],
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
    rtol: float | None = None,
    atol: float = ATOL,
    reference: ReferenceFunction | None = None,
    reference_gradient: Mapping[str, Tensor] | None = None,
) -> Diagnosis:
    """Name what ``candidate_gradient`` computes, by the reference under nearby settings.

    ``reference`` is None for the exact oracle, or a :data:`ReferenceFunction` (module
    docstring). ``rtol`` defaults to the candidate's precision and ``atol`` to 0
    (:mod:`gradcheck.tolerances`). ``reference_gradient``, the reference's meta-gradient under
    the requested settings where already known, saves one reference call. The model is left
    exactly as it was. ``inner_lr`` may hold learned rates, ``per_step_lr``, ``query_weights`` and
    ``step_kwarg`` are the settings of :class:`gradcheck.settings.InnerLoop`; a learned rate's
    meta-gradient is expected under its key (its parameter name for a model's own rate, else
    ``"inner_lr"`` / ``"inner_lr.<name>"``).
    """
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
    return run(candidate_gradient, source, rtol=rtol, atol=atol, truth=reference_gradient)


def run(
    candidate: Mapping[str, Tensor],
    reference: Reference,
    *,
    rtol: float | None = None,
    atol: float = ATOL,
    truth: Mapping[str, Tensor] | None = None,
) -> Diagnosis:
    """:func:`diagnose` against a :class:`Reference` (``truth``: its gradient under the requested
    settings, where already known): the screen, then the hypotheses in order, then the finish."""
    started = time.perf_counter()
    rtol = default_rtol(candidate) if rtol is None else rtol
    truth = dict(truth) if truth is not None else reference()
    report = compare(candidate, truth, rates=reference.rate_keys)
    absent = [k for k in report.missing if k in reference.rate_keys]
    if absent and absent == report.missing and not (report.unexpected or report.mismatched):
        # no gradient for a learned rate is a zero one: the hypotheses say what the rest is
        candidate = {**candidate, **{k: torch.zeros_like(truth[k]) for k in absent}}
        report = compare(candidate, truth, rates=reference.rate_keys)
    found = _screen(report, rtol, atol, reference) or _search(candidate, truth, report, reference, rtol, atol)
    if absent and found.label == "exact":  # θ agrees, the rates' gradient is ≈0 and was left out
        found = Diagnosis(
            "unexplained",
            f"the candidate agrees with {reference.name} on θ but returns no meta-gradient for the "
            f"learned inner rates {absent} (return them under these keys)",
        )
    return _finish(found, report, reference, started)


def _zero_hint(reference: Reference) -> str:
    """The likely cause of a zero candidate: for the oracle, higher's detached θ; for a reference
    with a lazy step, also the derived gradient built with θ's graph."""
    if reference.is_oracle:
        return "e.g. θ detached before the inner loop (higher's default copy_initial_weights=True)"
    if "jacobian_step" in reference.varies:
        return (
            "e.g. the derived gradient d = (θ − φ_K)/α built with θ's graph: then θ − α·d = φ_K "
            "cancels θ (detach θ in d, so that only the step's own inner gradient carries θ), or θ "
            "detached before the inner loop"
        )
    return "e.g. θ detached before the inner loop, or an inner loop whose result does not depend on θ"


def _screen(report: Report, rtol: float, atol: float, reference: Reference) -> Diagnosis | None:
    """The verdicts that need no further reference call: names or shapes differ, not finite,
    exact, zero; None when the candidate needs explaining."""
    overall, name = report.overall, reference.name
    if not report.keys_match:
        wrong = f"missing {report.missing}, unexpected {report.unexpected}, wrong shapes {report.mismatched}"
        return Diagnosis("unexplained", f"the candidate's names or shapes differ from the model's: {wrong}")
    broken = [r.name for r in report.rows if not math.isfinite(r.abs_error)]
    if broken:
        return Diagnosis("unexplained", f"the candidate is not finite (NaN or inf) in {', '.join(broken)}")
    if report.ok(rtol, atol):
        return Diagnosis("exact", f"agrees with {name} (relative error {overall.rel_error:.1e})")
    if overall.candidate_norm <= atol + rtol * overall.reference_norm:
        return Diagnosis(
            "no_meta_gradient",
            f"the candidate is zero (|c| = {overall.candidate_norm:.1e}, |g| = "
            f"{overall.reference_norm:.1e} for {name}): nothing flows back to θ — {_zero_hint(reference)}",
            hypothesis="zero",
            residual=overall.candidate_norm / (overall.reference_norm or 1.0),
        )
    return None


def _search(
    candidate: Mapping[str, Tensor],
    truth: Mapping[str, Tensor],
    report: Report,
    reference: Reference,
    rtol: float,
    atol: float,
) -> Diagnosis:
    """The first hypothesis that explains the candidate to (rtol, atol), or the closest one."""
    norm = report.overall.reference_norm or 1.0
    closest, settings_tried = (math.inf, ""), 0
    skipped: list[str] = []
    for hypothesis in _hypotheses(candidate, truth, report, reference, skipped):
        fit = compare(candidate, hypothesis.gradient(reference, truth))
        residual = fit.overall.abs_error / norm
        closest = min(closest, (residual, hypothesis.what(reference.name)))
        settings_tried += bool(hypothesis.change)
        if fit.ok(rtol, atol):
            return Diagnosis(
                hypothesis.label,
                hypothesis.explanation(reference.name),
                hypothesis=hypothesis.description,
                settings=dict(hypothesis.change),
                scale=hypothesis.scale if hypothesis.label == "scaled" else None,
                residual=residual,
                skipped=tuple(skipped),
            )
    residual, what = closest
    lazy = "jacobian_step" in reference.varies
    kinds = (
        ("first order, " if reference.is_oracle or lazy else "")
        + "adapted sets, K ± 1"
        + ("" if reference.is_oracle else ", K = 1")
        + (", the derived gradient not divided by α, fits of α, η and γ" if lazy else ", fits of α and γ")
    )
    return Diagnosis(
        "unexplained",
        f"no nearby setting of {reference.name} explains the candidate (tried the scale, zero and "
        f"{settings_tried} settings — {kinds}); closest: {what} (|c − g_h|/|g| = {residual:.1e}, against "
        f"{report.overall.rel_error:.1e} for the requested settings){_zero_rows(report, rtol, atol)}"
        f"{_HOOKS_HINT if lazy else ''}{_not_tried(skipped)}",
        hypothesis=what,
        residual=residual,
        skipped=tuple(skipped),
    )


def _not_tried(skipped: list[str]) -> str:
    return f"; not tried: {'; '.join(skipped)}" if skipped else ""


_HOOKS_HINT = (
    "; in a lazy implementation by backward hooks: a hook on θ changes what the inner "
    "autograd.grad returns, a hook on the inner-gradient tensors changes only the backward into "
    "them — ψ's value then stays one SGD step from θ and the backward into g becomes the hook's "
    "value, g = ∇L_Q(φ_1) + H(θ)·d, no setting of the reference"
)


def _finish(found: Diagnosis, report: Report, reference: Reference, started: float) -> Diagnosis:
    """``found`` with the parameters that disagree most, the reference's name and the cost."""
    disagree, shares = _shares(report)
    detail = found.detail
    if found.label not in ("exact", "scaled", "no_meta_gradient") and shares:  # those: c − g ∝ g
        detail += f"; the parameters that disagree most: {shares}"
    return dataclasses.replace(
        found,
        detail=detail,
        disagree=() if found.label == "exact" else disagree,
        oracle_calls=reference.calls,
        seconds=time.perf_counter() - started,
        reference=reference.name,
    )


def _hypotheses(
    candidate: Mapping[str, Tensor],
    truth: Mapping[str, Tensor],
    report: Report,
    reference: Reference,
    skipped: list[str],
) -> Iterator[_Hypothesis]:
    """Every hypothesis, cheapest and likeliest first: the rates detached, the scale, first order
    (the oracle only), the last step only, per-step rates shared, the likely adapted sets, K ± 1,
    the fit of α, one module at a time, the fit of γ. What cannot be run here is appended to
    ``skipped``, with the reason."""
    loop, name = reference.loop, reference.name

    def vector(g: Mapping[str, Tensor]) -> Tensor:
        return flat(g[n] for n in truth).detach().double()

    c, g = vector(candidate), vector(truth)
    yield from _zero_rates(reference, truth)
    if report.overall.reference_norm:
        s = torch.dot(c, g).item() / torch.dot(g, g).item()
        yield _Hypothesis(
            "scaled",
            f"{s:.6g} × {name}",
            f"the candidate is {s:.6f} × {name} (cosine {report.overall.cosine:.7f})",
            _scale_hint(s, len(reference.tasks), None if loop.learned else loop.lr("the scale hint")),
            scale=s,
        )
    lazy = "jacobian_step" in reference.varies
    if lazy and loop.eta > 0:
        yield _Hypothesis(
            "first_order",
            "η = 0 (first-order MAML)",
            "the candidate equals first-order MAML, ∇L_Q(φ_T) without the one-step Hessian term",
            "e.g. a hook that returns d itself instead of g + (d − g).detach(), or the inner gradient "
            "taken without create_graph=True",
            {"jacobian_step": 0.0},
        )
    if reference.is_oracle:
        order = "second-order MAML" if loop.first_order else "first-order MAML"
        why = (
            ""
            if loop.first_order
            else "the inner gradients taken as constants — e.g. create_graph=False in the inner step"
        )
        yield _Hypothesis(
            "first_order", order, f"the candidate equals {order}", why, {"first_order": not loop.first_order}
        )
    yield from _multi_step(loop)
    yield from _per_step_shared(reference)
    likely, per_module = _adapted_sets(reference.model, reference.adapted, reference.adaptable)
    yield from _with_rates(likely, reference, skipped)
    one = (1,) if not reference.is_oracle and loop.steps > 2 else ()  # one step where K were asked
    for steps in (loop.steps - 1, loop.steps + 1, *one):
        if steps < 0:
            continue
        change, transform, why = _steps_change(reference, steps)
        if why:
            skipped.append(f"K = {steps} ({why})")
            continue
        detail = f"the candidate takes K = {steps} inner step{'s' * (steps != 1)}, not {loop.steps}"
        hint = "an off-by-one in the inner loop" if abs(steps - loop.steps) == 1 else "one step only"
        if steps == 1 and lazy:
            hint = _ONE_STEP_HINT
        yield _Hypothesis("steps", f"K = {steps}", detail, hint, change, transform=transform)
    if (
        lazy
        and not loop.learned
        and loop.query_weights is None
        and loop.steps > 0
        and loop.leap * loop.lr("the leap hypothesis") <= 1
    ):
        fraction = loop.leap * loop.lr("the leap hypothesis")
        yield _Hypothesis(
            "leap",
            f"γ′ = γα = {fraction!r} at η = {loop.eta!r}",
            f"the candidate scores the teacher θ + γα(φ_K − θ), not θ + γ(φ_K − θ), with the one-step "
            f"Jacobian unchanged (η = {loop.eta:g})",
            "the derived gradient not divided by α — d = θ − φ_K instead of (θ − φ_K)/α, so that "
            "ψ = θ − α·d = θ + α(φ_K − θ)",
            {"leap": fraction, "jacobian_step": loop.eta},
        )
    if lazy and loop.eta > 0:
        # η in log space (η′ > 0), probing γKα ("horizon") first where it differs
        eta = loop.eta
        at_eta = lambda x: vector(reference(loop.replace(jacobian_step=eta * math.exp(x))))  # noqa: E731
        horizon = loop.replace(jacobian_step="horizon").eta
        probe = math.log(horizon / eta) if horizon != eta else 1e-3
        for x in _secant(at_eta, c, (0.0, g), probe, (-math.log(1e3), math.log(1e3)), 1.0):
            value = eta * math.exp(x)
            detail = (
                f"the candidate's one-step Jacobian is I − η′H(θ) with η′ = {value!r}, not η = {eta!r} "
                f"(relative {value / eta - 1:+.2e})"
            )
            yield _Hypothesis(
                "jacobian_step", f"η′ = {value!r}", detail, _eta_hint(value, loop), {"jacobian_step": value}
            )
    if loop.learned:  # no one α to fit: the rates are tensors (their own hypotheses are above)
        skipped.append("a fitted α′ (the inner rates are learned tensors)")
    else:  # α in log space (α′ > 0), probing α's float32 rounding first
        lr = loop.lr("the step-size hypothesis")
        at_lr = lambda x: vector(reference(loop.replace(inner_lr=lr * math.exp(x))))  # noqa: E731
        probe, bounds = math.log(_float32(lr) / lr) or 1e-3, (-math.log(1e3), math.log(1e3))
        for x in _secant(at_lr, c, (0.0, g), probe, bounds, 1.0):
            value = lr * math.exp(x)
            detail = (
                f"the candidate's inner step size is α′ = {value!r}, not {lr!r} "
                f"(relative {value / lr - 1:+.2e})"
            )
            yield _Hypothesis("inner_lr", f"α′ = {value!r}", detail, _lr_hint(value, lr), {"inner_lr": value})
    yield from _with_rates(per_module, reference, skipped)
    if loop.query_weights is not None:  # a multi-step loss scores φ_1 … φ_K themselves: no teacher
        skipped.append("a fitted γ′ (a multi-step loss has no teacher's fraction)")
        return
    leap = loop.leap
    at_leap = lambda x: vector(reference(loop.replace(leap=x)))  # noqa: E731
    probe = leap - 1e-3 if _float32(leap) == leap else _float32(leap)
    for x in _secant(at_leap, c, (leap, g), probe, (1e-6, 1.0), 1.0):
        detail = f"the candidate scores the teacher θ + γ′(φ_K − θ) at γ′ = {x:.9g}, not γ = {leap:g}"
        yield _Hypothesis("leap", f"γ′ = {x!r}", detail, change={"leap": x})


# --- learned rates and the multi-step loss ------------------------------------------------------


def _zero_rates(reference: Reference, truth: Mapping[str, Tensor]) -> Iterator[_Hypothesis]:
    """``rates_detached``: θ's part of the reference, zero for every learned rate — the rates were
    used as constants (their values are right, so θ's meta-gradient is unchanged)."""
    keys = [k for k in reference.rate_keys if k in truth]
    if not keys or not any(bool(truth[k].any()) for k in keys):
        return
    yield _Hypothesis(
        "rates_detached",
        f"{reference.name} with the learned rates' gradients zero",
        f"the candidate's meta-gradient of θ agrees with {reference.name}, but it has none for the "
        f"learned inner rates ({_names(tuple(keys))})",
        "the rates were used as constants, e.g. .detach() or .item() on the learning rate, or an "
        "optimizer that does not see them",
        transform=lambda g: {n: torch.zeros_like(t) if n in keys else t for n, t in g.items()},
    )


def _multi_step(loop: InnerLoop) -> Iterator[_Hypothesis]:
    """``last_step_only``: with ``query_weights`` w, the candidate scores L_Q(φ_K) alone (weight 1,
    or w_{K−1}, the last step's weight)."""
    if loop.query_weights is None:
        return
    last = loop.query_weights[-1]
    for weight in dict.fromkeys((1.0, last)):
        scale = f"{weight:g} × " if weight != 1 else ""
        yield _Hypothesis(
            "last_step_only",
            f"the last step's query loss only ({scale}L_Q(φ_K))",
            f"the candidate scores only {scale}L_Q(φ_K), not the multi-step loss Σ_k w_k L_Q(φ_(k+1)) "
            f"with w = {list(loop.query_weights)}",
            "the multi-step loss not applied (e.g. it is on only for the first epochs, or never switched on)",
            {"query_weights": None},
            scale=weight,
        )


def _variant(
    reference: Reference,
    steps: int,
    make: Callable[[Tensor], Tensor],
    back: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Any, Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]]]:
    """New rate tensors ``make(α)`` (detached copies, as learned as α), as ``inner_lr`` is given,
    and the transform that takes the reference's gradient under them back to the requested
    rates: ``back(gradient, α)`` under α's own key (a model's rate parameter keeps its name)."""
    rates, schedule = reference.loop.inner_lr, reference.schedule
    assert isinstance(rates, Rates) and schedule is not None
    made: dict[int, Tensor] = {}

    def new(t: Tensor) -> Tensor:
        if id(t) not in made:
            made[id(t)] = make(t.detach()).clone().requires_grad_(t.requires_grad)
        return made[id(t)]

    given = rates.given
    changed = new(given) if isinstance(given, Tensor) else {n: new(t) for n, t in rates.tensors.items()}
    keys = Rates.of(changed, rates.per_step).resolve(reference.model, reference.adapted, steps).keys

    def transform(g: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        out = dict(g)
        for n in schedule.keys:
            out.pop(keys[n], None)
        for n, old in schedule.keys.items():
            out[old] = back(g[keys[n]], schedule.rates[n])
        return out

    return changed, transform


def _per_step_shared(reference: Reference) -> Iterator[_Hypothesis]:
    """``per_step_rates_shared``: per-step rates α_0 … α_(S−1), but the candidate steps with α_0 at
    every step. Its gradient is the reference's at the collapsed rates α′_k = α_0 (every k), with
    each rate's gradient summed over the steps into index 0 (the only entry the candidate reads)
    and zero at the others — by the chain rule, ∂F/∂α_0 = Σ_k ∂F/∂α′_k there."""
    loop = reference.loop
    if not (loop.learned and loop.per_step_lr and loop.steps > 1 and reference.rate_keys):
        return

    def back(grad: Tensor, rate: Tensor) -> Tensor:
        out = torch.zeros_like(grad)
        out[0] = grad.sum(0)
        return out

    changed, transform = _variant(reference, loop.steps, lambda t: t[:1].expand_as(t), back)
    yield _Hypothesis(
        "per_step_rates_shared",
        "one rate for every step (each per-step rate's index 0)",
        f"the candidate steps with the per-step rates' first entry α_0 at all {loop.steps} steps, "
        "its rate gradient summed into index 0",
        "the step index not passed to the rates (e.g. lr[0] in the loop, or num_step fixed at 0)",
        {"inner_lr": changed},
        transform=transform,
    )


def _steps_change(
    reference: Reference, steps: int
) -> tuple[dict[str, Any], Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None, str]:
    """The change for the hypothesis K′ = ``steps``, the transform of its gradient, or why it
    cannot be run. Per-step rates of S entries: a candidate with more than S steps has no rate
    for them; with S > K′ + 1 the reference runs with the first K′ + 1 (the candidate's gradient
    of the others is zero). ``query_weights``: K′ < K scores the first K′ weights; K′ > K has no
    weight for the extra step. A step index (``step_kwarg``): K′ > K would index a step the model
    need not have."""
    loop = reference.loop
    change: dict[str, Any] = {"steps": steps}
    if steps > loop.steps and loop.step_kwarg is not None:
        return (
            change,
            None,
            f"the model is told the step index by {loop.step_kwarg!r}: it may have no step {loop.steps}",
        )
    if loop.query_weights is not None:
        if steps > loop.steps:
            return change, None, "query_weights has no weight for an extra step"
        change["query_weights"] = loop.query_weights[:steps] or None
    if not (loop.learned and loop.per_step_lr and reference.schedule is not None):
        return change, None, ""
    entries = {int(t.shape[0]) for t in reference.schedule.rates.values()}
    if max(entries) < steps:
        return change, None, f"the per-step rates have {max(entries)} entries, too few for {steps} steps"
    if max(entries) <= steps + 1:
        return change, None, ""

    def back(grad: Tensor, rate: Tensor) -> Tensor:
        out = grad.new_zeros(rate.shape)
        out[: grad.shape[0]] = grad
        return out

    changed, transform = _variant(reference, steps, lambda t: t[: steps + 1], back)
    change["inner_lr"] = changed
    return change, transform, ""


def _with_rates(
    hypotheses: Sequence[_Hypothesis], reference: Reference, skipped: list[str]
) -> Iterator[_Hypothesis]:
    """The adapted-set hypotheses under rates given per parameter: a subset of the requested set
    keeps the rates of its members (the others are not stepped: their rates get no gradient); a
    set with a parameter that has no rate cannot be run."""
    rates = reference.loop.inner_lr
    if not isinstance(rates, Rates) or "" in rates.tensors:  # one α or one rate for all: any set
        yield from hypotheses
        return
    requested, left_out = set(reference.adapted), 0
    for h in hypotheses:
        chosen = h.change["adapt"]
        if not set(chosen) <= requested:
            left_out += 1
            continue
        given = {n: rates.tensors[n] for n in chosen}
        yield dataclasses.replace(h, change={**h.change, "inner_lr": given})
    if left_out:
        skipped.append(f"{left_out} adapted sets with parameters that have no inner rate")
