"""Numeric parity with the peer libraries: captum, pytorch-grad-cam, torchcam.

Every reference below is computed by *calling* the peer library on the same randomly initialised
torchvision model (no pretrained weights, no network). Where a peer post-processes its map
(pytorch-grad-cam and torchcam min-max normalise), the test either reads the peer's map before that
step or applies the peer's documented transform to ours, and says which.

Tolerance: float32 throughout, ``rtol=1e-5``. Entries of a map are sums over K channels (or
gradients summed over many paths) whose terms are of the order of the map's largest entry; an entry
near zero is a cancellation of such terms, so its rounding error scales with the map's magnitude,
not with the entry itself. ``_assert_parity`` (support/parity.py) therefore pairs ``rtol=1e-5`` with
``atol = 1e-5 * max|reference|`` (an error of 1e-5 *relative to the map's scale*), which is far
below any real discrepancy (a wrong weight, a missing ReLU, a transposed target would be O(1)).

Each comparison is made non-vacuous by ``assert_nontrivial`` (support/parity.py): the reference map
must have a non-negligible magnitude and structure, so that two all-zero maps cannot pass.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import InputXGradient, LayerAttribution, LayerGradCam, Saliency
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torchcam.methods import CAM as TorchcamCAM

import torchex_fn as tx
from support.parity import (BATCH, SIZE, assert_no_hooks as _assert_no_hooks, assert_parity as _assert_parity,
                            peer_input as _input, peer_model as _model)

# The second model differs from resnet18 in structure: inverted residuals, squeeze-excitation
# (a multiplicative gate), Hardswish, and a two-layer classifier head. Fast at 64x64 (2.5M params).
MODELS = ["resnet18", "mobilenet_v3_small"]
# Per model: a Grad-CAM layer at a coarse and one at a finer resolution (64x64 input).
GRAD_CAM_CASES = [
    ("resnet18", "layer4"),            # [B, 512, 2, 2]
    ("resnet18", "layer3"),            # [B, 256, 4, 4]
    ("mobilenet_v3_small", "features.8"),   # [B, 48, 4, 4], output of an SE inverted-residual block
    ("mobilenet_v3_small", "features.12"),  # [B, 576, 2, 2], last conv (Hardswish)
]
TARGET_KINDS = ["tensor", "int", "none"]


def _targets(kind, model, x):
    """(target for torchex_fn, the equivalent [B] LongTensor for the peers)."""
    if kind == "tensor":
        labels = torch.tensor([3, 517, 999])[:BATCH]
        return labels, labels
    if kind == "int":
        return 281, torch.full((BATCH,), 281)
    if kind == "none":
        with torch.no_grad():
            return None, model(x).argmax(1)
    raise AssertionError(kind)


def _requiring_grad(x):
    # captum's gradient helper warns when inputs do not already require grad; hand it a leaf that does.
    return x.clone().requires_grad_(True)


# --------------------------------------------------------------------------------------------
# 1-2. Input-gradient family against captum.

@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_saliency_matches_captum(name, kind):
    model, fn, params = _model(name)
    x = _input()
    target, labels = _targets(kind, model, x)
    ref = Saliency(model).attribute(_requiring_grad(x), target=labels, abs=False)
    ours = tx.saliency(fn, params, x, target)
    _assert_parity(ours, ref)
    # abs=True is captum's default; ours must agree there as well.
    _assert_parity(tx.saliency(fn, params, x, target, abs=True),
                   Saliency(model).attribute(_requiring_grad(x), target=labels))
    _assert_no_hooks(model)


@pytest.mark.parametrize("kind", ["tensor", "int"])
@pytest.mark.parametrize("name", MODELS)
def test_input_x_gradient_matches_captum(name, kind):
    model, fn, params = _model(name)
    x = _input()
    target, labels = _targets(kind, model, x)
    ref = InputXGradient(model).attribute(_requiring_grad(x), target=labels)
    _assert_parity(tx.input_x_gradient(fn, params, x, target), ref)
    _assert_no_hooks(model)


# --------------------------------------------------------------------------------------------
# 3. Grad-CAM against captum's LayerGradCam.

@pytest.mark.parametrize("kind", ["tensor", "int"])
@pytest.mark.parametrize("name, layer", GRAD_CAM_CASES)
def test_grad_cam_matches_captum(name, layer, kind):
    model, fn, params = _model(name)
    x = _input()
    target, labels = _targets(kind, model, x)
    module = model.get_submodule(layer)
    ref = LayerGradCam(model, module).attribute(x, target=labels, relu_attributions=True)
    ours = tx.grad_cam(fn, params, x, target, layer=layer, upsample=False)
    _assert_parity(ours, ref)
    # The module itself names the same layer.
    _assert_parity(tx.grad_cam(fn, params, x, target, layer=module, upsample=False), ref)
    # upsample=True is captum's bilinear LayerAttribution.interpolate (align_corners=False).
    _assert_parity(tx.grad_cam(fn, params, x, target, layer=layer),
                   LayerAttribution.interpolate(ref, (SIZE, SIZE), interpolate_mode="bilinear"))
    # relu=False is captum's default relu_attributions=False.
    _assert_parity(tx.grad_cam(fn, params, x, target, layer=layer, relu=False, upsample=False),
                   LayerGradCam(model, module).attribute(x, target=labels))
    _assert_no_hooks(model)


def test_grad_cam_several_layers_equal_single_layer_calls():
    model, fn, params = _model("resnet18")
    x = _input()
    labels = torch.tensor([3, 517, 999])
    single = {layer: tx.grad_cam(fn, params, x, labels, layer=layer, upsample=False) for layer in ("layer3", "layer4")}
    pair = tx.grad_cam(fn, params, x, labels, layer=["layer3", "layer4"], upsample=False)
    assert isinstance(pair, list) and len(pair) == 2
    _assert_parity(pair[0], single["layer3"])
    _assert_parity(pair[1], single["layer4"])
    keyed = tx.grad_cam(fn, params, x, labels, layer={"deep": "layer4", "mid": model.layer3})
    assert set(keyed) == {"deep", "mid"}
    _assert_parity(keyed["deep"], tx.grad_cam(fn, params, x, labels, layer="layer4"))
    _assert_parity(keyed["mid"], tx.grad_cam(fn, params, x, labels, layer="layer3"))
    # And against captum for both layers of the one call.
    for layer, got in zip(("layer3", "layer4"), pair):
        ref = LayerGradCam(model, model.get_submodule(layer)).attribute(x, target=labels, relu_attributions=True)
        _assert_parity(got, ref)


# --------------------------------------------------------------------------------------------
# 4. Grad-CAM against pytorch-grad-cam.
#
# pytorch-grad-cam's GradCAM.__call__ returns, per layer, relu(cam) min-max normalised
# (x - min) / (1e-7 + max) and resized with cv2.resize to the input size, then (aggregate over
# layers) relu, mean over layers and min-max normalised again. Its un-normalised map is
# ``get_cam_image(...)`` on the activations and gradients its ``ActivationsAndGradients`` recorded
# during that very call, followed by ``np.maximum(cam, 0)``: we read those right after the call,
# inside the ``with`` block (leaving it clears the recordings and removes its hooks).

def _pgc_min_max(maps):
    """pytorch-grad-cam's per-map scaling (scale_cam_image without resize), in torch."""
    flat = maps.flatten(1)
    flat = flat - flat.amin(1, keepdim=True)
    return (flat / (1e-7 + flat.amax(1, keepdim=True))).view_as(maps)


