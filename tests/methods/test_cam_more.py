"""Grad-CAM++ and Score-CAM: closed forms, a direct loop, pytorch-grad-cam parity, errors, gradcheck."""
import pytest
import torch
from torch import nn
from pytorch_grad_cam import GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import torchex_fn as tx
from torchex_fn.methods.cam import grad_cam_pp, score_cam
from support.models import LinearHead, TinyCNN, smooth_double
from support.parity import (assert_no_hooks as _assert_no_hooks, assert_parity as _assert_parity, peer_input as _input,
                            peer_model as _model)


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = TinyCNN(nn.ReLU)
    model.features.add_module("2", nn.BatchNorm2d(6))
    with torch.no_grad():
        model.features[2].running_mean.uniform_(-0.5, 0.5)
        model.features[2].running_var.uniform_(0.5, 2.0)
    model.eval()
    return (model, *tx.functionalize(model))


# --------------------------------------------------------------------------------------------
# Grad-CAM++

def test_grad_cam_pp_of_linear_head_has_closed_form():
    # features = x and score_c = sum_k W[c, k] mean_ij x_k + b_c, so g = W[c, k] / (H W) at every
    # position: alpha_k = g^2 / (2 g^2 + S_k g^3 + eps) with S_k = sum_ij x_k, and
    # w_k = H W alpha_k relu(g) (alpha_k = 0 where g = 0).
    model = LinearHead().double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    W = model.fc.weight.detach()
    for target in (torch.tensor([2, 3]), torch.tensor([1, 2])):  # row 1 is [-2, -1, 0]: all weights 0
        g = W[target] / 24.0
        S = x.sum(dim=(2, 3))
        alpha = torch.where(g != 0, g ** 2 / (2 * g ** 2 + S * g ** 3 + 1e-6), torch.zeros_like(g))
        w = 24.0 * alpha * g.clamp_min(0)
        raw = torch.einsum("bk,bkhw->bhw", w, x)[:, None]
        got = grad_cam_pp(fn, params, x, target, layer="features", upsample=False, relu=False)
        torch.testing.assert_close(got, raw)
        torch.testing.assert_close(grad_cam_pp(fn, params, x, target, layer="features"), raw.clamp_min(0))
    assert (got[0] == 0).all() and got[1].abs().max() > 0.1


def _pgc_pp_raw(model, layers, x, labels):
    """pytorch-grad-cam's Grad-CAM++ raw maps (before its ReLU and min-max), one per layer."""
    targets = [ClassifierOutputTarget(int(c)) for c in labels]
    with GradCAMPlusPlus(model=model, target_layers=layers) as extractor:
        extractor(input_tensor=x, targets=targets)
        recorded = extractor.activations_and_grads
        raws = [extractor.get_cam_image(x, layer, targets, a.numpy(), g.numpy())
                for layer, a, g in zip(layers, recorded.activations, recorded.gradients)]
    model.zero_grad(set_to_none=True)
    return [torch.from_numpy(r) for r in raws]


def test_grad_cam_pp_matches_pytorch_grad_cam_and_several_layers_equal_single_calls():
    model, fn, params = _model("resnet18")
    x = _input()
    labels = torch.tensor([3, 517, 999])
    raws = _pgc_pp_raw(model, [model.layer3, model.layer4], x, labels)
    both = grad_cam_pp(fn, params, x, labels, layer=["layer3", "layer4"], upsample=False, relu=False)
    assert isinstance(both, list) and len(both) == 2
    for got, raw, name in zip(both, raws, ("layer3", "layer4")):
        _assert_parity(got[:, 0], raw)
        single = grad_cam_pp(fn, params, x, labels, layer=name, upsample=False, relu=False)
        torch.testing.assert_close(got, single, rtol=0, atol=0)
        _assert_parity(grad_cam_pp(fn, params, x, labels, layer=name, upsample=False), raw.clamp_min(0)[:, None])
    keyed = grad_cam_pp(fn, params, x, labels, layer={"deep": model.layer4})
    assert set(keyed) == {"deep"} and keyed["deep"].shape == (3, 1, 64, 64)
    _assert_no_hooks(model)
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_pp_gradcheck_wrt_params():
    _, fn, params = smooth_double(nn.Softplus)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    target = torch.tensor([1, 3])
    for name in ("fc.weight", "conv1.bias"):
        w = params[name].clone().requires_grad_(True)
        f = lambda w: grad_cam_pp(fn, {**params, name: w}, x, target, layer="features", relu=False)
        torch.autograd.gradcheck(f, (w,))


# --------------------------------------------------------------------------------------------
# Score-CAM

