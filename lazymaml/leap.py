"""The straight-through leap: the lazy meta-gradient as a graph, for a query loss computed once.

With g(θ) = E_A ∇L_S(θ) built with ``create_graph=True`` and sg = stop-gradient (detach),

    ψ(θ) = θ − sg(θ − φ_T) − η (g(θ) − sg(g(θ)))

has value φ_T (up to rounding) and Jacobian I − η E_A ∇²L_S(θ): backpropagating any L_Q(ψ)
gives (I − η E_A ∇²L_S(θ))ᵀ ∇L_Q(φ_T) — the lazy meta-gradient — with no backward hooks and
no fudged graph. Equivalent to SPEC's ψ = θ − η(g − sg(g) + d), d = sg(θ − φ_T)/η.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from gradcheck.inner_loop import Problem
from gradcheck.parameters import Adapt
from gradcheck.task import Task

from .derivatives import support_gradient


def straight_through(
    model: nn.Module,
    task: Task,
    theta: Mapping[str, Tensor],
    teacher: Mapping[str, Tensor],
    step_size: float,
    adapt: Adapt = None,
) -> dict[str, Tensor]:
    """ψ(θ): parameters with the teacher's values and the one-step Jacobian, for ``functional_call``.

    ``theta``: the trainable parameters the gradient should reach, by name (e.g.
    ``dict(model.named_parameters())``, so that ``.backward()`` fills ``p.grad``);
    ``teacher``: φ_T for the same names; ``step_size``: η (γα reproduces MAML at K = 1).
    Only the task's support loss is used, evaluated at θ on copies of the model's buffers.
    """
    problem = Problem.read(model, task, adapt)
    missing = [n for n in problem.trainable if n not in theta or n not in teacher]
    if missing:
        raise ValueError(f"theta and teacher must hold every trainable parameter; missing {missing}")
    grads = dict(zip(problem.adapted, support_gradient(problem, theta, problem.fresh_buffers())))
    psi = {}
    for n in problem.trainable:
        psi[n] = theta[n] - (theta[n] - teacher[n]).detach()
        g = grads.get(n)
        if g is not None:
            psi[n] = psi[n] - step_size * (g - g.detach())
    return psi