def _pytorch_grad_cam(model, layers, x, labels):
    """(final normalised output [B, H, W], raw relu'd maps per layer [B, h, w]) from pytorch-grad-cam."""
    targets = [ClassifierOutputTarget(int(c)) for c in labels]
    with GradCAM(model=model, target_layers=layers) as extractor:
        final = extractor(input_tensor=x, targets=targets)
        recorded = extractor.activations_and_grads
        raws = [np.maximum(extractor.get_cam_image(x, layer, targets, a.numpy(), g.numpy()), 0)
                for layer, a, g in zip(layers, recorded.activations, recorded.gradients)]
    # pytorch-grad-cam back-propagates with loss.backward(), which fills .grad of the shared
    # model's parameters; clear them so later tests see the model as built.
    model.zero_grad(set_to_none=True)
    return torch.from_numpy(final), [torch.from_numpy(r) for r in raws]


@pytest.mark.parametrize("name, layer", GRAD_CAM_CASES)
def test_grad_cam_matches_pytorch_grad_cam(name, layer):
    model, fn, params = _model(name)
    x = _input()
    labels = torch.tensor([3, 517, 999])
    final, (raw,) = _pytorch_grad_cam(model, [model.get_submodule(layer)], x, labels)
    ours = tx.grad_cam(fn, params, x, labels, layer=layer, upsample=False)[:, 0]
    # pytorch-grad-cam computes in numpy float32 (weights by np.mean, channel sum by ndarray.sum);
    # only the summation order differs from ours, well inside rtol=1e-5 of the map's scale.
    _assert_parity(ours, raw)
    # The final output: its pipeline applied to our raw map (min-max at the layer's resolution,
    # resize, ReLU, min-max again). cv2.resize (INTER_LINEAR on float32: half-pixel centres, edge
    # clamping) and our bilinear align_corners=False resize agree when upsampling (observed
    # max |diff| ~1e-6 on maps in [0, 1]). Min-max commutes with neither ReLU nor a resize that
    # misses the extrema, so the order of the steps is theirs, not ours.
    ours_final = _pgc_min_max(tx.postprocess.resize(_pgc_min_max(ours)[:, None], (SIZE, SIZE))[:, 0].relu())
    _assert_parity(ours_final, final)
    _assert_no_hooks(model)
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_two_layers_match_pytorch_grad_cam():
    """pytorch-grad-cam over [layer3, layer4]: each raw map, and its mean-of-normalised-maps output."""
    model, fn, params = _model("resnet18")
    x = _input()
    labels = torch.tensor([3, 517, 999])
    final, raws = _pytorch_grad_cam(model, [model.layer3, model.layer4], x, labels)
    ours = tx.grad_cam(fn, params, x, labels, layer=["layer3", "layer4"], upsample=False)
    for got, raw in zip(ours, raws):
        _assert_parity(got[:, 0], raw)
    scaled = [tx.postprocess.resize(_pgc_min_max(m[:, 0])[:, None], (SIZE, SIZE))[:, 0] for m in ours]
    _assert_parity(_pgc_min_max(torch.stack(scaled).relu().mean(0)), final)
    _assert_no_hooks(model)


