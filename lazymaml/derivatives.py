"""The two derivatives every estimator here is built from, each one backward pass (or two).

* :func:`query_gradient`: v = ∇L_Q(φ) at a point φ (the teacher, the student, …);
* :func:`hvp`: ∇_θ ⟨E_A ∇L_S(θ), u⟩ = ∇²L_S(θ) E_Aᵀ u, a Hessian-vector product of the support
  loss whose *output* covers every trainable parameter — so parameters outside A (the ANIL
  body) receive their mixed second-derivative term.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from gradcheck.parameters import dense
from gradcheck.student import QUERY_LOSS, Student, checked_loss
from gradcheck.task import TaskLike

__all__ = ["hessian_vector_products", "hvp", "query_gradient", "support_gradient"]

SUPPORT_AT_THETA = "support loss L_S(θ) of the Hessian-vector product"


def _leaves(student: Student, point: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: point[n].detach().requires_grad_(True) for n in student.theta}


@torch.enable_grad()
def query_gradient(
    student: Student, task: TaskLike, point: Mapping[str, Tensor], frozen: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], Tensor]:
    """v = ∇L_Q(φ) for every trainable parameter (zeros where L_Q does not read it), and L_Q(φ)."""
    leaves = _leaves(student, point)
    loss = checked_loss(task.query_loss(student.at(leaves, frozen)), QUERY_LOSS)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return dense(leaves, grads), loss.detach()


@torch.enable_grad()
def support_gradient(
    student: Student,
    task: TaskLike,
    point: Mapping[str, Tensor],
    frozen: Mapping[str, Tensor],
    what: str = SUPPORT_AT_THETA,
) -> list[Tensor | None]:
    """E_A ∇L_S at ``point`` with its graph kept (``create_graph=True``), one entry per adapted name.

    ``point`` must hold tensors that require grad: the second derivative flows back to them.
    ``what`` names the loss in error messages.
    """
    loss = checked_loss(task.support_loss(student.at(point, frozen)), what)
    adapted = [point[n] for n in student.adapted]
    return list(torch.autograd.grad(loss, adapted, create_graph=True, allow_unused=True))


def hessian_vector_products(
    student: Student,
    task: TaskLike,
    point: Mapping[str, Tensor],
    frozen: Mapping[str, Tensor] | None = None,
) -> Callable[..., dict[str, Tensor]]:
    """u ↦ ∇_θ ⟨E_A ∇L_S(θ), u⟩ at θ = ``point`` for every trainable parameter.

    One forward and one first backward; the graph is kept until a product is asked for with
    ``last=True``, so each product costs one more backward (conjugate gradient asks many).
    """
    leaves = _leaves(student, point)
    grads = support_gradient(student, task, leaves, student.fresh() if frozen is None else frozen)
    pairs = [(n, g) for n, g in zip(student.adapted, grads) if g is not None and g.requires_grad]

    @torch.enable_grad()
    def product(vector: Mapping[str, Tensor], last: bool = False) -> dict[str, Tensor]:
        if not pairs:  # L_S is at most linear in A: the Hessian block is zero
            return {n: torch.zeros_like(t) for n, t in leaves.items()}
        dot = torch.stack([(g * vector[n]).sum() for n, g in pairs]).sum()
        grads = torch.autograd.grad(dot, list(leaves.values()), retain_graph=not last, allow_unused=True)
        return dense(leaves, grads)

    return product


def hvp(
    student: Student,
    task: TaskLike,
    point: Mapping[str, Tensor],
    vector: Mapping[str, Tensor],
    frozen: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """∇_θ ⟨E_A ∇L_S(θ), u⟩ at θ = ``point`` for every trainable parameter (u = ``vector``)."""
    return hessian_vector_products(student, task, point, frozen)(vector, last=True)
