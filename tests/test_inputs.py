"""Inputs beyond one float tensor: dict inputs, token ids with ``layer=``, structured outputs."""
import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn import _inputs

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
    options = {"occlusion": (tx.occlusion, {"window": (1, 2, 2), "batch_size": 4}),
               "integrated_gradients": (tx.integrated_gradients, {"steps": 3, "batch_size": 2}),
               "smoothgrad": (VIT_METHODS["smoothgrad"][0], {"generator": None}),
               "gradient_shap": (tx.gradient_shap, {"baselines": torch.zeros(2, 1, 3, 4, dtype=torch.float64),
                                                    "samples": 2, "batch_size": 5, "generator": None})}[name]
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
