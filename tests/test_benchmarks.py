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

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "few_shot.py"
SINUSOID = ROOT / "benchmarks" / "sinusoid.py"
RESULTS = ROOT / "benchmarks" / "results"

sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is not a package: its modules by name
import analysis  # noqa: E402
import common  # noqa: E402
import few_shot  # noqa: E402
import lazy_vs_exact  # noqa: E402
import records  # noqa: E402
import sinusoid  # noqa: E402
import throughput  # noqa: E402


def _run_quick(script, out):
    """``script --quick --out out``: the JSON record it wrote, ``out`` and its stdout."""
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's packages, in the workers too
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
            assert lr == few_shot.best_inner_lr([records.FewShotRun.from_json(r) for r in sweep])
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
        sweep = [records.SinusoidRun.from_json(r) for r in record["sweep"] if r["method"] == key]
        assert chosen == asdict(sinusoid.best(sweep))
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
    assert graph["maml-k10"] > graph["maml-k5"] > graph["lazy-k10"] > graph["fomaml-k10"]
    assert graph["brake-k10"] == graph["brake-k10-t3"] == graph["lazy-k10"]  # one step's graph
    for r in record["runs"]:
        if sinusoid.METHODS[r["method"]].estimator in ("maml", "maml_hvp"):
            assert r["deviation_from_maml"] <= 1e-12  # exact MAML (unrolled or by HVPs): rounding
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


def _sine_run(method="maml-k1", seed=0, mses=(1.0,), seconds=(0.0,), diverged=None, inner_lr=0.01, leap=1.0):
    """A SinusoidRun with a curve at steps 0, 10, 20, … (the fields a summary reads)."""
    curve = tuple(records.CurvePoint(10 * i, s, m, None) for i, (m, s) in enumerate(zip(mses, seconds)))
    return records.SinusoidRun(
        kind="run",
        method=method,
        inner_lr=inner_lr,
        leap=leap,
        seed=seed,
        curve=curve,
        final_mse=mses[-1],
        train_seconds=seconds[-1],
        step_seconds=None if diverged else 0.1,
        diverged=diverged,
        train_tasks_digest="",
        eval_tasks_digest="",
        graph_bytes_per_task=100 if method == "maml-k1" else 50,
        deviation_from_maml=0.0 if method == "maml-k1" else None,
    )


def test_sinusoid_sweep_choice_and_plain_json():
    points = [
        _sine_run(inner_lr=0.01, leap=1.0, mses=(1.0,)),
        _sine_run(inner_lr=0.003, leap=0.5, mses=(1.0,)),
        _sine_run(inner_lr=0.003, leap=1.0, mses=(1.0,)),
        _sine_run(inner_lr=0.001, leap=1.0, mses=(None,)),  # diverged: never chosen
    ]
    assert sinusoid.best(points) == records.SweepChoice(0.003, 1.0)
    assert sinusoid.best([points[0], _sine_run(inner_lr=0.03, mses=(0.5,))]).inner_lr == 0.03
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
    inf = common.Divergence(1, "inf")
    runs = [
        _sine_run("maml-k1", 0, (4.0, 2.0, 1.0), (0, 1, 2)),
        _sine_run("maml-k1", 1, (4.0, 3.0, 1.0), (0, 1, 3)),
        _sine_run("lazy-k40", 0, (4.0, None, None), (0, 0, 0), diverged=inf),
        _sine_run("lazy-k40", 1, (4.0, 1.0, 0.5), (0, 4, 9)),
    ]
    summary = sinusoid.summarise(runs, ["maml-k1", "lazy-k40"])
    maml, lazy = summary.rows
    assert summary.equal_time_seconds == 3  # maml-k1's slowest seed
    assert maml.mse == maml.mse_equal_time == 1.0 and maml.diverged_seeds == 0
    assert lazy.mse == math.inf and lazy.diverged_seeds == 1 and lazy.last_fifth_improvement is None
    assert lazy.mse_equal_time == math.inf and lazy.step_ms == pytest.approx(100)
    assert summary.equal_memory == (
        records.MemoryBest(50, "lazy-k40", math.inf),
        records.MemoryBest(100, "maml-k1", 1.0),
    )
    assert "diverged" in sinusoid.table(summary)
    assert "0.0 KiB: none: every method within it diverged" in sinusoid.table(summary)  # not "best"
    assert common.plain(summary)["rows"][1]["mse"] is None  # strict JSON
    # a method whose every run diverged stopped early: its time does not set the equal-time budget
    stopped = [
        _sine_run("lazy-k40", 0, (4.0, 2.0, None), (0, 1, 1), diverged=common.Divergence(15, "inf")),
        _sine_run("lazy-k40", 1, (4.0, 2.0, None), (0, 1, 2), diverged=common.Divergence(25, "inf")),
    ]
    assert sinusoid.summarise(runs[:2] + stopped, ["maml-k1", "lazy-k40"]).equal_time_seconds == 3


