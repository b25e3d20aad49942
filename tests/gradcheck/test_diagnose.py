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
from torch import nn

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
    rates = {label for label, *_ in RATE_CASES}  # learned rates and the multi-step loss (below)
    assert {label for label, *_ in CASES} | lazy | rates == set(LABELS)


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


# --- learned inner rates, the multi-step loss, the step index -------------------------------------
#
# The candidates are tests/gradcheck/test_validate.py's hand-written rated_maml, each with one
# mistake, on a tanh MLP (float64, 2 tasks, K = 3); tolerances as above (rtol 1e-9).

RATE_K = 3
WEIGHTS = (0.2, 0.3, 0.5)


def rated(**mistake):
    from tests.gradcheck.test_validate import rated_maml

    return functools.partial(rated_maml, **mistake)


def meta_sgd(model, steps=None):
    from tests.gradcheck.test_validate import meta_sgd_rates

    return meta_sgd_rates(model, steps=steps)


# label, case, the candidate's mistake, validate's settings (the rates: None Meta-SGD, or K + 1 per step)
RATE_CASES = [
    ("exact", "correct Meta-SGD", {}, {}),
    ("rates_detached", "rates .detach()ed in the inner step", {"detach": True}, {}),
    ("first_order", "Meta-SGD without create_graph", {"create_graph": False}, {}),
    ("first_order", "LSLR without create_graph", {"create_graph": False}, {"per_step_lr": True}),
    (
        "per_step_rates_shared",
        "LSLR: rate index 0 at every step",
        {"first_step_rate": True},
        {"per_step_lr": True},
    ),
    ("last_step_only", "multi-step loss not applied", {"last_only": True}, {"query_weights": WEIGHTS}),
    ("steps", "LSLR (K + 1 rates), one step too few", {"extra_steps": -1}, {"per_step_lr": True}),
    ("steps", "Meta-SGD, one step too many", {"extra_steps": 1}, {}),
]


def rate_case(settings):
    model = mlp([2, 5, 1], "tanh")
    tasks = [regression_task(seed) for seed in range(2)]
    return model, tasks, meta_sgd(model, steps=RATE_K + 1 if settings.get("per_step_lr") else None)


def test_every_rate_label_has_a_case():
    assert {"rates_detached", "per_step_rates_shared", "last_step_only"} <= {c[0] for c in RATE_CASES}


@pytest.mark.parametrize(
    ("label", "mistake", "settings"),
    [pytest.param(label, m, s, id=f"{label}: {case}") for label, case, m, s in RATE_CASES],
)
def test_each_rate_mistake_gets_its_label(label, mistake, settings):
    model, tasks, rates = rate_case(settings)
    known = {k: settings[k] for k in ("per_step_lr", "query_weights") if k in settings}
    before = model_state(with_gradients(model))
    kept = [(t.detach().clone(), t.grad) for t in rates.values()]
    result = validate(rated(**known, **mistake), model, tasks, RATE_K, rates, **settings)
    diagnosis = result.diagnosis
    assert diagnosis.label == label, str(diagnosis)
    assert result.gradient_ok() == (label == "exact")
    assert "agrees with finite differences" in result.reference_note  # the reference is exact
    if label != "exact":
        assert diagnosis.residual <= 1e-9 * 2
        assert "the oracle" in diagnosis.detail
    if label == "steps":
        assert diagnosis.settings["steps"] == RATE_K + mistake["extra_steps"]
    assert_same_state(before, model_state(model))
    assert all(torch.equal(t, v) and t.grad is g for t, (v, g) in zip(rates.values(), kept))


def test_rates_shared_over_steps_is_not_mistaken_for_the_truth_or_a_scale():
    """The hypothesis is precise: summing into index 0 without collapsing the rates (the
    candidate's gradient redistributed) or collapsing without summing does not explain it."""
    model, tasks, rates = rate_case({"per_step_lr": True})
    bad = rated(per_step_lr=True, first_step_rate=True)(model, tasks[0], RATE_K, rates)
    loop = dict(per_step_lr=True)
    truth = oracle.meta_gradient(model, tasks[0], RATE_K, rates, **loop)
    summed = {**truth, **{k: torch.zeros_like(t) for k, t in truth.items() if k.startswith("inner_lr")}}
    for k in rates:
        summed[f"inner_lr.{k}"][0] = truth[f"inner_lr.{k}"].sum(0)
    assert diagnose(summed, model, tasks[0], RATE_K, rates, **loop).label != "per_step_rates_shared"
    found = diagnose(bad, model, tasks[0], RATE_K, rates, **loop)
    assert found.label == "per_step_rates_shared", str(found)
    assert found.oracle_calls <= 3  # truth, first order, the collapsed rates
    rows = {k: bad[k] for k in bad if k.startswith("inner_lr")}
    assert all(bool(t[1:].eq(0).all()) and bool(t[0].ne(0).any()) for t in rows.values())


