"""``python -m lazymaml report``: every estimator against the oracle, for several K.

On built-in generated problems (a tanh MLP on sinusoid regression, a small 4-conv few-shot
classifier with BatchNorm), in float64, it measures for each estimator and K: cosine similarity
and relative error against the exact meta-gradient, the proven deviation bound where it applies
(the lazy estimators), the estimator's time, and the peak bytes the autograd graph held. It
prints a table and what the bound cost (a line per problem: "bound: N s"), writes a PNG
(relative error, time and graph memory vs K) and a JSON, and exits non-zero if the K = 1
identity or the bound is violated — so it doubles as a smoke test.

The bound needs dense n × n Hessians at every student step, nearly all of the report's work: they
are computed once per problem, along the trajectory of the longest K, and shared by every K
(:func:`lazymaml.bound.horizon_terms`: the same numbers as computing each K alone). The command
runs torch on one thread unless told otherwise (``--threads``, or ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` in the environment): see :func:`threads`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcheck import compare, oracle, problems
from gradcheck.memory import SavedTensorMeter
from gradcheck.settings import InnerLoop
from gradcheck.task import Task

from . import estimators as registry
from .bound import BoundTerms, horizon_terms, parameter_count

__all__ = [
    "KS",
    "PROBLEMS",
    "BoundCost",
    "Measurement",
    "Results",
    "bound_lines",
    "configured",
    "main",
    "measure",
    "plot",
    "run",
    "table",
]

KS = (1, 2, 5, 10, 20)
IDENTITY_RTOL = 1e-8  # lazy at K = 1 vs the oracle, float64 (measured ~1e-16)
BOUND_SLACK = 1e-9  # relative slack on the bound for rounding in the norms


def sinusoid_mlp(seed: int, device: str) -> tuple[nn.Module, Task]:
    torch.manual_seed(seed)
    model = problems.mlp((20, 20), nn.Tanh).to(device, torch.float64)
    return model, problems.sinusoid(torch.Generator().manual_seed(seed), dtype=torch.float64, device=device)


def conv_few_shot(seed: int, device: str) -> tuple[nn.Module, Task]:
    torch.manual_seed(seed)
    model = problems.conv4(ways=5, channels=4, image_size=16, in_channels=1).to(device, torch.float64)
    task = problems.few_shot(
        torch.Generator().manual_seed(seed),
        queries=3,
        image_size=16,
        channels=1,
        dtype=torch.float64,
        device=device,
    )
    return model.train(), task


PROBLEMS: dict[str, Callable[[int, str], tuple[nn.Module, Task]]] = {
    "sinusoid-mlp": sinusoid_mlp,
    "conv-few-shot": conv_few_shot,
}


def configured(truncation: int, lam: float) -> dict[str, tuple[str, Callable[[int], dict[str, Any]]]]:
    """name → (label, K ↦ its own settings) for every estimator of the registry: truncated
    backpropagation through min(``truncation``, K) steps, iMAML at ``lam`` with 100 CG iterations."""
    out: dict[str, tuple[str, Callable[[int], dict[str, Any]]]] = {}
    for name, entry in registry.REGISTRY.items():
        if "horizon" in entry.reads:
            out[name] = (f"{name}(T={truncation})", lambda k: {"horizon": min(truncation, k)})
        elif "lam" in entry.reads:
            out[name] = (f"{name}(λ={lam:g})", lambda k: {"lam": lam, "cg_iterations": 100})
        else:
            out[name] = (name, lambda k: {})
    return out


BOUNDED = {"lazy": "single", "lazy_horizon": "horizon"}


@dataclass(frozen=True)
class Measurement:
    """One estimator on one problem at one K, against the oracle."""

    problem: str
    estimator: str
    steps: int
    cosine: float
    rel_error: float
    deviation: float
    bound: float | None
    seconds: float
    graph_mib: float
    error: str | None = None

    @property
    def violation(self) -> str | None:
        if self.error:
            return None
        if self.estimator == "lazy" and self.steps == 1 and self.rel_error > IDENTITY_RTOL:
            return f"K = 1 identity violated: relative error {self.rel_error:.2e} > {IDENTITY_RTOL:g}"
        if self.bound is not None and self.deviation > self.bound * (1 + BOUND_SLACK) + 1e-12:
            return f"bound violated: deviation {self.deviation:.3e} > bound {self.bound:.3e}"
        return None


def _measured(fn: Callable[..., dict], *args: object, **kwargs: object) -> tuple[dict, float, float]:
    """``fn(*args, **kwargs)``, its wall time and the peak MiB its autograd graph held."""
    with SavedTensorMeter() as meter:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
    return result, seconds, meter.peak / 2**20


@dataclass(frozen=True)
class BoundCost:
    """What the deviation bound cost on one problem: dense n × n Hessians along one trajectory of
    the longest K, shared by every K and by both lazy variants (not in any row's time)."""

    problem: str
    parameters: int  # n
    hessians: int  # one per student step of the longest K
    seconds: float


@dataclass(frozen=True)
class Results:
    rows: list[Measurement]
    bound_costs: list[BoundCost]


def run(*args: Any, **kwargs: Any) -> list[Measurement]:
    """Every estimator (or ``names``) against the oracle for each K and problem: :func:`measure`'s
    rows (the same arguments)."""
    return measure(*args, **kwargs).rows


def measure(
    ks: Sequence[int] = KS,
    inner_lr: float = 0.01,
    leap: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
    names: Sequence[str] | None = None,
    problem_names: Sequence[str] = tuple(PROBLEMS),
    truncation: int = 2,
    lam: float = 20.0,
    progress: bool = True,
) -> Results:
    """:func:`run`, and what the bound cost on each problem.

    The bound goes first: for each problem, :func:`lazymaml.bound.horizon_terms` along one
    trajectory of max(ks) steps (its own progress bar, counted in Hessian-vector products: an
    n × n Hessian is n of them); then every estimator at every K (a second bar, one step per
    estimate, each a few milliseconds).
    """
    from tqdm import tqdm

    unknown = sorted(set(names or ()) - set(registry.REGISTRY))
    if unknown:
        raise ValueError(f"unknown estimators {unknown}; choose from {list(registry.REGISTRY)}")
    chosen = {n: v for n, v in configured(truncation, lam).items() if names is None or n in names}
    horizons = sorted(set(ks))
    terms: dict[str, dict[int, BoundTerms]] = {}
    costs = []
    if horizons and any(name in BOUNDED for name in chosen):
        sizes = {problem: parameter_count(PROBLEMS[problem](seed, device)[0]) for problem in problem_names}
        work = sum(max(horizons) * n for n in sizes.values())
        with tqdm(
            total=work, desc="bound: dense Hessians", unit="HVP", unit_scale=True, disable=not progress
        ) as bar:
            # the largest Hessians first: the bar's rate (HVPs per second) is then the slowest
            # first, so its estimate errs long rather than short when the problem changes
            for problem in sorted(problem_names, key=lambda p: -sizes[p]):
                model, task = PROBLEMS[problem](seed, device)
                start = time.perf_counter()
                terms[problem] = horizon_terms(
                    model, task, horizons, inner_lr, leap=leap, on_hessian=bar.update
                )
                seconds = time.perf_counter() - start
                costs.append(BoundCost(problem, sizes[problem], max(horizons), seconds))
    rows = []
    jobs = [(p, k) for p in problem_names for k in ks]
    with tqdm(
        total=len(jobs) * (len(chosen) + 1), desc="estimators", unit="estimate", disable=not progress
    ) as bar:
        for i, (problem, k) in enumerate(jobs):
            model, task = PROBLEMS[problem](seed, device)
            if i == 0:  # warm-up (first calls pay for imports and kernel set-up), not timed
                oracle.meta_gradient(model, task, 1, inner_lr)
            exact, seconds, mib = _measured(oracle.meta_gradient, model, task, k, inner_lr, leap=leap)
            rows.append(Measurement(problem, "exact (oracle)", k, 1.0, 0.0, 0.0, None, seconds, mib))
            bar.update()
            for name, (label, settings) in chosen.items():
                loop = InnerLoop(k, inner_lr, leap, **settings(k))
                try:
                    g, seconds, mib = _measured(registry.run, name, model, task, loop)
                except ValueError as error:  # e.g. iMAML on an indefinite system: reported, not fatal
                    rows.append(
                        Measurement(
                            problem, label, k, math.nan, math.nan, math.nan, None, 0.0, 0.0, str(error)
                        )
                    )
                    bar.update()
                    continue
                report = compare(g, exact)
                deviation = report.overall.abs_error
                bound = terms[problem][k].bound(BOUNDED[name]) if name in BOUNDED else None
                rows.append(
                    Measurement(
                        problem,
                        label,
                        k,
                        report.overall.cosine,
                        report.overall.rel_error,
                        deviation,
                        bound,
                        seconds,
                        mib,
                    )
                )
                bar.update()
    return Results(rows, sorted(costs, key=lambda c: list(problem_names).index(c.problem)))


def table(rows: Sequence[Measurement]) -> str:
    head = (
        f"{'problem':<14} {'estimator':<16} {'K':>3} {'cosine':>9} {'rel.err':>9} {'bound':>9} "
        f"{'dev/bound':>9} {'time ms':>8} {'graph MiB':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.error:
            lines.append(f"{r.problem:<14} {r.estimator:<16} {r.steps:>3}  n/a: {r.error[:70]}")
            continue
        bound = f"{r.bound:>9.2e}" if r.bound is not None else f"{'':>9}"
        ratio = f"{r.deviation / r.bound:>9.3f}" if r.bound else f"{'':>9}"
        lines.append(
            f"{r.problem:<14} {r.estimator:<16} {r.steps:>3} {r.cosine:>9.5f} {r.rel_error:>9.2e} {bound} "
            f"{ratio} {r.seconds * 1e3:>8.1f} {r.graph_mib:>9.3f}"
            + (f"  <- {r.violation}" if r.violation else "")
        )
    return "\n".join(lines)


def bound_lines(costs: Sequence[BoundCost]) -> str:
    """One line per problem: what the bound column cost (not in any row's time)."""
    return "\n".join(
        f"bound: {c.seconds:.1f} s on {c.problem} ({c.hessians} dense {c.parameters}×{c.parameters} "
        f"Hessians along one K = {c.hessians} trajectory, shared by every K and both lazy rows)"
        for c in costs
    )


FLOOR = 1e-12  # relative errors at or below it are exact to rounding; drawn on the floor line


def plot(rows: Sequence[Measurement], path: Path, title: str, costs: Sequence[BoundCost] = ()) -> None:
    """One row of panels per problem: relative error vs K (log; errors ≤ 1e-12 drawn on a floor
    line below a break in the axis), the estimator's time, the peak graph memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems_ = sorted({r.problem for r in rows}, key=[r.problem for r in rows].index)
    kept = [r for r in rows if not r.error]
    names = sorted({r.estimator for r in kept}, key=[r.estimator for r in kept].index)
    markers = "osD^vP*Xhp<>"
    styles = ["-", "--", "-.", ":"]
    cmap = plt.get_cmap("tab10")
    style = {
        name: dict(
            marker=markers[i % len(markers)],
            linestyle=styles[i % len(styles)],
            color=cmap(i % 10),
            markersize=7 - 0.4 * (i % 4),
            markerfacecolor="none" if i % 2 else None,
        )
        for i, name in enumerate(names)
    }
    # coincident points (several exact estimators; lazy and lazy_horizon at K = 1) are offset
    # sideways by a few percent of K on the log axis, so that none hides another
    shift = {name: 1.06 ** (i - (len(names) - 1) / 2) for i, name in enumerate(names)}
    ks = sorted({r.steps for r in kept})
    positive = [r.rel_error for r in kept if r.rel_error > FLOOR and r.estimator != "exact (oracle)"]
    low = 10 ** math.floor(math.log10(min(positive))) if positive else 1e-3
    floor_at = low / 10  # where exact-to-rounding points are drawn, below the break
    cost = {c.problem: c for c in costs}

    fig, axes = plt.subplots(
        len(problems_),
        3,
        figsize=(17, 4.8 * len(problems_)),
        squeeze=False,
        gridspec_kw={"width_ratios": [2.2, 1, 1]},
    )
    for (err_ax, time_ax, mem_ax), problem in zip(axes, problems_):
        mine = [r for r in kept if r.problem == problem]
        for name in names:
            points = sorted((r.steps, r) for r in mine if r.estimator == name)
            if not points:
                continue
            xs = [k * shift[name] for k, _ in points]
            if name != "exact (oracle)":
                errors = [r.rel_error if r.rel_error > FLOOR else floor_at for _, r in points]
                err_ax.plot(xs, errors, label=name, **style[name])
            time_ax.plot(xs, [r.seconds * 1e3 for _, r in points], label=name, **style[name])
            mem_ax.plot(xs, [r.graph_mib for _, r in points], label=name, **style[name])
        err_ax.set_yscale("log")
        err_ax.set_ylim(floor_at / 2, 3)
        decades = [10.0**e for e in range(round(math.log10(low)), 1)]
        err_ax.set_yticks([floor_at, *decades])
        err_ax.set_yticklabels(["≤1e-12\n(exact to\nrounding)", *(f"{d:g}" for d in decades)])
        err_ax.minorticks_off()
        err_ax.axhspan(floor_at / 2, floor_at * 2.5, color="0.9", zorder=0)
        err_ax.axhline(floor_at * 3, color="0.4", linestyle=(0, (1, 3)), linewidth=1)  # the break
        err_ax.set_ylabel("relative error vs exact MAML\n‖g − g_exact‖ / ‖g_exact‖")
        err_ax.set_title(f"{problem}: error")
        time_ax.set_yscale("log")
        time_ax.set_ylabel("estimator time (ms)")
        c = cost.get(problem)
        time_ax.set_title(
            f"{problem}: time"
            + (f"\n(bound, not shown: {c.seconds:.1f} s for {c.hessians} Hessians)" if c else ""),
            fontsize=10,
        )
        mem_ax.set_yscale("log")
        mem_ax.set_ylabel("peak autograd graph (MiB)")
        mem_ax.set_title(f"{problem}: graph memory", fontsize=10)
        for ax in (err_ax, time_ax, mem_ax):
            ax.set_xscale("log")
            ax.set_xticks(ks)
            ax.set_xticklabels([str(k) for k in ks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlim(min(ks) / 1.4, max(ks) * 1.4)
            ax.set_xlabel("inner steps K")
            ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(title)
    legend: dict[str, Any] = {}  # the time panels show every name, the oracle too
    for ax in axes[:, 1]:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    labels, handles = list(legend), list(legend.values())
    fig.legend(
        handles,
        labels,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.02),
        ncol=len(labels),
        fontsize=9,
        frameon=False,
    )
    fig.text(
        0.01,
        0.005,
        "relative errors ≤ 1e-12 (exact estimators; lazy at K = 1) are drawn on the shaded floor line below "
        "the dotted break; points at the same K are offset sideways so that none hides another",
        fontsize=8,
        alpha=0.7,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def threads(requested: int | None) -> int:
    """How many intra-op threads torch gets for the report: ``requested`` if given; torch's own
    choice if the environment names one (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``); else 1.

    The report's problems are small (n ≈ 500 parameters): a second thread shortens it by a third
    on an idle machine, while on a busy one torch's default (one thread per core) oversubscribes
    the cores and made it ~9× slower (13 min instead of 1.5 min, load 7–10 on 2 cores)."""
    if requested is not None:
        return requested
    if any(os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        return torch.get_num_threads()
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lazymaml report", description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS), help="inner horizons K")
    parser.add_argument("--inner-lr", type=float, default=0.01, help="α")
    parser.add_argument("--leap", type=float, default=1.0, help="γ, the teacher's fraction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("gradcheck-report"), help="output directory")
    parser.add_argument(
        "--estimators", nargs="+", choices=list(registry.REGISTRY), help="subset (default: all)"
    )
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS))
    parser.add_argument("--truncation", type=int, default=2, help="T for truncated backprop")
    parser.add_argument(
        "--lam",
        type=float,
        default=20.0,
        help="λ for iMAML (above minus the lowest support-Hessian eigenvalue)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1, or torch's own choice when OMP_NUM_THREADS or "
        "MKL_NUM_THREADS is set); more than 1 helps only on an idle machine",
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    before = torch.get_num_threads()
    torch.set_num_threads(threads(args.threads))
    try:
        start = time.perf_counter()
        results = measure(
            args.ks,
            args.inner_lr,
            args.leap,
            args.seed,
            args.device,
            args.estimators,
            args.problems,
            args.truncation,
            args.lam,
        )
        rows = results.rows
        print(table(rows))
        if results.bound_costs:
            print(bound_lines(results.bound_costs))
        args.out.mkdir(parents=True, exist_ok=True)
        title = f"meta-gradient estimators vs exact MAML (α={args.inner_lr:g}, γ={args.leap:g}, float64)"
        plot(rows, args.out / "report.png", title, results.bound_costs)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        settings["threads"] = torch.get_num_threads()
        payload = {
            "settings": settings,
            "rows": [asdict(r) | {"violation": r.violation} for r in rows],
            "bound_costs": [asdict(c) for c in results.bound_costs],
        }
        (args.out / "report.json").write_text(json.dumps(payload, indent=1))
        violations = [f"{r.problem} {r.estimator} K={r.steps}: {r.violation}" for r in rows if r.violation]
        print(f"\nwrote {args.out / 'report.png'} and {args.out / 'report.json'}")
        for v in violations:
            print(f"VIOLATION {v}")
        print(
            "all checks passed: K = 1 identity and bound hold"
            if not violations
            else f"{len(violations)} violation(s)"
        )
        print(f"{time.perf_counter() - start:.1f} s on {torch.get_num_threads()} thread(s)")
    finally:
        torch.set_num_threads(before)
    return 1 if violations else 0
