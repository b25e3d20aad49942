"""Built-in, generated meta-learning problems (nothing is downloaded).

* sinusoid regression (Finn et al., 2017): y = A sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π],
  x ~ U[−5, 5], with an MLP 1–40–40–1;
* synthetic N-way K-shot image classification: each class is a random smooth prototype image,
  each example the prototype plus noise, with the 4-conv few-shot network (Vinyals et al., 2016)
  — the shape of mini-ImageNet (84×84×3, 5-way 1-shot, 15 queries per class).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .task import Task

__all__ = ["conv4", "few_shot", "mlp", "sinusoid"]


def sinusoid(
    generator: torch.Generator,
    shots: int = 10,
    queries: int = 10,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Task:
    """One sinusoid task with ``shots`` support and ``queries`` query points, MSE loss."""
    amplitude = 0.1 + 4.9 * torch.rand((), generator=generator, dtype=torch.float64)
    phase = math.pi * torch.rand((), generator=generator, dtype=torch.float64)
    x = -5 + 10 * torch.rand(shots + queries, 1, generator=generator, dtype=torch.float64)
    y = amplitude * torch.sin(x - phase)
    x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    return Task((x[:shots], y[:shots]), (x[shots:], y[shots:]), F.mse_loss)


def mlp(
    hidden: tuple[int, ...] = (40, 40),
    activation: type[nn.Module] = nn.ReLU,
    inputs: int = 1,
    outputs: int = 1,
) -> nn.Sequential:
    """An MLP ``inputs → hidden… → outputs`` with ``activation`` between layers."""
    widths = (inputs, *hidden)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], outputs))


def conv4(ways: int = 5, channels: int = 32, image_size: int = 84, in_channels: int = 3) -> nn.Sequential:
    """Four blocks conv3×3 → BatchNorm → ReLU → max-pool 2, then a linear head over ``ways``."""
    blocks: list[nn.Module] = []
    c, size = in_channels, image_size
    for _ in range(4):
        blocks += [nn.Conv2d(c, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2)]
        c, size = channels, size // 2
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels * size * size, ways))


def few_shot(
    generator: torch.Generator,
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    image_size: int = 84,
    channels: int = 3,
    noise: float = 0.5,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Task:
    """One ``ways``-way ``shots``-shot task with ``queries`` query images per class."""
    coarse = torch.randn(ways, channels, 6, 6, generator=generator)
    prototypes = F.interpolate(coarse, size=image_size, mode="bilinear", align_corners=False)

    def sample(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(ways).repeat_interleave(per_class)
        images = prototypes[labels] + noise * torch.randn(
            len(labels), channels, image_size, image_size, generator=generator
        )
        return images.to(device=device, dtype=dtype), labels.to(device)

    return Task(sample(shots), sample(queries), F.cross_entropy)
