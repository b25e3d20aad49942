"""Meta-training on the sinusoid benchmark: MAML (K = 1, 5), first-order MAML and Lazy (K = 10, 20, 40).

    python benchmarks/sinusoid.py                  # defaults: a few minutes on 2 cores
    python benchmarks/sinusoid.py --iterations 5000 --seeds 5 --json sinusoid.json

Tasks (Finn et al., 2017): y = A sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5], 10 support
and 10 query points, generated on the fly; an MLP 1–40–40–1 with ReLU. Every method gets the same
outer budget (iterations × meta-batch, Adam), the same seeds (initialisation and task stream) and
the same held-out tasks. Reported: query MSE on held-out tasks after adapting with the method's
own K SGD steps, and after 10 steps for all; mean ± 95% t-interval over seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import queue
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# (estimator of lazymaml.MetaLearner, K); "maml" is exact second-order MAML
METHODS = {
    "MAML K=1": ("maml", 1),
    "MAML K=5": ("maml", 5),
    "FOMAML K=5": ("first_order", 5),
    "Lazy K=10": ("lazy", 10),
    "Lazy K=20": ("lazy", 20),
    "Lazy K=40": ("lazy", 40),
}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T_975.get(n - 1, 1.96) * sd / math.sqrt(n)


def train(method: str, seed: int, args: argparse.Namespace, progress) -> dict:
    """Meta-train one method from one seed; evaluate on the held-out tasks."""
    import torch

    import lazymaml
    from gradcheck import problems

    torch.set_num_threads(1)
    estimator, steps = METHODS[method]
    torch.manual_seed(seed)
    model = problems.mlp((40, 40))
    learner = lazymaml.MetaLearner(model, steps, args.inner_lr, estimator=estimator, batched=args.batched)
    outer = torch.optim.Adam(model.parameters(), lr=args.outer_lr)
    stream = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for i in range(args.iterations):
        outer.zero_grad()
        learner.meta_backward([problems.sinusoid(stream) for _ in range(args.meta_batch)])
        outer.step()
        if (i + 1) % 10 == 0:
            progress.put(10)
    seconds = time.perf_counter() - start
    held_out = [problems.sinusoid(torch.Generator().manual_seed(10**6 + i)) for i in range(args.eval_tasks)]
    ten = lazymaml.LazyMAML(model, 10, args.inner_lr)

    def mse(adapter: lazymaml.MetaLearner) -> float:
        with torch.no_grad():
            return sum(t.query_loss(adapter.adapt(t)).item() for t in held_out) / len(held_out)

    return {
        "method": method,
        "seed": seed,
        "mse_own_k": mse(learner),
        "mse_10_steps": mse(ten),
        "training_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300, help="outer steps per run")
    parser.add_argument("--meta-batch", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--outer-lr", type=float, default=3e-3)
    parser.add_argument("--eval-tasks", type=int, default=100)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--sequential",
        dest="batched",
        action="store_false",
        help="one task at a time (MetaLearner batched=False)",
    )
    parser.add_argument("--json", type=Path, help="also write the per-seed results here")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    runs = [(m, s) for m in args.methods for s in range(args.seeds)]
    manager = multiprocessing.Manager()
    progress = manager.Queue()
    results = []
    started = time.perf_counter()
    with (
        ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool,
        tqdm(total=len(runs) * (args.iterations // 10 * 10), unit="outer step", desc="meta-training") as bar,
    ):
        futures = [pool.submit(train, m, s, args, progress) for m, s in runs]
        while not all(f.done() for f in futures):
            with contextlib.suppress(queue.Empty):
                bar.update(progress.get(timeout=0.2))
        results = [f.result() for f in futures]
    wall = time.perf_counter() - started
    path = "batched" if args.batched else "sequential"
    print(
        f"\nsinusoid, {args.iterations} outer steps × meta-batch {args.meta_batch}, α={args.inner_lr}, "
        f"Adam {args.outer_lr}, {args.seeds} seeds, {args.eval_tasks} held-out tasks (10-shot), {path}; "
        f"{wall:.0f} s wall with {args.workers} workers"
    )
    print(f"{'method':<12} {'MSE after own K steps':>24} {'MSE after 10 steps':>22} {'training s/seed':>16}")
    for method in args.methods:
        own = interval([r["mse_own_k"] for r in results if r["method"] == method])
        ten = interval([r["mse_10_steps"] for r in results if r["method"] == method])
        seconds = [r["training_seconds"] for r in results if r["method"] == method]
        print(
            f"{method:<12} {own[0]:>15.3f} ± {own[1]:<6.3f} {ten[0]:>13.3f} ± {ten[1]:<6.3f} "
            f"{sum(seconds) / len(seconds):>16.2f}"
        )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(
            json.dumps({"settings": settings, "wall_seconds": wall, "runs": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
