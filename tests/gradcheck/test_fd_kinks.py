"""The directional check where the meta-objective F is not smooth — and where it is.

Through ReLU and max-pooling the inner gradient jumps wherever a unit switches, so F is only
piecewise smooth: a step J of F within h of θ along u moves D(h) by J/2h. The check's smoothness
test and retries (gradcheck/finite_differences.py's docstring derives them) must turn that into
"inconclusive along u" or into a verdict at a smaller step — never into a mismatch — while a
wrong gradient is still rejected and a smooth F is judged at h itself.

The ReLU net is the project's 4-conv few-shot network (conv → BatchNorm → ReLU → max-pool, four
times; problems.conv4) at test size: 4 channels, 16×16 inputs, 5-way 1-shot, 3 queries per class,
K = 5, α = 0.5, float64. The number of switches crossed within 2h grows with h and with the ReLU
evaluations per F; a full-size net crosses them at the default h = 1e-6 (6 of 8 directions
flagged there), this small one at h = 3e-3, where the old criterion flags 4 of 8 (measured).

The old criterion, computed here from the check's own evaluations at h, is the pre-0.2 rule:
|⟨g,u⟩ − D(h)| ≤ |D(2h) − D(h)| + 4ε|F|/h + rtol·max(|D(h)|, ‖g‖/√n). No tolerance here is ours:
the tests assert the check's verdicts, and on synthetic f the error bound it states.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gradcheck import finite_differences, oracle, problems
from gradcheck.finite_differences import EPS64, Differences
from tests.helpers import conv_bn, image_task, mlp, regression_task

STEPS, INNER_LR, STEP = 5, 0.5, 3e-3


def relu_net():
    torch.manual_seed(1)
    model = problems.conv4(ways=5, channels=4, image_size=16, in_channels=1).double()
    task = problems.few_shot(
        torch.Generator().manual_seed(1),
        ways=5,
        shots=1,
        queries=3,
        image_size=16,
        channels=1,
        dtype=torch.float64,
    )
    return model, task


def old_criterion_flags(report, gradient):
    """The directions the pre-0.2 check (D(h) and D(2h) only, smoothness assumed) would fail."""
    g = torch.cat([t.reshape(-1) for t in gradient.values()])
    typical = g.norm().item() / math.sqrt(g.numel())
    flagged = []
    for i, d in enumerate(report.directions):
        at_h = d.tried[0]
        _, full, double = at_h.central
        error = abs(double - full) + 4 * EPS64 * abs(at_h.values[3]) / at_h.step
        if abs(d.analytic - full) > error + report.rtol * max(abs(full), typical):
            flagged.append(i)
    return flagged


@pytest.fixture(scope="module")
def relu():
    model, task = relu_net()
    exact = oracle.meta_gradient(model, task, STEPS, INNER_LR)
    return model, task, exact, finite_differences.check(exact, model, task, STEPS, INNER_LR, step=STEP)


def test_exact_gradient_of_a_relu_net_is_not_rejected(relu):
    _, _, exact, report = relu
    flagged = old_criterion_flags(report, exact)
    assert len(flagged) >= 3, f"the net no longer hits kinks at h={STEP}: {report}"  # 4 of 8 measured
    assert report.failed == [] and report.ok(), str(report)
    for i in flagged:  # the smoothness test saw what the old criterion took for a mismatch
        d = report.directions[i]
        assert not d.tried[0].smooth and (not d.conclusive or d.step < STEP)
    retried = [d for d in report.directions if d.conclusive and d.step < STEP]
    inconclusive = [report.directions[i] for i in report.inconclusive]
    assert retried and inconclusive  # both outcomes occur on this net (4 and 4, measured)
    assert all(d.ok for d in retried)
    assert all("not smooth within 2s" in d.reason for d in inconclusive)
    assert f"{len(inconclusive)} inconclusive of 8" in str(report)
    assert str(report).count("inconclusive: the meta-objective is not smooth") == len(inconclusive)


def test_first_order_gradient_is_still_rejected_on_the_relu_net(relu):
    model, task, _, _ = relu
    first = oracle.meta_gradient(model, task, STEPS, INNER_LR, first_order=True)
    report = finite_differences.check(first, model, task, STEPS, INNER_LR, step=STEP)
    assert len(report.failed) >= 2 and not report.ok()
    with pytest.raises(AssertionError, match=r"u \d+: numerical .* vs analytical .*: \|difference\|"):
        report.assert_close()


SMOOTH_NETS = {
    "tanh MLP": lambda: (mlp([4, 32, 32, 2], "tanh"), regression_task(inputs=4, outputs=2), 5, 0.3),
    "softplus MLP": lambda: (mlp([3, 16, 16, 2], "softplus"), regression_task(inputs=3, outputs=2), 5, 0.2),
    "conv + BatchNorm + tanh": lambda: (conv_bn().train(), image_task(), 2, 0.1),
}


@pytest.mark.parametrize("step", [1e-6, 1e-3])
@pytest.mark.parametrize("net", list(SMOOTH_NETS))
def test_smooth_nets_are_judged_at_h_itself(net, step):
    """No direction is inconclusive or retried — also at h = 1e-3, where the truncation error
    is visible (D(2h) − D(h) ≈ 4 (D(h) − D(h/2)) holds and is recognised)."""
    model, task, steps, inner_lr = SMOOTH_NETS[net]()
    exact = oracle.meta_gradient(model, task, steps, inner_lr)
    report = finite_differences.check(exact, model, task, steps, inner_lr, step=step)
    assert report.inconclusive == [] and all(d.step == step for d in report.directions), str(report)
    assert report.ok(), str(report)


class StepAtTheta(nn.Module):
    """A tanh MLP whose output rises by 1e-3 when w.sum() exceeds its value at θ: F has a step at
    θ itself along every direction, so no step size can make the check conclusive."""

    def __init__(self):
        super().__init__()
        self.net = mlp([2, 8, 1])
        self.w = nn.Parameter(torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("at", self.w.detach().sum().clone())

    def forward(self, x):
        return self.net(x) + 1e-3 * (self.w.sum() > self.at).to(x.dtype)


def test_a_step_at_theta_is_inconclusive_not_a_mismatch():
    model, task = StepAtTheta(), regression_task()
    exact = oracle.meta_gradient(model, task, 2, 0.2, adapt="net")
    report = finite_differences.check(exact, model, task, 2, 0.2, adapt="net")
    assert report.failed == [] and len(report.inconclusive) == 8 and not report.ok()
    assert all(len(d.tried) == 3 for d in report.directions)  # h, h/10, h/100 all tried
    assert "INCONCLUSIVE — 0 agree, 0 disagree, 8 inconclusive of 8" in str(report)
    with pytest.raises(AssertionError, match="only 0 of 8 directions are conclusive"):
        report.assert_close()


# ---- the smoothness test and error bound on synthetic f, exactly as the docstring derives them ----


def differences(f, step):
    return Differences(step, tuple(f(t * step) for t in (-2, -1, -0.5, 0, 0.5, 1, 2)))


# f(0) is a loss value, O(1) and positive; the other Taylor coefficients are anything O(1)
coefficients = st.tuples(st.floats(0.1, 3), *[st.floats(-3, 3)] * 6).map(list)


@given(c=coefficients, step=st.sampled_from([1e-6, 1e-4]))
def test_a_smooth_f_is_smooth_and_within_the_error_bound(c, step):
    """A polynomial of degree 5 plus c₆ sin t: recognised as smooth at small s (even where its
    t³ coefficient vanishes and s⁴ terms lead), and D(s) is within E of f'(0)."""

    def f(t):
        return sum(a * t**k for k, a in enumerate(c[:6])) + c[6] * math.sin(t)

    d = differences(f, step)
    assert d.smooth, str(d)
    assert abs(d.numerical - (c[1] + c[6])) <= d.error


