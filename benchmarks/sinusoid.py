"""Sinusoid regression at the standard protocol: does the lazy leap pay off against MAML, and why
does it diverge?

    python benchmarks/sinusoid.py --quick        # smoke test, same code path (≈ 20 s)
    python benchmarks/sinusoid.py                # the full default run (≈ 65 min on 2 idle cores)
    python benchmarks/sinusoid.py --outer-steps 3000 --seeds 2 --sweep-steps 0 --inner-lrs 0.01 \
        --leaps 1 --curve-points 30 --methods maml-k10 'fomaml-k[124]0' brake-k10 brake-k10-t1 \
        brake-k10-t3 'lazy-k[124]0'              # the committed λ_θ run (results/sinusoid-brake/)
    python benchmarks/sinusoid.py --sweep-steps 0 --inner-lrs 0.01 --leaps 1 --methods maml-k5 \
        maml-k10 fomaml-k10 fomaml-k20 brake-k10 lazy-k10 lazy-k20  # the committed full-budget run
                                                 # (results/sinusoid-full/, 67 min, a shared machine)

Budget. The standard protocol's 70,000 outer steps do not fit a session on 2 CPU cores. Measured
(one thread, torch 2.13 CPU, batched learner, meta-batch 25, task sampling and Adam included, a
lightly loaded machine), one outer step costs: MAML K = 5, 10, 20: 7.3, 13.3, 25.8 ms;
first-order K = 10, 20, 40: 7.0, 12.6, 23.7 ms; Lazy K = 10, 20, 40: 8.3, 13.8, 24.9 ms; the
brake (exact MAML by stored-point HVPs) K = 10, 20: 20.9, 40.6 ms; the truncated brake K = 10,
T = 3: 11.2 ms; one λ_θ probe (25 tasks × 20 power iterations, vmapped): 30 ms. The defaults
(3 seeds × 12,000 steps plus the sweep's 8 × 1,000 steps per method, 178 ms per step of all twelve
methods together) are ≈ 7,800 s of one core: ≈ 65 min on 2 idle workers. On a machine
shared with others these grow several-fold (the committed λ_θ run ran at a load average of ≈ 10
on 2 cores, at nice 5). ``--sweep-steps 0`` with one α and one γ skips the sweep.

Tasks (Finn et al., 2017; ``gradcheck.problems.sinusoid``): y = A sin(x − φ), A ~ U[0.1, 5],
φ ~ U[0, π], x ~ U[−5, 5]; 10 support and 10 query points (10-shot), MSE; an MLP 1–40–40–1 with
ReLU (``gradcheck.problems.mlp``); meta-batch 25, Adam on θ.

Methods (``METHODS``): MAML K ∈ {1, 5, 10, 20} (second order, unrolled), first-order MAML
K ∈ {5, 10, 20, 40}, the brake K ∈ {10, 20, 40} (``maml_hvp``: the same exact gradient by
Hessian-vector products at the stored student points, one step's graph), the truncated brake
(``truncated_hvp``: that product over the last T steps; K = 10 with T ∈ {1, 3}, K = 20 with
T = 5), Lazy K ∈ {10, 20, 40} with η = γα ("single"); Lazy with η = γKα ("horizon") on request
(``--methods 'lazy-*-horizon'``). The defaults (``DEFAULT_METHODS``) are the mechanism's
controls: MAML K = 5, 10, 20, first-order at every Lazy K, the brake and truncated brake at
K = 10, Lazy K = 10, 20, 40. Every one trains through ``lazymaml.MetaLearner``, batched over
the meta-batch (``batched=True``), one thread per worker process.

Protocol, identical for every method: the same outer budget (``--outer-steps`` × ``--meta-batch``),
the same seeds (initialisation and training-task stream), the same ``--test-tasks`` held-out
tasks and the same ``--val-tasks`` validation tasks (each fixed by its own generator seed, none
of which seeds a training stream: no held-out task is ever trained on). The inner step α and the
teacher's leap γ are chosen per method by one sweep over the same α × γ grid for every method
(``--inner-lrs`` × ``--leaps``; γ = 1 is the plain method, γ < 1 its leap variant, for MAML the
exact gradient of L_Q(θ + γ(φ_K − θ))): a run of ``--sweep-steps`` outer steps from
``SWEEP_SEED`` per grid point, scored by the validation MSE at its end; ties go to the smaller α,
then the larger γ; a diverged point scores +∞. The chosen (α, γ) is then trained from every seed.
One grid for everyone keeps the tuning budget equal (no method is tuned harder than another),
and γ is in it for every method because the leap is a setting of every estimator, not only of
Lazy's. The sweep is short (1/12 of a run by default), so it favours settings that learn fast early.
Evaluation: query MSE after the method's own K inner SGD steps from θ (the student φ_K), on the
held-out tasks, at ``--curve-points`` outer steps spread over the run (geometric and linear, from
step 0): the learning curves, against the outer step and against the cumulative wall time of the
outer steps (``meta_backward`` and the Adam step; task sampling and evaluation excluded).

Reported per method: the final held-out MSE (mean ± 95% t-interval over seeds); the relative
improvement over the last fifth of the budget (below ``PLATEAU``: stopped improving); the MSE at
equal wall time (each seed's last evaluation within the training time the fastest method's
slowest seed needed for the whole budget); the autograd graph's peak bytes for one task
(``gradcheck.memory.SavedTensorMeter`` on the sequential path: exact and deterministic) and the
best method within each memory budget;
median ms per outer step; λ_θ, the support Hessian's largest eigenvalue at θ (``sharpness``:
power iteration with HVPs, ``--probe-iterations`` from a fixed start, mean over ``--probe-tasks``
fixed probe tasks), at every evaluation of a full run, its time reported apart and excluded from
the training time (so from the equal-time budget); the meta-gradient's deviation from exact
MAML with the same K, α and γ at the trained θ (‖g − g_MAML‖/‖g_MAML‖, float64,
``DEVIATION_TASKS`` validation tasks, the oracle ``gradcheck.oracle``). A table,
``sinusoid[-quick].json`` and ``sinusoid[-quick].png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import multiprocessing
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, also in the spawned workers
from common import (
    Divergence,
    add_common_arguments,
    cell,
    fingerprint,
    interval,
    outer_step,
    pool_map,
    text_table,
    write_results,
)
from common import Method as BaseMethod
from common import parse as parse_common
from records import CurvePoint, MemoryBest, SinusoidRow, SinusoidRun, SinusoidSummary, SweepChoice

SHOTS = QUERIES = 10
HIDDEN = (40, 40)
# generator seeds of the fixed task sets and of the sweep; training streams use seeds 0, 1, 2, …
TASK_SEEDS = {"val": 1_000_001, "test": 1_000_002, "memory": 1_000_003, "probe": 1_000_004}
SWEEP_SEED = 1_000
DEVIATION_TASKS = 4
PLATEAU = 0.02  # relative improvement over the last fifth of the budget below which a curve has stopped
PROBE_TASKS, PROBE_ITERATIONS = 25, 20  # λ_θ: power iteration on the support Hessian of fixed tasks


@dataclass(frozen=True)
class Method(BaseMethod):
    """A sinusoid configuration: no γ of its own (γ is swept with α for every method and passed to
    ``learner``); ``horizon`` is the truncated brake's T (estimator ``truncated_hvp``)."""

    horizon: int | None = None

    def options(self) -> dict[str, Any]:
        return {**super().options(), **({"horizon": self.horizon} if self.horizon is not None else {})}


