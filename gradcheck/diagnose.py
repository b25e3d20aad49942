"""What a candidate meta-gradient computes instead, when it is not the oracle's.

The discrepancies found in real MAML code fall into a few classes, each the exact meta-gradient
of a nearby setting. :func:`diagnose` computes the oracle g_h under such hypotheses h and names
the first that explains the candidate c to the checking tolerance — ``compare(c, g_h).ok(rtol,
atol)``, the same test as the verdict — in this order (oracle calls in brackets), each setting
computed once:

=====================  ===============================================  ======================
label                  hypothesis [oracle calls]                        typical cause
=====================  ===============================================  ======================
``exact``              c = g [0]                                        —
``no_meta_gradient``   ‖c‖ ≤ atol + rtol ‖g‖ [0]                         θ detached (``higher``'s
                                                                        copy_initial_weights)
``scaled``             c = s g, s = ⟨c, g⟩/⟨g, g⟩ (least squares) [0]    sum over B tasks, not
                                                                        the mean (s = B)
``first_order``        first-order MAML [1]                             ``create_graph=False``
``adapt``              the presets (all, head, body), all but the       BatchNorm's affine
                       modules of one type [1 each]                     parameters not adapted;
                                                                        ANIL vs MAML
``steps``              K − 1, K + 1 [1 each]                            an off-by-one
``inner_lr``           α′ by a 1-D fit of ‖c − g(α′)‖ [≤ 8]             α held in float32;
                                                                        α applied twice
``adapt``              all but / only / also each module [1 each]       one layer left out
``leap``               γ′ ∈ (0, 1] by the same fit [≤ 8]                 the teacher's fraction
``unexplained``        none of these                                    —
=====================  ===============================================  ======================

Every hypothesis but ``scaled`` changes one setting of the oracle, so one that explains c to
rtol = 1e-9 pins the cause: two different settings agree that closely only by accident.

**The 1-D fit** (α in log space, so α′ > 0; γ directly, clipped to (0, 1]) is secant
Gauss–Newton: with J the difference quotient of the last two evaluated gradients, the next x is
x + ⟨c − g(x), J⟩/⟨J, J⟩ (the least-squares step of the linearised residual), at most 1 away.
Its first probe is the requested value rounded to float32, so the α of a float32 tensor — a
relative deviation of ~1e-8 — costs one oracle call; a general α′ takes a few, the error
shrinking superlinearly. A fit gives up as soon as its step would remove less than a tenth of
‖c − g(x)‖: the discrepancy is then not along the curve.

When nothing explains c, the diagnosis names the closest hypothesis (smallest ‖c − g_h‖/‖g‖),
the parameters with the largest share of ‖c − g‖², and any parameter whose true gradient is ≈0
(:meth:`gradcheck.Report.negligible`) but the candidate's is not — the signature of a wrong
normalisation backward.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import oracle
from .compare import Report, compare, default_rtol
from .parameters import Adapt, flat, resolve_adapt, trainable, unflat
from .settings import InnerLoop, InnerOptimizer
from .task import Tasks, as_tasks

__all__ = ["LABELS", "Diagnosis", "diagnose"]

LABELS = (
    "exact",
    "scaled",
    "no_meta_gradient",
    "first_order",
    "adapt",
    "steps",
    "inner_lr",
    "leap",
    "unexplained",
)
FIT_CALLS = 8  # oracle evaluations per 1-D fit, the starting probe included
STALL = 0.9  # a fit stops when its next step would leave more than this share of ‖c − g(x)‖
NORMALISATION = ("BatchNorm", "GroupNorm", "LayerNorm", "InstanceNorm")


@dataclass(frozen=True)
class Diagnosis:
    """What the candidate computes: ``label`` (one of :data:`LABELS`) and a sentence, ``detail``.

    ``settings`` holds the oracle settings that reproduce the candidate (``{"steps": 4}``,
    ``{"inner_lr": 0.10000000149}``, ``{"adapt": (...)}``, ``{"first_order": True}``), ``scale``
    the factor for ``"scaled"``; ``residual`` is ‖c − g_h‖/‖g‖ for the explaining hypothesis h
    (for ``"unexplained"``, the closest one, named by ``hypothesis``); ``disagree`` names the
    parameters with the largest share of ‖c − g‖²; ``oracle_calls`` and ``seconds`` are the cost.
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

    def __str__(self) -> str:
        return f"diagnosis: {self.label} — {self.detail}"


@dataclass(frozen=True)
class _Hypothesis:
    """A nearby setting: the oracle with ``change`` applied, and what it means if it explains c."""

    label: str
    description: str
    change: dict[str, Any]
    detail: str


class _Oracle:
    """The oracle under settings near the requested ones, each computed once."""

    def __init__(self, model: nn.Module, tasks: Tasks, settings: dict[str, Any]) -> None:
        self.model, self.tasks, self.settings = model, tasks, settings
        self.cache: dict[tuple[tuple[str, Any], ...], dict[str, Tensor]] = {}
        self.calls = 0

    def __call__(self, **change: Any) -> dict[str, Tensor]:
        s = {**self.settings, **change}
        key = tuple(sorted(s.items()))
        if key not in self.cache:
            self.calls += 1
            self.cache[key] = oracle.meta_gradient(
                self.model,
                self.tasks,
                s["steps"],
                s["inner_lr"],
                adapt=list(s["adapt"]),
                leap=s["leap"],
                first_order=s["first_order"],
                inner_optimizer=s["inner_optimizer"],
            )
        return self.cache[key]


