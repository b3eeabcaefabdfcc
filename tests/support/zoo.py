"""Today's architectures, small and with random weights: the models the architecture table and the
DeepLIFT completeness test run on (torchvision always; timm and HuggingFace where installed).

Each entry says how a user would call the methods on it: the input (an image size, or token ids for
the HuggingFace text models), the layer a CAM method names and the ``reshape=`` its output needs, and
for transformers the number of prefix tokens and the blocks (for the attention methods).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import nn

import torchex_fn as tx


@dataclass
class Arch:
    name: str
    build: Callable[[], nn.Module]
    shape: Tuple[int, ...]                    # the input without the batch: (C, H, W), or (T,) for token ids
    kind: str = "image"                       # "image", "text" (a classifier) or "causal" (next-token logits)
    cam_layer: Optional[str] = None
    reshape: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    prefix_tokens: Optional[int] = None       # transformers over patches: class / distillation tokens
    blocks: Sequence[str] = field(default_factory=tuple)
    embeddings: Optional[str] = None          # text models: the layer that input-space methods attribute
    package: str = "torchvision"
    head: Any = None                          # LeGrad's projection from pooled tokens to logits, where not torchvision's


def _tv(name, **kwargs):
    def build():
        import torchvision
        model = getattr(torchvision.models, name)(num_classes=10, **kwargs)
        if hasattr(model, "heads"):  # torchvision's ViT starts its head at zero: every gradient would be 0
            nn.init.normal_(model.heads.head.weight, std=0.02)
        return model
    return build


def _timm(name, **kwargs):
    def build():
        import timm
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return build


def _hf(kind):
    def build():
        import transformers
        common = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, hidden_size=32)
        if kind == "bert":
            cfg = transformers.BertConfig(vocab_size=50, max_position_embeddings=32, num_labels=10, **common)
            return transformers.BertForSequenceClassification(cfg)
        if kind == "distilbert":
            cfg = transformers.DistilBertConfig(vocab_size=50, max_position_embeddings=32, n_layers=2, n_heads=2,
                                                dim=32, hidden_dim=64, num_labels=10)
            return transformers.DistilBertForSequenceClassification(cfg)
        if kind == "gpt2":
            cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                          bos_token_id=0, eos_token_id=0)
            return transformers.GPT2LMHeadModel(cfg)
        cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_labels=10, **common)
        return transformers.ViTForImageClassification(cfg)
    return build


def _tokens_last(a):
    """``[B, T, D]`` token states -> ``[B, D, T]``: a 1-d grid over the tokens."""
    return a.transpose(1, 2)


IMG32, IMG64 = (3, 32, 32), (3, 64, 64)
tokens1 = tx.postprocess.tokens_to_grid(prefix_tokens=1)
tokens2 = tx.postprocess.tokens_to_grid(prefix_tokens=2)
tokens0 = tx.postprocess.tokens_to_grid(prefix_tokens=0)
last = tx.postprocess.channels_last_to_first

ARCHS = [
    Arch("tv/resnet50", _tv("resnet50"), IMG64, cam_layer="layer4"),
    Arch("tv/densenet121", _tv("densenet121"), IMG64, cam_layer="features"),
    Arch("tv/vgg11_bn", _tv("vgg11_bn"), IMG64, cam_layer="features"),
    Arch("tv/convnext_tiny", _tv("convnext_tiny"), IMG64, cam_layer="features"),
    Arch("tv/efficientnet_b0", _tv("efficientnet_b0"), IMG64, cam_layer="features"),
    Arch("tv/mobilenet_v3_small", _tv("mobilenet_v3_small"), IMG64, cam_layer="features"),
    Arch("tv/regnet_y_400mf", _tv("regnet_y_400mf"), IMG64, cam_layer="trunk_output"),
    Arch("tv/maxvit_t", _tv("MaxVit", input_size=(64, 64), stem_channels=16, partition_size=2, block_channels=[16, 32],
                            block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0), IMG64, cam_layer="blocks.1"),
    Arch("tv/swin_t", _tv("swin_t"), IMG64, cam_layer="features", reshape=last),
    Arch("tv/vit_b_16", _tv("VisionTransformer", image_size=32, patch_size=8, num_layers=2, num_heads=2,
                            hidden_dim=32, mlp_dim=64), IMG32, cam_layer="encoder.layers.encoder_layer_1",
         reshape=tokens1, prefix_tokens=1, blocks=("encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1")),
    Arch("timm/resnet18", _timm("resnet18"), IMG64, cam_layer="layer4", package="timm"),
    Arch("timm/regnetx_002", _timm("regnetx_002"), IMG64, cam_layer="s4", package="timm"),
    Arch("timm/convnext_atto", _timm("convnext_atto"), IMG64, cam_layer="stages", package="timm"),
    Arch("timm/efficientnet_b0", _timm("efficientnet_b0"), IMG64, cam_layer="bn2", package="timm"),
    Arch("timm/mobilenetv3_small_050", _timm("mobilenetv3_small_050"), IMG64, cam_layer="blocks", package="timm"),
    Arch("timm/swin_tiny", _timm("swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1, 1, 1)), (3, 56, 56),
         cam_layer="layers", reshape=last, package="timm"),
    Arch("timm/vit_tiny", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), IMG32,
         cam_layer="blocks", reshape=tokens1, prefix_tokens=1, blocks=("blocks.0", "blocks.1"), package="timm", head=["norm", "head"]),
    Arch("timm/deit_tiny", _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2), IMG32,
         cam_layer="blocks", reshape=tokens2, prefix_tokens=2, blocks=("blocks.0", "blocks.1"), package="timm",
         head=["norm", "head"]),
    Arch("timm/levit_128s", _timm("levit_128s", img_size=64), IMG64, cam_layer="stages.1",
         reshape=tokens0, package="timm"),
    Arch("timm/coat_lite_tiny", _timm("coat_lite_tiny", img_size=32), IMG32, cam_layer="serial_blocks4.1",
         reshape=tokens1, package="timm"),
    Arch("timm/edgenext_xx_small", _timm("edgenext_xx_small"), IMG64, cam_layer="stages", package="timm"),
    Arch("timm/mobilevit_xxs", _timm("mobilevit_xxs"), IMG64, cam_layer="final_conv", package="timm"),
    Arch("timm/poolformer_s12", _timm("poolformer_s12"), IMG64, cam_layer="stages", package="timm"),
    Arch("hf/bert", _hf("bert"), (8,), kind="text", cam_layer="bert.encoder.layer.1", reshape=_tokens_last,
         embeddings="bert.embeddings", package="transformers"),
    Arch("hf/distilbert", _hf("distilbert"), (8,), kind="text", cam_layer="distilbert.transformer.layer.1",
         reshape=_tokens_last, embeddings="distilbert.embeddings", package="transformers"),
    Arch("hf/gpt2", _hf("gpt2"), (8,), kind="causal", cam_layer="transformer.h.1", reshape=_tokens_last,
         embeddings="transformer.wte", package="transformers"),
    Arch("hf/vit", _hf("vit"), IMG32, cam_layer="vit.layers.1", reshape=tokens1, prefix_tokens=1,
         blocks=("vit.layers.0", "vit.layers.1"), package="transformers", head=["vit.layernorm", "classifier"]),
]
BY_NAME = {a.name: a for a in ARCHS}


def available(arch: Arch) -> bool:
    try:
        __import__(arch.package)
    except ImportError:
        return False
    return True


def build(arch: Arch, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return arch.build().eval()


def inputs(arch: Arch, batch: int = 2, seed: int = 1, dtype=torch.float32) -> Any:
    g = torch.Generator().manual_seed(seed)
    if arch.kind == "image":
        return torch.randn(batch, *arch.shape, generator=g, dtype=dtype)
    ids = torch.randint(3, 50, (batch, *arch.shape), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def functionalize(arch: Arch, model: nn.Module):
    """``(model_fn, params)`` as a user calls it: GPT-2's target indexes the last position's logits."""
    if arch.kind == "causal":
        return tx.functionalize(model, output=lambda out: out.logits[:, -1])
    return tx.functionalize(model)
