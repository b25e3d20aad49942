"""Meta-training throughput: MetaLearner's batched meta-batch against its sequential path.

    python benchmarks/throughput.py                      # everything, about 10 minutes on 2 cores
    python benchmarks/throughput.py --quick              # fewer repetitions and a smaller table
    python benchmarks/throughput.py --json benchmarks/results/throughput-cpu.json

One process, float32, ``torch.set_num_threads(1)`` (on CPU); every configuration is warmed up,
then the configurations of a section are timed in interleaved rounds (one call of each per
round), and the best and the median of the rounds are reported. One call is one outer step:
``learner.meta_backward(tasks)`` on a list of tasks, as a training loop makes it.

1. Sinusoid regression (MLP 1–40–40–1, α = 0.01, B = 25): lazy and first-order at K = 20,
   second-order MAML at K = 5, batched against sequential (``batched=False``), and lazy (K = 20)
   and MAML (K = 5) against plain hand-written ``torch.func.vmap`` implementations of the same
   maths (checked to give the same gradient) — MAML in both layouts, side by side: ``grad``
   inside the vmap ("inside") and functorch's example's one autograd backward after it
   ("outside"), with the library's time as a ratio of each; also the cost of the ``BatchStatistics``
   torch-function mode, which the learner switches on for models it cannot vouch for (here: the
   MLP inside a custom module). Then, each in a fresh process, the learner with the default
   ``batched="auto"`` against the hand-written vmap: its first call (auto's probe, the warm-up
   included), what it chose, and the interleaved steps after it. Last, the learner's work
   outside the computation, measured inside real steps: each step timed whole and
   ``lazymaml.batched.estimate`` (the computation) timed within it, their difference as a share
   of the step (medians) — checks, the snapshot that keeps the model as it was, reading the
   student, stacking the tasks, the finiteness check and writing ``p.grad``.
2. The 4-conv few-shot network (84×84×3, 5-way 1-shot, 15 queries per class, B = 4, K = 20),
   lazy: batched (forced, ``batched=True``) against sequential, and ``batched="auto"`` after its
   first meta-batch (its probe); peak memory against K, each (path, K) in a fresh process (peak
   resident set above the baseline on CPU, allocator statistics on CUDA).
3. Milliseconds per outer step on the sinusoid problem for B ∈ {1, 5, 25} and K ∈ {1, 5, 20},
   per estimator, batched, with the speed-up over sequential.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import lazymaml
from gradcheck import Task, compare, problems

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py
from common import MEASURING_ENV, Ratio, machine, peak_resident_bytes, ratio_lines

INNER_LR = 0.01
# section 1's learners (estimator, K) and the speed-up of batched over sequential each must reach
SINUSOID_TARGETS = (("lazy", 20, 4), ("first_order", 20, 4), ("maml", 5, 2))
TABLE_ESTIMATORS = {  # name -> MetaLearner options ("lazy_horizon" costs what "lazy" does)
    "maml": dict(estimator="maml"),
    "truncated (T=1)": dict(estimator="truncated", horizon=1),
    "first_order": dict(estimator="first_order"),
    "lazy": dict(estimator="lazy"),
    "reptile": dict(estimator="reptile"),
}


def timing_key(estimator: str, steps: int, path: str) -> str:
    """The name of a timed configuration in the printed tables and the results file."""
    return f"{estimator} K={steps} {path}"


def memory_key(path: str, steps: int) -> str:
    """The name of a peak-memory measurement (lazy, conv4) in the results file."""
    return f"{path} K={steps}"


def table_key(estimator: str, batch: int, steps: int, path: str) -> str:
    """The name of one cell of section 3's table in the results file."""
    return f"{estimator}|{batch}|{steps}|{path}"


LAZY_MODE = timing_key("lazy", 20, "batched, BatchStatistics mode")
LAZY_VMAP = timing_key("lazy", 20, "hand-written vmap")
MAML_VMAP = timing_key("maml", 5, "hand-written vmap")  # the inside layout
MAML_OUTSIDE = timing_key("maml", 5, "hand-written vmap, outside")
FRESH = (("lazy", 20), ("maml", 5))  # the fresh-process auto measurements (estimator, K)


