"""lazymaml.report: the table of every estimator against the oracle, and the two properties it
checks — the K = 1 identity (lazy vs exact to rtol 1e-8, measured ~1e-16) and the deviation bound
(with a relative slack of 1e-9) — which must fail the report when they break.
"""

import dataclasses
import json
import math

import pytest
import torch

import lazymaml
import lazymaml.report
from lazymaml import estimators
from lazymaml.__main__ import main
from lazymaml.bound import bound_terms
from lazymaml.report import BOUND_SLACK, IDENTITY_RTOL, PROBLEMS, Measurement, measure, run, table, threads


def row(estimator="lazy", steps=1, rel_error=0.0, deviation=0.0, bound=None, error=None):
    return Measurement("p", estimator, steps, 1.0, rel_error, deviation, bound, 0.01, 0.5, error)


def test_the_k1_identity_is_checked_for_lazy_at_k1_only():
    assert row(rel_error=IDENTITY_RTOL / 2).violation is None
    assert (
        row(rel_error=2 * IDENTITY_RTOL).violation
        == "K = 1 identity violated: relative error 2.00e-08 > 1e-08"
    )
    assert row(steps=2, rel_error=0.5).violation is None  # lazy is not exact beyond K = 1
    assert row("first_order", rel_error=0.5).violation is None
    assert row(rel_error=0.5, error="indefinite").violation is None  # a failed row is reported, not judged


def test_the_bound_is_checked_with_its_slack():
    bound = 1e-3
    assert row(steps=3, deviation=bound * (1 + BOUND_SLACK / 2), bound=bound).violation is None
    assert row(steps=3, deviation=bound * 1.01, bound=bound).violation == (
        "bound violated: deviation 1.010e-03 > bound 1.000e-03"
    )
    assert row(steps=3, deviation=1e-13, bound=0.0).violation is None  # rounding of a zero bound
    assert row(steps=3, deviation=1e-11, bound=0.0).violation is not None
    assert row("first_order", steps=3, deviation=1.0).violation is None  # no bound, no check


def test_table_marks_violations_and_failed_rows():
    rows = [row(steps=3, deviation=2.0, bound=1.0), row("imaml", error="indefinite system")]
    lines = table(rows).splitlines()
    assert lines[0].split()[:3] == ["problem", "estimator", "K"] and len(lines) == 4
    assert lines[2].endswith("<- bound violated: deviation 2.000e+00 > bound 1.000e+00")
    assert "n/a: indefinite system" in lines[3]


def test_run_measures_the_lazy_estimators_against_the_oracle():
    """Each lazy row carries the bound for its own η (tested in test_bound.py: here, only that the
    report asks for the right one), and at K = 1 the single-step estimator is exact."""
    rows = run(ks=[1, 2], names=["lazy", "lazy_horizon"], problem_names=["sinusoid-mlp"], progress=False)
    assert [(r.estimator, r.steps) for r in rows] == [
        (name, k) for k in (1, 2) for name in ("exact (oracle)", "lazy", "lazy_horizon")
    ]
    exact, lazy_k1 = rows[0], rows[1]
    assert exact.rel_error == 0.0 and exact.bound is None
    assert lazy_k1.rel_error < 1e-12 and lazy_k1.cosine == pytest.approx(1.0, abs=1e-12)
    assert lazy_k1.bound == 0.0
    model, task = PROBLEMS["sinusoid-mlp"](0, "cpu")
    terms = bound_terms(model, task, 2, 0.01)
    assert (rows[4].bound, rows[5].bound) == (terms.bound("single"), terms.bound("horizon"))
    assert terms.bound("single") != terms.bound("horizon")
    for r in rows[4:]:
        assert 0 < r.deviation <= r.bound
    assert all(r.violation is None and r.graph_mib > 0 and r.seconds > 0 for r in rows)
    assert all(math.isfinite(r.cosine) for r in rows)


