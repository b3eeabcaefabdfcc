"""DeepLIFT completeness on today's architectures: torchvision, timm and HuggingFace models.

Completeness (the map sums to ``f(x) - f(baseline)``) is DeepLIFT's defining property. Every model
below mixes operations that a Rescale-only DeepLIFT treats as linear in silence (products of two
input-dependent tensors in squeeze-excitation and attention, layer / group norms, softmax,
hard-swish, ...). Each row builds a small random model (reduced image size, shallow configs), gives
its normalisations and biases non-trivial values (random init leaves many at 0 / 1, which would make
the baseline degenerate and the test weak), and checks completeness with a zero and a random
baseline: 1e-4 relative in float32, and 1e-8 in float64 on a few small models. The measured errors
are printed (``pytest -s``).
"""
import warnings

import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.propagation import deeplift


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Model builders: () -> (module, input shape without the batch).

def _tv(name, shape, **kwargs):
    def build():
        torchvision = pytest.importorskip("torchvision")
        return getattr(torchvision.models, name)(num_classes=10, **kwargs), shape
    return build


def _tv_class(cls, shape, **kwargs):
    def build():
        torchvision = pytest.importorskip("torchvision")
        return getattr(torchvision.models, cls)(num_classes=10, **kwargs), shape
    return build


def _timm(name, shape, **kwargs):
    def build():
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs), shape
    return build


class _Embeds(nn.Module):
    """A HuggingFace model as a function of ``inputs_embeds`` (or ``pixel_values``) returning ``.logits``."""

    def __init__(self, model, key="inputs_embeds", last=False):
        super().__init__()
        self.model, self.key, self.last = model, key, last

    def forward(self, x):
        logits = self.model(**{self.key: x}).logits
        return logits[:, -1] if self.last else logits


def _hf(kind, attn="sdpa"):
    def build():
        transformers = pytest.importorskip("transformers")
        common = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, hidden_size=32)
        if kind == "bert":
            config = transformers.BertConfig(vocab_size=50, max_position_embeddings=32, num_labels=4, **common)
            model, shape = transformers.BertForSequenceClassification(config), (6, 32)
        elif kind == "distilbert":
            config = transformers.DistilBertConfig(vocab_size=50, max_position_embeddings=32, n_layers=2, n_heads=2,
                                                   dim=32, hidden_dim=64, num_labels=4)
            model, shape = transformers.DistilBertForSequenceClassification(config), (6, 32)
        elif kind == "gpt2":
            config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2)
            model, shape = transformers.GPT2LMHeadModel(config), (6, 32)
        else:
            config = transformers.ViTConfig(image_size=32, patch_size=8, num_labels=10, **common)
            model, shape = transformers.ViTForImageClassification(config), (3, 32, 32)
        model.config._attn_implementation = attn
        key = "pixel_values" if kind == "vit" else "inputs_embeds"
        return _Embeds(model, key, last=kind == "gpt2"), shape
    return build


IMG32, IMG64 = (3, 32, 32), (3, 64, 64)
MODELS = {
    "tv/resnet50": _tv("resnet50", IMG32),
    "tv/densenet121": _tv("densenet121", IMG32),
    "tv/vgg11_bn": _tv("vgg11_bn", IMG32),
    "tv/convnext_tiny": _tv("convnext_tiny", IMG32),
    "tv/efficientnet_b0": _tv("efficientnet_b0", IMG64),
    "tv/mobilenet_v3_small": _tv("mobilenet_v3_small", IMG64),
    "tv/regnet_y_400mf": _tv("regnet_y_400mf", IMG32),
    "tv/maxvit_t": _tv_class("MaxVit", IMG64, input_size=(64, 64), stem_channels=16, partition_size=2,
                             block_channels=[16, 32], block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0),
    "tv/swin_t": _tv("swin_t", IMG64),
    "tv/vit_b_16": _tv_class("VisionTransformer", IMG32, image_size=32, patch_size=16, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64),
    "timm/resnet18": _timm("resnet18", IMG32),
    "timm/regnetx_002": _timm("regnetx_002", IMG32),
    "timm/convnext_atto": _timm("convnext_atto", IMG32),
    "timm/efficientnet_b0": _timm("efficientnet_b0", IMG32),
    "timm/mobilenetv3_small_050": _timm("mobilenetv3_small_050", IMG32),
    "timm/swin_tiny": _timm("swin_tiny_patch4_window7_224", (3, 56, 56), img_size=56, depths=(1, 1, 1, 1)),
    "timm/vit_tiny": _timm("vit_tiny_patch16_224", IMG32, img_size=32, depth=2),
    "timm/deit_tiny": _timm("deit_tiny_distilled_patch16_224", IMG32, img_size=32, depth=2),
    "timm/levit_128s": _timm("levit_128s", IMG64, img_size=64),
    "timm/coat_lite_tiny": _timm("coat_lite_tiny", IMG32, img_size=32),
    "timm/edgenext_xx_small": _timm("edgenext_xx_small", IMG64),
    "timm/mobilevit_xxs": _timm("mobilevit_xxs", IMG64),
    "timm/poolformer_s12": _timm("poolformer_s12", IMG32),
    "hf/bert": _hf("bert"),
    "hf/bert_eager": _hf("bert", attn="eager"),
    "hf/distilbert": _hf("distilbert"),
    "hf/gpt2": _hf("gpt2"),
    "hf/vit": _hf("vit"),
}


