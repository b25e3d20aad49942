"""What kind of model this is, for the checkers: what they refuse, what they must run differently,
and what they must say.

* :func:`refuse_unsupported` — models and calls no checker can judge correctly, refused with a
  message naming the cause and what to pass instead: a ``torch.compile``d module (pass
  ``model._orig_mod``), ``nn.DataParallel`` / ``DistributedDataParallel`` (pass ``model.module``),
  data whose floating dtype differs from the model's (both named), and ``torch.inference_mode()``.
* :func:`hooks` — the modules carrying forward, pre-forward or backward hooks (``torch.nn.utils.
  prune``, the hook-based ``weight_norm``/``spectral_norm``, a user's own). ``higher``'s patched
  copy of a model drops them, so the oracle differentiates such a model with its own unroll
  through ``torch.func.functional_call``, which runs them (:mod:`gradcheck.oracle`).
* :func:`random_modules` and :func:`common_random_numbers` — randomness. Every evaluation of the
  meta-objective (the reference on one task, one candidate call, one finite-difference evaluation)
  runs from the same seeded generator state, :data:`SEED`, inside ``torch.random.fork_rng``: the
  caller's generator state is left as it was, and a candidate that draws its random numbers in
  the same order as the reference — the support forward at each inner step, then the query
  forward — is compared like with like (the same Dropout masks).
* :func:`conventions` — modules whose autograd gradient is a convention rather than the
  derivative finite differences measure; the reports name them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .task import ClosureTask, TaskBatch, TaskLike

__all__ = [
    "SEED",
    "common_random_numbers",
    "conventions",
    "hooks",
    "random_modules",
    "refuse_unsupported",
]

SEED = 0
"""The seed every evaluation of the meta-objective starts from (:func:`common_random_numbers`)."""

_RANDOM = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.RReLU,
)


def _compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule"


def _data_dtypes(task: TaskLike | TaskBatch) -> list[tuple[str, torch.dtype]]:
    if isinstance(task, ClosureTask):
        return []
    parts = (
        ("support inputs", getattr(task, "support", (None, None))[0]),
        ("support targets", getattr(task, "support", (None, None))[1]),
        ("query inputs", getattr(task, "query", (None, None))[0]),
        ("query targets", getattr(task, "query", (None, None))[1]),
    )
    return [(what, t.dtype) for what, t in parts if isinstance(t, torch.Tensor) and t.is_floating_point()]


def refuse_unsupported(model: nn.Module, tasks: Sequence[TaskLike] | TaskBatch = (), *, by: str) -> None:
    """Raise, naming the cause, for a model or call that ``by`` cannot judge (module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{by}: inference mode forbids the meta-gradient (no autograd graph can be recorded "
            "inside torch.inference_mode()); call it outside the inference_mode block"
        )
    if _compiled(model):
        raise TypeError(
            f"{by}: the model is a torch.compile'd module (OptimizedModule), which cannot be "
            "differentiated through its inner loop functionally; pass the original module, "
            "model._orig_mod (it shares the parameters)"
        )
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(
            f"{by}: the model is wrapped in {type(model).__name__}; pass model.module (the wrapped "
            "model, which holds the parameters) — meta-gradients are computed on one device"
        )
    dtypes = sorted({p.dtype for p in model.parameters() if p.is_floating_point()}, key=str)
    if len(dtypes) != 1:
        return
    (dtype,) = dtypes
    # a batch's stacked tensors stand for all its tasks (stacking checked that their dtypes agree)
    every: list[TaskLike | TaskBatch] = [tasks] if isinstance(tasks, TaskBatch) else list(tasks)
    for i, task in enumerate(every):
        for what, data in _data_dtypes(task):
            if data != dtype:
                raise TypeError(
                    f"{by}: the model's parameters are {dtype} but task {i}'s {what} are {data}; use "
                    f"one dtype for both (convert the data with task.to({dtype}) or the model with "
                    f"model.to({data}))"
                )


def hooks(model: nn.Module) -> list[str]:
    """``"name (kind)"`` for every module carrying forward, pre-forward or backward hooks."""
    out = []
    for prefix, m in model.named_modules():
        kinds = [
            kind
            for kind, registry in (
                ("forward pre-hook", m._forward_pre_hooks),
                ("forward hook", m._forward_hooks),
                ("backward hook", m._backward_hooks),
                ("backward pre-hook", m._backward_pre_hooks),
            )
            if registry
        ]
        if kinds:
            what = sorted(
                {type(h).__name__ for r in (m._forward_pre_hooks, m._forward_hooks) for h in r.values()}
            )
            out.append(f"{prefix or type(m).__name__} ({', '.join(kinds)}: {', '.join(what) or 'hook'})")
    return out


def random_modules(model: nn.Module) -> list[str]:
    """The modules that draw random numbers in their forward (Dropout variants, RReLU in training)."""
    return [
        f"{prefix or type(m).__name__} ({type(m).__name__})"
        for prefix, m in model.named_modules()
        if isinstance(m, _RANDOM) and m.training
    ]


@contextmanager
def common_random_numbers(model: nn.Module) -> Iterator[None]:
    """Run a block from the generator state seeded with :data:`SEED` (CPU and the model's CUDA
    devices), leaving the caller's generator state as it was."""
    devices = sorted(
        {t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SEED)
        yield


def conventions(model: nn.Module) -> list[str]:
    """The modules whose autograd gradient is a convention, not the derivative finite differences
    measure, with what autograd returns."""
    out = []
    for prefix, m in model.named_modules():
        name = prefix or type(m).__name__
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            out.append(
                f"{name}: nn.Embedding(padding_idx={m.padding_idx}) — autograd gives the padding row "
                "a zero gradient by convention (it is held fixed); finite differences measure its "
                "actual effect on the loss"
            )
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None:
            out.append(
                f"{name}: {type(m).__name__}(max_norm={m.max_norm}) — the forward renormalises the "
                "looked-up rows in place, outside autograd: the gradient ignores the renormalisation, "
                "finite differences do not"
            )
        if m._backward_hooks or m._backward_pre_hooks:
            out.append(
                f"{name}: a backward hook — a hook that changes the gradients it is given makes "
                "autograd's gradient (the oracle's, with the hook's changes) differ from the "
                "derivative finite differences measure"
            )
        for key, p in m.named_parameters(prefix=prefix, recurse=False):
            if p.requires_grad and p._backward_hooks:
                out.append(
                    f"{key}: a tensor hook (register_hook) — a hook that changes the gradient it is "
                    "given makes autograd's gradient differ from the derivative finite differences "
                    "measure (with learned rates, a multi-step loss or a step index, also in the "
                    "first inner step)"
                )
        if m.training and any(type(h).__name__ == "SpectralNorm" for h in m._forward_pre_hooks.values()):
            out.append(
                f"{name}: spectral_norm in train mode — the power iteration updates u and v without "
                "gradient (autograd treats them as constants); finite differences see them move"
            )
        if m.training and type(m).__name__.startswith("Parametrized"):
            for p in getattr(m, "parametrizations", {}).values():
                if any(type(f).__name__ == "_SpectralNorm" for f in p):
                    out.append(
                        f"{name}: parametrizations.spectral_norm in train mode — the power iteration "
                        "is run without gradient; finite differences see u and v move"
                    )
    return out
