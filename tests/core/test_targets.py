import pytest
import torch

from torchex_fn import targets


def test_resolve_none_int_tensor_callable():
    out = torch.tensor([[0.0, 3.0, 1.0], [5.0, -1.0, 2.0]])
    torch.testing.assert_close(targets.resolve(out, None), torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(targets.resolve(out, 2), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(targets.resolve(out, torch.tensor([0, 1])), torch.tensor([0.0, -1.0]))
    torch.testing.assert_close(targets.resolve(out, torch.tensor(1)), torch.tensor([3.0, -1.0]))
    torch.testing.assert_close(targets.resolve(out, lambda o: o.sum(1)), torch.tensor([4.0, 6.0]))
    torch.testing.assert_close(targets.log_prob(1)(out), torch.log_softmax(out, 1)[:, 1])
    torch.testing.assert_close(targets.prob(torch.tensor([0, 2]))(out), torch.softmax(out, 1)[[0, 1], [0, 2]])


@pytest.mark.parametrize("target, error, match", [
    (3, ValueError, r"f: expected target in \[0, 3\), got int 3"),
    (-1, ValueError, "f: expected target >= 0"),
    (torch.tensor([0, 7]), ValueError, r"f: expected target values in \[0, 3\), got \[7\]"),
    (torch.tensor([0, 1, 2]), ValueError, r"f: expected target of shape \[B\] = \[2\]"),
    (torch.tensor([0.0, 1.0]), TypeError, "f: expected target of an integer dtype"),
    (True, TypeError, "f: expected target: None, an int"),
    ("cat", TypeError, "f: expected target: None, an int"),
    (lambda o: o, ValueError, r"f: expected the target callable to return scores of shape \[B\]"),
])
def test_bad_targets(target, error, match):
    with pytest.raises(error, match=match):
        targets.resolve(torch.zeros(2, 3), target, fn="f")


def test_integer_target_needs_2d_output():
    with pytest.raises(ValueError, match=r"f: expected model output of shape \[B, classes\]"):
        targets.resolve(torch.zeros(2, 3, 4, 4), 1, fn="f")
    scores = targets.resolve(torch.ones(2, 3, 4, 4), lambda o: o[:, 1].sum((1, 2)), fn="f")
    torch.testing.assert_close(scores, torch.full((2,), 16.0))


def test_resolve_under_vmap_over_targets():
    out = torch.randn(4, 6)
    many = torch.randint(0, 6, (5, 4))
    batched = torch.func.vmap(lambda t: targets.resolve(out, t))(many)
    torch.testing.assert_close(batched, torch.stack([targets.resolve(out, t) for t in many]))


def test_non_tensor_output_needs_a_callable():
    with pytest.raises(ValueError, match=r"f: expected model output of shape \[B, classes\].*got tuple"):
        targets.resolve((torch.zeros(2, 3),), 1, fn="f")
    torch.testing.assert_close(targets.resolve((torch.ones(2, 3),), lambda o: o[0][:, 2], fn="f"), torch.ones(2))
