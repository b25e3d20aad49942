"""The command-line entry points: ``python -m gradcheck`` (self-verification) and the dispatch of
``python -m lazymaml`` (its ``report`` is tested in tests/lazymaml/test_report.py)."""

from gradcheck.__main__ import main as gradcheck_main
from lazymaml.__main__ import main


def test_python_m_gradcheck_verifies_the_oracle(capsys):
    assert gradcheck_main([]) == 0
    out = capsys.readouterr().out
    assert "oracle agrees with finite differences" in out
    assert "first-order MAML vs the oracle" in out


def test_python_m_lazymaml_needs_the_report_command(capsys):
    assert main([]) == 2
    assert main(["plot"]) == 2
    assert "usage: python -m lazymaml report" in capsys.readouterr().err
