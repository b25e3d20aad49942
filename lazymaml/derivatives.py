"""One task's losses and their derivatives: what every estimator is written from, once.

For a read model (a :class:`~gradcheck.student.Student`: θ, the untrained tensors, A) and a task,
an :class:`Objective` gives, at any point φ (every trainable name) with the untrained tensors u:

* ``support`` / ``query``: L_S(φ), L_Q(φ);
* ``support_gradient``: E_A ∇L_S(φ) and L_S(φ);
* ``query_gradient``: v = ∇L_Q(φ) for every trainable parameter, and L_Q(φ);
* ``hvp``: ∇_φ ⟨E_A ∇L_S(φ), w⟩ = ∇²L_S(φ) E_Aᵀ w for every trainable parameter — so parameters
  outside A (the ANIL body) receive their mixed second-derivative term; ``hvps``: the same for
  many w at one point, the first derivative computed once;
* ``differentiate``: the gradient of a function of θ (an unrolled inner loop), with its value;
* ``descend``: steps of the inner optimizer (:meth:`gradcheck.settings.InnerLoop.update`),
  optionally proximal (the gradient of L_S(φ) + (λ/2)‖φ_A − φ_0,A‖²). Differentiable exactly
  inside ``differentiate`` with a pure update; anywhere else it keeps no graph, so memory does
  not grow with K.

An estimator (:mod:`lazymaml.estimators`) is one function of an Objective, θ and u. Two
backends compute these derivatives, and nothing else differs:

* :class:`AutogradObjective` — ordinary autograd, the sequential path: every module and forward
  works (also one that writes tensors through ``.data``), and saved-tensor hooks see the graph,
  so :class:`gradcheck.memory.SavedTensorMeter` measures it (``torch.func`` transforms refuse
  both);
* :class:`FuncObjective` — ``torch.func`` transforms, for the batched path, which is
  ``torch.func.vmap`` of the very same estimator function; :class:`OutsideObjective` is the same
  but for :meth:`~Objective.differentiate`, whose gradient it leaves to one ordinary autograd
  backward after the ``vmap`` (the batched path's outside layout, where
  :func:`lazymaml.batched.why_inside` vouches for it).

The untrained tensors are passed along as arguments, so a forward that updates them in place
(BatchNorm running statistics) updates the caller's copies; Hessian-vector products work on
fresh clones. With ``checked`` each loss is checked (finite, scalar) and named in errors; under
``vmap`` — where a check would branch on data — the caller checks the results instead.

:func:`query_gradient` and :func:`hvp` are the same derivatives as plain functions;
:func:`support_gradient` builds E_A ∇L_S with an autograd graph on the caller's own tensors, for
:func:`lazymaml.straight_through` and the bound's dense Hessians.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vjp

from gradcheck.parameters import dense
from gradcheck.settings import InnerLoop
from gradcheck.student import QUERY_LOSS, Student, checked_loss, query_loss_at, support_loss_at
from gradcheck.task import TaskLike

__all__ = [
    "DEFERRED",
    "SUPPORT_AT_THETA",
    "AutogradObjective",
    "FuncObjective",
    "Objective",
    "OutsideObjective",
    "Params",
    "hvp",
    "query_gradient",
    "support_gradient",
]

Params = dict[str, Tensor]
Differentiable = Callable[[Params, Params], tuple[Tensor, Any]]
"""``fn(theta, untrained) -> (scalar, aux)``: what :meth:`Objective.differentiate` differentiates."""
Visit = Callable[[int, Params, Params], None]
"""``visit(k, φ_{k+1}, g_k)``: called by :meth:`Objective.descend` after inner step k with the new
point and the gradient the step took."""
Products = Callable[..., Params]
"""``product(w, last=False)``: one Hessian-vector product (see :meth:`Objective.hvps`)."""
SUPPORT_AT_THETA = "support loss L_S(θ) of the Hessian-vector product"
DEFERRED = ""
"""The one key of :class:`OutsideObjective`'s deferred gradient (no parameter is named "")."""


def _clones(tensors: Mapping[str, Tensor]) -> Params:
    return {n: t.clone() for n, t in tensors.items()}


