import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn import capture as capture_mod
from _models import TinyCNN, tapped_mlp
import _reference


def _mlp_params(dtype=torch.float64):
    return {"w1": torch.randn(5, 7, dtype=dtype), "w2": torch.randn(7, 3, dtype=dtype)}


def test_capture_structures_mirror_layer_argument():
    model = TinyCNN().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8)
    out, act = tx.capture(fn, params, x, "features")
    assert act.shape == (2, 6, 8, 8)
    torch.testing.assert_close(out, model(x))
    _, acts = tx.capture(fn, params, x, ["conv1", model.features])
    assert [a.shape for a in acts] == [(2, 4, 8, 8), (2, 6, 8, 8)]
    _, acts = tx.capture(fn, params, x, {"low": "conv1", "high": "features.1"})
    assert set(acts) == {"low", "high"}
    torch.testing.assert_close(acts["high"], torch.tanh(model.features[0](model.act1(acts["low"]))))


def test_tap_is_identity_without_capture_and_records_with_one():
    params, x = _mlp_params(), torch.randn(4, 5, dtype=torch.float64)
    plain = tapped_mlp(params, x)
    out, acts = tx.capture(tapped_mlp, params, x, ["hidden", "scaled"])
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    torch.testing.assert_close(acts["hidden"] if isinstance(acts, dict) else acts[0], torch.tanh(x @ params["w1"]))


def test_layer_gradient_of_a_layer_followed_by_4x_scales_by_4():
    # flax's perturb identity: out = 4 * h @ w2, so d out_c / d h = 4 * w2[:, c] for every example.
    params, x = _mlp_params(), torch.randn(4, 5, dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 2])
    res = tx.layer_gradients(tapped_mlp, params, x, target, layers=["hidden", "scaled"])
    torch.testing.assert_close(res.grads["hidden"], 4.0 * params["w2"][:, target].T)
    torch.testing.assert_close(res.grads["scaled"], params["w2"][:, target].T)
    torch.testing.assert_close(res.scores, tapped_mlp(params, x).gather(1, target[:, None]).squeeze(1))


def test_layer_gradients_match_hook_and_autograd_oracle():
    model = TinyCNN(nn.Softplus).double().eval()
    fn, params = tx.functionalize(model)
    x, target = torch.randn(3, 3, 10, 10, dtype=torch.float64), torch.tensor([4, 0, 2])
    res = tx.layer_gradients(fn, params, x, target, layers=["features", "conv1"])
    for name, layer in [("features", model.features), ("conv1", model.conv1)]:
        act, grad = _reference.layer_act_grad(model, layer, x, target)
        torch.testing.assert_close(res.acts[name], act)
        torch.testing.assert_close(res.grads[name], grad)


def test_shape_memo_is_checked_and_recomputed():
    params = _mlp_params()
    x = torch.randn(2, 5, dtype=torch.float64)
    tx.layer_gradients(tapped_mlp, params, x, 0, layers=["hidden"])
    # A model_fn with the same input shape but another hidden size: the memo must not be trusted.
    wide = {"w1": torch.randn(5, 9, dtype=torch.float64), "w2": torch.randn(9, 3, dtype=torch.float64)}
    res = tx.layer_gradients(tapped_mlp, wide, x, 0, layers=["hidden"])
    assert res.grads["hidden"].shape == (2, 9)
    torch.testing.assert_close(res.grads["hidden"], 4.0 * wide["w2"][:, [0, 0]].T)


def test_unknown_layer_gets_close_match_hint():
    fn, params = tx.functionalize(TinyCNN().eval())
    with pytest.raises(ValueError, match=r"capture: unknown layer 'featurse'. Did you mean 'features'"):
        tx.capture(fn, params, torch.randn(1, 3, 8, 8), "featurse")


def test_layer_never_reached_raises_and_leaves_no_hooks():
    class Skips(TinyCNN):
        def __init__(self):
            super().__init__()
            self.unused = nn.Conv2d(6, 6, 1)

    model = Skips().eval()
    fn, params = tx.functionalize(model)
    with pytest.raises(ValueError, match="grad_cam: expected layer 'unused' to be called in the forward pass"):
        tx.grad_cam(fn, params, torch.randn(1, 3, 8, 8), layer="unused")
    with pytest.raises(ValueError, match="capture: .*'missing' to be called"):
        tx.capture(tapped_mlp, _mlp_params(), torch.randn(1, 5, dtype=torch.float64), "missing")
    assert all(not m._forward_hooks for m in model.modules())


def test_layer_called_twice_is_ambiguous():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.act(self.lin(self.act(x)))

    fn, params = tx.functionalize(Twice())
    with pytest.raises(ValueError, match="layer 'act' was called more than once"):
        tx.layer_gradients(fn, params, torch.randn(2, 3), 0, layers=["act"])


def test_no_hook_survives_a_model_that_raises():
    class Boom(TinyCNN):
        def forward(self, x):
            self.features(self.act1(self.conv1(x)))
            raise RuntimeError("boom")

    model = Boom().eval()
    fn, params = tx.functionalize(model)
    for call in (lambda: tx.grad_cam(fn, params, torch.randn(1, 3, 8, 8), 0, layer="features"),
                 lambda: tx.capture(fn, params, torch.randn(1, 3, 8, 8), "features"),
                 lambda: tx.saliency(fn, params, torch.randn(1, 3, 8, 8), 0)):
        with pytest.raises(RuntimeError, match="boom"):
            call()
        assert all(not m._forward_hooks for m in model.modules())
        assert capture_mod.active() is None


def test_capture_is_scoped_to_the_call():
    fn, params = tx.functionalize(TinyCNN().eval())
    tx.capture(fn, params, torch.randn(1, 3, 8, 8), "features")
    assert capture_mod.active() is None
    # a tap outside any capture is the identity
    h = torch.randn(3)
    assert tx.tap("anything", h) is h
