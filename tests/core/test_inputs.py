"""Inputs beyond one float tensor: dict inputs, token ids with ``layer=``, structured outputs."""
import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.core import inputs as _inputs

transformers = pytest.importorskip("transformers")
captum_attr = pytest.importorskip("captum.attr")


def _bert(seed=0, distil=False):
    torch.manual_seed(seed)
    if distil:
        cfg = transformers.DistilBertConfig(vocab_size=60, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                            max_position_embeddings=32, num_labels=3)
        return transformers.DistilBertForSequenceClassification(cfg).eval(), "distilbert.embeddings"
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval(), "bert.embeddings"


def _tokens(seed=1, batch=2, length=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


class TwoHeads(nn.Module):
    """A model returning a dict, a tuple-shaped head and a float input entry."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, pixels, scale):
        h = self.lin(pixels) * scale[:, None]
        return {"logits": h, "aux": h.sum(1)}


def test_output_selection_key_index_callable_and_default():
    torch.manual_seed(0)
    net = TwoHeads().eval()
    x = {"pixels": torch.randn(3, 4, dtype=torch.float64), "scale": torch.tensor([1, 2, 3])}
    net = net.double()
    expected = tx.saliency(*tx.functionalize(net, output="logits"), x, 2)
    by_default = tx.saliency(*tx.functionalize(net), x, 2)                       # a mapping with "logits"
    by_callable = tx.saliency(*tx.functionalize(net, output=lambda o: o["logits"]), x, 2)
    closed_form = net.lin.weight[2].detach() * x["scale"][:, None].double()    # d (W p * s)_2 / d p
    torch.testing.assert_close(expected, closed_form.expand(3, 4))
    torch.testing.assert_close(by_default, expected, rtol=0, atol=0)
    torch.testing.assert_close(by_callable, expected, rtol=0, atol=0)


def test_output_selection_errors():
    net = TwoHeads().eval()
    x = {"pixels": torch.randn(2, 4), "scale": torch.tensor([1, 2])}
    fn, params = tx.functionalize(net, output="logitz")
    with pytest.raises(ValueError, match="saliency: unknown model output entry.*'logitz'.*Did you mean 'logits'"):
        tx.saliency(fn, params, x, 0)
    with pytest.raises(TypeError, match="functionalize: expected output: None, a key"):
        tx.functionalize(net, output=1.5)
    fn, params = tx.functionalize(nn.Sequential(nn.Linear(4, 3)))
    tuple_fn = lambda p, x: (fn(p, x), 1.0)  # noqa: E731
    with pytest.raises(ValueError, match=r"saliency: expected model output of shape \[B, classes\].*got tuple.*output="):
        tx.saliency(tuple_fn, params, torch.randn(2, 4), 0)


def test_dict_x_needs_exactly_one_float_entry_without_layer():
    net = TwoHeads().eval()
    fn, params = tx.functionalize(net)
    with pytest.raises(ValueError, match="saliency: expected a dict x with exactly one floating-point entry.*layer="):
        tx.saliency(fn, params, {"pixels": torch.randn(2, 4), "scale": torch.randn(2)}, 0)
    with pytest.raises(ValueError, match="saliency: expected every tensor of x with the same batch size"):
        tx.saliency(fn, params, {"pixels": torch.randn(2, 4), "scale": torch.ones(3)}, 0)


def test_integer_x_without_layer_names_layer():
    model, layer = _bert()
    fn, params = tx.functionalize(model)
    for method in (tx.saliency, tx.input_x_gradient, tx.integrated_gradients):
        with pytest.raises(TypeError, match=f"{method.__name__}: expected x of a floating-point dtype.*layer="):
            method(fn, params, _tokens()["input_ids"], 1)


def test_layer_saliency_and_gradient_x_activation_equal_captum_on_bert():
    model, layer = _bert()
    fn, params = tx.functionalize(model)
    x = _tokens()
    module = model.get_submodule(layer)

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits
    ours = tx.input_x_gradient(fn, params, x, 2, layer=layer)
    ref = captum_attr.LayerGradientXActivation(forward, module).attribute(
        x["input_ids"], target=2, additional_forward_args=(x["attention_mask"],))
    assert ours.shape == (2, 7, 32)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
    grads = tx.saliency(fn, params, x, 2, layer=module)                      # the module object works too
    ref_g = captum_attr.LayerGradientXActivation(forward, module, multiply_by_inputs=False).attribute(
        x["input_ids"], target=2, additional_forward_args=(x["attention_mask"],))
    assert (grads - ref_g).abs().max() <= 1e-5 * ref_g.abs().max()


@pytest.mark.parametrize("distil", [False, True])
def test_layer_integrated_gradients_equal_captum_and_complete(distil):
    model, layer = _bert(distil=distil)
    fn, params = tx.functionalize(model)
    x = _tokens()
    reference_ids = torch.zeros_like(x["input_ids"])

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits
    ours = tx.integrated_gradients(fn, params, x, torch.tensor([0, 2]), layer=layer, steps=20,
                                   baseline={"input_ids": reference_ids})
    ref = captum_attr.LayerIntegratedGradients(forward, model.get_submodule(layer)).attribute(
        x["input_ids"], baselines=reference_ids, target=torch.tensor([0, 2]),
        additional_forward_args=(x["attention_mask"],), n_steps=20)
    assert ours.shape == ref.shape == (2, 7, 32)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    # the number 0 is the same baseline for the first entry; chunks do not change the map
    chunked = tx.integrated_gradients(fn, params, x, torch.tensor([0, 2]), layer=layer, steps=20, batch_size=6)
    torch.testing.assert_close(chunked, ours, rtol=1e-5, atol=1e-7)
    if distil:  # DistilBERT's head has a ReLU: its kink slows the quadrature's convergence
        return
    # completeness at the layer, in float64 where the quadrature error is all that is left
    model = model.double()
    fn, params = tx.functionalize(model)
    full = tx.integrated_gradients(fn, params, x, torch.tensor([0, 2]), layer=layer, steps=64)
    with torch.no_grad():
        out = forward(x["input_ids"], x["attention_mask"])
        out0 = forward(reference_ids, x["attention_mask"])
    gap = out[[0, 1], [0, 2]] - out0[[0, 1], [0, 2]]
    assert (full.sum((1, 2)) - gap).abs().max() <= 1e-6 * gap.abs().max()


def test_integrated_gradients_callable_target_on_model_output():
    model, layer = _bert()
    fn, params = tx.functionalize(model)
    x = _tokens()
    by_callable = tx.integrated_gradients(fn, params, x, lambda out: out.logits[:, 1], layer=layer, steps=6,
                                          batch_size=4)
    by_index = tx.integrated_gradients(fn, params, x, 1, layer=layer, steps=6)
    torch.testing.assert_close(by_callable, by_index, rtol=1e-5, atol=1e-8)


def test_integer_baseline_rules():
    model, layer = _bert()
    fn, params = tx.functionalize(model)
    ids = _tokens()["input_ids"]
    with pytest.raises(TypeError, match=r"integrated_gradients: expected baseline of an integer dtype"):
        tx.integrated_gradients(fn, params, ids, 1, layer=layer, baseline=torch.zeros(7))
    with pytest.raises(ValueError, match=r"integrated_gradients: expected baseline, a whole number"):
        tx.integrated_gradients(fn, params, ids, 1, layer=layer, baseline=0.5)
    with pytest.raises(ValueError, match=r"integrated_gradients: unknown baseline entry 'ids'"):
        tx.integrated_gradients(fn, params, _tokens(), 1, layer=layer, baseline={"ids": 0})
    shared = tx.integrated_gradients(fn, params, ids, 1, layer=layer, steps=4, baseline=torch.full((7,), 5))
    full = tx.integrated_gradients(fn, params, ids, 1, layer=layer, steps=4, baseline=torch.full((2, 7), 5))
    torch.testing.assert_close(shared, full, rtol=0, atol=0)


def test_split_output_keeps_model_output_type():
    out = transformers.modeling_outputs.SequenceClassifierOutput(logits=torch.arange(12.).view(6, 2))
    pieces = _inputs.split_output(out, 2)
    assert len(pieces) == 3 and all(type(p) is type(out) for p in pieces)
    torch.testing.assert_close(pieces[1].logits, out.logits[2:4])
    pairs = _inputs.split_output((torch.arange(4), None, {"a": torch.ones(4, 2)}), 2)
    assert len(pairs) == 2 and pairs[1][1] is None and pairs[1][2]["a"].shape == (2, 2)


# --------------------------------------------------------------------------------------------
# Every chunked method on structured outputs and dict inputs (a HuggingFace ViT from a config).

def _vit(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3)
    return transformers.ViTForImageClassification(cfg).eval()


def _seeded(**options):
    """Options with a fresh seeded generator where the method draws."""
    return {k: (torch.Generator().manual_seed(3) if k == "generator" else v) for k, v in options.items()}


VIT_METHODS = {
    "occlusion": (tx.occlusion, {"window": (3, 8, 8), "stride": 8, "batch_size": 6}),
    "rise": (tx.rise, {"num_masks": 12, "cell_size": 4, "batch_size": 8, "generator": None}),
    "integrated_gradients": (tx.integrated_gradients, {"steps": 5, "batch_size": 4}),
    "gradient_shap": (tx.gradient_shap, {"baselines": torch.zeros(3, 3, 32, 32), "samples": 3, "stdev": 0.1,
                                         "batch_size": 4, "generator": None}),
    "smoothgrad": (lambda *a, generator, **o: tx.smooth(tx.saliency, samples=3, generator=generator,
                                                        batch_size=4)(*a, **o), {"generator": None}),
}


@pytest.mark.parametrize("name", VIT_METHODS)
def test_vit_dict_input_and_model_output_equal_the_plain_tensor(name):
    """A ViT returns a ModelOutput; {"pixel_values": x} gives the map of x itself, for every chunking."""
    method, options = VIT_METHODS[name]
    fn, params = tx.functionalize(_vit())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 2])
    plain = method(fn, params, x, target, **_seeded(**options))
    named = method(fn, params, {"pixel_values": x}, target, **_seeded(**options))
    assert plain.shape[0] == 2 and plain.abs().sum() > 0
    torch.testing.assert_close(named, plain, rtol=0, atol=0)
    # a callable target on the raw ModelOutput sees one chunk's examples at a time, in x's order
    pick = (lambda out: out.logits.softmax(1)[:, 0]) if name == "rise" else (lambda out: out.logits[:, 0])
    picked = method(fn, params, {"pixel_values": x}, pick, **_seeded(**options))   # RISE: a callable is the score
    by_index = method(fn, params, x, 0, **_seeded(**options))
    torch.testing.assert_close(picked, by_index, rtol=1e-5, atol=1e-7)


class Scaled(nn.Module):
    """``logits = W (pixels * scale)``: a dict input whose integer entry changes every example's map."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 3)

    def forward(self, pixels, scale):
        return {"logits": self.lin(pixels.flatten(1) * scale[:, None]), "hidden": pixels}


@pytest.mark.parametrize("name", ["occlusion", "integrated_gradients", "smoothgrad", "gradient_shap"])
def test_other_dict_entries_follow_their_example_through_chunks(name):
    """Per-example integer entries must travel with their rows: one example at a time gives the same map."""
    torch.manual_seed(0)
    net = Scaled().double().eval()
    fn, params = tx.functionalize(net)
    x = {"pixels": torch.randn(3, 1, 3, 4, dtype=torch.float64), "scale": torch.tensor([1, -2, 3])}
    # batch_size 2 < B = 3: the examples are split into chunks [0, 1] and [2]
    options = {"occlusion": (tx.occlusion, {"window": (1, 2, 2), "batch_size": 2}),
               "integrated_gradients": (tx.integrated_gradients, {"steps": 3, "batch_size": 2}),
               "smoothgrad": (lambda *a, generator, **o: tx.smooth(tx.saliency, samples=3, generator=generator,
                                                                   batch_size=2)(*a, **o), {"generator": None}),
               "gradient_shap": (tx.gradient_shap, {"baselines": torch.zeros(2, 1, 3, 4, dtype=torch.float64),
                                                    "samples": 2, "batch_size": 2, "generator": None})}[name]
    method, kw = options
    target = torch.tensor([2, 0, 1])
    whole = method(fn, params, x, target, **_seeded(**kw))
    single = torch.cat([method(fn, params, _inputs.take(x, i, i + 1), target[i:i + 1], **_seeded(**kw))
                        for i in range(3)])
    torch.testing.assert_close(whole, single)
    # and the closed form of the linear model where it is exact: the gradient is W[c] * scale
    w = net.lin.weight.detach()[target].view(3, 1, 3, 4) * x["scale"].view(3, 1, 1, 1)
    if name == "smoothgrad":
        torch.testing.assert_close(whole, w.expand_as(whole))
    elif name == "integrated_gradients":
        torch.testing.assert_close(whole, x["pixels"] * w)


def test_occlusion_callable_target_receives_blocks_in_x_order():
    torch.manual_seed(0)
    net = Scaled().double().eval()
    fn, params = tx.functionalize(net)
    x = {"pixels": torch.randn(3, 1, 3, 4, dtype=torch.float64), "scale": torch.tensor([1, -2, 3])}
    labels = torch.tensor([2, 0, 1])
    seen = []

    def per_example(out):
        seen.append(out["logits"].shape[0])
        return out["logits"].gather(1, labels[:, None]).squeeze(1)
    by_callable = tx.occlusion(fn, params, x, per_example, window=(1, 2, 2), batch_size=7)
    assert set(seen) == {3}                                        # every call: the 3 examples, in order
    torch.testing.assert_close(by_callable, tx.occlusion(fn, params, x, labels, window=(1, 2, 2), batch_size=7))


# --------------------------------------------------------------------------------------------
# smooth with layer= on token ids: SmoothGrad on the embeddings.

def test_smooth_on_token_ids_noises_the_layer_output_like_an_explicit_loop():
    model, layer = _bert()
    fn, params = tx.functionalize(model)
    x = _tokens()
    module = model.get_submodule(layer)
    got = tx.smooth(tx.saliency, samples=3, stdev=0.1, generator=torch.Generator().manual_seed(4))(
        fn, params, x, torch.tensor([0, 2]), layer=layer)
    # the oracle: the same draws (one [T, D] normal per sample, scaled per example by 0.1 * range of the
    # clean embeddings), added by a hook, and the gradient of the chosen logits w.r.t. the noisy output
    with torch.no_grad():
        _, clean = tx.capture(fn, params, x, layer)
    sigma = 0.1 * (clean.flatten(1).amax(1) - clean.flatten(1).amin(1)).view(2, 1, 1)
    g = torch.Generator().manual_seed(4)
    expected = 0
    for _ in range(3):
        eps = sigma * torch.randn(clean.shape[1:], generator=g)
        seen = {}

        def hook(mod, args, out, eps=eps):
            seen["a"] = out + eps
            return seen["a"]
        handle = module.register_forward_hook(hook)
        try:
            logits = model(**x).logits
        finally:
            handle.remove()
        expected = expected + torch.autograd.grad(logits[[0, 1], [0, 2]].sum(), seen["a"])[0] / 3
    assert got.shape == (2, 7, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got, tx.saliency(fn, params, x, torch.tensor([0, 2]), layer=layer))
    # integrated gradients at the layer run under the same noise too, and chunks change nothing
    smoothed_ig = tx.smooth(tx.integrated_gradients, samples=2, generator=torch.Generator().manual_seed(4))
    a = smoothed_ig(fn, params, x, 1, layer=layer, steps=4)
    b = tx.smooth(tx.integrated_gradients, samples=2, generator=torch.Generator().manual_seed(4), batch_size=1)(
        fn, params, x, 1, layer=layer, steps=4)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="smooth: expected layer 'bert.embeddings' to output .*batch_size"):
        smoothed_ig(fn, params, x, 1, layer=layer, steps=4, batch_size=1)
    with pytest.raises(ValueError, match="smooth: expected one layer for integer x"):
        tx.smooth(tx.saliency)(fn, params, x, 1, layer=[layer, "bert.encoder"])
    assert all(not m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------------------------
# gradient_shap: closed forms, completeness in expectation, captum with the same draws.

class Affine(nn.Module):
    def __init__(self, inputs=6, hidden=5, classes=3, act=nn.Tanh):
        super().__init__()
        self.first = nn.Linear(inputs, hidden)
        self.act = act()
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.act(self.first(x)))