# --------------------------------------------------------------------------------------------
# 5. CAM: closed form and torchcam.

def _closed_form_cam(model, x, labels, relu):
    """``relu?(sum_k W[c, k] A_k)`` with A read by a forward hook on layer4 and W = fc.weight."""
    store = {}
    handle = model.layer4.register_forward_hook(lambda m, args, out: store.setdefault("a", out))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    maps = torch.einsum("bk,bkhw->bhw", model.fc.weight.detach()[labels], store["a"])[:, None]
    return (maps.relu() if relu else maps), out


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_cam_matches_closed_form(kind, relu):
    model, fn, params = _model("resnet18")
    x = _input()
    target, labels = _targets(kind, model, x)
    ref, out = _closed_form_cam(model, x, labels, relu)
    _assert_parity(tx.cam(fn, params, x, target, layer="layer4", fc="fc", relu=relu, upsample=False), ref)
    # Default fc (the last nn.Linear), fc as a module and as a weight tensor all name the same weights.
    for fc in (None, model.fc, params["fc.weight"]):
        _assert_parity(tx.cam(fn, params, x, target, layer=model.layer4, fc=fc, relu=relu, upsample=False), ref)
    upsampled = F.interpolate(ref, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    _assert_parity(tx.cam(fn, params, x, target, layer="layer4", relu=relu), upsampled)
    if not relu:
        # resnet18 ends in global average pooling and fc: the CAM's spatial mean plus the bias is the logit.
        logits = out.gather(1, labels[:, None])[:, 0]
        _assert_parity(ref.mean(dim=(1, 2, 3)) + model.fc.bias.detach()[labels], logits)


def _torchcam(model, x, labels, normalized):
    with TorchcamCAM(model, target_layer="layer4", fc_layer="fc") as extractor:
        with torch.no_grad():
            model(x)
        (maps,) = extractor(class_idx=labels.tolist(), normalized=normalized)
    return maps


@pytest.mark.parametrize("kind", ["tensor", "int"])
def test_cam_matches_torchcam(kind):
    model, fn, params = _model("resnet18")
    x = _input()
    target, labels = _targets(kind, model, x)
    ours = tx.cam(fn, params, x, target, layer="layer4", fc="fc", upsample=False)[:, 0]
    # torchcam's CAM applies no ReLU (as ours by default); normalized=False is the raw [B, h, w] map.
    _assert_parity(ours, _torchcam(model, x, labels, normalized=False))
    # Its default normalisation, per map: m <- m - min(m); m <- m / (max(m) + 1e-8). No ReLU first.
    flat = ours.flatten(1) - ours.flatten(1).amin(1, keepdim=True)
    ours_normalized = (flat / (flat.amax(1, keepdim=True) + 1e-8)).view_as(ours)
    _assert_parity(ours_normalized, _torchcam(model, x, labels, normalized=True))
    _assert_no_hooks(model)
