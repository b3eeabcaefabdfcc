"""CAM-family methods on layers whose output is not [B, K, *grid]: ``reshape=`` and the layout rule.

* The ready-made transforms (``tokens_to_grid``, ``channels_last_to_first``) against written-out loops.
* Exact identities: a channels-last / token view of a conv layer, with the matching ``reshape``,
  gives the map of the conv layer itself (for every CAM-family method), under ``vmap`` and ``grad``.
* Parity with pytorch-grad-cam's ``reshape_transform`` (raw maps, before its scaling) on
  torchvision's VisionTransformer and SwinTransformer and on a timm ViT.
* Refusals: token and channels-last outputs without ``reshape`` get a ValueError naming it.
"""
import functools

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import torchex_fn as tx
from torchex_fn.methods.cam import _clear_layout
from support.parity import assert_no_hooks as _assert_no_hooks, assert_parity as _assert_parity

to_first = tx.postprocess.channels_last_to_first


# --------------------------------------------------------------------------------------------
# The transforms.

def test_tokens_to_grid_matches_a_loop():
    tokens = torch.randn(2, 2 + 12, 5)
    got = tx.postprocess.tokens_to_grid(prefix_tokens=2, grid=(3, 4))(tokens)
    assert got.shape == (2, 5, 3, 4)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                torch.testing.assert_close(got[b, :, i, j], tokens[b, 2 + 4 * i + j], rtol=0, atol=0)
    square = tx.postprocess.tokens_to_grid()(tokens[:, :10])   # 1 class token + 9 patches
    torch.testing.assert_close(square, tokens[:, 1:10].reshape(2, 3, 3, 5).permute(0, 3, 1, 2), rtol=0, atol=0)
    torch.testing.assert_close(tx.postprocess.tokens_to_grid(0)(tokens[:, :9]),
                               tokens[:, :9].reshape(2, 3, 3, 5).permute(0, 3, 1, 2), rtol=0, atol=0)


def test_channels_last_to_first_moves_the_last_axis():
    a = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(to_first(a), a.permute(0, 3, 1, 2), rtol=0, atol=0)
    v = torch.randn(2, 3, 4, 5, 6)
    torch.testing.assert_close(to_first(v), v.permute(0, 4, 1, 2, 3), rtol=0, atol=0)


def test_transform_errors():
    with pytest.raises(ValueError, match=r"^tokens_to_grid: expected a square number of patch tokens after the 1 "
                                         r"prefix token\(s\), got 11 tokens.*Pass grid=\(h, w\)"):
        tx.postprocess.tokens_to_grid()(torch.randn(2, 12, 4))
    with pytest.raises(ValueError, match=r"^tokens_to_grid: expected 3 x 4 = 12 patch tokens"):
        tx.postprocess.tokens_to_grid(2, grid=(3, 4))(torch.randn(2, 13, 4))
    with pytest.raises(ValueError, match=r"^tokens_to_grid: expected prefix_tokens >= 0"):
        tx.postprocess.tokens_to_grid(-1)
    with pytest.raises(TypeError, match=r"^tokens_to_grid: expected prefix_tokens, a non-negative int"):
        tx.postprocess.tokens_to_grid(1.0)
    with pytest.raises(ValueError, match=r"^tokens_to_grid: expected grid, a pair of positive ints"):
        tx.postprocess.tokens_to_grid(1, grid=(3, 0))
    with pytest.raises(ValueError, match=r"^tokens_to_grid: expected tokens of shape \[B, prefix_tokens \+ N, D\]"):
        tx.postprocess.tokens_to_grid()(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"^channels_last_to_first: expected a tensor \[B, \*grid, C\] of rank >= 3"):
        to_first(torch.randn(2, 3))


# --------------------------------------------------------------------------------------------
# The layout rule.

@pytest.mark.parametrize("grid, x_grid, clear", [
    ((7, 7), (224, 224), True),          # resnet layer4
    ((2, 2), (64, 64), True),
    ((4, 2), (100, 60), True),           # strided convs with rounding on a non-square input
    ((6, 14), (8, 16), True),            # a valid 3x3 convolution on a non-square input
    ((4, 6), (4, 6), True),              # the identity
    ((16,), (32,), True),                # 1-D conv
    ((2, 7, 7), (16, 112, 112), True),   # r3d_18's layer4 on a 16-frame clip
    ((7, 768), (224, 224), False),       # Swin [B, 7, 7, 768] read as K = 7
    ((56, 96), (224, 224), False),       # Swin stage 1 [B, 56, 56, 96]: 96 <= 224, but the factors disagree
    ((8, 64), (64, 64), False),          # a small Swin's [B, 8, 8, 64] on a 64 x 64 image
    ((300, 300), (224, 224), False),     # larger than the input
    ((7,), (7, 7), False),               # rank differs
])
def test_clear_layout_rule(grid, x_grid, clear):
    assert _clear_layout(grid, x_grid) is clear


