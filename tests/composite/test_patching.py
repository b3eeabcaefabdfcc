"""Activation patching and attribution patching (issue 18): equal to patched forwards and first-order Taylor
terms written out here with hooks and torch.autograd, on a tiny random GPT-2 and a hand-built model."""
import pytest
import torch

import torchex_fn as tx
from torchex_fn import patching

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, T, B, HEADS, WIDTH = 50, 6, 2, 2, 32
BLOCKS = ["transformer.h.0", "transformer.h.1"]
SITES = ["transformer.drop", "transformer.h.0", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp", "transformer.h.1"]
PROJ = ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=WIDTH, n_layer=2, n_head=HEADS,
                                  attn_implementation="eager", bos_token_id=0, eos_token_id=0,
                                  initializer_range=0.2)   # larger than 0.02: effects well above rounding
    return transformers.GPT2LMHeadModel(cfg).eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (B, T), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 7) % VOCAB        # two positions differ; 0, 1 are equal, so their cells
    corrupt[:, 4] = (clean[:, 4] + 11) % VOCAB       # are the clean metric and AtP's are zero
    answer, wrong = torch.tensor([3, 5]), torch.tensor([8, 1])
    return clean, corrupt, answer, wrong


def _metric_ref(logits, answer, wrong):
    last = logits[:, -1]
    return last[torch.arange(last.shape[0]), answer] - last[torch.arange(last.shape[0]), wrong]


def _output_of(model, name, ids):
    seen = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.setdefault("a", o))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return seen["a"]


def _input_of(model, name, ids):
    seen = {}
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.setdefault("z", a[0]))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return seen["z"]


def _patched_ref(model, name, t, base, value, answer, wrong, head=None):
    """One explicit patched forward: layer ``name``'s output at position ``t`` (or head ``head``'s slice
    of its input) replaced by ``value``'s, through a forward (pre-)hook."""
    module = model.get_submodule(name)
    if head is None:
        def hook(m, args, out):
            out = out.clone()
            out[:, t] = value[:, t]
            return out
        handle = module.register_forward_hook(hook)
    else:
        d = WIDTH // HEADS

        def pre_hook(m, args):
            z = args[0].clone()
            z[:, t, head * d:(head + 1) * d] = value[:, t, head * d:(head + 1) * d]
            return (z,)
        handle = module.register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            return _metric_ref(model(base).logits, answer, wrong)
    finally:
        handle.remove()


def test_activation_patching_equals_explicit_patched_forwards_on_gpt2():
    model = _gpt2()
    fn, params = tx.functionalize(model)
    clean, corrupt, answer, wrong = _inputs()
    metric = patching.logit_difference(answer, wrong)
    table = tx.activation_patching(fn, params, clean, corrupt, metric, layers=SITES)
    assert table.shape == (B, len(SITES), T)
    ref = torch.stack([torch.stack([_patched_ref(model, name, t, clean, _output_of(model, name, corrupt), answer, wrong)
                                    for t in range(T)], 1) for name in SITES], 1)
    assert (table - ref).abs().max() <= 1e-6
    clean_metric = _metric_ref(model(clean).logits, answer, wrong)
    assert torch.equal(table[:, :, :2], clean_metric[:, None, None].expand(B, len(SITES), 2).detach())   # unchanged
    assert (table - clean_metric[:, None, None]).abs().amax(dim=(0, 2)).min() > 1e-2     # every layer matters
    # the corrupt run with everything after the embeddings patched: patching the last block's output at the
    # last position gives the corrupt model's metric (only that position's residual reaches the logits)
    assert torch.allclose(table[:, -1, -1], _metric_ref(model(corrupt).logits, answer, wrong), atol=1e-5)


