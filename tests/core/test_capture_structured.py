"""Capture at a layer whose output is a dict of tensors (``structured=True``): what is read, perturbed and
replaced, its gradient, a tail run from it, and the errors; on a hand-written two-level model whose output
is a closed form of the levels."""
from collections import OrderedDict

import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.core.capture import intermediates, layer_gradients, run_tail


class Levels(nn.Module):
    """Two 'pyramid levels' of the input: ``a = 2 x`` and ``b = x[..., ::2] ** 2``."""

    def forward(self, x):
        return OrderedDict(a=2 * x, b=x[..., ::2] ** 2)


class TwoLevels(nn.Module):
    def __init__(self):
        super().__init__()
        self.levels = Levels()

    def forward(self, x):
        found = self.levels(x)
        return torch.stack([found["a"].sum((1, 2)), (found["b"] * found["b"]).sum((1, 2))], dim=1)   # [B, 2]


def _setup():
    fn, params = tx.functionalize(TwoLevels().eval())
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[0.5, -1.0, 2.0, 1.0]]])   # [2, 1, 4]
    return fn, params, x


def test_read_perturb_and_replace_a_dict_of_levels():
    fn, params, x = _setup()
    out, acts = intermediates(fn, layers=["levels"], structured=True)(params, x)
    assert list(acts["levels"]) == ["a", "b"] and isinstance(acts["levels"], OrderedDict)
    torch.testing.assert_close(acts["levels"]["b"], torch.tensor([[[1.0, 9.0]], [[0.25, 4.0]]]))
    torch.testing.assert_close(out, torch.tensor([[20.0, 82.0], [5.0, 16.0625]]))
    delta = OrderedDict(a=torch.ones(2, 1, 4), b=torch.zeros(2, 1, 2))
    out, _ = intermediates(fn, layers=["levels"], structured=True, perturb={"levels": delta})(params, x)
    torch.testing.assert_close(out[:, 0], torch.tensor([24.0, 9.0]))          # + 4 ones
    new = OrderedDict(a=torch.zeros(2, 1, 4), b=torch.full((2, 1, 2), 3.0))
    out, _ = intermediates(fn, layers=["levels"], structured=True, replace={"levels": new})(params, x)
    torch.testing.assert_close(out, torch.tensor([[0.0, 18.0], [0.0, 18.0]]))


def test_gradient_w_r_t_each_level_is_the_closed_form():
    fn, params, x = _setup()
    result = layer_gradients(fn, params, x, 1, layers=["levels"], structured=True)
    grads = result.grads["levels"]
    torch.testing.assert_close(grads["a"], torch.zeros(2, 1, 4))               # class 1 reads only b
    torch.testing.assert_close(grads["b"], 2 * result.acts["levels"]["b"])     # d sum(b^2) / db = 2 b


def test_tail_from_a_structure_equals_replacing_it():
    fn, params, x = _setup()
    rows = OrderedDict(a=torch.randn(3, 1, 4, generator=torch.Generator().manual_seed(0)),
                       b=torch.randn(3, 1, 2, generator=torch.Generator().manual_seed(1)))
    got = run_tail(fn, params, x[:1], "levels", rows, structured=True)
    want = torch.stack([rows["a"].sum((1, 2)), (rows["b"] ** 2).sum((1, 2))], dim=1)
    torch.testing.assert_close(got, want)


def test_errors():
    fn, params, x = _setup()
    with pytest.raises(TypeError, match=r"^capture: expected layer 'levels' to output a tensor, got OrderedDict"):
        intermediates(fn, layers=["levels"], fn="capture")(params, x)
    wrong = OrderedDict(a=torch.zeros(2, 1, 4), b=torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match=r"^f: expected a replacement for layer 'levels' of its output's shape "
                                         r"\{'a': \[2, 1, 4\], 'b': \[2, 1, 2\]\}"):
        intermediates(fn, layers=["levels"], fn="f", structured=True, replace={"levels": wrong})(params, x)
