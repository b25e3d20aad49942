"""``python -m lazymaml report``: every estimator against the oracle, for several K.

On built-in generated problems (a tanh MLP on sinusoid regression, a small 4-conv few-shot
classifier with BatchNorm), in float64, it measures for each estimator and K: cosine similarity
and relative error against the exact meta-gradient, the proven deviation bound where it applies (the lazy
estimators), time, and the peak bytes the autograd graph held. It prints a table, writes a PNG
(relative error vs K, log scale) and a JSON, and exits non-zero if the K = 1 identity or the
bound is violated — so it doubles as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
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
from .bound import bound_terms

__all__ = ["KS", "PROBLEMS", "Measurement", "configured", "main", "plot", "run", "table"]

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


def run(
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
) -> list[Measurement]:
    """Measure every estimator (or ``names``) against the oracle for each K and problem."""
    from tqdm import tqdm

    unknown = sorted(set(names or ()) - set(registry.REGISTRY))
    if unknown:
        raise ValueError(f"unknown estimators {unknown}; choose from {list(registry.REGISTRY)}")
    chosen = {n: v for n, v in configured(truncation, lam).items() if names is None or n in names}
    rows = []
    jobs = [(p, k) for p in problem_names for k in ks]
    with tqdm(
        total=len(jobs) * (len(chosen) + 1), desc="report", unit="estimate", disable=not progress
    ) as bar:
        for i, (problem, k) in enumerate(jobs):
            model, task = PROBLEMS[problem](seed, device)
            if i == 0:  # warm-up (first calls pay for imports and kernel set-up), not timed
                oracle.meta_gradient(model, task, 1, inner_lr)
            terms = None  # the bound's Hessian norms, shared by both lazy variants
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
                bound = None
                if name in BOUNDED:
                    terms = terms or bound_terms(model, task, k, inner_lr, leap=leap)
                    bound = terms.bound(BOUNDED[name])
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
    return rows


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


def plot(rows: Sequence[Measurement], path: Path, title: str) -> None:
    """Relative error vs K per estimator (log scale), one panel per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems_ = sorted({r.problem for r in rows}, key=[r.problem for r in rows].index)
    fig, axes = plt.subplots(1, len(problems_), figsize=(6 * len(problems_), 4.5), squeeze=False)
    for ax, problem in zip(axes[0], problems_):
        mine = [r for r in rows if r.problem == problem and r.estimator != "exact (oracle)" and not r.error]
        for name in sorted({r.estimator for r in mine}, key=[r.estimator for r in mine].index):
            points = [(r.steps, max(r.rel_error, 1e-17)) for r in mine if r.estimator == name]
            ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("inner steps K")
        ax.set_ylabel("relative error vs exact MAML  ‖g − g_exact‖ / ‖g_exact‖")
        ax.set_title(problem)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.text(
        0.01,
        0.01,
        "points at the bottom are exact up to rounding (relative errors floored at 1e-17)",
        fontsize=8,
        alpha=0.7,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    args = parser.parse_args(argv)
    rows = run(
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
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"meta-gradient estimators vs exact MAML (α={args.inner_lr:g}, γ={args.leap:g}, float64)"
    plot(rows, args.out / "report.png", title)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"settings": settings, "rows": [asdict(r) | {"violation": r.violation} for r in rows]}
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
    return 1 if violations else 0
