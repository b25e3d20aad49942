"""Lazy-MAML in a meta-training loop: gradients into ``p.grad`` for any outer optimizer."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from gradcheck.parameters import Adapt
from gradcheck.settings import InnerLoop, InnerOptimizer
from gradcheck.state import preserved
from gradcheck.student import Student
from gradcheck.task import TaskLike, Tasks, as_tasks

from .lazy import JacobianStep, lazy_gradient, resolve_jacobian_step

__all__ = ["LazyMAML"]


class LazyMAML:
    """Meta-learner around ``model``: ``meta_backward(tasks)`` then ``outer_optimizer.step()``.

    The model's buffers are never written by the inner loop: BatchNorm running statistics stay
    as they were (like ``higher`` and learn2learn clones, the inner loop runs on copies), so
    evaluate in train mode (transductive batch statistics, as MAML does) or on :meth:`adapt`'s
    student, whose buffers are the ones its own K steps produced.
    """

    def __init__(
        self,
        model: nn.Module,
        steps: int,
        inner_lr: float,
        *,
        adapt: Adapt = None,
        leap: float = 1.0,
        jacobian_step: JacobianStep = "single",
        first_order: bool = False,
        inner_optimizer: InnerOptimizer = "sgd",
    ) -> None:
        self.model = model
        self.loop = InnerLoop(steps, inner_lr, leap, inner_optimizer)
        self.eta = 0.0 if first_order else resolve_jacobian_step(jacobian_step, self.loop)
        self.adapt_spec = adapt
        Student.read(model, adapt)  # refuse a bad adapt now, not at the first meta-batch

    def meta_backward(self, task_or_tasks: Tasks) -> Tensor:
        """Accumulate the mean lazy meta-gradient over the tasks into ``p.grad``; return the mean
        query loss L_Q(φ_T). Nothing is written unless every task succeeds."""
        tasks = as_tasks(task_or_tasks)
        student = Student.read(self.model, self.adapt_spec)
        with preserved(self.model):
            results = [lazy_gradient(student, task, self.loop, self.eta) for task in tasks]
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name not in student.theta:
                    continue
                mean = torch.stack([g[name] for g, _ in results]).mean(0)
                if p.grad is None:
                    p.grad = mean
                else:
                    p.grad.add_(mean)
        return torch.stack([loss for _, loss in results]).mean()

    def adapt(self, task: TaskLike) -> nn.Module:
        """A copy of the model holding the student φ_K after K inner steps on ``task``."""
        student = Student.read(self.model, self.adapt_spec)
        with preserved(self.model):
            phi, frozen = student.run(task, self.loop)
        adapted = copy.deepcopy(self.model)
        tensors = {**dict(adapted.named_parameters()), **dict(adapted.named_buffers())}
        with torch.no_grad():
            for name, value in {**phi, **frozen}.items():
                tensors[name].copy_(value)
        for p in adapted.parameters():
            p.grad = None
        return adapted
