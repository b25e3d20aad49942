"""Time and peak memory of the lazy, exact and first-order meta-gradients vs the inner horizon K.

    python benchmarks/lazy_vs_exact.py                 # SPEC §5 network, K ∈ {1, 5, 10, 20, 40}
    python benchmarks/lazy_vs_exact.py --device cuda --json results.json

The network is the 4-conv few-shot classifier on 84×84×3 inputs, 5-way 1-shot with 15 queries
per class (SPEC §5). Every (method, K) runs in its own process: after a warm-up run, the peak
of resident memory above the process's baseline is measured for one run (Linux: VmHWM reset
through /proc/self/clear_refs, glibc told to return freed blocks; CUDA: allocator statistics),
then the median time of ``--repeats`` runs. Methods: ``lazy`` (lazymaml.meta_gradient),
``exact`` (gradcheck.oracle, on higher), ``first_order`` (first-order MAML, graph-free student),
``unroll`` (a hand-written torch.func unroll of exact MAML: estimators.truncated with T = K).
The ratio table at the end compares one run's figures with the SPEC §5 targets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


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
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak resident set size (VmHWM) to the current one
        base = _rss_bytes("VmRSS")
        run()
        peak = _rss_bytes("VmHWM") - base
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"method": method, "steps": steps, "seconds": statistics.median(times), "peak_mib": peak / 2**20}


def measure(method: str, steps: int, args: argparse.Namespace) -> dict:
    """Run :func:`worker` in a fresh process (so peaks of earlier runs do not interfere)."""
    command = [sys.executable, __file__, "--worker", method, str(steps), *_forwarded(args)]
    # glibc keeps freed blocks below a dynamic mmap threshold in its heap, which would hide the
    # warm-up's memory from the baseline; a fixed threshold returns large blocks to the system.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
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


def ratio_table(results: list[dict], k: int = 20) -> list[tuple[str, float, str, bool]]:
    """SPEC §5 ratios from one run's results (rows whose inputs were not measured are left out)."""
    at = {(r["method"], r["steps"]): r for r in results}
    rows = []

    def add(label, num, den, field, bound, at_most):
        if num in at and den in at:
            value = at[num][field] / at[den][field]
            rows.append(
                (
                    label,
                    value,
                    f"{'≤' if at_most else '≥'} {bound}",
                    value <= bound if at_most else value >= bound,
                )
            )

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

    import platform

    import torch

    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    if args.device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name(args.device)}"
    print(
        f"# {args.image_size}×{args.image_size} 4-conv ({args.channels} channels), 5-way 1-shot, "
        f"15 queries/class; device {args.device}; {machine}"
    )
    results = []
    print(f"{'method':<12} {'K':>3} {'time (s)':>10} {'peak (MiB)':>11}")
    for method in args.methods:
        for k in args.ks:
            r = measure(method, k, args)
            results.append(r)
            print(f"{method:<12} {k:>3} {r['seconds']:>10.3f} {r['peak_mib']:>11.1f}", flush=True)
    k = 20 if 20 in args.ks else max(args.ks)
    rows = ratio_table(results, k)
    print(f"\n{'SPEC §5 target':<52} {'measured':>9}  {'target':<7} ok")
    for label, value, target, ok in rows:
        print(f"{label:<52} {value:>9.2f}  {target:<7} {'yes' if ok else 'NO'}")
    n, seconds = directional_check_seconds(args.device)
    print(f"directional FD check (8 directions, K=5) of a {n}-parameter MLP: {seconds:.2f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "device": args.device,
                    "results": results,
                    "ratios": rows,
                    "directional_check": [n, seconds],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