class _Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, a):
        return a.permute(*self.dims)


class _Tokens(nn.Module):
    """``[B, K, h, w] -> [B, 1 + h w, K]`` with a learned class token first (a ViT's layout)."""

    def __init__(self, channels):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, channels))

    def forward(self, a):
        patches = a.flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(a.shape[0], -1, -1), patches], dim=1)


class ViewsCNN(nn.Module):
    """conv -> act -> conv -> act (``features``), then the same activation seen channels-last
    (``last``, ``[B, h, w, K]``; K = 16 exceeds the grid, so the layout rule refuses it) and as tokens (``tokens``, ``[B, 1 + h w, K]``); the head reads the
    patch tokens and mixes in the class token, so the class token's gradient is not zero."""

    def __init__(self, act=nn.Softplus, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = act()
        self.features = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), act())
        self.last = _Permute(0, 2, 3, 1)
        self.tokens = _Tokens(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        h = self.features(self.act1(self.conv1(x)))
        last = self.last(h)
        tokens = self.tokens(last.permute(0, 3, 1, 2))
        pooled = tokens[:, 1:].mean(1) + 0.5 * torch.tanh(tokens[:, 0])
        return self.fc(pooled + 0.0 * last.mean((1, 2)))


def _views(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = ViewsCNN().to(dtype).eval()
    return (model, *tx.functionalize(model))


TO_GRID = tx.postprocess.tokens_to_grid(prefix_tokens=1)
# name -> method with options (score_cam's masks are made from the map, so it takes 4-D x only)
CAM_METHODS = {
    "cam": functools.partial(tx.cam, fc="fc"),
    "grad_cam": tx.grad_cam,
    "grad_cam_pp": tx.grad_cam_pp,
    "score_cam": functools.partial(tx.score_cam, batch_size=7),
    "layer_cam": tx.layer_cam,
    "xgrad_cam": tx.xgrad_cam,
    "hires_cam": tx.hires_cam,
    "eigen_cam": tx.eigen_cam,
    "ablation_cam": functools.partial(tx.ablation_cam, batch_size=7),
}
VIEWS = [("last", to_first), ("tokens", TO_GRID)]


@pytest.mark.parametrize("layer, reshape", VIEWS)
@pytest.mark.parametrize("name", CAM_METHODS)
def test_a_reshaped_view_gives_the_map_of_the_conv_layer(name, layer, reshape):
    _, fn, params = _views()
    x = torch.randn(2, 3, 8, 8)
    target = torch.tensor([1, 3])
    method = CAM_METHODS[name]
    expected = method(fn, params, x, target, layer="features", relu=False)
    got = method(fn, params, x, target, layer=layer, reshape=reshape, relu=False)
    assert expected.shape == got.shape == (2, 1, 8, 8) and expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected)
    small = method(fn, params, x, target, layer=layer, reshape=reshape, upsample=False)
    torch.testing.assert_close(small, method(fn, params, x, target, layer="features", upsample=False))
    # Without reshape neither view is accepted, and the message says what to pass.
    with pytest.raises(ValueError, match=rf"^{name}: expected layer '{layer}' to output \[B, K, \*spatial\].*"
                                         r"Pass reshape=.*tokens_to_grid.*channels_last_to_first"):
        method(fn, params, x, target, layer=layer)


def test_grad_cam_on_several_reshaped_layers_in_one_call():
    _, fn, params = _views()
    x = torch.randn(2, 3, 8, 8)
    both = tx.grad_cam(fn, params, x, 2, layer=["last", "features"], reshape=lambda a: a if a.shape[1] == 16
                       else to_first(a))
    torch.testing.assert_close(both[0], both[1])


@pytest.mark.parametrize("name", ["grad_cam", "grad_cam_pp", "score_cam"])
def test_reshaped_maps_vmap_over_params_and_inputs_and_differentiate(name):
    models = [_views(seed)[0] for seed in range(2)]
    fn, _ = tx.functionalize(models[0])
    params, buffers = torch.func.stack_module_state(models)
    x = torch.randn(2, 3, 6, 6)
    target = torch.tensor([0, 4])
    method = CAM_METHODS[name]

    def call(p, xi=x, fn=fn):
        return method(fn, p, xi, target, layer="tokens", reshape=TO_GRID)

    batched = torch.func.vmap(call)({**params, **buffers})
    loop = torch.stack([call(dict(m.named_parameters()), fn=tx.functionalize(m)[0]) for m in models])
    torch.testing.assert_close(batched, loop)
    xs = torch.randn(2, 2, 3, 6, 6)
    single_fn, single_params = tx.functionalize(models[0])
    torch.testing.assert_close(torch.func.vmap(lambda xi: call(single_params, xi, single_fn))(xs),
                               torch.stack([call(single_params, xi, single_fn) for xi in xs]))
    # grad through params: the reshaped map is a differentiable function of the class token and fc.
    _, fn64, p64 = _views(dtype=torch.float64)
    x64 = x[:1, :, :4, :4].double()
    w = p64["tokens.cls"].clone().requires_grad_(True)
    torch.autograd.gradcheck(
        lambda w: method(fn64, {**p64, "tokens.cls": w}, x64, target[:1], layer="tokens", reshape=TO_GRID, relu=False),
        (w,))
    assert all(not m._forward_hooks for m in models[0].modules())


def test_reshape_errors():
    _, fn, params = _views()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TypeError, match=r"^grad_cam: expected reshape, a callable or None, got int 3"):
        tx.grad_cam(fn, params, x, layer="tokens", reshape=3)
    with pytest.raises(ValueError, match=r"^grad_cam_pp: expected reshape to map layer 'tokens'.s output of shape "
                                         r"\(2, 65, 16\) to \[B, K, \*grid\] with B = 2"):
        tx.grad_cam_pp(fn, params, x, layer="tokens", reshape=lambda a: a[0])
    with pytest.raises(ValueError, match=r"^score_cam: expected layer 'features' to output \[B, K, \*grid\] with x's 2 grid axes"):
        tx.score_cam(fn, params, x, layer="features", reshape=lambda a: a.flatten(2))
    # The escape hatch: reshape=lambda a: a accepts a layout the rule refuses.
    got = tx.grad_cam(fn, params, x, layer="last", reshape=lambda a: a, upsample=False)
    assert got.shape == (2, 1, 8, 16)


