"""Batch and instance normalisation without running-statistic updates, for a vmapped computation.

In train mode a normalisation layer normalises by the statistics of its input and updates its
running statistics in place; under ``torch.func.vmap`` over tasks the update is refused (the
running statistics are one unbatched tensor for all tasks). The update never changes a loss —
train mode never reads the running statistics, eval mode never writes them — so
:class:`BatchStatistics`, a ``TorchFunctionMode``, drops them from every call that normalises by
the input's statistics:

    F.batch_norm(x, μ_run, σ²_run, w, b, training=True, …)  →  F.batch_norm(x, None, None, w, b, True, …)
    F.instance_norm(x, μ_run, σ²_run, …, use_input_stats=True, …)  →  the same with None, None

and likewise ``torch.batch_norm``/``torch.instance_norm``; every other call, and every call that
normalises by the running statistics (eval mode), runs unchanged — the same kernels as the
sequential path. The mode also sees ``F.batch_norm`` called directly by a hand-written forward.
It costs some Python per torch call while active (measured by ``benchmarks/throughput.py``).

Only ``torch.func`` differentiates through the result (ordinary autograd through a vmapped
``torch.func.grad`` is wrong for batch and instance norm on torch 2.13; see
tests/lazymaml/test_batched.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["BatchStatistics"]

# function -> (its parameter names in order, the flag meaning "normalise by the input", its default)
_NORMALISATIONS: dict[Callable[..., Any], tuple[tuple[str, ...], str, bool]] = {
    F.batch_norm: (
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        "training",
        False,
    ),
    F.instance_norm: (
        ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"),
        "use_input_stats",
        True,
    ),
    torch.batch_norm: (
        (
            "input",
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "training",
            "momentum",
            "eps",
            "cudnn_enabled",
        ),
        "training",
        False,
    ),
    torch.instance_norm: (
        (
            "input",
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "use_input_stats",
            "momentum",
            "eps",
            "cudnn_enabled",
        ),
        "use_input_stats",
        True,
    ),
}


class BatchStatistics(TorchFunctionMode):
    """While active, normalisation by the input's statistics neither reads nor updates running ones."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func not in _NORMALISATIONS:
            return func(*args, **kwargs)
        names, flag, default = _NORMALISATIONS[func]
        arguments = {**dict(zip(names, args)), **kwargs}
        if arguments.get(flag, default):
            arguments["running_mean"] = arguments["running_var"] = None
        return func(**arguments)
