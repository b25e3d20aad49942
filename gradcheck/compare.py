"""How far a candidate meta-gradient is from a reference, parameter by parameter.

For candidate c and reference r (both computed in float64), per parameter and for all of them
together (the row ``overall``):

    cosine = ⟨c, r⟩ / (‖c‖ ‖r‖)        relative error = ‖c − r‖ / ‖r‖
    |c − r| = ‖c − r‖                  max |c − r| = max over entries

A row passes ``ok(rtol, atol)`` when every entry is finite and ‖c − r‖ ≤ atol + rtol ‖r‖ (the
norm-wise analogue of ``torch.allclose``: small entries of a gradient are not held to a relative
standard of their own). Mismatched keys and shapes are listed, never crashed on, and always fail.

**Rows whose reference is ≈0.** A parameter whose true meta-gradient is 0 — the bias of a
convolution followed by BatchNorm, which the normalisation subtracts out — gets a computed
reference of pure rounding noise (~1e-16), and its relative error is a ratio of two noises
(seen: 5e12 on a passing row). With N entries in all and ε the machine epsilon of the coarser of
the two dtypes, a row of n entries has an ≈0 reference when

    ‖r_row‖ ≤ √ε ‖r‖,

i.e. when leaving the row out changes ‖r‖² by at most ε ‖r‖², and ‖r‖ by at most half a unit in
the last place: the row is invisible in the gradient as a whole at working precision. Such a row
shows "≈0 reference" and its absolute error instead of a relative one, and is held to its share
of the overall tolerance instead of to its own norm,

    ‖c_row − r_row‖ ≤ atol + rtol max(‖r_row‖, ‖r‖ √(n/N)),

‖r‖ √(n/N) being the size the row's reference would have if ‖r‖ were spread evenly over the
entries (the same device as the typical size ‖g‖/√n in :mod:`gradcheck.finite_differences`).
A wrong value on such a row (a conv bias gradient of 2e-4 where the truth is 0) still fails.

**Tolerances.** ``ok()`` and ``assert_close()`` default to the candidate's precision — rtol from
:data:`gradcheck.tolerances.PRECISIONS` for the coarsest floating dtype among the candidate's
tensors (``Report.rtol``), atol 0 — the one policy every checker here follows (docs/verification.md,
"Tolerances").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .tolerances import ATOL, PRECISIONS, default_rtol

__all__ = ["Report", "Row", "compare"]


def _eps(tensors: Iterable[Tensor]) -> float:
    """The machine epsilon of the coarsest floating dtype among ``tensors`` (float64's if none)."""
    return max(
        (torch.finfo(t.dtype).eps for t in tensors if t.is_floating_point()),
        default=torch.finfo(torch.float64).eps,
    )


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
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rel_error(self) -> float:
        if self.reference_norm == 0:
            return 0.0 if self.abs_error == 0 else math.inf
        return self.abs_error / self.reference_norm

    def ok(self, rtol: float, atol: float, scale: float | None = None) -> bool:
        """‖c − r‖ ≤ atol + rtol · scale, finite; ``scale`` defaults to ‖r‖."""
        scale = self.reference_norm if scale is None else scale
        return math.isfinite(self.abs_error) and self.abs_error <= atol + rtol * scale


def _vector(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64).reshape(-1)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


@dataclass(frozen=True)
class Report:
    """Per-parameter comparison of a candidate with a reference; ``str(report)`` is a table.

    ``eps`` is the machine epsilon of the coarser of the two dtypes (it defines ≈0 references);
    ``rtol`` is the candidate's precision (:func:`gradcheck.tolerances.default_rtol`), the
    default of every verdict below; ``rates`` are the keys that are learned inner rates.
    """

    rows: list[Row]
    overall: Row
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    eps: float = torch.finfo(torch.float64).eps
    rtol: float = PRECISIONS[torch.float64]
    rates: tuple[str, ...] = ()

    @property
    def keys_match(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def negligible(self, row: Row) -> bool:
        """Whether ``row``'s reference is ≈0: ‖r_row‖ ≤ √ε ‖r‖ (never for the overall row)."""
        return (
            row is not self.overall
            and row.reference_norm <= math.sqrt(self.eps) * self.overall.reference_norm
        )

    def scale(self, row: Row) -> float:
        """The norm ``rtol`` multiplies for ``row``: ‖r_row‖, or for an ≈0 reference its share of
        the whole, max(‖r_row‖, ‖r‖ √(n/N))."""
        if not self.negligible(row):
            return row.reference_norm
        share = self.overall.reference_norm * math.sqrt(row.numel / max(self.overall.numel, 1))
        return max(row.reference_norm, share)

    def passes(self, row: Row, rtol: float, atol: float) -> bool:
        """``row`` is within ``atol + rtol · scale(row)`` of its reference."""
        return row.ok(rtol, atol, self.scale(row))

    def failing(self, rtol: float | None = None, atol: float = ATOL) -> list[str]:
        """The names of the rows (``overall`` included) that fail (``rtol`` by default ``self.rtol``)."""
        rtol = self.rtol if rtol is None else rtol
        return [r.name for r in (*self.rows, self.overall) if not self.passes(r, rtol, atol)]

    def ok(self, rtol: float | None = None, atol: float = ATOL) -> bool:
        """Keys and shapes match and every row passes; by default at the candidate's precision
        (``self.rtol``) and atol 0."""
        return self.keys_match and not self.failing(rtol, atol)

    def table(self, rtol: float | None = None, atol: float | None = None) -> str:
        """The aligned table; with tolerances, failing rows are marked."""
        width = max([len("parameter"), len(self.overall.name)] + [len(r.name) for r in self.rows])
        head = (
            f"{'parameter':<{width}}  {'shape':<14} {'cosine':>10} {'rel.err':>12} {'|c-r|':>9} "
            f"{'max|c-r|':>9} {'|c|':>10} {'|r|':>10}"
        )
        lines = [head, "-" * len(head)]
        for r in (*self.rows, self.overall):
            mark = "" if rtol is None or self.passes(r, rtol, atol or 0.0) else "  FAIL"
            if r is self.overall:
                lines.append("-" * len(head))
            cosine, rel = (
                ("—", "≈0 reference") if self.negligible(r) else (f"{r.cosine:.7f}", f"{r.rel_error:.2e}")
            )
            lines.append(
                f"{r.name:<{width}}  {_fmt_shape(r.shape):<14} {cosine:>10} {rel:>12} {r.abs_error:>9.2e} "
                f"{r.max_abs_error:>9.2e} {r.candidate_norm:>10.3e} {r.reference_norm:>10.3e}{mark}"
            )
        if any(self.negligible(r) for r in self.rows):
            threshold = math.sqrt(self.eps) * self.overall.reference_norm
            lines.append(
                f"≈0 reference: |r| ≤ √ε·|r overall| = {threshold:.1e} (ε = {self.eps:.1e}), a ratio of "
                "rounding noises;\n  judged by |c-r| ≤ atol + rtol·|r overall|·√(n/N) instead"
            )
        missing = [k for k in self.missing if k not in self.rates]
        if missing:
            lines.append(f"missing from candidate: {', '.join(missing)}")
        rates = [k for k in self.missing if k in self.rates]
        if rates:
            several = len(rates) > 1
            lines.append(
                f"missing from candidate: the meta-gradient of the learned inner rate{'s' * several} "
                f"{', '.join(rates)} — return it under {'these keys' if several else 'this key'} "
                "(or return None and leave it in the rate's .grad)"
            )
        if self.unexpected:
            lines.append(f"not in reference: {', '.join(self.unexpected)}")
        for name, c_shape, r_shape in self.mismatched:
            lines.append(
                f"shape mismatch: {name} candidate {_fmt_shape(c_shape)} vs reference {_fmt_shape(r_shape)}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def assert_close(self, rtol: float | None = None, atol: float = ATOL) -> None:
        """Raise an AssertionError carrying the table unless ``ok(rtol, atol)`` (same defaults)."""
        rtol = self.rtol if rtol is None else rtol
        if not self.ok(rtol, atol):
            failing = self.failing(rtol, atol)
            why = f"failing: {', '.join(failing)}" if failing else "keys or shapes differ"
            raise AssertionError(
                f"meta-gradients differ (rtol={rtol:g}, atol={atol:g}; {why})\n{self.table(rtol, atol)}"
            )


def compare(
    candidate: Mapping[str, Tensor], reference: Mapping[str, Tensor], *, rates: Iterable[str] = ()
) -> Report:
    """Compare two ``{name: tensor}`` meta-gradients (e.g. a candidate with the oracle's).

    ``rates`` names the reference's keys that are meta-gradients of learned inner rates
    (:mod:`gradcheck.rates`): they are compared like parameters, and one the candidate lacks is
    reported as such."""
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
        eps=_eps([*candidate.values(), *reference.values()]),
        rtol=default_rtol(candidate),
        rates=tuple(k for k in rates if k in reference),
    )