def test_denoising_heads_positions_and_batch_size_equal_explicit_forwards():
    model = _gpt2(seed=2)
    fn, params = tx.functionalize(model)
    clean, corrupt, answer, wrong = _inputs(seed=3)
    metric = patching.logit_difference(answer, wrong)
    # denoising: the corrupt run with clean activations restored
    table = tx.activation_patching(fn, params, clean, corrupt, metric, layers=BLOCKS, direction="denoising",
                                   positions=[-1, 2, 3], batch_size=3)
    ref = torch.stack([torch.stack([_patched_ref(model, name, t, corrupt, _output_of(model, name, clean), answer, wrong)
                                    for t in (5, 2, 3)], 1) for name in BLOCKS], 1)
    assert table.shape == (B, 2, 3) and (table - ref).abs().max() <= 1e-6
    # heads: a slice of the output projection's input
    heads = tx.activation_patching(fn, params, clean, corrupt, metric, layers=PROJ, heads=HEADS, batch_size=5)
    ref = torch.stack([torch.stack([torch.stack([
        _patched_ref(model, name, t, clean, _input_of(model, name, corrupt), answer, wrong, head=h)
        for h in range(HEADS)], 1) for t in range(T)], 1) for name in PROJ], 1)
    assert heads.shape == (B, 2, T, HEADS) and (heads - ref).abs().max() <= 1e-6
    assert ref[:, :, 2:].abs().max() > 1e-2
    # the chunk size changes nothing
    full = tx.activation_patching(fn, params, clean, corrupt, metric, layers=SITES)
    for size in (1, 2, 7):
        assert (tx.activation_patching(fn, params, clean, corrupt, metric, layers=SITES, batch_size=size)
                - full).abs().max() <= 1e-6


def test_dict_inputs_and_one_example():
    model = _gpt2()
    fn, params = tx.functionalize(model)
    clean, corrupt, answer, wrong = _inputs()
    metric = patching.logit_difference(answer, wrong)
    table = tx.activation_patching(fn, params, clean, corrupt, metric, layers=BLOCKS)
    mask = torch.ones_like(clean)
    as_dict = tx.activation_patching(fn, params, {"input_ids": clean, "attention_mask": mask},
                                     {"input_ids": corrupt, "attention_mask": mask}, metric, layers=BLOCKS)
    assert (as_dict - table).abs().max() <= 1e-6
    one = tx.activation_patching(fn, params, clean[1], corrupt[1], patching.logit_difference(3 + 2, 1),
                                 layers=BLOCKS)
    assert one.shape == (2, T) and (one - table[1]).abs().max() <= 1e-6
    atp = tx.attribution_patching(fn, params, clean, corrupt, metric, layers=BLOCKS)
    atp_dict = tx.attribution_patching(fn, params, {"input_ids": clean, "attention_mask": mask},
                                       {"input_ids": corrupt, "attention_mask": mask}, metric, layers=BLOCKS)
    assert (atp_dict - atp).abs().max() <= 1e-6


def _taylor_ref(model, names, base, source, answer, wrong, heads=None):
    """``(a_source - a_base) . d metric / d a`` at the base run, by hand: hooks keep the activations
    (with ``retain_grad``) and ``torch.autograd`` differentiates the summed metric."""
    kept, handles = {}, []
    for name in names:
        module = model.get_submodule(name)
        if heads is None:
            def keep(m, a, o, name=name):
                o.retain_grad()
                kept[name] = o
            handles.append(module.register_forward_hook(keep))
        else:
            def keep_in(m, a, name=name):
                a[0].retain_grad()
                kept[name] = a[0]
            handles.append(module.register_forward_pre_hook(keep_in))
    try:
        _metric_ref(model(base).logits, answer, wrong).sum().backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    rows = []
    for name in names:
        source_act = _input_of(model, name, source) if heads else _output_of(model, name, source)
        diff = (source_act - kept[name].detach()) * kept[name].grad
        rows.append(diff.reshape(B, T, heads, -1).sum(-1) if heads else diff.sum(-1))
    return torch.stack(rows, 1)


