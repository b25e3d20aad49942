"""``python -m lazymaml report``: every estimator against the exact oracle (see :mod:`lazymaml.report`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import report

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] != ["report"]:
        print("usage: python -m lazymaml report [--help | options]", file=sys.stderr)
        return 2
    return report.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