class Objective:
    """One task's losses and derivatives for a read model; a backend supplies the derivatives."""

    def __init__(
        self, student: Student, task: TaskLike, loop: InnerLoop | None = None, checked: bool = True
    ) -> None:
        self.student, self.task, self.loop, self.checked = student, task, loop, checked
        self.adapted = student.adapted

    def _check(self, loss: Tensor, what: str) -> Tensor:
        return checked_loss(loss, what) if self.checked else loss

    def _model(self, point: Mapping[str, Tensor], untrained: Params, index: int) -> Callable[..., Any]:
        """The model at ``point``, told the step ``index`` where ``loop.step_kwarg`` asks for it."""
        f = self.student.at(point, untrained)
        return self.loop.indexed(f, index) if self.loop is not None else f

    def support(self, point: Mapping[str, Tensor], untrained: Params, k: int | None = None) -> Tensor:
        """L_S(point) of inner step ``k`` (the model sees index k); None: the support loss at θ,
        which is step 0's (index 0)."""
        what = SUPPORT_AT_THETA if k is None else support_loss_at(k, self.loop.steps if self.loop else k + 1)
        model = self._model(point, untrained, 0 if k is None else k)
        return self._check(self.task.support_loss(model), what)

    def query(self, point: Mapping[str, Tensor], untrained: Params, k: int | None = None) -> Tensor:
        """L_Q(point) scored at φ_k (None: k = K, the final query); the model sees index
        max(k − 1, 0): the step that led to φ_k."""
        k = (self.loop.steps if self.loop is not None else 0) if k is None else k
        what = query_loss_at(k, self.loop) if self.loop is not None else QUERY_LOSS
        return self._check(self.task.query_loss(self._model(point, untrained, max(k - 1, 0))), what)

    def support_gradient(
        self, point: Mapping[str, Tensor], untrained: Params, k: int | None = None
    ) -> tuple[Params, Tensor]:
        """E_A ∇L_S(point) (the adapted names) and L_S(point)."""
        raise NotImplementedError

    def query_gradient(
        self, point: Mapping[str, Tensor], untrained: Params, k: int | None = None
    ) -> tuple[Params, Tensor]:
        """v = ∇L_Q(point) for every trainable name, and L_Q(point) (scored at φ_k: :meth:`query`)."""
        raise NotImplementedError

    def hvps(self, point: Mapping[str, Tensor], untrained: Params) -> Products:
        """w ↦ ∇_φ ⟨E_A ∇L_S(φ), w⟩ at φ = ``point`` for every trainable name, E_A ∇L_S computed once."""
        raise NotImplementedError

    def differentiate(
        self, fn: Differentiable, theta: Params, untrained: Params
    ) -> tuple[Params, Tensor, Any]:
        """(∇_θ fn(θ, u)[0] for every name of θ, the value, the aux output)."""
        raise NotImplementedError

    def hvp(self, point: Mapping[str, Tensor], untrained: Params, w: Mapping[str, Tensor]) -> Params:
        """∇_φ ⟨E_A ∇L_S(φ), w⟩ at φ = ``point``, for every trainable name."""
        return self.hvps(point, untrained)(w, last=True)

    def descend(
        self,
        point: Mapping[str, Tensor],
        untrained: Params,
        steps: int,
        first: int = 0,
        proximal: float = 0.0,
        rates: Mapping[str, Tensor] | None = None,
        visit: Visit | None = None,
    ) -> tuple[Params, list[Tensor]]:
        """``steps`` inner steps from ``point`` (numbered from ``first``), and their support losses.

        With learned rates (the student's schedule) each step is φ_{k+1} = φ_k − α_k ⊙ g_k, the
        rates read from ``rates`` (by their meta-gradient keys) or ``point`` (a rate that is a
        parameter of the model) where given there — so differentiable in them — else the
        student's copies. ``visit`` is called after every step (:data:`Visit`)."""
        assert self.loop is not None, "descend needs the inner loop's settings"
        schedule = self.student.schedule
        update = None if schedule is not None else self.loop.update()
        phi, losses = dict(point), []
        state = update.init({n: phi[n] for n in self.adapted}) if update is not None else None
        for k in range(first, first + steps):
            g, loss = self.support_gradient(phi, untrained, k)
            if proximal:
                g = {n: g[n] + proximal * (phi[n] - point[n]) for n in g}
            if schedule is None:
                assert update is not None
                phi, state = update.step(phi, g, state)
            else:
                phi = schedule.step(phi, g, k, {**phi, **(rates or {})})
            losses.append(loss)
            if visit is not None:
                visit(k, phi, g)
        return phi, losses


