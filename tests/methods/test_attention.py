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
    with Ops() as outer:
        got = torch.func.grad(lambda p: (tx.saliency(fn, p, x, 1) * weight).sum())(params)
    ref = ref_saliency_loss_grad(module, params, x, 1, weight)
    assert_close_dicts({k: got[k] for k in ref}, ref)
    assert fused(outer.names) == []
    with Ops() as plain:  # the plain call keeps the fused kernel
        tx.saliency(fn, params, x, 1)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in plain.names


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


# --------------------------------------------------------------------------------------------
# Part 2: attention rollout, gradient-weighted rollout, LeGrad.

class OneLayerAttention(nn.Module):
    """Tokens [B, N, D] -> logits; ``layers`` self-attention layers through F.scaled_dot_product_attention."""

    def __init__(self, dim=4, heads=2, layers=1, classes=3, zero_query=False):
        super().__init__()
        self.heads = heads
        self.q = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.k = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.out = nn.Linear(dim, classes)
        if zero_query:  # q = 0: every query attends uniformly to all keys
            for q in self.q:
                nn.init.zeros_(q.weight)
                nn.init.zeros_(q.bias)

    def split(self, t):
        b, n, d = t.shape
        return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x):
        for q, k in zip(self.q, self.k):
            att = F.scaled_dot_product_attention(self.split(q(x)), self.split(k(x)), self.split(x))
            x = x + torch.tanh(att.transpose(1, 2).reshape(x.shape))
        return self.out(x[:, 0])


def test_rollout_closed_form_uniform_attention():
    x = torch.randn(2, 5, 4)  # class token + 2 x 2 patches
    for layers, expected in [(1, 1 / (2 * 5)), (2, 3 / (4 * 5))]:  # (U + I)/2 and ((U + I)/2)^2 = (3U + I)/4
        fn, params = tx.functionalize(OneLayerAttention(layers=layers, zero_query=True).eval())
        maps = tx.attention_rollout(fn, params, x, upsample=False)
        torch.testing.assert_close(maps, torch.full((2, 1, 2, 2), expected))


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_rollout_one_layer_equals_softmax_by_hand(fusion):
    model = OneLayerAttention().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        q, k = model.split(model.q[0](x)), model.split(model.k[0](x))
        probs = torch.softmax(q @ k.transpose(-2, -1) / 2 ** 0.5, dim=-1)  # [B, 2, 5, 5]
    fused_ = {"mean": probs.mean(1), "max": probs.amax(1), "min": probs.amin(1)}[fusion] + torch.eye(5)
    rolled = fused_ / fused_.sum(-1, keepdim=True)
    got = tx.attention_rollout(fn, params, x, head_fusion=fusion, upsample=False)
    torch.testing.assert_close(got, rolled[:, 0, 1:].reshape(2, 1, 2, 2))
    no_cls = tx.attention_rollout(fn, params, x, head_fusion=fusion, token=None, prefix_tokens=0, grid=(1, 5),
                                  upsample=False)
    torch.testing.assert_close(no_cls, rolled.mean(1).reshape(2, 1, 1, 5))


