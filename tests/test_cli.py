"""The command-line entry points: python -m gradcheck (self-verification) and ... report."""

import dataclasses
import json

import pytest

import lazymaml
import lazymaml.report
from gradcheck.__main__ import main as gradcheck_main
from lazymaml import estimators
from lazymaml.__main__ import main


def test_python_m_gradcheck_verifies_the_oracle(capsys):
    assert gradcheck_main([]) == 0
    out = capsys.readouterr().out
    assert "oracle agrees with finite differences" in out
    assert "first-order MAML vs the oracle" in out


def test_report_writes_table_plot_and_json(tmp_path, capsys):
    args = ["report", "--ks", "1", "2", "--problems", "sinusoid-mlp", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    for name in ("first_order", "reptile", "truncated(T=2)", "imaml(λ=20)", "lazy", "lazy_horizon"):
        assert f"sinusoid-mlp   {name}" in out
    png = (tmp_path / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
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
