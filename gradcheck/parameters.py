"""Which parameters are meta-learned (θ), which the inner loop adapts (A ⊆ θ), and a functional view.

θ is every parameter with ``requires_grad=True``, keyed as in ``model.named_parameters()``.
``adapt`` picks A:

* ``None`` — all of θ (MAML);
* ``"head"`` — the parameters of the last module that owns trainable parameters (ANIL);
* ``"body"`` — everything but the head (BOIL);

The head is resolved *by module*: a parameter belongs to it when the head module holds that
tensor under any name. An output layer whose weight is tied to the embedding
(``out.weight = emb.weight``) has that one tensor named ``emb.weight`` by ``named_parameters()``
(its first name); it is still the head's, so ``"head"`` adapts ``emb.weight`` and ``out.bias`` —
the tied tensor is one parameter and cannot be adapted as head and frozen as body at once.
* a parameter name or a module prefix (``"0"`` selects ``"0.weight"`` and ``"0.bias"``),
  or a list of them;
* a predicate ``name -> bool``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "PRESETS",
    "Adapt",
    "Functional",
    "copies",
    "dense",
    "flat",
    "resolve_adapt",
    "task_mean",
    "tied",
    "trainable",
    "unflat",
]

Adapt = None | str | Iterable[str] | Callable[[str], bool]
"""What the inner loop adapts: ``None`` (all), a preset, names or prefixes, or a predicate."""
PRESETS = ("head", "body")


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """θ: the parameters with ``requires_grad=True``, in ``named_parameters()`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters (none has requires_grad=True)")
    return params


def _head(model: nn.Module, names: Iterable[str]) -> list[str]:
    names = list(names)
    among = {id(model.get_parameter(n)) for n in names}
    owners = [
        prefix
        for prefix, module in model.named_modules()
        if any(id(p) in among for p in module.parameters(recurse=False))
    ]
    held = {id(p) for p in model.get_submodule(owners[-1])._parameters.values() if p is not None}
    return [n for n in names if id(model.get_parameter(n)) in held]


def _matches(name: str, key: str) -> bool:
    return name == key or name.startswith(key + ".")


def _by_names(keys: list[str], model: nn.Module, names: list[str]) -> list[str]:
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    unknown = [k for k in keys if not any(_matches(n, k) for n in names)]
    if unknown:
        not_trainable = [k for k in unknown if any(_matches(n, k) for n in frozen)]
        if not_trainable:
            raise ValueError(f"adapt names parameters that are not trainable: {not_trainable}")
        raise ValueError(f"adapt names unknown parameters {unknown}; trainable parameters: {names}")
    return [n for n in names if any(_matches(n, k) for k in keys)]


def resolve_adapt(
    model: nn.Module, adapt: Adapt, exclude: Iterable[str] = (), among: Iterable[str] | None = None
) -> tuple[str, ...]:
    """A, the names of the parameters the inner loop updates, in ``named_parameters()`` order,
    chosen among the trainable parameters not in ``exclude`` (a model's learned inner rates: the
    presets' head is then the last module holding a parameter that is not a rate). ``among``: the
    trainable names, where the caller has them (:func:`trainable`'s keys)."""
    left_out = set(exclude)
    names = [n for n in (trainable(model) if among is None else among) if n not in left_out]
    if adapt is None:
        return tuple(names)
    if isinstance(adapt, str) and adapt in PRESETS:
        head = _head(model, names)
        chosen = head if adapt == "head" else [n for n in names if n not in head]
        literal = [n for n in names if _matches(n, adapt)]
        if literal and literal != chosen:
            raise ValueError(
                f"adapt={adapt!r} is ambiguous: the preset selects {chosen} but the model also "
                f"has parameters named {adapt!r}... ({literal}); pass a list ([{adapt!r}]) for "
                "the names, or the names of the preset's parameters explicitly"
            )
        selected = chosen
    elif isinstance(adapt, str):
        selected = _by_names([adapt], model, names)
    elif callable(adapt):
        selected = [n for n in names if adapt(n)]
    else:
        keys = list(adapt)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError(f"adapt must be None, a preset, names, prefixes or a predicate; got {adapt!r}")
        selected = _by_names(keys, model, names)
    if not selected:
        raise ValueError(f"adapt={adapt!r} selects no trainable parameter; trainable: {names}")
    return tuple(selected)


def copies(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Copies of every parameter and every buffer, detached, floating ones cast to ``dtype``.

    Always copies, never views: a forward that writes its tensors in place (BatchNorm running
    statistics, statistics kept as frozen parameters) then writes the copies, never the model.
    """

    def copy(t: Tensor) -> Tensor:
        cast = dtype if dtype is not None and t.is_floating_point() else None
        return t.detach().to(dtype=cast, copy=True)

    params = {n: copy(p) for n, p in model.named_parameters()}
    buffers = {n: copy(b) for n, b in model.named_buffers()}
    return params, buffers


class _Carrying(nn.Module):
    """The model, returning with its output the buffers ``names`` as its forward left them."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        out = self.model(*args, **kwargs)
        return out, {n: self.model.get_buffer(n) for n in self.names}


class Functional:
    """The model evaluated at given tensors: ``Functional(model, params, buffers)(x)``.

    Later mappings override earlier ones; names not given are read from the model. Built on
    ``torch.func.functional_call``: the model's own tensors are never written.

    ``carry``: a mutable mapping (the untrained tensors of one run) into which a buffer that the
    forward *reassigns* (``self.count = self.count + 1``, not in place) is written back, so that
    it carries into the next call as an in-place update does; without it ``functional_call``
    would drop the new value when it restores the module.
    """

    def __init__(
        self,
        model: nn.Module,
        *tensors: Mapping[str, Tensor],
        carry: MutableMapping[str, Tensor] | None = None,
        buffer_names: Iterable[str] | None = None,
        ties: bool = True,
    ) -> None:
        """``tensors``: mappings name → tensor, later ones overriding earlier ones;
        ``buffer_names``: the model's buffers, where the caller knows them (else it is walked);
        ``ties``: whether the model may hold a tensor under two names (:func:`tied`) — False
        spares ``functional_call`` its walk for them at every call."""
        self.model, self.ties = model, ties
        self.tensors: dict[str, Tensor] = {}
        for mapping in tensors:
            self.tensors.update(mapping)
        self.carry = carry
        self.buffers: tuple[str, ...] = ()
        if carry is not None:
            names = (n for n, _ in model.named_buffers()) if buffer_names is None else buffer_names
            self.buffers = tuple(n for n in names if n in self.tensors)
        self.wrapper = _Carrying(model, self.buffers) if self.buffers else None
        self.given = {f"model.{n}": t for n, t in self.tensors.items()}  # the wrapper's names

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.wrapper is None:
            return torch.func.functional_call(self.model, self.tensors, args, kwargs, tie_weights=self.ties)
        given = (self.wrapper, self.given, (args, kwargs))
        out, after = torch.func.functional_call(*given, tie_weights=self.ties)
        for n, t in after.items():
            if t is not self.tensors[n] and isinstance(t, Tensor):  # reassigned, not written in place
                self.tensors[n] = self.given[f"model.{n}"] = t
                assert self.carry is not None
                self.carry[n] = t
        return out


def tied(model: nn.Module) -> bool:
    """Whether a tensor of ``model`` is registered under two names — a shared module, tied
    weights, a parameter also registered as a buffer: ``functional_call`` must then be told to
    set every name of it (it looks for ties among parameters and buffers together, as here)."""
    every = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return len({id(t) for _, t in every}) < len(every)


def dense(like: Mapping[str, Tensor], grads: Iterable[Tensor | None]) -> dict[str, Tensor]:
    """``{name: gradient}`` from ``torch.autograd.grad(..., allow_unused=True)`` output, with zeros
    (shaped like ``like[name]``) where the output did not depend on a tensor."""
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(like.items(), grads)}


def task_mean(gradients: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The mean over tasks of per-task gradients ``{name: tensor}`` (all with the same names)."""
    first = gradients[0]
    return {n: torch.stack([g[n] for g in gradients]).mean(0) for n in first}


def flat(tensors: Mapping[str, Tensor] | Iterable[Tensor]) -> Tensor:
    """One vector holding the given tensors in order."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return torch.cat([t.reshape(-1) for t in values])


def unflat(vector: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`flat`: split ``vector`` into tensors shaped like ``like``."""
    out: dict[str, Tensor] = {}
    i = 0
    for name, t in like.items():
        out[name] = vector[i : i + t.numel()].view_as(t)
        i += t.numel()
    return out