class _Swin224(nn.Module):
    """Swin's [B, 7, 7, 768] at 224 x 224, cheaply: average-pool by 32, 1x1 conv to 768, channels last."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(32)
        self.proj = nn.Conv2d(3, 768, 1)
        self.stage = _Permute(0, 2, 3, 1)
        self.head = nn.Linear(768, 3)

    def forward(self, x):
        return self.head(self.stage(self.proj(self.pool(x))).mean((1, 2)))


def test_swin_at_224_is_refused_and_works_with_reshape():
    torch.manual_seed(0)
    model = _Swin224().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(1, 3, 224, 224)
    for method in (tx.grad_cam, tx.grad_cam_pp):
        with pytest.raises(ValueError, match=r"expected layer 'stage' to output \[B, K, \*spatial\] laid out like x "
                                             r"of shape \(1, 3, 224, 224\).*got a torch.float32 tensor of shape "
                                             r"\(1, 7, 7, 768\). Pass reshape="):
            method(fn, params, x, layer="stage")
        torch.testing.assert_close(method(fn, params, x, layer="stage", reshape=to_first),
                                   method(fn, params, x, layer="proj"))


class _Conv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(4, 8, 5, stride=2, padding=2), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean(2))


class _Conv3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(2, 5, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3, 4)))


@pytest.mark.parametrize("model_cls, shape", [(_Conv1d, (2, 4, 32)), (_Conv3d, (2, 2, 6, 8, 8))])
@pytest.mark.parametrize("method", [tx.cam, tx.grad_cam, tx.grad_cam_pp])
def test_1d_and_3d_conv_layers_keep_working(model_cls, shape, method):
    torch.manual_seed(0)
    model = model_cls().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(*shape)
    maps = method(fn, params, x, torch.tensor([0, 2]), layer="features", upsample=False)
    assert maps.shape == (2, 1, *[(s + 1) // 2 for s in shape[2:]])
    assert method(fn, params, x, torch.tensor([0, 2]), layer="features").shape == (2, 1, *shape[2:])


class _Tokens1d(nn.Module):
    """A sequence model on embeddings ``[B, T, E]``: a per-token linear layer, mean over tokens, a head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.proj(x).mean(1))


