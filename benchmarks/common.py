"""What the benchmarks share.

Every benchmark: the resident-memory probe (``peak_resident_bytes``) and the environment of its
fresh measuring processes (``MEASURING_ENV``), the ratio-against-target rows (``Ratio``), and the
plain-text tables (``text_table``). The meta-training benchmarks (``few_shot.py``,
``sinusoid.py``): the 95% interval over seeds, the tasks' fingerprint, one timed outer step with
its divergence (``outer_step``, ``Divergence``), the worker pool with its progress bar, the
command line's common tail (``--quick`` defaults, ``--methods`` globs, ``--workers``, ``--out``)
and the results files (strict JSON and a plot).

Imported by path (``benchmarks/`` is not a package): each script puts its own folder first on
``sys.path``, so the spawned workers find this module too.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fnmatch
import hashlib
import json
import math
import os
import queue
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Method:
    """One benchmarked configuration: ``lazymaml.MetaLearner(model, steps, α, estimator=…,
    jacobian_step=…)`` (``jacobian_step`` is Lazy's alone); a benchmark's own settings extend it."""

    label: str
    family: str  # a line (or a marker) in the plots
    estimator: str
    steps: int
    jacobian_step: str = "single"

    def options(self) -> dict[str, Any]:
        """The MetaLearner (and estimator) options this method fixes."""
        return {"jacobian_step": self.jacobian_step} if self.estimator == "lazy" else {}


# two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond: the normal's)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval over seeds: mean ± t₀.₉₇₅(n−1)·s/√n
    (nan for one value; +∞, nan where a value is +∞: a diverged seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2 or not math.isfinite(mean):
        return mean, math.nan
    return mean, T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


# glibc keeps freed blocks below a dynamic mmap threshold in its heap, which would hide a warm-up's
# memory from the baseline; a fixed threshold returns large blocks to the system. For the fresh
# processes that measure peak memory (set before they start: glibc reads it once).
MEASURING_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def machine(device: str) -> str:
    """The processor, its CPU count and torch's version (and the GPU's name on CUDA)."""
    import platform

    import torch

    described = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    if device.startswith("cuda"):
        described += f", {torch.cuda.get_device_name(device)}"
    return described


def resident_bytes(field: str) -> int | None:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process in bytes, from
    /proc/self/status; None where that file does not exist (not Linux)."""
    try:
        with open("/proc/self/status") as status:
            lines = [line for line in status if line.startswith(field + ":")]
    except OSError:
        return None
    if not lines:
        raise KeyError(f"{field} not in /proc/self/status")
    return int(lines[0].split()[1]) * 1024  # the kernel reports kB


def peak_resident_bytes(call: Callable[[], object]) -> int | None:
    """The peak resident set during ``call()`` above the resident set before it, in bytes (Linux:
    freed heap given back first, then the high-water mark VmHWM reset to VmRSS); None elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)  # glibc: give freed heap back, so the baseline is live memory
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak resident set size (VmHWM) to the current one
    except OSError:
        call()
        return None
    base = resident_bytes("VmRSS")
    call()
    peak = resident_bytes("VmHWM")
    return None if base is None or peak is None else peak - base


@dataclass(frozen=True)
class Ratio:
    """One measured ratio against its target: ``value ≤ bound`` (``at_most``) or ``value ≥ bound``."""

    label: str
    value: float
    bound: float
    at_most: bool

    @property
    def target(self) -> str:
        return f"{'≤' if self.at_most else '≥'} {self.bound:g}"

    @property
    def met(self) -> bool:
        return self.value <= self.bound if self.at_most else self.value >= self.bound

    def row(self) -> tuple[str, float, str, bool]:
        """(label, value, target, met): a row of the printed table and of the results file."""
        return self.label, self.value, self.target, self.met


def ratio_lines(ratios: Iterable[Ratio], title: str = "target") -> list[str]:
    """The ratio table: label, measured value, target and whether it is met."""
    lines = [f"{title:<52} {'measured':>9}  {'target':<7} ok"]
    for r in ratios:
        lines.append(f"{r.label:<52} {r.value:>9.2f}  {r.target:<7} {'yes' if r.met else 'NO'}")
    return lines


def text_table(
    header: tuple[str, ...], widths: tuple[int, ...], rows: Iterable[tuple[tuple[str, ...], str]]
) -> str:
    """A fixed-width table: ``rows`` are (cells, a note after the last cell); a negative width is
    a left-aligned column."""

    def line(cells: tuple[str, ...]) -> str:
        return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, w in zip(cells, widths))

    return "\n".join([line(header), *(line(cells) + note for cells, note in rows)])


def cell(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``; "—" where it is unknown (None or not finite)."""
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


