"""occlusion: parity with captum's Occlusion, chunking, targets, window rules and errors."""
import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.methods.perturbation import occlusion
from support.models import TinyCNN

captum_attr = pytest.importorskip("captum.attr")
feature_ablation = pytest.importorskip("captum.attr._core.feature_ablation")


def _float64_result(total_attrib, weights, is_inputs_tuple, use_weights):
    """captum's last step without its cast to float32, so that float64 sums can be compared."""
    attrib = tuple(t / w for t, w in zip(total_attrib, weights)) if use_weights else tuple(total_attrib)
    return attrib if is_inputs_tuple else attrib[0]


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = TinyCNN(nn.ReLU).double().eval()
    fn, params = tx.functionalize(model)
    return model, fn, params, torch.randn(3, 3, 9, 10, dtype=torch.float64)


CASES = [
    ((3, 4, 4), (1, 2, 3), 0.0),        # overlapping windows, a last window cut short along W
    ((2, 3, 5), (1, 2, 2), 0.3),        # a window over two of three channels
    ((3, 9, 10), 1, 0.0),               # one window covering everything
    ((1, 5, 5), (1, 4, 4), "tensor"),    # one baseline per example
]


@pytest.mark.parametrize("window, stride, baseline", CASES)
def test_parity_with_captum_float64(setup, monkeypatch, window, stride, baseline):
    model, fn, params, x = setup
    if baseline == "tensor":
        baseline = torch.rand_like(x)
    target = torch.tensor([0, 2, 4])
    ours = occlusion(fn, params, x, target, window=window, stride=stride, baseline=baseline, batch_size=7)
    monkeypatch.setattr(feature_ablation, "format_result", _float64_result)
    ref = captum_attr.Occlusion(model).attribute(x, sliding_window_shapes=window, strides=stride,
                                                 baselines=baseline, target=target)
    assert ref.dtype == torch.float64 and ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-12)


def test_parity_with_unpatched_captum_float32_output(setup):
    """captum returns float32 (two roundings of the float64 sums): agreement to float32 precision."""
    model, fn, params, x = setup
    ours = occlusion(fn, params, x, 1, window=(3, 3, 3), stride=2)
    ref = captum_attr.Occlusion(model).attribute(x, sliding_window_shapes=(3, 3, 3), strides=2, target=1)
    torch.testing.assert_close(ours.float(), ref, rtol=3e-7, atol=1e-12)


def test_definition_by_hand_and_int_window():
    """A linear model ``out = sum(w * x)``: the drop of a window is sum over it of w * (x - b)."""
    w = torch.randn(1, 2, 4, 5, dtype=torch.float64)

    def fn(params, x):
        return (params["w"] * x).flatten(1).sum(1, keepdim=True)
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    attr = occlusion(fn, {"w": w}, x, 0, window=2, stride=1, baseline=0.5)     # window (2, 2, 2)
    contrib = (w * (x - 0.5))[:, :, :, :]
    expected = torch.zeros_like(x)
    count = torch.zeros(4, 5, dtype=torch.float64)
    for i in range(3):
        for j in range(4):
            drop = contrib[:, :, i:i + 2, j:j + 2].sum((1, 2, 3))
            expected[:, :, i:i + 2, j:j + 2] += drop[:, None, None, None]
            count[i:i + 2, j:j + 2] += 1
    torch.testing.assert_close(attr, expected / count)
    assert attr.shape == x.shape


def test_batch_size_and_callable_target_and_default_target(setup):
    _, fn, params, x = setup
    a = occlusion(fn, params, x, None, window=(3, 4, 4), stride=3, batch_size=1)
    b = occlusion(fn, params, x, None, window=(3, 4, 4), stride=3, batch_size=100)
    torch.testing.assert_close(a, b)
    predicted = fn(params, x).argmax(1)
    torch.testing.assert_close(a, occlusion(fn, params, x, predicted, window=(3, 4, 4), stride=3))
    c = occlusion(fn, params, x, lambda out: out[:, 2], window=(3, 4, 4), stride=3, batch_size=5)
    torch.testing.assert_close(c, occlusion(fn, params, x, 2, window=(3, 4, 4), stride=3))


def test_differentiable_wrt_params(setup):
    _, fn, params, x = setup
    w = params["fc.weight"].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w: occlusion(fn, {**params, "fc.weight": w}, x[:1], 0, window=(3, 5, 5), stride=4), (w,))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"window": (3, 10, 4)}, ValueError, r"^occlusion: expected window no larger than an example"),
    ({"window": 12}, ValueError, r"^occlusion: expected window no larger"),
    ({"window": (3, 4, 4), "stride": 0}, ValueError, r"^occlusion: expected stride >= 1"),
    ({"window": (3, 4, 4), "stride": (1, 0, 1)}, ValueError, r"^occlusion: expected stride >= 1"),
    ({"window": (3, 4, 4), "stride": (1, 5, 1)}, ValueError, r"^occlusion: expected stride at most the window"),
    ({"window": (0, 4, 4)}, ValueError, r"^occlusion: expected window >= 1"),
    ({"window": (4, 4)}, TypeError, r"^occlusion: expected window, an int or a tuple of 3 ints"),
    ({"window": 2.5}, TypeError, r"^occlusion: expected window"),
    ({"batch_size": 0}, ValueError, r"^occlusion: expected batch_size >= 1"),
    ({"baseline": torch.zeros(2, 3)}, ValueError, r"^occlusion: expected baseline broadcastable"),
    ({"baseline": float("nan")}, ValueError, r"^occlusion: expected baseline without NaN"),
])
def test_errors(setup, kwargs, error, match):
    _, fn, params, x = setup
    with pytest.raises(error, match=match):
        occlusion(fn, params, x, 0, **kwargs)


def test_errors_on_input_and_target(setup):
    _, fn, params, x = setup
    with pytest.raises(TypeError, match="^occlusion: "):
        occlusion(fn, params, x.long(), 0)
    with pytest.raises(ValueError, match=r"^occlusion: expected target in \[0, 5\)"):
        occlusion(fn, params, x, 7, window=(3, 9, 10))
