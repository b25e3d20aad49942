"""``python benchmarks/few_shot.py --quick`` and ``python benchmarks/sinusoid.py --quick`` run (as
tox runs them) and write what they promise.

Nothing here is timed: each run is checked for its structure and for properties that hold exactly —
every method and seed present; every method scored on the same held-out tasks and trained on the
same task stream for a seed (digests of the tasks' data); hyperparameters chosen by the validation
sweep alone, from its grid; learning curves at the same increasing outer steps for every run; the
autograd graph of a lazy step the same size for every K while exact MAML's grows with K
(SavedTensorMeter counts bytes exactly). The sinusoid benchmark's held-out MSE is checked against
``MetaLearner.adapt``'s student in float64 (batched and sequential inner loops agree to rounding:
1e-10 relative is ~10⁵ ulps of slack for a 10-step loop on a 1.7k-parameter MLP).
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "few_shot.py"
SINUSOID = ROOT / "benchmarks" / "sinusoid.py"


def _module(script=SCRIPT):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


few_shot = _module()
sinusoid = _module(SINUSOID)
common = _module(ROOT / "benchmarks" / "common.py")


def _run_quick(script, out):
    """``script --quick --out out``: the JSON record it wrote, ``out`` and its stdout."""
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard, not a timing check
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / f"{script.stem}-quick.json").read_text()), out, done.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return _run_quick(SCRIPT, tmp_path_factory.mktemp("few_shot"))


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


def test_interval_is_the_student_t_interval_over_seeds():
    mean, half = common.interval([1.0, 2.0, 3.0])  # s = 1, n = 3, t₀.₉₇₅(2) = 4.303
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3), rel=1e-12)
    assert common.interval([1.0, 2.0])[1] == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2), rel=1e-12)
    assert math.isnan(common.interval([1.0])[1])
    mean, half = common.interval([1.0, math.inf])  # a diverged seed
    assert mean == math.inf and math.isnan(half)


def test_pool_map_returns_results_in_the_order_of_jobs_whatever_the_submission_order():
    import queue
    from concurrent.futures import ThreadPoolExecutor

    class Bar:
        total = 0

        def update(self, n):
            self.total += n

    def job(x, args, progress):
        progress.put(x)
        return {"x": x}

    bar, progress = Bar(), queue.Queue()
    with ThreadPoolExecutor(2) as pool:
        jobs = [(1,), (2,), (3,)]
        got = common.pool_map(pool, job, jobs, None, bar, progress, cost=lambda j: j[0])  # 3 first
    assert got == [{"x": 1}, {"x": 2}, {"x": 3}]
    while not progress.empty():
        bar.update(progress.get())
    assert bar.total == 6  # every reported step reaches the bar


@pytest.fixture(scope="module")
def sine(tmp_path_factory):
    return _run_quick(SINUSOID, tmp_path_factory.mktemp("sinusoid"))


def test_sinusoid_every_method_seed_and_grid_point_is_reported(sine):
    record, out, stdout = sine
    settings = record["settings"]
    keys = sinusoid.DEFAULT_METHODS
    assert settings["quick"] and settings["keys"] == keys
    grid = [(lr, leap) for lr in settings["inner_lrs"] for leap in settings["leaps"]]
    assert len(grid) > 1
    assert sorted((r["method"], r["seed"]) for r in record["runs"]) == sorted(
        (k, s) for k in keys for s in range(settings["seeds"])
    )
    assert sorted((r["method"], r["inner_lr"], r["leap"]) for r in record["sweep"]) == sorted(
        (k, *point) for k in keys for point in grid
    )
    assert {r["seed"] for r in record["sweep"]} == {sinusoid.SWEEP_SEED}
    assert [r["method"] for r in record["summary"]["rows"]] == keys
    for row in record["summary"]["rows"]:
        assert row["label"] in stdout
        assert row["mse"] > 0 and row["ci95"] >= 0  # two seeds: a finite interval
    assert (out / "sinusoid-quick.png").stat().st_size > 0


def test_sinusoid_sweep_chose_from_its_grid_on_validation_tasks(sine):
    record, _, _ = sine
    settings = record["settings"]
    for key, chosen in record["chosen"].items():
        assert chosen["inner_lr"] in settings["inner_lrs"] and chosen["leap"] in settings["leaps"]
        assert chosen == sinusoid.best([r for r in record["sweep"] if r["method"] == key])
        assert {(r["inner_lr"], r["leap"]) for r in record["runs"] if r["method"] == key} == {
            (chosen["inner_lr"], chosen["leap"])
        }
    assert len({r["eval_tasks_digest"] for r in record["sweep"]}) == 1
    assert record["sweep"][0]["eval_tasks_digest"] != record["runs"][0]["eval_tasks_digest"]  # val ≠ test


def test_sinusoid_curves_are_at_the_same_increasing_steps(sine):
    record, _, _ = sine
    settings = record["settings"]
    for kind, steps in (("runs", settings["outer_steps"]), ("sweep", settings["sweep_steps"])):
        marks = sinusoid.checkpoints(steps, settings["curve_points"])
        assert marks[0] == 0 and marks[-1] == steps and marks == sorted(set(marks))
        for r in record[kind]:
            assert [p["step"] for p in r["curve"]] == marks
            seconds = [p["seconds"] for p in r["curve"]]
            assert seconds[0] == 0 and seconds == sorted(seconds) and seconds[-1] == r["train_seconds"]
            assert r["final_mse"] == r["curve"][-1]["mse"]
            assert r["diverged"] or all(p["mse"] > 0 for p in r["curve"])


def test_sinusoid_same_held_out_tasks_and_same_training_stream(sine):
    record, _, _ = sine
    runs = record["runs"]
    assert len({r["eval_tasks_digest"] for r in runs}) == 1
    by_seed = {}
    for r in (r for r in runs if not r["diverged"]):
        by_seed.setdefault(r["seed"], set()).add(r["train_tasks_digest"])
    assert all(len(d) == 1 for d in by_seed.values()) and len(by_seed) == record["settings"]["seeds"]
    assert len(set.union(*by_seed.values())) == len(by_seed)  # seeds draw different tasks


def test_sinusoid_memory_and_deviation_from_maml(sine):
    record, _, _ = sine
    graph = {r["method"]: r["graph_bytes_per_task"] for r in record["runs"]}
    assert len({graph[f"lazy-k{k}"] for k in (10, 20, 40)}) == 1
    assert graph["maml-k5"] > graph["maml-k1"] > graph["fomaml-k5"]
    for r in record["runs"]:
        if r["method"].startswith("maml"):
            assert r["deviation_from_maml"] <= 1e-12  # the same estimator as the oracle: rounding
        elif not r["diverged"]:
            assert r["deviation_from_maml"] > 1e-3  # K > 1 with curvature: never exact


def test_sinusoid_equal_time_and_equal_memory(sine):
    record, _, _ = sine
    summary, runs = record["summary"], record["runs"]
    rows = {r["method"]: r for r in summary["rows"]}
    finish = {k: max(r["train_seconds"] for r in runs if r["method"] == k) for k in rows}
    fastest = min(finish, key=finish.get)
    assert summary["equal_time_seconds"] == finish[fastest]
    assert rows[fastest]["mse_equal_time"] == pytest.approx(rows[fastest]["mse"], rel=1e-12)
    for entry in summary["equal_memory"]:
        within = [r for r in rows.values() if r["graph_bytes_per_task"] <= entry["graph_bytes"]]
        assert entry["mse"] == min(r["mse"] for r in within) == rows[entry["best"]]["mse"]
    assert {e["graph_bytes"] for e in summary["equal_memory"]} == {
        r["graph_bytes_per_task"] for r in rows.values()
    }


def test_sinusoid_mse_is_the_adapted_students_query_loss():
    import lazymaml
    from gradcheck import Task, problems

    torch.manual_seed(0)
    model = problems.mlp((40, 40)).double()
    generator = torch.Generator().manual_seed(0)
    tasks = [problems.sinusoid(generator, dtype=torch.float64) for _ in range(6)]
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    for steps, inner_lr in ((1, 0.01), (10, 0.03)):
        student = lazymaml.MetaLearner(model, steps, inner_lr, estimator="first_order")
        expected = sum(t.query_loss(student.adapt(t)).item() for t in tasks) / len(tasks)
        assert sinusoid.mse(model, Task.stack(tasks), steps, inner_lr) == pytest.approx(expected, rel=1e-10)
        assert sinusoid.mse(model, Task.stack(tasks), steps + 1, inner_lr) != pytest.approx(
            expected, rel=1e-6
        )
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


def test_sinusoid_sweep_choice_and_plain_json():
    points = [
        {"inner_lr": 0.01, "leap": 1.0, "final_mse": 1.0},
        {"inner_lr": 0.003, "leap": 0.5, "final_mse": 1.0},
        {"inner_lr": 0.003, "leap": 1.0, "final_mse": 1.0},
        {"inner_lr": 0.001, "leap": 1.0, "final_mse": None},  # diverged: never chosen
    ]
    assert sinusoid.best(points) == {"inner_lr": 0.003, "leap": 1.0}
    assert sinusoid.best([*points[:1], {"inner_lr": 0.03, "leap": 1.0, "final_mse": 0.5}])["inner_lr"] == 0.03
    assert common.plain({"a": [math.inf, 1.0, (math.nan, 2)], "b": "x"}) == {
        "a": [None, 1.0, [None, 2]],
        "b": "x",
    }


def test_sinusoid_graph_bytes_depend_on_the_method_alone():
    for key in ("maml-k5", "lazy-k10", "lazy-k10-horizon", "fomaml-k5"):
        assert sinusoid.graph_bytes(key) == sinusoid.graph_bytes(key, 0.03, 0.5) > 0
    assert sinusoid.graph_bytes("lazy-k10") == sinusoid.graph_bytes("lazy-k20")
    assert sinusoid.graph_bytes("maml-k5") > sinusoid.graph_bytes("maml-k1")


def test_sinusoid_summary_of_a_diverged_seed():
    def run(method, seed, mses, seconds, diverged=None):
        curve = [{"step": 10 * i, "seconds": s, "mse": m} for i, (m, s) in enumerate(zip(mses, seconds))]
        return {
            "method": method,
            "seed": seed,
            "inner_lr": 0.01,
            "leap": 1.0,
            "curve": curve,
            "final_mse": mses[-1],
            "train_seconds": seconds[-1],
            "step_seconds": None if diverged else 0.1,
            "diverged": diverged,
            "graph_bytes_per_task": 100 if method == "maml-k1" else 50,
            "deviation_from_maml": 0.0 if method == "maml-k1" else None,
        }

    runs = [
        run("maml-k1", 0, [4.0, 2.0, 1.0], [0, 1, 2]),
        run("maml-k1", 1, [4.0, 3.0, 1.0], [0, 1, 3]),
        run("lazy-k40", 0, [4.0, None, None], [0, 0, 0], diverged="outer step 1: inf"),
        run("lazy-k40", 1, [4.0, 1.0, 0.5], [0, 4, 9]),
    ]
    summary = sinusoid.summarise(runs, ["maml-k1", "lazy-k40"])
    maml, lazy = summary["rows"]
    assert summary["equal_time_seconds"] == 3  # maml-k1's slowest seed
    assert maml["mse"] == maml["mse_equal_time"] == 1.0 and maml["diverged_seeds"] == 0
    assert lazy["mse"] == math.inf and lazy["diverged_seeds"] == 1 and lazy["last_fifth_improvement"] is None
    assert lazy["mse_equal_time"] == math.inf and lazy["step_ms"] == pytest.approx(100)
    assert summary["equal_memory"] == [
        {"graph_bytes": 50, "best": "lazy-k40", "mse": math.inf},
        {"graph_bytes": 100, "best": "maml-k1", "mse": 1.0},
    ]
    assert "diverged" in sinusoid.table(summary)
    assert common.plain(summary)["rows"][1]["mse"] is None  # strict JSON
    # a method whose every run diverged stopped early: its time does not set the equal-time budget
    stopped = [
        run("lazy-k40", 0, [4.0, 2.0, None], [0, 1, 1], diverged="outer step 15: inf"),
        run("lazy-k40", 1, [4.0, 2.0, None], [0, 1, 2], diverged="outer step 25: inf"),
    ]
    assert sinusoid.summarise(runs[:2] + stopped, ["maml-k1", "lazy-k40"])["equal_time_seconds"] == 3


def test_unknown_sinusoid_methods_are_refused():
    with pytest.raises(SystemExit):
        sinusoid.parse(["--methods", "reptile"])
    assert sinusoid.parse(["--methods", "lazy-*-horizon"]).keys == [
        f"lazy-k{k}-horizon" for k in (10, 20, 40)
    ]
