"""validate() has teeth: correct implementations pass, each classic bug is reported.

Tolerances: EXACT holds float64 implementations of the same quantity (they agree to ~1e-15
here); the defaults (rtol 1e-9 for float64, atol 0) are the policy of gradcheck.tolerances.
A reference other than the oracle — ``lazy`` below, an independent ``torch.func`` lazy
meta-gradient written here — is held to the same defaults.
"""

import functools

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from gradcheck import Task, TaskBatch, diagnose, finite_differences, oracle, validate
from tests.gradcheck.implementations import (
    BROKEN,
    CORRECT,
    autograd_lazy,
    clone_adapt_maml,
    functional_maml,
    meta_batch_mean,
    summed_lazy,
    vmap_maml,
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
    assert [str(e.change).split(" (")[0] for e in result.side_effects] == [
        f"parameter {n} modified" for n in ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
    ]
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


class SharedFeatures(nn.Module):
    """A network that reaches its conv → BatchNorm → tanh block under two names (``features`` and
    ``alias``), as wrapped models do: every tensor in it has two names."""

    def __init__(self):
        super().__init__()
        net = conv_bn()
        self.features = net[:3]
        self.alias = self.features
        self.head = net[3:]

    def forward(self, x):
        return self.head(self.features(x))


def leaky(model, task, steps, inner_lr):
    """Exact MAML whose clone shares the model's buffers: BatchNorm statistics land in the model.

    (Not ``functional_maml``: ``torch.func.functional_call`` on a model that registers a module
    twice leaves the passed tensors in the model on torch 2.13, which validate reports as
    "replaced" — a side effect of another kind.)
    """
    return clone_adapt_maml(model, task, steps, inner_lr, share_buffers=True)


def test_batchnorm_side_effects_are_reported_apart_from_an_exact_gradient():
    model = SharedFeatures().train()
    before = model_state(model)
    result = validate(leaky, model, [image_task(seed) for seed in range(4)], STEPS, LR)
    assert result.gradient_ok() and not result.ok()
    assert result.diagnosis.label == "exact"
    # each tensor once, under its first name: never also as alias.1.…, never once per task
    assert [e.name for e in result.side_effects] == [
        "features.1.running_mean",
        "features.1.running_var",
        "features.1.num_batches_tracked",
    ]
    assert all(e.calls == e.of == 4 and e.change.what == "modified" for e in result.side_effects)
    assert all(e.change.max_abs > 0 for e in result.side_effects)
    lines = str(result).splitlines()
    assert lines[0] == "gradient PASS against the oracle, side effects 3  (rtol=1e-09, atol=0)"
    effects = [line for line in lines if line.startswith("side effect on the model: ")]
    assert len(effects) == 3
    assert effects[0].startswith(
        "side effect on the model: buffer features.1.running_mean modified (max |change|"
    )
    assert effects[0].endswith("in 4 of 4 candidate calls")
    result.assert_close(allow_side_effects=True)
    with pytest.raises(AssertionError, match="candidate disagrees with the oracle"):
        result.assert_close()
    assert_same_state(before, model_state(model))


def test_torchopt_on_the_model_itself_is_exact_with_batchnorm_side_effects():
    pytest.importorskip("torchopt")
    model = conv_bn().train()
    result = validate(CORRECT["torchopt MetaSGD"], model, [image_task(0), image_task(1)], STEPS, LR)
    assert result.gradient_ok(**EXACT)
    assert {e.name for e in result.side_effects} == {
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }


def test_a_shared_module_switched_to_eval_is_reported_once():
    model = SharedFeatures().train()

    def switches(model, task, steps, inner_lr):
        clone_adapt_maml(model, task, steps, inner_lr)
        model.alias[2].eval()  # the tanh, reachable as features.2 and alias.2

    result = validate(switches, model, [image_task(0), image_task(1)], STEPS, LR)
    assert [str(e.change) for e in result.side_effects] == ["mode features.2 switched to eval"]
    assert result.side_effects[0].calls == 2 and model.features[2].training


def test_headline_and_diagnosis_lead_the_summary():
    model, tasks = problem()
    result = validate(BROKEN["missing create_graph"], model, tasks, STEPS, LR)
    lines = str(result).splitlines()
    assert lines[0] == "gradient FAIL against the oracle, side effects none  (rtol=1e-09, atol=0)"
    assert lines[1].startswith("diagnosis: first_order — the candidate equals first-order MAML")
    assert result.summary(rtol=1e3).startswith(
        "gradient PASS against the oracle, side effects none  (rtol=1000, atol=0)"
    )


def test_meta_batch_keeps_per_task_rows_and_calls_b_plus_one_times():
    model, tasks = problem()
    calls = []

    def recording(model, batch, steps, inner_lr):
        calls.append(batch)
        return meta_batch_mean(model, batch, steps, inner_lr)

    result = validate(recording, model, Task.stack(tasks), STEPS, LR, meta_batch=True)
    result.assert_close(**EXACT)
    assert len(result.tasks) == 3 and all(r.ok(**EXACT) for r in result.tasks)
    assert [len(b) for b in calls] == [1, 1, 1, 3] and all(isinstance(b, TaskBatch) for b in calls)
    calls.clear()
    validate(recording, model, tasks, STEPS, LR, meta_batch=True)
    assert [type(b) for b in calls] == [list] * 4 and [len(b) for b in calls] == [1, 1, 1, 3]


def test_meta_batch_sum_passes_per_task_and_fails_overall():
    model, tasks = problem()
    summed = lambda m, ts, k, lr: meta_batch_mean(m, ts, k, lr, reduce=torch.sum)  # noqa: E731
    result = validate(summed, model, tasks, STEPS, LR, meta_batch=True)
    assert all(r.ok(**EXACT) for r in result.tasks)  # a sum over one task is its mean
    assert not result.gradient_ok(**LOOSE)
    assert result.overall.overall.rel_error == pytest.approx(2.0)  # 3 tasks: sum = 3 × mean
    assert result.diagnosis.label == "scaled" and result.diagnosis.scale == pytest.approx(3.0, rel=1e-9)


def test_a_bug_only_some_tasks_hit_is_diagnosed_on_one_of_them():
    model, tasks = problem()

    def off_by_one_on_task_1(model, task, steps, inner_lr):
        return functional_maml(model, task, steps, inner_lr, extra_steps=int(task is tasks[1]))

    result = validate(off_by_one_on_task_1, model, tasks, STEPS, LR)
    assert [r.ok(**EXACT) for r in result.tasks] == [True, False, True]
    assert result.diagnosed_task == 1
    assert result.diagnosis.label == "steps" and result.diagnosis.settings == {"steps": STEPS + 1}
    assert str(result).splitlines()[1].startswith("diagnosis of task 1 (some tasks pass): steps — ")


def test_per_task_errors_that_cancel_in_the_mean_still_fail():
    """Task 0's gradient is off by +δ and task 1's by −δ, so their mean is exact: the verdict must
    judge every task, not only the mean."""
    model, tasks = problem()
    tasks = tasks[:2]

    def cancelling(model, task, steps, inner_lr):
        sign = 1.0 if task is tasks[0] else -1.0
        return {n: g + sign * 0.1 for n, g in functional_maml(model, task, steps, inner_lr).items()}

    result = validate(cancelling, model, tasks, STEPS, LR)
    assert result.overall.ok(**EXACT)  # the mean is exact to rounding
    assert not any(r.ok(**LOOSE) for r in result.tasks)
    assert not result.gradient_ok(**LOOSE) and not result.ok(**LOOSE)


@pytest.mark.parametrize(
    ("norm", "exact"),
    [
        pytest.param(lambda c: nn.BatchNorm2d(c, track_running_stats=False), False, id="BatchNorm2d"),
        pytest.param(lambda c: nn.GroupNorm(1, c), True, id="GroupNorm"),
    ],
)
def test_vmap_maml_through_batchnorm_is_flagged_and_finite_differences_side_with_the_oracle(norm, exact):
    """torch.func.grad inside vmap through BatchNorm2d gives a wrong meta-gradient (torch 2.13);
    the same vmap MAML through GroupNorm is exact. Finite differences are the independent witness.

    This pins a torch defect (cf. functorch's batching rule for batch_norm's backward): when a
    torch release fixes it, the BatchNorm2d case fails here — then it becomes an exact case."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), norm(3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)).double()
    tasks = Task.stack([image_task(seed) for seed in range(3)])
    result = validate(vmap_maml, model, tasks, STEPS, LR, meta_batch=True)
    assert result.gradient_ok() == exact
    candidate = vmap_maml(model, tasks, STEPS, LR)
    witness = finite_differences.check(candidate, model, tasks, STEPS, LR, directions=4)
    assert witness.ok() == exact
    if not exact:
        assert result.overall.overall.rel_error > 1e-4
        assert finite_differences.check(
            oracle.meta_gradient(model, tasks, STEPS, LR), model, tasks, STEPS, LR, directions=4
        ).ok()
        assert result.diagnosis.label == "unexplained"
        assert "0.bias should get ≈0" in result.diagnosis.detail  # the conv bias right before BatchNorm
        assert "≈0 reference" in str(result)


def lazy(model, task_or_tasks, steps, inner_lr, *, adapt=None, leap=1.0, inner_optimizer="sgd"):
    """The lazy meta-gradient with torch.func, as a reference for validate and diagnose: per task,
    K graph-free SGD steps on the adapted set A, v = ∇L_Q(θ + γ(φ_K − θ)), and
    g = v − γα ∇_θ⟨E_A ∇L_S(θ), v⟩; the mean over the tasks."""
    assert inner_optimizer == "sgd", inner_optimizer
    if isinstance(task_or_tasks, TaskBatch):
        tasks = list(task_or_tasks)
    else:
        tasks = list(task_or_tasks) if isinstance(task_or_tasks, (list, tuple)) else [task_or_tasks]
    theta = {n: p.detach() for n, p in model.named_parameters()}
    adapted = set(theta if adapt is None else adapt)
    eta = leap * inner_lr if steps > 0 else 0.0
    per_task = [_lazy_task(model, task, theta, adapted, steps, inner_lr, leap, eta) for task in tasks]
    return {n: sum(g[n] for g in per_task) / len(tasks) for n in theta}


def _lazy_task(model, task, theta, adapted, steps, inner_lr, leap, eta):
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def support(p):
        return task.support_loss(lambda x: functional_call(model, {**p, **buffers}, (x,)))

    def query(p):
        return task.query_loss(lambda x: functional_call(model, {**p, **buffers}, (x,)))

    phi = dict(theta)
    for _ in range(steps):
        g = grad(support)(phi)
        phi = {n: t - inner_lr * g[n] if n in adapted else t for n, t in phi.items()}
    v = grad(query)({n: t + leap * (phi[n] - t) for n, t in theta.items()})

    def along_v(p):
        g = grad(support)(p)
        return sum((g[n] * v[n]).sum() for n in adapted)

    h = grad(along_v)(theta)
    return {n: v[n] - eta * h[n] for n in theta}


def lazy_problem(tasks=3):
    return mlp([2, 6, 6, 1], "tanh"), [regression_task(seed) for seed in range(tasks)]


def test_a_correct_lazy_candidate_passes_against_a_lazy_reference_and_fails_against_the_oracle():
    model, tasks = lazy_problem()
    before = model_state(with_gradients(model))
    result = validate(autograd_lazy, model, tasks, STEPS, LR, reference=lazy)
    result.assert_close()  # the defaults: rtol 1e-9 (float64), atol 0
    assert result.reference == "the reference 'lazy'" and result.diagnosis.reference == "the reference 'lazy'"
    lines = str(result).splitlines()
    assert lines[0] == "gradient PASS against the reference 'lazy', side effects none  (rtol=1e-09, atol=0)"
    assert lines[1].startswith("diagnosis: exact — agrees with the reference 'lazy' (relative error")
    against_oracle = validate(autograd_lazy, model, tasks, STEPS, LR, diagnosis=False)
    assert not against_oracle.gradient_ok(**LOOSE)  # lazy is not exact MAML at K = 3
    with pytest.raises(AssertionError, match="candidate disagrees with the oracle"):
        against_oracle.assert_close()
    assert_same_state(before, model_state(model))


def test_a_lazy_candidate_summed_over_4_tasks_is_scaled_by_4_against_the_lazy_reference():
    model, tasks = lazy_problem(tasks=4)
    result = validate(summed_lazy, model, tasks, STEPS, LR, meta_batch=True, reference=lazy)
    assert all(r.ok() for r in result.tasks)  # a sum over one task is its mean
    diagnosis = result.diagnosis
    assert diagnosis.label == "scaled" and diagnosis.scale == pytest.approx(4.0, rel=1e-9)
    assert diagnosis.oracle_calls == 0  # the scale needs no further call of the reference
    assert "the candidate is 4.000000 × the reference 'lazy'" in diagnosis.detail
    assert "the sum over the 4 tasks instead of their mean" in diagnosis.detail
    lines = str(result).splitlines()
    assert lines[0].startswith("gradient FAIL against the reference 'lazy', side effects none")
    assert lines[1] == str(diagnosis)
    with pytest.raises(AssertionError, match="candidate disagrees with the reference 'lazy'"):
        result.assert_close()


def test_diagnosis_varies_the_settings_of_a_reference_and_never_passes_it_first_order():
    model, tasks = lazy_problem()
    calls = []

    def recording(model, task_or_tasks, steps, inner_lr, **settings):
        calls.append((steps, settings))
        return lazy(model, task_or_tasks, steps, inner_lr, **settings)

    candidate = autograd_lazy(model, tasks[0], STEPS, LR, extra_steps=1)
    diagnosis = diagnose(candidate, model, tasks[0], STEPS, LR, reference=recording)
    assert diagnosis.label == "steps" and diagnosis.settings == {"steps": STEPS + 1}, str(diagnosis)
    assert "(the reference 'recording' with K = 4 explains it)" in diagnosis.detail
    assert {frozenset(s) for _, s in calls} == {frozenset({"adapt", "leap", "inner_optimizer"})}
    assert STEPS + 1 in [k for k, _ in calls] and diagnosis.oracle_calls == len(calls)
    with pytest.raises(ValueError, match="first_order=True applies to the oracle only"):
        validate(autograd_lazy, model, tasks, STEPS, LR, first_order=True, reference=lazy)
    with pytest.raises(TypeError, match="reference must be None"):
        diagnose(candidate, model, tasks[0], STEPS, LR, reference="lazy")


def test_an_unexplained_candidate_names_the_reference_and_skips_first_order():
    model, tasks = lazy_problem()
    candidate = {n: g.flip(0) for n, g in autograd_lazy(model, tasks[0], STEPS, LR).items()}
    diagnosis = diagnose(candidate, model, tasks[0], STEPS, LR, reference=lazy)
    assert diagnosis.label == "unexplained"
    assert diagnosis.detail.startswith("no nearby setting of the reference 'lazy' explains the candidate")
    assert "first order" not in diagnosis.detail


def test_the_oracle_is_checked_against_finite_differences_by_default():
    model, tasks = problem()
    result = validate(functional_maml, model, tasks, STEPS, LR)
    assert result.reference_check is not None and result.reference_check.ok()
    assert "the oracle agrees with finite differences along 2 of 2 directions" in result.summary()
    assert not validate(functional_maml, model, tasks, STEPS, LR, first_order=True).gradient_ok()
    first = validate(functional_maml, model, tasks, STEPS, LR, first_order=True)
    assert first.reference_check is None and "first_order=True" in first.reference_note
    off = validate(functional_maml, model, tasks, STEPS, LR, check_reference=False)
    assert off.reference_check is None and off.gradient_ok()


def _scaled_oracle(model, task_or_tasks, steps, inner_lr, **settings):
    g = oracle.meta_gradient(model, task_or_tasks, steps, inner_lr, **settings)
    return {n: 1.01 * t for n, t in g.items()}


def test_a_reference_that_disagrees_with_finite_differences_cannot_verify():
    """A wrong reference (what torch's weight-norm defect makes of the oracle), and a candidate
    that agrees with it: never PASS, never a FAIL of the candidate, no diagnosis."""
    model, tasks = problem()
    unchecked = validate(_scaled_oracle, model, tasks, STEPS, LR, reference=_scaled_oracle)
    assert unchecked.reference_check is None and "a user's reference" in unchecked.reference_note
    result = validate(_scaled_oracle, model, tasks, STEPS, LR, reference=_scaled_oracle, check_reference=True)
    assert result.reference_disagrees and not result.gradient_ok() and not result.ok()
    assert result.headline().startswith(
        "cannot verify on this model: the reference '_scaled_oracle' disagrees"
    )
    assert result.diagnosis is None
    with pytest.raises(AssertionError, match="cannot verify the candidate"):
        result.assert_close(allow_side_effects=True)
    with pytest.raises(ValueError, match="first-order"):
        validate(_scaled_oracle, model, tasks, STEPS, LR, first_order=True, check_reference=True)


# --- learned inner rates, the multi-step loss, the step index -------------------------------------
#
# The candidates below are written here in plain autograd over functional_call, as a user would
# port Meta-SGD, MAML++ (per-step rates, multi-step loss, step index) or a learned scalar α; each
# mistake is a keyword. Exactness: the oracle the candidates are compared with is itself checked
# against finite differences by validate (the reference check, on by default), and
# test_rate_gradients_are_the_derivative_of_the_objective holds a rate gradient to central
# differences written here. Tolerances as above: validate's float64 default rtol 1e-9.

RATE_STEPS = 3


def at(model, phi):
    """The model as a function of its input at the parameters ``phi``."""
    return lambda x: functional_call(model, phi, (x,))


def rated_maml(
    model,
    task,
    steps,
    inner_lr,
    *,
    per_step_lr=False,
    query_weights=None,
    step_kwarg=None,
    detach=False,
    create_graph=True,
    first_step_rate=False,
    last_only=False,
    extra_steps=0,
    write_grad=False,
    frozen=(),
):
    """MAML with learned inner rates: ``inner_lr`` a tensor for every parameter or {name: tensor}
    (shape (), the parameter's, or a leading step dimension with ``per_step_lr``). Returns θ's and
    the rates' meta-gradients under the oracle's keys ("inner_lr" / "inner_lr.<name>"), or writes
    them into ``.grad`` (``write_grad``) and returns None. Mistakes: ``detach`` (rates as
    constants), ``create_graph=False`` (first order), ``first_step_rate`` (rate index 0 at every
    step), ``last_only`` (L_Q(φ_K) although ``query_weights``), ``extra_steps``, ``frozen``
    (parameters left out of the inner loop)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = {n: model.get_parameter(n) for n in names}
    rates = {"inner_lr": inner_lr} if isinstance(inner_lr, torch.Tensor) else dict(inner_lr)
    keys = {k if k == "inner_lr" else f"inner_lr.{k}": t for k, t in rates.items()}

    def rate(n, k):
        r = rates["inner_lr"] if "inner_lr" in rates else rates[n]
        r = r.detach() if detach else r
        return r[0 if first_step_rate else k] if per_step_lr else r

    def f(phi, k):
        if step_kwarg is None:
            return at(model, phi)
        return lambda x: functional_call(model, phi, (x,), {step_kwarg: k})

    phi, objective = dict(theta), 0.0
    for k in range(steps + extra_steps):
        loss = task.support_loss(f(phi, k))
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=create_graph)
        phi = {n: p if n in frozen else p - rate(n, k) * g for (n, p), g in zip(phi.items(), grads)}
        if query_weights is not None and not last_only and k < steps + extra_steps - 1:
            objective = objective + query_weights[k] * task.query_loss(f(phi, k))
    last = query_weights[steps + extra_steps - 1] if query_weights is not None and not last_only else 1.0
    objective = objective + last * task.query_loss(f(phi, max(steps + extra_steps - 1, 0)))
    wrt = {**theta, **{k: t for k, t in keys.items() if t.requires_grad}}
    if write_grad:
        objective.backward()
        return None
    return dict(zip(wrt, torch.autograd.grad(objective, list(wrt.values()), allow_unused=True)))


def meta_sgd_rates(model, scale=0.1, seed=3, steps=None):
    """Meta-SGD's rates, one per entry (a leading step dimension of ``steps`` entries if given),
    positive and distinct, as leaf tensors that require grad."""
    g = torch.Generator().manual_seed(seed)
    lead = () if steps is None else (steps,)
    return {
        n: (scale * (0.5 + torch.rand(lead + p.shape, generator=g, dtype=p.dtype))).requires_grad_()
        for n, p in model.named_parameters()
    }


def rate_problem():
    return mlp([2, 5, 1], "tanh"), [regression_task(seed) for seed in range(2)]


def rate_state(rates):
    """Value, .grad and requires_grad of every rate tensor, copied."""
    tensors = rates.values() if isinstance(rates, dict) else [rates]
    return [
        (t.detach().clone(), None if t.grad is None else t.grad.clone(), t.requires_grad) for t in tensors
    ]


def assert_same_rates(before, rates):
    for (value, old, requires_grad), (v, g, r) in zip(before, rate_state(rates), strict=True):
        assert torch.equal(value, v) and requires_grad == r, "a rate's value or requires_grad changed"
        assert (old is None) == (g is None) and (old is None or torch.equal(old, g)), "a rate's .grad changed"


@pytest.mark.parametrize(
    ("case", "per_step_lr", "query_weights"),
    [("Meta-SGD", False, None), ("LSLR K+1, multi-step loss", True, (0.2, 0.3, 0.5))],
)
def test_a_correct_meta_sgd_candidate_passes_rate_gradients_included(case, per_step_lr, query_weights):
    model, tasks = rate_problem()
    rates = meta_sgd_rates(model, steps=RATE_STEPS + 1 if per_step_lr else None)
    options = dict(per_step_lr=per_step_lr, query_weights=query_weights)
    before, kept = model_state(with_gradients(model)), rate_state(rates)
    candidate = functools.partial(rated_maml, **options)
    result = validate(candidate, model, tasks, RATE_STEPS, rates, **options)
    assert result.ok(), str(result)
    assert "agrees with finite differences" in result.reference_note
    names = {r.name for r in result.overall.rows}
    assert {f"inner_lr.{n}" for n in rates} <= names  # the rates were compared, not only θ
    assert_same_state(before, model_state(model))
    assert_same_rates(kept, rates)


def test_rate_gradients_are_the_derivative_of_the_objective():
    """One learned scalar α: the candidate's ∂F/∂α against central differences of F written here."""
    model, tasks = rate_problem()
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    result = validate(rated_maml, model, tasks, RATE_STEPS, alpha)
    assert result.ok(), str(result)

    def objective(a):
        total = 0.0
        for task in tasks:
            phi = {n: p.detach() for n, p in model.named_parameters()}
            for _ in range(RATE_STEPS):
                phi = {n: t.requires_grad_() for n, t in phi.items()}
                loss = task.support_loss(at(model, phi))
                grads = torch.autograd.grad(loss, list(phi.values()))
                phi = {n: (t - a * g).detach() for (n, t), g in zip(phi.items(), grads)}
            total += task.query_loss(at(model, phi)).item()
        return total / len(tasks)

    h = 1e-6  # central differences: error ~ ε|F|/h + h²|F'''|/6 ≈ 1e-10 (docs/verification.md)
    numeric = (objective(0.3 + h) - objective(0.3 - h)) / (2 * h)
    row = next(r for r in result.overall.rows if r.name == "inner_lr")
    assert row.candidate_norm == pytest.approx(abs(numeric), rel=1e-6)  # COORDINATEWISE rtol


class MetaSGDModule(nn.Module):
    """learn2learn's Meta-SGD layout: the learner under ``module``, one rate per parameter of the
    learner's shape in ``lrs`` (parameters of the model, never adapted)."""

    def __init__(self, learner, lr=0.1):
        super().__init__()
        self.module = learner
        self.lrs = nn.ParameterList(
            [
                nn.Parameter(lr * (1 + 0.1 * torch.arange(p.numel(), dtype=p.dtype)).view(p.shape))
                for p in learner.parameters()
            ]
        )

    def forward(self, x):
        return self.module(x)


def l2l_maml(model, task, steps, inner_lr, *, create_graph=True, detach=False):
    """Meta-SGD the learn2learn way: the learner's parameters stepped by the model's own ``lrs``
    (``inner_lr`` is ignored: the rates are the model's), ``backward()`` into every ``.grad``.
    Mistakes: ``create_graph=False`` (first order), ``detach`` (the rates as constants)."""
    names = [f"module.{n}" for n, _ in model.module.named_parameters()]
    phi = {n: model.get_parameter(n) for n in names}
    lrs = [lr.detach() if detach else lr for lr in model.lrs]
    for _ in range(steps):
        loss = task.support_loss(at(model, phi))
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=create_graph)
        phi = {n: p - lr * g for (n, p), g, lr in zip(phi.items(), grads, lrs)}
    task.query_loss(at(model, phi)).backward()


def test_a_learn2learn_layout_candidate_passes_with_rates_under_their_parameter_names():
    learner, tasks = rate_problem()
    model = MetaSGDModule(learner)
    rates = {f"module.{n}": lr for (n, _), lr in zip(learner.named_parameters(), model.lrs)}
    before = model_state(with_gradients(model))
    result = validate(l2l_maml, model, tasks, RATE_STEPS, rates)
    assert result.ok(), str(result)
    rows = {r.name: r for r in result.overall.rows}
    assert rows["lrs.0"].reference_norm > 0 and "inner_lr.module.0.weight" not in rows
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize(
    ("mistake", "label"),
    [({"create_graph": False}, "first_order"), ({"detach": True}, "rates_detached"), ({}, "unexplained")],
)
def test_a_learn2learn_layout_mistake_is_named_and_its_rates_are_never_adapted(mistake, label):
    """The diagnosis runs every hypothesis on the layout (the unexplained case: a θ entry
    negated) without adapting the model's own rates ``lrs.*``, which the oracle would refuse."""
    learner, tasks = rate_problem()
    model = MetaSGDModule(learner)
    rates = {f"module.{n}": lr for (n, _), lr in zip(learner.named_parameters(), model.lrs)}
    before = model_state(with_gradients(model))
    if mistake:
        found = validate(functools.partial(l2l_maml, **mistake), model, tasks, RATE_STEPS, rates).diagnosis
    else:
        exact = oracle.meta_gradient(model, tasks, RATE_STEPS, rates)
        found = diagnose({**exact, "module.0.bias": -exact["module.0.bias"]}, model, tasks, RATE_STEPS, rates)
        assert "adapt = " in found.detail or found.oracle_calls > 3  # the adapted sets were tried
    assert found.label == label, str(found)
    assert_same_state(before, model_state(model))


def test_a_reference_function_gets_the_rates_as_given_and_the_rate_settings():
    model, tasks = rate_problem()
    rates = meta_sgd_rates(model, steps=RATE_STEPS + 1)
    seen = []

    def mine(model, task_or_tasks, steps, inner_lr, **settings):
        seen.append((inner_lr, settings))
        return oracle.meta_gradient(model, task_or_tasks, steps, inner_lr, **settings)

    candidate = functools.partial(rated_maml, per_step_lr=True)
    assert validate(candidate, model, tasks, RATE_STEPS, rates, per_step_lr=True, reference=mine).ok()
    assert all(lr is rates and settings["per_step_lr"] is True for lr, settings in seen)


def test_a_subset_of_the_parameters_adapted_with_their_rates_is_found():
    """Rates per parameter: an adapted set without 2.* keeps the others' rates; 2.*'s rates then
    get no gradient (the candidate does not step them)."""
    model, tasks = rate_problem()
    rates = meta_sgd_rates(model)
    found = validate(
        functools.partial(rated_maml, frozen=("2.weight", "2.bias")), model, tasks, RATE_STEPS, rates
    )
    assert found.diagnosis.label == "adapt", str(found.diagnosis)
    assert found.diagnosis.settings["adapt"] == ("0.weight", "0.bias")


def test_rate_gradients_read_from_dot_grad_and_the_users_rates_left_as_they_were():
    model, tasks = rate_problem()
    rates = meta_sgd_rates(model)
    for t in rates.values():  # a user mid-training: the rates hold a .grad of their own
        t.grad = torch.full_like(t, 7.0)
    kept = rate_state(rates)
    result = validate(functools.partial(rated_maml, write_grad=True), model, tasks, RATE_STEPS, rates)
    assert result.ok(), str(result)
    assert_same_rates(kept, rates)
    # the same candidate returning nothing for the rates: each missing rate is named as a rate
    theta_only = lambda *a: {n: g for n, g in rated_maml(*a).items() if not n.startswith("inner_lr")}  # noqa: E731
    result = validate(theta_only, model, tasks, RATE_STEPS, rates)
    assert not result.ok() and result.diagnosis.label == "rates_detached", str(result)
    assert "the meta-gradient of the learned inner rates inner_lr.0.weight" in str(result)
    assert_same_rates(kept, rates)


def test_a_candidate_that_steps_the_rates_is_reported_and_undone_also_when_it_raises():
    model, tasks = rate_problem()
    rates = meta_sgd_rates(model)
    kept, before = rate_state(rates), model_state(model)

    def stepping(model, task, steps, inner_lr):
        out = rated_maml(model, task, steps, inner_lr)
        with torch.no_grad():
            inner_lr["0.weight"].sub_(0.01)  # an outer step on the user's rate
        inner_lr["0.bias"].grad = torch.ones_like(inner_lr["0.bias"])
        return out

    result = validate(stepping, model, tasks, RATE_STEPS, rates)
    assert result.gradient_ok() and not result.ok()
    effects = {str(s.change) for s in result.side_effects}
    assert any(e.startswith("rate inner_lr.0.weight modified") for e in effects), effects
    assert "rate gradient inner_lr.0.bias.grad changed" in effects
    assert "side effect on the inner rates: rate inner_lr.0.weight modified" in str(result)
    assert_same_rates(kept, rates)

    def failing(model, task, steps, inner_lr):
        stepping(model, task, steps, inner_lr)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        validate(failing, model, tasks, RATE_STEPS, rates)
    assert_same_rates(kept, rates)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize(
    ("rates", "options", "message"),
    [
        (lambda m: {n: torch.full((3,), 0.1, dtype=p.dtype) for n, p in m.named_parameters()}, {}, "shape"),
        (lambda m: torch.tensor(-0.1, dtype=torch.float64), {}, "negative"),
        (
            lambda m: torch.tensor(0.1, dtype=torch.float64),
            {"query_weights": (0.5, 0.5)},
            "one weight per inner step",
        ),
        (
            lambda m: meta_sgd_rates(m, steps=RATE_STEPS - 1),
            {"per_step_lr": True},
            "steps in its leading dimension",
        ),
        (lambda m: {"0.weight": torch.tensor(0.1, dtype=torch.float64)}, {}, "no rate for adapted"),
    ],
    ids=["wrong shape", "negative", "query_weights length", "too few steps", "a rate missing"],
)
@pytest.mark.parametrize("entry", ["validate", "diagnose"])
def test_bad_rates_raise_clearly_and_leave_model_and_rates_untouched(rates, options, message, entry):
    model, tasks = rate_problem()
    given = rates(model)
    before, kept = model_state(with_gradients(model)), rate_state(given)
    with pytest.raises(ValueError, match=message):
        if entry == "validate":
            validate(rated_maml, model, tasks, RATE_STEPS, given, **options)
        else:
            diagnose(
                {n: torch.zeros_like(p) for n, p in model.named_parameters()},
                model,
                tasks,
                RATE_STEPS,
                given,
                **options,
            )
    assert_same_state(before, model_state(model))
    assert_same_rates(kept, given)


class LearnedAlpha(nn.Module):
    """One learned α held by the model (a 0-dim parameter, given alone as ``inner_lr``)."""

    def __init__(self, learner):
        super().__init__()
        self.learner = learner
        self.alpha = nn.Parameter(torch.tensor(0.25, dtype=torch.float64))

    def forward(self, x):
        return self.learner(x)


def alpha_maml(model, task, steps, inner_lr, **mistake):
    """MAML of the learner with the model's own α: the learner's keys prefixed, α's under "alpha"."""
    grads = rated_maml(model.learner, task, steps, inner_lr, **mistake)
    return {"alpha" if n == "inner_lr" else f"learner.{n}": g for n, g in grads.items()}


def test_a_model_held_alpha_is_keyed_by_its_name_and_never_in_an_adapted_set():
    learner, tasks = rate_problem()
    model = LearnedAlpha(learner)
    names = [n for n, _ in model.named_parameters() if n != "alpha"]
    assert validate(alpha_maml, model, tasks, RATE_STEPS, model.alpha).ok()
    exact = oracle.meta_gradient(model, tasks, RATE_STEPS, model.alpha)
    assert exact["alpha"].ne(0).all() and set(exact) == {*names, "alpha"}
    frozen = functools.partial(alpha_maml, frozen=("2.weight", "2.bias"))
    found = validate(frozen, model, tasks, RATE_STEPS, model.alpha).diagnosis
    assert found.label == "adapt" and "alpha" not in found.settings["adapt"], str(found)
    wrong = {**exact, "learner.0.bias": -exact["learner.0.bias"]}
    found = diagnose(wrong, model, tasks, RATE_STEPS, model.alpha)
    assert found.label == "unexplained", str(found)
