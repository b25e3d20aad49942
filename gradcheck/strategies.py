"""Hypothesis strategies for meta-learning problems, to check a meta-gradient in your own suite.

::

    from hypothesis import given
    from gradcheck.strategies import problems
    from gradcheck.testing import assert_meta_gradient

    @given(problem=problems())
    def test_my_maml(problem):
        assert_meta_gradient(my_maml, problem)

:func:`problems` draws a :class:`gradcheck.testing.Problem`: a small model, a meta-batch of tasks
that fit it, K and α — float64 by default, small enough that the oracle takes milliseconds.
Every part has its own strategy (:func:`mlps`, :func:`conv_nets`, :func:`regression_tasks`,
:func:`classification_tasks`, :func:`inner_steps`, :func:`inner_lrs`, :func:`leaps`,
:func:`adapts`), and every argument of :func:`problems` narrows or widens one; an ``int`` may be
given wherever a strategy of ints is taken. By default problems are plain MAML (``adapt=None``,
``leap=1.0``, one float α); pass ``adapt=adapts()`` or ``leap=leaps()`` to draw those too, and
``rates=rate_kinds()`` for learned inner rates (:data:`RATES`: a 0-dim tensor α, Meta-SGD's
per-entry rates, MAML++'s per-step rates with K + 1 entries) — each a tensor that requires grad,
whose meta-gradient the candidate returns under ``"inner_lr"`` / ``"inner_lr.<name>"``.

Models and data are generated from a drawn integer seed through a private ``torch.Generator``:
a draw is deterministic and never reads or advances torch's global random state.

Importing this module registers the hypothesis profile ``"gradcheck"`` (:data:`PROFILE`): no
deadline (the first call of an oracle is slower than the rest), 20 examples, ``too_slow``
suppressed. Load it in ``conftest.py`` with ``settings.load_profile("gradcheck")``, or build your
own on it: ``settings.register_profile("ci", parent=settings.get_profile("gradcheck"), ...)``.
This module needs hypothesis; :mod:`gradcheck.testing` does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gradcheck.strategies needs hypothesis: pip install 'lazymaml[strategies]' (or hypothesis); "
        "gradcheck.testing.assert_meta_gradient works without it"
    ) from error

from .parameters import Adapt, resolve_adapt
from .task import Task
from .testing import Problem

__all__ = [
    "ACTIVATIONS",
    "KINDS",
    "PROFILE",
    "RATES",
    "Problem",
    "adapts",
    "classification_tasks",
    "conv_nets",
    "inner_lrs",
    "inner_steps",
    "leaps",
    "mlps",
    "problems",
    "rate_kinds",
    "regression_tasks",
    "seeds",
]

T = TypeVar("T")
IntLike = int | st.SearchStrategy[int]

PROFILE = "gradcheck"
"""The name of the hypothesis profile registered here for meta-gradient tests."""
settings.register_profile(
    PROFILE,
    deadline=None,
    max_examples=20,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "softplus": nn.Softplus, "sigmoid": nn.Sigmoid}
"""The smooth activations the models are drawn with (smooth: finite differences stay conclusive)."""
KINDS = ("mlp", "conv", "conv_bn")
"""Problem kinds: an MLP on regression; a conv net on few-shot classification, without and with
BatchNorm (in train mode: normalised with each batch's statistics)."""


def _strategy(value: T | st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    return value if isinstance(value, st.SearchStrategy) else st.just(value)


def seeds() -> st.SearchStrategy[int]:
    """The seeds models and data are generated from."""
    return st.integers(0, 2**32 - 1)


def inner_steps(min_value: int = 1, max_value: int = 3) -> st.SearchStrategy[int]:
    """K, the number of inner steps."""
    return st.integers(min_value, max_value)


def inner_lrs(min_value: float = 0.01, max_value: float = 0.5) -> st.SearchStrategy[float]:
    """α, the inner learning rate."""
    return st.floats(min_value, max_value)


def leaps(min_value: float = 0.05, max_value: float = 1.0) -> st.SearchStrategy[float]:
    """γ, where the teacher θ + γ(φ_K − θ) is scored."""
    return st.floats(min_value, max_value)


def adapts(choices: Sequence[Adapt] = (None, "head", "body")) -> st.SearchStrategy[Adapt]:
    """What the inner loop adapts: all (MAML), the head (ANIL) or the body (BOIL)."""
    return st.sampled_from(list(choices))


RATES = ("none", "scalar", "per_entry", "per_step")
"""How the inner rates are drawn: one float α (``"none"``: nothing learned), a learned 0-dim
tensor α, a learned rate per entry of every adapted parameter (Meta-SGD), or per entry and per
step with K + 1 steps (MAML++'s LSLR, ``per_step_lr=True``)."""


def rate_kinds(choices: Sequence[str] = RATES) -> st.SearchStrategy[str]:
    """Which kind of inner rates a problem has (:data:`RATES`)."""
    unknown = sorted(set(choices) - set(RATES))
    if unknown or not choices:
        raise ValueError(f"rate kinds must be a non-empty selection of {RATES}, got {tuple(choices)!r}")
    return st.sampled_from(list(choices))


def _rates(
    kind: str, model: nn.Module, adapt: Adapt, steps: int, alpha: float, seed: int
) -> Tensor | dict[str, Tensor]:
    """Learned rates of ``kind`` around α: each entry α·(0.5 + U(0, 1)), from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    if kind == "scalar":
        return torch.tensor(alpha, dtype=dtype).requires_grad_()
    lead = (steps + 1,) if kind == "per_step" else ()
    params = dict(model.named_parameters())
    return {
        n: (alpha * (0.5 + torch.rand(lead + params[n].shape, generator=g, dtype=torch.float64)))
        .to(dtype)
        .requires_grad_()
        for n in resolve_adapt(model, adapt)
    }


# --- models: built without touching the global RNG, initialised from a generator --------------


def _uniform(t: Tensor, low: float, high: float, g: torch.Generator) -> None:
    t.copy_(low + (high - low) * torch.rand(t.shape, generator=g, dtype=torch.float64))


def _linear(a: int, b: int, g: torch.Generator, dtype: torch.dtype) -> nn.Linear:
    layer = nn.utils.skip_init(nn.Linear, a, b, dtype=dtype)
    bound = 1 / math.sqrt(a)  # torch's default initialisation
    with torch.no_grad():
        _uniform(layer.weight, -bound, bound, g)
        _uniform(layer.bias, -bound, bound, g)
    return layer


def _mlp(widths: Sequence[int], activation: str, seed: int, dtype: torch.dtype) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(_linear(widths[i], widths[i + 1], g, dtype))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def _conv_net(
    ways: int,
    size: int,
    in_channels: int,
    channels: int,
    batch_norm: bool,
    activation: str,
    seed: int,
    dtype: torch.dtype,
) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    conv = nn.utils.skip_init(nn.Conv2d, in_channels, channels, 3, dtype=dtype)
    bound = 1 / math.sqrt(in_channels * 9)
    layers: list[nn.Module] = [conv]
    with torch.no_grad():
        _uniform(conv.weight, -bound, bound, g)
        _uniform(conv.bias, -bound, bound, g)
        if batch_norm:  # non-trivial affine parameters and running statistics
            bn = nn.utils.skip_init(nn.BatchNorm2d, channels, dtype=dtype)
            _uniform(bn.weight, 0.5, 1.5, g)
            _uniform(bn.bias, -0.5, 0.5, g)
            _uniform(bn.running_mean, -0.3, 0.3, g)
            _uniform(bn.running_var, 0.5, 2.0, g)
            bn.num_batches_tracked.zero_()
            layers.append(bn)
    features = channels * (size - 2) ** 2
    layers += [ACTIVATIONS[activation](), nn.Flatten(), _linear(features, ways, g, dtype)]
    return nn.Sequential(*layers).train()


def mlps(
    inputs: IntLike = 2,
    outputs: IntLike = 1,
    hidden: st.SearchStrategy[list[int]] | None = None,
    activations: Sequence[str] = tuple(ACTIVATIONS),
    dtype: torch.dtype = torch.float64,
) -> st.SearchStrategy[nn.Sequential]:
    """An MLP ``inputs → hidden… → outputs`` with a smooth activation; by default 1–2 hidden
    layers of 1–5 units (at least one, so that "head" and "body" both exist)."""
    layers = st.lists(st.integers(1, 5), min_size=1, max_size=2) if hidden is None else hidden

    @st.composite
    def draw_mlp(draw: st.DrawFn) -> nn.Sequential:
        widths = [draw(_strategy(inputs)), *draw(layers), draw(_strategy(outputs))]
        return _mlp(widths, draw(st.sampled_from(list(activations))), draw(seeds()), dtype)

    return draw_mlp()


def conv_nets(
    ways: IntLike = 3,
    image_size: IntLike = 6,
    in_channels: IntLike = 1,
    channels: IntLike | None = None,
    batch_norm: bool | st.SearchStrategy[bool] | None = None,
    activations: Sequence[str] = ("tanh", "softplus"),
    dtype: torch.dtype = torch.float64,
) -> st.SearchStrategy[nn.Sequential]:
    """Conv 3×3 (2–3 channels) → BatchNorm (drawn, train mode) → activation → linear over
    ``ways``, for ``image_size``² images with ``in_channels`` channels."""
    width = st.integers(2, 3) if channels is None else _strategy(channels)
    norm = st.booleans() if batch_norm is None else _strategy(batch_norm)

    @st.composite
    def draw_conv(draw: st.DrawFn) -> nn.Sequential:
        size = draw(_strategy(image_size))
        if size < 3:
            raise ValueError(f"image_size must be at least 3 for a 3×3 convolution, got {size}")
        return _conv_net(
            draw(_strategy(ways)),
            size,
            draw(_strategy(in_channels)),
            draw(width),
            draw(norm),
            draw(st.sampled_from(list(activations))),
            draw(seeds()),
            dtype,
        )

    return draw_conv()


# --- tasks -------------------------------------------------------------------------------------


def _regression(seed: int, inputs: int, outputs: int, shots: int, queries: int, dtype: torch.dtype) -> Task:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(inputs, outputs, generator=g, dtype=torch.float64)

    def batch(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, inputs, generator=g, dtype=torch.float64)
        return x.to(dtype), torch.sin(x @ w).to(dtype)

    return Task(batch(shots), batch(queries), F.mse_loss)


def _classification(
    seed: int, ways: int, size: int, channels: int, shots: int, queries: int, dtype: torch.dtype
) -> Task:
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(ways, channels, size, size, generator=g, dtype=torch.float64)

    def batch(per_class: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(ways).repeat_interleave(per_class)
        noise = torch.randn(len(labels), channels, size, size, generator=g, dtype=torch.float64)
        return (prototypes[labels] + 0.5 * noise).to(dtype), labels

    return Task(batch(shots), batch(queries), F.cross_entropy)


def regression_tasks(
    inputs: IntLike = 2,
    outputs: IntLike = 1,
    shots: IntLike = 6,
    queries: IntLike = 7,
    dtype: torch.dtype = torch.float64,
) -> st.SearchStrategy[Task]:
    """A regression task y = sin(x W) (W drawn per task), ``shots`` support and ``queries``
    query points, MSE loss."""

    @st.composite
    def draw_task(draw: st.DrawFn) -> Task:
        return _regression(
            draw(seeds()),
            draw(_strategy(inputs)),
            draw(_strategy(outputs)),
            draw(_strategy(shots)),
            draw(_strategy(queries)),
            dtype,
        )

    return draw_task()


def classification_tasks(
    ways: IntLike = 3,
    image_size: IntLike = 6,
    in_channels: IntLike = 1,
    shots: IntLike = 2,
    queries: IntLike = 2,
    dtype: torch.dtype = torch.float64,
) -> st.SearchStrategy[Task]:
    """A ``ways``-way few-shot task: per class a random prototype image, each example the
    prototype plus noise; ``shots`` support and ``queries`` query images per class, cross-entropy."""

    @st.composite
    def draw_task(draw: st.DrawFn) -> Task:
        return _classification(
            draw(seeds()),
            draw(_strategy(ways)),
            draw(_strategy(image_size)),
            draw(_strategy(in_channels)),
            draw(_strategy(shots)),
            draw(_strategy(queries)),
            dtype,
        )

    return draw_task()


# --- problems ----------------------------------------------------------------------------------


def _describe(model: nn.Sequential) -> str:
    parts = []
    for m in model:
        if isinstance(m, nn.Linear):
            parts.append(f"Linear({m.in_features}, {m.out_features})")
        elif isinstance(m, nn.Conv2d):
            parts.append(f"Conv2d({m.in_channels}, {m.out_channels}, 3)")
        elif not isinstance(m, nn.Flatten):
            parts.append(type(m).__name__)
    return " → ".join(parts)


@st.composite
def problems(
    draw: st.DrawFn,
    kinds: Sequence[str] = KINDS,
    steps: IntLike | None = None,
    inner_lr: float | st.SearchStrategy[float] | None = None,
    adapt: Adapt | st.SearchStrategy[Adapt] = None,
    leap: float | st.SearchStrategy[float] = 1.0,
    meta_batch: IntLike | None = None,
    shots: IntLike | None = None,
    queries: IntLike | None = None,
    dtype: torch.dtype = torch.float64,
    rates: str | st.SearchStrategy[str] = "none",
) -> Problem:
    """A :class:`gradcheck.testing.Problem` of one of ``kinds`` (:data:`KINDS`) with
    ``meta_batch`` tasks of equal shapes (1–3; ``Task.stack`` accepts them), K from ``steps``
    (1–3), α from ``inner_lr`` (0.01–0.5), ``adapt`` (None), ``leap`` (1.0) and ``rates``
    (``"none"``: one float α; :func:`rate_kinds` to draw learned ones around α) — constants or
    strategies. ``shots`` and ``queries`` count support and query points per task for regression
    (2–6, 2–7), per class for classification (1–2 each). The tasks are a tuple."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty selection of {KINDS}, got {tuple(kinds)!r}")
    rate = draw(_strategy(rates))
    if rate not in RATES:
        raise ValueError(f"rates must be one of {RATES}, got {rate!r}")
    kind = draw(st.sampled_from(list(kinds)))
    n = draw(st.integers(1, 3) if meta_batch is None else _strategy(meta_batch))
    if kind == "mlp":
        inputs, outputs = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        model = draw(mlps(inputs, outputs, dtype=dtype))
        support = draw(st.integers(2, 6) if shots is None else _strategy(shots))
        query = draw(st.integers(2, 7) if queries is None else _strategy(queries))
        task = regression_tasks(inputs, outputs, support, query, dtype)
    else:
        ways, size = draw(st.integers(2, 3)), draw(st.integers(4, 6))
        model = draw(conv_nets(ways, size, batch_norm=kind == "conv_bn", dtype=dtype))
        support = draw(st.integers(1, 2) if shots is None else _strategy(shots))
        query = draw(st.integers(1, 2) if queries is None else _strategy(queries))
        task = classification_tasks(ways, size, 1, support, query, dtype)
    tasks = tuple(draw(st.lists(task, min_size=n, max_size=n)))
    settings_: dict[str, Any] = {
        "steps": draw(inner_steps() if steps is None else _strategy(steps)),
        "inner_lr": draw(inner_lrs() if inner_lr is None else _strategy(inner_lr)),
        "adapt": draw(_strategy(adapt)),
        "leap": draw(_strategy(leap)),
    }
    if rate != "none":
        settings_["inner_lr"] = _rates(
            rate, model, settings_["adapt"], settings_["steps"], settings_["inner_lr"], draw(seeds())
        )
        settings_["per_step_lr"] = rate == "per_step"
    return Problem(model, tasks, label=f"{kind}: {_describe(model)}", **settings_)
