"""Inner learning rates: one α, or learned ones (Meta-SGD, MAML++'s LSLR, a learned scalar α).

With plain SGD the inner step is, for every adapted parameter n,

    φ_{k+1}[n] = φ_k[n] − α_k[n] ⊙ ∇_n L_S(φ_k)

where α_k[n] is ``inner_lr`` given as

* a float (fixed, the same everywhere), or a 0-dim tensor (one α shared by every entry);
* a mapping {adapted parameter name → tensor} whose tensor has shape ``()`` (per parameter),
  the parameter's shape (per entry: Meta-SGD), or — with ``per_step_lr=True`` — a leading step
  dimension S (index k at step k; S = K, or K + 1 as MAML++'s LSLR keeps them): shape ``(S,)``
  per parameter and step, ``(S, *shape)`` per entry and step. A 0-dim or ``(S,)`` tensor may
  also be given alone, for every adapted parameter.

**Learned rates are coordinates.** A rate tensor that requires grad is a coordinate of the
meta-objective F(θ, α), differentiated and finite-differenced like a parameter. Its
meta-gradient is reported under its own name when it is a parameter of the model (learn2learn's
``MetaSGD`` keeps its ``lrs`` there; such a parameter is never adapted), otherwise under
``"inner_lr"`` (one tensor given alone) or ``"inner_lr.<name>"``. By the chain rule through the
step above,

    ∂F/∂α_k[n] = −λ_{k+1}[n] ⊙ g_k[n],     λ_{k+1} = ∂F/∂φ_{k+1} (the adjoint),  g_k = ∇L_S(φ_k),

summed over the entries and steps a rate is shared by (a scalar: over all of them; a per-layer
rate: over the layer's entries; a rate without a step dimension: over the K steps). First-order
MAML gives the same expression with g_k a constant (then λ_{k+1} is the sum of the query
gradients scored after step k). docs/mathematics.md derives it.

**Refused** (naming the rate): a non-floating, non-finite or negative rate; one of another dtype
or device than its parameter; a shape other than the above, or S ∉ {K, K + 1}; a mapping that
misses an adapted parameter or names one not adapted; a model-owned rate named in ``adapt``; a
learned rate computed from a trainable parameter of the model (``log_lr.exp()`` with ``log_lr``
in the model: autograd would carry ∂F/∂α into ∂F/∂log_lr, finite differences would not); one
learned external tensor given to several parameters (each key would be a coordinate of its own,
while autograd differentiates the one tensor: make it a model parameter, or give it alone).
:class:`gradcheck.settings.InnerLoop` refuses rates with any inner optimizer but plain SGD.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .parameters import PRESETS, Adapt, resolve_adapt, trainable

__all__ = ["RATE_KEY", "Rates", "Schedule", "coordinates"]

RATE_KEY = "inner_lr"
"""The meta-gradient key of a learned rate that is not a parameter of the model: ``"inner_lr"``
for one tensor given alone, ``"inner_lr.<name>"`` for the rate of parameter ``name``."""


def _check_tensor(where: str, t: object, per_step: bool) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{where} must be a float, a tensor or a mapping of tensors, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{where} must be a floating-point tensor, got {t.dtype}")
    if per_step and t.ndim == 0:
        raise ValueError(f"{where} has no step dimension, but per_step_lr=True: give it shape (steps, ...)")
    with torch.no_grad():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where} must be finite")
        if bool((t < 0).any()):
            raise ValueError(
                f"{where} has a negative rate (min {t.min().item():g}); inner rates must be >= 0"
            )
    return t


@dataclass(frozen=True, eq=False)
class Rates:
    """Learned inner rates as given (validated entrywise): ``tensors`` maps a parameter name to its
    rate, or ``""`` to one rate for every adapted parameter; ``per_step`` says the leading
    dimension indexes the step. Compared by identity: two settings objects share rates only
    when they hold the same object."""

    tensors: Mapping[str, Tensor]
    per_step: bool = False
    given: object = None  # inner_lr as the caller gave it: what a candidate is called with

    @classmethod
    def of(cls, given: object, per_step: bool) -> Rates:
        """``inner_lr`` given as a tensor or a mapping, validated (module docstring)."""
        if isinstance(given, Rates):  # settings validated again (InnerLoop.replace)
            return given if given.per_step == per_step else cls.of(given.given, per_step)
        if isinstance(given, Tensor):
            return cls({"": _check_tensor("inner_lr", given, per_step)}, per_step, given)
        if isinstance(given, (Mapping, nn.ParameterDict)):
            tensors: dict[str, Tensor] = {}
            for name, t in given.items():
                if not isinstance(name, str) or not name:
                    raise TypeError(f"inner_lr's keys must be parameter names, got {name!r}")
                tensors[name] = _check_tensor(f"inner_lr[{name!r}]", t, per_step)
            if not tensors:
                raise ValueError("inner_lr is an empty mapping: give a rate for every adapted parameter")
            return cls(tensors, per_step, given)
        raise TypeError(f"inner_lr must be a finite real number, a tensor or a mapping, got {given!r}")

    def owned(self, model: nn.Module) -> dict[str, str]:
        """{adapted name or "": the model's name for its rate} for rates that are trainable
        parameters of ``model``."""
        names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        return {k: names[id(t)] for k, t in self.tensors.items() if id(t) in names}

    def resolve(self, model: nn.Module, adapted: tuple[str, ...], steps: int) -> Schedule:
        """The rate of every adapted parameter, checked against ``model`` (names, shapes, dtype,
        device) and the number of steps, with the meta-gradient key of each learned rate."""
        params = dict(model.named_parameters())
        owned = self.owned(model)
        shared = "" in self.tensors
        if shared and len(self.tensors) > 1:
            raise ValueError("inner_lr mixes one rate for all with rates per parameter")
        if not shared:
            unknown = sorted(set(self.tensors) - set(adapted))
            if unknown:
                raise ValueError(
                    f"inner_lr has rates for {unknown}, which the inner loop does not adapt; "
                    f"adapted: {list(adapted)}"
                )
            missing = [n for n in adapted if n not in self.tensors]
            if missing:
                raise ValueError(f"inner_lr has no rate for adapted parameters {missing}")
        shared_by: dict[int, list[str]] = {}
        for name, t in self.tensors.items():
            if t.requires_grad and name not in owned:
                shared_by.setdefault(id(t), []).append(name)
        reused = [names for names in shared_by.values() if len(names) > 1]
        if reused:
            raise ValueError(
                f"inner_lr gives one learned tensor to the parameters {reused[0]}: each key would be a "
                "coordinate of its own; give each parameter its own tensor, one tensor alone for all, "
                "or make the shared rate a parameter of the model"
            )
        _refuse_computed_from(self.tensors, owned, model)
        rates: dict[str, Tensor] = {}
        keys: dict[str, str] = {}
        for name in adapted:
            given = "" if shared else name
            t = self.tensors[given]
            where = "inner_lr" if shared else f"inner_lr[{name!r}]"
            p = params[name]
            shape = tuple(t.shape[1:] if self.per_step else t.shape)
            if self.per_step and t.shape[0] not in (steps, steps + 1):
                raise ValueError(
                    f"{where} has {t.shape[0]} steps in its leading dimension; the inner loop runs "
                    f"{steps} (give {steps}, or {steps + 1} as MAML++ keeps them)"
                )
            if shape not in ((), tuple(p.shape)) or (shared and shape != ()):
                allowed = "()" if shared else f"() or the parameter's {tuple(p.shape)}"
                lead = "(steps, ) + " if self.per_step else ""
                raise ValueError(f"{where} has shape {tuple(t.shape)}; expected {lead}{allowed}")
            if t.dtype != p.dtype or t.device != p.device:
                raise ValueError(
                    f"{where} is {t.dtype} on {t.device}, its parameter {name!r} {p.dtype} on {p.device}"
                )
            rates[name] = t
            if given in owned:
                keys[name] = owned[given]
            elif t.requires_grad:
                keys[name] = RATE_KEY if shared else f"{RATE_KEY}.{name}"
        return Schedule(rates, keys, self.per_step)


def _leaves(t: Tensor) -> list[Tensor]:
    """The leaf tensors the autograd graph of ``t`` reaches (``t`` itself when it is a leaf)."""
    if t.grad_fn is None:
        return [t]
    found: list[Tensor] = []
    stack: list[object] = [t.grad_fn]
    seen: set[object] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if isinstance(variable, Tensor):
            found.append(variable)
        stack.extend(n for n, _ in getattr(node, "next_functions", ()))
    return found


def _refuse_computed_from(tensors: Mapping[str, Tensor], owned: Mapping[str, str], model: nn.Module) -> None:
    """Refuse a learned rate computed from a trainable parameter of ``model`` (``exp(log_lr)``
    with ``log_lr`` in the model): F(θ, α) takes α as a coordinate of its own, so ∂F/∂θ would be
    the partial derivative for finite differences but also carry the path through α for autograd."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    for key, t in tensors.items():
        if not t.requires_grad or key in owned or t.is_leaf:
            continue
        sources = sorted({names[id(v)] for v in _leaves(t) if id(v) in names})
        if sources:
            where = "inner_lr" if key == "" else f"inner_lr[{key!r}]"
            raise ValueError(
                f"{where} is computed from the model's parameters {sources}: a learned rate is a "
                "coordinate of the meta-objective of its own; give the tensor the rate is computed "
                "from outside the model (its gradient is then the rate's, under its inner_lr key), "
                "or make the rate itself a parameter of the model"
            )


@dataclass(frozen=True, eq=False)
class Schedule:
    """The inner rates resolved against a model: ``rates[n]`` the rate tensor of adapted parameter
    n (several names may share one), ``keys[n]`` the meta-gradient key of a learned one."""

    rates: Mapping[str, Tensor]
    keys: Mapping[str, str]
    per_step: bool

    def coordinates(self, theta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The learned rates that are not parameters in ``theta``: key → tensor (each once)."""
        return {k: self.rates[n] for n, k in self.keys.items() if k not in theta}

    def rate(self, name: str, k: int, values: Mapping[str, Tensor] | None = None) -> Tensor:
        """α_k[name]; a learned rate read from ``values`` (by its key) where it is given there."""
        key = self.keys.get(name)
        t = values[key] if values is not None and key is not None and key in values else self.rates[name]
        return t[k] if self.per_step else t

    def step(
        self,
        phi: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        k: int,
        values: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """φ_{k+1} = φ_k − α_k ⊙ g_k for the names in ``grads`` (differentiable in all three)."""
        return {n: t - self.rate(n, k, values) * grads[n] if n in grads else t for n, t in phi.items()}

    def cast(self, dtype: torch.dtype | None) -> Schedule:
        """Detached copies of the rates (in ``dtype`` if given), for a graph-free student."""
        copies: dict[int, Tensor] = {}
        for t in self.rates.values():
            copies.setdefault(id(t), t.detach().to(dtype=dtype, copy=True))
        return Schedule({n: copies[id(t)] for n, t in self.rates.items()}, self.keys, self.per_step)


def coordinates(
    model: nn.Module, adapt: Adapt, inner_lr: float | Rates, steps: int
) -> tuple[dict[str, Tensor], tuple[str, ...], Schedule | None]:
    """What the meta-objective is a function of: θ (the trainable parameters) followed by the
    learned rates that are not parameters of the model, keyed as the meta-gradient is; the
    adapted names (a rate is never adapted: ``adapt=None`` and the presets ``"head"``/``"body"``
    leave the model's rate parameters out, names that include one are refused); and the resolved
    rates (None for one float α)."""
    theta: dict[str, Tensor] = dict(trainable(model))
    if not isinstance(inner_lr, Rates):
        return theta, resolve_adapt(model, adapt, among=theta), None
    owned = set(inner_lr.owned(model).values())
    presets = adapt is None or (isinstance(adapt, str) and adapt in PRESETS)
    adapted = resolve_adapt(model, adapt, exclude=owned if presets else (), among=theta)
    if owned & set(adapted):
        raise ValueError(
            f"parameters {sorted(owned & set(adapted))} are inner learning rates: exclude them from adapt"
        )
    schedule = inner_lr.resolve(model, adapted, steps)
    return {**theta, **schedule.coordinates(theta)}, adapted, schedule