class AutogradObjective(Objective):
    """The derivatives by ordinary autograd (the sequential path). A point whose tensors require
    grad is being differentiated (inside :meth:`differentiate`): its support gradients then keep
    their graph (``create_graph``); any other point is differentiated on detached leaves."""

    def support_gradient(
        self, point: Mapping[str, Tensor], untrained: Params, k: int | None = None
    ) -> tuple[Params, Tensor]:
        differentiated = any(point[n].requires_grad for n in self.adapted)
        if not differentiated:
            point = {**point, **{n: point[n].detach().requires_grad_(True) for n in self.adapted}}
        with torch.enable_grad():
            loss = self.support(point, untrained, k)
            adapted = {n: point[n] for n in self.adapted}
            grads = torch.autograd.grad(
                loss, list(adapted.values()), create_graph=differentiated, allow_unused=True
            )
        return dense(adapted, grads), loss if differentiated else loss.detach()

    def query_gradient(
        self, point: Mapping[str, Tensor], untrained: Params, k: int | None = None
    ) -> tuple[Params, Tensor]:
        leaves = {n: point[n].detach().requires_grad_(True) for n in self.student.theta}
        with torch.enable_grad():
            loss = self.query(leaves, untrained, k)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return dense(leaves, grads), loss.detach()

    def hvps(self, point: Mapping[str, Tensor], untrained: Params) -> Products:
        leaves = {n: point[n].detach().requires_grad_(True) for n in self.student.theta}
        with torch.enable_grad():
            g, _ = self.support_gradient(leaves, _clones(untrained))
        pairs = [(n, g[n]) for n in self.adapted if g[n].requires_grad]

        def product(w: Mapping[str, Tensor], last: bool = False) -> Params:
            if not pairs:  # L_S is at most linear in A: the Hessian block is zero
                return {n: torch.zeros_like(t) for n, t in leaves.items()}
            with torch.enable_grad():
                dot = torch.stack([(gn * w[n]).sum() for n, gn in pairs]).sum()
                grads = torch.autograd.grad(
                    dot, list(leaves.values()), retain_graph=not last, allow_unused=True
                )
            return dense(leaves, grads)

        return product

    def differentiate(
        self, fn: Differentiable, theta: Params, untrained: Params
    ) -> tuple[Params, Tensor, Any]:
        leaves = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
        with torch.enable_grad():
            value, aux = fn(leaves, untrained)
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        detach = lambda x: x.detach() if isinstance(x, Tensor) else x  # noqa: E731
        return dense(leaves, grads), value.detach(), torch.utils._pytree.tree_map(detach, aux)


class FuncObjective(Objective):
    """The derivatives by ``torch.func`` transforms (the batched path, under ``vmap``)."""

    def support_gradient(
        self, point: Mapping[str, Tensor], untrained: Params, k: int | None = None
    ) -> tuple[Params, Tensor]:
        def of_adapted(adapted: Params, untrained: Params) -> Tensor:
            return self.support({**point, **adapted}, untrained, k)

        return grad_and_value(of_adapted)({n: point[n] for n in self.adapted}, untrained)

    def query_gradient(
        self, point: Mapping[str, Tensor], untrained: Params, k: int | None = None
    ) -> tuple[Params, Tensor]:
        return grad_and_value(self.query)(dict(point), untrained, k)

    def _along(self, point: Params, untrained: Params, w: Mapping[str, Tensor]) -> Tensor:
        g, _ = self.support_gradient(point, _clones(untrained))
        return torch.stack([(g[n] * w[n]).sum() for n in self.adapted]).sum()

    def hvp(self, point: Mapping[str, Tensor], untrained: Params, w: Mapping[str, Tensor]) -> Params:
        return grad(self._along)(dict(point), untrained, w)

    def hvps(self, point: Mapping[str, Tensor], untrained: Params) -> Products:
        def gradient(p: Params) -> Params:
            return self.support_gradient(p, _clones(untrained))[0]

        pullback = vjp(gradient, dict(point))[1]
        return lambda w, last=False: pullback({n: w[n] for n in self.adapted})[0]

    def differentiate(
        self, fn: Differentiable, theta: Params, untrained: Params
    ) -> tuple[Params, Tensor, Any]:
        g, (value, aux) = grad_and_value(fn, has_aux=True)(theta, untrained)
        return g, value, aux


