"""The targets of continuation attribution (inseq's step functions), each against a hand computation."""
import math

import pytest
import torch

import torchex_fn as tx
from torchex_fn import generation

transformers = pytest.importorskip("transformers")

VOCAB = 50


def _gpt2(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  attn_implementation="eager", bos_token_id=0, eos_token_id=0,
                                  initializer_range=0.1)
    return transformers.GPT2LMHeadModel(cfg).eval().to(dtype)


def _ids(batch=2, n_in=5, n_out=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(1, VOCAB, (batch, n_in), generator=g), torch.randint(1, VOCAB, (batch, n_out), generator=g),
            torch.randint(1, VOCAB, (batch, n_out), generator=g))


def _hand(logits, n_in, ids):
    """log p, p and the logit of ids [B, T_out] at the continuation positions, one number at a time."""
    batch, n_out = ids.shape
    logp, prob, logit = (torch.zeros(batch, n_out, dtype=logits.dtype) for _ in range(3))
    for b in range(batch):
        for j in range(n_out):
            z = logits[b, n_in - 1 + j]
            total = sum(math.exp(float(v)) for v in z)
            logit[b, j] = z[ids[b, j]]
            prob[b, j] = math.exp(float(z[ids[b, j]])) / total
            logp[b, j] = float(z[ids[b, j]]) - math.log(total)
    return logp, prob, logit


