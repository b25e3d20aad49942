"""Mutation testing: does the suite catch the mistakes a careless edit would make?

    python tools/mutants.py                 # every mutant; exit 1 unless all are killed
    python tools/mutants.py --only lazy eta # mutants whose id contains "lazy" or "eta"
    python tools/mutants.py --list          # the list, without running anything

Each mutant (``tools/mutant_list.py``) replaces one snippet, which must occur exactly once, in one
source file. The repository's tracked files are copied to a scratch directory once; for each
mutant the copy is edited, the tests that mirror the mutated module run first (fast), and if they
all pass the whole suite runs (``tests/``, not the notebooks); the mutant is *killed* if any test
fails. Mutants marked equivalent (no behaviour can tell them apart) are listed, not run, and not
counted. Prints the kill rate and every survivor; exit status 0 only when every mutant is killed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mutant_list import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[1]


def _copy_repository(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(
        b"\0"
    )
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            destination = target / name.decode()
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)


def _pytest(copy: Path, paths: list[str], workers: int) -> bool:
    """True if every test passes (the mutant survives)."""
    env = {**os.environ, "PYTHONPATH": str(copy)}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly"]
    if workers > 1:
        command += ["-n", str(workers)]
    result = subprocess.run(
        [*command, *paths], cwd=copy, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode not in (0, 1):  # 2+: interrupted, usage or collection error: also a kill
        return False
    return result.returncode == 0


def _check_isolation(copy: Path) -> None:
    """The copy's packages, not an installed or editable one, must be what the tests import."""
    env = {**os.environ, "PYTHONPATH": str(copy)}
    found = subprocess.run(
        [sys.executable, "-c", "import gradcheck, lazymaml; print(gradcheck.__file__, lazymaml.__file__)"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not all(Path(f).resolve().is_relative_to(copy.resolve()) for f in found):
        raise SystemExit(f"the tests would import {found}, not the scratch copy {copy}")


def _apply(copy: Path, mutant: Mutant) -> str:
    path = copy / mutant.path
    original = path.read_text()
    count = original.count(mutant.find)
    if count != 1:
        raise SystemExit(f"mutant {mutant.id}: the snippet occurs {count} times in {mutant.path}")
    path.write_text(original.replace(mutant.find, mutant.replace))
    return original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="run the mutants whose id contains any of these")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers for the full suite")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only is None or any(part in m.id for part in args.only)]
    live = [m for m in chosen if not m.equivalent]
    if args.list:
        for m in chosen:
            print(f"{m.id:<34} {m.path:<32} {'EQUIVALENT: ' + m.equivalent if m.equivalent else m.why}")
        return 0
    survivors = []
    with tempfile.TemporaryDirectory(prefix="mutants-") as scratch:
        copy = Path(scratch)
        _copy_repository(copy)
        _check_isolation(copy)
        for i, mutant in enumerate(live, 1):
            start = time.perf_counter()
            original = _apply(copy, mutant)
            try:
                survived = _pytest(copy, list(mutant.tests), 1) and _pytest(copy, ["tests"], args.workers)
            finally:
                (copy / mutant.path).write_text(original)
            verdict = "SURVIVED" if survived else "killed"
            print(f"[{i:>2}/{len(live)}] {verdict:<8} {mutant.id:<34} {time.perf_counter() - start:5.1f} s")
            if survived:
                survivors.append(mutant)
    killed = len(live) - len(survivors)
    print(f"\n{killed}/{len(live)} mutants killed ({100 * killed / max(len(live), 1):.0f}%)")
    equivalent = [m for m in chosen if m.equivalent]
    if equivalent:
        print(f"{len(equivalent)} equivalent, not counted:")
        for m in equivalent:
            print(f"  {m.id}: {m.equivalent}")
    for m in survivors:
        print(f"SURVIVOR {m.id} ({m.path}): {m.why}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
