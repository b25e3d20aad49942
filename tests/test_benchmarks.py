"""``python benchmarks/few_shot.py --quick`` runs (as tox runs it) and writes what it promises.

Nothing here is timed: the run is checked for its structure and for properties that hold exactly —
every method and seed present; every method scored on the same meta-test tasks and trained on the
same task stream for a seed (digests of the tasks' data); α chosen by the validation sweep alone;
the autograd graph of a lazy step the same size for every K while exact MAML's grows with K
(SavedTensorMeter counts bytes exactly).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "few_shot.py"


def _module():
    spec = importlib.util.spec_from_file_location("benchmarks_few_shot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


few_shot = _module()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("few_shot")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard, not a timing check
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "few_shot-quick.json").read_text()), out, done.stdout


def test_every_method_and_seed_is_reported(quick):
    record, out, stdout = quick
    settings = record["settings"]
    assert settings["quick"] and settings["keys"] == list(few_shot.METHODS)
    seeds, lrs = settings["seeds"], settings["inner_lrs"]
    for shot in settings["shots"]:
        runs = [r for r in record["runs"] if r["shots"] == shot]
        assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
            (k, s) for k in few_shot.METHODS for s in range(seeds)
        )
        sweep = [r for r in record["sweep"] if r["shots"] == shot]
        assert sorted((r["method"], r["inner_lr"]) for r in sweep) == sorted(
            (k, lr) for k in few_shot.METHODS for lr in lrs
        )
    assert [r["method"] for r in record["summary"]] == list(few_shot.METHODS) * len(settings["shots"])
    for row in record["summary"]:
        assert 0 <= row["accuracy"] <= 1 and row["ci95"] >= 0  # two seeds: a finite interval
        assert row["label"] in stdout
    assert (out / "few_shot-quick.png").stat().st_size > 0


def test_inner_lr_is_chosen_on_validation_only(quick):
    record, _, _ = quick
    for shot, chosen in record["chosen_inner_lr"].items():
        for key, lr in chosen.items():
            sweep = [r for r in record["sweep"] if r["shots"] == int(shot) and r["method"] == key]
            assert lr == few_shot.best_inner_lr(sweep)
            assert {
                r["inner_lr"] for r in record["runs"] if r["method"] == key and r["shots"] == int(shot)
            } == {lr}
    assert all("test_accuracy" not in r for r in record["sweep"])


def test_same_test_tasks_and_same_training_stream(quick):
    record, _, _ = quick
    runs = record["runs"]
    assert len({r["eval_tasks_digest"] for r in runs}) == 1
    assert len({r["eval_tasks_digest"] for r in record["sweep"]}) == 1
    assert record["sweep"][0]["eval_tasks_digest"] != runs[0]["eval_tasks_digest"]  # val ≠ test tasks
    trained = [r for r in runs if few_shot.METHODS[r["method"]].estimator != "none" and not r["diverged"]]
    by_seed = {}
    for r in trained:
        by_seed.setdefault(r["seed"], set()).add(r["train_tasks_digest"])
    assert all(len(d) == 1 for d in by_seed.values()) and len(by_seed) == record["settings"]["seeds"]
    assert len(set.union(*by_seed.values())) == len(by_seed)  # seeds draw different tasks


def test_step_times_and_memory_are_measured(quick):
    record, _, _ = quick
    for r in record["runs"]:
        control = few_shot.METHODS[r["method"]].estimator == "none"
        if control:
            assert r["step_seconds"] is None and r["graph_bytes_per_task"] is None
        elif not r["diverged"]:
            assert r["step_seconds"] > 0 and r["graph_bytes_per_task"] > 0


def test_lazy_graph_is_flat_in_k_and_exact_maml_grows(quick):
    record, _, _ = quick
    graph = {(r["method"], r["seed"]): r["graph_bytes_per_task"] for r in record["runs"] if r["seed"] == 0}
    for step in ("single", "horizon"):
        for leap in ("1", "0.5"):
            sizes = {graph[(f"lazy-k{k}-{step}-g{leap}", 0)] for k in (10, 20, 40)}
            assert len(sizes) == 1, sizes
    assert graph[("maml-k5", 0)] > graph[("maml-k1", 0)]
    assert graph[("reptile-k10", 0)] < graph[("lazy-k10-single-g1", 0)]  # no second-order term


def test_unknown_method_patterns_are_refused():
    with pytest.raises(SystemExit):
        few_shot.parse(["--methods", "nope-*"])
    assert few_shot.parse(["--methods", "maml-*", "boil-k5"]).keys == ["maml-k1", "maml-k5", "boil-k5"]
