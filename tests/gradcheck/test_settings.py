"""gradcheck.settings: one frozen, validated object carries every inner-loop setting.

Exact values only (η is a product of the settings, computed in float64 both here and there).
"""

import dataclasses

import pytest
import torch

from gradcheck import optim
from gradcheck.optim import AdamUpdate, Sgd, TorchOptimizer
from gradcheck.settings import InnerLoop


@pytest.mark.parametrize(
    ("changes", "error", "pattern"),
    [
        (dict(steps=-1), ValueError, "steps must be >= 0"),
        (dict(steps=2.0), TypeError, "steps must be an integer"),
        (dict(steps=True), TypeError, "steps must be an integer"),
        (dict(inner_lr=0.0), ValueError, "inner_lr must be > 0"),
        (dict(inner_lr=float("nan")), TypeError, "inner_lr must be a finite real"),
        (dict(leap=0.0), ValueError, r"leap .* must be in \(0, 1\]"),
        (dict(leap=1.5), ValueError, r"leap .* must be in \(0, 1\]"),
        (dict(inner_optimizer="rmsprop"), ValueError, "unknown inner_optimizer 'rmsprop'"),
        (dict(inner_optimizer=3), TypeError, "inner_optimizer must be a name, a spec or a factory"),
        (dict(first_order=1), TypeError, "first_order must be True or False"),
        (dict(jacobian_step="double"), ValueError, 'jacobian_step must be "single", "horizon" or a float'),
        (dict(jacobian_step=-0.1), ValueError, "must be finite and >= 0"),
        (dict(jacobian_step=None), TypeError, "jacobian_step must be"),
        (dict(horizon=5), ValueError, r"horizon must be an integer in \[0, steps=3\]"),
        (dict(horizon=-1), ValueError, "horizon must be an integer"),
        (dict(lam=0.0), ValueError, r"lam \(the proximal strength λ\) must be a finite real > 0"),
        (dict(lam=float("inf")), ValueError, "lam"),
        (dict(cg_iterations=0), ValueError, "cg_iterations must be >= 1"),
        (dict(cg_tol=-1e-3), ValueError, "cg_tol must be a finite real > 0"),
        (dict(adapt=3), TypeError, "adapt must be None, a preset, names, prefixes or a predicate"),
    ],
)
def test_a_bad_setting_is_refused_naming_it(changes, error, pattern):
    with pytest.raises(error, match=pattern):
        InnerLoop(**{"steps": 3, "inner_lr": 0.1, **changes})


def test_replace_validates_again_and_leaves_the_original():
    loop = InnerLoop(3, 0.1, 0.5)
    assert loop.replace(steps=4) == InnerLoop(4, 0.1, 0.5)
    assert loop.steps == 3
    with pytest.raises(ValueError, match="steps must be >= 0"):
        loop.replace(steps=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loop.steps = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("jacobian_step", "steps", "eta"),
    [
        ("single", 4, 0.5 * 0.1),
        ("horizon", 4, 0.5 * 4 * 0.1),
        (0.25, 4, 0.25),
        ("single", 0, 0.0),
        (0.25, 0, 0.0),
    ],
)
def test_eta_is_gamma_alpha_gamma_k_alpha_or_the_float_and_zero_without_steps(jacobian_step, steps, eta):
    assert InnerLoop(steps, 0.1, 0.5, jacobian_step=jacobian_step).eta == eta


def test_truncation_defaults_to_all_steps():
    assert InnerLoop(5, 0.1).truncation == 5
    assert InnerLoop(5, 0.1, horizon=2).truncation == 2
    assert InnerLoop(5, 0.1, horizon=0).truncation == 0


def test_settings_are_hashable_with_an_adapted_list():
    """A list of names becomes a tuple: settings can key a cache (the diagnosis's)."""
    a, b = InnerLoop(2, 0.1, adapt=["0", "2.weight"]), InnerLoop(2, 0.1, adapt=("0", "2.weight"))
    assert a == b and hash(a) == hash(b) and a.adapt == ("0", "2.weight")
    assert InnerLoop(2, 0.1, adapt="head").adapt == "head"


def test_numbers_are_normalised():
    loop = InnerLoop(2, 1, 1, lam=2, cg_tol=1, jacobian_step=1)
    assert type(loop.inner_lr) is float and type(loop.leap) is float and type(loop.lam) is float
    assert type(loop.jacobian_step) is float and type(loop.cg_tol) is float


def test_update_is_the_pure_rule_of_a_named_optimizer_and_a_wrapper_otherwise():
    assert InnerLoop(2, 0.1).update() == Sgd(0.1)
    assert InnerLoop(2, 0.1, inner_optimizer="adam").update() == AdamUpdate(0.1, (0.9, 0.999), 1e-8)
    factory = InnerLoop(2, 0.1, inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)).update()
    assert isinstance(factory, TorchOptimizer) and not factory.pure
    assert Sgd(0.1).pure and AdamUpdate(0.1).pure


def test_a_factory_that_returns_no_optimizer_is_refused():
    loop = InnerLoop(2, 0.1, inner_optimizer=lambda p: "sgd")
    with pytest.raises(TypeError, match=r"returned str, not a torch\.optim\.Optimizer"):
        loop.optimizer([torch.zeros(1, requires_grad=True)])


