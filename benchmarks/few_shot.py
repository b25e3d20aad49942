"""Few-shot classification on real data: does the lazy leap pay off against MAML and its kin?

    python benchmarks/few_shot.py --quick                      # smoke test, same code path
    python benchmarks/few_shot.py                              # the defaults: ≈ 4 h on 2 cores
    # the committed results (benchmarks/results/few_shot.json), 68 min on 2 cores:
    python benchmarks/few_shot.py --outer-steps 150 --sweep-steps 40 --inner-lrs 0.03 0.1 0.3 --val-tasks 50
    # the committed same-K first-order controls (FOMAML K=10, 20, beside Lazy K=10, 20), 10 min:
    # the line above plus --methods fomaml-k10 fomaml-k20 --out benchmarks/results/few_shot-controls
    python benchmarks/few_shot.py --shots 1 --seeds 5 --outer-steps 2000 --channels-net 32
    python benchmarks/few_shot.py --data ~/data/omniglot --image-size 28 --rotate
    python benchmarks/few_shot.py --methods 'maml-*' 'lazy-k10-*' --shots 1

Data: scikit-learn's bundled 8×8 digits as rotation classes (``lazymaml.datasets.digits``: 18
meta-train, 8 meta-validation, 8 meta-test classes), or a folder in a standard layout (``--data``:
Omniglot, miniImageNet class folders or CSV splits; ``lazymaml.datasets.from_folder``). 5-way,
``--shots`` support and 15 query images per class.

Network: four blocks conv 3×3 (padding 1) → BatchNorm (batch statistics, as MAML uses them; or
none with ``--norm none``, then He-initialised) → ReLU, the last p blocks followed by a 2×
max-pool, p = min(4, ⌊log₂ size⌋): 8×8 digits keep full resolution in block 1 and end at 1×1
(8→8→4→2→1, as Omniglot's 28×28 ends at 1×1 after four pools); 84×84 ends at 5×5. Then a linear
head over the ways. ``--channels-net`` filters per block.

Protocol, identical for every method: the same outer budget (``--outer-steps`` × ``--meta-batch``
tasks, Adam ``--outer-lr``), the same seeds (initialisation and training-task stream), the same
``--test-tasks`` meta-test tasks (fixed by a seed), evaluation after the method's own K inner SGD
steps (the student φ_K, from ``MetaLearner.adapt``). The inner learning rate α is chosen per
method and shot count by a sweep over the same ``--inner-lrs`` grid for everyone: one run from
seed 0 with ``--sweep-steps`` outer steps per α, scored on ``--val-tasks`` meta-validation tasks
(classes disjoint from meta-test); ties go to the smaller α; the chosen α is then trained from
every seed. A run whose meta-gradient fails (a non-finite loss, or iMAML's conjugate gradient
meeting curvature below −λ) stops there, is reported as diverged and scored at chance (1/ways).
The "no meta-training" rows are the control: the initialisation of each seed adapted with K
steps (α swept the same way), no outer step at all.

Reported per method: meta-test accuracy (mean over seeds ± 95% t-interval over seeds), median
wall time of an outer step (``lazymaml.MetaLearner``, batched over the meta-batch where it
applies; 1 thread per worker), peak resident memory above the worker's baseline during one outer
step (Linux; freed heap returned first), and the autograd graph's peak bytes for one task
(``gradcheck.memory.SavedTensorMeter`` on the sequential path: exact and deterministic, what grows
with K when the inner loop is differentiated), and how far its meta-gradient is from exact MAML's
with the same K, α, adapted set and γ (‖g − g_MAML‖/‖g_MAML‖ at the trained θ, float64, on
``DEVIATION_TASKS`` validation tasks; the oracle is ``gradcheck.oracle``). A table, and
``few_shot[-quick].json`` and
``few_shot[-quick].png`` (accuracy against K, against time per step and against peak memory)
under ``--out``.
"""

from __future__ import annotations

