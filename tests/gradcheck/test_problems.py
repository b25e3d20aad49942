"""gradcheck.problems: the generated sinusoid and few-shot problems and their networks.

A sinusoid task is checked against its definition by recovering A and φ by least squares:
y = A sin(x − φ) = a sin x + b cos x with a = A cos φ, b = −A sin φ, a linear fit that is exact
up to float64 rounding (residuals below 1e-12 for |y| ≤ 5). A few-shot task is checked by its
structure: labels, shapes, and the differences between two examples of one class, which hold
noise only (standard deviation √2 · noise, so their mean square is 2 noise² to within a few
percent over 2 × 3 × 16 × 16 pixels).
"""

import math

import pytest
import torch
from torch import nn

from gradcheck import problems

F64 = torch.float64


@pytest.mark.parametrize("seed", range(5))
def test_sinusoid_is_a_sine_with_amplitude_and_phase_in_range(seed):
    task = problems.sinusoid(torch.Generator().manual_seed(seed), shots=5, queries=8, dtype=F64)
    (xs, ys), (xq, yq) = task.support, task.query
    assert (xs.shape, ys.shape, xq.shape, yq.shape) == ((5, 1), (5, 1), (8, 1), (8, 1))
    x, y = torch.cat([xs, xq]).flatten(), torch.cat([ys, yq]).flatten()
    assert x.min() >= -5 and x.max() <= 5
    basis = torch.stack([x.sin(), x.cos()], 1)
    a, b = torch.linalg.lstsq(basis, y).solution
    residual = (basis @ torch.stack([a, b]) - y).abs().max()
    assert residual < 1e-12
    amplitude, phase = math.hypot(a.item(), b.item()), math.atan2(-b.item(), a.item())
    assert 0.1 <= amplitude <= 5.0 and 0 <= phase <= math.pi
    assert task.loss is torch.nn.functional.mse_loss


def test_sinusoid_is_reproducible_and_generator_driven():
    def draw(seed):
        return problems.sinusoid(torch.Generator().manual_seed(seed))

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a.support[0], b.support[0]) and torch.equal(a.query[1], b.query[1])
    assert not torch.equal(a.support[0], c.support[0])
    assert a.support[0].dtype == torch.float32  # the default
    g = torch.Generator().manual_seed(0)
    first, second = problems.sinusoid(g), problems.sinusoid(g)  # one generator: two different tasks
    assert not torch.equal(first.support[1], second.support[1])


def test_mlp_layers():
    net = problems.mlp((4, 3), nn.Tanh, inputs=2, outputs=5)
    kinds = [type(m) for m in net]
    assert kinds == [nn.Linear, nn.Tanh, nn.Linear, nn.Tanh, nn.Linear]
    assert [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)] == [
        (2, 4),
        (4, 3),
        (3, 5),
    ]
    assert net(torch.zeros(7, 2)).shape == (7, 5)
    default = problems.mlp()
    assert [m.out_features for m in default if isinstance(m, nn.Linear)] == [40, 40, 1]
    assert isinstance(default[1], nn.ReLU)


@pytest.mark.parametrize(("image_size", "final"), [(84, 5), (16, 1)])
def test_conv4_is_four_conv_batchnorm_relu_pool_blocks_and_a_head(image_size, final):
    net = problems.conv4(ways=3, channels=4, image_size=image_size, in_channels=2)
    blocks = [type(m) for m in net[:16]]
    assert blocks == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d] * 4
    assert isinstance(net[16], nn.Flatten) and net[17].in_features == 4 * final * final
    assert net(torch.zeros(2, 2, image_size, image_size)).shape == (2, 3)


def test_few_shot_task_structure():
    g = torch.Generator().manual_seed(0)
    task = problems.few_shot(g, ways=3, shots=2, queries=4, image_size=16, channels=2, noise=0.5, dtype=F64)
    (xs, ys), (xq, yq) = task.support, task.query
    assert xs.shape == (6, 2, 16, 16) and xq.shape == (12, 2, 16, 16) and xs.dtype == F64
    assert torch.equal(ys, torch.tensor([0, 0, 1, 1, 2, 2])) and torch.equal(
        yq, torch.arange(3).repeat_interleave(4)
    )
    assert ys.dtype == torch.long and task.loss is torch.nn.functional.cross_entropy
    same = torch.stack([xs[0] - xs[1], xs[2] - xs[3], xs[4] - xs[5]])  # one prototype each: noise only
    assert same.pow(2).mean().item() == pytest.approx(2 * 0.5**2, rel=0.1)
    across = xs[0] - xs[2]  # different prototypes: noise plus the prototypes' difference
    assert across.pow(2).mean() > same.pow(2).mean()
