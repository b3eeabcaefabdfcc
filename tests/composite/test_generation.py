"""Attribution of a generated continuation to its prompt (tiny GPT-2, random weights, teacher forcing)."""
import warnings

import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn import generation

transformers = pytest.importorskip("transformers")
captum_attr = pytest.importorskip("captum.attr")

VOCAB = 100


class IntTokenizer:
    """A fake tokenizer for captum's TextTokenInput / LLM attribution: space-separated integers are ids.

    captum calls ``encode(text, return_tensors="pt")``, ``convert_ids_to_tokens``, ``decode`` and
    ``__call__(text, return_offsets_mapping=True, add_special_tokens=False)`` (to name output tokens).
    """

    def encode(self, text, return_tensors=None, add_special_tokens=True):
        ids = [int(t) for t in text.split()]
        return torch.tensor([ids]) if return_tensors == "pt" else ids

    def decode(self, ids):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return " ".join(str(i) for i in ([ids] if isinstance(ids, int) else ids))

    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        return [int(t) for t in tokens]

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True, **kwargs):
        ids, offsets, pos = [], [], 0
        for t in text.split(" "):
            ids.append(int(t))
            offsets.append((pos, pos + len(t)))
            pos += len(t) + 1
        return {"input_ids": ids, "offset_mapping": offsets}


def _gpt2(seed=0, attn="eager", dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  attn_implementation=attn, bos_token_id=0, eos_token_id=0,
                                  initializer_range=0.1)   # larger than GPT-2's 0.02: attributions well above rounding
    return transformers.GPT2LMHeadModel(cfg).eval().to(dtype)


def _ids(seed=1, batch=2, n_in=6, n_out=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, n_in), generator=g), torch.randint(1, VOCAB, (batch, n_out), generator=g)


def _text(prompt_row, baseline):
    return captum_attr.TextTokenInput(" ".join(map(str, prompt_row.tolist())), IntTokenizer(), baselines=baseline)


def _close(ours, ref, rtol):
    assert ours.shape == ref.shape
    gap = (ours - ref).abs().max() / ref.abs().max()
    assert gap <= rtol, float(gap)


def _logprobs(model, prompt, cont):
    with torch.no_grad():
        logits = model(torch.cat([prompt, cont], 1)).logits
    n = prompt.shape[1]
    return torch.log_softmax(logits[:, n - 1:-1], -1).gather(-1, cont[..., None]).squeeze(-1)


def test_layer_integrated_gradients_equal_captum_llm_gradient_attribution():
    model = _gpt2()
    fn, params = tx.functionalize(model)
    prompt, cont = _ids()
    ours = tx.continuation_attribution(fn, params, prompt, cont, steps=12, baseline=3)   # layer: get_input_embeddings
    assert ours.token_attr.shape == (2, 4, 6) and ours.seq_attr.shape == (2, 6)
    for b in range(2):   # captum attributes one prompt at a time, one output token per LayerIntegratedGradients
        llm = captum_attr.LLMGradientAttribution(
            captum_attr.LayerIntegratedGradients(model, model.transformer.wte), IntTokenizer())
        ref = llm.attribute(_text(prompt[b], 3), target=cont[b], n_steps=12)
        _close(ours.token_attr[b], ref.token_attr, 1e-4)
        _close(ours.seq_attr[b], ref.seq_attr, 1e-4)


def test_input_x_gradient_equals_captum_layer_gradient_x_activation():
    model = _gpt2()
    fn, params = tx.functionalize(model)
    prompt, cont = _ids(n_out=3)
    ours = tx.continuation_attribution(fn, params, prompt, cont, method="input_x_gradient", layer="transformer.wte")
    for b in range(2):
        llm = captum_attr.LLMGradientAttribution(
            captum_attr.LayerGradientXActivation(model, model.transformer.wte), IntTokenizer())
        ref = llm.attribute(_text(prompt[b], 0), target=cont[b])
        _close(ours.token_attr[b], ref.token_attr, 1e-5)
        _close(ours.seq_attr[b], ref.seq_attr, 1e-5)


