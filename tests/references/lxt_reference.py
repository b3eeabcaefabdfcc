"""LXT 2.1 reference relevances for the AttnLRP / CP-LRP parity tests (issue 17).

Run ONCE, in the separate venv that holds LXT (LXT 2.1 does not import under transformers 5.x):

    /work/lxtenv/bin/python tests/references/lxt_reference.py            # writes tests/references/lxt/*.pt

Every (model, rule set) pair runs in a fresh subprocess, because LXT patches classes and module globals of
torch, transformers and torchvision process-wide and cannot undo it. Inside a subprocess the model is built
from a config with seeded random weights, its plain logits are recorded, then LXT's patch map is applied and
the relevance ``inputs_embeds * inputs_embeds.grad`` (pixels for the ViT) of the target logits is recorded in
float32 and, with the same weights cast, in float64. The patched logits are checked against the plain ones.

What comes from LXT itself and what this file builds from LXT's pieces (see lxt/README.md for the rules):

* Llama, Qwen2, GPT-2: ``lxt.efficient.models.<model>.attnLRP`` and ``.cp_LRP``, as LXT ships them.
* BERT, attnLRP: ``lxt.efficient.models.bert.attnLRP`` (LXT swaps transformers' ``modeling_bert`` for its own
  copy of it; the model is built from the swapped module's class and given the same state_dict).
* BERT, cp_LRP: LXT has none. ``BERT_CP_LRP`` below is a patch map written here from LXT's
  ``patch_method``, ``layer_norm_forward``, ``dropout_forward``, ``stop_gradient`` and
  ``identity_rule_implicit``: what LXT's cp_LRP does on GPT-2 (query and key detached, identity rule on the
  element-wise activations, LayerNorm's standard deviation detached), applied to BERT's classes.
* torchvision ViT, cp_LRP: ``lxt.efficient.models.vit_torch.cp_LRP`` as LXT ships it.
* torchvision ViT, attnLRP: LXT has none. ``VIT_ATTNLRP`` below is written here from the same pieces plus
  ``divide_gradient``: LXT's ViT map with ``nn.MultiheadAttention`` given the gradient division LXT's
  ``wrap_attention_forward`` applies to HuggingFace attention (query and key by 4, value by 2).

Also recorded per case, in float64 with every parameter whose name ends in ``bias`` set to zero: how far the
relevance sums from the target logit (conservation), over the input alone and over every source the input
shares the model with (position and token-type embeddings, the ViT's class token and position embedding).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import warnings
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "lxt")

FAMILIES = ("llama", "qwen2", "gpt2", "bert", "vit")
RULE_SETS = ("attnlrp", "cp_lrp")
ATTENTIONS = ("eager", "sdpa")
BATCH, TOKENS = 2, 10
SEED = 0

# Small configs. ``initializer_range`` 0.2 (instead of 0.02) so that softmax, GELU and the norms work away
# from their linear regime; biases and norm weights are then drawn too (HF and torchvision start them at 0/1).
HF_CONFIGS: Dict[str, Tuple[str, str, Dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False,
        use_sliding_window=False)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
        bos_token_id=0, eos_token_id=0)),  # inside the vocabulary (transformers 5.x logs otherwise)
    "bert": ("BertConfig", "BertForSequenceClassification", dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, type_vocab_size=2, num_labels=3, initializer_range=0.2)),
}
VIT_KWARGS: Dict[str, Any] = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                  mlp_dim=64, num_classes=10)


# ---------------------------------------------------------------------------------------------------------
# models and inputs


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Draw every bias (std 0.1) and every 1-d norm weight (1 + std 0.1), in named_parameters order; the ViT's
    zero-initialised head and class token get std 0.2."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name in ("heads.head.weight", "class_token"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def build_plain(family: str, attn: str) -> torch.nn.Module:
    """The unpatched model in float32, eval mode, seeded weights (the same for both attentions)."""
    torch.manual_seed(SEED)
    if family == "vit":
        from torchvision.models.vision_transformer import VisionTransformer
        model = VisionTransformer(**VIT_KWARGS)
    else:
        import transformers
        config_name, model_name, kwargs = HF_CONFIGS[family]
        config = getattr(transformers, config_name)(**kwargs)
        config._attn_implementation = attn
        model = getattr(transformers, model_name)(config)
    _perturb(model, SEED)
    return model.eval()


def make_inputs(family: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 2)
    if family == "vit":
        return torch.randn(BATCH, 3, VIT_KWARGS["image_size"], VIT_KWARGS["image_size"], generator=g)
    vocab = HF_CONFIGS[family][2]["vocab_size"]
    return torch.randint(1, vocab, (BATCH, TOKENS), generator=g)


def _logits(family: str, out: Any) -> torch.Tensor:
    return out if family == "vit" else out.logits


def _target_logit(family: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B]: the target logit of each example (causal LMs: at the last position)."""
    last = logits[:, -1] if family in ("llama", "qwen2", "gpt2") else logits
    return last.gather(1, target[:, None])[:, 0]


