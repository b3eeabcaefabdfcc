"""Issue 22 item 2: with ``batch_size=None`` the path and noise methods pick the copies per forward from the
input's size (all path points for a table, one for large images on a CPU), and the maps are those of
``batch_size=1`` (one example per forward) up to float rounding. Speed: benchmarks/bench_defaults.py."""
import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.core import inputs as _inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3)).to(dtype).eval()
    return tx.functionalize(model)


class Counter:
    """A plain ``model_fn`` that counts its forwards and the rows they hold."""

    def __init__(self, fn):
        self.fn, self.rows = fn, []

    def __call__(self, params, x):
        self.rows.append(x.shape[0])
        return self.fn(params, x)


CALLS = {
    "integrated_gradients": lambda fn, p, x, bs: tx.integrated_gradients(fn, p, x, 1, steps=20, batch_size=bs),
    "smooth": lambda fn, p, x, bs: tx.smooth(tx.saliency, samples=12, generator=torch.Generator().manual_seed(0),
                                             batch_size=bs)(fn, p, x, 1),
    "gradient_shap": lambda fn, p, x, bs: tx.gradient_shap(fn, p, x, 1, baselines=torch.zeros(3, *x.shape[1:]),
                                                           samples=7, stdev=0.1, batch_size=bs,
                                                           generator=torch.Generator().manual_seed(0)),
    "layer_conductance": lambda fn, p, x, bs: tx.layer_conductance(fn, p, x, 1, layer="1", steps=9, batch_size=bs),
}
COPIES = {"integrated_gradients": 20, "smooth": 12, "gradient_shap": 7, "layer_conductance": 10}


@pytest.mark.parametrize("name", CALLS)
def test_default_equals_one_example_per_forward_and_runs_every_copy_of_a_table_in_one_forward(name):
    fn, params = _mlp()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    default = CALLS[name](fn, params, x, None)
    one = CALLS[name](fn, params, x, 1)
    torch.testing.assert_close(default, one, rtol=1e-6, atol=1e-6 * float(one.abs().max()))
    assert default.abs().max() > 1e-3
    if name != "layer_conductance":    # a plain model_fn (a layer needs functionalize's view)
        counter = Counter(fn)
        CALLS[name](counter, params, x, None)
        # every path point / sample of the 5 rows in one forward, as captum's default
        assert counter.rows == [5 * COPIES[name]], counter.rows


def test_the_default_keeps_large_inputs_at_one_copy_per_forward_on_a_cpu():
    """2^20 elements per forward on a CPU: 4 images of 3 x 224 x 224 (602,112 elements) take one path
    point per forward (resnet18's floor, as before); 4 of 3 x 64 x 64 take 21."""
    big = torch.empty(4, 3, 224, 224)
    small = torch.empty(4, 3, 64, 64)
    assert _inputs.default_copies(50, 4, big) == 1
    assert _inputs.default_copies(50, 4, small) == (1 << 20) // small.numel() == 21
    assert _inputs.default_copies(50, 64, torch.empty(64, 16)) == 50
    assert _inputs.default_copies(3, 4, None) == 3

    def fn(p, x):
        return x.flatten(1)[:, :3] * p["w"]
    counter = Counter(fn)
    x = torch.randn(2, 3, 256, 256)     # 393,216 elements: 2 path points per forward
    tx.integrated_gradients(counter, {"w": torch.ones(3)}, x, 0, steps=5)
    assert counter.rows == [4, 4, 2], counter.rows
