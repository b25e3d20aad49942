"""Memory does not grow with K: the bytes the autograd graph holds are counted exactly.

Every tensor autograd saves for backward is counted from the moment it is packed until the
graph that holds it is freed (``saved_tensors_hooks`` + a finalizer). The peak of that live
count is deterministic, so it can be compared exactly, not timed.
"""

import pytest
import torch

import lazymaml
from gradcheck import oracle
from tests.helpers import conv_bn, image_task


class _Held:
    def __init__(self, tensor, meter):
        self.tensor, self.meter = tensor, meter
        self.nbytes = tensor.numel() * tensor.element_size()
        meter.live += self.nbytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self):
        self.meter.live -= self.nbytes


class SavedBytes:
    def __init__(self):
        self.live = self.peak = 0

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: _Held(t, self), lambda h: h.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def peak_saved_bytes(fn, steps):
    model, task = conv_bn().train(), image_task()
    with SavedBytes() as meter:
        fn(model, task, steps, 0.1)
    assert meter.live == 0  # everything saved was released
    return meter.peak


def test_lazy_graph_memory_is_constant_in_k():
    at = {k: peak_saved_bytes(lazymaml.meta_gradient, k) for k in (1, 5, 20)}
    assert at[1] == at[5] == at[20] > 0


def test_oracle_graph_memory_grows_with_k():
    at = {k: peak_saved_bytes(oracle.meta_gradient, k) for k in (1, 5, 20)}
    assert at[1] < at[5] < at[20]
    assert (at[20] - at[5]) / 15 == pytest.approx((at[5] - at[1]) / 4, rel=0.01)  # linear in K
    assert at[20] > 5 * peak_saved_bytes(lazymaml.meta_gradient, 20)


def test_the_meter_sees_a_student_that_keeps_its_graph():
    """A lazy gradient that forgot to detach its student (create_graph in the inner loop) must
    register as growing with K: the meter is not blind."""

    def keeps_graph(model, task, steps, inner_lr):
        params = dict(model.named_parameters())
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        phi = params
        for _ in range(steps):
            loss = task.support_loss(
                lambda x, phi=phi: torch.func.functional_call(model, {**phi, **buffers}, (x,))
            )
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
            phi = {n: p - inner_lr * g for (n, p), g in zip(phi.items(), grads)}
        loss = task.query_loss(lambda x: torch.func.functional_call(model, {**phi, **buffers}, (x,)))
        return torch.autograd.grad(loss, list(params.values()))

    assert peak_saved_bytes(keeps_graph, 20) > 3 * peak_saved_bytes(keeps_graph, 5)
