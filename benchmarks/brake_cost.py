"""What the brake costs: time and memory of the stored-point product against Lazy, first-order
and exact MAML, at K = 10, 20, 40, on the sinusoid MLP and on the few-shot 4-conv network.

    python benchmarks/brake_cost.py --quick      # smoke test, the same code path (≈ 10 s)
    python benchmarks/brake_cost.py              # K = 10, 20, 40 on both networks (≈ 3 min)

Per network, K and estimator (``lazymaml.MetaLearner``, sequential path, one thread):

* **graph bytes**: the autograd graph's peak for one task's meta-gradient
  (``gradcheck.memory.SavedTensorMeter``: exact, deterministic);
* **stored bytes**: the parameter copies the estimator keeps outside any graph — the brake's
  stored points (``maml_hvp``: K points; ``maml_hvp_sqrt``: ⌈K/m⌉ checkpoints plus one segment of
  m recomputed points, m = ⌈√K⌉), counted from the parameter count (float32);
* **time**: the median seconds of one ``meta_backward`` on a meta-batch (sinusoid: 25 tasks,
  10-shot; 4-conv: 4 tasks, 5-way 1-shot, 15 queries), the estimators interleaved round by round
  in one process so that a machine shared with others slows them alike; reported as a ratio to
  Lazy's at the same K.

Networks: the sinusoid benchmark's MLP 1–40–40–1 ReLU (1,761 parameters: its activations are a
few KiB) and the few-shot benchmark's 4-conv net (16 filters, BatchNorm, 8×8 digits), whose
activations are large against its 7,000-odd parameters. A table and ``brake_cost[-quick].json``
under ``--out``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plain

ESTIMATORS = ("first_order", "lazy", "maml", "maml_hvp", "maml_hvp_sqrt")
QUICK = {"steps": [2, 4], "rounds": 2, "networks": ["sinusoid", "conv"]}


def stored_points(estimator: str, steps: int) -> int:
    """Parameter copies the estimator holds at its peak, outside the autograd graph."""
    from lazymaml.estimators import sqrt_interval

    if estimator == "maml_hvp":
        return steps
    if estimator == "maml_hvp_sqrt":
        m = sqrt_interval(steps)
        return math.ceil(steps / m) + m
    return 0


def problem(network: str):
    """(model, one task for the graph, the meta-batch to time, α)."""
    import torch

    from gradcheck import Task, problems

    torch.manual_seed(0)
    if network == "sinusoid":
        generator = torch.Generator().manual_seed(0)
        tasks = [problems.sinusoid(generator, 10, 10) for _ in range(25)]
        return problems.mlp((40, 40)), tasks[0], Task.stack(tasks), 0.01
    import few_shot

    from lazymaml import datasets

    generator = torch.Generator().manual_seed(0)
    train = datasets.digits()["train"]
    tasks = [train.task(generator, 5, 1, 15) for _ in range(4)]
    return few_shot.network(5, 16, 8, 1), tasks[0], tasks, 0.1


def measure(network: str, steps: list[int], rounds: int) -> list[dict]:

    import lazymaml
    from gradcheck.memory import SavedTensorMeter

    model, one, batch, inner_lr = problem(network)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for k in steps:
        learners = {
            e: lazymaml.MetaLearner(model, k, inner_lr, estimator=e, batched=False) for e in ESTIMATORS
        }
        graph = {}
        for name, meta in learners.items():
            with SavedTensorMeter() as meter:
                meta.meta_backward(one)
            graph[name] = meter.peak
        seconds: dict[str, list[float]] = {e: [] for e in ESTIMATORS}
        for _ in range(rounds + 1):  # the first round warms up, uncounted
            for name, meta in learners.items():
                start = time.perf_counter()
                meta.meta_backward(batch)
                seconds[name].append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        lazy = statistics.median(seconds["lazy"][1:])
        for name in ESTIMATORS:
            median = statistics.median(seconds[name][1:])
            rows.append(
                {
                    "network": network,
                    "K": k,
                    "estimator": name,
                    "graph_bytes": graph[name],
                    "stored_bytes": stored_points(name, k) * parameter_bytes,
                    "seconds": median,
                    "time_vs_lazy": median / lazy,
                    "parameter_bytes": parameter_bytes,
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        f"{'network':9} {'K':>3} {'estimator':14} {'graph KiB':>10} {'stored KiB':>10} {'ms':>9} {'×lazy':>6}"
    ]
    for r in rows:
        lines.append(
            f"{r['network']:9} {r['K']:>3} {r['estimator']:14} {r['graph_bytes'] / 1024:>10.1f} "
            f"{r['stored_bytes'] / 1024:>10.1f} {1e3 * r['seconds']:>9.1f} {r['time_vs_lazy']:>6.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK}")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up)")
    parser.add_argument("--networks", nargs="+", default=["sinusoid", "conv"], choices=["sinusoid", "conv"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = [r for n in args.networks for r in measure(n, args.steps, args.rounds)]
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("brake_cost-quick.json" if args.quick else "brake_cost.json")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["command"] = "python benchmarks/brake_cost.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    settings["torch"] = torch.__version__
    settings["load_average"] = __import__("os").getloadavg()  # a shared machine slows every timing
    record = {"settings": settings, "wall_seconds": time.perf_counter() - started, "rows": rows}
    path.write_text(__import__("json").dumps(plain(record), indent=1, allow_nan=False))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