def _tv_attention_hooks(module):
    """Hook reference: per-head probabilities of every nn.MultiheadAttention, kept in the graph."""
    store, handles = [], []

    def pre(mod, args, kwargs):
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def post(mod, args, kwargs, output):  # recompute the output from the probabilities, so they are in the graph
        probs, value = output[1], args[2]
        b, n, e = value.shape
        v = F.linear(value, mod.in_proj_weight[2 * e:], mod.in_proj_bias[2 * e:])
        v = v.reshape(b, n, mod.num_heads, e // mod.num_heads).transpose(1, 2)
        store.append(probs)
        return mod.out_proj((probs @ v).transpose(1, 2).reshape(b, n, e)), None

    for m in module.modules():
        if isinstance(m, nn.MultiheadAttention):
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    return store, handles


def _chefer_reference(probs, grads):
    n = probs[0].shape[-1]
    r = torch.eye(n).expand(probs[0].shape[0], n, n)
    for a, g in zip(probs, grads):
        r = r + (g * a).clamp(min=0).mean(1) @ r
    return r[:, 0, 1:]


def test_grad_rollout_equals_hook_reference_torchvision():
    module = tv_vit(with_grid=False)
    fn, params = tx.functionalize(module)
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([1, 3])
    store, handles = _tv_attention_hooks(module)
    try:
        score = module(x).gather(1, target[:, None]).sum()
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(score, store)
    ref = _chefer_reference([a.detach() for a in store], grads).reshape(2, 1, 4, 4)
    got = tx.grad_rollout(fn, params, x, target, upsample=False)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert ref[:, :, :, :].std() > 0
    # only the last layer
    last = tx.grad_rollout(fn, params, x, target, layers=[-1], upsample=False)
    ref_last = _chefer_reference([store[-1].detach()], grads[-1:]).reshape(2, 1, 4, 4)
    torch.testing.assert_close(last, ref_last, rtol=0, atol=1e-5 * float(ref_last.abs().max()))
    # rollout against the same hook probabilities
    a = [p.detach().mean(1) + torch.eye(17) for p in store]
    a = [t / t.sum(-1, keepdim=True) for t in a]
    rolled = (a[1] @ a[0])[:, 0, 1:].reshape(2, 1, 4, 4)
    torch.testing.assert_close(tx.attention_rollout(fn, params, x, upsample=False), rolled)
    up = tx.attention_rollout(fn, params, x)
    torch.testing.assert_close(up, F.interpolate(rolled, size=(32, 32), mode="bilinear", align_corners=False))


@pytest.mark.parametrize("target", [1, None, "tensor"])
def test_legrad_equals_torchcam(target):
    torchcam = pytest.importorskip("torchcam.methods")
    module = tv_vit(with_grid=False)
    fn, params = tx.functionalize(module)
    x = torch.randn(2, 3, 32, 32)
    blocks = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    with torchcam.LeGrad(module, blocks) as extractor:
        scores = module(x)
        cls = {1: 1, None: scores.argmax(1).tolist(), "tensor": [3, 0]}[target]
        ref = extractor(cls, scores, normalized=False)[0]
    ours_target = torch.tensor([3, 0]) if target == "tensor" else target
    got = tx.legrad(fn, params, x, ours_target, blocks=blocks, upsample=False)
    assert got.shape == (2, 1, 4, 4)
    torch.testing.assert_close(got[:, 0], ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert ref.abs().max() > 0
    # one block, given as a module
    with torchcam.LeGrad(module, blocks[1:]) as extractor:
        ref1 = extractor(1, module(x), normalized=False)[0]
    got1 = tx.legrad(fn, params, x, 1, blocks=[module.encoder.layers.encoder_layer_1], upsample=False)
    torch.testing.assert_close(got1[:, 0], ref1, rtol=0, atol=1e-5 * float(ref1.abs().max()))


def test_timm_rollouts_equal_the_unfused_hook_reference():
    module = timm_vit()
    module.blocks[0] = module.blocks[0].block  # plain blocks
    fn, params = tx.functionalize(module)
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([2, 4])
    got = tx.grad_rollout(fn, params, x, target, upsample=False)
    rolled = tx.attention_rollout(fn, params, x, upsample=False)
    leg = tx.legrad(fn, params, x, target, blocks=["blocks.0", "blocks.1"], head=["norm", "head"], pool="token",
                    upsample=False)
    # reference: timm's own unfused attention, probabilities read at attn_drop
    store, handles = [], []
    for blk in module.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(lambda m, a, o: store.append(o)))
    outs = []
    handles.append(module.blocks[0].register_forward_hook(lambda m, a, o: outs.append(o)))
    handles.append(module.blocks[1].register_forward_hook(lambda m, a, o: outs.append(o)))
    try:
        score = module(x).gather(1, target[:, None]).sum()
    finally:
        for h in handles:
            h.remove()
        for blk in module.blocks:
            blk.attn.fused_attn = True
    grads = torch.autograd.grad(score, store, retain_graph=True)
    ref = _chefer_reference([a.detach() for a in store], grads).reshape(2, 1, 4, 4)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    a = [p.detach().mean(1) + torch.eye(17) for p in store]
    a = [t / t.sum(-1, keepdim=True) for t in a]
    torch.testing.assert_close(rolled, (a[1] @ a[0])[:, 0, 1:].reshape(2, 1, 4, 4))
    maps = []
    for out, att in zip(outs, store):  # LeGrad by hand: each block's class-token score w.r.t. its attention
        s = module.head(module.norm(out)[:, 0]).gather(1, target[:, None]).sum()
        (g,) = torch.autograd.grad(s, att, retain_graph=True)
        maps.append(g.relu().mean(dim=(1, 2))[:, 1:])
    ref_leg = torch.stack(maps).mean(0).reshape(2, 1, 4, 4)
    torch.testing.assert_close(leg, ref_leg, rtol=0, atol=1e-5 * float(ref_leg.abs().max()))


def test_hf_vit_grad_rollout_equals_eager_output_attentions():
    transformers = pytest.importorskip("transformers")
    module = hf_vit()
    fn, params = tx.functionalize(module)
    x = torch.randn(2, 3, 32, 32)
    got = tx.grad_rollout(fn, params, x, 1, upsample=False)
    eager = transformers.ViTForImageClassification(module.model.config).eval()
    eager.load_state_dict(module.model.state_dict())
    eager.config._attn_implementation = "eager"
    out = eager(x, output_attentions=True)
    grads = torch.autograd.grad(out.logits[:, 1].sum(), out.attentions)
    ref = _chefer_reference([a.detach() for a in out.attentions], grads).reshape(2, 1, 4, 4)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_bert_rollout_over_tokens():
    module = hf_bert()
    fn, params = tx.functionalize(module)
    x = torch.randn(2, 7, 32)
    maps = tx.grad_rollout(fn, params, x, 0, prefix_tokens=1, grid=(1, 6), upsample=False)
    assert maps.shape == (2, 1, 1, 6) and maps.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# The contract (as tests/test_contracts.py, on a tiny ViT).

BLOCKS = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
ATTENTION_METHODS = {
    "attention_rollout": (tx.attention_rollout, {}),
    "attention_rollout_max_last": (tx.attention_rollout, {"head_fusion": "max", "layers": -1, "upsample": False}),
    "grad_rollout": (tx.grad_rollout, {}),
    "legrad": (tx.legrad, {"blocks": BLOCKS}),
}


def _vit(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return tv_vit(dtype, with_grid=False)


def acall(name, fn, params, x, target):
    method, options = ATTENTION_METHODS[name]
    return method(fn, params, x, target, **options)


def _state_is_clean(model):
    assert torch._C._len_torch_function_stack() == 0
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.mha.get_fastpath_enabled()
    assert all(not (m._forward_hooks or m._backward_hooks or m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", ATTENTION_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract_shape_dtype_determinism_and_batch(name, dtype):
    model = _vit(dtype=dtype)
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 3, 32, 32, dtype=dtype)
    target = torch.tensor([0, 1, 2])
    first = acall(name, fn, params, x, target)
    size = (4, 4) if ATTENTION_METHODS[name][1].get("upsample") is False else (32, 32)
    assert first.shape == (3, 1, *size) and first.dtype == dtype
    assert torch.equal(first, acall(name, fn, params, x, target)) and first.abs().sum() > 0
    single = torch.cat([acall(name, fn, params, x[i:i + 1], target[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(first, single)
    _state_is_clean(model)


@pytest.mark.parametrize("name", ATTENTION_METHODS)
def test_contract_vmap_over_inputs_and_ensembles_equals_loop(name):
    models = [_vit(seed) for seed in range(2)]
    fn, params0 = tx.functionalize(models[0])
    target = torch.tensor([1, 0])
    xs = torch.randn(2, 2, 3, 32, 32)
    batched = torch.func.vmap(lambda xi: acall(name, fn, params0, xi, target))(xs)
    torch.testing.assert_close(batched, torch.stack([acall(name, fn, params0, xi, target) for xi in xs]))
    params, buffers = torch.func.stack_module_state(models)
    batched = torch.func.vmap(lambda p: acall(name, fn, p, xs[0], target))({**params, **buffers})
    loop = torch.stack([acall(name, *tx.functionalize(m), xs[0], target) for m in models])
    torch.testing.assert_close(batched, loop)


@pytest.mark.parametrize("name", ATTENTION_METHODS)
def test_contract_grad_through_params_equals_finite_differences(name):
    model = _vit(dtype=torch.float64)
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    target = torch.tensor([1, 3])
    weight = torch.randn_like(acall(name, fn, params, x, target))

    def loss(p):
        return (acall(name, fn, {**params, **p}, x, target) * weight).sum()

    keys = [k for k in params if "self_attention" in k or k.startswith("heads")]
    sub = {k: params[k] for k in keys}
    grads = torch.func.grad(loss)(sub)
    direction = {k: torch.randn_like(v) for k, v in sub.items()}
    eps = 1e-6
    fd = (loss({k: v + eps * direction[k] for k, v in sub.items()})
          - loss({k: v - eps * direction[k] for k, v in sub.items()})) / (2 * eps)
    analytic = sum((grads[k] * direction[k]).sum() for k in keys)
    torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-9)
    assert any(grads[k].abs().sum() > 0 for k in keys if "in_proj" in k)
    _state_is_clean(model)


@pytest.mark.parametrize("name", ATTENTION_METHODS)
def test_contract_model_and_caller_tensors_untouched(name):
    import copy
    model = _vit()
    snapshot = copy.deepcopy(model.state_dict())
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    acall(name, fn, params, x, None)
    assert x.requires_grad and x.grad is None
    assert all(not m.training for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot[key]), key
    _state_is_clean(model)


class _RaisingViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.vit = tv_vit(with_grid=False)

    def forward(self, x):
        self.vit(x)
        raise RuntimeError("model failed")


@pytest.mark.parametrize("name", ATTENTION_METHODS)
def test_contract_no_mode_or_hook_after_a_failing_call(name):
    model = _RaisingViT().eval()
    fn, params = tx.functionalize(model)
    method, options = ATTENTION_METHODS[name]
    if method is tx.legrad:
        options = {"blocks": [f"vit.{b}" for b in BLOCKS], "head": ["vit.encoder.ln", "vit.heads"]}
    with pytest.raises(RuntimeError, match="model failed"):
        method(fn, params, torch.randn(2, 3, 32, 32), 0, **options)
    _state_is_clean(model)


# --------------------------------------------------------------------------------------------
# Errors.

class _NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("method", [tx.attention_rollout, tx.grad_rollout])
def test_error_no_attention_call(method):
    fn, params = tx.functionalize(_NoAttention())
    with pytest.raises(ValueError, match=f"{method.__name__}: .*no attention call in the forward"):
        method(fn, params, torch.randn(2, 3, 8, 8), 0)


def test_errors_bad_options():
    fn, params = tx.functionalize(_vit())
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"attention_rollout: expected layers in \[-2, 2\)"):
        tx.attention_rollout(fn, params, x, layers=[5])
    with pytest.raises(ValueError, match="attention_rollout: expected head_fusion in"):
        tx.attention_rollout(fn, params, x, head_fusion="median")
    with pytest.raises(TypeError, match="grad_rollout: expected layers"):
        tx.grad_rollout(fn, params, x, 0, layers="last")
    with pytest.raises(ValueError, match="grad_rollout: expected a square number of patch tokens"):
        tx.grad_rollout(fn, params, x, 0, prefix_tokens=0)
    with pytest.raises(ValueError, match=r"grad_rollout: expected target values in \[0, 5\)"):
        tx.grad_rollout(fn, params, x, torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="legrad: unknown layer 'encoder.layers.encoder_layer_9'"):
        tx.legrad(fn, params, x, 0, blocks=["encoder.layers.encoder_layer_9"])
    with pytest.raises(ValueError, match="legrad: expected pool in"):
        tx.legrad(fn, params, x, 0, blocks=BLOCKS, pool="max")
    with pytest.raises(TypeError, match="legrad: expected model_fn built by functionalize"):
        tx.legrad(lambda p, x: fn(p, x), params, x, 0, blocks=BLOCKS)
    fn2, params2 = tx.functionalize(timm_vit())
    with pytest.raises(ValueError, match="legrad: expected head="):
        tx.legrad(fn2, params2, x, 0, blocks=["blocks.1"])


def test_vmap_of_grad_of_saliency_loss_over_an_ensemble_of_vits_equals_loop():
    models = [_vit(seed) for seed in range(2)]
    fn, _ = tx.functionalize(models[0])
    params, buffers = torch.func.stack_module_state(models)
    x = torch.randn(2, 3, 32, 32)

    def loss(p, b):
        return tx.saliency(fn, {**p, **b}, x, torch.tensor([1, 2])).pow(2).sum()

    batched = torch.func.vmap(torch.func.grad(loss))(params, buffers)
    for i, model in enumerate(models):
        _, p_i = tx.functionalize(model)
        single = torch.func.grad(lambda p: tx.saliency(fn, p, x, torch.tensor([1, 2])).pow(2).sum())(p_i)
        for key in params:  # float32 sums in a different order: compare to each tensor's scale
            scale = float(single[key].abs().max())
            torch.testing.assert_close(batched[key][i], single[key], rtol=0, atol=1e-4 * scale + 1e-8)
    _state_is_clean(models[0])


def test_threads_share_the_math_backend_hold_and_flags_are_restored():
    import threading
    fn, params = tx.functionalize(_vit())
    x = torch.randn(2, 3, 32, 32)
    errors = []

    def work(seed):
        try:
            torch.manual_seed(seed)
            p = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in params.items()}
            for _ in range(3):
                torch.func.grad(lambda q: tx.saliency(fn, q, x, 1).pow(2).sum())(p)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.mha.get_fastpath_enabled()


class _MaskedMHA(nn.Module):
    def __init__(self, batch_first, attn_mask, padding):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.attn_mask, self.padding, self.batch_first = attn_mask, padding, batch_first

    def forward(self, x):
        x = x if self.batch_first else x.transpose(0, 1)
        out, _ = self.mha(x, x, x, attn_mask=self.attn_mask, key_padding_mask=self.padding, need_weights=False)
        return out if self.batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "padding"])
def test_intercepted_multihead_attention_equals_torch(batch_first, masks):
    n = 5
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)  # MHA: True = masked out
    attn_mask = {"bool": causal, "float": torch.randn(n, n)}.get(masks)
    padding = torch.tensor([[False] * 4 + [True], [False] * 5]) if masks == "padding" else None
    module = _MaskedMHA(batch_first, attn_mask, padding).eval()
    fn, params = tx.functionalize(module)
    x = torch.randn(2, n, 8)
    out, probs = tx.attention_probabilities(fn, params, x)
    with torch.no_grad():
        torch.testing.assert_close(out, module(x))
        xs = x if batch_first else x.transpose(0, 1)
        _, ref = module.mha(xs, xs, xs, attn_mask=attn_mask, key_padding_mask=padding, need_weights=True,
                            average_attn_weights=False)
    torch.testing.assert_close(probs[0], ref)


class _SDPA(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, x):  # x: [B, H, N, E]; keys/values from half the heads when gqa
        kv = x[:, ::2] if self.options.get("enable_gqa") else x
        return F.scaled_dot_product_attention(x, kv * 0.5, kv, **self.options)


@pytest.mark.parametrize("options", [{}, {"is_causal": True}, {"scale": 0.3}, {"enable_gqa": True},
                                     {"attn_mask": torch.ones(4, 4, dtype=torch.bool).tril()},
                                     {"attn_mask": torch.randn(4, 4)}])
def test_intercepted_sdpa_equals_torch(options):
    module = _SDPA(**options)
    x = torch.randn(2, 2, 4, 3)
    out, probs = tx.attention_probabilities(lambda p, x: module(x), {}, x)
    torch.testing.assert_close(out, module(x))
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, 2, 4))
    if options.get("is_causal") or "attn_mask" in options and options["attn_mask"].dtype == torch.bool:
        assert (probs[0].triu(1) == 0).all()
