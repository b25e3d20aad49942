"""The diagnosis names what a wrong candidate computes: one real-world bug per label.

Every candidate is an implementation (``tests/gradcheck/implementations.py``) with one bug
planted the way users write it, run through ``validate`` on a conv → BatchNorm → tanh → linear
net in float64 with 4 tasks. Tolerances: the diagnosis uses validate's default, rtol = 1e-9 for
float64 — float64 implementations of the same quantity agree to ~1e-15 on this net, and the
smallest planted bug, α held as a float32 tensor, moves the meta-gradient by ~1e-8 relative. A
hypothesis that explains a candidate to 1e-9 pins its setting: the fitted α′ and γ′ are asserted
to 1e-6 relative (the fit stops as soon as it explains), the scale of a sum over 4 tasks to 1e-6.
"""

import functools

import pytest
import torch

from gradcheck import Task, diagnose, oracle, validate
from gradcheck.diagnose import LABELS
from tests.gradcheck.implementations import (
    functional_maml,
    higher_default_maml,
    meta_batch_mean,
)
from tests.helpers import (
    assert_same_state,
    conv_bn,
    image_task,
    mlp,
    model_state,
    regression_task,
    with_gradients,
)

STEPS, LR = 3, 0.3  # 0.3 is not a float32 number: float32(0.3) = 0.30000001192092896
LR32 = float(torch.tensor(LR, dtype=torch.float32))
NAMES = ("0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias")  # conv, BatchNorm, head
HEAD = ("4.weight", "4.bias")


def problem():
    return conv_bn().train(), [image_task(seed) for seed in range(4)]


def summed(model, tasks, steps, inner_lr):
    return meta_batch_mean(model, tasks, steps, inner_lr, reduce=torch.sum)


def only(names):
    return functools.partial(functional_maml, adapt=lambda n: n in names)


# label, case, candidate, validate's keyword arguments, what the diagnosis must also report
CASES = [
    ("exact", "correct torch.func MAML", functional_maml, {}, {}),
    ("scaled", "sum over the 4 tasks, not the mean", summed, {"meta_batch": True}, {"scale": 4.0}),
    ("first_order", "create_graph missing", functools.partial(functional_maml, create_graph=False), {}, {}),
    ("no_meta_gradient", "higher's copy_initial_weights=True", higher_default_maml, {}, {}),
    (
        "adapt",
        "BatchNorm affine not adapted",
        only({"0.weight", "0.bias", *HEAD}),
        {},
        {"adapt": ("0.weight", "0.bias", *HEAD)},
    ),
    ("adapt", "ANIL head where MAML was asked", only(set(HEAD)), {}, {"adapt": HEAD}),
    ("adapt", "MAML where ANIL was asked", functional_maml, {"adapt": "head"}, {"adapt": NAMES}),
    (
        "adapt",
        "ANIL plus BatchNorm where ANIL was asked",
        only({"1.weight", "1.bias", *HEAD}),
        {"adapt": "head"},
        {"adapt": ("1.weight", "1.bias", *HEAD)},
    ),
    ("steps", "one inner step too many", functools.partial(functional_maml, extra_steps=1), {}, {"steps": 4}),
    ("steps", "one inner step too few", functools.partial(functional_maml, extra_steps=-1), {}, {"steps": 2}),
    (
        "inner_lr",
        "α stored as a float32 tensor",
        functools.partial(functional_maml, lr_dtype=torch.float32),
        {},
        {"inner_lr": LR32},
    ),
    (
        "inner_lr",
        "learning rate applied twice",
        lambda m, t, k, lr: functional_maml(m, t, k, lr, lr_scale=lr),
        {},
        {"inner_lr": LR**2},
    ),
    ("leap", "query scored half-way to φ_K", functools.partial(functional_maml, leap=0.5), {}, {"leap": 0.5}),
    ("unexplained", "support and query swapped", functools.partial(functional_maml, swap=True), {}, {}),
]


# the most oracle calls each label takes here: the hypotheses are ordered cheapest and likeliest
# first, and a fit that cannot explain the candidate gives up early
CALLS = {
    "exact": 0,
    "scaled": 0,
    "no_meta_gradient": 0,
    "first_order": 1,
    "adapt": 5,
    "steps": 7,
    "inner_lr": 14,
    "leap": 20,
    "unexplained": 11,
}


def test_every_label_has_a_case():
    from tests.gradcheck.test_lazy_implementations import CASES as LAZY_CASES

    lazy = {label for _, _, label, *_ in LAZY_CASES}  # jacobian_step: a lazy reference's only
    assert {label for label, *_ in CASES} | lazy == set(LABELS)