def test_unknown_sinusoid_methods_are_refused():
    with pytest.raises(SystemExit):
        sinusoid.parse(["--methods", "reptile"])
    assert sinusoid.parse(["--methods", "lazy-*-horizon"]).keys == [
        f"lazy-k{k}-horizon" for k in (10, 20, 40)
    ]


# ── the shared helpers ─────────────────────────────────────────────────────────────────────────
def test_peak_resident_bytes_sees_an_allocation_inside_the_call():
    if common.resident_bytes("VmRSS") is None:
        pytest.skip("no /proc/self/status")
    size = 64 * 2**20

    def allocate():
        block = bytearray(size)  # zero-filled: every page touched
        return len(block)

    peak = common.peak_resident_bytes(allocate)
    assert 0.9 * size <= peak < 2 * size  # the baseline moves by a few pages
    assert common.resident_bytes("VmHWM") >= common.resident_bytes("VmRSS") > 0
    with pytest.raises(KeyError):
        common.resident_bytes("VmNothing")
    assert common.MEASURING_ENV["MALLOC_MMAP_THRESHOLD_"] == "65536"


def test_ratio_rows_and_tables():
    at_most, at_least = common.Ratio("a", 1.25, 1.2, True), common.Ratio("b", 2.0, 2, False)
    assert at_most.row() == ("a", 1.25, "≤ 1.2", False) and at_least.row() == ("b", 2.0, "≥ 2", True)
    lines = common.ratio_lines([at_most, at_least])
    assert lines[1].endswith("NO") and lines[2].endswith("yes") and len(lines) == 3
    table = common.text_table(("x", "y"), (-3, 4), [(("a", "1"), ""), (("bb", "22"), " !")])
    assert table.splitlines() == ["x      y", "a      1", "bb    22 !"]
    assert (
        common.cell(None, ".1f") == common.cell(math.inf, ".1f") == "—" and common.cell(2.0, ".1f") == "2.0"
    )


def test_throughput_and_lazy_vs_exact_targets_rebuild_the_committed_ones():
    measured = json.loads((RESULTS / "throughput-cpu.json").read_text())
    conv4 = measured["conv4"]
    checked = throughput.targets(measured["sinusoid"], conv4["timing"], conv4["peak_mib"], (1, 5, 20))
    assert [dict(zip(("target", "measured", "bound", "ok"), r.row())) for r in checked] == measured["targets"]
    assert throughput.timing_key("lazy", 20, "batched") in measured["sinusoid"]["timing"]
    assert throughput.LAZY_VMAP in measured["sinusoid"]["timing"]
    assert throughput.memory_key("sequential", 5) in conv4["peak_mib"]
    assert throughput.table_key("maml", 25, 20, "batched") in measured["table"]
    assert [r["target"] for r in measured["targets"] if "own work" in r["target"]] == [
        f"sinusoid {name} K={k}: learner's own work, % of a step" for name, k in throughput.FRESH
    ]
    exact = json.loads((RESULTS / "lazy_vs_exact-cpu.json").read_text())
    assert [list(r.row()) for r in lazy_vs_exact.ratio_table(exact["results"])] == exact["ratios"]


def test_the_learners_own_work_is_timed_inside_real_steps_and_the_estimate_put_back():
    import lazymaml

    model, tasks = throughput.sinusoid_setup(3, torch.device("cpu"))
    learner = lazymaml.MetaLearner(model, 2, throughput.INNER_LR, estimator="maml", batched=True)
    compute = lazymaml.batched.estimate
    own = throughput.outside_the_computation(learner, tasks, 3)
    assert lazymaml.batched.estimate is compute
    assert 0 < own["estimate_ms"] < own["step_ms"] and 0 < own["share"] < 1
    assert own["outside_ms"] == pytest.approx(own["share"] * own["step_ms"])


def test_divergence_reads_the_record_and_the_older_text():
    record = common.Divergence(1417, "support loss L_S(φ_5) at inner step 6 of 10 is inf")
    assert common.Divergence.from_json(common.plain(record)) == record
    assert common.Divergence.from_json(str(record)) == record
    assert common.Divergence.from_json(None) is None
    with pytest.raises(ValueError):
        common.Divergence.from_json("step 3: inf")


