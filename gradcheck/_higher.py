"""``higher`` 0.2.1, imported quietly, with differentiable SGD, Adam and AdamW that match ``torch.optim``.

Three defects of the PyPI release are handled here or in :mod:`gradcheck.oracle`:

* its modules emit ``SyntaxWarning`` (``is`` with a literal, invalid escape sequences) when
  Python compiles them; only those two messages are silenced, and only while importing it;
* its ``DifferentiableAdam`` adds ε to √v before the bias correction (in torch's form, an ε of
  ε/√(1−β₂ᵗ)) and
  so follows a different trajectory from ``torch.optim.Adam``; :class:`DifferentiableAdam`
  below is a faithful replacement (also of ``AdamW``, which higher lacks), used directly and never
  registered globally, so a user's own ``higher`` code is left as it was; :class:`DifferentiableSgd`
  replaces higher's SGD so that both optimizers' steps are the pure ones of :mod:`gradcheck.optim`,
  written once;
* ``copy_initial_weights=True`` (its default) detaches the initial weights: the oracle passes
  ``False``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=r'(invalid escape sequence|"is" with a literal)', category=SyntaxWarning
    )
    import higher
    import higher.optim

from .optim import SGD, Adam, AdamW, adam_update, sgd_update


class DifferentiableSgd(higher.optim.DifferentiableOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay) as a differentiable
    update: the one :func:`gradcheck.optim.sgd_update`, applied to higher's fast weights with the
    hyper-parameters of the optimizer's ``param_groups``."""

    def _update(self, grouped_grads: list[list[Tensor]], **kwargs: object) -> None:
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                state = self.state[group_idx][p_idx]
                group["params"][p_idx], buf = sgd_update(
                    p,
                    g,
                    state.get("momentum_buffer"),
                    group["lr"],
                    group["momentum"],
                    group["dampening"],
                    group["nesterov"],
                    group["weight_decay"],
                )
                if buf is not None:
                    state["momentum_buffer"] = buf


class DifferentiableAdam(higher.optim.DifferentiableOptimizer):
    """``torch.optim.Adam`` and ``AdamW`` (no amsgrad; weight decay coupled, or decoupled where
    the group's ``decoupled_weight_decay`` says so, as AdamW's does) as a differentiable update:
    the one :func:`gradcheck.optim.adam_update`, applied to higher's fast weights."""

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
                    group["weight_decay"],
                    bool(group.get("decoupled_weight_decay", False)),
                )


DIFFERENTIABLE: dict[
    str | type, tuple[Callable[..., torch.optim.Optimizer], type[higher.optim.DifferentiableOptimizer]]
] = {
    "sgd": (torch.optim.SGD, DifferentiableSgd),
    "adam": (torch.optim.Adam, DifferentiableAdam),
    SGD: (torch.optim.SGD, DifferentiableSgd),
    Adam: (torch.optim.Adam, DifferentiableAdam),
    AdamW: (torch.optim.AdamW, DifferentiableAdam),
}
"""What the oracle differentiates exactly: the names, and the spec classes of :mod:`gradcheck.optim`
with every option (:meth:`gradcheck.settings.InnerLoop.require`) -> (the ``torch.optim`` class,
its differentiable update)."""

__all__ = ["DIFFERENTIABLE", "DifferentiableAdam", "DifferentiableSgd", "higher"]
