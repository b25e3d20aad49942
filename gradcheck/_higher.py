"""``higher`` 0.2.1, imported quietly and with a differentiable Adam that matches ``torch.optim.Adam``.

Three defects of the PyPI release are handled here or in :mod:`gradcheck.oracle`:

* its modules emit ``SyntaxWarning`` (``is`` with a literal, invalid escape sequences) when
  Python compiles them; only those two messages are silenced, and only while importing it;
* its ``DifferentiableAdam`` adds ε to √v before the bias correction (ε·√(1−β₂ᵗ) in effect) and
  so follows a different trajectory from ``torch.optim.Adam``; :class:`DifferentiableAdam`
  below is a faithful replacement, used directly and never registered globally, so a user's own
  ``higher`` code is left as it was;
* ``copy_initial_weights=True`` (its default) detaches the initial weights: the oracle passes
  ``False``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=r'(invalid escape sequence|"is" with a literal)', category=SyntaxWarning
    )
    import higher
    import higher.optim

from .optim import adam_update


class DifferentiableAdam(higher.optim.DifferentiableOptimizer):
    """``torch.optim.Adam`` (no amsgrad, no weight decay) as a differentiable update: the one
    :func:`gradcheck.optim.adam_update`, applied to higher's fast weights."""

    def _update(self, grouped_grads: list[list[Tensor]], **kwargs: object) -> None:
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                state = self.state[group_idx][p_idx]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                group["params"][p_idx], state["exp_avg"], state["exp_avg_sq"] = adam_update(
                    p,
                    g,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    state["step"],
                    group["lr"],
                    group["betas"],
                    group["eps"],
                )


DIFFERENTIABLE = {
    "sgd": (torch.optim.SGD, higher.optim.DifferentiableSGD),
    "adam": (torch.optim.Adam, DifferentiableAdam),
}

__all__ = ["DIFFERENTIABLE", "DifferentiableAdam", "higher"]
