"""validate() has teeth: correct implementations pass, each classic bug is reported."""

import pytest
import torch

from gradcheck import validate
from tests.gradcheck.implementations import BROKEN, CORRECT, functional_maml, meta_batch_mean
from tests.helpers import (
    assert_same_state,
    conv_bn,
    image_task,
    mlp,
    model_state,
    regression_task,
    with_gradients,
)

STEPS, LR = 3, 0.2
EXACT = dict(rtol=1e-9, atol=1e-12)  # float64 implementations of the same quantity
LOOSE = dict(rtol=1e-3, atol=1e-6)  # far looser than anyone would use; the bugs still fail it


def problem():
    return mlp([2, 6, 6, 1], "tanh"), [regression_task(seed) for seed in range(3)]


@pytest.mark.parametrize("name", list(CORRECT))
def test_correct_implementations_pass(name):
    if name.startswith("torchopt"):
        pytest.importorskip("torchopt")
    model, tasks = problem()
    before = model_state(with_gradients(model))
    result = validate(CORRECT[name], model, tasks, STEPS, LR)
    result.assert_close(**EXACT)
    assert len(result.tasks) == 3 and not result.side_effects
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_implementations_fail(name):
    model, tasks = problem()
    before = model_state(with_gradients(model))
    result = validate(BROKEN[name], model, tasks, STEPS, LR)
    assert not result.ok(**LOOSE)
    with pytest.raises(AssertionError, match="candidate disagrees with the oracle"):
        result.assert_close(**LOOSE)
    assert_same_state(before, model_state(model))


def test_clone_adapt_passes_with_batchnorm_in_train_mode():
    model = conv_bn().train()
    result = validate(
        CORRECT["clone/adapt (learn2learn-style)"], model, [image_task(0), image_task(1)], STEPS, LR
    )
    result.assert_close(**EXACT)


def test_batchnorm_statistics_leaked_into_the_model_are_reported_and_undone():
    model = conv_bn().train()
    before = model_state(model)
    leaky = lambda m, t, k, lr: functional_maml(m, t, k, lr, share_buffers=True)  # noqa: E731
    result = validate(leaky, model, [image_task(0), image_task(1)], STEPS, LR)
    assert any("running_mean modified" in s for s in result.side_effects)
    assert not result.ok(**LOOSE)
    assert "side effect on the model" in str(result)
    assert_same_state(before, model_state(model))


def test_meta_batch_mean_passes_and_sum_fails():
    model, tasks = problem()
    validate(meta_batch_mean, model, tasks, STEPS, LR, meta_batch=True).assert_close(**EXACT)
    summed = lambda m, ts, k, lr: meta_batch_mean(m, ts, k, lr, reduce=torch.sum)  # noqa: E731
    result = validate(summed, model, tasks, STEPS, LR, meta_batch=True)
    assert not result.ok(**LOOSE)
    assert result.overall.overall.rel_error == pytest.approx(2.0)  # 3 tasks: sum = 3 × mean


def test_a_candidate_that_steps_the_model_is_reported():
    def steps_the_model(model, task, steps, inner_lr):
        grads = functional_maml(model, task, steps, inner_lr)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.data -= 0.1 * grads[n]  # .data bypasses the version counter; the copy catches it
        return grads

    model, tasks = problem()
    before = model_state(model)
    result = validate(steps_the_model, model, tasks, STEPS, LR)
    assert any("parameter 0.weight modified" in s for s in result.side_effects)
    assert_same_state(before, model_state(model))


def test_report_lists_wrong_keys():
    model, tasks = problem()

    def drops_a_parameter(model, task, steps, inner_lr):
        grads = functional_maml(model, task, steps, inner_lr)
        del grads["0.bias"]
        return grads

    result = validate(drops_a_parameter, model, tasks, STEPS, LR)
    assert not result.ok(rtol=1, atol=1)
    assert all(r.missing == ["0.bias"] for r in (*result.tasks, result.overall))


def test_candidate_exception_propagates_and_model_is_restored():
    model, tasks = problem()
    before = model_state(with_gradients(model))

    def explodes(model, task, steps, inner_lr):
        model.eval()
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        validate(explodes, model, tasks, STEPS, LR)
    assert_same_state(before, model_state(model))


def test_single_task_and_empty_list():
    model, tasks = problem()
    validate(CORRECT["functional (torch.func)"], model, tasks[0], STEPS, LR).assert_close(**EXACT)
    with pytest.raises(ValueError, match="at least one task is needed"):
        validate(CORRECT["functional (torch.func)"], model, [], STEPS, LR)
