"""The LXT 2.1 reference cases (issue 17), rebuilt under this project's transformers (5.x).

``tests/references/lxt_reference.py`` ran LXT once in a separate venv (transformers 4.57) and stored, per
model family, one file ``tests/references/lxt/<family>.pt``: the config (or torchvision's constructor
arguments), the float32 state_dict, the inputs, and per case (attention implementation x rule set) the
targets, the plain logits and LXT's relevance in float32 and float64. See ``tests/references/lxt/README.md``.

    for name in case_names():
        case = load_case(name, torch.float64)
        case.model, case.inputs, case.target, case.relevance

A case is named ``<family>-<attention>-<rules>``: ``llama-sdpa-attnlrp``, ``vit-eager-cp_lrp``, ...
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Union

import torch

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "references", "lxt")
FAMILIES = ("llama", "qwen2", "gpt2", "bert", "vit")

# where ``inputs_embeds`` comes from: the layer whose output LXT's relevance is read at (None: the pixels)
EMBEDDING_LAYER: Dict[str, Union[str, None]] = {
    "llama": "model.embed_tokens", "qwen2": "model.embed_tokens", "gpt2": "transformer.wte",
    "bert": "bert.embeddings.word_embeddings", "vit": None,
}
# the position whose logits are explained: causal LMs explain the last token, the classifiers their output
CAUSAL = ("llama", "qwen2", "gpt2")


@dataclass
class LxtCase:
    """One reference case, rebuilt. ``inputs`` is ``{"input_ids": ids}`` for the HuggingFace models and the
    pixels for the ViT; ``relevance`` is LXT's ``inputs_embeds * inputs_embeds.grad`` ([B, T, D]) or
    ``x * x.grad`` ([B, 3, H, W]) of the sum of the examples' target logits, in the requested dtype."""

    name: str
    family: str
    attn_implementation: str
    rules: str                  # "attnlrp" or "cp_lrp" (our composite names)
    rules_source: str           # LXT's patch map, or "built here from LXT pieces (...)"
    model: torch.nn.Module
    inputs: Any
    target: torch.Tensor        # [B] class (causal LMs: vocabulary id at the last position)
    relevance: torch.Tensor
    logits: torch.Tensor        # the plain model's logits under transformers 4.57, this dtype
    layer: Union[str, None]     # the embedding layer (``layer=`` of lrp), None for the ViT
    conservation: Dict[str, torch.Tensor] = field(default_factory=dict)  # float64, zero biases (README)


@functools.cache
def _file(family: str) -> Dict[str, Any]:
    return torch.load(os.path.join(REFERENCE_DIR, f"{family}.pt"), weights_only=False)


def case_names() -> List[str]:
    """Every stored case, ``<family>-<attention>-<rules>``, in a fixed order."""
    return [f"{family}-{case}" for family in FAMILIES for case in _file(family)["cases"]]


def build_model(family: str, attn_implementation: str = "eager",
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The stored model (weights of the reference), eval mode, in ``dtype``."""
    data = _file(family)
    if data["library"] == "torchvision":
        from torchvision.models.vision_transformer import VisionTransformer
        model: torch.nn.Module = VisionTransformer(**data["constructor_kwargs"])
    else:
        import transformers
        config = getattr(transformers, data["config_class"])(**data["config"])
        config._attn_implementation = attn_implementation
        model = getattr(transformers, data["model_class"])(config)
    model.load_state_dict(data["state_dict"], strict=True)
    return model.eval().to(dtype)


def load_case(name: str, dtype: torch.dtype = torch.float32) -> LxtCase:
    """Rebuild case ``name`` (see ``case_names``) in ``dtype`` (float32 or float64)."""
    family, attn, rules = name.split("-")
    data = _file(family)
    case = data["cases"][f"{attn}-{rules}"]
    tag = {torch.float32: "float32", torch.float64: "float64"}[dtype]
    model = build_model(family, attn, dtype)
    inputs: Any = data["inputs"].to(dtype) if family == "vit" else {"input_ids": data["inputs"]}
    return LxtCase(name=name, family=family, attn_implementation=attn, rules=rules,
                   rules_source=case["rules_source"], model=model, inputs=inputs, target=case["target"],
                   relevance=case["relevance"][tag], logits=case["logits"][tag], layer=EMBEDDING_LAYER[family],
                   conservation=case["conservation_zero_bias_float64"])


def plain_logits(case: LxtCase) -> torch.Tensor:
    """The rebuilt model's logits, computed the way the reference did (``inputs_embeds=`` for text)."""
    model: Any = case.model   # a HuggingFace model (get_input_embeddings) or the ViT
    with torch.no_grad():
        if case.family == "vit":
            return model(case.inputs)
        emb = model.get_input_embeddings()(case.inputs["input_ids"])
        return model(inputs_embeds=emb).logits


def target_logit(case: LxtCase, logits: torch.Tensor) -> torch.Tensor:
    """[B]: each example's target logit (causal LMs: at the last position)."""
    last = logits[:, -1] if case.family in CAUSAL else logits
    return last.gather(1, case.target[:, None])[:, 0]
