"""The comparisons notebook 04 draws from the committed meta-training results: sentences that set
one method against another with their 95% intervals, the best method within a memory or time
budget, where diverged runs stopped, Spearman's rank correlation between a method's deviation
from exact MAML and its result, and the two figures the benchmarks' own plots do not draw (the
sinusoid sweep, deviation against result).

Every function reads the typed records of ``records.py`` (``load_few_shot``, ``load_sinusoid``)
and returns text or a figure: the notebook prints and shows them.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, records.py, the benchmarks
import few_shot
import sinusoid
from common import cell
from records import FewShotResults, FewShotRow, SinusoidResults

CONTROL = "no meta-training"  # the few-shot family of the control rows
EXACT = 1e-8  # deviations from exact MAML below this are rounding: the oracle's own computation


def _known(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def describe(name: str, results: FewShotResults | SinusoidResults) -> str:
    """One line: which run a results file holds (a full run or a --quick smoke run) and its budget."""
    s = results.settings
    kind = "QUICK SMOKE RUN (token budget)" if s["quick"] else "full run"
    return (
        f"{name}: {kind}; {s['outer_steps']} outer steps × meta-batch {s['meta_batch']}, {s['seeds']} seeds, "
        f"{s['test_tasks']} test tasks, {results.wall_seconds / 60:.1f} min wall"
    )


def ci(mean: float | None, half: float | None, scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± half' (the half-width of the 95% interval over seeds; '?' for a single seed)."""
    if not _known(mean):
        return "diverged"
    spread = f"{scale * half:.{digits}f}" if _known(half) else "?"
    return f"{scale * mean:.{digits}f} ± {spread}"


def compare(
    a: Any, b: Any, value: str, half: str, higher_is_better: bool, scale: float = 1.0, digits: int = 2
) -> str:
    """One sentence: row ``a`` against row ``b`` on field ``value`` (interval half-width ``half``),
    and whether their 95% intervals are apart."""
    if a is None or b is None or not _known(getattr(a, value)) or not _known(getattr(b, value)):
        names = " vs ".join(r.label for r in (a, b) if r is not None)
        return f"{names}: nothing to compare (every run of the other side diverged)"
    va, vb, ha, hb = getattr(a, value), getattr(b, value), getattr(a, half), getattr(b, half)
    better = (va > vb) == higher_is_better
    apart = _known(ha) and _known(hb) and abs(va - vb) > ha + hb
    verdict = (
        f"{a.label} is {'better' if better else 'worse'} (intervals apart)"
        if apart
        else "the intervals overlap (no difference resolved at this budget and seed count)"
    )
    return f"{a.label} {ci(va, ha, scale, digits)} vs {b.label} {ci(vb, hb, scale, digits)}: {verdict}"


def best(rows: Iterable[Any], value: str, higher: bool = True) -> Any:
    """The best row by field ``value`` among those where it is finite; None if there is none."""
    known = [r for r in rows if _known(getattr(r, value))]
    return (max if higher else min)(known, key=lambda r: getattr(r, value)) if known else None


def within(rows: Iterable[Any], field: str, limit: float) -> list[Any]:
    """The rows whose ``field`` is known and at most ``limit``."""
    return [r for r in rows if _known(getattr(r, field)) and getattr(r, field) <= limit]


def family(row: FewShotRow) -> str:
    return few_shot.METHODS[row.method].family