def test_attribution_patching_equals_the_first_order_taylor_term():
    model = _gpt2()
    fn, params = tx.functionalize(model)
    clean, corrupt, answer, wrong = _inputs()
    metric = patching.logit_difference(answer, wrong)
    atp = tx.attribution_patching(fn, params, clean, corrupt, metric, layers=SITES)
    ref = _taylor_ref(model, SITES, clean, corrupt, answer, wrong)
    assert atp.shape == (B, len(SITES), T)
    assert (atp - ref).abs().max() <= 1e-6 * ref.abs().max() + 1e-7
    assert torch.equal(atp[:, :, :2], torch.zeros(B, len(SITES), 2))       # equal activations: exactly 0
    assert ref.abs().max() > 1e-1
    heads = tx.attribution_patching(fn, params, clean, corrupt, metric, layers=PROJ, heads=HEADS)
    ref = _taylor_ref(model, PROJ, clean, corrupt, answer, wrong, heads=HEADS)
    assert heads.shape == (B, 2, T, HEADS) and (heads - ref).abs().max() <= 1e-6 * ref.abs().max() + 1e-7
    # denoising: the Taylor term at the corrupt run, towards the clean activations
    den = tx.attribution_patching(fn, params, clean, corrupt, metric, layers=BLOCKS, direction="denoising",
                                  positions=[4, 5])
    ref = _taylor_ref(model, BLOCKS, corrupt, clean, answer, wrong)[:, :, [4, 5]]
    assert (den - ref).abs().max() <= 1e-6 * ref.abs().max() + 1e-7


# ---------------------------------------------------------------------------- a hand-built model (tap)
def _hand_params():
    g = torch.Generator().manual_seed(4)
    return {"w1": torch.randn(2, 3, generator=g, dtype=torch.float64),
            "w2": torch.randn(3, 2, generator=g, dtype=torch.float64),
            "w3": torch.randn(2, generator=g, dtype=torch.float64)}


def _hand(params, x, patch=None):
    """x [B, T, 2] -> [B, T]. ``h`` mixes positions causally (a cumulative sum); the output is linear in ``g``.
    ``patch = (layer, t, value)`` replaces that layer at position t (the explicit reference)."""
    h = torch.tanh(x @ params["w1"])
    if patch and patch[0] == "h":
        h = h.clone()
        h[:, patch[1]] = patch[2][:, patch[1]]
    h = tx.tap("h", h)
    g = torch.sigmoid(torch.cumsum(h, dim=1) @ params["w2"])
    if patch and patch[0] == "g":
        g = g.clone()
        g[:, patch[1]] = patch[2][:, patch[1]]
    g = tx.tap("g", g)
    return g @ params["w3"]


def _hand_metric(out):
    return out.sum(1)


def test_hand_built_model_closed_form():
    params = _hand_params()
    g = torch.Generator().manual_seed(5)
    clean = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    corrupt = clean.clone()
    corrupt[:, 1] = torch.randn(3, 2, generator=g, dtype=torch.float64)
    acts = {}
    for name, x in (("clean", clean), ("corrupt", corrupt)):
        _, acts[name] = tx.capture(_hand, params, x, ["h", "g"])
    table = tx.activation_patching(_hand, params, clean, corrupt, _hand_metric, layers=["h", "g"])
    for li, name in enumerate(["h", "g"]):
        for t in range(5):
            ref = _hand_metric(_hand(params, clean, (name, t, acts["corrupt"][li])))
            assert (table[:, li, t] - ref).abs().max() <= 1e-12
    base = _hand_metric(_hand(params, clean))
    atp = tx.attribution_patching(_hand, params, clean, corrupt, _hand_metric, layers=["h", "g"])
    # the output is linear in g: AtP at g is activation patching's change, in closed form w3 . (g_c - g)
    closed = ((acts["corrupt"][1] - acts["clean"][1]) @ params["w3"])
    assert (atp[:, 1] - closed).abs().max() <= 1e-12
    assert (atp[:, 1] - (table[:, 1] - base[:, None])).abs().max() <= 1e-12
    # at h only position 1 changes; the metric sums every position's output, and h_1 reaches positions
    # 1..4 through the cumulative sum: d metric / d h_1 = sum_{s>=1} w2 @ (sigmoid' * w3) at s
    z = torch.cumsum(acts["clean"][0], 1) @ params["w2"]
    slope = (torch.sigmoid(z) * (1 - torch.sigmoid(z)) * params["w3"])[:, 1:] @ params["w2"].T   # [3, 4, 3]
    grad_h1 = slope.sum(1)
    expected = ((acts["corrupt"][0] - acts["clean"][0])[:, 1] * grad_h1).sum(-1)
    assert (atp[:, 0, 1] - expected).abs().max() <= 1e-12
    assert torch.equal(atp[:, 0, [0, 2, 3, 4]], torch.zeros(3, 4, dtype=torch.float64))


