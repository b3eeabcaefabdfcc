"""Continuation attribution in bounded memory: batch_size= (output tokens per backward) and checkpoint=."""
import pytest
import torch

import torchex_fn as tx

transformers = pytest.importorskip("transformers")

VOCAB = 60
METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "gradient_shap", "deeplift")


def _gpt2(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  attn_implementation="eager", bos_token_id=0, eos_token_id=0,
                                  initializer_range=0.1)
    return transformers.GPT2LMHeadModel(cfg).eval().to(dtype)


def _ids(batch=2, n_in=6, n_out=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, n_in), generator=g), torch.randint(1, VOCAB, (batch, n_out), generator=g)


def _options(method):
    if method == "integrated_gradients":
        return {"steps": 5, "baseline": 3}
    if method == "gradient_shap":
        return {"samples": 3, "stdev": 0.05, "baseline": 3, "generator": torch.Generator().manual_seed(7)}
    if method == "deeplift":
        return {"baseline": 3}
    if method == "saliency":   # summed gradients vanish through GPT-2's first LayerNorm: their norm
        return {"reduce": "norm"}
    return {}


def _gap(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("method", METHODS)
def test_every_map_is_unchanged_by_batch_size_and_checkpoint(method):
    fn, params = tx.functionalize(_gpt2())
    prompt, cont = _ids()
    ref = tx.continuation_attribution(fn, params, prompt, cont, method=method, **_options(method))
    assert ref.token_attr.abs().max() > 1e-3
    settings = [(1, False), (3, False)] + ([] if method == "deeplift" else [(None, True), (1, True), (3, True)])
    for batch_size, checkpoint in settings:
        got = tx.continuation_attribution(fn, params, prompt, cont, method=method, batch_size=batch_size,
                                          checkpoint=checkpoint, **_options(method))
        assert _gap(got.token_attr, ref.token_attr) <= 1e-6, (batch_size, checkpoint)
        assert _gap(got.seq_attr, ref.seq_attr) <= 1e-6, (batch_size, checkpoint)


def test_float32_and_internal_batch_size_change_nothing_either():
    fn, params = tx.functionalize(_gpt2(torch.float32))
    prompt, cont = _ids()
    ref = tx.continuation_attribution(fn, params, prompt, cont, method="input_x_gradient")
    got = tx.continuation_attribution(fn, params, prompt, cont, method="input_x_gradient", batch_size=2,
                                      checkpoint=["transformer.h.0", "transformer.h.1"])
    assert _gap(got.token_attr, ref.token_attr) <= 1e-6
    ig = tx.continuation_attribution(fn, params, prompt, cont, steps=6)
    capped = tx.continuation_attribution(fn, params, prompt, cont, steps=6, internal_batch_size=5, batch_size=3,
                                         checkpoint=True)   # 2 points per forward (B = 2), 3 forwards
    assert _gap(capped.token_attr, ig.token_attr) <= 1e-5


def _per_token(method, fn, params, prompt, cont, **options):
    """The public method, one output token at a time, with a target that weights that token only."""
    n_in, n_out = prompt.shape[1], cont.shape[1]
    ids = {"input_ids": torch.cat([prompt, cont], 1), "use_cache": False}
    reference = {"input_ids": torch.cat([torch.full_like(prompt, 3), cont], 1)}
    rows = []
    for j in range(n_out):
        target = tx.continuation_score(cont, prompt_length=n_in, span=(j, j + 1))
        if method == "gradient_shap":   # baselines are a distribution: one example (and its reference) a call
            row = torch.cat([tx.gradient_shap(fn, params, {"input_ids": ids["input_ids"][b:b + 1]},
                                              tx.continuation_score(cont[b:b + 1], prompt_length=n_in, span=(j, j + 1)),
                                              baselines=reference["input_ids"][b:b + 1], layer="transformer.wte",
                                              samples=3, stdev=0.05, generator=torch.Generator().manual_seed(7))
                             for b in range(prompt.shape[0])])
        else:
            row = tx.deeplift(fn, params, ids, target, layer="transformer.wte", baseline=reference)
        rows.append(row.sum(-1)[:, :n_in])
    return torch.stack(rows, 1)


@pytest.mark.parametrize("method", ["gradient_shap", "deeplift"])
def test_gradient_shap_and_deeplift_equal_the_public_methods_token_by_token(method):
    model = _gpt2()
    fn, params = tx.functionalize(model, output="logits")
    prompt, cont = _ids(n_out=3)
    ours = tx.continuation_attribution(fn, params, prompt, cont, method=method, batch_size=2, **_options(method))
    expected = _per_token(method, fn, params, prompt, cont)
    torch.testing.assert_close(ours.token_attr, expected, rtol=1e-9, atol=1e-12)


def _count_block_calls(model, run):
    calls = []
    handle = model.transformer.h[0].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        run()
    finally:
        handle.remove()
    return calls


def test_one_shared_forward_and_one_recomputation_per_backward():
    model = _gpt2()
    fn, params = tx.functionalize(model)
    prompt, cont = _ids(n_out=4)

    def run(**options):
        return lambda: tx.continuation_attribution(fn, params, prompt, cont, **options)
    # one forward of the B = 2 sequences, whatever the number of backward chunks
    assert _count_block_calls(model, run(method="input_x_gradient", batch_size=1)) == [2]
    assert _count_block_calls(model, run(method="input_x_gradient")) == [2]
    # checkpointing: the forward, then one recomputation in each of the 4 / 2 backward calls
    assert _count_block_calls(model, run(method="saliency", batch_size=1, checkpoint=True)) == [2] * 5
    assert _count_block_calls(model, run(method="saliency", batch_size=2, checkpoint=True)) == [2] * 3
    # integrated gradients: all 5 points of both examples in one forward, then 2 points per forward
    assert _count_block_calls(model, run(steps=5, batch_size=1)) == [10]
    assert _count_block_calls(model, run(steps=5, internal_batch_size=4)) == [4, 4, 2]
    # nothing outlives the call: no forward replaced, no hook
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in model.modules())


