"""lazymaml.normalization.BatchStatistics: normalisation by the input's statistics neither reads nor
writes running statistics; normalisation by the running statistics runs unchanged.

Outputs are compared with batch and instance normalisation written out here,
(x − mean) / √(var + ε) · w + b with the biased variance, to rtol 1e-12, atol 1e-13 (float64; the
same quantity by other reductions, rounding ~1e-16 per operation). Running statistics are
compared for exact equality with their values before the call.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from lazymaml.normalization import BatchStatistics

F64 = torch.float64
RTOL, ATOL = 1e-12, 1e-13
EPS = 1e-5


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 2 + 3 * torch.randn(6, 3, 4, 4, generator=g, dtype=F64)
    weight, bias = torch.rand(3, generator=g, dtype=F64) + 0.5, torch.randn(3, generator=g, dtype=F64)
    mean, var = torch.randn(3, generator=g, dtype=F64), torch.rand(3, generator=g, dtype=F64) + 0.5
    return x, mean, var, weight, bias


def normalised(x, mean, var, weight, bias):
    shape = (1, -1, 1, 1)
    return (x - mean.view(shape)) / (var.view(shape) + EPS).sqrt() * weight.view(shape) + bias.view(shape)


def batch_statistics(x):
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)


CALLS = {
    "F.batch_norm positional": lambda x, m, v, w, b: F.batch_norm(x, m, v, w, b, True, 0.1, EPS),
    "F.batch_norm keywords": lambda x, m, v, w, b: F.batch_norm(
        x, running_mean=m, running_var=v, weight=w, bias=b, training=True, eps=EPS
    ),
    "torch.batch_norm": lambda x, m, v, w, b: torch.batch_norm(x, w, b, m, v, True, 0.1, EPS, False),
    "nn.BatchNorm2d": lambda x, m, v, w, b: functional_call(
        nn.BatchNorm2d(3, eps=EPS).double().train(),
        {"weight": w, "bias": b, "running_mean": m, "running_var": v},
        (x,),
    ),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_training_normalises_by_the_batch_and_leaves_running_statistics_untouched(call):
    x, mean, var, weight, bias = data()
    kept = mean.clone(), var.clone()
    with BatchStatistics():
        out = CALLS[call](x, mean, var, weight, bias)
    assert torch.equal(mean, kept[0]) and torch.equal(var, kept[1])
    torch.testing.assert_close(out, normalised(x, *batch_statistics(x), weight, bias), rtol=RTOL, atol=ATOL)
    CALLS[call](x, mean, var, weight, bias)  # outside the mode the same call does update them
    assert not torch.equal(mean, kept[0]) and not torch.equal(var, kept[1])


@pytest.mark.parametrize(
    "call",
    [
        lambda x, m, v, w, b: F.batch_norm(x, m, v, w, b, eps=EPS),  # training defaults to False
        lambda x, m, v, w, b: F.batch_norm(x, m, v, w, b, False, 0.1, EPS),
        lambda x, m, v, w, b: torch.batch_norm(x, w, b, m, v, False, 0.1, EPS, False),
        lambda x, m, v, w, b: F.instance_norm(x, m, v, w, b, use_input_stats=False, eps=EPS),
    ],
    ids=["F.batch_norm default", "F.batch_norm eval", "torch.batch_norm eval", "F.instance_norm running"],
)
def test_normalisation_by_the_running_statistics_runs_unchanged(call):
    x, mean, var, weight, bias = data()
    with BatchStatistics():
        inside = call(x, mean, var, weight, bias)
    assert torch.equal(inside, call(x, mean, var, weight, bias))
    torch.testing.assert_close(inside, normalised(x, mean, var, weight, bias), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "call",
    [
        lambda x, m, v, w, b: F.instance_norm(x, m, v, w, b, eps=EPS),  # use_input_stats defaults to True
        lambda x, m, v, w, b: torch.instance_norm(x, w, b, m, v, True, 0.1, EPS, False),
    ],
    ids=["F.instance_norm", "torch.instance_norm"],
)
def test_instance_normalisation_by_the_input_leaves_running_statistics_untouched(call):
    x, mean, var, weight, bias = data()
    kept = mean.clone(), var.clone()
    with BatchStatistics():
        out = call(x, mean, var, weight, bias)
    assert torch.equal(mean, kept[0]) and torch.equal(var, kept[1])
    per = x.mean((2, 3), keepdim=True), x.var((2, 3), unbiased=False, keepdim=True)
    want = (x - per[0]) / (per[1] + EPS).sqrt() * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL)


def test_other_calls_are_untouched():
    x = torch.randn(3, 2, dtype=F64)
    with BatchStatistics():
        assert torch.equal(torch.add(x, 1), x + 1) and torch.equal(
            F.layer_norm(x, (2,)), F.layer_norm(x, (2,))
        )


def test_a_vmapped_batchnorm_in_train_mode_is_per_task_batch_normalisation():
    """What the mode is for: under ``vmap`` over tasks the running-statistic update is refused
    without it; with it each task is normalised by its own batch."""
    module = nn.BatchNorm2d(3, eps=EPS).double().train()
    xs = torch.stack([data(seed)[0] for seed in range(3)])
    params = {n: t.detach() for n, t in module.named_parameters()}

    def forward(x):
        return functional_call(module, params, (x,))

    with pytest.raises(RuntimeError):
        vmap(forward)(xs)
    kept = module.running_mean.clone()
    with BatchStatistics():
        out = vmap(forward)(xs)
    assert torch.equal(module.running_mean, kept)
    for x, got in zip(xs, out):
        want = normalised(x, *batch_statistics(x), params["weight"], params["bias"])
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
