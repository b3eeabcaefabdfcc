"""Derivatives through attention (twice-differentiable path) and the transformer methods.

Part 1: ``torch.func.grad`` of a loss on a saliency / Grad-CAM map w.r.t. the parameters of
torchvision, timm and HuggingFace transformers works and equals plain autograd on the math backend
(and finite differences in float64); a plain call keeps the fused attention kernel.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import torchex_fn as tx

torchvision = pytest.importorskip("torchvision")


# --------------------------------------------------------------------------------------------
# Models (random weights, small configs).

class TokensToGrid(nn.Module):
    """[B, 1 + h*w, D] -> [B, D, h, w] (drops the class token): a layer Grad-CAM can read."""

    def forward(self, t):
        b, n, d = t.shape
        side = int(round((n - 1) ** 0.5))
        return t[:, 1:].transpose(1, 2).reshape(b, d, side, side)


class GridToTokens(nn.Module):
    """Inverse of :class:`TokensToGrid`, keeping the class token from the block's output."""

    def forward(self, grid):
        return grid.flatten(2).transpose(1, 2)


class WithGrid(nn.Module):
    """A transformer block whose output also passes through a ``grid`` layer [B, D, h, w]."""

    def __init__(self, block):
        super().__init__()
        self.block, self.grid, self.back = block, TokensToGrid(), GridToTokens()

    def forward(self, t):
        t = self.block(t)
        return torch.cat([t[:, :1], self.back(self.grid(t))], dim=1)


def tv_vit(dtype=torch.float32, with_grid=True):
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                             hidden_dim=16, mlp_dim=32, num_classes=5)
    nn.init.normal_(m.heads.head.weight, std=0.5)  # torchvision initialises the head to zero
    if with_grid:
        m.encoder.layers.encoder_layer_0 = WithGrid(m.encoder.layers.encoder_layer_0)
    return m.to(dtype).eval()


def timm_vit():
    timm = pytest.importorskip("timm")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                          num_heads=2, embed_dim=32, num_classes=5)
    m.blocks[0] = WithGrid(m.blocks[0])
    return m.eval()


class Logits(nn.Module):
    """HuggingFace model -> ``.logits`` (images, or ``inputs_embeds`` for a text model)."""

    def __init__(self, model, embeds=False):
        super().__init__()
        self.model, self.embeds = model, embeds

    def forward(self, x):
        return (self.model(inputs_embeds=x) if self.embeds else self.model(x)).logits


def hf_vit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=5)
    return Logits(transformers.ViTForImageClassification(cfg)).eval()


def hf_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return Logits(transformers.BertForSequenceClassification(cfg), embeds=True).eval()


