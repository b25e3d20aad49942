"""gradcheck.optim: the pure inner updates against ``torch.optim`` itself (the independent
computation), in float64, over several steps; and the wrapper of any torch.optim optimizer.

Tolerance: the pure updates do the same float64 arithmetic as torch.optim in another order
(rounding ~1e-16 per operation, a few operations per step, 6 steps): rtol 1e-12 leaves four
orders of headroom, while a wrong bias correction or a misplaced ε changes entries by ≥ 1e-6
on these gradients (ε = 1e-8 against √v ~ 1e-3 … 1).
"""

import pytest
import torch

from gradcheck.optim import Adam, AdamUpdate, Sgd, TorchOptimizer, adam_update, safe_sqrt, spec_of

F64 = torch.float64
RTOL, ATOL = 1e-12, 1e-15


def gradients(step, shape=(3, 4)):
    """A gradient sequence with a zero entry (Adam's v = 0 there) and small ones (ε matters)."""
    g = torch.Generator().manual_seed(step)
    grad = torch.randn(shape, generator=g, dtype=F64) * 10.0 ** -(step % 4)
    grad[0, 0] = 0.0
    return {"w": grad, "b": torch.randn(2, generator=g, dtype=F64)}


def run_torch(optimizer_class, steps, **options):
    params = {
        "w": torch.ones(3, 4, dtype=F64, requires_grad=True),
        "b": torch.zeros(2, dtype=F64, requires_grad=True),
    }
    optimizer = optimizer_class(list(params.values()), **options)
    for k in range(steps):
        for n, p in params.items():
            p.grad = gradients(k)[n].clone()
        optimizer.step()
    return {n: p.detach() for n, p in params.items()}


def run_pure(update, steps):
    params = {"w": torch.ones(3, 4, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    state = update.init(params)
    for k in range(steps):
        params, state = update.step(params, gradients(k), state)
    return params


@pytest.mark.parametrize(
    ("update", "optimizer_class", "options"),
    [
        (Sgd(0.1), torch.optim.SGD, dict(lr=0.1)),
        (AdamUpdate(0.05), torch.optim.Adam, dict(lr=0.05)),
        (AdamUpdate(0.05, (0.5, 0.9), 1e-3), torch.optim.Adam, dict(lr=0.05, betas=(0.5, 0.9), eps=1e-3)),
    ],
)
def test_pure_updates_follow_torch_optim(update, optimizer_class, options):
    want = run_torch(optimizer_class, 6, **options)
    got = run_pure(update, 6)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=RTOL, atol=ATOL)


def test_spec_of_reads_the_optimizer_group():
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.3, betas=(0.8, 0.95), eps=1e-6)
    assert spec_of(optimizer) == (Adam((0.8, 0.95), 1e-6), 0.3)


def test_only_the_given_names_are_updated():
    params = {"w": torch.ones(2, dtype=F64), "frozen": torch.ones(2, dtype=F64)}
    for update in (Sgd(0.1), AdamUpdate(0.1)):
        out, _ = update.step(params, {"w": torch.ones(2, dtype=F64)}, update.init(params))
        assert out["frozen"] is params["frozen"] and not torch.equal(out["w"], params["w"])


def test_adam_is_differentiable_at_a_zero_second_moment():
    """√v at v = 0 has an infinite derivative; multiplied by ∂v/∂g = 0 it would be nan. The safe
    root's derivative there is 0, and the update's derivative is finite."""
    v = torch.zeros(3, dtype=F64, requires_grad=True)
    (d,) = torch.autograd.grad(safe_sqrt(v).sum(), v)
    assert torch.equal(d, torch.zeros(3, dtype=F64))
    g = torch.tensor([0.0, 1e-3, 1.0], dtype=F64, requires_grad=True)
    p, _, _ = adam_update(
        torch.ones(3, dtype=F64),
        g,
        torch.zeros(3, dtype=F64),
        torch.zeros(3, dtype=F64),
        1,
        0.1,
        (0.9, 0.999),
        1e-8,
    )
    (dp,) = torch.autograd.grad(p.sum(), g)
    assert torch.isfinite(dp).all()


def test_torch_optimizer_steps_copies_never_aliasing_earlier_results():
    update = TorchOptimizer(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    params = {"w": torch.ones(3, 4, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    state = update.init(params)
    returned, copies = [], []
    for k in range(4):
        params, state = update.step(params, gradients(k), state)
        returned.append(params)
        copies.append({n: t.clone() for n, t in params.items()})
    # the optimizer writes its own leaves in place: what it returned earlier must not change
    assert all(torch.equal(r[n], c[n]) for r, c in zip(returned, copies) for n in r)
    want = run_torch(torch.optim.SGD, 4, lr=0.1, momentum=0.9)
    for n in want:
        torch.testing.assert_close(params[n], want[n], rtol=RTOL, atol=ATOL)
