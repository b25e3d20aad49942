"""The inner loop without a graph (the "student"), and the checks every estimator applies.

Student: φ_0 = θ, φ_{k+1} = φ_k − α E_A ∇L_S(φ_k) for plain SGD, or one step of any
``torch.optim`` optimizer over the adapted parameters A. Teacher's leap: φ_T = θ + γ(φ_K − θ).
No graph is kept between steps, so memory does not grow with K; this is the forward trajectory
that the finite-difference checks evaluate and that the lazy meta-gradient starts from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor, nn

from .parameters import Adapt, Functional, resolve_adapt, state, trainable
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


def apply_leap(theta: Mapping[str, Tensor], phi: Mapping[str, Tensor], leap: float) -> dict[str, Tensor]:
    """The teacher φ_T = θ + γ(φ_K − θ) (exactly φ_K when γ = 1); differentiable if its inputs are."""
    if leap == 1:
        return dict(phi)
    return {n: t + leap * (phi[n] - t) for n, t in theta.items()}


@dataclass(frozen=True)
class Problem:
    """A model and a task, read once: θ (detached), buffer copies, and the adapted set A.

    Everything downstream evaluates the model functionally at points built from ``params``,
    so the user's model is only ever read. ``params`` holds every parameter the model has
    (trainable and frozen); ``trainable`` names θ and ``adapted`` names A ⊆ θ.
    """

    model: nn.Module
    task: Task
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    trainable: tuple[str, ...]
    adapted: tuple[str, ...]

    @classmethod
    def read(
        cls, model: nn.Module, task: Task, adapt: Adapt = None, dtype: torch.dtype | None = None
    ) -> Problem:
        """Read ``model`` (cast to ``dtype`` if given: a copy, as is the task's data)."""
        names = tuple(trainable(model))
        adapted = resolve_adapt(model, adapt)
        if dtype is not None and task.is_closure:
            other = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype]
            if other:
                raise ValueError(
                    f"this computation needs {dtype}, and a closure task cannot be converted (its data "
                    f"lives in the closures); parameters {other[:3]} are not {dtype}: use a converted "
                    f"copy of the model (copy.deepcopy(model).to({dtype})) with data of that dtype"
                )
        elif dtype is not None:
            task = task.to(dtype)
        params, buffers = state(model, dtype)
        return cls(model, task, params, buffers, names, adapted)

    @property
    def theta(self) -> dict[str, Tensor]:
        return {n: self.params[n] for n in self.trainable}

    def fresh_buffers(self) -> dict[str, Tensor]:
        """A copy of the buffers as read, for one run of the inner loop to update."""
        return {n: b.clone() for n, b in self.buffers.items()}

    def at(self, point: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> Functional:
        """The model evaluated at ``point`` (names not in it: as read)."""
        return Functional(self.model, self.params, point, buffers)

    @torch.enable_grad()
    def trajectory(
        self,
        steps: int,
        inner_lr: float,
        inner_optimizer: InnerOptimizer = None,
        start: Mapping[str, Tensor] | None = None,
        buffers: dict[str, Tensor] | None = None,
        proximal: float = 0.0,
    ) -> Iterator[dict[str, Tensor]]:
        """Yield the student's parameters φ_0, φ_1, …, φ_K, computed without a graph.

        φ_0 is θ, or ``start`` where given. The adapted tensors are copied before the optimizer
        writes them. ``buffers`` (default: fresh copies) are updated in place, as BatchNorm
        running statistics are. ``proximal`` = λ > 0 minimises L_S(φ) + (λ/2)‖φ_A − φ_0,A‖²
        instead (iMAML). The yielded dict is live: it holds φ_k until the next step.
        """
        phi = {**self.theta, **(start or {})}
        phi = {n: t.detach() for n, t in phi.items()}
        anchors = [phi[n] for n in self.adapted]
        leaves = [phi[n].clone().requires_grad_(True) for n in self.adapted]
        phi.update(zip(self.adapted, leaves))
        optimizer = make_optimizer(inner_optimizer, leaves, inner_lr)
        f = self.at(phi, self.fresh_buffers() if buffers is None else buffers)
        yield phi
        for k in range(steps):
            loss = checked(self.task.support_loss(f), support_what(k, steps))
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            for leaf, grad, anchor in zip(leaves, grads, anchors):
                if proximal:
                    pull = proximal * (leaf.detach() - anchor)
                    grad = pull if grad is None else grad + pull
                leaf.grad = grad
            optimizer.step()
            yield phi

    def student(
        self,
        steps: int,
        inner_lr: float,
        inner_optimizer: InnerOptimizer = None,
        start: Mapping[str, Tensor] | None = None,
        proximal: float = 0.0,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """φ_K (detached, every trainable name) and the buffers as the K inner steps left them."""
        buffers = self.fresh_buffers()
        *_, phi = self.trajectory(steps, inner_lr, inner_optimizer, start, buffers, proximal)
        return {n: t.detach() for n, t in phi.items()}, buffers

    def teacher(
        self,
        steps: int,
        inner_lr: float,
        leap: float = 1.0,
        inner_optimizer: InnerOptimizer = None,
        start: Mapping[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """φ_T = θ + γ(φ_K − θ) (exactly φ_K when γ = 1), and the buffers after the student."""
        phi, buffers = self.student(steps, inner_lr, inner_optimizer, start)
        return apply_leap({**self.theta, **(start or {})}, phi, leap), buffers