def test_checkpoint_uses_the_params_of_the_call():
    model = _gpt2()
    fn, params = tx.functionalize(model)
    prompt, cont = _ids()
    name = "transformer.h.1.mlp.c_fc.weight"
    other = {**params, name: params[name] * 1.5}
    ref = tx.continuation_attribution(fn, other, prompt, cont, method="input_x_gradient")
    got = tx.continuation_attribution(fn, other, prompt, cont, method="input_x_gradient", checkpoint=True,
                                      batch_size=1)
    assert _gap(got.token_attr, ref.token_attr) <= 1e-9
    plain = tx.continuation_attribution(fn, params, prompt, cont, method="input_x_gradient")
    assert _gap(plain.token_attr, ref.token_attr) > 1e-3       # the params do matter


def test_batch_size_composes_with_outer_gradients():
    model = _gpt2()
    fn, params = tx.functionalize(model)
    prompt, cont = _ids(batch=1, n_in=4, n_out=3)
    name = "transformer.h.1.mlp.c_fc.weight"

    def loss(w, batch_size):
        res = tx.continuation_attribution(fn, {**params, name: w}, prompt, cont, method="input_x_gradient",
                                          batch_size=batch_size)
        return (res.token_attr * torch.linspace(-1, 1, 4)).sum()
    torch.testing.assert_close(torch.func.grad(loss)(params[name], 2), torch.func.grad(loss)(params[name], None),
                               rtol=1e-10, atol=1e-12)


def test_memory_options_errors():
    fn, params = tx.functionalize(_gpt2(torch.float32))
    prompt, cont = _ids()
    call = tx.continuation_attribution
    with pytest.raises(ValueError, match=r"continuation_attribution: expected checkpoint=False with "
                                         r"method='deeplift'.*lower batch_size"):
        call(fn, params, prompt, cont, method="deeplift", checkpoint=True)
    with pytest.raises(ValueError, match=r"continuation_attribution: unknown checkpoint module 'transformer.hh'"):
        call(fn, params, prompt, cont, checkpoint="transformer.hh")
    with pytest.raises(TypeError, match=r"continuation_attribution: expected checkpoint, a bool, a module name"):
        call(fn, params, prompt, cont, checkpoint=3)
    with pytest.raises(ValueError, match=r"continuation_attribution: expected batch_size"):
        call(fn, params, prompt, cont, batch_size=0)
    with pytest.raises(ValueError, match=r"continuation_attribution: expected internal_batch_size"):
        call(fn, params, prompt, cont, internal_batch_size=0)

    def plain(p, ids):
        return fn(p, ids)
    with pytest.raises(TypeError, match=r"continuation_attribution: expected a model_fn from functionalize"):
        call(plain, params, prompt, cont, layer="transformer.wte", checkpoint=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_ablation_over_the_clean_key_value_cache_equals_full_forwards(dtype, tol):
    model = _gpt2(dtype)
    fn, params = tx.functionalize(model)
    prompt, cont = _ids(n_in=7, n_out=3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    full = tx.continuation_ablation(fn, params, prompt, cont, baseline=3, mask=mask)
    cached = tx.continuation_ablation(fn, params, prompt, cont, baseline=3, mask=mask, cache=True)
    assert full.token_attr.abs().max() > 1e-3
    torch.testing.assert_close(cached.token_attr, full.token_attr, rtol=0, atol=tol)
    # seq_attr differs two summed log-probabilities of ~12 in size: float32 resolves them to ~1e-6 each
    torch.testing.assert_close(cached.seq_attr, full.seq_attr, rtol=0, atol=4 * tol if dtype == torch.float32 else tol)
    # fewer tokens run: the clean forward, then T - i tokens for ablated position i (counted at the first block)
    lengths = []
    handle = model.transformer.h[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    try:
        tx.continuation_ablation(fn, params, prompt, cont, baseline=3, cache=True)
    finally:
        handle.remove()
    assert lengths == [10] + [10 - i for i in range(7)]


def test_ablation_cache_needs_a_huggingface_cache():
    fn, params = tx.functionalize(_gpt2(torch.float32))
    prompt, cont = _ids()

    def plain(p, ids):
        return fn(p, ids)
    with pytest.raises(ValueError, match=r"continuation_ablation: expected a model whose forward takes input_ids, "
                                         r"past_key_values \(or cache\) and use_cache"):
        tx.continuation_ablation(plain, params, prompt, cont, cache=True)