def few_shot_headlines(rows: Sequence[FewShotRow]) -> list[str]:
    """For one shot count: the best Lazy row against MAML K = 1 and 5 at equal steps; the best
    trained method within MAML K = 1's graph memory; the best within MAML K = 5's time per step;
    the best trained method against the best control."""
    by_key = {r.method: r for r in rows}
    trained = [r for r in rows if family(r) != CONTROL]
    lazy = best((r for r in trained if r.method.startswith("lazy-")), "accuracy")

    def versus(a: Any, b: Any) -> str:
        return compare(a, b, "accuracy", "ci95", True, 100)

    k1, k5 = by_key["maml-k1"], by_key["maml-k5"]
    lines = [f"  equal steps:  {versus(lazy, maml)}" for maml in (k1, k5)]
    fits = best(within(trained, "graph_mib_per_task", k1.graph_mib_per_task), "accuracy")
    ratio = k5.graph_mib_per_task / k1.graph_mib_per_task
    lines += [
        f"  equal memory: the best within MAML K=1's graph ({k1.graph_mib_per_task:.3f} MiB) "
        f"is {fits.label};",
        f"    {versus(fits, k1)}",
        f"    and against MAML K=5 ({ratio:.2f}× that memory): {versus(fits, k5)}",
    ]
    quick = best(within(trained, "step_ms", k5.step_ms), "accuracy")
    lines.append(
        f"  equal time: within MAML K=5's {k5.step_ms:.1f} ms per step the best is {quick.label}; "
        + versus(quick, k5)
    )
    control = best((r for r in rows if family(r) == CONTROL), "accuracy")
    lines.append(f"  meta-training: {versus(best(trained, 'accuracy'), control)}")
    return lines


def _versus_mse(a: Any, b: Any, equal_time: bool = False) -> str:
    value, half = ("mse_equal_time", "ci95_equal_time") if equal_time else ("mse", "ci95")
    return compare(a, b, value, half, False, digits=3)


def sinusoid_headlines(results: SinusoidResults) -> list[str]:
    """Which curves still improved over the last fifth, which diverged; the best Lazy row against
    MAML K = 1 and 5 at equal steps and at equal time; the best within MAML K = 1's graph memory."""
    summary, settings = results.summary, results.settings
    rows = summary.rows
    k1, k5 = summary.row("maml-k1"), summary.row("maml-k5")
    plateau = settings["plateau"]
    still = [r.label for r in rows if _known(r.mse) and (r.last_fifth_improvement or 0) >= plateau]
    diverged = [r.label for r in rows if not _known(r.mse)]
    lines = [
        f"still improving by ≥ {100 * plateau:.0f}% over the last fifth of {settings['outer_steps']} steps: "
        + (", ".join(still) if still else "none (every curve moved by less than that, or rose)")
        + "; diverged (no final MSE): "
        + (", ".join(diverged) or "none")
    ]
    lazies = [r for r in rows if r.method.startswith("lazy-")]
    lazy, lazy_in_time = best(lazies, "mse", higher=False), best(lazies, "mse_equal_time", higher=False)
    lines += [f"equal steps: {_versus_mse(lazy, maml)}" for maml in (k1, k5)]
    budget = f"{summary.equal_time_seconds:.3g} s"
    lines += [f"equal time ({budget}): {_versus_mse(lazy_in_time, maml, True)}" for maml in (k1, k5)]
    fits = best(within(rows, "graph_bytes_per_task", k1.graph_bytes_per_task), "mse", higher=False)
    ratio = k5.graph_bytes_per_task / k1.graph_bytes_per_task
    lines += [
        f"equal memory: the best within MAML K=1's graph ({k1.graph_bytes_per_task / 1024:.1f} KiB) "
        f"is {fits.label};",
        f"    {_versus_mse(fits, k1)}",
        f"    and against MAML K=5 ({ratio:.2f}× that memory): {_versus_mse(fits, k5)}",
    ]
    return lines


def divergences(results: SinusoidResults, reference: SinusoidResults) -> list[str]:
    """Each method of ``results`` with a diverged run: how many seeds diverged and at which outer
    steps, and its mean MSE at its last checkpoint with every seed finite against MAML K = 1 and
    K = 5 of ``reference`` at the same outer step (or the reference's last checkpoint before it,
    where the two runs' checkpoints differ)."""
    maml = {k: sinusoid.mean_curve(reference.runs_of(k)) for k in ("maml-k1", "maml-k5")}
    marks = [p.step for p in reference.runs[0].curve]
    lines = []
    for key in dict.fromkeys(r.method for r in results.runs):
        runs = results.runs_of(key)
        where = sorted(r.diverged.step for r in runs if r.diverged is not None)
        if not where:
            continue
        curve = sinusoid.mean_curve(runs)
        last = max(i for i, m in enumerate(curve) if math.isfinite(m))
        step = runs[0].curve[last].step
        at = max(i for i, mark in enumerate(marks) if mark <= step)
        against = ", ".join(f"{k.upper().replace('-', ' ')} {maml[k][at]:.3f}" for k in maml)
        against += "" if marks[at] == step else f" (at step {marks[at]})"
        lines.append(
            f"  {key}: {len(where)} of {len(runs)} seeds diverged, at outer steps {where}; "
            f"at step {step} (last checkpoint before) MSE {curve[last]:.3f} vs {against}"
        )
    return lines