def _names(chosen: tuple[str, ...], limit: int = 6) -> str:
    shown = ", ".join(chosen[:limit])
    return shown + (f", … ({len(chosen)} in all)" if len(chosen) > limit else "")


def _adapted_sets(
    model: nn.Module, requested: tuple[str, ...]
) -> tuple[list[_Hypothesis], list[_Hypothesis]]:
    """Adapted sets near the requested one A, in two tiers — the presets and the modules of one
    type (few, likely), then one module at a time (three per module) — no set twice, never A."""
    names = tuple(trainable(model))
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
            likely.append((what, resolve_adapt(model, preset), why))
    for kind in dict.fromkeys(kinds.values()):
        members = [n for prefix, mine in owners.items() if kinds[prefix] == kind for n in mine]
        why = f"the {kind} modules' parameters kept out of the inner loop"
        if kind.startswith(NORMALISATION):
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
                out.append(
                    _Hypothesis("adapt", f"adapt = {what}", {"adapt": chosen}, f"{detail}: e.g. {why}")
                )
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


def _scale_hint(scale: float, tasks: int, inner_lr: float) -> str:
    if tasks > 1 and _near(scale, tasks):
        return f": the sum over the {tasks} tasks instead of their mean"
    if tasks > 1 and _near(scale, 1 / tasks):
        return f": divided by the number of tasks ({tasks}) once too often"
    if _near(scale, -1.0):
        return ": the sign is flipped (the loss negated, or a step up the meta-gradient)"
    if _near(scale, inner_lr) or _near(scale, 1 / inner_lr):
        return ": a stray factor of the inner learning rate"
    return ""


def _lr_hint(found: float, inner_lr: float) -> str:
    rounded = _float32(inner_lr)
    if rounded != inner_lr and abs(found - rounded) <= 1e-3 * abs(rounded - inner_lr):
        return f": α rounded to float32 ({rounded!r}), e.g. α stored as a float32 tensor"
    if _near(found, inner_lr**2):
        return ": α² — the learning rate applied twice"
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


def _hypotheses(
    at: _Oracle, candidate: Tensor, truth: Tensor, like: Mapping[str, Tensor], model: nn.Module
) -> Iterator[tuple[_Hypothesis, Mapping[str, Tensor]]]:
    """Every hypothesis that costs oracle calls, cheapest and likeliest first, with its gradient."""
    s = at.settings
    loop_lr, k, first_order = s["inner_lr"], s["steps"], s["first_order"]
    order = "second-order MAML" if first_order else "first-order MAML"
    why = (
        ""
        if first_order
        else ": the inner gradients taken as constants — e.g. create_graph=False in the inner step"
    )
    hypothesis = _Hypothesis(
        "first_order", order, {"first_order": not first_order}, f"the candidate equals {order}{why}"
    )
    yield hypothesis, at(**hypothesis.change)
    likely, per_module = _adapted_sets(model, s["adapt"])
    for hypothesis in likely:
        yield hypothesis, at(**hypothesis.change)
    for steps in (k - 1, k + 1):
        if steps >= 0:
            detail = f"the candidate takes K = {steps} inner steps, not {k} (an off-by-one in the inner loop)"
            hypothesis = _Hypothesis("steps", f"K = {steps}", {"steps": steps}, detail)
            yield hypothesis, at(**hypothesis.change)

    def vector(g: Mapping[str, Tensor]) -> Tensor:
        return flat(g[n] for n in like).detach().double()

    # α in log space (α′ > 0), probing α's float32 rounding first
    probe = math.log(_float32(loop_lr) / loop_lr) or 1e-3
    bounds = (-math.log(1e3), math.log(1e3))
    lr_at = lambda x: at(inner_lr=loop_lr * math.exp(x))  # noqa: E731
    for x in _secant(lambda x: vector(lr_at(x)), candidate, (0.0, truth), probe, bounds, 1.0):
        value = loop_lr * math.exp(x)
        detail = (
            f"the candidate's inner step size is α′ = {value!r}, not {loop_lr!r} "
            f"(relative {value / loop_lr - 1:+.2e}){_lr_hint(value, loop_lr)}"
        )
        yield _Hypothesis("inner_lr", f"α′ = {value!r}", {"inner_lr": value}, detail), lr_at(x)
    for hypothesis in per_module:
        yield hypothesis, at(**hypothesis.change)
    leap = s["leap"]
    probe = leap - 1e-3 if _float32(leap) == leap else _float32(leap)
    for x in _secant(lambda x: vector(at(leap=x)), candidate, (leap, truth), probe, (1e-6, 1.0), 1.0):
        detail = f"the candidate scores the teacher θ + γ′(φ_K − θ) at γ′ = {x:.9g}, not γ = {leap:g}"
        yield _Hypothesis("leap", f"γ′ = {x!r}", {"leap": x}, detail), at(leap=x)