def test_token_embeddings_are_refused_and_work_with_reshape():
    torch.manual_seed(0)
    model = _Tokens1d().double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    target = torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"^grad_cam: expected layer 'proj' to output \[B, K, length\] with K unlike "
                                         r"x's 10 channels.*reshape=tx.postprocess.channels_last_to_first and "
                                         r"upsample=False"):
        tx.grad_cam(fn, params, x, target, layer="proj")
    got = tx.grad_cam(fn, params, x, target, layer="proj", reshape=to_first, upsample=False, relu=False)
    # By hand: h = proj(x) [B, T, D]; weights = mean over tokens of d score / d h; map = sum_d w_d h_d.
    h = model.proj(x)
    grad, = torch.autograd.grad(model.head(h.mean(1)).gather(1, target[:, None]).sum(), h)
    expected = torch.einsum("bd,btd->bt", grad.mean(1), h)[:, None]
    assert got.shape == (2, 1, 10)
    torch.testing.assert_close(got, expected.detach())


# --------------------------------------------------------------------------------------------
# pytorch-grad-cam with its reshape_transform: raw maps (before its ReLU and scaling).

def _pgc_raw(cls, model, layer, x, labels, reshape):
    targets = [ClassifierOutputTarget(int(c)) for c in labels]
    with cls(model=model, target_layers=[layer], reshape_transform=reshape) as extractor:
        if cls is ScoreCAM:
            extractor.batch_size = 64
            with torch.no_grad():
                extractor.activations_and_grads(x)
            (acts,) = extractor.activations_and_grads.activations
            raw = extractor.get_cam_image(x, layer, targets, acts.numpy(), None)
        else:
            extractor(input_tensor=x, targets=targets)
            recorded = extractor.activations_and_grads
            raw = extractor.get_cam_image(x, layer, targets, recorded.activations[0].numpy(),
                                          recorded.gradients[0].numpy())
    model.zero_grad(set_to_none=True)
    return torch.from_numpy(np.asarray(raw))


def _ours(method, fn, params, x, labels, layer, reshape):
    if method == "score_cam":
        with torch.no_grad():
            return tx.score_cam(fn, params, x, labels, layer=layer, reshape=reshape, batch_size=64, upsample=False,
                                relu=False, weights="softmax", align_corners=True)[:, 0]
    return getattr(tx, method)(fn, params, x, labels, layer=layer, reshape=reshape, upsample=False, relu=False)[:, 0]


PGC = {"grad_cam": GradCAM, "grad_cam_pp": GradCAMPlusPlus, "score_cam": ScoreCAM}
_TRANSFORMERS = {}


def _transformer(name):
    """Small randomly initialised transformers (seeded), built once; (model, layer name, reshape, x)."""
    if name not in _TRANSFORMERS:
        torch.manual_seed(0)
        if name == "torchvision_vit":
            model = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2,
                                                         hidden_dim=32, mlp_dim=64, num_classes=10)
            with torch.no_grad():  # torchvision initialises the head to zero: every gradient would be 0
                model.heads.head.weight.normal_(0, 0.5)
            layer, reshape, size = "encoder.layers.encoder_layer_1.ln_1", TO_GRID, 64
        elif name == "torchvision_swin":
            model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2],
                                                       num_heads=[2, 4], window_size=[4, 4], num_classes=10)
            layer, reshape, size = "features.3", to_first, 64   # [B, 8, 8, 64]
        elif name == "timm_vit":
            timm = pytest.importorskip("timm")
            model = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                                     num_heads=2, num_classes=10)
            layer, reshape, size = "blocks.1.norm1", TO_GRID, 32
        model.eval()
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        _TRANSFORMERS[name] = (model, *tx.functionalize(model), layer, reshape, x)
    return _TRANSFORMERS[name]


@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_pp", "score_cam"])
@pytest.mark.parametrize("name", ["torchvision_vit", "torchvision_swin", "timm_vit"])
def test_transformers_match_pytorch_grad_cam_with_its_reshape_transform(name, method):
    model, fn, params, layer, reshape, x = _transformer(name)
    labels = torch.tensor([3, 7])
    raw = _pgc_raw(PGC[method], model, model.get_submodule(layer), x, labels, reshape)
    _assert_parity(_ours(method, fn, params, x, labels, layer, reshape), raw)
    _assert_no_hooks(model)
    with pytest.raises(ValueError, match=rf"^{method}: expected layer '{layer}' to output .*Pass reshape="):
        getattr(tx, method)(fn, params, x, labels, layer=layer)
