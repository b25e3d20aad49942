"""Batch and instance normalisation from primitives, for a computation batched over tasks.

Inside ``torch.func.vmap`` over tasks the native kernels misbehave: with running statistics in
train mode vmap refuses the in-place update of unbatched buffers, and ordinary autograd through
vmapped ``torch.func.grad`` returns wrong gradients (measured on torch 2.13: 4.3% relative with
``BatchNorm2d(track_running_stats=False)``, 6.5% with ``InstanceNorm2d``). :class:`PrimitiveNorms`
is a ``TorchFunctionMode`` that, while active, computes them from primitives instead:

    y = (x − μ) / √(σ² + ε) · w + b

with μ, σ² (biased) the statistics of ``x`` over every dimension but the channel one (batch
norm) or over the spatial dimensions (instance norm) when normalising by the batch — train mode,
or no running statistics — and the running statistics otherwise. Running statistics are not
updated: in train mode the output normalises by the batch and never reads them, in eval mode
they are read and never written, so no loss depends on the update. The mode sees every call of
``F.batch_norm``/``F.instance_norm`` (also from hand-written forwards) and ``torch.batch_norm``/
``torch.instance_norm``; other calls pass through, at some Python cost per torch call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["PrimitiveNorms", "batch_norm", "instance_norm"]


def _normalise(
    x: Tensor,
    dims: list[int],
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    by_batch: bool,
    eps: float,
) -> Tensor:
    """(x − μ)/√(σ² + ε)·w + b, statistics over ``dims`` if ``by_batch`` else the running ones."""
    channel = [1, -1] + [1] * (x.ndim - 2)
    if by_batch:
        if all(x.shape[d] == 1 for d in dims):
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.shape}"
            )
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, correction=0, keepdim=True)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("normalising by running statistics needs running_mean and running_var")
        mean, var = running_mean.view(channel), running_var.view(channel)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.view(channel)
    if bias is not None:
        y = y + bias.view(channel)
    return y


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.batch_norm``'s output (statistics over all dimensions but 1), without updating statistics."""
    by_batch = training or running_mean is None
    dims = [0, *range(2, input.ndim)]
    return _normalise(input, dims, running_mean, running_var, weight, bias, by_batch, eps)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.instance_norm``'s output (statistics over the spatial dimensions), without updates."""
    dims = list(range(2, input.ndim))
    if use_input_stats or running_mean is None:
        return _normalise(input, dims, None, None, weight, bias, True, eps)
    # running statistics are per channel: the same affine map for every instance
    return _normalise(input, dims, running_mean, running_var, weight, bias, False, eps)


def _torch_batch_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    cudnn_enabled: bool = True,
) -> Tensor:
    return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _torch_instance_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
    cudnn_enabled: bool = True,
) -> Tensor:
    return instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


_REPLACED: dict[Callable[..., Any], Callable[..., Tensor]] = {
    F.batch_norm: batch_norm,
    F.instance_norm: instance_norm,
    torch.batch_norm: _torch_batch_norm,
    torch.instance_norm: _torch_instance_norm,
}


class PrimitiveNorms(TorchFunctionMode):
    """While active, batch and instance normalisation run as :func:`batch_norm`/:func:`instance_norm`."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return _REPLACED.get(func, func)(*args, **(kwargs or {}))
