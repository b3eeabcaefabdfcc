import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.core import capture as capture_mod
from support.models import TinyCNN, tapped_mlp
from support import reference as _reference


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


# --------------------------------------------------------------------------------------------
# run_tail: the network from one layer on, for n variants of one example's activation.

class _Skip(nn.Module):
    """conv -> mid -> conv, with the stem's output joined past ``mid``: added, or concatenated."""

    def __init__(self, concat: bool):
        super().__init__()
        self.concat = concat
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.mid = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8 if concat else 4, 5)

    def forward(self, x):
        s = torch.tanh(self.stem(x))
        h = self.mid(s)
        h = torch.cat([h, s], 1) if self.concat else h + s
        return self.head(h.mean((2, 3)))


def _replaced_forwards(model, x1, values):
    """One forward per row of ``values``, each with ``mid``'s output replaced by a hook."""
    outs = []
    for v in values:
        handle = model.mid.register_forward_hook(lambda m, a, o, v=v: v[None])
        try:
            outs.append(model(x1))
        finally:
            handle.remove()
    return torch.cat(outs)


def test_run_tail_equals_forwards_with_the_activation_replaced():
    from torchex_fn.core.capture import TailMismatch, run_tail
    torch.manual_seed(0)
    model = _Skip(concat=False).double().eval()
    fn, params = tx.functionalize(model)
    x1 = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    values = torch.randn(7, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(run_tail(fn, params, x1, "mid", values), _replaced_forwards(model, x1, values))
    # a tail that concatenates the prefix's tensor needs its rows: refused, and nothing left behind
    cat_model = _Skip(concat=True).double().eval()
    cat_fn, cat_params = tx.functionalize(cat_model)
    with pytest.raises(TailMismatch):
        run_tail(cat_fn, cat_params, x1, "mid", values)
    with pytest.raises(ValueError, match="^run_tail: expected x with one example"):
        run_tail(fn, params, x1.expand(2, -1, -1, -1), "mid", values)
    assert all(not m._forward_hooks for m in list(model.modules()) + list(cat_model.modules()))


@pytest.mark.parametrize("concat", [False, True])   # True: the full-forward fallback
def test_ablation_cam_tail_and_fallback_equal_full_forwards(concat):
    torch.manual_seed(1)
    model = _Skip(concat=concat).double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        out, act = tx.capture(fn, params, x, "mid")
        expected = []
        for b in range(2):
            keep = 1 - torch.eye(4, dtype=x.dtype)[:, :, None, None]          # [K, K, 1, 1]: channel k zeroed
            ablated = _replaced_forwards(model, x[b:b + 1], act[b] * keep)[:, labels[b]]
            y = out[b, labels[b]]
            expected.append(torch.einsum("k,khw->hw", (y - ablated) / y, act[b]).relu())
        expected = torch.stack(expected)[:, None]
        for batch_size in (3, 32):
            got = tx.ablation_cam(fn, params, x, labels, layer="mid", upsample=False, batch_size=batch_size)
            torch.testing.assert_close(got, expected)
    assert expected.abs().max() > 1e-3