def forward(family: str, model: torch.nn.Module, inputs: torch.Tensor,
            dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(leaf input with requires_grad: inputs_embeds or pixels, logits)."""
    if family == "vit":
        x = inputs.to(dtype).clone().requires_grad_(True)
        return x, _logits(family, model(x))
    emb = model.get_input_embeddings()(inputs).detach().requires_grad_(True)
    return emb, _logits(family, model(inputs_embeds=emb))


def relevance(family: str, model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor,
              dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(relevance = x * x.grad of the sum of the examples' target logits, logits)."""
    x, logits = forward(family, model, inputs, dtype)
    _target_logit(family, logits, target).sum().backward()
    assert x.grad is not None
    return (x * x.grad).detach(), logits.detach()


# ---------------------------------------------------------------------------------------------------------
# conservation: float64, every bias zero; relevance of the input and of the other sources


def _source_hooks(family: str, model: torch.nn.Module) -> Tuple[List[Any], Callable[[torch.Tensor], torch.Tensor]]:
    """Forward hooks that keep the tensors the input shares the model with; returns (handles, fn of the input's
    gradient giving their relevance summed per example [B] after backward).

    GPT-2 and BERT add the position (and token-type) embeddings to ``inputs_embeds`` directly, so each addend
    has the input's gradient (the position embedding is [1, T, D], broadcast: its own .grad would be summed over
    the batch). The ViT's encoder input is [class token, patch tokens] and gets the position embedding added."""
    kept: List[Tuple[str, torch.Tensor]] = []

    def keep(tag: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, out: Any = None) -> None:
            t = args[0] if out is None else out
            if tag == "encoder_input":
                t.retain_grad()
            kept.append((tag, t))
        return hook

    handles: List[Any] = []
    if family == "gpt2":
        handles.append(model.transformer.wpe.register_forward_hook(keep("added")))
    elif family == "bert":
        emb = model.bert.embeddings
        handles.append(emb.position_embeddings.register_forward_hook(keep("added")))
        handles.append(emb.token_type_embeddings.register_forward_hook(keep("added")))
    elif family == "vit":
        handles.append(model.encoder.register_forward_pre_hook(keep("encoder_input")))

    def total(x_grad: torch.Tensor) -> torch.Tensor:
        parts = [torch.zeros(BATCH, dtype=x_grad.dtype)]
        for tag, t in kept:
            if tag == "encoder_input":   # class token (position 0) and the position embedding added to all
                assert t.grad is not None
                parts.append((t[:, 0] * t.grad[:, 0]).sum(-1))
                parts.append((model.encoder.pos_embedding * t.grad).flatten(1).sum(1))
            else:
                parts.append((t.detach().expand_as(x_grad) * x_grad).flatten(1).sum(1))
        return torch.stack(parts).sum(0)

    return handles, total


def conservation(family: str, model64: torch.nn.Module, inputs: torch.Tensor) -> Dict[str, Any]:
    """Zero every bias of (a copy of the weights of) the float64 model, explain its own argmax, and return the
    gaps |sum R - logit| / |logit| per example."""
    saved = {n: p.detach().clone() for n, p in model64.named_parameters()}
    with torch.no_grad():
        for n, p in model64.named_parameters():
            if n.endswith("bias"):
                p.zero_()
    try:
        with torch.no_grad():
            _, logits = forward(family, model64, inputs, torch.float64)
            last = logits[:, -1] if family in ("llama", "qwen2", "gpt2") else logits
            target = last.argmax(-1)
        handles, sources = _source_hooks(family, model64)
        try:
            x, logits = forward(family, model64, inputs, torch.float64)
            value = _target_logit(family, logits, target)
            value.sum().backward()
            assert x.grad is not None
            r_input = (x * x.grad).flatten(1).sum(1).detach()
            r_all = (r_input + sources(x.grad)).detach()
        finally:
            for h in handles:
                h.remove()
        value = value.detach()
        return {
            "target": target, "logit": value, "sum_input": r_input, "sum_sources": r_all,
            "gap_input": ((r_input - value).abs() / value.abs()),
            "gap_sources": ((r_all - value).abs() / value.abs()),
        }
    finally:
        with torch.no_grad():
            for n, p in model64.named_parameters():
                p.copy_(saved[n])


# ---------------------------------------------------------------------------------------------------------
# the patch maps


def _lxt_map(family: str, rules: str) -> Tuple[Any, Dict[Any, Callable[[Any], bool]], str]:
    """(module given to lxt's monkey_patch, patch map, where the map comes from)."""
    if family == "llama":
        from lxt.efficient.models import llama as m
        return m.modeling_llama, (m.attnLRP if rules == "attnlrp" else m.cp_LRP), \
            f"lxt.efficient.models.llama.{'attnLRP' if rules == 'attnlrp' else 'cp_LRP'}"
    if family == "qwen2":
        from lxt.efficient.models import qwen2 as m
        return m.modeling_qwen2, (m.attnLRP if rules == "attnlrp" else m.cp_LRP), \
            f"lxt.efficient.models.qwen2.{'attnLRP' if rules == 'attnlrp' else 'cp_LRP'}"
    if family == "gpt2":
        from lxt.efficient.models import gpt2 as m
        return m.modeling_gpt2, (m.attnLRP if rules == "attnlrp" else m.cp_LRP), \
            f"lxt.efficient.models.gpt2.{'attnLRP' if rules == 'attnlrp' else 'cp_LRP'}"
    if family == "bert":
        from transformers.models.bert import modeling_bert
        if rules == "attnlrp":
            from lxt.efficient.models import bert as m
            return modeling_bert, m.attnLRP, "lxt.efficient.models.bert.attnLRP"
        return modeling_bert, bert_cp_lrp_map(), "built here from LXT pieces (BERT_CP_LRP)"
    if family == "vit":
        from torchvision.models import vision_transformer
        if rules == "cp_lrp":
            from lxt.efficient.models import vit_torch as m
            return vision_transformer, m.cp_LRP, "lxt.efficient.models.vit_torch.cp_LRP"
        return vision_transformer, vit_attnlrp_map(), "built here from LXT pieces (VIT_ATTNLRP)"
    raise ValueError(family)


def bert_cp_lrp_map() -> Dict[Any, Callable[[Any], bool]]:
    """CP-LRP for transformers 4.57's BERT, from LXT's pieces: LayerNorm with its standard deviation detached
    and dropout skipped (LXT's own forwards), identity rule on the intermediate GELU and the pooler's tanh
    (LXT's attnLRP BERT does the same), query and key detached before the attention (softmax held constant,
    as LXT's ``cp_wrap_attention_forward``). Only the encoder self-attention without cache is supported."""
    from lxt.efficient.patches import dropout_forward, layer_norm_forward, patch_method, stop_gradient
    from lxt.efficient.rules import identity_rule_implicit
    from transformers.models.bert import modeling_bert as mb

    def heads(self: Any, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def merge(self: Any, t: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = t.shape
        return t.transpose(1, 2).reshape(b, n, self.all_head_size)

    def check(self: Any, head_mask: Any, encoder_hidden_states: Any, past_key_values: Any) -> None:
        if head_mask is not None or encoder_hidden_states is not None or past_key_values is not None \
                or self.position_embedding_type != "absolute" or self.is_decoder:
            raise NotImplementedError("BERT_CP_LRP covers the encoder's self-attention only")

    def eager_forward(self: Any, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      head_mask: Any = None, encoder_hidden_states: Any = None, past_key_values: Any = None,
                      output_attentions: bool = False, cache_position: Any = None, **kwargs: Any) -> Any:
        check(self, head_mask, encoder_hidden_states, past_key_values)
        q = stop_gradient(heads(self, self.query(hidden_states)))
        k = stop_gradient(heads(self, self.key(hidden_states)))
        v = heads(self, self.value(hidden_states))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1)
        return merge(self, torch.matmul(probs, v)), probs

    def sdpa_forward(self: Any, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                     head_mask: Any = None, encoder_hidden_states: Any = None, past_key_values: Any = None,
                     output_attentions: bool = False, cache_position: Any = None, **kwargs: Any) -> Any:
        check(self, head_mask, encoder_hidden_states, past_key_values)
        q = stop_gradient(heads(self, self.query(hidden_states)))
        k = stop_gradient(heads(self, self.key(hidden_states)))
        v = heads(self, self.value(hidden_states))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0)
        return merge(self, out), None

    def intermediate_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
        return identity_rule_implicit(self.intermediate_act_fn, self.dense(hidden_states))

    def pooler_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
        return identity_rule_implicit(self.activation, self.dense(hidden_states[:, 0]))

    return {
        torch.nn.LayerNorm: partial(patch_method, layer_norm_forward),
        torch.nn.Dropout: partial(patch_method, dropout_forward),
        mb.BertSelfAttention: partial(patch_method, eager_forward),
        mb.BertSdpaSelfAttention: partial(patch_method, sdpa_forward),
        mb.BertIntermediate: partial(patch_method, intermediate_forward),
        mb.BertPooler: partial(patch_method, pooler_forward),
    }


def vit_attnlrp_map() -> Dict[Any, Callable[[Any], bool]]:
    """AttnLRP for torchvision's VisionTransformer, from LXT's pieces: LXT's ViT map (identity rule on GELU,
    LayerNorm's standard deviation detached) with ``nn.MultiheadAttention`` given the uniform rule the way LXT's
    ``wrap_attention_forward`` gives it to HuggingFace attention: the gradient into query and key divided by 4
    (1/2 for the product A V times 1/2 for Q K^T) and into value by 2. The division at the projection inputs
    equals the division at the projected q, k, v (the projections are linear in the gradient)."""
    from lxt.efficient.patches import layer_norm_forward, non_linear_forward, patch_method
    from lxt.efficient.rules import divide_gradient
    from torchvision.models import vision_transformer as vt

    def mha_forward(self: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    *args: Any, **kwargs: Any) -> Any:
        return self.original_forward(divide_gradient(query, 4), divide_gradient(key, 4),
                                     divide_gradient(value, 2), *args, **kwargs)

    return {
        vt.nn.GELU: partial(patch_method, non_linear_forward, keep_original=True),
        vt.nn.LayerNorm: partial(patch_method, layer_norm_forward),
        vt.nn.MultiheadAttention: partial(patch_method, mha_forward, keep_original=True),
    }


# ---------------------------------------------------------------------------------------------------------
# one (family, rule set) in this process


def versions() -> Dict[str, str]:
    import importlib.metadata as md
    out = {"lxt": md.version("lxt"), "torch": torch.__version__, "python": sys.version.split()[0]}
    for name in ("transformers", "torchvision"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def worker(family: str, rules: str, out_path: str) -> None:
    torch.set_num_threads(1)
    inputs = make_inputs(family)
    attns = ("eager",) if family == "vit" else ATTENTIONS
    plain: Dict[str, torch.nn.Module] = {a: build_plain(family, a) for a in attns}
    state = {k: v.detach().clone() for k, v in plain[attns[0]].state_dict().items()}
    for a in attns:   # the same weights for both attentions
        plain[a].load_state_dict(state)

    record: Dict[str, Any] = {}
    for a in attns:
        rec: Dict[str, Any] = {"logits": {}, "input_x_gradient": {}}
        for dtype, tag in ((torch.float32, "float32"), (torch.float64, "float64")):
            model = plain[a].to(dtype)
            grad_x_input, logits = relevance(family, model, inputs, torch.zeros(BATCH, dtype=torch.long), dtype)
            if tag == "float32":
                last = logits[:, -1] if family in ("llama", "qwen2", "gpt2") else logits
                rec["target"] = last.argmax(-1)
            grad_x_input, logits = relevance(family, model, inputs, rec["target"], dtype)
            rec["logits"][tag] = logits
            rec["input_x_gradient"][tag] = grad_x_input   # unpatched, only to prove the patch changed something
            model.zero_grad(set_to_none=True)
        plain[a].float()
        record[a] = rec

    module, patch_map, source = _lxt_map(family, rules)
    from lxt.efficient import monkey_patch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monkey_patch(module, patch_map)
    failed = [str(w.message) for w in caught if "patch" in str(w.message).lower()]
    if failed:
        raise RuntimeError(f"LXT patching failed: {failed}")

    cases: Dict[str, Any] = {}
    for a in attns:
        if family == "bert" and rules == "attnlrp":   # LXT's copy of modeling_bert: build from the swapped class
            from transformers.models.bert import modeling_bert
            config = plain[a].config
            model = modeling_bert.BertForSequenceClassification(config).eval()
            assert type(model).__module__ == "lxt.efficient.models.bert", type(model).__module__
            model.load_state_dict(state)
        else:
            model = plain[a]
        rec = record[a]
        case: Dict[str, Any] = {"attn_implementation": a, "rules": rules, "rules_source": source,
                                "target": rec["target"], "logits": rec["logits"], "patched_logits": {},
                                "relevance": {}}
        for dtype, tag in ((torch.float32, "float32"), (torch.float64, "float64")):
            model = model.to(dtype)
            r, logits = relevance(family, model, inputs, rec["target"], dtype)
            model.zero_grad(set_to_none=True)
            ref = rec["logits"][tag]
            err = ((logits - ref).abs().max() / ref.abs().max()).item()
            tol = 1e-5 if tag == "float32" else 1e-6   # float64: RMSNorm runs in float32 in LXT and HF alike
            if err > tol:
                raise AssertionError(f"{family}/{a}/{rules}/{tag}: patched logits differ from plain ({err:.2e})")
            if torch.allclose(r, rec["input_x_gradient"][tag], rtol=1e-3, atol=1e-6):
                raise AssertionError(f"{family}/{a}/{rules}/{tag}: the patch did not change the relevance")
            case["patched_logits"][tag] = logits
            case["patched_logits_error"] = max(case.get("patched_logits_error", 0.0), err)
            case["relevance"][tag] = r
        case["conservation_zero_bias_float64"] = conservation(family, model, inputs)
        model.float()
        cases[f"{a}-{rules}"] = case

    torch.save({"family": family, "rules": rules, "state_dict": state, "inputs": inputs, "cases": cases,
                "versions": versions()}, out_path)


# ---------------------------------------------------------------------------------------------------------
# the driver: one subprocess per (family, rule set), then one file per family


def describe(family: str) -> Dict[str, Any]:
    if family == "vit":
        return {"library": "torchvision", "model_class": "torchvision.models.vision_transformer.VisionTransformer",
                "constructor_kwargs": dict(VIT_KWARGS), "config": None}
    config_name, model_name, _ = HF_CONFIGS[family]
    model = build_plain(family, "eager")
    config = model.config.to_dict()
    for k in ("_attn_implementation_autoset", "attn_implementation", "_attn_implementation"):
        config.pop(k, None)
    return {"library": "transformers", "model_class": model_name, "config_class": config_name, "config": config,
            "constructor_kwargs": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=3, metavar=("FAMILY", "RULES", "OUT"))
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    os.makedirs(OUT_DIR, exist_ok=True)
    summary: Dict[str, Any] = {}
    for family in args.families:
        parts = {}
        for rules in RULE_SETS:
            tmp = os.path.join(OUT_DIR, f".{family}-{rules}.tmp.pt")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", family, rules, tmp], check=True)
            parts[rules] = torch.load(tmp, weights_only=False)
            os.remove(tmp)
        a, b = parts["attnlrp"], parts["cp_lrp"]
        assert a["state_dict"].keys() == b["state_dict"].keys()
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
        assert torch.equal(a["inputs"], b["inputs"])
        cases = {**a["cases"], **b["cases"]}
        out = {"family": family, **describe(family), "state_dict": a["state_dict"],
               "inputs": a["inputs"], "input_kind": "pixels" if family == "vit" else "input_ids",
               "cases": cases, "versions": a["versions"], "seed": SEED}
        torch.save(out, os.path.join(OUT_DIR, f"{family}.pt"))
        for name, case in cases.items():
            c = case["conservation_zero_bias_float64"]
            r32 = case["relevance"]["float32"]
            r64 = case["relevance"]["float64"]
            summary[f"{family}/{name}"] = {
                "patched_logits_error": case["patched_logits_error"],
                "float32_vs_float64": ((r32.double() - r64).abs().max() / r64.abs().max()).item(),
                "gap_input": [float(f"{v:.3e}") for v in c["gap_input"].tolist()],
                "gap_sources": [float(f"{v:.3e}") for v in c["gap_sources"].tolist()],
            }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
