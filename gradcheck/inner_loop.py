"""The inner loop without a graph (the "student"), and the checks every estimator applies.

Student: φ_0 = θ, φ_{k+1} = φ_k − α E_A ∇L_S(φ_k) for plain SGD, or one step of any
``torch.optim`` optimizer over the adapted parameters A. Teacher's leap: φ_T = θ + γ(φ_K − θ).
No graph is kept between steps, so memory does not grow with K; this is the forward trajectory
that the finite-difference checks evaluate and that the lazy meta-gradient starts from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from numbers import Integral, Real

import torch
from torch import Tensor, nn

from .parameters import Functional
from .task import Task

InnerOptimizer = None | str | Callable[[list[Tensor]], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}


def check_hyperparameters(steps: int, inner_lr: float, leap: float = 1.0) -> None:
    """Refuse K < 0, α ≤ 0 and γ outside (0, 1] with a message naming the argument."""
    if isinstance(steps, bool) or not isinstance(steps, Integral):
        raise TypeError(f"steps must be an integer, got {steps!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    for name, value in (("inner_lr", inner_lr), ("leap", leap)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if inner_lr <= 0:
        raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
    if not 0 < leap <= 1:
        raise ValueError(f"leap (the teacher's fraction γ) must be in (0, 1], got {leap}")


def checked(loss: object, what: str) -> Tensor:
    """``loss`` if it is a finite scalar tensor; otherwise an exception that says ``what`` it was."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(loss).__name__}")
    if loss.ndim != 0:
        raise ValueError(
            f"{what} must be a scalar (0-dim) tensor, got shape {tuple(loss.shape)}; "
            "reduce it, e.g. with .mean()"
        )
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what} is {loss.item()}")
    return loss


def support_what(k: int, steps: int) -> str:
    """How an inner step's loss is named in error messages."""
    return f"support loss L_S(φ_{k}) at inner step {k + 1} of {steps}"


QUERY_WHAT = "query loss L_Q(φ_T)"


def make_optimizer(spec: InnerOptimizer, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    """``None``/``"sgd"``: SGD at ``lr``; ``"adam"``: Adam at ``lr``; a callable: ``spec(params)``."""
    if spec is None:
        spec = "sgd"
    if isinstance(spec, str):
        if spec not in OPTIMIZERS:
            raise ValueError(
                f"unknown inner_optimizer {spec!r}; use one of {sorted(OPTIMIZERS)} "
                "or a factory params -> torch.optim.Optimizer"
            )
        return OPTIMIZERS[spec](params, lr=lr)
    if callable(spec):
        optimizer = spec(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"inner_optimizer factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer"
            )
        return optimizer
    raise TypeError(f"inner_optimizer must be None, a name or a factory, got {spec!r}")


def trajectory(
    model: nn.Module,
    task: Task,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    adapted: Sequence[str],
    steps: int,
    inner_lr: float,
    inner_optimizer: InnerOptimizer = None,
) -> Iterator[dict[str, Tensor]]:
    """Yield the student's parameters φ_0 = θ, φ_1, …, φ_K, computed without a graph.

    ``params`` holds every parameter the model reads (θ and any frozen ones); the adapted ones
    are copied before the optimizer writes them, the others are used as they are. ``buffers``
    are updated in place (BatchNorm running statistics): pass copies. The yielded dict is live:
    it holds φ_k until the next iteration.
    """
    phi = {n: t.detach() for n, t in params.items()}
    for name in adapted:
        phi[name] = phi[name].clone().requires_grad_(True)
    leaves = [phi[n] for n in adapted]
    optimizer = make_optimizer(inner_optimizer, leaves, inner_lr)
    f = Functional(model, phi, buffers)
    yield phi
    for k in range(steps):
        loss = checked(task.support_loss(f), support_what(k, steps))
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        for leaf, grad in zip(leaves, grads):
            leaf.grad = grad
        optimizer.step()
        yield phi


def apply_leap(theta: Mapping[str, Tensor], phi: Mapping[str, Tensor], gamma: float) -> dict[str, Tensor]:
    """The teacher φ_T = θ + γ(φ_K − θ) (exactly φ_K when γ = 1)."""
    if gamma == 1:
        return dict(phi)
    return {n: t + gamma * (phi[n] - t) for n, t in theta.items()}


def teacher(
    model: nn.Module,
    task: Task,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    adapted: Sequence[str],
    steps: int,
    inner_lr: float,
    gamma: float = 1.0,
    inner_optimizer: InnerOptimizer = None,
) -> dict[str, Tensor]:
    """φ_T after a K-step student run from ``params`` (detached tensors; see :func:`trajectory`)."""
    *_, phi = trajectory(model, task, params, buffers, adapted, steps, inner_lr, inner_optimizer)
    phi = {n: t.detach() for n, t in phi.items()}
    return apply_leap({n: t.detach() for n, t in params.items()}, phi, gamma)