import argparse
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
    median_known,
    outer_step,
    peak_resident_bytes,
    pool_map,
    text_table,
    write_results,
)
from common import Method as BaseMethod
from common import parse as parse_common
from records import FewShotRow, FewShotRun

WAYS = 5
QUERIES = 15
VAL_SEED, TEST_SEED, MEMORY_SEED = 1, 2, 3  # the fixed validation, test and memory-probe tasks
DEVIATION_TASKS = 4  # validation tasks on which each method's meta-gradient is compared with MAML's
CG_ITERATIONS = 5  # iMAML's conjugate-gradient iterations per task (Rajeswaran et al. use 5)


@dataclass(frozen=True)
class Method(BaseMethod):
    """A few-shot configuration; estimator ``"none"`` is the no-meta-training control. Unlike the
    sinusoid benchmark, which sweeps γ with α, each method here fixes its adapted parameters
    (ANIL: the head, BOIL: the body) and its γ: the sweep is over α alone."""

    adapt: str | None = None
    leap: float = 1.0


def _methods() -> dict[str, Method]:
    methods = {
        "maml-k1": Method("MAML K=1", "MAML", "maml", 1),
        "maml-k5": Method("MAML K=5", "MAML", "maml", 5),
        "fomaml-k5": Method("FOMAML K=5", "FOMAML", "first_order", 5),
        "fomaml-k10": Method("FOMAML K=10", "FOMAML", "first_order", 10),
        "fomaml-k20": Method("FOMAML K=20", "FOMAML", "first_order", 20),
        "anil-k5": Method("ANIL K=5", "ANIL", "maml", 5, adapt="head"),
        "boil-k5": Method("BOIL K=5", "BOIL", "maml", 5, adapt="body"),
        "reptile-k10": Method("Reptile K=10", "Reptile", "reptile", 10),
        "imaml-k10": Method("iMAML K=10", "iMAML", "imaml", 10),
    }
    for step in ("single", "horizon"):
        for leap in (1.0, 0.5):
            for k in (10, 20, 40):
                label = f"Lazy K={k} {step} γ={leap:g}"
                methods[f"lazy-k{k}-{step}-g{leap:g}"] = Method(
                    label, f"Lazy {step} γ={leap:g}", "lazy", k, jacobian_step=step, leap=leap
                )
    for k in (1, 5, 10, 20, 40):
        methods[f"scratch-k{k}"] = Method(f"No meta-training K={k}", "no meta-training", "none", k)
    return methods


METHODS = _methods()


def network(ways: int, channels: int, image_size: int, in_channels: int, norm: str = "batch"):
    """The 4-conv few-shot network for ``image_size``² inputs (see the module docstring)."""
    from torch import nn

    pools = min(4, int(math.log2(image_size)))
    blocks: list[nn.Module] = []
    c, size = in_channels, image_size
    for block in range(4):
        conv = nn.Conv2d(c, channels, 3, padding=1)
        blocks.append(conv)
        if norm == "batch":
            blocks.append(nn.BatchNorm2d(channels, track_running_stats=False))
        else:  # without normalisation the default init shrinks the signal block by block
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        blocks.append(nn.ReLU())
        if block >= 4 - pools:
            blocks.append(nn.MaxPool2d(2))
            size //= 2
        c = channels
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels * size * size, ways))


_SPLITS: dict[str, Any] = {}


def splits(args: argparse.Namespace) -> dict[str, Any]:
    """The train/val/test classes, loaded once per process."""
    if not _SPLITS:
        from lazymaml import datasets

        if args.data is None:
            _SPLITS.update(datasets.digits())
        else:
            loaded = datasets.from_folder(args.data, args.image_size, args.channels)
            _SPLITS.update({s: datasets.rotations(c) if args.rotate else c for s, c in loaded.items()})
    return _SPLITS


def options(method: Method, args: argparse.Namespace) -> dict[str, Any]:
    """The estimator options ``method`` fixes (iMAML's: its λ and CG iterations)."""
    if method.estimator == "imaml":
        return {"lam": args.imaml_lam, "cg_iterations": CG_ITERATIONS}
    return method.options()


