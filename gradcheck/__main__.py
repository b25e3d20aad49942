"""``python -m gradcheck``: verify the oracle against finite differences.

Runs the exact 5-step MAML meta-gradient of a tanh MLP on a sinusoid task (float64), compares it
with coordinate-wise central differences of the meta-objective, and shows first-order MAML beside
it for scale; exit status 0 when the oracle agrees with finite differences. (Every estimator of
:mod:`lazymaml` against the oracle: ``python -m lazymaml report``.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from torch import nn

from . import finite_differences, oracle, problems
from .compare import compare
from .tolerances import COORDINATEWISE

__all__ = ["main", "selftest"]

RTOL, ATOL = COORDINATEWISE  # central differences with h = 1e-6: good to ~1e-10 here


def selftest(seed: int = 0, steps: int = 5, inner_lr: float = 0.1) -> bool:
    torch.manual_seed(seed)
    model = problems.mlp((16, 16), nn.Tanh).double()
    task = problems.sinusoid(torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = oracle.meta_gradient(model, task, steps, inner_lr)
    numerical = finite_differences.meta_gradient(model, task, steps, inner_lr)
    first_order = oracle.meta_gradient(model, task, steps, inner_lr, first_order=True)
    report = compare(exact, numerical)
    print(f"oracle (exact {steps}-step MAML, α={inner_lr}) vs central finite differences, float64:")
    print(report.table(RTOL, ATOL))
    print("\nfirst-order MAML vs the oracle (expected to differ: it drops the Hessian terms):")
    print(compare(first_order, exact))
    ok = report.ok(RTOL, ATOL)
    print(
        f"\noracle {'agrees with' if ok else 'DISAGREES with'} finite differences "
        f"(rtol={RTOL:g}, atol={ATOL:g})"
    )
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return 0 if selftest(args.seed) else 1


if __name__ == "__main__":
    sys.exit(main())
