"""Layer-CAM, XGrad-CAM, HiResCAM, Eigen-CAM, Ablation-CAM: closed forms, oracles, peer parity, errors.

Peer parity reads pytorch-grad-cam's raw map (``get_cam_image`` on what its hooks recorded, before
its ReLU and min-max scaling) and torchcam's ``normalized=False`` map (after its ReLU), on
randomly initialised resnet18 and mobilenet_v3_small (BatchNorm calibrated, see test_parity) at
64 x 64, batch 2, to 1e-5 of the map's max.
"""
import numpy as np
import pytest
import torch
from torch import nn
from pytorch_grad_cam import AblationCAM, EigenCAM, FullGrad, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torchcam.methods import LayerCAM as TorchcamLayerCAM, XGradCAM as TorchcamXGradCAM

import torchex_fn as tx
from support.models import LinearHead, TinyCNN, smooth_double
from support.parity import assert_no_hooks as _assert_no_hooks, assert_parity as _assert_parity, peer_model as _model

GRADIENT_METHODS = {"layer_cam": tx.layer_cam, "xgrad_cam": tx.xgrad_cam, "hires_cam": tx.hires_cam}
PGC = {"layer_cam": LayerCAM, "xgrad_cam": XGradCAM, "hires_cam": HiResCAM, "eigen_cam": EigenCAM,
       "ablation_cam": AblationCAM}


def _input(size=64):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4321))


LABELS = torch.tensor([3, 517])


def _pgc_raw(name, model, layer, x, labels):
    """pytorch-grad-cam's raw map for one layer, before its ReLU and scaling, [B, h, w]."""
    targets = [ClassifierOutputTarget(int(c)) for c in labels]
    with PGC[name](model=model, target_layers=[layer]) as extractor:
        if name in ("eigen_cam", "ablation_cam"):  # no gradients: record the activations only
            extractor.batch_size = 64
            with torch.no_grad():
                extractor.activations_and_grads(x)
            (acts,) = extractor.activations_and_grads.activations
            raw = extractor.get_cam_image(x, layer, targets, acts.numpy(), None, False)
        else:
            extractor(input_tensor=x, targets=targets)
            recorded = extractor.activations_and_grads
            raw = extractor.get_cam_image(x, layer, targets, recorded.activations[0].numpy(),
                                          recorded.gradients[0].numpy(), False)
    model.zero_grad(set_to_none=True)
    return torch.from_numpy(np.asarray(raw))


def _ours(name, fn, params, x, labels, layer):
    options = {"batch_size": 64} if name == "ablation_cam" else {}
    with torch.no_grad() if name in ("eigen_cam", "ablation_cam") else torch.enable_grad():
        return getattr(tx, name)(fn, params, x, labels, layer=layer, relu=False, upsample=False, **options)[:, 0]


# resnet18 layer4: [2, 512, 2, 2], layer3: [2, 256, 4, 4], layer2: [2, 128, 8, 8]; mobilenet_v3_small
# features.12: [2, 576, 2, 2] (Hardswish) and features.3.block.1: [2, 88, 8, 8] (ReLU).
# pytorch-grad-cam's AblationCAM zeroes a channel only on a layer whose minimum is 0 (else it writes
# min - 1e7), so Ablation-CAM is compared on ReLU outputs, and on layers with few channels (B K
# forwards of the whole model on each side).
CASES = [(name, model, layer)
         for name in ("layer_cam", "xgrad_cam", "hires_cam", "eigen_cam")
         for model, layer in (("resnet18", "layer4"), ("resnet18", "layer3"), ("mobilenet_v3_small", "features.12"))]
CASES += [("ablation_cam", "resnet18", "layer2"), ("ablation_cam", "mobilenet_v3_small", "features.3.block.1")]


@pytest.mark.parametrize("name, model_name, layer", CASES)
def test_raw_maps_match_pytorch_grad_cam(name, model_name, layer):
    model, fn, params = _model(model_name)
    x = _input()
    raw = _pgc_raw(name, model, model.get_submodule(layer), x, LABELS)
    ours = _ours(name, fn, params, x, LABELS, layer)
    if name == "eigen_cam":
        # LAPACK picks the singular vector's sign; ours is fixed (see eigen_cam), so compare up to a
        # sign per example, and check that ours follows its rule.
        sign = torch.sign((ours * raw).flatten(1).sum(1))[:, None, None]
        assert (sign != 0).all()
        _assert_parity(ours * sign, raw)
        _, act = tx.capture(fn, params, x, layer)
        centred_sum = (act - act.mean(dim=(2, 3), keepdim=True)).sum(1)
        assert ((ours * centred_sum).flatten(1).sum(1) >= 0).all()
    else:
        _assert_parity(ours, raw)
    _assert_no_hooks(model)
    assert all(p.grad is None for p in model.parameters())