class OutsideObjective(FuncObjective):
    """:class:`FuncObjective` whose :meth:`differentiate` defers the gradient to ordinary autograd
    after the ``vmap``: the batched path's outside layout (:mod:`lazymaml.batched`).

    ``fn`` is evaluated at ``leaves`` — θ as tensors that require grad, made outside the vmap —
    and the "gradient" returned is ``{DEFERRED: value}``, the value with its autograd graph; the
    batched path sums those values over the tasks and differentiates the sum once. The inner
    loop inside ``fn`` takes its gradients with ``torch.func`` as in :class:`FuncObjective`, and
    those are differentiable by the outer autograd (what ``create_graph=True`` is to
    ``torch.autograd.grad``). Everything outside ``differentiate`` sees the detached θ the vmap
    was given, so nothing else carries a graph. Only θ itself is differentiated this way:
    ``theta`` must be the tensors the vmap was given (``detached``). The entry must return the
    deferred gradient as it is (:attr:`lazymaml.estimators.Estimator.outside`) — a linear map
    of it (a scale) stays exact, being the same map of the value, and reading a parameter's
    name from it raises ``KeyError``; a result without it is refused by the batched path."""

    def __init__(
        self, student: Student, task: TaskLike, loop: InnerLoop, detached: Params, leaves: Params
    ) -> None:
        super().__init__(student, task, loop, checked=False)
        self.detached, self.leaves = detached, leaves

    def differentiate(
        self, fn: Differentiable, theta: Params, untrained: Params
    ) -> tuple[Params, Tensor, Any]:
        if theta.keys() != self.detached.keys() or any(theta[n] is not t for n, t in self.detached.items()):
            raise ValueError("the outside layout differentiates with respect to θ only")
        value, aux = fn(self.leaves, untrained)
        return {DEFERRED: value}, value, aux


def query_gradient(
    student: Student, task: TaskLike, point: Mapping[str, Tensor], untrained: Params
) -> tuple[Params, Tensor]:
    """v = ∇L_Q(φ) for every trainable parameter (zeros where L_Q does not read it), and L_Q(φ)."""
    return AutogradObjective(student, task).query_gradient(point, untrained)


def hvp(
    student: Student,
    task: TaskLike,
    point: Mapping[str, Tensor],
    vector: Mapping[str, Tensor],
    untrained: Params | None = None,
) -> Params:
    """∇_θ ⟨E_A ∇L_S(θ), u⟩ at θ = ``point`` for every trainable parameter (u = ``vector``)."""
    return AutogradObjective(student, task).hvp(
        point, student.fresh() if untrained is None else untrained, vector
    )


@torch.enable_grad()
def support_gradient(
    student: Student,
    task: TaskLike,
    point: Mapping[str, Tensor],
    untrained: Mapping[str, Tensor],
    what: str = SUPPORT_AT_THETA,
) -> list[Tensor | None]:
    """E_A ∇L_S at ``point`` with an autograd graph kept (``create_graph=True``), one entry per
    adapted name. ``point`` must hold tensors that require grad: the second derivative flows back
    to them. ``what`` names the loss in error messages."""
    loss = checked_loss(task.support_loss(student.at(point, untrained)), what)
    adapted = [point[n] for n in student.adapted]
    return list(torch.autograd.grad(loss, adapted, create_graph=True, allow_unused=True))