def _jitter(model: nn.Module, shape, generator: torch.Generator, gain: float = 1.2) -> nn.Module:
    """Non-trivial normalisations, biases and scales: random init leaves many at exactly 0 or 1.

    Batch norms get the running statistics of a random batch (one training-mode forward with
    momentum 1, no dropout or stochastic depth), so that activations keep their scale through deep
    stacks: with the initial statistics 0 / 1 the outputs of torchvision's EfficientNet and
    MobileNetV3 do not depend on the input at all (a difference of 1e-13). The variances are then
    multiplied by ``gain`` (1.2: each normalisation shrinks its output a little): at 1 these random
    stacks are chaotic (outputs of 1e4-1e6 that cancel, where float32 keeps 3 digits of any
    function of them), at 2 they collapse again. LeViT gets 1.4: at 1.2 its forward of a zero image
    keeps only 3 digits in float32 at one attention (its float32 and float64 softmax outputs differ
    by 4e-3), a property of that random model rather than of DeepLIFT (its float64 map is complete
    to 2e-13).
    """
    def uniform(t, low, high):
        t.copy_(torch.rand(t.shape, generator=generator, dtype=t.dtype) * (high - low) + low)
    with torch.no_grad():
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        model.eval()
        for m in norms:  # only the batch norms train: no dropout, no stochastic depth
            m.momentum = 1.0
            m.train()
        model(torch.randn(16, *shape, generator=generator))
        model.eval()
        for m in norms:  # a channel that hardly varies on 16 images must not blow up on others
            m.running_var.copy_(torch.maximum(m.running_var, 0.1 * m.running_var.median()) * gain)
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(m).__name__:
                if getattr(m, "weight", None) is not None and isinstance(m.weight, torch.Tensor):
                    uniform(m.weight, 0.5, 1.5)
                if getattr(m, "bias", None) is not None and isinstance(m.bias, torch.Tensor):
                    uniform(m.bias, -0.3, 0.3)
        for name, p in model.named_parameters():
            if p.is_floating_point() and bool((p == 0).all()):  # zero-init biases, layer scales, tokens
                uniform(p, -0.1, 0.1)
    return model.eval()


def _build(name, dtype=torch.float32):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, shape = MODELS[name]()
    gain = 1.4 if "levit" in name else 1.2
    return _jitter(model, shape, torch.Generator().manual_seed(1), gain).to(dtype), shape


def _completeness_error(model, x, baseline, target):
    fn, params = tx.functionalize(model)
    attr = deeplift(fn, params, x, target, baseline=baseline)
    assert attr.shape == x.shape and torch.isfinite(attr).all()
    with torch.no_grad():
        def score(inp):
            return model(inp).gather(1, target[:, None])[:, 0]
        delta = score(x) - score(torch.broadcast_to(baseline, x.shape))
        scale = model(x).abs().max()
    assert delta.abs().max() > 1e-3 * scale  # a test that cannot fail is a defect: the output must move
    return ((attr.double().flatten(1).sum(1) - delta).abs().max() / delta.abs().max()).item()


@pytest.mark.parametrize("name", list(MODELS))
def test_completeness_float32(name):
    model, shape = _build(name)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, *shape, generator=g)
    target = torch.tensor([1, 3])
    errors = {}
    for kind, baseline in (("zero", torch.zeros(())), ("random", 0.5 * torch.randn(1, *shape, generator=g))):
        errors[kind] = _completeness_error(model, x, baseline, target)
    print(f"\n{name:28s} float32 relative completeness error: zero {errors['zero']:.1e}, random {errors['random']:.1e}")
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize("name", ["tv/mobilenet_v3_small", "tv/vit_b_16", "timm/convnext_atto", "timm/coat_lite_tiny",
                                  "hf/bert", "hf/gpt2"])
def test_completeness_float64(name):
    model, shape = _build(name, torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    baseline = 0.5 * torch.randn(2, *shape, generator=g, dtype=torch.float64)
    err = _completeness_error(model, x, baseline, torch.tensor([1, 2]))
    print(f"\n{name:28s} float64 relative completeness error: {err:.1e}")
    assert err < 1e-8