TORCHCAM = {"layer_cam": TorchcamLayerCAM, "xgrad_cam": TorchcamXGradCAM}


@pytest.mark.parametrize("name", TORCHCAM)
@pytest.mark.parametrize("model_name, layer", [("resnet18", "layer4"), ("mobilenet_v3_small", "features.12")])
def test_layer_cam_and_xgrad_cam_match_torchcam(name, model_name, layer):
    model, fn, params = _model(model_name)
    x = _input()
    with TORCHCAM[name](model, target_layer=layer) as extractor:
        scores = model(x)
        (ref,) = extractor(class_idx=LABELS.tolist(), scores=scores, normalized=False)
    ref = ref.detach()
    # torchcam applies its ReLU (as ours by default) and adds 1e-8 to XGrad-CAM's normaliser where
    # pytorch-grad-cam and our default add 1e-7; after Hardswish a channel's sum can be near zero,
    # where that matters (observed 1e-4 relative), so its eps is passed.
    options = {"eps": 1e-8} if name == "xgrad_cam" else {}
    _assert_parity(GRADIENT_METHODS[name](fn, params, x, LABELS, layer=layer, upsample=False, **options)[:, 0], ref)
    _assert_no_hooks(model)


# --------------------------------------------------------------------------------------------
# Closed forms and oracles.

def test_gradient_methods_on_a_linear_head_have_closed_forms():
    # features = x and score_c = sum_k W[c, k] mean_ij x_k + b_c, so g = W[c, k] / (H W) everywhere.
    model = LinearHead().double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    target = torch.tensor([0, 3])
    g = model.fc.weight.detach()[target] / 24.0
    S = x.sum(dim=(2, 3))
    expected = {
        "layer_cam": torch.einsum("bk,bkhw->bhw", g.clamp_min(0), x),
        "hires_cam": torch.einsum("bk,bkhw->bhw", g, x),
        "xgrad_cam": torch.einsum("bk,bkhw->bhw", g * S / (S + 1e-7), x),
    }
    for name, method in GRADIENT_METHODS.items():
        got = method(fn, params, x, target, layer="features", relu=False, upsample=False)
        torch.testing.assert_close(got, expected[name][:, None])
        torch.testing.assert_close(method(fn, params, x, target, layer="features", upsample=False),
                                   expected[name][:, None].clamp_min(0))
    assert (expected["layer_cam"] != expected["hires_cam"]).any()


def test_hires_cam_mean_is_the_score_after_global_average_pooling():
    """HiResCAM's faithfulness: with GAP + linear after the layer, the map sums to logit - bias."""
    model = TinyCNN(nn.ReLU).double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 4, 2])
    maps = tx.hires_cam(fn, params, x, target, layer="features", relu=False, upsample=False)
    logits = model(x).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(maps.sum(dim=(1, 2, 3)), logits - model.fc.bias.detach()[target])


def test_eigen_cam_matches_an_eigendecomposition_and_fixes_the_sign():
    model = TinyCNN(nn.ReLU).double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    _, act = tx.capture(fn, params, x, "features")
    got = tx.eigen_cam(fn, params, x, layer="features", relu=False, upsample=False)
    for b in range(3):
        points = act[b].flatten(1).T                                   # [h w, K]
        points = points - points.mean(0)
        _, vectors = torch.linalg.eigh(points.T @ points)              # ascending eigenvalues
        v = vectors[:, -1]
        v = -v if v.sum() < 0 else v
        torch.testing.assert_close(got[b, 0], (points @ v).reshape(8, 8))
    assert got.abs().max() > 1e-3
    # The target does not change the map.
    torch.testing.assert_close(tx.eigen_cam(fn, params, x, 3, layer="features", relu=False, upsample=False), got)


def test_eigen_cam_is_differentiable_wrt_params():
    _, fn, params = smooth_double(nn.Softplus)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    w = params["conv1.bias"].clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda w: tx.eigen_cam(fn, {**params, "conv1.bias": w}, x, layer="features",
                                                    relu=False), (w,))