def test_report_writes_table_plot_and_json(tmp_path, capsys):
    args = ["report", "--ks", "1", "2", "--problems", "sinusoid-mlp", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    for name in ("first_order", "reptile", "truncated(T=2)", "imaml(λ=20)", "lazy", "lazy_horizon"):
        assert f"sinusoid-mlp   {name}" in out
    png = (tmp_path / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "bound: " in out and "20 dense" not in out and "2 dense 481×481 Hessians" in out
    payload = json.loads((tmp_path / "report.json").read_text())
    [cost] = payload["bound_costs"]
    assert (cost["problem"], cost["parameters"], cost["hessians"]) == ("sinusoid-mlp", 481, 2)
    assert payload["settings"]["threads"] >= 1
    rows = payload["rows"]
    assert {r["estimator"] for r in rows} >= {"exact (oracle)", "lazy"}
    lazy_k1 = next(r for r in rows if r["estimator"] == "lazy" and r["steps"] == 1)
    assert lazy_k1["rel_error"] < 1e-12 and lazy_k1["violation"] is None


LAZY = estimators.REGISTRY["lazy"]
# planted in the registry under the name "lazy": the report must flag each
ETA_DOUBLED = dataclasses.replace(LAZY, configure=lambda loop: loop.replace(jacobian_step=2 * loop.eta))


def _inflated(objective, theta, untrained):
    gradient, loss, losses = LAZY.per_task(objective, theta, untrained)
    return {n: 100 * g for n, g in gradient.items()}, loss, losses


INFLATED = dataclasses.replace(LAZY, per_task=_inflated)


@pytest.mark.parametrize(
    ("broken", "steps", "message"),
    [(ETA_DOUBLED, "1", "K = 1 identity violated"), (INFLATED, "2", "bound violated")],
)
def test_report_fails_when_a_lazy_property_breaks(broken, steps, message, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(estimators.REGISTRY, "lazy", broken)
    args = [
        "report",
        "--ks",
        steps,
        "--problems",
        "sinusoid-mlp",
        "--estimators",
        "lazy",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 1
    assert message in capsys.readouterr().out


def test_report_refuses_unknown_estimators(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--estimators", "maml++"])
    assert "invalid choice: 'maml++'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown estimators \['maml\+\+'\]"):
        lazymaml.report.run(ks=[1], names=["maml++"], progress=False)


def test_the_bound_is_computed_once_per_problem_and_costed_apart():
    """One trajectory of the longest K per problem (so max K Hessians, not the sum over K), its
    time reported on its own; none when no lazy estimator is measured."""
    results = measure(ks=[2, 1], names=["lazy"], problem_names=["sinusoid-mlp"], progress=False)
    [cost] = results.bound_costs
    assert (cost.problem, cost.parameters, cost.hessians) == ("sinusoid-mlp", 481, 2)
    assert cost.seconds > 0
    assert [r.bound for r in results.rows if r.estimator == "lazy"] == [
        lazymaml.bound_terms(*PROBLEMS["sinusoid-mlp"](0, "cpu"), k, 0.01).bound() for k in (2, 1)
    ]
    assert (
        measure(ks=[1], names=["first_order"], problem_names=["sinusoid-mlp"], progress=False).bound_costs
        == []
    )


def test_threads_default_to_one_unless_asked(monkeypatch):
    """1 whatever torch would choose (here made 3), unless asked: by argument or environment."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert threads(None) == 1 and threads(2) == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert threads(None) == 3  # torch's own choice, which follows the environment
        assert threads(1) == 1
    finally:
        torch.set_num_threads(before)


def test_report_restores_torch_threads(tmp_path, capsys):
    before = torch.get_num_threads()
    args = ["report", "--ks", "1", "--problems", "sinusoid-mlp", "--estimators", "lazy", "--threads", "2"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == before
    assert "on 2 thread(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["report", "--threads", "0"])
