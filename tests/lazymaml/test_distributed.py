"""torch.distributed: every rank's ``p.grad`` is the single-process mean over the union of tasks.

Two processes on the gloo backend (CPU), spawned with ``torch.multiprocessing`` on a free
localhost port, one spawn for every scenario (starting processes costs seconds). The ranks hold
3 and 2 tasks: a mean of the ranks' means would weigh rank 1's tasks 3/2 as much, a sum would
be 5 times too large, so both are caught by the comparison.

Tolerance 1e-12 relative (float64): the distributed result sums the same per-task
gradients in a different order (per rank, then across ranks) and divides once; that reorders a
handful of additions, ~1e-16 relative each.
"""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lazymaml
from gradcheck import Task, compare
from tests.helpers import mlp, regression_task

RTOL = 1e-12
SEEDS = ([0, 1, 2], [3, 4])  # rank 0's tasks, rank 1's tasks
SCENARIOS = {  # name -> learner options (3 steps of 0.2, γ = 0.8, ANIL)
    "lazy batched": dict(estimator="lazy", batched=True),
    "maml sequential": dict(estimator="maml", batched=False),
    "reptile": dict(estimator="reptile"),
}
PRESET = 0.25  # every p.grad starts here: meta_backward accumulates


def _learner(model, group=None, **options):
    return lazymaml.MetaLearner(model, 3, 0.2, leap=0.8, adapt="head", process_group=group, **options)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results[rank] = _scenarios(rank)
    # destroyed once no learner refers to the group (a group outliving it can abort gloo at exit)
    dist.destroy_process_group()


def _scenarios(rank: int) -> dict:
    group = dist.group.WORLD
    tasks = [regression_task(s) for s in SEEDS[rank]]
    out = {}
    for name, options in SCENARIOS.items():
        model = mlp([2, 5, 1])
        for p in model.parameters():
            p.grad = torch.full_like(p, PRESET)
        loss = _learner(model, group, **options).meta_backward(tasks)
        out[name] = (_grads(model), loss)

    # one rank's task fails: every rank raises, nobody's p.grad changes
    model = mlp([2, 5, 1])
    learner = _learner(model, group)
    bad = Task.from_closures(
        lambda f: f(torch.ones(2, 2, dtype=torch.float64)).sum() * float("nan"), lambda f: 0
    )
    try:
        learner.meta_backward([*tasks, bad] if rank == 1 else tasks)
        out["failure"] = "no error"
    except Exception as error:
        out["failure"] = (type(error).__name__, str(error), all(p.grad is None for p in model.parameters()))

    # one rank's data is refused before anything is computed (float32 tasks, a float64 model):
    # that rank still joins the all-reduce, so the other raises instead of waiting forever
    model = mlp([2, 5, 1])
    learner = _learner(model, group)
    try:
        learner.meta_backward([t.to(torch.float32) for t in tasks] if rank == 1 else tasks)
        out["refused"] = "no error"
    except Exception as error:
        out["refused"] = (type(error).__name__, str(error), all(p.grad is None for p in model.parameters()))

    # the ranks' parameters differ: refused at construction, on every rank
    model = mlp([2, 5, 1])
    if rank == 1:
        with torch.no_grad():
            model[0].bias[0] += 1e-9
    try:
        _learner(model, group)
        out["mismatch"] = "no error"
    except ValueError as error:
        out["mismatch"] = str(error)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    """Every scenario run on 2 gloo ranks: {rank: {scenario: result}}."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
        return dict(results)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_each_rank_holds_the_mean_over_the_union_of_tasks(ranks, scenario):
    model = mlp([2, 5, 1])
    for p in model.parameters():
        p.grad = torch.full_like(p, PRESET)
    union = [regression_task(s) for s in SEEDS[0] + SEEDS[1]]
    want_loss = _learner(model, **SCENARIOS[scenario]).meta_backward(union)
    want = _grads(model)
    for rank in (0, 1):
        grads, loss = ranks[rank][scenario]
        report = compare(grads, want)
        report.assert_close(RTOL, RTOL * report.overall.reference_norm)
        torch.testing.assert_close(loss, want_loss, rtol=RTOL, atol=0)


def test_the_union_mean_differs_from_the_mean_of_rank_means():
    """What the comparison above rules out: averaging each rank's mean (or summing) is far off."""
    model = mlp([2, 5, 1])
    per_rank = []
    for seeds in SEEDS:
        learner = _learner(copy.deepcopy(model))
        learner.meta_backward([regression_task(s) for s in seeds])
        per_rank.append(_grads(learner.model))
    naive = {n: (per_rank[0][n] + per_rank[1][n]) / 2 for n in per_rank[0]}
    _learner(model).meta_backward([regression_task(s) for s in SEEDS[0] + SEEDS[1]])
    assert compare(naive, _grads(model)).overall.rel_error > 1e-3


def test_a_failing_rank_makes_every_rank_raise_and_write_nothing(ranks):
    kind, message, untouched = ranks[1]["failure"]
    assert kind == "FloatingPointError" and "inner step 1 of 3" in message and untouched
    kind, message, untouched = ranks[0]["failure"]
    assert kind == "RuntimeError" and "failed on 1 rank(s)" in message and untouched


def test_a_rank_whose_data_is_refused_makes_every_rank_raise(ranks):
    kind, message, untouched = ranks[1]["refused"]
    assert kind == "TypeError" and "but task 0's support inputs are torch.float32" in message and untouched
    kind, message, untouched = ranks[0]["refused"]
    assert kind == "RuntimeError" and "failed on 1 rank(s)" in message and untouched


def test_ranks_starting_from_different_parameters_are_refused(ranks):
    for rank in (0, 1):
        assert "parameters differ across the ranks" in ranks[rank]["mismatch"]
        assert "0.bias" in ranks[rank]["mismatch"]


def test_process_group_without_torch_distributed_is_refused():
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialised"):
        _learner(mlp([2, 5, 1]), group=object())