def learner(key: str, model, inner_lr: float, args: argparse.Namespace, batched: bool | str = "auto"):
    """The method's ``lazymaml.MetaLearner`` (the control adapts like first-order MAML)."""
    import lazymaml

    method = METHODS[key]
    estimator = "first_order" if method.estimator == "none" else method.estimator
    return lazymaml.MetaLearner(
        model,
        method.steps,
        inner_lr,
        estimator=estimator,
        adapt=method.adapt,
        leap=method.leap,
        batched=batched,
        **options(method, args),
    )


def train(
    key: str, inner_lr: float, seed: int, shots: int, outer_steps: int, args: argparse.Namespace, progress
):
    """Meta-train ``key`` from ``seed`` (the control: no step); the model and how training went
    (the keyword arguments of ``FewShotRun`` that training decides)."""
    import hashlib

    import torch

    from lazymaml.estimators import ConvergenceWarning

    data = splits(args)
    torch.manual_seed(seed)
    c, size, _ = data["train"].shape
    model = network(WAYS, args.channels_net, size, c, args.norm)
    meta = learner(key, model, inner_lr, args)
    outer = torch.optim.Adam(model.parameters(), lr=args.outer_lr)
    stream = torch.Generator().manual_seed(seed)
    seconds, losses, notes, diverged, unconverged = [], [], set(), None, 0
    seen = hashlib.blake2b(digest_size=16)  # the training tasks, to show every method saw the same
    for step in range(0 if METHODS[key].estimator == "none" else outer_steps):
        tasks = [data["train"].task(stream, WAYS, shots, QUERIES) for _ in range(args.meta_batch)]
        fingerprint(tasks, seen)
        try:
            loss, took, caught = outer_step(meta, outer, tasks)
        except (FloatingPointError, ValueError) as error:  # non-finite, or iMAML's CG refused
            diverged = Divergence(step + 1, str(error))
            progress.put(outer_steps - step)
            break
        seconds.append(took)
        losses.append(loss)
        unconverged += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        notes |= {str(w.message) for w in caught if not issubclass(w.category, ConvergenceWarning)}
        progress.put(1)
    return model, {
        "step_seconds": statistics.median(seconds[1:] or seconds) if seconds else None,
        "train_loss_last": statistics.fmean(losses[-10:]) if losses else None,
        "diverged": diverged,
        "cg_unconverged_tasks": unconverged,
        "warnings": tuple(sorted(notes)),
        "train_tasks_digest": seen.hexdigest(),
    }


def accuracy(key: str, model, inner_lr: float, tasks: list, args: argparse.Namespace) -> float:
    """Mean query accuracy after the method's own K inner steps; chance where adaptation diverges."""
    import torch

    meta = learner(key, model, inner_lr, args)
    correct = []
    for task in tasks:
        try:
            adapted = meta.adapt(task)
        except (FloatingPointError, ValueError):
            correct.append(1 / WAYS)
            continue
        x, y = task.query
        with torch.no_grad():
            correct.append((adapted(x).argmax(1) == y).float().mean().item())
    return statistics.fmean(correct)


