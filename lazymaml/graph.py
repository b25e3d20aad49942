"""The straight-through leap: the lazy meta-gradient as a graph, for a query loss computed once.

With g(θ) = E_A ∇L_S(θ) built with ``create_graph=True`` and sg = stop-gradient (detach),

    ψ(θ) = θ − sg(θ − φ_T) − η (g(θ) − sg(g(θ)))

has value φ_T (up to rounding) and Jacobian I − η E_A ∇²L_S(θ): backpropagating any L_Q(ψ)
gives (I − η E_A ∇²L_S(θ))ᵀ ∇L_Q(φ_T) — the lazy meta-gradient — with no backward hooks and
no fudged graph. For η > 0 it is ψ = θ − η(g − sg(g) + d) with the constant d = sg(θ − φ_T)/η;
the form above also covers η = 0 (docs/mathematics.md).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from gradcheck.parameters import Adapt, Functional
from gradcheck.settings import InnerLoop, InnerOptimizer, JacobianStep
from gradcheck.state import preserved
from gradcheck.student import Student
from gradcheck.task import TaskLike

from .derivatives import support_gradient

__all__ = ["straight_through"]


def straight_through(
    model: nn.Module,
    task: TaskLike,
    steps: int,
    inner_lr: float,
    *,
    adapt: Adapt = None,
    leap: float = 1.0,
    jacobian_step: JacobianStep = "single",
    inner_optimizer: InnerOptimizer = "sgd",
    teacher: Mapping[str, Tensor] | None = None,
) -> Functional:
    """The model at ψ(θ): the teacher's values with the one-step Jacobian, ready for the query loss.

    ``task.query_loss(straight_through(model, task, K, α)).backward()`` accumulates the lazy
    meta-gradient into the model's ``p.grad``: ψ is built from the model's own trainable
    parameters. The student runs K graph-free steps to find φ_T, unless ``teacher`` gives φ_T
    (every trainable name) from elsewhere; the returned callable holds the non-trainable tensors
    (BatchNorm statistics) as the student left them, or as read when ``teacher`` is given.
    """
    loop = InnerLoop(steps, inner_lr, leap, inner_optimizer, jacobian_step=jacobian_step)
    eta = loop.eta
    student = Student.read(model, adapt)
    theta = {n: p for n, p in model.named_parameters() if n in student.theta}
    with preserved(model):
        if teacher is None:
            teacher, untrained = student.teacher(task, loop)
        else:
            untrained = student.fresh()
        missing = [n for n in theta if n not in teacher]
        if missing:
            raise ValueError(f"teacher must hold every trainable parameter; missing {missing}")
        grads = dict(zip(student.adapted, support_gradient(student, task, theta, student.fresh())))
    psi = {}
    for n, t in theta.items():
        psi[n] = t - (t - teacher[n]).detach()
        g = grads.get(n)
        if g is not None:
            psi[n] = psi[n] - eta * (g - g.detach())
    return Functional(model, untrained, psi)