def test_gradient_shap_on_a_linear_model_is_x_minus_the_drawn_baselines_times_w():
    torch.manual_seed(0)
    net = nn.Linear(6, 3).double()
    fn, params = tx.functionalize(net)
    x = torch.randn(4, 6, dtype=torch.float64)
    w = net.weight.detach()[torch.tensor([0, 1, 2, 1])]
    one = torch.randn(1, 6, dtype=torch.float64)
    got = tx.gradient_shap(fn, params, x, torch.tensor([0, 1, 2, 1]), baselines=one, samples=7,
                           generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, (x - one) * w)                    # one baseline, no noise: exact
    many = torch.randn(5, 6, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    got = tx.gradient_shap(fn, params, x, torch.tensor([0, 1, 2, 1]), baselines=many, samples=6, stdev=0.3,
                           generator=g, batch_size=8)
    g = torch.Generator().manual_seed(2)                              # the documented order of the draws
    drawn, eps = [], []
    for _ in range(6):
        drawn.append(int(torch.randint(5, (), generator=g)))
        torch.rand((), generator=g, dtype=torch.float64)
        eps.append(torch.randn(6, generator=g, dtype=torch.float64))
    mean_b = many[drawn].mean(0)
    torch.testing.assert_close(got, (x + 0.3 * torch.stack(eps).mean(0) - mean_b) * w)
    # and all draws of a large sample: (x - mean baseline) * w within sampling error
    big = tx.gradient_shap(fn, params, x, 0, baselines=many, samples=4000, generator=torch.Generator().manual_seed(3),
                           batch_size=4 * 4000)
    assert (big - (x - many.mean(0)) * net.weight.detach()[0]).abs().max() < 0.1


def test_gradient_shap_is_complete_in_expectation():
    torch.manual_seed(0)
    net = Affine().double().eval()
    fn, params = tx.functionalize(net)
    x = torch.randn(2, 6, dtype=torch.float64)
    baselines = 0.3 * torch.randn(4, 6, dtype=torch.float64)
    samples = 6000
    attr = tx.gradient_shap(fn, params, x, 1, baselines=baselines, samples=samples,
                            generator=torch.Generator().manual_seed(0), batch_size=2 * 2000)
    with torch.no_grad():
        gap = net(x)[:, 1] - net(baselines)[:, 1].mean()
    # the per-draw sums have a spread of about |gap|; the mean of 6000 draws is within a few percent
    assert (attr.sum(1) - gap).abs().max() < 0.05 * gap.abs().max()
    assert torch.equal(attr, tx.gradient_shap(fn, params, x, 1, baselines=baselines, samples=samples,
                                              generator=torch.Generator().manual_seed(0), batch_size=2 * 2000))


def _captum_draws(seed, batch, samples, count, shape, stdev):
    """captum's GradientShap draws for one partition: baseline rows (numpy choice), noise (torch.normal),
    path points (numpy uniform), rows ordered example-major (example b, draw s at b * samples + s)."""
    import numpy as np
    np.random.seed(seed)
    torch.manual_seed(seed)
    rows = np.random.choice(count, samples * batch).tolist()
    noise = torch.normal(0, torch.tensor(stdev).repeat((batch * samples,) + tuple(shape)))
    alpha = torch.tensor(np.random.uniform(0.0, 1.0, batch * samples), dtype=torch.float32)
    as_grid = lambda t: t.view(batch, samples, *t.shape[1:]).transpose(0, 1)   # noqa: E731  [S, B, ...]
    return as_grid(torch.tensor(rows)), as_grid(alpha), as_grid(noise)


@pytest.mark.parametrize("on_layer", [False, True])
def test_gradient_shap_equals_captum_with_the_same_draws(on_layer):
    from torchex_fn.methods import path
    torch.manual_seed(0)
    net = Affine().eval()
    fn, params = tx.functionalize(net)
    x = torch.randn(3, 6)
    baselines = torch.randn(4, 6)
    target = torch.tensor([0, 2, 1])
    samples, stdev = 5, 0.2
    rows, alpha, noise = _captum_draws(11, 3, samples, 4, (6,), stdev)
    # captum with the same seeds makes the same draws
    import numpy as np
    np.random.seed(11)
    torch.manual_seed(11)
    if on_layer:    # the first layer is affine in the input: input- and layer-space paths agree
        ref = captum_attr.LayerGradientShap(net, net.first).attribute(
            x, baselines, n_samples=samples, stdevs=stdev, target=target)
    else:
        ref = captum_attr.GradientShap(net).attribute(x, baselines, n_samples=samples, stdevs=stdev, target=target)

    def draw(k, batch, state={"at": 0}):
        s = state["at"]
        state["at"] += k
        return rows[s:s + k], alpha[s:s + k], {"input": noise[s:s + k]}
    names = ["first"] if on_layer else None
    ours = path._gradient_shap("gradient_shap", fn, params, x, target, {None: baselines}, None, x, names,
                               "first" if on_layer else None, samples, 1.0, 6, draw, {"input": ((6,), x.dtype)})
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_gradient_shap_on_token_ids_at_the_embeddings():
    model, layer = _bert()
    fn, params = tx.functionalize(model)
    x = _tokens()
    pad = torch.zeros(1, 7, dtype=torch.long)
    # one baseline, no noise: the Monte Carlo version of layer integrated gradients (same expectation)
    mc = tx.gradient_shap(fn, params, x, torch.tensor([0, 2]), baselines={"input_ids": pad}, samples=400,
                          generator=torch.Generator().manual_seed(0), batch_size=2 * 200, layer=layer)
    ig = tx.integrated_gradients(fn, params, x, torch.tensor([0, 2]), layer=layer, steps=20,
                                 baseline={"input_ids": pad})
    assert mc.shape == ig.shape == (2, 7, 32)
    gap = ig.sum((1, 2))
    assert (mc.sum((1, 2)) - gap).abs().max() < 0.1 * gap.abs().max()
    noisy = tx.gradient_shap(fn, params, x["input_ids"], 1, baselines=pad, samples=2, stdev=0.05, layer=layer,
                             generator=torch.Generator().manual_seed(0))
    assert noisy.shape == (2, 7, 32)
    with pytest.raises(TypeError, match=r"gradient_shap: expected baselines of an integer \(reference token ids\)"):
        tx.gradient_shap(fn, params, x["input_ids"], 1, baselines=torch.zeros(1, 7), layer=layer)
    with pytest.raises(ValueError, match=r"gradient_shap: expected baselines of shape \[N, 7\]"):
        tx.gradient_shap(fn, params, x["input_ids"], 1, baselines=pad[0], layer=layer)
    with pytest.raises(TypeError, match="gradient_shap: expected x of a floating-point dtype.*layer="):
        tx.gradient_shap(fn, params, x["input_ids"], 1, baselines=pad)


def test_causal_lm_output_with_a_cache_works_with_layer_methods():
    """GPT-2 returns a DynamicCache beside its logits: it must not reach torch.func's auxiliary outputs."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    fn, params = tx.functionalize(model, output=lambda out: out.logits[:, -1])
    ids = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    without_cache = {"input_ids": ids, "use_cache": False}
    for method in (tx.saliency, tx.input_x_gradient):
        torch.testing.assert_close(method(fn, params, ids, 3, layer="transformer.wte"),
                                   method(fn, params, without_cache, 3, layer="transformer.wte"), rtol=0, atol=0)


def test_cam_family_on_token_states_and_dict_images():
    """Token ids: the map lives on the tokens ([B, 1, T]); a dict with pixel_values resizes to the image."""
    model, _ = _bert()
    fn, params = tx.functionalize(model)
    x = _tokens()
    layer = "bert.encoder.layer.1"
    ours = tx.grad_cam(fn, params, x, 2, layer=layer, reshape=tx.postprocess.channels_last_to_first, upsample=False)
    res = tx.layer_gradients(fn, params, x, 2, layers=[layer])
    act, grad = res.acts[layer], res.grads[layer]                    # [B, T, D]
    expected = torch.relu((grad.mean(1, keepdim=True) * act).sum(2))[:, None]
    torch.testing.assert_close(ours, expected)
    with pytest.raises(ValueError, match="grad_cam: expected reshape= for layer 'bert.encoder.layer.1'"):
        tx.grad_cam(fn, params, x, 2, layer=layer)
    with pytest.raises(ValueError, match="grad_cam: expected an image x to upsample.*upsample=False"):
        tx.grad_cam(fn, params, x, 2, layer=layer, reshape=tx.postprocess.channels_last_to_first)
    with pytest.raises(TypeError, match="score_cam: expected x, a floating-point tensor"):
        tx.score_cam(fn, params, x, 2, layer=layer)
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=8, num_labels=3, num_hidden_layers=1, num_attention_heads=2, hidden_size=16,
        intermediate_size=32)).eval()
    vfn, vparams = tx.functionalize(vit)
    pixels = torch.randn(2, 3, 16, 16)
    grid = tx.postprocess.tokens_to_grid(prefix_tokens=1)
    by_dict = tx.grad_cam(vfn, vparams, {"pixel_values": pixels}, 1, layer="vit.layers.0", reshape=grid)
    by_tensor = tx.grad_cam(vfn, vparams, pixels, 1, layer="vit.layers.0", reshape=grid)
    assert by_dict.shape == (2, 1, 16, 16)
    torch.testing.assert_close(by_dict, by_tensor, rtol=0, atol=0)


class _EmbedMLP(nn.Module):
    """Token ids -> embedding -> Linear -> ReLU -> Linear, summed over tokens: captum's DeepLift rules
    (Rescale on the ReLU module, every other op linear) are DeepLIFT's own here."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.l1 = nn.Linear(6, 8)
        self.act = nn.ReLU()
        self.l2 = nn.Linear(8, 3)

    def forward(self, ids):
        return self.l2(self.act(self.l1(self.emb(ids)))).sum(1)


def test_layer_deeplift_equals_captum_where_its_rules_are_deeplifts():
    torch.manual_seed(0)
    net = _EmbedMLP().eval()
    fn, params = tx.functionalize(net)
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(1))
    reference_ids = torch.full_like(ids, 4)
    ours = tx.deeplift(fn, params, ids, torch.tensor([0, 1, 2]), layer="emb", baseline=reference_ids)
    ref = captum_attr.LayerDeepLift(net, net.emb).attribute(ids, baselines=reference_ids, target=torch.tensor([0, 1, 2]))
    assert ours.shape == (3, 5, 6)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert not torch.allclose(ours, tx.input_x_gradient(fn, params, ids, torch.tensor([0, 1, 2]), layer="emb")
                              - tx.input_x_gradient(fn, params, reference_ids, torch.tensor([0, 1, 2]), layer="emb"))