def test_require_names_who_cannot_differentiate_what():
    with pytest.raises(
        ValueError, match=r"the oracle differentiates exactly through inner_optimizer in \['sgd'\]"
    ):
        InnerLoop(2, 0.1, inner_optimizer="adam").require("sgd", by="the oracle")
    InnerLoop(2, 0.1, inner_optimizer="adam").require("sgd", "adam", by="the oracle")


def test_a_spec_at_torch_s_defaults_is_its_name_and_others_stay_specs():
    assert InnerLoop(2, 0.1, inner_optimizer=optim.SGD()).inner_optimizer == "sgd"
    assert InnerLoop(2, 0.1, inner_optimizer=optim.Adam()).inner_optimizer == "adam"
    momentum = optim.SGD(momentum=0.9)
    loop = InnerLoop(2, 0.1, inner_optimizer=momentum)
    assert loop.inner_optimizer == momentum and not loop.is_sgd
    assert hash(loop) == hash(InnerLoop(2, 0.1, inner_optimizer=optim.SGD(momentum=0.9)))
    assert loop.update() == optim.Sgd(0.1, momentum=0.9)
    assert isinstance(loop.optimizer([torch.zeros(1, requires_grad=True)]), torch.optim.SGD)
    assert InnerLoop(2, 0.1, inner_optimizer=optim.AdamW()).spec() == optim.AdamW()


def test_require_takes_spec_classes_for_every_option_and_names_for_the_plain_optimizers():
    momentum = InnerLoop(2, 0.1, inner_optimizer=optim.SGD(momentum=0.9))
    momentum.require(optim.SGD, by="the oracle")
    with pytest.raises(ValueError, match=r"in \['sgd'\], not SGD\(momentum=0.9"):
        momentum.require("sgd", by="estimator 'truncated'")  # plain SGD only: no spec
    factory = InnerLoop(2, 0.1, inner_optimizer=lambda p: torch.optim.AdamW(p, lr=0.1))
    factory.require(optim.AdamW, by="the oracle")
    assert factory.spec() == optim.AdamW()
    with pytest.raises(ValueError, match=r"or a gradcheck\.optim spec SGD"):
        factory.require("sgd", optim.SGD, by="the oracle")


# --- learned rates, the multi-step loss, the step index ---


def test_scored_is_the_final_point_or_each_point_after_a_step():
    assert InnerLoop(3, 0.1).scored() == {3: 1.0}
    assert InnerLoop(0, 0.1).scored() == {0: 1.0}
    assert InnerLoop(3, 0.1, query_weights=(0.5, 0.25, 2)).scored() == {1: 0.5, 2: 0.25, 3: 2.0}


def test_query_weights_become_a_tuple_of_floats_also_from_a_list_or_a_tensor():
    assert InnerLoop(2, 0.1, query_weights=[1, 2]).query_weights == (1.0, 2.0)
    weights = InnerLoop(2, 0.1, query_weights=torch.tensor([0.5, 1.0])).query_weights
    assert weights == (0.5, 1.0) and all(type(w) is float for w in weights)


def test_indexed_passes_the_step_only_when_a_keyword_is_set():
    f = lambda x, **kw: (x, kw)  # noqa: E731
    assert InnerLoop(2, 0.1).indexed(f, 1) is f
    assert InnerLoop(2, 0.1, step_kwarg="num_step").indexed(f, 1)(7) == (7, {"num_step": 1})


def test_a_learned_rate_is_kept_as_given_and_refused_where_one_float_is_needed():
    alpha = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    loop = InnerLoop(2, alpha)
    assert loop.learned and loop.given_lr is alpha and not InnerLoop(2, 0.1).learned
    with pytest.raises(ValueError, match="the bound takes inner_lr as one float"):
        loop.lr("the bound")
    assert InnerLoop(2, 0.1).lr("the bound") == 0.1
    assert loop.replace(step_kwarg="k").extended == ("inner_lr", "step_kwarg")
    assert InnerLoop(3, 0.1, query_weights=(0.2, 0.3, 0.5)).extended == ("query_weights",)
    assert InnerLoop(2, 0.1).extended == ()  # nothing beyond one float α set


@pytest.mark.parametrize(
    "optimizer", ["adam", optim.SGD(momentum=0.9), optim.AdamW(), lambda p: torch.optim.SGD(p, lr=0.1)]
)
def test_learned_rates_take_plain_sgd_only(optimizer):
    alpha = torch.tensor(0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"learned inner rates .* step plain SGD"):
        InnerLoop(2, alpha, inner_optimizer=optimizer)
    assert InnerLoop(2, alpha, inner_optimizer=optim.SGD()).inner_optimizer == "sgd"


def test_replace_reads_the_rates_again_under_a_changed_per_step_lr():
    rates = torch.full((3,), 0.1, dtype=torch.float64, requires_grad=True)
    per_step = InnerLoop(3, rates, per_step_lr=True)
    assert per_step.inner_lr.per_step
    again = per_step.replace(per_step_lr=False)
    assert not again.inner_lr.per_step and again.given_lr is rates
    assert per_step.replace(steps=2).inner_lr is per_step.inner_lr  # unchanged: the same rates
    with pytest.raises(ValueError, match="inner_lr has no step dimension"):
        InnerLoop(3, torch.tensor(0.1, dtype=torch.float64)).replace(per_step_lr=True)
