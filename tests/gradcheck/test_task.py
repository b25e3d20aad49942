"""gradcheck.task: data tasks, closure tasks, stacked meta-batches and ``as_tasks``.

The losses are compared with ``loss(model(x), y)`` evaluated here, conversions and stacking with
the tensors they started from: the same operations on the same values, so equality is exact.
Every refusal is asserted by the message it must give, naming the task and the part at fault.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcheck import ClosureTask, Task, TaskBatch, TaskLike
from gradcheck.task import as_tasks
from tests.helpers import F64, image_task, mlp, regression_task


def assert_same_tensors(a, b):
    for s, t in zip((*a.support, *a.query), (*b.support, *b.query)):
        assert s.dtype == t.dtype and torch.equal(s, t)


def test_task_losses_are_the_loss_of_the_model_on_each_batch():
    model, task = mlp([2, 3, 1]), regression_task()
    (xs, ys), (xq, yq) = task.support, task.query
    assert torch.equal(task.support_loss(model), F.mse_loss(model(xs), ys))
    assert torch.equal(task.query_loss(model), F.mse_loss(model(xq), yq))
    assert not torch.equal(task.support_loss(model), task.query_loss(model))  # the two batches differ
    assert isinstance(task, TaskLike)
    assert repr(task) == "Task(support=(6, 2)->(6, 1), query=(7, 2)->(7, 1))"


def test_task_construction_errors():
    x = image_task().support[0]
    y = torch.zeros(len(x), dtype=torch.long)
    with pytest.raises(TypeError, match=r"Task support must be a pair \(inputs, targets\)"):
        Task(x, (x, y), nn.functional.cross_entropy)
    with pytest.raises(TypeError, match="Task query must hold tensors"):
        Task((x, y), (x, [1, 2]), nn.functional.cross_entropy)
    with pytest.raises(TypeError, match="Task loss must be callable"):
        Task((x, y), (x, y), "cross_entropy")
    with pytest.raises(TypeError, match="query_loss must be callable"):
        Task.from_closures(lambda f: f(x).sum(), None)
    with pytest.raises(TypeError, match="closure task cannot be converted"):
        Task.from_closures(lambda f: f(x).sum(), lambda f: f(x).sum()).to(torch.float64)


def test_task_accepts_lists_and_is_frozen():
    x, y = torch.zeros(2, 1), torch.zeros(2, 1)
    task = Task([x, y], [x, y], F.mse_loss)
    assert isinstance(task.support, tuple) and task.support[0] is x
    with pytest.raises(AttributeError):
        task.loss = F.l1_loss


def test_to_casts_floating_data_and_keeps_integer_labels():
    task = image_task(dtype=F64)
    cast = task.to(torch.float32)
    assert [t.dtype for t in (*cast.support, *cast.query)] == [torch.float32, torch.long] * 2
    assert torch.equal(cast.support[0], task.support[0].float()) and torch.equal(cast.query[1], task.query[1])
    assert cast.loss is task.loss and task.support[0].dtype == F64  # the original is untouched
    moved = task.to(device="cpu")
    assert_same_tensors(moved, task)


def test_closure_task_calls_its_closures_with_the_model():
    model, x = mlp([2, 3, 1]), torch.randn(4, 2, dtype=F64)
    seen = []
    task = Task.from_closures(
        lambda f: seen.append("S") or f(x).sum(), lambda f: seen.append("Q") or f(x).mean()
    )
    assert isinstance(task, ClosureTask) and isinstance(task, TaskLike)
    assert torch.equal(task.support_loss(model), model(x).sum())
    assert torch.equal(task.query_loss(model), model(x).mean())
    assert seen == ["S", "Q"] and repr(task) == "Task.from_closures(...)"
    with pytest.raises(TypeError, match="support_loss must be callable, got int"):
        Task.from_closures(3, lambda f: f(x).sum())


def test_stack_indexing_and_iteration_give_the_tasks_back():
    tasks = [image_task(seed) for seed in range(3)]
    batch = Task.stack(tasks)
    assert isinstance(batch, TaskBatch) and len(batch) == 3 and batch.loss is tasks[0].loss
    assert batch.support[0].shape == (3, *tasks[0].support[0].shape)
    assert batch.query[1].shape == (3, *tasks[0].query[1].shape) and batch.query[1].dtype == torch.long
    for i, task in enumerate(tasks):
        assert_same_tensors(batch[i], task)
    for got, task in zip(batch, tasks, strict=True):
        assert isinstance(got, Task) and got.loss is task.loss
        assert_same_tensors(got, task)


def test_batch_to_keeps_integer_labels():
    batch = Task.stack([image_task(seed) for seed in range(2)]).to(torch.float32)
    assert isinstance(batch, TaskBatch)
    assert [t.dtype for t in (*batch.support, *batch.query)] == [torch.float32, torch.long] * 2
    assert_same_tensors(batch[1], image_task(1).to(torch.float32))


def _variant(task, part, tensor):
    (xs, ys), (xq, yq) = task.support, task.query
    parts = dict(zip(("xs", "ys", "xq", "yq"), (xs, ys, xq, yq))) | {part: tensor}
    return Task((parts["xs"], parts["ys"]), (parts["xq"], parts["yq"]), task.loss)


@pytest.mark.parametrize(
    ("part", "change", "message"),
    [
        (
            "xs",
            lambda t: t[:-1],
            r"task 2's support inputs is \(5, 1, 6, 6\) torch.float64 on cpu, task 0's is \(6,",
        ),
        (
            "ys",
            lambda t: t.float(),
            r"task 2's support targets is \(6,\) torch.float32 on cpu, task 0's is \(6,\) torch.int64",
        ),
        ("xq", lambda t: t.float(), r"task 2's query inputs is \(9, 1, 6, 6\) torch.float32"),
        ("yq", lambda t: t[:4], r"task 2's query targets is \(4,\) torch.int64 on cpu"),
    ],
)
def test_stack_refuses_unequal_parts_naming_the_task_and_the_part(part, change, message):
    tasks = [image_task(seed) for seed in range(3)]
    original = dict(zip(("xs", "ys", "xq", "yq"), (*tasks[2].support, *tasks[2].query)))[part]
    tasks[2] = _variant(tasks[2], part, change(original))
    with pytest.raises(ValueError, match=message + r".*stacking needs equal shapes"):
        Task.stack(tasks)


def test_stack_refusals():
    task = image_task()
    with pytest.raises(ValueError, match=r"Task\.stack needs at least one task"):
        Task.stack([])
    closure = Task.from_closures(task.support_loss, task.query_loss)
    with pytest.raises(
        TypeError, match=r"Task.stack needs data tasks \(Task\), got \['ClosureTask', 'Task'\]"
    ):
        Task.stack([task, closure])
    other = Task(task.support, task.query, lambda out, y: F.cross_entropy(out, y))
    with pytest.raises(ValueError, match=r"Task\.stack: task 1 has a different loss from task 0"):
        Task.stack([task, other])


class DuckTask:
    """Anything with the two losses and ``to`` is a task."""

    def support_loss(self, f):
        return f(torch.ones(1, 2, dtype=F64)).sum()

    def query_loss(self, f):
        return f(torch.zeros(1, 2, dtype=F64)).sum()

    def to(self, dtype=None, device=None):
        return self


def test_as_tasks_accepts_a_task_a_sequence_or_a_batch():
    task, duck = regression_task(), DuckTask()
    assert as_tasks(task) == [task]
    assert as_tasks(duck) == [duck]
    assert as_tasks((task, duck)) == [task, duck]
    batch = Task.stack([image_task(0), image_task(1)])
    got = as_tasks(batch)
    assert len(got) == 2 and all(isinstance(t, Task) for t in got)
    assert_same_tensors(got[1], image_task(1))


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ([], ValueError, r"task_or_tasks is empty: at least one task is needed"),
        ("task", TypeError, r"task_or_tasks must be a task .* got str"),
        (3, TypeError, r"task_or_tasks must be a task .* got int"),
        ({"a": 1}, TypeError, r"got dict"),
        (
            [regression_task(), (torch.zeros(1), torch.zeros(1))],
            TypeError,
            r"task_or_tasks\[1\] is a tuple, not a task",
        ),
    ],
)
def test_as_tasks_refusals(value, error, message):
    with pytest.raises(error, match=message):
        as_tasks(value)