def _ablation_loop(model, layer, x, labels):
    """Desai and Ramaswamy's recipe, one image and one channel at a time, with a forward hook."""
    store = {}
    handle = layer.register_forward_hook(lambda m, args, out: store.setdefault("a", out))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    maps = []
    for b in range(x.shape[0]):
        y = logits[b, labels[b]]
        total = 0.0
        for k in range(store["a"].shape[1]):
            def zero(m, args, out, k=k):
                out = out.clone()
                out[:, k] = 0
                return out
            handle = layer.register_forward_hook(zero)
            with torch.no_grad():
                y_k = model(x[b:b + 1])[0, labels[b]]
            handle.remove()
            total = total + (y - y_k) / y * store["a"][b, k]
        maps.append(total.relu())
    return torch.stack(maps)[:, None]


def test_ablation_cam_matches_a_direct_loop_and_ignores_batch_size():
    torch.manual_seed(0)
    model = TinyCNN(nn.ReLU).eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 3, 8, 8)
    labels = torch.tensor([0, 4, 2])
    expected = _ablation_loop(model, model.features, x, labels)
    got = tx.ablation_cam(fn, params, x, labels, layer="features", upsample=False)
    torch.testing.assert_close(got, expected)
    assert got.abs().max() > 1e-3
    for batch_size in (1, 5, 100):
        torch.testing.assert_close(tx.ablation_cam(fn, params, x, labels, layer=model.features, upsample=False,
                                                   batch_size=batch_size), got)
    # None = the class predicted for the unablated image; a callable target gives the same as its index.
    predicted = model(x).argmax(1)
    torch.testing.assert_close(tx.ablation_cam(fn, params, x, layer="features"),
                               tx.ablation_cam(fn, params, x, predicted, layer="features"))
    torch.testing.assert_close(tx.ablation_cam(fn, params, x, tx.targets.logit(4), layer="features", batch_size=7),
                               tx.ablation_cam(fn, params, x, 4, layer="features"))
    assert all(not m._forward_hooks for m in model.modules())


def test_ablation_cam_is_differentiable_wrt_params():
    _, fn, params = smooth_double(nn.Softplus)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    w = params["fc.weight"].clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda w: tx.ablation_cam(fn, {**params, "fc.weight": w}, x, torch.tensor([2]),
                                                       layer="features", relu=False), (w,))


# --------------------------------------------------------------------------------------------
# FullGrad.

class _RawFullGrad(FullGrad):
    """pytorch-grad-cam's FullGrad, keeping its map before the final min-max scaling."""

    def aggregate_multi_layers(self, cam_per_target_layer):
        self.raw = np.sum(cam_per_target_layer, axis=1)
        return super().aggregate_multi_layers(cam_per_target_layer)


@pytest.mark.parametrize("model_name", ["resnet18", "mobilenet_v3_small"])
def test_fullgrad_matches_pytorch_grad_cam(model_name):
    # Every Conv2d / BatchNorm2d with a bias: resnet18's 20 batch norms; mobilenet_v3_small's 52
    # (batch norms and the squeeze-excitation convolutions). Per-channel scaling, then bilinear
    # resizing (ours) or cv2.resize (theirs), which agree when upsampling (see test_parity).
    model, fn, params = _model(model_name)
    x = _input()
    with _RawFullGrad(model=model, target_layers=[]) as extractor:
        extractor(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in LABELS])
        raw = torch.from_numpy(extractor.raw)
    model.zero_grad(set_to_none=True)
    _assert_parity(tx.fullgrad(fn, params, x, LABELS)[:, 0], raw)
    _assert_no_hooks(model)


def _psi_sum(maps, size):
    """The paper's psi per example and channel, written out with loops, summed over channels."""
    out = torch.zeros(maps.shape[0], 1, *size, dtype=maps.dtype)
    for b in range(maps.shape[0]):
        for k in range(maps.shape[1]):
            m = maps[b, k].abs()
            m = (m - m.min()) / (m.max() - m.min() + 1e-7)
            out[b, 0] += nn.functional.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return out