# ── the records and their loaders, on the committed results ────────────────────────────────────
def test_loaders_read_every_committed_results_file_back_to_its_json():
    def strict(data):  # what the file holds, with divergences in the current form
        for r in [*data["runs"], *data["sweep"]]:
            r["diverged"] = common.plain(common.Divergence.from_json(r["diverged"]))
            if "curve" in r and "sharpness_seconds" not in r:  # a sinusoid file from before λ_θ
                r["sharpness_seconds"] = 0.0
                for point in r["curve"]:
                    point["sharpness"] = None
        return data

    for name, load in (
        ("few_shot.json", records.load_few_shot),
        ("few_shot-quick.json", records.load_few_shot),
        ("few_shot-controls/few_shot.json", records.load_few_shot),
        ("few_shot-controls/lazy-rerun/few_shot.json", records.load_few_shot),
        ("sinusoid.json", records.load_sinusoid),
        ("sinusoid-quick.json", records.load_sinusoid),
        ("sinusoid-lazy-alpha0.003/sinusoid.json", records.load_sinusoid),
        ("sinusoid-brake/sinusoid.json", records.load_sinusoid),
        ("sinusoid-brake-long/sinusoid.json", records.load_sinusoid),
        ("sinusoid-full/sinusoid.json", records.load_sinusoid),
    ):
        data = json.loads((RESULTS / name).read_text())
        loaded = load(name)
        written = common.plain(loaded)
        if name == "few_shot-quick.json" and "deviation_from_maml" not in data["summary"][0]:
            for row in written["summary"]:
                del row["deviation_from_maml"]  # written before deviations were recorded
        assert written == strict(data), name


def test_loaded_records_keep_the_numbers_the_benchmark_computed():
    sine = records.load_sinusoid("sinusoid.json")
    lazy = sine.summary.row("lazy-k10")
    assert lazy.mse == math.inf and math.isnan(lazy.ci95) and lazy.diverged_seeds == 3
    assert sorted(r.diverged.step for r in sine.runs_of("lazy-k10")) == [1417, 1805, 2139]
    assert sine.chosen["maml-k1"] == records.SweepChoice(0.03, 1.0)
    follow = records.load_sinusoid("sinusoid-lazy-alpha0.003/sinusoid.json")
    assert [r.diverged and r.diverged.step for r in follow.runs_of("lazy-k10")] == [None, 3704]
    few = records.load_few_shot("few_shot.json")
    assert [r.method for r in few.rows(5)] == few.settings["keys"]
    assert few.chosen_inner_lr[1]["maml-k1"] == 0.1
    imaml = [r for r in few.runs if r.method == "imaml-k10"]
    assert all(r.diverged.step == 1 and r.accuracy == 1 / few_shot.WAYS for r in imaml)