def memory(key: str, model, inner_lr: float, shots: int, args: argparse.Namespace) -> dict[str, int | None]:
    """Peak resident bytes above the baseline during one outer step (the learner as trained), and
    the autograd graph's peak bytes for one task on the sequential path (SavedTensorMeter)."""
    import contextlib

    import torch

    from gradcheck.memory import SavedTensorMeter

    result: dict[str, int | None] = {"peak_rss_bytes": None, "graph_bytes_per_task": None}
    if METHODS[key].estimator == "none":
        return result
    generator = torch.Generator().manual_seed(MEMORY_SEED)
    tasks = [splits(args)["train"].task(generator, WAYS, shots, QUERIES) for _ in range(args.meta_batch)]
    with contextlib.suppress(FloatingPointError, ValueError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = learner(key, model, inner_lr, args)
        meta.meta_backward(tasks)  # warm-up: lazily built state is not the step's memory
        result["peak_rss_bytes"] = peak_resident_bytes(lambda: meta.meta_backward(tasks))
        with SavedTensorMeter() as meter:
            learner(key, model, inner_lr, args, batched=False).meta_backward(tasks[:1])
        result["graph_bytes_per_task"] = meter.peak
    model.zero_grad(set_to_none=True)
    return result


def deviation(key: str, model, inner_lr: float, shots: int, args: argparse.Namespace) -> float | None:
    """‖g − g_MAML‖ / ‖g_MAML‖ at the model's θ, in float64, on the same validation tasks: the
    method's meta-gradient against exact second-order MAML with the same K, α, adapted set and γ
    (the oracle, ``gradcheck.oracle``). None for the control, or where the method's gradient fails."""
    import copy

    import torch

    from gradcheck import compare, oracle
    from lazymaml import estimators

    method = METHODS[key]
    if method.estimator == "none":
        return None
    twin = copy.deepcopy(model).double()
    generator = torch.Generator().manual_seed(VAL_SEED)
    tasks = [
        splits(args)["val"].task(generator, WAYS, shots, QUERIES).to(torch.float64)
        for _ in range(DEVIATION_TASKS)
    ]
    settings: dict[str, Any] = {"adapt": method.adapt, "leap": method.leap}
    exact = oracle.meta_gradient(twin, tasks, method.steps, inner_lr, **settings)
    estimator = estimators.as_function(method.estimator)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = estimator(twin, tasks, method.steps, inner_lr, **settings, **options(method, args))
    except (FloatingPointError, ValueError):
        return None
    return compare(g, exact).overall.rel_error


def job(kind: str, key: str, inner_lr: float, seed: int, shots: int, args: argparse.Namespace, progress):
    """One sweep point (``kind="sweep"``: scored on meta-validation tasks) or one full run."""
    import torch

    torch.set_num_threads(1)
    sweep = kind == "sweep"
    outer_steps = args.sweep_steps if sweep else args.outer_steps
    model, trained = train(key, inner_lr, seed, shots, outer_steps, args, progress)
    split, count, task_seed = (
        ("val", args.val_tasks, VAL_SEED) if sweep else ("test", args.test_tasks, TEST_SEED)
    )
    tasks = splits(args)[split].tasks(count, task_seed, WAYS, shots, QUERIES)
    score = 1 / WAYS if trained["diverged"] else accuracy(key, model, inner_lr, tasks, args)
    measured: dict[str, Any] = {}
    if not sweep:
        measured = memory(key, model, inner_lr, shots, args)
        measured["deviation_from_maml"] = deviation(key, model, inner_lr, shots, args)
    return FewShotRun(
        kind=kind,
        shots=shots,
        method=key,
        inner_lr=inner_lr,
        seed=seed,
        accuracy=score,
        eval_tasks_digest=fingerprint(tasks).hexdigest(),
        **trained,
        **measured,
    )


def best_inner_lr(sweep: list[FewShotRun]) -> float:
    """The swept α with the highest meta-validation accuracy; the smaller α on ties."""
    return max(sweep, key=lambda r: (r.accuracy, -r.inner_lr)).inner_lr


def summarise(runs: list[FewShotRun], shots: int, keys: list[str]) -> list[FewShotRow]:
    """One row per method: accuracy over seeds, median step time and memory."""
    rows = []
    for key in keys:
        mine = [r for r in runs if r.method == key and r.shots == shots]
        mean, half = interval([r.accuracy for r in mine])
        seconds = median_known(r.step_seconds for r in mine)
        rss = median_known(r.peak_rss_bytes for r in mine)
        graph = median_known(r.graph_bytes_per_task for r in mine)
        rows.append(
            FewShotRow(
                shots=shots,
                method=key,
                label=METHODS[key].label,
                K=METHODS[key].steps,
                inner_lr=mine[0].inner_lr,
                accuracy=mean,
                ci95=half,
                step_ms=None if seconds is None else 1e3 * seconds,
                peak_rss_mib=None if rss is None else rss / 2**20,
                graph_mib_per_task=None if graph is None else graph / 2**20,
                diverged_seeds=sum(r.diverged is not None for r in mine),
                deviation_from_maml=median_known(r.deviation_from_maml for r in mine),
            )
        )
    return rows


def table(summary: list[FewShotRow]) -> str:
    header = ("shots", "method", "α", "accuracy %", "ms/step", "RSS MiB", "graph MiB", "dev. vs MAML")
    widths = (5, -26, 6, 15, 8, 8, 9, 12)  # negative: left-aligned
    lines = []
    for r in summary:
        cells = (
            str(r.shots),
            r.label,
            f"{r.inner_lr:g}",
            f"{100 * r.accuracy:.2f} ± {100 * r.ci95:.2f}",
            cell(r.step_ms, ".1f"),
            cell(r.peak_rss_mib, ".1f"),
            cell(r.graph_mib_per_task, ".3f"),
            cell(r.deviation_from_maml, ".2e"),
        )
        note = f"  ({r.diverged_seeds} seeds diverged: scored at chance)" if r.diverged_seeds else ""
        lines.append((cells, note))
    return text_table(header, widths, lines)


# the plots' x axes: the summary field and its label
STEPS_AXIS = ("K", "inner steps K")
TIME_AXIS = ("step_ms", "ms per outer step")
RSS_AXIS = ("peak_rss_mib", "peak RSS MiB above baseline, one outer step")
GRAPH_AXIS = ("graph_mib_per_task", "autograd graph MiB per task")


def plot_accuracy(axes, summary: list[FewShotRow], shots: int, xs=(STEPS_AXIS, TIME_AXIS, RSS_AXIS)) -> None:
    """On each of ``axes``: meta-test accuracy (± the 95% interval) of each family of methods at
    ``shots`` against one field of ``xs``; the no-meta-training control dashed black."""
    import matplotlib.pyplot as plt

    families = sorted({METHODS[r.method].family for r in summary})
    colours = dict(zip(families, plt.get_cmap("tab20").colors))
    mine = [r for r in summary if r.shots == shots]
    for family in families:
        rs = sorted((r for r in mine if METHODS[r.method].family == family), key=lambda r: r.K)
        control = family == "no meta-training"
        for ax, (x, _) in zip(axes, xs):
            known = [r for r in rs if getattr(r, x) is not None]
            if known:
                ax.errorbar(
                    [getattr(r, x) for r in known],
                    [100 * r.accuracy for r in known],
                    yerr=[0 if math.isnan(r.ci95) else 100 * r.ci95 for r in known],
                    fmt="--" if control else "-o" if len(known) > 1 else "s",
                    color="black" if control else colours[family],
                    capsize=3,
                    label=family,
                )
    for ax, (x, xlabel) in zip(axes, xs):
        ax.set(xlabel=xlabel, ylabel=f"meta-test accuracy %, 5-way {shots}-shot", xscale="log")
        ax.grid(alpha=0.3, which="both")
        if x == "K":
            ax.set_xticks([1, 5, 10, 20, 40], ["1", "5", "10", "20", "40"])
    axes[0].legend(fontsize=7)


def plot(summary: list[FewShotRow], path: Path | None = None, xs=(STEPS_AXIS, TIME_AXIS, RSS_AXIS)):
    """Accuracy against each of ``xs`` (by default K, ms per outer step and peak memory), a row per
    shot count; saved to ``path`` (and closed) where given, else returned."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = sorted({r.shots for r in summary})
    fig, axes = plt.subplots(len(shots), len(xs), figsize=(5 * len(xs), 4.2 * len(shots)), squeeze=False)
    for row, shot in zip(axes, shots):
        plot_accuracy(row, summary, shot, xs)
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


QUICK = {
    "outer_steps": 3,
    "meta_batch": 2,
    "seeds": 2,
    "sweep_steps": 1,
    "inner_lrs": [0.03, 0.1],
    "val_tasks": 2,
    "test_tasks": 4,
    "shots": [1],
    "channels_net": 8,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add_common_arguments(parser, QUICK)
    add("--methods", nargs="+", default=["*"], help="keys or glob patterns, of: " + " ".join(METHODS))
    add("--shots", type=int, nargs="+", default=[1, 5])
    add("--seeds", type=int, default=3)
    add("--outer-steps", type=int, default=500)
    add("--meta-batch", type=int, default=4)
    add("--outer-lr", type=float, default=1e-3)
    add("--inner-lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3], help="the α grid, every method")
    add("--sweep-steps", type=int, default=100, help="outer steps of each sweep run")
    add("--val-tasks", type=int, default=100)
    add("--test-tasks", type=int, default=600)
    add("--channels-net", type=int, default=16, help="filters per conv block")
    add("--norm", choices=("batch", "none"), default="batch", help="normalisation in each conv block")
    add("--imaml-lam", type=float, default=2.0, help="iMAML's proximal strength λ")
    add("--data", type=Path, help="a folder in a standard layout instead of the digits")
    add("--image-size", type=int, default=28, help="with --data: images resized to this")
    add("--channels", type=int, choices=(1, 3), default=1, help="with --data: 1 grey, 3 RGB")
    add("--rotate", action="store_true", help="with --data: each rotation by 90° a new class")
    return parse_common(parser, argv, QUICK, METHODS)


def meta_train(args: argparse.Namespace) -> tuple[list[FewShotRun], list[FewShotRun], dict[int, dict]]:
    """Per shot count the α sweep, then every method from every seed at its chosen α, on the
    worker processes: the sweep points, the runs and the chosen α per shot count and method."""
    from tqdm import tqdm

    progress = multiprocessing.Manager().Queue()
    trained = [k for k in args.keys if METHODS[k].estimator != "none"]
    per_shot = len(trained) * (len(args.inner_lrs) * args.sweep_steps + args.seeds * args.outer_steps)
    sweep: list[FewShotRun] = []
    runs: list[FewShotRun] = []
    chosen: dict[int, dict[str, float]] = {}
    with (
        ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool,
        tqdm(total=len(args.shots) * per_shot, unit="outer step", desc="few-shot", smoothing=0.05) as bar,
    ):
        for shot in args.shots:
            points = [("sweep", k, lr, 0, shot) for k in args.keys for lr in args.inner_lrs]
            scored = pool_map(pool, job, points, args, bar, progress)
            sweep += scored
            chosen[shot] = {k: best_inner_lr([r for r in scored if r.method == k]) for k in args.keys}
            finals = [("run", k, chosen[shot][k], s, shot) for k in args.keys for s in range(args.seeds)]
            runs += pool_map(pool, job, finals, args, bar, progress)
    return sweep, runs, chosen


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    sweep, runs, chosen = meta_train(args)
    summary = [row for shot in args.shots for row in summarise(runs, shot, args.keys)]
    data = "digits (scikit-learn, rotation classes)" if args.data is None else str(args.data)
    print(
        f"\n{data}; 5-way, {QUERIES} queries; {args.outer_steps} outer steps × meta-batch {args.meta_batch}, "
        f"Adam {args.outer_lr}; {args.seeds} seeds; {args.test_tasks} meta-test tasks; "
        f"α from {args.inner_lrs}"
    )
    print(table(summary))
    settings = {
        "cg_iterations": CG_ITERATIONS,
        "task_seeds": {"val": VAL_SEED, "test": TEST_SEED, "memory": MEMORY_SEED},
        "classes": {s: list(c.names) for s, c in splits(args).items()},
        "command": "python benchmarks/few_shot.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    record = {
        "wall_seconds": time.perf_counter() - started,
        "chosen_inner_lr": chosen,
        "summary": summary,
        "runs": runs,
        "sweep": sweep,
    }
    write_results(args, "few_shot", METHODS, settings, record, lambda path: plot(summary, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