def _methods() -> dict[str, Method]:
    """The methods: MAML (second order) and its stored-point form (the brake, ``maml_hvp``: the
    same gradient by HVPs), the truncated brake (last T steps by HVPs), first-order MAML and Lazy."""
    methods = {
        "maml-k1": Method("MAML K=1", "MAML", "maml", 1),
        "maml-k5": Method("MAML K=5", "MAML", "maml", 5),
        "maml-k10": Method("MAML K=10", "MAML", "maml", 10),
        "maml-k20": Method("MAML K=20", "MAML", "maml", 20),
        "fomaml-k5": Method("FOMAML K=5", "FOMAML", "first_order", 5),
    }
    for k in (10, 20, 40):
        methods[f"fomaml-k{k}"] = Method(f"FOMAML K={k}", "FOMAML", "first_order", k)
    for k in (10, 20, 40):
        methods[f"brake-k{k}"] = Method(f"Brake K={k}", "Brake", "maml_hvp", k)
    for k, t in ((10, 1), (10, 3), (20, 5)):
        methods[f"brake-k{k}-t{t}"] = Method(
            f"Brake K={k} T={t}", "Brake, last T", "truncated_hvp", k, horizon=t
        )
    for k in (10, 20, 40):
        methods[f"lazy-k{k}"] = Method(f"Lazy K={k}", "Lazy", "lazy", k)
    for k in (10, 20, 40):
        methods[f"lazy-k{k}-horizon"] = Method(f"Lazy K={k} horizon", "Lazy horizon", "lazy", k, "horizon")
    return methods