def test_token_scores_and_contrasts_equal_hand_computations():
    model = _gpt2()
    prompt, cont, other = _ids()
    with torch.no_grad():
        out = model(torch.cat([prompt, cont], 1))
    logp, prob, logit = _hand(out.logits, 5, cont)
    c_logp, c_prob, c_logit = _hand(out.logits, 5, other)
    for score, want, contrast in (("logprob", logp, c_logp), ("prob", prob, c_prob), ("logit", logit, c_logit)):
        torch.testing.assert_close(tx.token_scores(out, cont, score=score), want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(tx.token_scores(out, cont, score=score, contrast_ids=other, prompt_length=5),
                                   want - contrast, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(generation.token_logprobs(out, cont), logp, rtol=1e-12, atol=1e-14)

    def entropy(logits, ids):   # any function of the continuation positions' logits
        return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    want = torch.stack([torch.stack([-(out.logits[b, 4 + j].softmax(-1) * out.logits[b, 4 + j].log_softmax(-1)).sum()
                                     for j in range(4)]) for b in range(2)])
    torch.testing.assert_close(tx.token_scores(out.logits, cont, score=entropy), want)


def test_aggregations_spans_and_masks():
    model = _gpt2()
    prompt, cont, other = _ids()
    with torch.no_grad():
        out = model(torch.cat([prompt, cont], 1))
    logp, _, _ = _hand(out.logits, 5, cont)
    c_logp, _, _ = _hand(out.logits, 5, other)
    d = logp - c_logp
    target = tx.continuation_score
    torch.testing.assert_close(target(cont)(out), logp.sum(1))
    torch.testing.assert_close(target(cont, contrast_ids=other)(out), d.sum(1))
    torch.testing.assert_close(target(cont, contrast_ids=other, aggregate="mean")(out), d.mean(1))
    torch.testing.assert_close(target(cont, contrast_ids=other, aggregate="max")(out), d.amax(1))
    torch.testing.assert_close(target(cont, contrast_ids=other, aggregate="l2")(out), d.pow(2).sum(1).sqrt())
    torch.testing.assert_close(target(cont, span=(1, 3), aggregate="mean")(out), logp[:, 1:3].mean(1))
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    torch.testing.assert_close(target(cont, mask=mask, aggregate="max")(out),
                               torch.stack([logp[0, :3].max(), logp[1, 0]]))
    torch.testing.assert_close(target(cont, mask=mask, span=(1, 4), aggregate="mean")(out),
                               torch.stack([logp[0, 1:3].mean(), torch.tensor(0.0, dtype=logp.dtype)]))
    torch.testing.assert_close(target(cont, mask=mask)(out), tx.continuation_logprob(cont, mask=mask)(out))


def test_next_token_kl_equals_a_hand_computation():
    model = _gpt2()
    prompt, cont, _ = _ids()
    corrupt = prompt.clone()
    corrupt[:, 1] = 7
    with torch.no_grad():
        clean_logits = model(torch.cat([prompt, cont], 1)).logits
        ref = model(torch.cat([corrupt, cont], 1)).logits[:, -3:]
    kl = torch.zeros(2, 3, dtype=torch.float64)
    for b in range(2):
        for t in range(3):
            p = [math.exp(float(v)) for v in clean_logits[b, -3 + t]]
            q = [math.exp(float(v)) for v in ref[b, t]]
            sp, sq = sum(p), sum(q)
            kl[b, t] = sum(pi / sp * math.log((pi / sp) / (qi / sq)) for pi, qi in zip(p, q))
    torch.testing.assert_close(tx.next_token_kl(ref)(clean_logits), kl.sum(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tx.next_token_kl(ref, aggregate="max")(clean_logits), kl.amax(1), rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(tx.next_token_kl(ref, mask=torch.tensor([0, 1, 1]), aggregate="mean")(clean_logits),
                               kl[:, 1:].mean(1), rtol=1e-10, atol=1e-12)
    assert float(tx.next_token_kl(ref)(ref).abs().max()) < 1e-12          # KL(p || p) = 0
    # a target for any method: its gradient at the embeddings, against autograd written out
    fn, params = tx.functionalize(model)
    ids = torch.cat([prompt, cont], 1)
    sal = tx.saliency(fn, params, {"input_ids": ids}, tx.next_token_kl(ref), layer="transformer.wte")
    emb = model.transformer.wte(ids).detach().requires_grad_()
    log_p = model(inputs_embeds=emb).logits[:, -3:].log_softmax(-1)
    value = (log_p.exp() * (log_p - ref.log_softmax(-1))).sum()
    torch.testing.assert_close(sal, torch.autograd.grad(value, emb)[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("score", ["prob", "logit"])
def test_continuation_attribution_of_other_scores_and_contrasts_equals_a_loop(score):
    model = _gpt2()
    fn, params = tx.functionalize(model)
    prompt, cont, other = _ids(n_out=3)
    ours = tx.continuation_attribution(fn, params, prompt, cont, method="input_x_gradient", score=score,
                                       contrast_ids=other, batch_size=2)
    ids = {"input_ids": torch.cat([prompt, cont], 1)}
    for j in range(3):   # the public input_x_gradient with the public target, one output token at a time
        target = tx.continuation_score(cont, score=score, contrast_ids=other, span=(j, j + 1))
        row = tx.input_x_gradient(fn, params, ids, target, layer="transformer.wte").sum(-1)[:, :5]
        torch.testing.assert_close(ours.token_attr[:, j], row, rtol=1e-9, atol=1e-12)
    # and with a callable: the logit margin over the contrast, written as a function of the logits
    margin = tx.continuation_attribution(fn, params, prompt, cont, method="input_x_gradient",
                                         score=lambda z, i: z.gather(-1, i[..., None])[..., 0], contrast_ids=other)
    logit = tx.continuation_attribution(fn, params, prompt, cont, method="input_x_gradient", score="logit",
                                        contrast_ids=other)
    torch.testing.assert_close(margin.token_attr, logit.token_attr, rtol=1e-12, atol=1e-14)


def test_target_errors():
    prompt, cont, other = _ids()
    with pytest.raises(ValueError, match=r"continuation_score: unknown score 'logits'"):
        tx.continuation_score(cont, score="logits")
    with pytest.raises(ValueError, match=r"continuation_score: unknown aggregate 'median'"):
        tx.continuation_score(cont, aggregate="median")
    with pytest.raises(ValueError, match=r"continuation_score: expected span \(start, stop\) with 0 <= start < stop"):
        tx.continuation_score(cont, span=(2, 9))
    with pytest.raises(TypeError, match=r"continuation_score: expected span, a pair"):
        tx.continuation_score(cont, span=[0, 2])
    with pytest.raises(ValueError, match=r"continuation_score: expected contrast_ids of the continuation's shape"):
        tx.continuation_score(cont, contrast_ids=other[:, :2])
    with pytest.raises(TypeError, match=r"token_scores: expected score, one of"):
        tx.token_scores(torch.zeros(2, 9, VOCAB), cont, score=3)
    with pytest.raises(TypeError, match=r"next_token_kl: expected reference logits"):
        tx.next_token_kl(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"next_token_kl: expected logits with at least 3 positions"):
        tx.next_token_kl(torch.zeros(2, 3, VOCAB))(torch.zeros(2, 2, VOCAB))
    fn, params = tx.functionalize(_gpt2(torch.float32))
    with pytest.raises(ValueError, match=r"continuation_attribution: expected contrast_ids in \[0, 50\)"):
        tx.continuation_attribution(fn, params, prompt, cont, contrast_ids=other + VOCAB, method="saliency")
    with pytest.raises(ValueError, match=r"continuation_attribution: unknown score 'p'"):
        tx.continuation_attribution(fn, params, prompt, cont, score="p", method="saliency")
