"""One tolerance policy: how closely a *correct* implementation reproduces the meta-gradient.

A tolerance depends on the candidate's precision, not on which checker reads it, so there is one
table, :data:`PRECISIONS`, keyed by the coarsest floating dtype among the candidate's tensors,
and every checker takes its default from it: :meth:`gradcheck.Report.ok` and
:meth:`~gradcheck.Report.assert_close`, :func:`gradcheck.validate`, :func:`gradcheck.diagnose`
and the directional finite-difference check (:func:`gradcheck.finite_differences.check`). The
derivation, with measurements, is in docs/verification.md ("Tolerances"); in short:

=================  =======  ================================================================
dtype              rtol     why
=================  =======  ================================================================
float64            1e-9     two float64 implementations of one meta-gradient differ only in
                            the order of their operations: ~1e-16 per operation, amplified by
                            the inner loop to at most ~1e-12 (measured on the test models).
                            Three orders of headroom; the smallest mistake the tests keep, α
                            held as a float32 tensor, is a relative 4e-8 and fails.
float32            1e-3     ε₃₂ = 1.2e-7 amplified by the inner loop: correct float32
                            implementations agree with the float64 oracle to ~1e-5.
float16, bfloat16  5e-2     ε = 9.8e-4 and 7.8e-3: a 16-bit implementation cannot be held
                            tighter than a few per cent.
=================  =======  ================================================================

A floating dtype not in the table (the float8 types) gets the coarsest entry, :data:`COARSEST`.

**atol is 0** (:data:`ATOL`) in every default verdict: the gradients of O(1) problems have no
natural absolute scale, and :class:`gradcheck.Report` handles the rows whose reference is ≈0,
where a relative test is meaningless, by holding them to their share of the overall tolerance.

**A reference with an error of its own** has that error bounded separately and *added*, never
folded into rtol. The directional check adds its derived error bound E to ``rtol`` times the
typical size of ⟨g, u⟩, with rtol from this same table: E alone covers a correct float64
gradient on every test model (measured: |⟨g, u⟩ − D(s)| ≤ E/3 at rtol = 0, on smooth and ReLU
nets, 2,690 and 101,508 parameters), so the table's float64 entry needs no separate column for
finite differences. The coordinate-wise finite-difference gradient states no error bound of its
own; it is compared at :data:`COORDINATEWISE`, derived there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["ATOL", "COARSEST", "COORDINATEWISE", "PRECISIONS", "default_rtol"]

PRECISIONS: Mapping[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-3,
    torch.float16: 5e-2,
    torch.bfloat16: 5e-2,
}
"""The relative tolerance by the candidate's dtype (the module's table)."""

COARSEST = max(PRECISIONS.values())
"""The rtol of a floating dtype that :data:`PRECISIONS` does not list."""

ATOL = 0.0
"""The absolute tolerance of every default verdict."""

COORDINATEWISE = (1e-6, 1e-9)
"""(rtol, atol) against :func:`gradcheck.finite_differences.meta_gradient`: with step h = 1e-6 in
float64 its error is about ε|F|/h + h²|F‴|/6 ≈ 1e-10 on O(1) objectives — four orders below
1e-6, while any wrong meta-gradient the tests keep is off by far more."""


def default_rtol(gradient: Mapping[str, Tensor] | Iterable[Tensor]) -> float:
    """The rtol :data:`PRECISIONS` gives the coarsest floating dtype among ``gradient``'s tensors
    (a mapping's values, or the tensors themselves); float64's when none is floating."""
    tensors = gradient.values() if isinstance(gradient, Mapping) else gradient
    return max(
        (PRECISIONS.get(t.dtype, COARSEST) for t in tensors if t.is_floating_point()),
        default=PRECISIONS[torch.float64],
    )