@pytest.mark.parametrize("distil", [False, True])
def test_layer_deeplift_is_complete_on_bert_embeddings(distil):
    """captum's LayerDeepLift treats LayerNorm, softmax and attention products as linear on BERT, so its
    maps do not sum to f(x) - f(x0); ours do (float64, 1e-8), at the embeddings of token ids."""
    model, layer = _bert(distil=distil)
    model = model.double()
    fn, params = tx.functionalize(model)
    x = _tokens()
    reference = {"input_ids": torch.zeros_like(x["input_ids"])}
    attr = tx.deeplift(fn, params, x, torch.tensor([0, 2]), layer=layer, baseline=reference)
    assert attr.shape == (2, 7, 32)
    with torch.no_grad():
        out = fn(params, x).logits
        out0 = fn(params, {**x, **reference}).logits
    gap = out[[0, 1], [0, 2]] - out0[[0, 1], [0, 2]]
    assert (attr.sum((1, 2)) - gap).abs().max() <= 1e-8 * gap.abs().max()
    with pytest.raises(TypeError, match="deeplift: expected layer, one dotted name or module"):
        tx.deeplift(fn, params, x, 0, layer=[layer, layer])
    with pytest.raises(TypeError, match="deeplift: expected x of a floating-point dtype.*layer="):
        tx.deeplift(fn, params, x["input_ids"], 0)