def _score_cam_loop(model, layer, x, labels, align_corners=False):
    """Wang et al.'s recipe written out, one image and one channel at a time."""
    store = {}
    handle = layer.register_forward_hook(lambda m, args, out: store.setdefault("a", out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    maps = []
    for b in range(x.shape[0]):
        total = 0.0
        for a in store["a"][b]:
            m = nn.functional.interpolate(a[None, None], size=x.shape[2:], mode="bilinear",
                                          align_corners=align_corners)[0, 0]
            m = (m - m.min()) / (m.max() - m.min() + 1e-8)
            with torch.no_grad():
                p = torch.softmax(model(x[b:b + 1] * m), dim=1)[0, labels[b]]
            total = total + p * a
        maps.append(total.relu())
    return torch.stack(maps)[:, None]


def test_score_cam_matches_a_direct_loop_and_ignores_batch_size():
    model, fn, params = _tiny()
    x = torch.randn(3, 3, 8, 8)
    labels = torch.tensor([0, 4, 2])
    expected = _score_cam_loop(model, model.features, x, labels)
    got = score_cam(fn, params, x, labels, layer="features", upsample=False)
    torch.testing.assert_close(got, expected)
    assert got.abs().max() > 1e-3
    for batch_size in (1, 5, 100):
        torch.testing.assert_close(score_cam(fn, params, x, labels, layer=model.features, batch_size=batch_size,
                                             upsample=False), got)
    # None = the class predicted for the unmasked image; upsampling is bilinear, align_corners=False.
    predicted = model(x).argmax(1)
    torch.testing.assert_close(score_cam(fn, params, x, layer="features"),
                               tx.postprocess.resize(score_cam(fn, params, x, predicted, layer="features",
                                                               upsample=False), (8, 8)))
    # A callable target (applied to each batch of masked images) gives the weight itself in "prob" mode.
    torch.testing.assert_close(score_cam(fn, params, x, tx.targets.prob(4), layer="features", batch_size=7),
                               score_cam(fn, params, x, 4, layer="features"))


def _pgc_score_cam_raw(model, layer, x, labels, batch_size):
    targets = [ClassifierOutputTarget(int(c)) for c in labels]
    with ScoreCAM(model=model, target_layers=[layer]) as extractor:
        extractor.batch_size = batch_size
        with torch.no_grad():
            extractor.activations_and_grads(x)
        (acts,) = extractor.activations_and_grads.activations
        raw = extractor.get_cam_image(x, layer, targets, acts.numpy(), None)
    return torch.from_numpy(raw)


@pytest.mark.parametrize("name", ["tiny", "resnet18"])
def test_score_cam_matches_pytorch_grad_cam(name):
    # pytorch-grad-cam: masks resized with align_corners=True, weights a softmax over channels of the logits.
    if name == "tiny":
        model, fn, params = _tiny()
        layer, x = "features", torch.randn(3, 3, 8, 8)
        labels = torch.tensor([0, 4, 2])
    else:  # resnet18 at 32x32: layer3 is [1, 256, 2, 2]
        model, fn, params = _model("resnet18")
        layer, x = "layer3", _input()[:1, :, 16:48, 16:48].contiguous()
        labels = torch.tensor([517])
    raw = _pgc_score_cam_raw(model, model.get_submodule(layer), x, labels, batch_size=128)
    with torch.no_grad():
        ours = score_cam(fn, params, x, labels, layer=layer, batch_size=128, upsample=False, relu=False,
                         weights="softmax", align_corners=True)
    _assert_parity(ours[:, 0], raw)
    _assert_no_hooks(model)


def test_score_cam_is_differentiable_wrt_params():
    model, fn, params = smooth_double(nn.Softplus)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    w = params["fc.weight"].clone().requires_grad_(True)
    f = lambda w: score_cam(fn, {**params, "fc.weight": w}, x, torch.tensor([2]), layer="features", relu=False)
    torch.autograd.gradcheck(f, (w,))


# --------------------------------------------------------------------------------------------
# Errors

@pytest.mark.parametrize("method", [grad_cam_pp, score_cam])
def test_errors_name_the_function(method):
    _, fn, params = _tiny()
    x = torch.randn(2, 3, 8, 8)
    prefix = f"^{method.__name__}: "
    with pytest.raises(ValueError, match=prefix + "unknown layer 'featurs'. Did you mean 'features'"):
        method(fn, params, x, layer="featurs")
    with pytest.raises(ValueError, match=prefix + "expected target values in"):
        method(fn, params, x, torch.tensor([0, 9]), layer="features")
    with pytest.raises(ValueError, match=prefix + "expected layer 'fc' to output"):
        method(fn, params, x, layer="fc")
    with pytest.raises(TypeError, match=prefix + "expected x of a floating-point dtype"):
        method(fn, params, x.long(), layer="features")
    with pytest.raises(TypeError, match=prefix + "expected relu, a bool"):
        method(fn, params, x, layer="features", relu=1)


def test_score_cam_errors():
    _, fn, params = _tiny()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="^score_cam: expected batch_size >= 1, got int 0"):
        score_cam(fn, params, x, layer="features", batch_size=0)
    with pytest.raises(TypeError, match="^score_cam: expected batch_size, a positive int"):
        score_cam(fn, params, x, layer="features", batch_size=2.0)
    with pytest.raises(TypeError, match="^score_cam: expected layer, one dotted name or module"):
        score_cam(fn, params, x, layer=["conv1", "features"])
    with pytest.raises(ValueError, match="^score_cam: expected weights in"):
        score_cam(fn, params, x, layer="features", weights="logit")
    with pytest.raises(ValueError, match=r"^score_cam: expected x of rank 3, 4 or 5 \(\[B, C, T\]"):
        score_cam(fn, params, x[:, 0, 0], layer="features")