class Stepped(nn.Module):
    """MAML++'s step index: ``forward(x, num_step=k)`` adds a bias of step k — one per inner step,
    so a step index K overruns it."""

    def __init__(self, steps=RATE_K):
        super().__init__()
        self.net = mlp([2, 5, 1], "tanh")
        self.step_bias = nn.Parameter(0.1 * torch.arange(1.0, steps + 1, dtype=torch.float64).view(steps, 1))

    def forward(self, x, num_step):
        return self.net(x) + self.step_bias[num_step]


def test_a_step_index_model_never_runs_k_plus_one_and_says_so():
    model, tasks = Stepped(), [regression_task(seed) for seed in range(2)]
    alpha = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    options = dict(step_kwarg="num_step", query_weights=WEIGHTS)
    assert validate(rated(**options), model, tasks, RATE_K, alpha, **options).ok()
    short = validate(rated(**options, extra_steps=-1), model, tasks, RATE_K, alpha, **options)
    assert short.diagnosis.label == "steps" and short.diagnosis.settings["steps"] == RATE_K - 1
    exact = oracle.meta_gradient(model, tasks, RATE_K, alpha, **options)
    wrong = {**exact, "net.0.bias": -exact["net.0.bias"]}
    found = diagnose(wrong, model, tasks, RATE_K, alpha, **options)
    assert found.label == "unexplained", str(found)
    assert f"not tried: K = {RATE_K + 1} (the model is told the step index by 'num_step'" in found.detail
    assert any(s.startswith(f"K = {RATE_K + 1}") for s in found.skipped)
    assert any("fitted α′" in s for s in found.skipped) and any("fitted γ′" in s for s in found.skipped)


def test_per_step_rates_of_k_entries_skip_k_plus_one():
    model = mlp([2, 5, 1], "tanh")
    tasks = [regression_task(seed) for seed in range(2)]
    rates = meta_sgd(model, steps=RATE_K)
    exact = oracle.meta_gradient(model, tasks, RATE_K, rates, per_step_lr=True)
    wrong = {**exact, "0.bias": -exact["0.bias"]}
    found = diagnose(wrong, model, tasks, RATE_K, rates, per_step_lr=True)
    assert found.label == "unexplained"
    assert f"K = {RATE_K + 1} (the per-step rates have {RATE_K} entries" in found.detail


def test_rates_per_parameter_skip_the_adapted_sets_with_a_parameter_without_a_rate():
    model = mlp([2, 5, 1], "tanh")
    tasks = [regression_task(seed) for seed in range(2)]
    rates = {n: t for n, t in meta_sgd(model).items() if n.startswith("2.")}  # ANIL: the head's rates
    exact = oracle.meta_gradient(model, tasks, RATE_K, rates, adapt="head")
    wrong = {**exact, "0.bias": -exact["0.bias"]}
    found = diagnose(wrong, model, tasks, RATE_K, rates, adapt="head")
    assert found.label == "unexplained", str(found)
    assert any("adapted sets with parameters that have no inner rate" in s for s in found.skipped)
    assert "adapted sets with parameters that have no inner rate" in found.detail


def test_a_missing_rate_gradient_whose_truth_is_zero_is_named_not_passed():
    """A rate of a parameter the loss never reads has a zero meta-gradient: a candidate that
    leaves that key out is not 'exact' — the key is named."""
    from tests.helpers import Spare

    model, task = Spare(), regression_task(0)
    rates = {n: torch.full_like(p, 0.1).requires_grad_() for n, p in model.named_parameters()}
    exact = oracle.meta_gradient(model, task, RATE_K, rates)
    assert not exact["inner_lr.spare"].any() and exact["inner_lr.linear.weight"].any()
    left_out = {k: g for k, g in exact.items() if k != "inner_lr.spare"}
    found = diagnose(left_out, model, task, RATE_K, rates)
    assert found.label == "unexplained", str(found)
    assert "returns no meta-gradient for the learned inner rates ['inner_lr.spare']" in found.detail