class Ops(TorchDispatchMode):
    """Records the names of the aten operations that ran."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def fused(names):
    return sorted(n for n in names if "scaled_dot_product" in n or "multi_head_attention" in n)


# --------------------------------------------------------------------------------------------
# References: plain autograd with create_graph on the math backend.

def ref_saliency_loss_grad(module, params, x, target, weight):
    with sdpa_kernel([SDPBackend.MATH]):
        p = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in params.items()}
        xx = x.clone().requires_grad_(True)
        score = functional_call(module, p, (xx,))[:, target].sum()
        (g,) = torch.autograd.grad(score, xx, create_graph=True)
        loss = (g * weight).sum()
        names = [k for k, v in p.items() if v.requires_grad]
        grads = torch.autograd.grad(loss, [p[k] for k in names], allow_unused=True)
    return {k: torch.zeros_like(p[k]) if gk is None else gk for k, gk in zip(names, grads)}


def ref_grad_cam_loss_grad(module, params, x, target, layer, weight):
    with sdpa_kernel([SDPBackend.MATH]):
        p = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in params.items()}
        store = {}
        handle = dict(module.named_modules())[layer].register_forward_hook(lambda m, a, o: store.setdefault("a", o))
        try:
            score = functional_call(module, p, (x,))[:, target].sum()
        finally:
            handle.remove()
        act = store["a"]
        (g,) = torch.autograd.grad(score, act, create_graph=True)
        cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        loss = (cam * weight).sum()
        names = [k for k, v in p.items() if v.requires_grad]
        grads = torch.autograd.grad(loss, [p[k] for k in names], allow_unused=True)
    return {k: torch.zeros_like(p[k]) if gk is None else gk for k, gk in zip(names, grads)}


def assert_close_dicts(got, ref, rtol=1e-4):
    scale = max(float(v.abs().max()) for v in ref.values())
    assert scale > 0
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=rtol * scale, msg=k)


# --------------------------------------------------------------------------------------------
# Part 1: outer derivatives through attention.

IMAGE_MODELS = {"torchvision": tv_vit, "timm": timm_vit, "hf_vit": hf_vit}


@pytest.mark.parametrize("name", list(IMAGE_MODELS))
def test_grad_of_saliency_loss_wrt_params(name):
    module = IMAGE_MODELS[name]()
    fn, params = tx.functionalize(module)
    x = torch.randn(2, 3, 32, 32)
    weight = torch.randn_like(x)
    got = torch.func.grad(lambda p: (tx.saliency(fn, p, x, 1) * weight).sum())(params)
    ref = ref_saliency_loss_grad(module, params, x, 1, weight)
    assert_close_dicts({k: got[k] for k in ref}, ref)


@pytest.mark.parametrize("name", ["torchvision", "timm"])
def test_grad_of_grad_cam_loss_wrt_params(name):
    module = IMAGE_MODELS[name]()
    layer = "encoder.layers.encoder_layer_0.grid" if name == "torchvision" else "blocks.0.grid"
    fn, params = tx.functionalize(module)
    x = torch.randn(2, 3, 32, 32)
    weight = torch.randn(2, 1, 32, 32)
    got = torch.func.grad(lambda p: (tx.grad_cam(fn, p, x, 2, layer=layer) * weight).sum())(params)
    ref = ref_grad_cam_loss_grad(module, params, x, 2, layer, weight)
    assert_close_dicts({k: got[k] for k in ref}, ref)


def test_grad_of_saliency_loss_wrt_params_bert_embeddings():
    module = hf_bert()
    fn, params = tx.functionalize(module)
    x = torch.randn(2, 7, 32)
    weight = torch.randn_like(x)
    floats = {k: v for k, v in params.items() if v.is_floating_point()}  # BERT has integer buffers
    got = torch.func.grad(lambda p: (tx.saliency(fn, {**params, **p}, x, 0) * weight).sum())(floats)
    ref = ref_saliency_loss_grad(module, params, x, 0, weight)
    assert_close_dicts({k: got[k] for k in ref}, ref)


def test_outer_derivative_wrt_closed_over_input_runs_again_on_the_math_path():
    # grad w.r.t. x of a Grad-CAM loss: x is closed over by the layer gradient (rule 3 of _autodiff).
    module = tv_vit()
    fn, params = tx.functionalize(module)
    layer = "encoder.layers.encoder_layer_0.grid"
    x = torch.randn(2, 3, 32, 32)
    weight = torch.randn(2, 1, 32, 32)
    got = torch.func.grad(lambda x: (tx.grad_cam(fn, params, x, 2, layer=layer) * weight).sum())(x)
    with sdpa_kernel([SDPBackend.MATH]):
        xx = x.clone().requires_grad_(True)
        store = {}
        h = module.encoder.layers.encoder_layer_0.grid.register_forward_hook(lambda m, a, o: store.setdefault("a", o))
        try:
            score = module(xx)[:, 2].sum()
        finally:
            h.remove()
        (g,) = torch.autograd.grad(score, store["a"], create_graph=True)
        cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * store["a"]).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)
        (ref,) = torch.autograd.grad((cam * weight).sum(), xx)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


def test_plain_call_keeps_the_fused_kernel_and_outer_grad_takes_the_math_path():
    fn, params = tx.functionalize(tv_vit())
    x = torch.randn(2, 3, 32, 32)
    with Ops() as plain:
        tx.saliency(fn, params, x, 1)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in plain.names
    with Ops() as forward_only:
        fn(params, x)
    assert fused(forward_only.names) == ["aten::_native_multi_head_attention"]
    with Ops() as outer:
        torch.func.grad(lambda p: tx.saliency(fn, p, x, 1).pow(2).sum())(params)
    assert fused(outer.names) == []
    # the backend flags are restored after the call
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.mha.get_fastpath_enabled()


def test_backend_flags_restored_when_the_model_raises():
    fn, params = tx.functionalize(tv_vit())
    x = torch.randn(2, 3, 32, 32)

    def bad_target(out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        torch.func.grad(lambda p: tx.saliency(fn, p, x, bad_target).sum())(params)
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.mha.get_fastpath_enabled()
    with Ops() as plain:
        tx.saliency(fn, params, x, 1)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in plain.names


def test_gradcheck_of_saliency_wrt_params_float64_and_third_order_equals_autograd():
    module = tv_vit(torch.float64)
    fn, params = tx.functionalize(module)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    weight = torch.randn_like(x)
    name = "encoder.layers.encoder_layer_1.self_attention.in_proj_bias"

    def f(b):
        return (tx.saliency(fn, {**params, name: b}, x, 1) * weight).sum(dim=(2, 3)).flatten()

    def f_ref(b):  # plain autograd on the math path
        with sdpa_kernel([SDPBackend.MATH]):
            xx = x.clone().requires_grad_(True)
            score = functional_call(module, {**params, name: b}, (xx,))[:, 1].sum()
            (g,) = torch.autograd.grad(score, xx, create_graph=True)
        return (g * weight).sum(dim=(2, 3)).flatten()

    b = params[name].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (b,), fast_mode=True)
    # gradgradcheck fails for plain autograd on torch's math path as well (max error 1.5e-2 in torch
    # 2.14, an operation's third derivative); ours must equal autograd's third derivative instead.
    u, v = torch.randn(3, dtype=torch.float64), torch.randn(48, dtype=torch.float64)
    thirds = []
    for g in (f, f_ref):
        (d1,) = torch.autograd.grad((g(b) * u).sum(), b, create_graph=True)
        (d2,) = torch.autograd.grad((d1 * v).sum(), b)
        thirds.append(d2)
    torch.testing.assert_close(thirds[0], thirds[1], rtol=1e-9, atol=1e-12)
    assert thirds[0].abs().max() > 0