METHODS = _methods()
DEFAULT_METHODS = [
    "maml-k5",
    "maml-k10",
    "maml-k20",
    "fomaml-k10",
    "fomaml-k20",
    "fomaml-k40",
    "brake-k10",
    "brake-k10-t1",
    "brake-k10-t3",
    "lazy-k10",
    "lazy-k20",
    "lazy-k40",
]


def learner(key: str, model, inner_lr: float, leap: float, batched: bool = True):
    """The method's ``lazymaml.MetaLearner`` at the swept (α, γ)."""
    import lazymaml

    method = METHODS[key]
    return lazymaml.MetaLearner(
        model,
        method.steps,
        inner_lr,
        estimator=method.estimator,
        leap=leap,
        batched=batched,
        **method.options(),
    )


def task_set(seed: int, count: int):
    """``count`` sinusoid tasks drawn from a generator seeded with ``seed``, stacked (a TaskBatch)."""
    import torch

    from gradcheck import Task, problems

    generator = torch.Generator().manual_seed(seed)
    return Task.stack([problems.sinusoid(generator, SHOTS, QUERIES) for _ in range(count)])


def mse(model, batch, steps: int, inner_lr: float) -> float | None:
    """Mean query MSE after ``steps`` inner SGD steps from θ (the student φ_K that
    ``MetaLearner.adapt`` returns), every task at once; None where adaptation is not finite.

    The loss ``MetaLearner.meta_backward`` returns is that mean (γ = 1: φ_T = φ_K); Reptile's is
    the cheapest estimator reporting it, and ``preserved`` puts ``.grad`` back as it was."""
    import lazymaml
    from gradcheck.state import preserved

    evaluator = lazymaml.MetaLearner(model, steps, inner_lr, estimator="reptile", batched=True)
    try:
        with preserved(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(evaluator.meta_backward(batch))
    except (FloatingPointError, ValueError):
        return None


def sharpness(model, batch, iterations: int = PROBE_ITERATIONS, seed: int = 0) -> float | None:
    """λ_θ: the largest-magnitude eigenvalue of the support loss's Hessian at θ (all parameters),
    by ``iterations`` steps of power iteration with Hessian-vector products from a fixed random
    start, its Rayleigh quotient, mean over the tasks of ``batch`` (vmapped, the estimators' own
    ``FuncObjective.hvp``). SGD on L_S is unstable along its top eigenvector once λ_θ > 2/α. None
    where it is not finite."""
    import torch
    from torch.func import vmap

    from gradcheck import Task
    from gradcheck.student import Student
    from lazymaml.derivatives import FuncObjective

    student = Student.read(model, None)
    theta, untrained = student.theta, student.fresh()
    (xs, ys), count = batch.support, batch.support[0].shape[0]
    generator = torch.Generator().manual_seed(seed)

    def product(w, x, y):
        task = Task((x, y), (x, y), batch.loss)
        return FuncObjective(student, task, None, checked=False).hvp(theta, untrained, w)

    def dot(a, b):
        return sum((a[n] * b[n]).reshape(count, -1).sum(1) for n in a)

    def unit(w):
        norm = dot(w, w).sqrt()
        return {n: t / norm.view(-1, *[1] * (t.dim() - 1)) for n, t in w.items()}

    with torch.no_grad():
        u = unit(
            {n: torch.randn((count, *t.shape), generator=generator, dtype=t.dtype) for n, t in theta.items()}
        )
        for _ in range(iterations):
            u = unit(vmap(product)(u, xs, ys))
        value = float(dot(u, vmap(product)(u, xs, ys)).mean())
    return value if math.isfinite(value) else None


def checkpoints(outer_steps: int, points: int) -> list[int]:
    """Outer steps at which to evaluate: 0, ``outer_steps`` and about ``points`` in between, half
    spaced geometrically (early progress), half linearly."""
    half = max(1, points // 2)
    geometric = {round(outer_steps ** (i / half)) for i in range(half + 1)}
    linear = {round(outer_steps * i / half) for i in range(half + 1)}
    return sorted({0, outer_steps} | geometric | linear)


def train(
    key: str, inner_lr: float, leap: float, seed: int, outer_steps: int, held_out, args, progress, probe=True
):
    """Meta-train ``key`` from ``seed``; the model and how training went (the keyword arguments of
    ``SinusoidRun`` that training decides: its learning curve on ``held_out``, after a divergence
    without MSE)."""
    import torch

    from gradcheck import Task, problems

    torch.manual_seed(seed)
    model = problems.mlp(HIDDEN)
    meta = learner(key, model, inner_lr, leap)
    outer = torch.optim.Adam(model.parameters(), lr=args.outer_lr)
    stream = torch.Generator().manual_seed(seed)
    steps = METHODS[key].steps
    seen = hashlib.blake2b(digest_size=16)  # the training tasks, to show every method saw the same
    marks = set(checkpoints(outer_steps, args.curve_points))
    probes = task_set(TASK_SEEDS["probe"], args.probe_tasks) if probe and args.probe_tasks else None
    curve: list[CurvePoint] = []
    seconds, probing, losses, step_seconds, diverged = 0.0, 0.0, [], [], None
    for step in range(outer_steps + 1):
        if step in marks:
            error = None if diverged else mse(model, held_out, steps, inner_lr)
            train_mse = statistics.fmean(losses) if losses else None  # since the last point
            start = time.perf_counter()
            top = sharpness(model, probes, args.probe_iterations) if probes and not diverged else None
            probing += time.perf_counter() - start
            curve.append(CurvePoint(step, seconds, error, train_mse, top))
            losses = []
        if step == outer_steps or diverged:
            continue
        batch = Task.stack([problems.sinusoid(stream, SHOTS, QUERIES) for _ in range(args.meta_batch)])
        fingerprint([batch], seen)
        try:
            loss, took, _ = outer_step(meta, outer, batch)
        except (FloatingPointError, ValueError) as failure:
            diverged = Divergence(step + 1, str(failure))
            progress.put(outer_steps - step)
            continue
        losses.append(loss)
        step_seconds.append(took)
        seconds += took
        progress.put(1)
    return model, {
        "curve": tuple(curve),
        "final_mse": curve[-1].mse,
        "train_seconds": seconds,
        "sharpness_seconds": probing,
        "step_seconds": statistics.median(step_seconds[1:] or step_seconds) if step_seconds else None,
        "diverged": diverged,
        "train_tasks_digest": seen.hexdigest(),
        "eval_tasks_digest": fingerprint([held_out]).hexdigest(),
    }


def graph_bytes(key: str, inner_lr: float = 1e-3, leap: float = 1.0) -> int:
    """The autograd graph's peak bytes for one task's meta-gradient on the sequential path, at a
    fixed initialisation: the bytes depend on the shapes and operations alone (the test checks
    that α and γ do not change them), and a small α keeps the probe finite."""
    import torch

    from gradcheck import problems
    from gradcheck.memory import SavedTensorMeter

    torch.manual_seed(0)
    model = problems.mlp(HIDDEN)
    with SavedTensorMeter() as meter:
        learner(key, model, inner_lr, leap, batched=False).meta_backward(task_set(TASK_SEEDS["memory"], 1)[0])
    return meter.peak


def deviation(key: str, model, inner_lr: float, leap: float) -> float | None:
    """‖g − g_MAML‖ / ‖g_MAML‖ at the model's θ in float64 on ``DEVIATION_TASKS`` validation tasks:
    the method's meta-gradient (its learner, sequential) against exact second-order MAML with the
    same K, α and γ (``gradcheck.oracle``). None where either is not finite."""
    import torch

    from gradcheck import compare, oracle

    twin = copy.deepcopy(model).double()
    batch = [t.to(torch.float64) for t in task_set(TASK_SEEDS["val"], DEVIATION_TASKS)]
    try:
        exact = oracle.meta_gradient(twin, batch, METHODS[key].steps, inner_lr, leap=leap)
        twin.zero_grad(set_to_none=True)
        learner(key, twin, inner_lr, leap, batched=False).meta_backward(batch)
    except (FloatingPointError, ValueError):
        return None
    return compare({n: p.grad for n, p in twin.named_parameters()}, exact).overall.rel_error


def job(kind: str, key: str, inner_lr: float, leap: float, seed: int, args, progress) -> SinusoidRun:
    """One sweep point (``kind="sweep"``: scored on the validation tasks) or one full run."""
    import torch

    torch.set_num_threads(1)
    sweep = kind == "sweep"
    held_out = task_set(
        *((TASK_SEEDS["val"], args.val_tasks) if sweep else (TASK_SEEDS["test"], args.test_tasks))
    )
    outer_steps = args.sweep_steps if sweep else args.outer_steps
    model, trained = train(key, inner_lr, leap, seed, outer_steps, held_out, args, progress, probe=not sweep)
    measured: dict[str, Any] = {}
    if not sweep:
        measured["graph_bytes_per_task"] = graph_bytes(key)
        diverged = trained["diverged"] is not None
        measured["deviation_from_maml"] = None if diverged else deviation(key, model, inner_lr, leap)
    return SinusoidRun(kind=kind, method=key, inner_lr=inner_lr, leap=leap, seed=seed, **trained, **measured)


def best(sweep: list[SinusoidRun]) -> SweepChoice:
    """The grid point with the lowest validation MSE (diverged: +∞); the smaller α, then the larger
    γ on ties."""

    def score(r: SinusoidRun) -> tuple[float, float, float]:
        return (math.inf if r.final_mse is None else r.final_mse, r.inner_lr, -r.leap)

    winner = min(sweep, key=score)
    return SweepChoice(winner.inner_lr, winner.leap)


def at_time(curve: tuple[CurvePoint, ...], seconds: float) -> float | None:
    """The MSE of the last evaluation at or before ``seconds`` of training (None if it diverged)."""
    return [p for p in curve if p.seconds <= seconds][-1].mse


def _finite(values) -> list[float]:
    """None (diverged) as +∞."""
    return [math.inf if v is None else v for v in values]


def mean_curve(runs: list[SinusoidRun]) -> list[float]:
    """Per checkpoint the mean MSE over the runs (seeds); +∞ where one of them has diverged."""
    return [statistics.fmean(_finite(r.curve[i].mse for r in runs)) for i in range(len(runs[0].curve))]


def summarise(runs: list[SinusoidRun], keys: list[str]) -> SinusoidSummary:
    """Per method: the final MSE, the improvement over the last fifth, the MSE at equal wall time,
    memory, time and deviation; per memory budget, the best method within it.

    Equal wall time is the time the fastest method needed for the whole budget (its slowest seed,
    so that it is compared at its end), among the methods none of whose runs diverged (a diverged
    run stops early: its time is not the budget's); each run counts with its last evaluation by
    then."""
    mine = {k: [r for r in runs if r.method == k] for k in keys}
    finished = [rs for rs in mine.values() if all(r.diverged is None for r in rs)] or list(mine.values())
    budget = min(max(r.train_seconds for r in rs) for rs in finished)
    marks = [p.step for p in runs[0].curve]
    late = min(range(len(marks)), key=lambda i: abs(marks[i] - 0.8 * marks[-1]))
    rows = []
    for key, rs in mine.items():
        final = interval(_finite(r.final_mse for r in rs))
        equal_time = interval(_finite(at_time(r.curve, budget) for r in rs))
        at_late = mean_curve(rs)[late]
        improvement = (
            (at_late - final[0]) / at_late if math.isfinite(at_late) and math.isfinite(final[0]) else None
        )
        rows.append(
            SinusoidRow(
                method=key,
                label=METHODS[key].label,
                K=METHODS[key].steps,
                inner_lr=rs[0].inner_lr,
                leap=rs[0].leap,
                mse=final[0],
                ci95=final[1],
                last_fifth_improvement=improvement,
                mse_equal_time=equal_time[0],
                ci95_equal_time=equal_time[1],
                step_ms=1e3 * statistics.median([r.step_seconds for r in rs if r.step_seconds] or [math.nan]),
                train_seconds=statistics.fmean(r.train_seconds for r in rs),
                graph_bytes_per_task=rs[0].graph_bytes_per_task,
                deviation_from_maml=statistics.median(_finite(r.deviation_from_maml for r in rs)),
                diverged_seeds=sum(r.diverged is not None for r in rs),
            )
        )
    by_memory = []
    for limit in sorted({r.graph_bytes_per_task for r in rows}):
        winner = min((r for r in rows if r.graph_bytes_per_task <= limit), key=lambda r: r.mse)
        by_memory.append(MemoryBest(limit, winner.method, winner.mse))
    return SinusoidSummary(tuple(rows), budget, tuple(by_memory))


def _ci(mean: float, half: float) -> str:
    return f"{mean:.3f} ± {half:.3f}" if math.isfinite(mean) else "diverged"


def table(summary: SinusoidSummary) -> str:
    header = ("method", "α", "γ", "MSE", "last 1/5", f"MSE at {summary.equal_time_seconds:.0f} s")
    header += ("ms/step", "graph KiB", "dev. vs MAML")
    widths = (-18, 6, 4, 16, 8, 18, 8, 9, 12)  # negative: left-aligned
    lines = []
    for r in summary.rows:
        improvement = None if r.last_fifth_improvement is None else 100 * r.last_fifth_improvement
        cells = (
            r.label,
            f"{r.inner_lr:g}",
            f"{r.leap:g}",
            _ci(r.mse, r.ci95),
            "—" if improvement is None else f"{improvement:.1f}%",
            _ci(r.mse_equal_time, r.ci95_equal_time),
            cell(r.step_ms, ".1f"),
            f"{r.graph_bytes_per_task / 1024:.1f}",
            cell(r.deviation_from_maml, ".2e"),
        )
        lines.append((cells, f"  ({r.diverged_seeds} seeds diverged)" if r.diverged_seeds else ""))
    label = {r.method: r.label for r in summary.rows}
    memory = [
        f"  {m.graph_bytes / 1024:8.1f} KiB: "
        + (
            f"{label[m.best]} (MSE {m.mse:.3f})"
            if math.isfinite(m.mse)
            else "none: every method within it diverged"
        )
        for m in summary.equal_memory
    ]
    return "\n".join([text_table(header, widths, lines), "best within the graph memory of:", *memory])


def plot_curves(axes, runs: list[SinusoidRun], summary: SinusoidSummary) -> None:
    """Held-out MSE against the outer step (``axes[0]``) and against training time (``axes[1]``):
    each seed thin, the mean over seeds thick (a gap where a seed diverged)."""
    import matplotlib.pyplot as plt

    colours = dict(zip((r.method for r in summary.rows), plt.get_cmap("tab20").colors))
    for row in summary.rows:
        mine = [r for r in runs if r.method == row.method]
        for r in mine:
            for ax, x in zip(axes, ("step", "seconds")):
                points = [p for p in r.curve if p.mse is not None and getattr(p, x) > 0]  # log axes
                ax.plot(
                    [getattr(p, x) for p in points],
                    [p.mse for p in points],
                    color=colours[row.method],
                    lw=0.6,
                    alpha=0.4,
                )
        steps = [p.step for p in mine[0].curve]
        mean = [m if math.isfinite(m) else math.nan for m in mean_curve(mine)]
        seconds = [statistics.fmean(r.curve[i].seconds for r in mine) for i in range(len(steps))]
        label = f"{row.label} (α={row.inner_lr:g}, γ={row.leap:g})"
        axes[0].plot(steps[1:], mean[1:], color=colours[row.method], lw=2, label=label)
        axes[1].plot(seconds[1:], mean[1:], color=colours[row.method], lw=2, label=label)
    axes[1].axvline(summary.equal_time_seconds, color="grey", ls=":", label="equal-time budget")
    axes[0].set(xlabel="outer step", title="held-out MSE against outer steps")
    axes[1].set(xlabel="training wall time, s (evaluation excluded)", title="held-out MSE against wall time")
    for ax in axes[:2]:
        ax.set(xscale="log", yscale="log", ylabel="held-out MSE after own K steps")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)


def plot_memory(ax, summary: SinusoidSummary) -> None:
    """The final MSE (± the 95% interval) against the graph's bytes per task."""
    import matplotlib.pyplot as plt

    colours = dict(zip((r.method for r in summary.rows), plt.get_cmap("tab20").colors))
    for row in (r for r in summary.rows if math.isfinite(r.mse)):
        ax.errorbar(
            row.graph_bytes_per_task / 1024,
            row.mse,
            yerr=0 if math.isnan(row.ci95) else row.ci95,
            fmt="o",
            color=colours[row.method],
            capsize=3,
            label=row.label,
        )
    ax.set(xlabel="autograd graph KiB per task (sequential path)", title="final MSE against memory")
    ax.set(ylabel="held-out MSE after own K steps", yscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def plot_sharpness(ax, runs: list[SinusoidRun], summary: SinusoidSummary) -> None:
    """λ_θ (the support Hessian's top eigenvalue at θ, mean over the probe tasks) against the outer
    step, each seed, with the line 2/α above which K steps of SGD at α are unstable; a seed's line
    ends where it diverged (×)."""
    import matplotlib.pyplot as plt

    colours = dict(zip((r.method for r in summary.rows), plt.get_cmap("tab20").colors))
    for row in summary.rows:
        for i, r in enumerate(r for r in runs if r.method == row.method):
            points = [p for p in r.curve if p.sharpness is not None]
            if not points:
                continue
            label = row.label if i == 0 else None
            ax.plot(
                [p.step for p in points],
                [p.sharpness for p in points],
                color=colours[row.method],
                lw=1,
                label=label,
            )
            if r.diverged is not None:
                ax.plot(points[-1].step, points[-1].sharpness, "x", color=colours[row.method])
    for lr in sorted({r.inner_lr for r in summary.rows}):
        ax.axhline(2 / lr, color="k", ls="--", lw=1, label=f"2/α = {2 / lr:g}")
    ax.set(xlabel="outer step", ylabel="λ_θ (top eigenvalue of ∇²L_S at θ)")
    ax.set(title="sharpness λ_θ on fixed probe tasks")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def plot(runs: list[SinusoidRun], summary: SinusoidSummary, path: Path) -> None:
    """The learning curves (``plot_curves``) and the final MSE against memory (``plot_memory``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    plot_curves(axes, runs, summary)
    plot_memory(axes[2], summary)
    plot_sharpness(axes[3], runs, summary)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cost(j: tuple) -> float:
    """A sweep or run job's relative cost, to submit the costliest first."""
    method = METHODS[j[1]]
    weight = {"maml": 2.5, "maml_hvp": 2.6, "truncated_hvp": 1.3, "first_order": 1.0, "lazy": 1.0}
    return weight[method.estimator] * method.steps


QUICK = {
    "outer_steps": 12,
    "meta_batch": 5,
    "seeds": 2,
    "sweep_steps": 4,
    "inner_lrs": [0.003, 0.01],
    "leaps": [0.5, 1.0],
    "val_tasks": 10,
    "test_tasks": 20,
    "curve_points": 6,
    "probe_tasks": 3,
    "probe_iterations": 3,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add_common_arguments(parser, QUICK)
    add(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help="keys or glob patterns, of: " + " ".join(METHODS),
    )
    add("--seeds", type=int, default=3)
    add("--outer-steps", type=int, default=12_000)
    add("--meta-batch", type=int, default=25)
    add("--outer-lr", type=float, default=1e-3)
    add(
        "--inner-lrs",
        type=float,
        nargs="+",
        default=[0.001, 0.003, 0.01, 0.03],
        help="the α grid, every method",
    )
    add("--leaps", type=float, nargs="+", default=[0.5, 1.0], help="the γ grid, every method")
    add("--sweep-steps", type=int, default=1_000, help="outer steps of each sweep run")
    add("--val-tasks", type=int, default=300)
    add("--test-tasks", type=int, default=600)
    add("--curve-points", type=int, default=40, help="evaluations per run (plus step 0)")
    add("--probe-tasks", type=int, default=PROBE_TASKS, help="fixed tasks of the λ_θ probe (0: none)")
    add("--probe-iterations", type=int, default=PROBE_ITERATIONS, help="power iterations per λ_θ probe")
    return parse_common(parser, argv, QUICK, METHODS)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from tqdm import tqdm

    started = time.perf_counter()
    progress = multiprocessing.Manager().Queue()
    grid = [(lr, leap) for lr in args.inner_lrs for leap in args.leaps]
    if args.sweep_steps == 0 and len(grid) > 1:
        raise SystemExit("--sweep-steps 0 (no sweep) needs one α and one γ")
    total = len(args.keys) * (len(grid) * args.sweep_steps + args.seeds * args.outer_steps)
    with (
        ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool,
        tqdm(total=total, unit="outer step", desc="sinusoid", smoothing=0.05) as bar,
    ):
        points = [("sweep", k, lr, leap, SWEEP_SEED) for k in args.keys for lr, leap in grid]
        sweep = pool_map(pool, job, points, args, bar, progress, cost) if args.sweep_steps else []
        chosen = {
            k: best([r for r in sweep if r.method == k]) if sweep else SweepChoice(*grid[0])
            for k in args.keys
        }
        finals = [
            ("run", k, chosen[k].inner_lr, chosen[k].leap, s) for k in args.keys for s in range(args.seeds)
        ]
        runs = pool_map(pool, job, finals, args, bar, progress, cost)
    summary = summarise(runs, args.keys)
    print(
        f"\nsinusoid, 10-shot, MLP 1–40–40–1 ReLU; {args.outer_steps} outer steps × meta-batch "
        f"{args.meta_batch}, Adam {args.outer_lr}; {args.seeds} seeds; {args.test_tasks} held-out tasks; "
        f"(α, γ) from {args.inner_lrs} × {args.leaps}, {args.sweep_steps} steps on {args.val_tasks} "
        f"validation tasks; {args.workers} workers"
    )
    print(table(summary))
    settings = {
        "task_seeds": TASK_SEEDS,
        "sweep_seed": SWEEP_SEED,
        "deviation_tasks": DEVIATION_TASKS,
        "plateau": PLATEAU,
        "command": "python benchmarks/sinusoid.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    record = {
        "wall_seconds": time.perf_counter() - started,
        "chosen": chosen,
        "summary": summary,
        "runs": runs,
        "sweep": sweep,
    }
    write_results(args, "sinusoid", METHODS, settings, record, lambda path: plot(runs, summary, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
