"""AttnLRP and CP-LRP in continuation attribution: every output token's relevance on the prompt, per chunk."""
import pytest
import torch

import torchex_fn as tx

transformers = pytest.importorskip("transformers")

VOCAB = 60


def _gpt2(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  attn_implementation="sdpa", bos_token_id=0, eos_token_id=0, initializer_range=0.1)
    return transformers.GPT2LMHeadModel(cfg).eval().to(dtype)


@pytest.mark.parametrize("composite", ["attnlrp", "cp_lrp"])
def test_equals_lrp_token_by_token_and_is_unchanged_by_batch_size(composite):
    model = _gpt2()
    fn, params = tx.functionalize(model, output="logits")
    g = torch.Generator().manual_seed(1)
    prompt, cont = torch.randint(1, VOCAB, (2, 5), generator=g), torch.randint(1, VOCAB, (2, 3), generator=g)
    n_in = prompt.shape[1]
    ids = {"input_ids": torch.cat([prompt, cont], 1)}
    expected = torch.stack([
        tx.lrp(fn, params, ids, tx.continuation_score(cont, prompt_length=n_in, span=(j, j + 1)),
               composite=composite, layer="transformer.wte").sum(-1)[:, :n_in]
        for j in range(cont.shape[1])], 1)                                        # [B, T_out, T_in]
    assert expected.abs().max() > 1e-3
    for batch_size in (None, 1, 2):
        ours = tx.continuation_attribution(fn, params, prompt, cont, method=composite, batch_size=batch_size)
        torch.testing.assert_close(ours.token_attr, expected, rtol=1e-9, atol=1e-12)
