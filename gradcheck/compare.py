"""How far a candidate meta-gradient is from a reference, parameter by parameter.

For candidate c and reference r (both computed in float64):

    cosine = ⟨c, r⟩ / (‖c‖ ‖r‖)        relative error = ‖c − r‖ / ‖r‖
    max abs error = max |c − r|

A parameter passes ``ok(rtol, atol)`` when ‖c − r‖ ≤ atol + rtol ‖r‖ (the norm-wise analogue of
``torch.allclose``: small entries of a gradient are not held to a relative standard of their
own) and every entry is finite. Mismatched keys and shapes are listed, never crashed on, and
always fail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Report", "Row", "compare"]


@dataclass(frozen=True)
class Row:
    """The comparison of one parameter (or of all of them together: ``name="overall"``)."""

    name: str
    shape: tuple[int, ...]
    cosine: float
    abs_error: float
    max_abs_error: float
    candidate_norm: float
    reference_norm: float

    @classmethod
    def of(cls, name: str, candidate: Tensor, reference: Tensor) -> Row:
        c, r = _vector(candidate), _vector(reference)
        cn, rn = c.norm().item(), r.norm().item()
        diff = c - r
        # the cosine of a zero vector is taken as 1 with another zero vector, 0 otherwise
        cosine = torch.dot(c, r).item() / (cn * rn) if cn and rn else float(cn == rn)
        max_abs = diff.abs().max().item() if diff.numel() else 0.0
        return cls(name, tuple(candidate.shape), cosine, diff.norm().item(), max_abs, cn, rn)

    @property
    def rel_error(self) -> float:
        if self.reference_norm == 0:
            return 0.0 if self.abs_error == 0 else math.inf
        return self.abs_error / self.reference_norm

    def ok(self, rtol: float, atol: float) -> bool:
        return math.isfinite(self.abs_error) and self.abs_error <= atol + rtol * self.reference_norm


def _vector(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64).reshape(-1)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


@dataclass(frozen=True)
class Report:
    """Per-parameter comparison of a candidate with a reference; ``str(report)`` is a table."""

    rows: list[Row]
    overall: Row
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def keys_match(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def ok(self, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        return self.keys_match and all(r.ok(rtol, atol) for r in (*self.rows, self.overall))

    def table(self, rtol: float | None = None, atol: float | None = None) -> str:
        """The aligned table; with tolerances, failing rows are marked."""
        width = max([len("parameter"), len(self.overall.name)] + [len(r.name) for r in self.rows])
        head = (
            f"{'parameter':<{width}}  {'shape':<14} {'cosine':>10} {'rel.err':>9} "
            f"{'max|c-r|':>9} {'|c|':>10} {'|r|':>10}"
        )
        lines = [head, "-" * len(head)]
        for r in (*self.rows, self.overall):
            mark = "" if rtol is None or r.ok(rtol, atol or 0.0) else "  FAIL"
            if r is self.overall:
                lines.append("-" * len(head))
            lines.append(
                f"{r.name:<{width}}  {_fmt_shape(r.shape):<14} {r.cosine:>10.7f} {r.rel_error:>9.2e} "
                f"{r.max_abs_error:>9.2e} {r.candidate_norm:>10.3e} {r.reference_norm:>10.3e}{mark}"
            )
        if self.missing:
            lines.append(f"missing from candidate: {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"not in reference: {', '.join(self.unexpected)}")
        for name, c_shape, r_shape in self.mismatched:
            lines.append(
                f"shape mismatch: {name} candidate {_fmt_shape(c_shape)} vs reference {_fmt_shape(r_shape)}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def assert_close(self, rtol: float = 1e-5, atol: float = 1e-8) -> None:
        """Raise an AssertionError carrying the table unless ``ok(rtol, atol)``."""
        if not self.ok(rtol, atol):
            failing = [r.name for r in (*self.rows, self.overall) if not r.ok(rtol, atol)]
            why = f"failing: {', '.join(failing)}" if failing else "keys or shapes differ"
            raise AssertionError(
                f"meta-gradients differ (rtol={rtol:g}, atol={atol:g}; {why})\n{self.table(rtol, atol)}"
            )


def compare(candidate: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> Report:
    """Compare two ``{name: tensor}`` meta-gradients (e.g. a candidate with the oracle's)."""
    for which, grads in (("candidate", candidate), ("reference", reference)):
        if not isinstance(grads, Mapping):
            raise TypeError(f"{which} must be a mapping name -> tensor, got {type(grads).__name__}")
        bad = [k for k, v in grads.items() if not isinstance(v, Tensor)]
        if bad:
            raise TypeError(f"{which} values must be tensors; not for {bad}")
    shared = [k for k in reference if k in candidate]
    mismatched = [
        (k, tuple(candidate[k].shape), tuple(reference[k].shape))
        for k in shared
        if candidate[k].shape != reference[k].shape
    ]
    same = [k for k in shared if candidate[k].shape == reference[k].shape]
    rows = [Row.of(k, candidate[k], reference[k]) for k in same]
    overall = Row.of(
        "overall",
        torch.cat([_vector(candidate[k]) for k in same] or [torch.zeros(0)]),
        torch.cat([_vector(reference[k]) for k in same] or [torch.zeros(0)]),
    )
    return Report(
        rows,
        overall,
        missing=[k for k in reference if k not in candidate],
        unexpected=[k for k in candidate if k not in reference],
        mismatched=mismatched,
    )
