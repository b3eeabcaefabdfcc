"""AttnLRP / CP-LRP's one pass (nothing tracked: autograd's own backward, the rules as stops and scaled
gradients) equals the record / replay pass (params tracked: every rule's formula written out).

The one pass halves a product's gradient where that is cheaper: on the output of ``A V``, on both operands
of ``Q K^T`` when its ``T x T`` output is larger than ``Q`` and ``K`` together (here 12 tokens, head size 4),
and the identity rule's tensors carry no graph of their own (an activation module's pieces get no
backward). The LXT references (10 tokens, head size 8) take the output branch only.
"""
import pytest
import torch

import torchex_fn as tx

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(attn):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double().eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("composite", ["attnlrp", "cp_lrp"])
def test_one_pass_equals_the_replayed_rules(attn, composite):
    model = _llama(attn)
    fn, params = tx.functionalize(model, output=lambda o: o.logits[:, -1])
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3, 7])
    one = tx.lrp(fn, params, {"input_ids": ids}, target, composite=composite, layer="model.embed_tokens")
    tracked = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    replayed = tx.lrp(fn, tracked, {"input_ids": ids}, target, composite=composite, layer="model.embed_tokens")
    assert replayed.requires_grad and not one.requires_grad
    torch.testing.assert_close(one, replayed.detach(), rtol=1e-9, atol=1e-9 * one.abs().max().item())
    assert one.abs().max() > 1e-3
