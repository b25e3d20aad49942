from gradcheck.__main__ import main


def test_python_m_gradcheck_verifies_the_oracle(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "oracle agrees with finite differences" in out
    assert "first-order MAML vs the oracle" in out