class Wrapped(nn.Module):
    """A model class the batched path cannot vouch for (it owns no tensors, its forward is custom):
    the learner runs it under ``BatchStatistics``, at some cost per torch call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


def _stacked(tasks: list[Task]) -> tuple[Tensor, ...]:
    """The tasks' support inputs, targets, query inputs and targets, each stacked over tasks."""
    return tuple(torch.stack(parts) for parts in zip(*((*t.support, *t.query) for t in tasks)))


def _mse(model: nn.Module) -> Callable[[dict[str, Tensor], Tensor, Tensor], Tensor]:
    """``loss(p, x, y)``: the model's MSE at parameters ``p``."""
    return lambda p, x, y: F.mse_loss(functional_call(model, p, (x,)), y)


def _unrolled(
    loss: Callable[..., Tensor], phi: dict[str, Tensor], xs: Tensor, ys: Tensor, steps: int, inner_lr: float
) -> dict[str, Tensor]:
    """φ_K: ``steps`` plain SGD steps on the support loss, each ``grad`` differentiable."""
    for _ in range(steps):
        g = grad(loss)(phi, xs, ys)
        phi = {n: phi[n] - inner_lr * g[n] for n in phi}
    return phi


def reference_lazy(model: nn.Module, tasks: list[Task], steps: int, inner_lr: float) -> dict[str, Tensor]:
    """The lazy meta-gradient (γ = 1, η = α, MSE) written plainly with torch.func.vmap over tasks."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss = _mse(model)

    def per_task(xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> dict[str, Tensor]:
        v = grad(loss)(_unrolled(loss, params, xs, ys, steps, inner_lr), xq, yq)
        h = grad(lambda p: sum((g * v[n]).sum() for n, g in grad(loss)(p, xs, ys).items()))(params)
        return {n: v[n] - inner_lr * h[n] for n in v}

    return {n: g.mean(0) for n, g in vmap(per_task)(*_stacked(tasks)).items()}


def reference_maml(model: nn.Module, tasks: list[Task], steps: int, inner_lr: float) -> dict[str, Tensor]:
    """Second-order MAML (γ = 1, MSE) written plainly: ``grad`` of the unrolled inner loop, ``vmap``
    over tasks."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss = _mse(model)

    def per_task(xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> dict[str, Tensor]:
        return grad(lambda p: loss(_unrolled(loss, p, xs, ys, steps, inner_lr), xq, yq))(params)

    return {n: g.mean(0) for n, g in vmap(per_task)(*_stacked(tasks)).items()}


def reference_maml_outside(
    model: nn.Module, tasks: list[Task], steps: int, inner_lr: float
) -> dict[str, Tensor]:
    """Second-order MAML (γ = 1, MSE) in the layout of functorch's MAML example: ``vmap`` over
    tasks of the unrolled inner loop (its ``grad`` differentiable), then one ordinary autograd
    backward of the mean query loss to θ, outside the ``vmap``."""
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    loss = _mse(model)

    def per_task(p: dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        return loss(_unrolled(loss, p, xs, ys, steps, inner_lr), xq, yq)

    losses = vmap(per_task, in_dims=(None, 0, 0, 0, 0))(params, *_stacked(tasks))
    return dict(zip(params, torch.autograd.grad(losses.mean(), list(params.values()))))


REFERENCES = {"lazy": reference_lazy, "maml": reference_maml}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(calls: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, dict]:
    """Warm each call up, then time ``rounds`` rounds of one call each; best and median in ms."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            times[name].append(1e3 * (time.perf_counter() - start))
    return {n: {"best_ms": min(t), "median_ms": statistics.median(t), "rounds": t} for n, t in times.items()}


def step(learner: lazymaml.MetaLearner, tasks: list[Task]) -> Callable[[], object]:
    """One outer step's gradient: zero the gradients, meta_backward."""

    def call() -> Tensor:
        learner.model.zero_grad(set_to_none=True)
        return learner.meta_backward(tasks)

    return call


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def sinusoid_setup(batch: int, device: torch.device, seed: int = 0) -> tuple[nn.Module, list[Task]]:
    torch.manual_seed(seed)
    model = problems.mlp((40, 40)).to(device)
    stream = torch.Generator().manual_seed(seed)
    return model, [problems.sinusoid(stream, device=device) for _ in range(batch)]


def sinusoid_targets(args: argparse.Namespace, device: torch.device) -> dict:
    model, tasks = sinusoid_setup(25, device)
    learners = {
        (name, path): lazymaml.MetaLearner(model, steps, INNER_LR, estimator=name, batched=path == "batched")
        for name, steps, _ in SINUSOID_TARGETS
        for path in ("batched", "sequential")
    }
    steps_of = {name: steps for name, steps, _ in SINUSOID_TARGETS}
    calls = {
        timing_key(name, steps_of[name], path): step(learner, tasks)
        for (name, path), learner in learners.items()
    }
    wrapped = lazymaml.MetaLearner(Wrapped(model), 20, INNER_LR, batched=True)
    calls[LAZY_MODE] = step(wrapped, tasks)
    calls[LAZY_VMAP] = lambda: reference_lazy(model, tasks, 20, INNER_LR)
    calls[MAML_VMAP] = lambda: reference_maml(model, tasks, 5, INNER_LR)
    calls[MAML_OUTSIDE] = lambda: reference_maml_outside(model, tasks, 5, INNER_LR)
    timing = interleaved(calls, args.rounds, device)

    checks = {}
    for name in steps_of:
        step(learners[name, "batched"], tasks)()
        batched = grads(model)
        step(learners[name, "sequential"], tasks)()
        checks[f"{name}: batched vs sequential"] = compare(batched, grads(model)).overall.rel_error
    for name, steps in FRESH:
        step(learners[name, "batched"], tasks)()
        checks[f"{name}: batched vs hand-written vmap"] = compare(
            grads(model), REFERENCES[name](model, tasks, steps, INNER_LR)
        ).overall.rel_error
    step(learners["maml", "batched"], tasks)()
    checks["maml: batched vs hand-written vmap, outside"] = compare(
        grads(model), reference_maml_outside(model, tasks, 5, INNER_LR)
    ).overall.rel_error
    model.zero_grad(set_to_none=True)
    fresh = {f"{name} K={steps}": fresh_auto(args, name, steps) for name, steps in FRESH}
    own = {
        f"{name} K={steps}": outside_the_computation(learners[name, "batched"], tasks, 10 * args.rounds)
        for name, steps in FRESH
    }
    model.zero_grad(set_to_none=True)
    return {
        "timing": timing,
        "relative_differences": checks,
        "fresh_auto": fresh,
        "outside_the_computation": own,
    }


def outside_the_computation(learner: lazymaml.MetaLearner, tasks: list[Task], rounds: int) -> dict:
    """Medians over ``rounds`` real steps of the step, of ``lazymaml.batched.estimate`` within it,
    and of their difference: the learner's own work (ms, and as a share of the step)."""
    device = next(learner.model.parameters()).device
    compute, inside = lazymaml.batched.estimate, []

    def timed(*args: object, **kwargs: object) -> object:
        _sync(device)
        start = time.perf_counter()
        try:
            return compute(*args, **kwargs)
        finally:
            _sync(device)
            inside.append(time.perf_counter() - start)

    call, whole = step(learner, tasks), []
    call()
    lazymaml.batched.estimate = timed
    try:
        for _ in range(rounds):
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            whole.append(time.perf_counter() - start)
    finally:
        lazymaml.batched.estimate = compute
    outside = statistics.median(w - i for w, i in zip(whole, inside))
    median = statistics.median(whole)
    return {
        "step_ms": 1e3 * median,
        "estimate_ms": 1e3 * statistics.median(inside),
        "outside_ms": 1e3 * outside,
        "share": outside / median,
    }


def fresh_auto_probe(name: str, steps: int, rounds: int, device: torch.device) -> dict:
    """In this (fresh) process: the default learner's first call, its choice, then interleaved
    steps of it and of the hand-written vmap (which the first call has warmed up)."""
    model, tasks = sinusoid_setup(25, device)
    learner = lazymaml.MetaLearner(model, steps, INNER_LR, estimator=name)  # batched="auto"
    call = step(learner, tasks)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", lazymaml.SequentialFallback)
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        first = 1e3 * (time.perf_counter() - start)
    timing = interleaved(
        {"auto": call, "hand-written vmap": lambda: REFERENCES[name](model, tasks, steps, INNER_LR)},
        rounds,
        device,
    )
    return {
        "first_call_ms": first,
        "chose": "sequential" if learner.cannot_batch else "batched",
        "said": [str(w.message) for w in said],
        "estimates_ms_per_task": {p: 1e3 * s for p, s in learner.seconds.items()},
        "timing": timing,
    }


def fresh_auto(args: argparse.Namespace, name: str, steps: int) -> dict:
    """:func:`fresh_auto_probe` in a fresh process (nothing warmed up by the sections before)."""
    command = [
        sys.executable,
        __file__,
        "--device",
        args.device,
        "--fresh-auto",
        name,
        str(steps),
        str(args.rounds),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def conv4_setup(batch: int, device: torch.device, seed: int = 0) -> tuple[nn.Module, list[Task]]:
    torch.manual_seed(seed)
    model = problems.conv4().to(device)
    stream = torch.Generator().manual_seed(seed)
    return model, [problems.few_shot(stream, device=device) for _ in range(batch)]


def conv4_timing(args: argparse.Namespace, device: torch.device) -> tuple[dict, str]:
    """Interleaved timing of the three learners, and what auto decided after its probe."""
    model, tasks = conv4_setup(4, device)
    calls = {
        timing_key("lazy", 20, name): step(lazymaml.MetaLearner(model, 20, INNER_LR, batched=batched), tasks)
        for name, batched in (("batched", True), ("sequential", False), ("auto", "auto"))
    }
    auto = calls[timing_key("lazy", 20, "auto")]
    with warnings.catch_warnings(record=True) as said:  # the first meta-batch is auto's probe
        warnings.simplefilter("always", lazymaml.SequentialFallback)
        auto()
    decision = str(said[0].message) if said else "stays batched"
    return interleaved(calls, args.conv_rounds, device), decision


def memory_probe(path: str, steps: int, device: torch.device) -> float:
    """Peak memory (MiB) of one conv4 outer step above the baseline, after a warm-up step."""
    model, tasks = conv4_setup(4, device)
    call = step(lazymaml.MetaLearner(model, steps, INNER_LR, batched=path == "batched"), tasks)
    call()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    peak = peak_resident_bytes(call)
    if peak is None:
        raise RuntimeError("peak resident memory needs Linux's /proc/self (or a CUDA device)")
    return peak / 2**20


def conv4_memory(args: argparse.Namespace, ks: tuple[int, ...]) -> dict[str, float]:
    """Each (path, K) in a fresh process: earlier peaks and caches do not leak into the figure."""
    out = {}
    for path in ("batched", "sequential"):
        for k in ks:
            command = [sys.executable, __file__, "--device", args.device, "--memory-probe", path, str(k)]
            result = subprocess.run(command, capture_output=True, text=True, env=MEASURING_ENV, check=True)
            out[memory_key(path, k)] = float(result.stdout.strip().splitlines()[-1])
    return out


def table(args: argparse.Namespace, device: torch.device) -> dict:
    """ms per outer step, batched and sequential, for every (estimator, B, K)."""
    rows = {}
    for b in args.batches:
        model, tasks = sinusoid_setup(b, device)
        calls = {}
        for name, options in TABLE_ESTIMATORS.items():
            for k in args.ks:
                for path in ("batched", "sequential"):
                    learner = lazymaml.MetaLearner(model, k, INNER_LR, batched=path == "batched", **options)
                    calls[table_key(name, b, k, path)] = step(learner, tasks)
        rows.update(interleaved(calls, args.table_rounds, device))
    return rows


def print_timing(title: str, timing: dict) -> None:
    print(f"\n{title}")
    width = max(len(n) for n in timing)
    print(f"  {'':<{width}}  {'best ms':>9} {'median ms':>10}")
    for name, t in timing.items():
        print(f"  {name:<{width}}  {t['best_ms']:>9.1f} {t['median_ms']:>10.1f}")


def targets(sinusoid: dict, conv: dict, memory: dict[str, float], ks: tuple[int, ...]) -> list[Ratio]:
    """The performance targets, from best-of times (and peak memory at the smallest and largest
    of ``ks``)."""
    t = {n: v["best_ms"] for n, v in sinusoid["timing"].items()}
    c = {n: v["best_ms"] for n, v in conv.items()}
    rows = []
    for name, k, bound in SINUSOID_TARGETS:
        speedup = t[timing_key(name, k, "sequential")] / t[timing_key(name, k, "batched")]
        rows.append(Ratio(f"sinusoid {name} K={k}: sequential / batched", speedup, bound, False))
    vmap_ratio = t[timing_key("lazy", 20, "batched")] / t[LAZY_VMAP]
    rows.append(Ratio("sinusoid lazy K=20: batched / hand-written vmap", vmap_ratio, 1.3, True))
    if MAML_VMAP in t:
        maml_ratio = t[timing_key("maml", 5, "batched")] / t[MAML_VMAP]
        rows.append(Ratio("sinusoid maml K=5: batched / hand-written vmap", maml_ratio, 1.3, True))
    if MAML_OUTSIDE in t:
        fastest = min(t[MAML_VMAP], t[MAML_OUTSIDE])
        maml_ratio = t[timing_key("maml", 5, "batched")] / fastest
        rows.append(Ratio("sinusoid maml K=5: batched / fastest hand-written layout", maml_ratio, 1.1, True))
    for key, fresh in sinusoid.get("fresh_auto", {}).items():
        ratio = fresh["timing"]["auto"]["best_ms"] / fresh["timing"]["hand-written vmap"]["best_ms"]
        rows.append(Ratio(f"sinusoid {key}, fresh process: auto / hand-written vmap", ratio, 1.3, True))
    for key, own in sinusoid.get("outside_the_computation", {}).items():
        rows.append(Ratio(f"sinusoid {key}: learner's own work, % of a step", 100 * own["share"], 3, True))
    batched, sequential, auto = (c[timing_key("lazy", 20, p)] for p in ("batched", "sequential", "auto"))
    rows.append(Ratio("conv4 lazy K=20 B=4: batched / sequential", batched / sequential, 1, True))
    # after its probe auto runs the path it chose: the same code as one of the two (±10% noise)
    rows.append(
        Ratio("conv4 lazy K=20 B=4: auto / the faster path", auto / min(batched, sequential), 1.1, True)
    )
    if memory:
        flat = memory[memory_key("batched", max(ks))] / memory[memory_key("batched", min(ks))]
        rows.append(Ratio(f"conv4 lazy batched peak memory K={max(ks)} / K={min(ks)}", flat, 1.2, True))
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with the rounds and the table's B and K of a full or a ``--quick`` run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, B ∈ {1, 25}, K ∈ {1, 20}")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--memory-probe", nargs=2, metavar=("PATH", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--fresh-auto", nargs=3, metavar=("ESTIMATOR", "K", "ROUNDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rounds, args.conv_rounds, args.table_rounds = (3, 1, 2) if args.quick else (25, 3, 5)
    args.batches, args.ks = ((1, 25), (1, 20)) if args.quick else ((1, 5, 25), (1, 5, 20))
    return args


def report_sinusoid(args: argparse.Namespace, device: torch.device) -> dict:
    """Section 1, measured and printed."""
    sinusoid = sinusoid_targets(args, device)
    print_timing(
        f"1. sinusoid MLP 1-40-40-1, B=25, α={INNER_LR} (best and median of {args.rounds} rounds)",
        sinusoid["timing"],
    )
    for what, value in sinusoid["relative_differences"].items():
        print(f"  relative difference, {what}: {value:.1e}")
    t = sinusoid["timing"]
    overhead = t[LAZY_MODE]["best_ms"] / t[timing_key("lazy", 20, "batched")]["best_ms"]
    print(f"  BatchStatistics mode switched on (a custom model class): {overhead:.2f}× the time")
    maml = {
        p: t[k]["best_ms"]
        for p, k in (
            ("library", timing_key("maml", 5, "batched")),
            ("outside", MAML_OUTSIDE),
            ("inside", MAML_VMAP),
        )
    }
    print(
        f"  maml K=5, best: library batched {maml['library']:.1f} ms, hand-written outside "
        f"{maml['outside']:.1f} ms, inside {maml['inside']:.1f} ms; library / outside "
        f"{maml['library'] / maml['outside']:.2f}, library / inside {maml['library'] / maml['inside']:.2f}"
    )
    for key, own in sinusoid["outside_the_computation"].items():
        print(
            f"  {key}, inside real steps (medians): step {own['step_ms']:.2f} ms, its computation "
            f"{own['estimate_ms']:.2f} ms, the learner's own work {own['outside_ms']:.3f} ms "
            f"({100 * own['share']:.1f}%)"
        )
    for key, fresh in sinusoid["fresh_auto"].items():
        ft = fresh["timing"]
        print(
            f'  fresh process, {key}, batched="auto": first call {fresh["first_call_ms"]:.0f} ms '
            f"(probe and warm-up), chose {fresh['chose']}; then best {ft['auto']['best_ms']:.1f} ms "
            f"against the hand-written vmap's {ft['hand-written vmap']['best_ms']:.1f} ms"
        )
    return sinusoid


def report_conv4(args: argparse.Namespace, device: torch.device) -> dict:
    """Section 2, measured and printed: the timing, auto's decision and the peak memory."""
    conv, decision = conv4_timing(args, device)
    print_timing(
        f"2. conv4 84×84×3, 5-way 1-shot, 15 queries, B=4 (best and median of {args.conv_rounds} rounds)",
        conv,
    )
    print(f"  auto after its probe: {decision}")
    memory = conv4_memory(args, args.ks)
    print("  peak memory above baseline, MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    return {"timing": conv, "auto": decision, "peak_mib": memory}


def report_table(args: argparse.Namespace, device: torch.device) -> dict:
    """Section 3, measured and printed."""
    rows = table(args, device)
    print(
        f"\n3. sinusoid: ms per outer step, batched (speed-up over sequential), best of {args.table_rounds}"
    )
    print(f"  {'estimator':<16} {'B':>3} " + " ".join(f"{'K=' + str(k):>16}" for k in args.ks))
    for name in TABLE_ESTIMATORS:
        for b in args.batches:
            cells = []
            for k in args.ks:
                batched, sequential = (
                    rows[table_key(name, b, k, p)]["best_ms"] for p in ("batched", "sequential")
                )
                cells.append(f"{batched:>7.1f} ({sequential / batched:>4.1f}×)")
            print(f"  {name:<16} {b:>3} " + " ".join(f"{c:>16}" for c in cells))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    if args.memory_probe:
        print(memory_probe(args.memory_probe[0], int(args.memory_probe[1]), device))
        return 0
    if args.fresh_auto:
        name, steps, rounds = args.fresh_auto
        print(json.dumps(fresh_auto_probe(name, int(steps), int(rounds), device)))
        return 0
    described, load = machine(args.device), os.getloadavg()
    print(f"# device {device}; {described}; float32; 1 thread on CPU; load average at start {load[0]:.2f}")
    sinusoid = report_sinusoid(args, device)
    conv4 = report_conv4(args, device)
    rows = report_table(args, device)
    checked = targets(sinusoid, conv4["timing"], conv4["peak_mib"], args.ks)
    print("\n" + "\n".join(ratio_lines(checked)))
    end_load = os.getloadavg()
    print(f"# load average at end {end_load[0]:.2f} (1 min), {end_load[1]:.2f} (5 min)")
    if args.json:
        record = {
            "machine": described,
            "device": str(device),
            "load_average": {"start": load, "end": end_load},
        }
        record.update(sinusoid=sinusoid, conv4=conv4, table=rows)
        record["targets"] = [dict(zip(("target", "measured", "bound", "ok"), r.row())) for r in checked]
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
