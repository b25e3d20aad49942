"""What the meta-training benchmarks (``few_shot.py``, ``sinusoid.py``) share: the 95% interval
over seeds, the tasks' fingerprint, the worker pool with its progress bar, the command line's
common tail (``--quick`` defaults, ``--methods`` globs, ``--workers``, ``--out``) and the results
files (strict JSON and a plot).

Imported by path (``benchmarks/`` is not a package): each script puts its own folder first on
``sys.path``, so the spawned workers find this module too.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import math
import queue
import statistics
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

# two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond: the normal's)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval over seeds: mean ± t₀.₉₇₅(n−1)·s/√n
    (nan for one value; +∞, nan where a value is +∞: a diverged seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2 or not math.isfinite(mean):
        return mean, math.nan
    return mean, T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


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
    """``value`` with every non-finite float as None (strict JSON)."""
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