where = st.floats(0.01, 1.99).filter(lambda x: abs(x - 1) > 1e-6) | st.floats(-1.99, -0.01).filter(
    lambda x: abs(x + 1) > 1e-6
)


@given(
    c=coefficients,
    kind=st.sampled_from(["step", "kink"]),
    at=where,
    size=st.floats(1e-6, 1.0) | st.floats(-1.0, -1e-6),
    step=st.sampled_from([1e-6, 1e-4, 1e-2]),
)
def test_one_singularity_is_detected_or_within_the_error_bound(c, kind, at, size, step):
    """Smooth f plus one step J·H(t − t₀) or kink S·(t − t₀)₊ within 2s of 0: either the test
    calls f not smooth, or D(s) is within the bound E of f'(0) — never a wrong verdict."""
    t0 = at * step

    def f(t):
        smooth = sum(a * t**k for k, a in enumerate(c[:6])) + c[6] * math.sin(t)
        return smooth + (size * (t > t0) if kind == "step" else size * max(t - t0, 0.0))

    slope = c[1] + c[6] + (size if kind == "kink" and t0 < 0 else 0.0)
    d = differences(f, step)
    assert not d.smooth or abs(d.numerical - slope) <= d.error, str(d)


@given(kind=st.sampled_from(["step", "kink"]), at=where, size=st.floats(1e-6, 1.0))
def test_one_singularity_alone_is_always_detected(kind, at, size):
    """On a linear background the single-singularity ratios of the docstring (|C| / |D(2s) − D(s)|
    and |G| / |E(2s) − 4E(s)| never both below ¼) mean detection, wherever t₀ lies in (−2s, 2s)."""
    step = 1e-3
    t0 = at * step

    def f(t):
        return 0.7 + 0.3 * t + (size * (t > t0) if kind == "step" else size * max(t - t0, 0.0))

    assert not differences(f, step).smooth