def test_fullgrad_matches_an_autograd_oracle_and_folds_batch_norm():
    torch.manual_seed(0)
    model = TinyCNN(nn.ReLU)
    # conv -> batch norm -> ReLU, so the batch norm's gradient map is not constant over the grid
    model.features = nn.Sequential(model.features[0], nn.BatchNorm2d(6), nn.ReLU())
    with torch.no_grad():
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
        model.features[1].weight.uniform_(0.5, 2.0)
        model.features[1].bias.uniform_(-1.0, 1.0)
    model = model.double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 3])
    store = {}
    layers = {"conv1": model.conv1, "features.0": model.features[0], "features.1": model.features[1]}
    handles = [m.register_forward_hook(lambda m, a, out, n=n: store.setdefault(n, out)) for n, m in layers.items()]
    score = model(x).gather(1, target[:, None]).sum()
    for handle in handles:
        handle.remove()
    grads = torch.autograd.grad(score, [x, *store.values()])
    bn = model.features[1]
    biases = [model.conv1.bias, model.features[0].bias,
              bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)]
    expected = _psi_sum(grads[0] * x, (8, 8))
    for grad, bias in zip(grads[1:], biases):
        expected = expected + _psi_sum(grad * bias.detach()[None, :, None, None], (8, 8))
    got = tx.fullgrad(fn, params, x.detach(), target)
    torch.testing.assert_close(got, expected.detach())
    # Naming the layers gives the same map; naming fewer drops their terms.
    torch.testing.assert_close(tx.fullgrad(fn, params, x.detach(), target, layer=list(layers)), got)
    only_input_and_conv1 = _psi_sum(grads[0] * x, (8, 8)) + _psi_sum(grads[1] * biases[0].detach()[None, :, None, None],
                                                                     (8, 8))
    torch.testing.assert_close(tx.fullgrad(fn, params, x.detach(), target, layer="conv1"), only_input_and_conv1.detach())


def test_fullgrad_grad_through_params_under_vmap_equals_loop_in_float64():
    """The float64 version of the contract (whose float32 tolerance is loosened for FullGrad)."""
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = TinyCNN(nn.Softplus)
        model.features.add_module("2", nn.BatchNorm2d(6))
        models.append(model.double().eval())
    fn, _ = tx.functionalize(models[0])
    params, buffers = torch.func.stack_module_state(models)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    grads = torch.func.vmap(torch.func.grad(
        lambda p, b: tx.fullgrad(fn, {**p, **b}, x, target).pow(2).mean()))(params, buffers)
    for i, model in enumerate(models):
        fn_i, p_i = tx.functionalize(model)
        single = torch.func.grad(lambda p: tx.fullgrad(fn_i, {**p_i, **p}, x, target).pow(2).mean())(
            {k: v for k, v in p_i.items() if k in params})
        for key in single:
            torch.testing.assert_close(grads[key][i], single[key], rtol=1e-9, atol=1e-9)
    assert grads["fc.weight"].abs().sum() > 0


def test_fullgrad_errors():
    model = TinyCNN(nn.ReLU).eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^fullgrad: expected upsample=True"):
        tx.fullgrad(fn, params, x, upsample=False)
    with pytest.raises(ValueError, match=r"^fullgrad: expected layer 'act1' to have a bias"):
        tx.fullgrad(fn, params, x, layer="act1")
    with pytest.raises(TypeError, match=r"^fullgrad: expected layer \(the names of the layers with biases\)"):
        tx.fullgrad(lambda p, x: fn(p, x), params, x)


# --------------------------------------------------------------------------------------------
# Errors.

@pytest.mark.parametrize("name", ["layer_cam", "xgrad_cam", "hires_cam", "eigen_cam", "ablation_cam", "fullgrad"])
def test_errors_name_the_function(name):
    method = getattr(tx, name)
    model = TinyCNN(nn.ReLU).eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8)
    prefix = f"^{name}: "
    ok = "features.0" if name == "fullgrad" else "features"   # fullgrad names layers with a bias
    with pytest.raises(ValueError, match=prefix + "unknown layer 'featurs'. Did you mean 'features'"):
        method(fn, params, x, layer="featurs")
    with pytest.raises(ValueError, match=prefix + "expected target values in"):
        method(fn, params, x, torch.tensor([0, 9]), layer=ok)
    with pytest.raises(ValueError, match=prefix + r"expected layer 'fc' to output \[B, K, \*spatial\].*reshape="):
        method(fn, params, x, layer="fc")
    if name == "fullgrad":  # a layer with a bias: the message is the layout one
        return
    with pytest.raises(TypeError, match=prefix + "expected x of a floating-point dtype"):
        method(fn, params, x.long(), layer=ok)
    with pytest.raises(TypeError, match=prefix + "expected relu, a bool"):
        method(fn, params, x, layer=ok, relu=1)
    with pytest.raises(TypeError, match=prefix + "expected reshape, a callable or None"):
        method(fn, params, x, layer=ok, reshape="channels_last")
    assert all(not m._forward_hooks for m in model.modules())


def test_ablation_cam_errors():
    model = TinyCNN(nn.ReLU).eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="^ablation_cam: expected batch_size >= 1, got int 0"):
        tx.ablation_cam(fn, params, x, layer="features", batch_size=0)
    with pytest.raises(TypeError, match="^ablation_cam: expected layer, one dotted name or module"):
        tx.ablation_cam(fn, params, x, layer=["conv1", "features"])
