"""The name task of issue 18 (activation patching's worked example): prompts, answers and corruptions."""
import pytest
import torch

import torchex_fn as tx


def test_prompts_answers_and_corruption():
    task = tx.datasets.name_task(200, length=7, names=10, fillers=5, seed=3)
    assert task.clean.shape == task.corrupt.shape == (200, 7) and task.vocab_size == 15
    a, b, x = task.clean[:, 0], task.clean[:, 1], task.clean[:, -1]
    assert (a < 10).all() and (b < 10).all() and (a != b).all()
    assert ((task.clean[:, 2:-1] >= 10) & (task.clean[:, 2:-1] < 15)).all()           # fillers
    assert ((x == a) | (x == b)).all() and (x == a).any() and (x == b).any()
    assert torch.equal(task.answer, torch.where(x == a, b, a))                      # the name x does not repeat
    c = task.corrupt[:, 1]                                                          # B renamed to C everywhere
    assert (c != a).all() and (c != b).all() and (c < 10).all()
    assert torch.equal(task.corrupt, torch.where(task.clean == b[:, None], c[:, None], task.clean))
    assert torch.equal(task.corrupt_answer, torch.where(x == a, c, a))
    again = tx.datasets.name_task(200, length=7, names=10, fillers=5, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(task[:4], again[:4]))


def test_repeat_option():
    first = tx.datasets.name_task(50, repeat="first", seed=1)
    assert torch.equal(first.clean[:, -1], first.clean[:, 0]) and torch.equal(first.answer, first.clean[:, 1])
    assert torch.equal(first.corrupt_answer, first.corrupt[:, 1]) and (first.answer != first.corrupt_answer).all()
    second = tx.datasets.name_task(50, repeat="second", seed=1)
    assert torch.equal(second.clean[:, -1], second.clean[:, 1]) and torch.equal(second.answer, second.clean[:, 0])
    assert torch.equal(second.answer, second.corrupt_answer)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"length": 2}, ValueError, "name_task: expected length >= 3"),
    ({"names": 2}, ValueError, "name_task: expected names >= 3"),
    ({"fillers": 1.5}, TypeError, "name_task: expected fillers, an int"),
    ({"repeat": "third"}, ValueError, "name_task: expected repeat in"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        tx.datasets.name_task(4, **kwargs)