@pytest.mark.parametrize(
    ("label", "candidate", "options", "expected"),
    [
        pytest.param(label, fn, options, expected, id=f"{label}: {case}")
        for label, case, fn, options, expected in CASES
    ],
)
def test_each_real_world_bug_gets_its_label(label, candidate, options, expected):
    model, tasks = problem()
    if options.get("meta_batch"):
        tasks = Task.stack(tasks)
    before = model_state(with_gradients(model))
    result = validate(candidate, model, tasks, STEPS, LR, **options)
    diagnosis = result.diagnosis
    assert diagnosis.label == label, str(diagnosis)
    assert result.gradient_ok() == (label == "exact")
    assert str(result).splitlines()[1] == str(diagnosis)
    if "scale" in expected:
        assert diagnosis.scale == pytest.approx(expected["scale"], rel=1e-6)
        assert "the sum over the 4 tasks instead of their mean" in diagnosis.detail
    for key in ("steps", "adapt"):
        if key in expected:
            assert diagnosis.settings[key] == expected[key]
    for key in ("inner_lr", "leap"):
        if key in expected:
            assert diagnosis.settings[key] == pytest.approx(expected[key], rel=1e-6)
    assert diagnosis.oracle_calls <= CALLS[label]
    if label not in ("exact", "unexplained"):
        assert diagnosis.residual <= 1e-9 * 4  # explained to the checking tolerance (norm-wise)
    assert_same_state(before, model_state(model))


def test_a_layer_left_out_of_the_inner_loop_is_found_module_by_module():
    model, tasks = mlp([2, 6, 6, 1], "tanh"), [regression_task(seed) for seed in range(2)]
    outer_layers = {"0.weight", "0.bias", "4.weight", "4.bias"}  # the middle Linear, 2, not adapted
    result = validate(only(outer_layers), model, tasks, STEPS, LR)
    assert result.diagnosis.label == "adapt"
    assert result.diagnosis.settings["adapt"] == ("0.weight", "0.bias", "4.weight", "4.bias")
    assert result.diagnosis.hypothesis == "adapt = all but module '2'"


def test_float32_learning_rate_is_found_exactly_and_named():
    model, tasks = problem()
    bad = functional_maml(model, tasks[0], STEPS, LR, lr_dtype=torch.float32)
    diagnosis = diagnose(bad, model, tasks[0], STEPS, LR)
    assert diagnosis.label == "inner_lr"
    assert diagnosis.settings["inner_lr"] == pytest.approx(LR32, rel=1e-12)
    assert "α stored as a float32 tensor" in diagnosis.detail
    assert f"{diagnosis.settings['inner_lr']!r}" in diagnosis.detail


def test_unexplained_names_the_parameters_that_dominate_the_error():
    model, tasks = problem()
    exact = oracle.meta_gradient(model, tasks, STEPS, LR)
    wrong = {**exact, "1.bias": exact["1.bias"] + 0.5}  # one parameter's gradient is off
    diagnosis = diagnose(wrong, model, tasks, STEPS, LR)
    assert diagnosis.label == "unexplained"
    assert diagnosis.disagree[0] == "1.bias"
    assert "1.bias (100% of |c − g|²)" in diagnosis.detail
    assert "closest:" in diagnosis.detail


def test_each_setting_is_computed_once_and_the_easy_labels_cost_no_oracle_call(monkeypatch):
    model, tasks = problem()
    exact = oracle.meta_gradient(model, tasks, STEPS, LR)
    seen = []
    real = oracle.gradient

    def counting(model, task_or_tasks, loop):
        seen.append(loop)  # the settings object itself: what the cache is keyed by
        return real(model, task_or_tasks, loop)

    monkeypatch.setattr(oracle, "gradient", counting)
    for candidate, label in (
        (exact, "exact"),
        ({n: 4 * g for n, g in exact.items()}, "scaled"),
        ({n: torch.zeros_like(g) for n, g in exact.items()}, "no_meta_gradient"),
    ):
        assert diagnose(candidate, model, tasks, STEPS, LR, reference_gradient=exact).label == label
    assert seen == []
    wrong = {n: g.flip(0) for n, g in exact.items()}
    diagnosis = diagnose(wrong, model, tasks, STEPS, LR, reference_gradient=exact)
    assert diagnosis.label == "unexplained"
    assert len(seen) == len(set(seen)) == diagnosis.oracle_calls


def test_tolerance_decides_what_needs_explaining():
    model, tasks = problem()
    bad = functional_maml(model, tasks[0], STEPS, LR, lr_dtype=torch.float32)
    assert diagnose(bad, model, tasks[0], STEPS, LR, rtol=1e-6).label == "exact"  # 4e-8 is within 1e-6
    assert diagnose(bad, model, tasks[0], STEPS, LR, rtol=1e-10).label == "inner_lr"


def test_keys_that_differ_are_unexplained_without_oracle_calls():
    model, tasks = problem()
    exact = oracle.meta_gradient(model, tasks[0], STEPS, LR)
    del exact["0.bias"]
    diagnosis = diagnose(
        exact, model, tasks[0], STEPS, LR, reference_gradient=oracle.meta_gradient(model, tasks[0], STEPS, LR)
    )
    assert diagnosis.label == "unexplained" and "missing ['0.bias']" in diagnosis.detail
    assert diagnosis.oracle_calls == 0


def test_a_candidate_with_nan_is_unexplained_at_once():
    model, tasks = problem()
    exact = oracle.meta_gradient(model, tasks[0], STEPS, LR)
    broken = {**exact, "4.bias": torch.full_like(exact["4.bias"], float("nan"))}
    diagnosis = diagnose(broken, model, tasks[0], STEPS, LR, reference_gradient=exact)
    assert diagnosis.label == "unexplained" and "not finite (NaN or inf) in 4.bias" in diagnosis.detail
    assert diagnosis.oracle_calls == 0
