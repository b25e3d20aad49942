"""Typed records of the meta-training benchmarks' results, and their JSON form.

``few_shot.py`` and ``sinusoid.py`` build these records (one per sweep point or run, one per
summary row), ``analysis.py`` and notebook 04 read them back: a misspelt or renamed field fails
where it is used instead of reading as a missing key. ``to_json`` writes the results files'
schema; ``load_few_shot`` and ``load_sinusoid`` read every committed file, including those
written before a divergence's step was stored as a number (they spelt it ``"outer step N: …"``).

Non-finite numbers are null in the files (strict JSON); the loaders put back what the benchmark
computed there: +∞ for the MSE of a method with a diverged seed, nan for the interval of one
finite value.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py
from common import Divergence

RESULTS = Path(__file__).resolve().parent / "results"


def _build(cls: type, data: Mapping[str, Any], **converted: Any) -> Any:
    """``cls`` from the fields of ``data`` it has (absent ones take their defaults), ``converted``
    instead of the raw values where given."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names and k not in converted}, **converted)


def _or(value: float | None, missing: float) -> float:
    """A number of the file, with ``missing`` where the file has null (a non-finite number)."""
    return missing if value is None else value


# ── few-shot classification (few_shot.py) ──────────────────────────────────────────────────────
@dataclass(frozen=True)
class FewShotRun:
    """One sweep point (``kind="sweep"``: accuracy on meta-validation tasks) or one full run
    (``kind="run"``: accuracy on meta-test tasks, memory and deviation measured)."""

    kind: str
    shots: int
    method: str
    inner_lr: float
    seed: int
    step_seconds: float | None  # median over the outer steps after the first; None: no step ran
    train_loss_last: float | None
    diverged: Divergence | None
    cg_unconverged_tasks: int
    warnings: tuple[str, ...]
    train_tasks_digest: str
    accuracy: float  # chance (1/ways) where the run diverged
    eval_tasks_digest: str
    peak_rss_bytes: int | None = None
    graph_bytes_per_task: int | None = None
    deviation_from_maml: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.kind == "sweep":
            for run_only in ("peak_rss_bytes", "graph_bytes_per_task", "deviation_from_maml"):
                del out[run_only]
        score = "val_accuracy" if self.kind == "sweep" else "test_accuracy"
        return {score if k == "accuracy" else k: v for k, v in out.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FewShotRun:
        return _build(
            cls,
            data,
            diverged=Divergence.from_json(data["diverged"]),
            warnings=tuple(data["warnings"]),
            accuracy=data["val_accuracy" if data["kind"] == "sweep" else "test_accuracy"],
        )


@dataclass(frozen=True)
class FewShotRow:
    """One method at one shot count: accuracy over seeds, median step time and memory."""

    shots: int
    method: str
    label: str
    K: int  # the inner steps (the results files name it K)
    inner_lr: float
    accuracy: float
    ci95: float  # nan for a single seed
    step_ms: float | None  # None for the control (no outer step)
    peak_rss_mib: float | None
    graph_mib_per_task: float | None
    diverged_seeds: int
    deviation_from_maml: float | None = None  # None: the control, a failed gradient, or not recorded

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FewShotRow:
        return _build(cls, data, ci95=_or(data["ci95"], math.nan))


@dataclass(frozen=True)
class FewShotResults:
    """A ``few_shot[-quick].json``: the settings (every argument, the methods' definitions), the
    chosen α per shot count and method, the summary rows, the runs and the sweep points."""

    settings: Mapping[str, Any]
    wall_seconds: float
    chosen_inner_lr: Mapping[int, Mapping[str, float]]
    summary: tuple[FewShotRow, ...]
    runs: tuple[FewShotRun, ...]
    sweep: tuple[FewShotRun, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": dict(self.settings),
            "wall_seconds": self.wall_seconds,
            "chosen_inner_lr": {str(shot): dict(c) for shot, c in self.chosen_inner_lr.items()},
            "summary": [r.to_json() for r in self.summary],
            "runs": [r.to_json() for r in self.runs],
            "sweep": [r.to_json() for r in self.sweep],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FewShotResults:
        return cls(
            settings=data["settings"],
            wall_seconds=data["wall_seconds"],
            chosen_inner_lr={int(shot): c for shot, c in data["chosen_inner_lr"].items()},
            summary=tuple(FewShotRow.from_json(r) for r in data["summary"]),
            runs=tuple(FewShotRun.from_json(r) for r in data["runs"]),
            sweep=tuple(FewShotRun.from_json(r) for r in data["sweep"]),
        )

    def rows(self, shots: int) -> list[FewShotRow]:
        """The summary rows of one shot count, in the benchmark's order of methods."""
        return [r for r in self.summary if r.shots == shots]


# ── sinusoid regression (sinusoid.py) ──────────────────────────────────────────────────────────
@dataclass(frozen=True)
class CurvePoint:
    """One evaluation of a learning curve: after ``step`` outer steps and ``seconds`` of them."""

    step: int
    seconds: float
    mse: float | None  # held-out (or validation) MSE; None after a divergence
    train_mse: float | None  # the mean training loss since the previous point; None at step 0
    # λ_θ: the support Hessian's largest eigenvalue at θ (power iteration), mean over the fixed
    # probe tasks; None where not tracked or after a divergence
    sharpness: float | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CurvePoint:
        return _build(cls, data)


@dataclass(frozen=True)
class SweepChoice:
    """The (α, γ) a method's sweep chose."""

    inner_lr: float
    leap: float


@dataclass(frozen=True)
class SinusoidRun:
    """One sweep point (``kind="sweep"``: its curve on validation tasks) or one full run
    (``kind="run"``: on held-out tasks, graph memory and deviation measured)."""

    kind: str
    method: str
    inner_lr: float
    leap: float
    seed: int
    curve: tuple[CurvePoint, ...]
    final_mse: float | None  # None: diverged
    train_seconds: float
    step_seconds: float | None
    diverged: Divergence | None
    train_tasks_digest: str
    eval_tasks_digest: str
    graph_bytes_per_task: int | None = None
    deviation_from_maml: float | None = None
    sharpness_seconds: float = 0.0  # the λ_θ probes' time, outside train_seconds (not in the budget)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.kind == "sweep":
            del out["graph_bytes_per_task"], out["deviation_from_maml"]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SinusoidRun:
        return _build(
            cls,
            data,
            curve=tuple(CurvePoint.from_json(p) for p in data["curve"]),
            diverged=Divergence.from_json(data["diverged"]),
        )


@dataclass(frozen=True)
class SinusoidRow:
    """One method: the final held-out MSE over seeds, at equal time, memory, time, deviation."""

    method: str
    label: str
    K: int  # the inner steps (the results files name it K)
    inner_lr: float
    leap: float
    mse: float  # +∞ where a seed diverged
    ci95: float  # nan for one seed or a diverged one
    last_fifth_improvement: float | None  # None where it is not finite
    mse_equal_time: float
    ci95_equal_time: float
    step_ms: float  # nan where no step was timed
    train_seconds: float
    graph_bytes_per_task: int
    deviation_from_maml: float  # median over seeds; +∞ where most seeds have none
    diverged_seeds: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SinusoidRow:
        return _build(
            cls,
            data,
            mse=_or(data["mse"], math.inf),
            ci95=_or(data["ci95"], math.nan),
            mse_equal_time=_or(data["mse_equal_time"], math.inf),
            ci95_equal_time=_or(data["ci95_equal_time"], math.nan),
            step_ms=_or(data["step_ms"], math.nan),
            deviation_from_maml=_or(data["deviation_from_maml"], math.inf),
        )


@dataclass(frozen=True)
class MemoryBest:
    """The method with the lowest final MSE among those whose graph fits in ``graph_bytes``."""

    graph_bytes: int
    best: str
    mse: float

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MemoryBest:
        return _build(cls, data, mse=_or(data["mse"], math.inf))


@dataclass(frozen=True)
class SinusoidSummary:
    rows: tuple[SinusoidRow, ...]
    equal_time_seconds: float  # the fastest non-diverging method's time for the whole budget
    equal_memory: tuple[MemoryBest, ...]  # per distinct graph size, smallest first

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SinusoidSummary:
        return cls(
            rows=tuple(SinusoidRow.from_json(r) for r in data["rows"]),
            equal_time_seconds=data["equal_time_seconds"],
            equal_memory=tuple(MemoryBest.from_json(m) for m in data["equal_memory"]),
        )

    def row(self, method: str) -> SinusoidRow:
        return next(r for r in self.rows if r.method == method)


@dataclass(frozen=True)
class SinusoidResults:
    """A ``sinusoid[-quick].json``: settings, the chosen (α, γ) per method, the summary, the runs
    and the sweep points."""

    settings: Mapping[str, Any]
    wall_seconds: float
    chosen: Mapping[str, SweepChoice]
    summary: SinusoidSummary
    runs: tuple[SinusoidRun, ...]
    sweep: tuple[SinusoidRun, ...]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)  # every field is a plain value or a dataclass without a JSON form of its own
        out.update(runs=[r.to_json() for r in self.runs], sweep=[r.to_json() for r in self.sweep])
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SinusoidResults:
        return cls(
            settings=data["settings"],
            wall_seconds=data["wall_seconds"],
            chosen={k: SweepChoice(**c) for k, c in data["chosen"].items()},
            summary=SinusoidSummary.from_json(data["summary"]),
            runs=tuple(SinusoidRun.from_json(r) for r in data["runs"]),
            sweep=tuple(SinusoidRun.from_json(r) for r in data["sweep"]),
        )

    def runs_of(self, method: str) -> list[SinusoidRun]:
        return [r for r in self.runs if r.method == method]


def load_few_shot(path: str | Path) -> FewShotResults:
    """A few-shot results file (a name relative to ``benchmarks/results`` or a path)."""
    return FewShotResults.from_json(json.loads((RESULTS / path).read_text()))


def load_sinusoid(path: str | Path) -> SinusoidResults:
    """A sinusoid results file (a name relative to ``benchmarks/results`` or a path)."""
    return SinusoidResults.from_json(json.loads((RESULTS / path).read_text()))
