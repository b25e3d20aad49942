"""Lazy-MAML in a meta-training loop: gradients into ``p.grad`` for any outer optimizer."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gradcheck.inner_loop import InnerOptimizer, Problem, check_hyperparameters
from gradcheck.parameters import Adapt, resolve_adapt
from gradcheck.state import preserved
from gradcheck.task import Task

from .lazy import JacobianStep, meta_gradient_and_loss, step_size


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
        inner_lr: float,
        steps: int,
        leap: float = 1.0,
        jacobian_step: JacobianStep = "single",
        adapt: Adapt = None,
        first_order: bool = False,
        inner_optimizer: InnerOptimizer = None,
    ) -> None:
        check_hyperparameters(steps, inner_lr, leap)
        step_size(jacobian_step, steps, inner_lr, leap)
        resolve_adapt(model, adapt)
        self.model, self.inner_lr, self.steps, self.leap = model, inner_lr, steps, leap
        self.jacobian_step, self.first_order, self.inner_optimizer = (
            jacobian_step,
            first_order,
            inner_optimizer,
        )
        self._adapt = adapt

    def meta_backward(self, tasks: Task | Sequence[Task]) -> Tensor:
        """Accumulate the mean lazy meta-gradient over ``tasks`` into ``p.grad``; return the mean
        query loss L_Q(φ_T). Nothing is written unless every task succeeds."""
        tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
        if not tasks:
            raise ValueError("meta_backward needs at least one task")
        results = [
            meta_gradient_and_loss(
                self.model,
                task,
                self.steps,
                self.inner_lr,
                self.leap,
                self.jacobian_step,
                self._adapt,
                self.inner_optimizer,
                self.first_order,
            )
            for task in tasks
        ]
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name not in results[0][0]:
                    continue
                mean = sum(g[name] for g, _ in results) / len(tasks)
                if p.grad is None:
                    p.grad = mean
                else:
                    p.grad.add_(mean)
        return torch.stack([loss for _, loss in results]).mean()

    def adapt(self, task: Task) -> nn.Module:
        """A copy of the model holding the student φ_K after K inner steps on ``task``."""
        problem = Problem.read(self.model, task, self._adapt)
        with preserved(self.model):
            phi, buffers = problem.student(self.steps, self.inner_lr, self.inner_optimizer)
        student = copy.deepcopy(self.model)
        with torch.no_grad():
            for name, value in phi.items():
                student.get_parameter(name).copy_(value)
            for name, value in buffers.items():
                student.get_buffer(name).copy_(value)
        for p in student.parameters():
            p.grad = None
        return student