def test_metrics_equal_their_formulas():
    logits = torch.randn(3, 4, 7)
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([0, 6, 5])
    diff = patching.logit_difference(answer, wrong)(logits)
    assert torch.equal(diff, logits[torch.arange(3), -1, answer] - logits[torch.arange(3), -1, wrong])
    assert torch.equal(patching.logit_difference(2, 4, position=1)(logits), logits[:, 1, 2] - logits[:, 1, 4])
    prob = patching.token_probability(answer, position=0)({"logits": logits})
    assert torch.allclose(prob, torch.softmax(logits[:, 0], -1)[torch.arange(3), answer], atol=0, rtol=1e-6)
    stacked = torch.cat([logits, logits])      # [k * B] stacked variants: the [B] ids repeat
    assert torch.equal(patching.logit_difference(answer, wrong)(stacked), torch.cat([diff, diff]))


# ---------------------------------------------------------------------------- errors, purity
def _counting(calls):
    def model_fn(params, x):
        calls.append(1)
        return _hand(params, x)
    return model_fn


@pytest.mark.parametrize("function", [tx.activation_patching, tx.attribution_patching])
def test_bad_arguments_raise_before_any_forward(function):
    params = _hand_params()
    clean = torch.randn(2, 5, 2, dtype=torch.float64)
    calls = []
    name = function.__name__
    with pytest.raises(ValueError, match=rf"{name}: expected corrupt of clean's shape \(2, 5, 2\)"):
        function(_counting(calls), params, clean, clean[:, :4], _hand_metric, layers=["h"])
    with pytest.raises(TypeError, match=rf"{name}: expected metric, a callable"):
        function(_counting(calls), params, clean, clean, "logit_diff", layers=["h"])
    with pytest.raises(ValueError, match=rf"{name}: expected direction in"):
        function(_counting(calls), params, clean, clean, _hand_metric, layers=["h"], direction="forward")
    with pytest.raises(ValueError, match=rf"{name}: expected positions in \[-5, 5\)"):
        function(_counting(calls), params, clean, clean, _hand_metric, layers=["h"], positions=[5])
    with pytest.raises(TypeError, match=rf"{name}: expected positions"):
        function(_counting(calls), params, clean, clean, _hand_metric, layers=["h"], positions=[1.5])
    with pytest.raises(TypeError, match=rf"{name}: expected a model_fn from functionalize for heads="):
        function(_counting(calls), params, clean, clean, _hand_metric, layers=["h"], heads=2)
    assert calls == []
    with pytest.raises(ValueError, match=rf"{name}: expected metric\(out\) of shape \[B\] = \[2\]"):
        function(_hand, params, clean, clean + 1, lambda out: out, layers=["h"])


