"""Pins for the defects of ``higher`` 0.2.1 that the oracle works around: each is demonstrated, then
shown handled.

If a future ``higher`` fixes one, its "demonstrated" test fails — a signal that the workaround
can go — while the "handled" tests keep guarding the oracle.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradcheck import compare, finite_differences, oracle
from gradcheck._higher import DifferentiableAdam, higher
from tests.helpers import mlp, reference_meta_gradient, regression_task


def _fresh_import(module, tmp_path):
    """Import ``module`` in a new interpreter that must compile ``higher`` from source (a copy of
    it without bytecode comes first on the path), with SyntaxWarnings shown."""
    shutil.copytree(Path(higher.__file__).parent, tmp_path / "higher", ignore=shutil.ignore_patterns("*.pyc"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [
            sys.executable,
            "-W",
            "always::SyntaxWarning",
            "-c",
            f"import {module}, higher; print(higher.__file__)",
        ],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


def test_higher_emits_syntax_warning_when_compiled(tmp_path):
    result = _fresh_import("higher", tmp_path)
    assert result.stdout.startswith(str(tmp_path))
    assert result.returncode == 0 and "SyntaxWarning" in result.stderr


def test_importing_gradcheck_leaks_no_warning(tmp_path):
    result = _fresh_import("gradcheck", tmp_path)
    assert result.stdout.startswith(str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def _adam_trajectory(optimizer_class, steps=5):
    """φ_K after ``steps`` Adam steps on a loss with small gradients, through higher."""
    model, task = mlp([2, 4, 1]), regression_task()
    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    diffopt = optimizer_class(
        torch.optim.Adam(model.parameters(), lr=0.01), model.parameters(), fmodel=fmodel
    )
    for _ in range(steps):
        diffopt.step(1e-6 * task.support_loss(fmodel))  # gradients ~1e-6: where ε matters
    return torch.cat([p.detach().reshape(-1) for p in fmodel.fast_params])


def _torch_adam_trajectory(steps=5):
    model, task = mlp([2, 4, 1]), regression_task()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        (1e-6 * task.support_loss(model)).backward()
        optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_higher_adam_departs_from_torch_adam():
    theirs, truth = _adam_trajectory(higher.optim.DifferentiableAdam), _torch_adam_trajectory()
    assert (theirs - truth).abs().max() > 1e-6


def test_our_differentiable_adam_follows_torch_adam():
    ours, truth = _adam_trajectory(DifferentiableAdam), _torch_adam_trajectory()
    torch.testing.assert_close(ours, truth, rtol=1e-13, atol=1e-15)


def test_oracle_adam_meta_gradient_matches_finite_differences():
    model, task = mlp([2, 4, 1], "softplus"), regression_task()
    g = oracle.meta_gradient(model, task, 4, 0.05, inner_optimizer="adam", adapt="head")
    fd = finite_differences.meta_gradient(model, task, 4, 0.05, inner_optimizer="adam", adapt="head")
    compare(g, fd).assert_close(rtol=1e-6, atol=1e-9)


def test_oracle_does_not_register_its_adam_with_higher():
    assert higher.optim._opt_mapping[torch.optim.Adam] is higher.optim.DifferentiableAdam


def test_higher_default_copy_initial_weights_detaches_theta():
    """With higher's default, the meta-gradient w.r.t. θ is silently lost; the oracle's is not."""
    model, task = mlp([2, 4, 1]), regression_task()
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(task.support_loss(fmodel))
        lost = torch.autograd.grad(task.query_loss(fmodel), list(model.parameters()), allow_unused=True)
    assert all(g is None for g in lost)
    compare(
        oracle.meta_gradient(model, task, 2, 0.1), reference_meta_gradient(model, task, 2, 0.1)
    ).assert_close(1e-10, 1e-13)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("rmsprop", "unknown inner_optimizer 'rmsprop'"),
        ("adamw", "unknown inner_optimizer 'adamw'"),
        (torch.optim.SGD, r"the oracle differentiates exactly through inner_optimizer in \['adam', 'sgd'\]"),
    ],
)
def test_oracle_refuses_optimizers_it_cannot_differentiate(bad, message):
    model, task = mlp([2, 4, 1]), regression_task()
    with pytest.raises(ValueError, match=message):
        oracle.meta_gradient(model, task, 2, 0.1, inner_optimizer=bad)
