"""The user's model is left exactly as it was: parameters, buffers, ``.grad``, train/eval mode.

Nothing in this project writes to the model; :func:`preserved` is the guarantee that holds also
when a user's closure or loss misbehaves or raises, and :class:`Snapshot` is how
:func:`gradcheck.validate` tells a candidate implementation that modified the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


class _Param(NamedTuple):
    name: str
    owner: nn.Module
    key: str
    tensor: Tensor
    version: int
    requires_grad: bool
    value: Tensor | None
    grad: Tensor | None
    grad_value: Tensor | None


class _Buffer(NamedTuple):
    name: str
    owner: nn.Module
    key: str
    tensor: Tensor
    value: Tensor


class Snapshot:
    """What a model looks like now, to report (:meth:`differences`) or undo (:meth:`restore`) changes.

    Modes, buffers and gradients are recorded by value (BatchNorm updates its running statistics
    without bumping the autograd version counter, so versions cannot be trusted for them);
    parameters by identity and version counter, and by value too with ``copy_parameters=True``
    (which catches writes through ``.data``, at the cost of one copy of the parameters).
    """

    def __init__(self, model: nn.Module, copy_parameters: bool = False) -> None:
        modules = list(model.named_modules(remove_duplicate=False))
        self.modes = [(m, m.training) for _, m in modules]
        self.params = [
            _Param(
                f"{prefix}.{n}".lstrip("."),
                m,
                n,
                p,
                p._version,
                p.requires_grad,
                _clone(p) if copy_parameters else None,
                p.grad,
                _clone(p.grad),
            )
            for prefix, m in modules
            for n, p in m._parameters.items()
            if p is not None
        ]
        self.buffers = [
            _Buffer(f"{prefix}.{n}".lstrip("."), m, n, b, _clone(b))
            for prefix, m in modules
            for n, b in m._buffers.items()
            if b is not None
        ]

    def differences(self) -> list[str]:
        """Human-readable list of everything that changed since the snapshot."""
        out = [
            f"module {type(m).__name__} switched to {'train' if m.training else 'eval'} mode"
            for m, mode in self.modes
            if m.training != mode
        ]
        for r in self.params:
            p = r.tensor
            if r.owner._parameters.get(r.key) is not p:
                out.append(f"parameter {r.name} was replaced")
            elif p._version != r.version or (r.value is not None and not _same(p.detach(), r.value)):
                out.append(f"parameter {r.name} was modified")
            if p.requires_grad != r.requires_grad:
                out.append(f"parameter {r.name}.requires_grad changed")
            if p.grad is not r.grad or not _same(_clone(p.grad), r.grad_value):
                out.append(f"parameter {r.name}.grad changed")
        for r in self.buffers:
            if r.owner._buffers.get(r.key) is not r.tensor:
                out.append(f"buffer {r.name} was replaced")
            elif not _same(r.tensor.detach(), r.value):
                out.append(f"buffer {r.name} was modified")
        return sorted(set(out), key=out.index)

    @torch.no_grad()
    def restore(self) -> list[str]:
        """Undo every change that can be undone; return the ones that cannot (parameter writes
        when no copy was taken)."""
        for m, mode in self.modes:
            m.training = mode
        lost = []
        for r in self.params:
            p = r.owner._parameters[r.key] = r.tensor
            p.requires_grad_(r.requires_grad)
            if r.value is not None and not _same(p.detach(), r.value):
                p.copy_(r.value)
            elif r.value is None and p._version != r.version:
                lost.append(f"parameter {r.name} was modified in place")
            p.grad = r.grad
            if r.grad is not None and not _same(r.grad, r.grad_value):
                r.grad.copy_(r.grad_value)
        for r in self.buffers:
            r.owner._buffers[r.key] = r.tensor
            if not _same(r.tensor, r.value):
                r.tensor.copy_(r.value)
        return lost


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run a block with the guarantee that the model is exactly as before afterwards.

    Modes, buffers and gradients are restored whatever the block did, also when it raises.
    Parameters are never copied: an in-place write to one (which only a user closure could do)
    is reported as a RuntimeError after the block.
    """
    snapshot = Snapshot(model)
    try:
        yield
    finally:
        lost = snapshot.restore()
    if lost:
        raise RuntimeError(
            "the model's parameters were written during the computation (a closure or loss "
            f"modified them in place): {lost}"
        )
