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
from torchex_fn.methods.propagation import deeplift

from support import zoo as _zoo


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# Model builders: () -> (module, input shape without the batch).

class _Embeds(nn.Module):
    """A HuggingFace model as a function of ``inputs_embeds`` (or ``pixel_values``) returning ``.logits``."""

    def __init__(self, model, key="inputs_embeds", last=False):
        super().__init__()
        self.model, self.key, self.last = model, key, last

    def forward(self, x):
        logits = self.model(**{self.key: x}).logits
        return logits[:, -1] if self.last else logits


def _zoo_model(name, shape=None, attn=None):
    """A model of ``tests/support/zoo.py`` (the architecture table's), as a function of a float input.

    ``shape`` overrides the zoo's input size for convolutional networks (smaller here, for time); text
    models take ``inputs_embeds`` ``[6, 32]`` (DeepLIFT's completeness is about the float path through
    the network; token ids reach it through ``layer=``, tested in test_inputs.py).
    """
    arch = _zoo.BY_NAME[name]

    def build():
        pytest.importorskip(arch.package)
        model = arch.build()
        if arch.package != "transformers":
            return model, shape or arch.shape
        if attn is not None:
            model.config._attn_implementation = attn
        if arch.kind == "image":
            return _Embeds(model, "pixel_values"), arch.shape
        return _Embeds(model, last=arch.kind == "causal"), (6, 32)
    return build


IMG32 = (3, 32, 32)
SMALLER = {"tv/resnet50": IMG32, "tv/densenet121": IMG32, "tv/vgg11_bn": IMG32, "tv/convnext_tiny": IMG32,
           "tv/regnet_y_400mf": IMG32, "timm/resnet18": IMG32, "timm/regnetx_002": IMG32,
           "timm/convnext_atto": IMG32, "timm/efficientnet_b0": IMG32, "timm/mobilenetv3_small_050": IMG32,
           "timm/poolformer_s12": IMG32}
MODELS = {arch.name: _zoo_model(arch.name, SMALLER.get(arch.name)) for arch in _zoo.ARCHS}
MODELS["hf/bert_eager"] = _zoo_model("hf/bert", attn="eager")


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
