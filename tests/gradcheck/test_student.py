"""gradcheck.student: the graph-free inner loop."""

import torch

from gradcheck.settings import InnerLoop
from gradcheck.student import Student
from tests.helpers import assert_same_state, model_state, stats_net, stats_task


def test_student_runs_start_from_fresh_copies_and_never_write_the_model():
    model, task = stats_net().train(), stats_task()
    before = model_state(model)
    student = Student.read(model)
    loop = InnerLoop(3, 0.2)
    first, second = student.run(task, loop), student.run(task, loop)
    for a, b in zip(first, second):  # the second run did not start where the first left off
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(first[1]["0.mean"], model[0].mean)  # the run did write its copies
    assert int(first[1]["0.count"]) == int(model[0].count) + 3  # one support forward per step
    assert_same_state(before, model_state(model))