@dataclass(frozen=True)
class Divergence:
    """Where a run stopped: the outer step (from 1) whose meta-gradient failed, and the error."""

    step: int
    error: str

    def __str__(self) -> str:
        return f"outer step {self.step}: {self.error}"

    @classmethod
    def from_json(cls, value: str | Mapping[str, Any] | None) -> Divergence | None:
        """The record as written (``{"step": …, "error": …}``), or as results files written before
        the step was stored as a number spelt it (``"outer step N: error"``)."""
        if value is None:
            return None
        if isinstance(value, str):
            match = re.fullmatch(r"outer step (\d+): (.*)", value, re.DOTALL)
            if match is None:
                raise ValueError(f"not a divergence: {value!r}")
            return cls(int(match[1]), match[2])
        return cls(int(value["step"]), str(value["error"]))


def outer_step(meta: Any, outer: Any, tasks: Any) -> tuple[float, float, list[warnings.WarningMessage]]:
    """One meta-update (zero the gradients, ``meta.meta_backward(tasks)``, ``outer.step()``):
    the mean query loss, the seconds it took and the warnings it raised. Raises what the
    meta-gradient raises when it fails (FloatingPointError, ValueError)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        outer.zero_grad()
        loss = float(meta.meta_backward(tasks))
        outer.step()
        seconds = time.perf_counter() - start
    return loss, seconds, caught


def median_known(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None; None if there are none."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def fingerprint(tasks: Iterable[Any], digest: Any = None) -> Any:
    """A blake2b digest of the tasks' support and query tensors (updated in place when given):
    equal for equal tasks. A ``TaskBatch`` is one item."""
    digest = digest or hashlib.blake2b(digest_size=16)
    for task in tasks:
        for t in (*task.support, *task.query):
            digest.update(t.numpy().tobytes())
    return digest


def pool_map(
    pool: ProcessPoolExecutor,
    job: Callable[..., dict],
    jobs: list[tuple],
    args: argparse.Namespace,
    bar: Any,
    progress: Any,
    cost: Callable[[tuple], float] | None = None,
) -> list[dict]:
    """``job(*j, args, progress)`` for every j on the worker processes, the costliest first when
    ``cost`` is given (the workers then finish together), updating ``bar`` with the outer steps
    the workers report on ``progress``; the results in the order of ``jobs``."""
    order = sorted(range(len(jobs)), key=lambda i: -cost(jobs[i])) if cost else range(len(jobs))
    futures = {i: pool.submit(job, *jobs[i], args, progress) for i in order}
    while not all(f.done() for f in futures.values()):
        with contextlib.suppress(queue.Empty):
            bar.update(progress.get(timeout=0.2))
    return [futures[i].result() for i in range(len(jobs))]


def add_common_arguments(parser: argparse.ArgumentParser, quick: Mapping[str, Any]) -> None:
    """``--quick`` (a smoke test with the settings ``quick``), ``--workers`` and ``--out``."""
    help_quick = f"smoke test, the same code path with {dict(quick)}"
    parser.add_argument("--quick", action="store_true", help=help_quick)
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")


def parse(
    parser: argparse.ArgumentParser, argv: list[str] | None, quick: Mapping[str, Any], methods: Iterable[str]
) -> argparse.Namespace:
    """The arguments, with ``quick``'s defaults under ``--quick`` and ``args.keys``: the method keys
    that match a ``--methods`` glob, in ``methods``' order (a glob matching none is an error)."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    methods = list(methods)
    unknown = [p for p in args.methods if not any(fnmatch.fnmatchcase(k, p) for k in methods)]
    if unknown:
        parser.error(f"--methods {unknown} match none of: {' '.join(methods)}")
    args.keys = [k for k in methods if any(fnmatch.fnmatchcase(k, p) for p in args.methods)]
    return args


def plain(value: Any) -> Any:
    """``value`` with every non-finite float as None (strict JSON); a result record as its
    ``to_json()``, another dataclass as its fields."""
    if hasattr(value, "to_json"):
        return plain(value.to_json())
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def write_results(
    args: argparse.Namespace,
    name: str,
    methods: Mapping[str, Any],
    settings: Mapping[str, Any],
    record: Mapping[str, Any],
    plot: Callable[[Path], None],
) -> Path:
    """``NAME[-quick].json`` under ``--out``: the settings (every argument but ``--out``, the chosen
    methods' definitions, then ``settings``) followed by ``record``, non-finite numbers as null;
    and ``NAME[-quick].png`` drawn by ``plot``. Returns the path without its suffix."""
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (f"{name}-quick" if args.quick else name)
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
    arguments.update(methods={k: asdict(methods[k]) for k in args.keys}, **settings)
    text = json.dumps(plain({"settings": arguments, **record}), indent=1, allow_nan=False)
    stem.with_suffix(".json").write_text(text)
    plot(stem.with_suffix(".png"))
    print(f"wrote {stem}.json and {stem}.png in {record['wall_seconds']:.0f} s")
    return stem
