"""A user's test file: a hand-written MAML checked against gradcheck's exact oracle on drawn problems.

Run it with ``pytest examples/test_my_maml.py``. In a suite of your own, put
``settings.load_profile("gradcheck")`` (after ``import gradcheck.strategies``) in ``conftest.py``
instead of the ``@settings(deadline=None)`` lines below: no deadline, 20 examples per test.

``first_order_maml`` is the classic bug, kept on purpose: it forgets ``create_graph=True``, so
the inner gradients are constants. gradcheck's own tests show the check below rejects it and
names the bug (``first_order``).
"""

import torch
from hypothesis import given, settings
from torch.func import functional_call

from gradcheck.strategies import adapts, leaps, problems
from gradcheck.testing import assert_meta_gradient


def _adapted(model, adapt):
    """The names the inner loop updates: all, the last layer's ("head") or the others ("body")."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    head = [n for n in names if n.rpartition(".")[0] == names[-1].rpartition(".")[0]]
    return {None: names, "head": head, "body": [n for n in names if n not in head]}[adapt]


def my_maml(model, task, steps, inner_lr, *, adapt=None, leap=1.0, create_graph=True):
    """MAML by plain autograd: K SGD steps on the support loss, differentiated through."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # BatchNorm statistics stay ours
    adapted = set(_adapted(model, adapt))

    def loss(tensors, batch):
        inputs, targets = batch
        return task.loss(functional_call(model, {**tensors, **buffers}, (inputs,)), targets)

    phi = dict(params)
    for _ in range(steps):
        names = [n for n in phi if n in adapted]
        grads = torch.autograd.grad(
            loss(phi, task.support), [phi[n] for n in names], create_graph=create_graph
        )
        phi.update({n: phi[n] - inner_lr * g for n, g in zip(names, grads)})
    teacher = {n: p + leap * (phi[n] - p) for n, p in params.items()}
    grads = torch.autograd.grad(loss(teacher, task.query), list(params.values()))
    return dict(zip(params, grads))


def first_order_maml(model, task, steps, inner_lr, **options):
    """The bug: the inner gradients are taken without a graph (create_graph=False)."""
    return my_maml(model, task, steps, inner_lr, create_graph=False, **options)


def my_meta_batch_maml(model, tasks, steps, inner_lr):
    """A meta-batch at once: the *mean* over its tasks (a sum is the classic bug)."""
    grads = [my_maml(model, task, steps, inner_lr) for task in tasks]
    return {n: torch.stack([g[n] for g in grads]).mean(0) for n in grads[0]}


@settings(deadline=None)
@given(problem=problems())
def test_my_maml(problem):
    assert_meta_gradient(my_maml, problem)


@settings(deadline=None)
@given(problem=problems(kinds=("mlp", "conv_bn"), steps=2, adapt=adapts(), leap=leaps()))
def test_my_maml_anil_boil_and_leap(problem):
    # adapt and leap differ from their defaults here, so they are passed to my_maml as keywords
    assert_meta_gradient(my_maml, problem)


@settings(deadline=None)
@given(problem=problems(meta_batch=3))
def test_my_meta_batch_maml(problem):
    assert_meta_gradient(my_meta_batch_maml, problem, meta_batch=True)