def test_saliency_norm_equals_autograd_and_sum_vanishes_through_layernorm():
    model = _gpt2()
    fn, params = tx.functionalize(model)
    prompt, cont = _ids(n_out=3)
    ours = tx.continuation_attribution(fn, params, prompt, cont, method="saliency", reduce="norm")
    summed = tx.continuation_attribution(fn, params, prompt, cont, method="saliency")
    ids = torch.cat([prompt, cont], 1)
    emb = model.transformer.wte(ids).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    logp = torch.log_softmax(logits[:, 5:-1], -1).gather(-1, cont[..., None]).squeeze(-1)      # [B, T_out]
    rows = [torch.autograd.grad(logp[:, j].sum(), emb, retain_graph=True)[0][:, :6] for j in range(3)]
    grads = torch.stack(rows, 1)                                                               # [B, T_out, T_in, D]
    torch.testing.assert_close(ours.token_attr, grads.norm(dim=-1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.seq_attr, grads.sum(1).norm(dim=-1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(summed.token_attr, grads.sum(-1), rtol=1e-4, atol=1e-6)
    # GPT-2 normalises its embeddings first: the gradient summed over the embedding dimension is ~0
    assert summed.token_attr.abs().max() <= 1e-4 * ours.token_attr.max()


def test_token_ablation_equals_captum_feature_ablation():
    model = _gpt2()
    fn, params = tx.functionalize(model)
    prompt, cont = _ids()
    ours = tx.continuation_ablation(fn, params, prompt, cont, baseline=3, batch_size=5)   # chunks cut variants
    for b in range(2):
        llm = captum_attr.LLMAttribution(captum_attr.FeatureAblation(model), IntTokenizer())
        # teacher forcing in one pass, and token-by-token decoding without a cache: the same numbers
        for kwargs in ({"forward_in_tokens": False}, {"forward_in_tokens": True, "use_cached_outputs": False}):
            ref = llm.attribute(_text(prompt[b], 3), target=cont[b], **kwargs)
            _close(ours.token_attr[b], ref.token_attr, 1e-5)
            _close(ours.seq_attr[b], ref.seq_attr, 1e-5)
    by_default = tx.continuation_ablation(fn, params, prompt, cont, baseline=torch.full((6,), 3))
    torch.testing.assert_close(by_default.token_attr, ours.token_attr, rtol=1e-5, atol=1e-6)
    # closed form: the difference of the teacher-forced log-probabilities with token 2 replaced
    ablated = prompt.clone()
    ablated[:, 2] = 3
    expected = _logprobs(model, prompt, cont) - _logprobs(model, ablated, cont)
    torch.testing.assert_close(ours.token_attr[:, :, 2], expected, rtol=1e-5, atol=1e-6)


def test_one_call_equals_a_loop_over_output_tokens_and_is_complete():
    model = _gpt2(dtype=torch.float64)
    fn, params = tx.functionalize(model)
    prompt, cont = _ids(n_out=3)
    ours = tx.continuation_attribution(fn, params, prompt, cont, steps=24, baseline=5)
    ids = {"input_ids": torch.cat([prompt, cont], 1), "use_cache": False}
    reference = {"input_ids": torch.cat([torch.full_like(prompt, 5), cont], 1)}
    for j in range(3):   # the public integrated_gradients, one output token at a time
        mask = torch.zeros(3)
        mask[j] = 1
        target = tx.continuation_logprob(cont, prompt_length=6, mask=mask)
        row = tx.integrated_gradients(fn, params, ids, target, layer="transformer.wte", baseline=reference,
                                      steps=24, batch_size=48)
        torch.testing.assert_close(ours.token_attr[:, j], row.sum(-1)[:, :6], rtol=1e-9, atol=1e-12)
    # completeness: each row sums to log p(c_j | prompt) - log p(c_j | reference prompt)
    gap = _logprobs(model, prompt, cont) - _logprobs(model, torch.full_like(prompt, 5), cont)
    torch.testing.assert_close(ours.token_attr.sum(-1), gap, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ours.seq_attr, ours.token_attr.sum(1))
    # memory caps change nothing: 2 path points of both examples per forward, one output token per backward
    capped = tx.continuation_attribution(fn, params, prompt, cont, steps=24, baseline=5, internal_batch_size=5,
                                         batch_size=1)
    torch.testing.assert_close(capped.token_attr, ours.token_attr, rtol=1e-9, atol=1e-12)


def test_mask_gives_continuations_of_different_lengths():
    model = _gpt2()
    fn, params = tx.functionalize(model)
    prompt, cont = _ids(n_out=4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    for run in (lambda c, m: tx.continuation_attribution(fn, params, prompt[1:], c, steps=6, mask=m),
                lambda c, m: tx.continuation_ablation(fn, params, prompt[1:], c, mask=m)):
        short = run(cont[1:, :2], None)
        padded = run(cont[1:], mask[1:])
        # float32 log-probabilities near log(1/100) round at ~5e-7: the differences keep that absolute error
        torch.testing.assert_close(padded.token_attr[:, :2], short.token_attr, rtol=1e-5, atol=3e-6)
        assert (padded.token_attr[:, 2:] == 0).all()
        torch.testing.assert_close(padded.seq_attr, short.seq_attr, rtol=1e-5, atol=3e-6)
    both = tx.continuation_attribution(fn, params, prompt, cont, method="saliency", mask=mask)
    assert (both.token_attr[1, 2:] == 0).all() and (both.token_attr[0, 2:] != 0).any()


def test_continuation_logprob_target():
    model = _gpt2()
    prompt, cont = _ids()
    ids = torch.cat([prompt, cont], 1)
    with torch.no_grad():
        out = model(ids)
    expected = _logprobs(model, prompt, cont)
    torch.testing.assert_close(generation.token_logprobs(out, cont, prompt_length=6), expected)
    torch.testing.assert_close(generation.token_logprobs(out.logits, cont), expected)        # at the end
    torch.testing.assert_close(tx.continuation_logprob(cont)(out), expected.sum(1))
    torch.testing.assert_close(tx.continuation_logprob(cont[0], prompt_length=6)(out[:1] if False else out.logits[:1]),
                               expected[:1].sum(1))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(tx.continuation_logprob(cont, prompt_length=6, mask=mask)(out),
                               (expected * mask).sum(1))
    # only the last positions' logits (HuggingFace logits_to_keep): prompt_length=None still finds them
    torch.testing.assert_close(tx.continuation_logprob(cont)(out.logits[:, -5:]), expected.sum(1))
    with pytest.raises(ValueError, match=r"continuation_logprob: expected logits over the prompt and the "
                                         r"continuation \(prompt_length \+ T_out - 1 = 12 <= 10\)"):
        tx.continuation_logprob(cont, prompt_length=9)(out)
    with pytest.raises(ValueError, match=r"continuation_logprob: expected continuation_ids of batch size 2"):
        tx.continuation_logprob(cont[:1].expand(3, 4))(out)


def test_differentiable_wrt_params():
    model = _gpt2(dtype=torch.float64)
    fn, params = tx.functionalize(model)
    prompt, cont = _ids(batch=1, n_in=4, n_out=2)
    name = "transformer.h.1.mlp.c_fc.weight"
    direction = torch.randn_like(params[name])

    def loss(w, method):
        res = tx.continuation_attribution(fn, {**params, name: w}, prompt, cont, method=method, steps=3)
        return (res.token_attr * torch.linspace(-1, 1, 4)).sum()
    for method in ("integrated_gradients", "input_x_gradient"):
        grad = torch.func.grad(loss)(params[name], method)
        eps = 1e-6
        numeric = (loss(params[name] + eps * direction, method) - loss(params[name] - eps * direction, method)) / (2 * eps)
        torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-5, atol=1e-8)


def test_sdpa_attention_gives_the_same_numbers():
    eager, sdpa = _gpt2(attn="eager"), _gpt2(attn="sdpa")
    prompt, cont = _ids(batch=1, n_out=2)
    ref = tx.continuation_attribution(*tx.functionalize(eager), prompt, cont, steps=4)
    with warnings.catch_warnings():  # vmap runs sdpa's backward in a loop and says so
        warnings.filterwarnings("ignore", message="There is a performance drop")
        got = tx.continuation_attribution(*tx.functionalize(sdpa), prompt, cont, steps=4)
    torch.testing.assert_close(got.token_attr, ref.token_attr, rtol=1e-4, atol=1e-6)


def test_stateless_no_hooks_left():
    model = _gpt2()
    fn, params = tx.functionalize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt, cont = _ids(batch=1, n_out=2)
    tx.continuation_attribution(fn, params, prompt, cont, steps=2)
    with pytest.raises(ValueError):
        tx.continuation_attribution(fn, params, prompt, torch.full((2,), VOCAB + 5), steps=2)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training


class TupleLM(nn.Module):
    """A causal LM returning a tuple (no ``logits``): needs ``functionalize(..., output=0)``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids):
        h = torch.cumsum(self.emb(ids), dim=1)     # causal: position t sees tokens <= t
        return self.head(torch.tanh(h)), h


def test_models_without_logits_and_plain_functions():
    torch.manual_seed(0)
    net = TupleLM().eval()
    prompt, cont = _ids(batch=2, n_in=3, n_out=2)
    with pytest.raises(ValueError, match=r"continuation_attribution: expected a model output with logits.*got tuple"
                                         r".*functionalize\(model, output=\.\.\.\)"):
        tx.continuation_attribution(*tx.functionalize(net), prompt, cont, layer="emb", steps=2)
    with pytest.raises(ValueError, match="continuation_ablation: expected a model output with logits"):
        tx.continuation_ablation(*tx.functionalize(net), prompt, cont)
    fn, params = tx.functionalize(net, output=0)
    with pytest.raises(TypeError, match=r"continuation_attribution: expected layer=, the token-embedding layer"):
        tx.continuation_attribution(fn, params, prompt, cont)
    res = tx.continuation_attribution(fn, params, prompt, cont, layer="emb", method="input_x_gradient")
    abl = tx.continuation_ablation(fn, params, prompt, cont)
    assert res.token_attr.shape == abl.token_attr.shape == (2, 2, 3)
    # the first output token is predicted at the last prompt position: every prompt token counts

    def plain(p, ids):   # a model written as a function, the layer tapped by name
        h = torch.cumsum(tx.tap("emb", p["emb.weight"][ids]), dim=1)
        return torch.tanh(h) @ p["head.weight"].T + p["head.bias"]
    same = tx.continuation_attribution(plain, params, prompt, cont, layer="emb", method="input_x_gradient")
    torch.testing.assert_close(same.token_attr, res.token_attr)


def test_errors():
    model = _gpt2()
    fn, params = tx.functionalize(model)
    prompt, cont = _ids()
    for call in (tx.continuation_attribution, tx.continuation_ablation):
        name = call.__name__
        with pytest.raises(ValueError, match=rf"{name}: expected continuation_ids of shape \[B, T_out\] with B = 2 "
                                             r"like prompt_ids \[2, 6\]"):
            call(fn, params, prompt, cont[:1].expand(3, 4))
        with pytest.raises(TypeError, match=rf"{name}: expected prompt_ids of an integer dtype"):
            call(fn, params, prompt.float(), cont)
        with pytest.raises(TypeError, match=rf"{name}: expected continuation_ids of an integer dtype"):
            call(fn, params, prompt, cont.float())
        with pytest.raises(ValueError, match=rf"{name}: expected prompt_ids of shape \[B, T_in\].*ids\[None\]"):
            call(fn, params, prompt[0], cont[0])
        with pytest.raises(ValueError, match=rf"{name}: expected continuation_ids with at least one token"):
            call(fn, params, prompt, cont[:, :0])
        with pytest.raises(ValueError, match=rf"{name}: expected mask of shape \[B, T_out\] = \[2, 4\]"):
            call(fn, params, prompt, cont, mask=torch.ones(2, 3))
        with pytest.raises(TypeError, match=rf"{name}: expected baseline of an integer dtype"):
            call(fn, params, prompt, cont, baseline=torch.zeros(6))
        with pytest.raises(TypeError, match=rf"{name}: expected model_fn, a pure"):
            call(model, params, prompt, cont)
        with pytest.raises(ValueError, match=rf"{name}: expected continuation_ids in \[0, 100\) \(the vocabulary\)"):
            call(fn, params, prompt, torch.full((4,), VOCAB))
        with pytest.raises(ValueError, match=rf"{name}: expected baseline token ids in \[0, 100\)"):
            call(fn, params, prompt, cont, baseline=-1)
    with pytest.raises(ValueError, match=r"continuation_attribution: unknown method 'saliancy'.*'saliency'"):
        tx.continuation_attribution(fn, params, prompt, cont, method="saliancy")
    with pytest.raises(ValueError, match=r"continuation_attribution: unknown quadrature 'gauss'"):
        tx.continuation_attribution(fn, params, prompt, cont, quadrature="gauss")
    with pytest.raises(ValueError, match=r"continuation_attribution: unknown reduce 'l2'"):
        tx.continuation_attribution(fn, params, prompt, cont, reduce="l2")
    with pytest.raises(ValueError, match=r"continuation_attribution: unknown layer 'transformer.wtf'"):
        tx.continuation_attribution(fn, params, prompt, cont, layer="transformer.wtf")
    with pytest.raises(TypeError, match=r"continuation_logprob: expected continuation_ids of an integer dtype"):
        tx.continuation_logprob(cont.float())
    with pytest.raises(ValueError, match=r"continuation_logprob: expected mask of shape"):
        tx.continuation_logprob(cont, mask=torch.ones(5))
    with pytest.raises(ValueError, match=r"token_logprobs: expected a model output with logits"):
        generation.token_logprobs((torch.zeros(2, 10, 5),), cont)