def follow_up(name: str, results: SinusoidResults, reference: SinusoidResults) -> list[str]:
    """A follow-up sinusoid run (Lazy alone, another α grid): its settings, its rows, its best row
    against the reference's MAML K = 1 and 5 at equal steps, and where its runs diverged."""
    s = results.settings
    lines = [
        f"{name}: {s['outer_steps']} outer steps, {s['seeds']} seeds, α from {s['inner_lrs']}, "
        f"γ from {s['leaps']}; {results.wall_seconds / 60:.1f} min wall"
    ]
    for r in results.summary.rows:
        late = r.last_fifth_improvement
        lines.append(
            f"  {r.label:<10} α={r.inner_lr:g} γ={r.leap:g}: MSE {ci(r.mse, r.ci95, digits=3)}"
            + ("" if late is None else f", last fifth {100 * late:+.1f}%")
            + f", {cell(r.step_ms, '.1f')} ms/step"
            + f", deviation from MAML {cell(r.deviation_from_maml, '.2e')}"
        )
    fitted = best(results.summary.rows, "mse", higher=False)
    for maml in ("maml-k1", "maml-k5"):
        lines.append(f"  equal steps: {_versus_mse(fitted, reference.summary.row(maml))}")
    return lines + divergences(results, reference)


# ── does a lower deviation from exact MAML mean a better result? ───────────────────────────────
def ranks(values: Sequence[float]) -> list[float]:
    """The rank of each value from 0, tied values sharing the average of their ranks."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start  # the tied run is order[start..end]
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            out[i] = (start + end) / 2
        start = end + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the average ranks (ties handled);
    None for fewer than 3 pairs or where either side is constant."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} xs against {len(ys)} ys")
    if len(xs) < 3:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / norm if norm else None


def approximate(rows: Iterable[Any], value: str) -> list[Any]:
    """The rows of approximate methods (a finite deviation from exact MAML above rounding) with a
    finite ``value``."""
    return [
        r
        for r in rows
        if _known(r.deviation_from_maml) and r.deviation_from_maml > EXACT and _known(getattr(r, value))
    ]


def correlations(rows: Sequence[Any], value: str) -> list[tuple[int | None, float, int]]:
    """Spearman's ρ(deviation from MAML, ``value``) among the approximate rows: per K where at
    least three share it, then over all (K None); (K, ρ, number of rows), where ρ is defined."""
    points = approximate(rows, value)
    groups = [(steps, [r for r in points if steps == r.K]) for steps in sorted({r.K for r in points})]
    out = []
    for k, same in [*groups, (None, points)]:
        rho = spearman([r.deviation_from_maml for r in same], [getattr(r, value) for r in same])
        if rho is not None:
            out.append((k, rho, len(same)))
    return out


def correlation_lines(rows: Sequence[Any], value: str) -> list[str]:
    """``correlations`` as the notebook prints them."""
    lines = []
    for k, rho, n in correlations(rows, value):
        if k is None:
            lines.append(f"  all approximate methods: ρ(deviation, {value}) = {rho:+.2f} over {n}")
        else:
            lines.append(f"  K = {k:>2}: ρ(deviation, {value}) = {rho:+.2f} over {n} configurations")
    return lines or ["  fewer than 3 approximate methods"]


def _colours(keys: Iterable[str], palette: str) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    return dict(zip(keys, plt.get_cmap(palette).colors))


def plot_deviation(few: FewShotResults, sine: SinusoidResults):
    """Result against deviation from exact MAML (log scale), approximate methods only: a panel per
    few-shot shot count (colour: family, marker: K), and the sinusoid's final MSE."""
    import matplotlib.pyplot as plt

    shots = few.settings["shots"]
    fig, axes = plt.subplots(1, len(shots) + 1, figsize=(5.5 * (len(shots) + 1), 4.2))
    colours = _colours(sorted({m.family for m in few_shot.METHODS.values()}), "tab20")
    markers = dict(zip([1, 5, 10, 20, 40], "ovs^D"))
    for ax, shot in zip(axes, shots):
        points = approximate(few.rows(shot), "accuracy")
        for r in points:
            ax.scatter(
                r.deviation_from_maml,
                100 * r.accuracy,
                color=colours[family(r)],
                marker=markers.get(r.K, "o"),
            )
        for name in sorted({family(r) for r in points}):
            ax.scatter([], [], color=colours[name], label=name)
        ax.set(ylabel="meta-test accuracy %", title=f"few-shot, {shot}-shot (marker: K)")
    ax = axes[-1]
    colours = _colours((r.method for r in sine.summary.rows), "tab10")
    for r in approximate(sine.summary.rows, "mse"):
        yerr = r.ci95 if _known(r.ci95) else 0
        ax.errorbar(
            r.deviation_from_maml,
            r.mse,
            yerr=yerr,
            fmt="o",
            color=colours[r.method],
            capsize=3,
            label=r.label,
        )
    ax.set(yscale="log", ylabel="held-out MSE", title="sinusoid")
    for ax in axes:
        ax.set(xscale="log", xlabel="deviation from exact MAML (same K, α, γ)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def plot_sweep(results: SinusoidResults):
    """Per method: the validation MSE at the end of the sweep run against α, a line per γ, the
    chosen point circled."""
    import matplotlib.pyplot as plt

    s, rows = results.settings, results.summary.rows
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 3), sharey=True, squeeze=False)
    for ax, row in zip(axes[0], rows):
        mine = [r for r in results.sweep if r.method == row.method]
        for leap in s["leaps"]:
            points = sorted((r.inner_lr, r.final_mse) for r in mine if r.leap == leap)
            mses = [math.nan if m is None else m for _, m in points]
            ax.plot([a for a, _ in points], mses, "o-", label=f"γ = {leap:g}")
        chosen = results.chosen[row.method]
        picked = next(r for r in mine if (r.inner_lr, r.leap) == (chosen.inner_lr, chosen.leap))
        ax.plot(chosen.inner_lr, picked.final_mse, "o", ms=14, mfc="none", color="black")
        ax.set(xscale="log", yscale="log", xlabel="α", title=row.label)
        ax.set_xticks(s["inner_lrs"], [f"{a:g}" for a in s["inner_lrs"]], minor=False)
        ax.set_xticks([], minor=True)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(f"validation MSE after {s['sweep_steps']} steps")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def sharpness_lines(results: SinusoidResults) -> list[str]:
    """Per method of a run that tracked λ_θ (``sinusoid.py`` probes): where its seeds diverged,
    λ_θ (mean over the probe tasks) at its last checkpoint per seed, the first checkpoint where it
    passed 2/α, its level over the last third of the run (the median of the seeds' medians over
    the checkpoints there, finished seeds only) and the final held-out MSE over seeds."""
    lines = []
    for row in results.summary.rows:
        runs = results.runs_of(row.method)
        limit = 2 / row.inner_lr
        tracked = [[p for p in r.curve if p.sharpness is not None] for r in runs]
        last = ", ".join(f"{ps[-1].sharpness:.0f} (step {ps[-1].step})" for ps in tracked if ps)
        crossed = [next((p.step for p in ps if p.sharpness > limit), None) for ps in tracked]
        third = results.settings["outer_steps"] * 2 / 3
        levels = [
            sorted(p.sharpness for p in ps if p.step >= third)
            for r, ps in zip(runs, tracked)
            if r.diverged is None
        ]
        medians = sorted(v[len(v) // 2] for v in levels if v)
        level = f"{medians[len(medians) // 2]:.0f}" if medians else "—"
        diverged = sorted(r.diverged.step for r in runs if r.diverged is not None)
        fate = f"diverged at steps {diverged}" if diverged else "no seed diverged"
        lines.append(
            f"  {row.label}: {fate} ({len(diverged)} of {len(runs)}); λ_θ last {last}; first above "
            f"2/α = {limit:g} at {[c for c in crossed]}; level over the last third {level}; "
            f"MSE {ci(row.mse, row.ci95, digits=3)}"
        )
    return lines
