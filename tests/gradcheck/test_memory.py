"""Memory does not grow with K: the bytes the autograd graph holds, counted exactly by
gradcheck.memory.SavedTensorMeter, are compared (deterministic, not timed)."""

import pytest
import torch

import lazymaml
from gradcheck import oracle
from gradcheck.memory import SavedTensorMeter
from tests.helpers import conv_bn, image_task


def peak_saved_bytes(fn, steps):
    model, task = conv_bn().train(), image_task()
    with SavedTensorMeter() as meter:
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
