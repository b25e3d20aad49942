"""Time and peak memory of the lazy, exact and first-order meta-gradients vs the inner horizon K.

    python benchmarks/lazy_vs_exact.py                 # the network below, K ∈ {1, 5, 10, 20, 40}
    python benchmarks/lazy_vs_exact.py --device cuda --json results.json

The network is the 4-conv few-shot classifier on 84×84×3 inputs, 5-way 1-shot with 15 queries
per class. Every (method, K) runs in its own process: after a warm-up run, the peak
of resident memory above the process's baseline is measured for one run (Linux: VmHWM reset
through /proc/self/clear_refs, glibc told to return freed blocks; CUDA: allocator statistics),
then the median time of ``--repeats`` runs. Methods: ``lazy`` (lazymaml.meta_gradient),
``exact`` (gradcheck.oracle, on higher), ``first_order`` (first-order MAML, graph-free student),
``unroll`` (a hand-written torch.func unroll of exact MAML: estimators.truncated with T = K).
The ratio table at the end compares one run's figures with the performance targets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py
from common import MEASURING_ENV, Ratio, machine, peak_resident_bytes, ratio_lines

METHODS = ("lazy", "exact", "first_order", "unroll")
KS = (1, 5, 10, 20, 40)


def _estimator(method: str):
    import lazymaml
    from gradcheck import oracle
    from lazymaml import estimators

    return {
        "lazy": lazymaml.meta_gradient,
        "exact": oracle.meta_gradient,
        "first_order": estimators.first_order,
        "unroll": estimators.truncated,
    }[method]


def worker(method: str, steps: int, args: argparse.Namespace) -> dict:
    """Measure one (method, K) in this process; returns seconds (median) and peak MiB."""
    import torch

    from gradcheck import problems

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = problems.conv4(ways=5, channels=args.channels, image_size=args.image_size).to(device)
    task = problems.few_shot(
        torch.Generator().manual_seed(args.seed), image_size=args.image_size, device=device
    )
    fn = _estimator(method)

    def run() -> None:
        fn(model, task, steps, args.inner_lr)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up: kernels, thread pools, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_resident_bytes(run)
        if peak is None:
            raise RuntimeError("peak resident memory needs Linux's /proc/self (or --device cuda)")
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"method": method, "steps": steps, "seconds": statistics.median(times), "peak_mib": peak / 2**20}


def measure(method: str, steps: int, args: argparse.Namespace) -> dict:
    """Run :func:`worker` in a fresh process (so peaks of earlier runs do not interfere)."""
    command = [sys.executable, __file__, "--worker", method, str(steps), *_forwarded(args)]
    out = subprocess.run(command, capture_output=True, text=True, env=MEASURING_ENV, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _forwarded(args: argparse.Namespace) -> list[str]:
    return [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k in ("device", "repeats", "seed", "inner_lr", "channels", "image_size")
    ]


def directional_check_seconds(device: str) -> tuple[int, float]:
    """Seconds for an 8-direction finite-difference check of a ≥100k-parameter MLP's meta-gradient."""
    import torch

    from gradcheck import Task, finite_differences, oracle, problems

    torch.manual_seed(0)
    model = problems.mlp((256, 256, 128), torch.nn.Tanh, inputs=8, outputs=4).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g).to(device)
    task = Task((x[:16], x[:16, :4].sin()), (x[16:], x[16:, :4].sin()), torch.nn.functional.mse_loss)
    gradient = oracle.meta_gradient(model, task, 5, 0.05)
    start = time.perf_counter()
    finite_differences.check(gradient, model, task, 5, 0.05, directions=8).assert_close()
    return sum(p.numel() for p in model.parameters()), time.perf_counter() - start


def ratio_table(results: list[dict], k: int = 20) -> list[Ratio]:
    """The target ratios from one run's results (rows whose inputs were not measured are left out)."""
    at = {(r["method"], r["steps"]): r for r in results}
    rows = []

    def add(label: str, num: tuple, den: tuple, field: str, bound: float, at_most: bool) -> None:
        if num in at and den in at:
            rows.append(Ratio(label, at[num][field] / at[den][field], bound, at_most))

    add(f"lazy peak memory K={k} / lazy K=1", ("lazy", k), ("lazy", 1), "peak_mib", 1.2, True)
    add(f"lazy time K={k} / first-order K={k}", ("lazy", k), ("first_order", k), "seconds", 1.25, True)
    add(f"exact time / lazy time, K={k}", ("exact", k), ("lazy", k), "seconds", 2, False)
    add(f"exact peak memory / lazy peak memory, K={k}", ("exact", k), ("lazy", k), "peak_mib", 2, False)
    add(
        f"exact (higher) time / torch.func unroll time, K={k}",
        ("exact", k),
        ("unroll", k),
        "seconds",
        1.5,
        True,
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args)))
        return 0

    described = machine(args.device)
    print(
        f"# {args.image_size}×{args.image_size} 4-conv ({args.channels} channels), 5-way 1-shot, "
        f"15 queries/class; device {args.device}; {described}"
    )
    results = []
    print(f"{'method':<12} {'K':>3} {'time (s)':>10} {'peak (MiB)':>11}")
    for method in args.methods:
        for k in args.ks:
            r = measure(method, k, args)
            results.append(r)
            print(f"{method:<12} {k:>3} {r['seconds']:>10.3f} {r['peak_mib']:>11.1f}", flush=True)
    k = 20 if 20 in args.ks else max(args.ks)
    ratios = ratio_table(results, k)
    print("\n" + "\n".join(ratio_lines(ratios)))
    n, seconds = directional_check_seconds(args.device)
    print(f"directional FD check (8 directions, K=5) of a {n}-parameter MLP: {seconds:.2f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": described,
                    "device": args.device,
                    "results": results,
                    "ratios": [r.row() for r in ratios],
                    "directional_check": [n, seconds],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