# ── the analysis behind notebook 04 ────────────────────────────────────────────────────────────
def test_ranks_average_ties_and_spearman_matches_a_hand_computed_case():
    assert analysis.ranks([10.0, 30.0, 20.0, 20.0]) == [0.0, 3.0, 1.5, 1.5]
    # ranks x: 0, 1.5, 1.5, 3; y: 1, 0, 2, 3. Centred (mean 1.5): x −1.5, 0, 0, 1.5; y −0.5, −1.5,
    # 0.5, 1.5; covariance 0.75 + 2.25 = 3; norms² 4.5 and 5: ρ = 3 / √22.5
    rho = analysis.spearman([1.0, 2.0, 2.0, 5.0], [0.2, 0.1, 0.3, 0.9])
    assert rho == pytest.approx(3 / math.sqrt(22.5), rel=1e-12)
    assert analysis.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert analysis.spearman([1, 2], [1, 2]) is None and analysis.spearman([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError):
        analysis.spearman([1, 2, 3], [1, 2])


def test_analysis_of_the_committed_results():
    few = records.load_few_shot("few_shot.json")
    sine = records.load_sinusoid("sinusoid.json")
    lines = analysis.few_shot_headlines(few.rows(1))
    assert lines[0].startswith("  equal steps:  Lazy K=10 single γ=1 91.05 ± 0.24 vs MAML K=1 84.69 ± 2.83")
    assert lines[0].endswith("is better (intervals apart)") and "overlap" in lines[1]
    assert analysis.correlations(few.rows(5), "accuracy")[0] == (10, pytest.approx(-0.8), 5)
    assert analysis.correlation_lines(sine.summary.rows, "mse") == ["  fewer than 3 approximate methods"]
    stopped = analysis.divergences(sine, sine)
    assert stopped[0].startswith("  lazy-k10: 3 of 3 seeds diverged, at outer steps [1417, 1805, 2139]")
    headlines = analysis.sinusoid_headlines(sine)
    assert "equal steps: MAML K=1: nothing to compare" in headlines[1]
    assert headlines[3].endswith("Lazy K=40 is worse (intervals apart)")  # a lower MSE is better
    assert analysis.ci(math.inf, math.nan) == "diverged" and analysis.ci(0.5, math.nan) == "0.50 ± ?"


def test_sinusoid_tracks_sharpness_on_every_run_outside_its_time(sine):
    record, _, _ = sine
    for r in record["runs"]:
        tracked = [p["sharpness"] for p in r["curve"] if p["mse"] is not None]
        assert tracked and all(t is not None and t > 0 for t in tracked)
        assert r["sharpness_seconds"] > 0
    assert all(p["sharpness"] is None for r in record["sweep"] for p in r["curve"])  # runs only


def test_sinusoid_sharpness_is_the_top_eigenvalue_of_the_support_hessian():
    """λ_θ by power iteration against the dense Hessian's eigenvalues, per task, in float64."""
    from torch.func import functional_call

    from gradcheck import problems

    torch.manual_seed(1)
    model = problems.mlp((6, 6), torch.nn.Tanh).double()
    batch = sinusoid.task_set(sinusoid.TASK_SEEDS["probe"], 3)
    batch = type(batch)(
        *(tuple(t.double() for t in part) for part in (batch.support, batch.query)), batch.loss
    )
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def support(vector, i):
        tensors = dict(
            zip(names, (t.view(s) for t, s in zip(vector.split([s.numel() for s in shapes]), shapes)))
        )
        xs, ys = batch.support
        return batch.loss(functional_call(model, tensors, (xs[i],)), ys[i])

    tops = []
    for i in range(3):
        eigenvalues = torch.linalg.eigvalsh(
            torch.autograd.functional.hessian(lambda v, i=i: support(v, i), theta)
        )
        tops.append(eigenvalues[eigenvalues.abs().argmax()].item())
    got = sinusoid.sharpness(model, batch, iterations=300)
    assert got == pytest.approx(sum(tops) / 3, rel=1e-6)
    assert sinusoid.sharpness(model, batch, iterations=300, seed=5) == pytest.approx(got, rel=1e-6)


def test_sinusoid_without_a_sweep_trains_the_one_grid_point(tmp_path):
    args = ["--quick", "--out", str(tmp_path), "--sweep-steps", "0", "--inner-lrs", "0.01", "--leaps", "1"]
    args += ["--methods", "fomaml-k10", "brake-k10-t1", "--seeds", "1", "--probe-tasks", "0"]
    assert sinusoid.main([*args, "--workers", "1"]) == 0
    record = json.loads((tmp_path / "sinusoid-quick.json").read_text())
    assert record["sweep"] == [] and record["settings"]["command"].endswith("--workers 1")
    assert {(r["method"], r["inner_lr"], r["leap"]) for r in record["runs"]} == {
        ("fomaml-k10", 0.01, 1.0),
        ("brake-k10-t1", 0.01, 1.0),
    }
    assert all(p["sharpness"] is None for r in record["runs"] for p in r["curve"])  # --probe-tasks 0
    with pytest.raises(SystemExit):
        sinusoid.main(["--quick", "--out", str(tmp_path), "--sweep-steps", "0"])  # a grid of 4 points


def test_brake_cost_quick(tmp_path):
    import brake_cost

    assert brake_cost.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "brake_cost-quick.json").read_text())["rows"]
    assert {(r["network"], r["K"], r["estimator"]) for r in rows} == {
        (n, k, e) for n in ("sinusoid", "conv") for k in (2, 4) for e in brake_cost.ESTIMATORS
    }
    at = {(r["network"], r["K"], r["estimator"]): r for r in rows}
    for n in ("sinusoid", "conv"):
        for k in (2, 4):
            lazy, brake = at[n, k, "lazy"], at[n, k, "maml_hvp"]
            assert brake["graph_bytes"] == at[n, k, "maml_hvp_sqrt"]["graph_bytes"] == lazy["graph_bytes"]
            assert brake["stored_bytes"] == k * brake["parameter_bytes"] and lazy["stored_bytes"] == 0
            assert lazy["time_vs_lazy"] == 1.0 and all(
                at[n, k, e]["seconds"] > 0 for e in brake_cost.ESTIMATORS
            )
        assert (
            at[n, 4, "maml"]["graph_bytes"]
            > at[n, 2, "maml"]["graph_bytes"]
            > at[n, 2, "lazy"]["graph_bytes"]
        )
    assert brake_cost.stored_points("maml_hvp_sqrt", 40) == 6 + 7  # m = 7: 6 checkpoints + 7 recomputed