@torch.enable_grad()
def diagnose(
    candidate_gradient: Mapping[str, Tensor],
    model: nn.Module,
    task_or_tasks: Tasks,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    first_order: bool = False,
    inner_optimizer: InnerOptimizer = "sgd",
    rtol: float | None = None,
    atol: float = 0.0,
    reference: Mapping[str, Tensor] | None = None,
) -> Diagnosis:
    """Name what ``candidate_gradient`` computes, by the oracle under nearby settings.

    ``rtol`` defaults to the candidate's precision (:func:`gradcheck.compare.default_rtol`).
    ``reference``, the oracle's meta-gradient under the requested settings where already known,
    saves one oracle call. The model is left exactly as it was.
    """
    started = time.perf_counter()
    loop = InnerLoop(steps, inner_lr, leap, inner_optimizer)
    loop.require("sgd", "adam", by="diagnose (through the oracle)")
    tasks = as_tasks(task_or_tasks)
    rtol = default_rtol(candidate_gradient) if rtol is None else rtol
    settings = {
        "steps": loop.steps,
        "inner_lr": loop.inner_lr,
        "leap": loop.leap,
        "first_order": first_order,
        "inner_optimizer": inner_optimizer,
        "adapt": resolve_adapt(model, adapt),
    }
    at = _Oracle(model, tasks, settings)
    truth = dict(reference) if reference is not None else at()
    report = compare(candidate_gradient, truth)
    disagree, shares = _shares(report)

    def finish(label: str, detail: str, **extra: Any) -> Diagnosis:
        if label not in ("exact", "scaled", "no_meta_gradient") and shares:  # those: c − g ∝ g
            detail += f"; the parameters that disagree most: {shares}"
        return Diagnosis(
            label,
            detail,
            disagree=() if label == "exact" else disagree,
            oracle_calls=at.calls,
            seconds=time.perf_counter() - started,
            **extra,
        )

    overall = report.overall
    if not report.keys_match:
        wrong = f"missing {report.missing}, unexpected {report.unexpected}, wrong shapes {report.mismatched}"
        return finish("unexplained", f"the candidate's names or shapes differ from the model's: {wrong}")
    broken = [r.name for r in report.rows if not math.isfinite(r.abs_error)]
    if broken:
        return finish("unexplained", f"the candidate is not finite (NaN or inf) in {', '.join(broken)}")
    if report.ok(rtol, atol):
        return finish("exact", f"agrees with the oracle (relative error {overall.rel_error:.1e})")
    if overall.candidate_norm <= atol + rtol * overall.reference_norm:
        return finish(
            "no_meta_gradient",
            f"the candidate is zero (|c| = {overall.candidate_norm:.1e}, |g| = "
            f"{overall.reference_norm:.1e}): nothing flows back to θ — e.g. θ detached before the inner "
            "loop (higher's default copy_initial_weights=True)",
            hypothesis="zero",
            residual=overall.candidate_norm / (overall.reference_norm or 1.0),
        )
    names = list(truth)
    c = flat(candidate_gradient[n] for n in names).detach().double()
    g = flat(truth[n] for n in names).detach().double()
    norm = overall.reference_norm or 1.0
    closest = (math.inf, "")

    def explains(description: str, hypothesis: Mapping[str, Tensor]) -> tuple[bool, float]:
        nonlocal closest
        fit = compare(candidate_gradient, hypothesis)
        residual = fit.overall.abs_error / norm
        closest = min(closest, (residual, description))
        return fit.ok(rtol, atol), residual

    if overall.reference_norm:
        scale = torch.dot(c, g).item() / torch.dot(g, g).item()
        ok, residual = explains(f"{scale:.6g} × the oracle", unflat(scale * g, truth))
        if ok:
            hint = _scale_hint(scale, len(tasks), loop.inner_lr)
            return finish(
                "scaled",
                f"the candidate is {scale:.6f} × the oracle's meta-gradient "
                f"(cosine {overall.cosine:.7f}){hint}",
                hypothesis=f"{scale:.6g} × the oracle",
                scale=scale,
                residual=residual,
            )
    tried = 0
    for hypothesis, gradient in _hypotheses(at, c, g, truth, model):
        tried += 1
        ok, residual = explains(hypothesis.description, gradient)
        if ok:
            return finish(
                hypothesis.label,
                hypothesis.detail,
                hypothesis=hypothesis.description,
                settings=hypothesis.change,
                residual=residual,
            )
    residual, description = closest
    return finish(
        "unexplained",
        f"no nearby setting explains the candidate (tried the scale, zero and {tried} settings — first "
        f"order, adapted sets, K ± 1, fits of α and γ); closest: {description} (|c − g_h|/|g| = "
        f"{residual:.1e}, against {overall.rel_error:.1e} for the requested settings)"
        f"{_zero_rows(report, rtol, atol)}",
        hypothesis=description,
        residual=residual,
    )