@pytest.mark.parametrize("function", [tx.activation_patching, tx.attribution_patching])
def test_bad_layers_on_gpt2(function):
    model = _gpt2()
    fn, params = tx.functionalize(model)
    clean, corrupt, answer, wrong = _inputs()
    metric = patching.logit_difference(answer, wrong)
    name = function.__name__
    with pytest.raises(ValueError, match=rf"{name}: unknown layer 'transformer.h.9'"):
        function(fn, params, clean, corrupt, metric, layers=["transformer.h.9"])
    with pytest.raises(TypeError, match=r"layer 'transformer.h.0.attn' to output a tensor"):
        function(fn, params, clean, corrupt, metric, layers=["transformer.h.0.attn"])      # a tuple
    with pytest.raises(ValueError, match=rf"{name}: expected layer 'transformer.wpe' to output \[B, T, ...\]"):
        function(fn, params, clean, corrupt, metric, layers=["transformer.wpe"])          # [1, T, d]
    with pytest.raises(ValueError, match=rf"{name}: expected the input of 'transformer.h.0.attn.c_proj' to be"):
        function(fn, params, clean, corrupt, metric, layers=PROJ, heads=5)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_model_untouched():
    model = _gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fn, params = tx.functionalize(model)
    clean, corrupt, answer, wrong = _inputs()
    metric = patching.logit_difference(answer, wrong)
    tx.activation_patching(fn, params, clean, corrupt, metric, layers=SITES)
    tx.activation_patching(fn, params, clean, corrupt, metric, layers=PROJ, heads=HEADS)
    tx.attribution_patching(fn, params, clean, corrupt, metric, layers=PROJ, heads=HEADS)
    tx.attribution_patching(fn, params, clean, corrupt, metric, layers=SITES)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_an_example_whose_cell_is_unchanged_keeps_the_clean_metric_exactly():
    model = _gpt2()
    fn, params = tx.functionalize(model)
    clean, corrupt, answer, wrong = _inputs()
    corrupt[1] = clean[1]                           # example 1 is not corrupted at all
    metric = patching.logit_difference(answer, wrong)
    table = tx.activation_patching(fn, params, clean, corrupt, metric, layers=SITES)
    with torch.no_grad():
        clean_metric = metric(fn(params, clean))
    assert torch.equal(table[1], clean_metric[1].expand(len(SITES), T))
    ref = torch.stack([_patched_ref(model, "transformer.h.0", t, clean, _output_of(model, "transformer.h.0", corrupt),
                                    answer, wrong)[0] for t in range(T)])
    assert (table[0, 1] - ref).abs().max() <= 1e-6 and (ref - clean_metric[0]).abs().max() > 1e-2


def test_unchanged_cells_are_not_recomputed():
    """A model whose output depends on the rows of its batch shows which cells ran a patched forward:
    cells with equal activations in an example keep the base run's metric, the others do not."""
    params = _hand_params()
    clean = torch.randn(2, 4, 2, dtype=torch.float64)
    corrupt = clean.clone()
    corrupt[0, 1:3] += 1.0                         # example 0 at positions 1 and 2 only

    def batch_dependent(params, x):
        return _hand(params, x) + 1e-3 * x.shape[0]

    table = tx.activation_patching(batch_dependent, params, clean, corrupt, _hand_metric, layers=["h"], batch_size=4)
    base = _hand_metric(batch_dependent(params, clean))
    assert torch.equal(table[1], base[1].expand(1, 4))                       # example 1: never patched
    assert torch.equal(table[0, :, [0, 3]], base[0].expand(1, 2))            # example 0 elsewhere
    for t in (1, 2):                                                          # two variants of 2 rows: 4 rows
        ref = _hand_metric(_hand(params, clean, ("h", t, torch.tanh(corrupt @ params["w1"]))))[0] + 4 * 1e-3 * 4
        assert abs(float(table[0, 0, t] - ref)) <= 1e-12


def test_llama_heads_through_o_proj_equal_explicit_forwards():
    """Grouped-query attention (4 query heads, 2 key/value heads): o_proj's input holds the 4 query heads."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                   attn_implementation="eager", initializer_range=0.2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    fn, params = tx.functionalize(model)
    clean, corrupt, answer, wrong = _inputs()
    metric = patching.logit_difference(answer, wrong)
    name = "model.layers.1.self_attn.o_proj"
    heads = tx.activation_patching(fn, params, clean, corrupt, metric, layers=[name], heads=4, positions=[3, 5])
    z_corrupt = _input_of(model, name, corrupt)
    for j, t in enumerate((3, 5)):
        for h in range(4):
            def pre_hook(m, args, t=t, h=h):
                z = args[0].clone()
                z[:, t, h * 8:(h + 1) * 8] = z_corrupt[:, t, h * 8:(h + 1) * 8]
                return (z,)
            handle = model.get_submodule(name).register_forward_pre_hook(pre_hook)
            with torch.no_grad():
                ref = _metric_ref(model(clean).logits, answer, wrong)
            handle.remove()
            assert (heads[:, 0, j, h] - ref).abs().max() <= 1e-6
    with torch.no_grad():
        assert (heads - metric(model(clean))[:, None, None, None]).abs().max() > 1e-3
