"""Bytes held by the autograd graph, counted exactly (deterministic, device-independent).

Every tensor autograd saves for backward is counted from the moment it is packed until the graph
holding it releases it (``saved_tensors_hooks`` plus a finaliser). The peak of that live count
is the graph's memory: it is what grows with K when an inner loop is differentiated through,
and it can be compared exactly, where allocator or RSS readings are noisy.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SavedTensorMeter"]


class _Held:
    __slots__ = ("meter", "nbytes", "tensor")

    def __init__(self, tensor: Tensor, meter: SavedTensorMeter) -> None:
        self.tensor, self.meter = tensor, meter
        self.nbytes = tensor.numel() * tensor.element_size()
        meter.live += self.nbytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.nbytes


class SavedTensorMeter:
    """``with SavedTensorMeter() as m: ...`` then ``m.peak`` (bytes) and ``m.live`` (still held)."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: _Held(t, self), lambda h: h.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
