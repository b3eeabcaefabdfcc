"""What a researcher gets wrong on the first day (issue 22, items 1, 3 and 8), each answered by an error
that names the fix or by a call that just works.

1. params keys: an unknown key is an error naming the closest real key, a missing one an error unless the
   model_fn was built with ``functionalize(model, strict=False)``; full dicts ``{**params, **sub}``, tied
   names and the buffers ``params`` leaves out stay valid, also under ``vmap`` and ``torch.func.grad``.
3. a ``model_fn`` written with ``torch.func.functional_call`` asked for a layer: the message says to use
   ``tx.functionalize`` (or ``tx.tap``).
8. ``torch.func.grad(loss)(params)``, an image without its batch axis, a float64 input into a float32
   model, ``attribute_dataset`` on ``TensorDataset(X)``, a NumPy integer target.
"""
import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

import torchex_fn as tx
from support.models import TinyCNN


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 3).eval()


class _Counted(nn.Module):
    """A linear layer plus an integer buffer the forward uses (an index table) and a step counter."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("order", torch.tensor([2, 0, 1]))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.lin(x)[:, self.order]


class _Tied(nn.Module):
    """``head.weight`` is ``embed.weight``: one tensor under two names."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 3, bias=False)
        self.head = nn.Linear(4, 3, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.embed(x) + 2 * self.head(x)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3))
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


# ------------------------------------------------------------------------------------------------- 1. keys
def test_a_misspelled_key_is_an_error_naming_the_closest_real_key():
    model = TinyCNN().eval()
    fn, params = tx.functionalize(model)
    bad = {("fc.weigth" if k == "fc.weight" else k): v for k, v in params.items()}
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^saliency: unknown params key 'fc.weigth'\. Did you mean 'fc.weight'"):
        tx.saliency(fn, bad, x, 0)
    with pytest.raises(ValueError, match=r"^model_fn: unknown params key 'fc.weigth'\. Did you mean 'fc.weight'"):
        fn(bad, x)                                  # a direct call, or one through the user's own wrapper
    with pytest.raises(ValueError, match=r"^model_fn: unknown params key 'fc.weigth'"):   # inside a wrapper
        tx.grad_cam(lambda p, xx: fn(p, xx * 2), bad, x, 0, layer="features")
    extra = {**params, "fc.weight_orig": params["fc.weight"]}        # one more key than the model has
    with pytest.raises(ValueError, match=r"unknown params key 'fc.weight_orig'"):
        tx.saliency(fn, extra, x, 0)


def test_a_partial_dict_is_an_error_unless_asked_for_with_strict_false():
    model = _linear()
    fn, params = tx.functionalize(model)
    x = torch.randn(5, 4)
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"^saliency: expected params with every parameter of the model \(2 keys.*"
                                         r"got a dict without 'bias'\..*functionalize\(model, strict=False\)"):
        tx.saliency(fn, {"weight": w}, x, 0)
    with pytest.raises(ValueError, match=r"^model_fn: expected params with every parameter"):
        fn({"weight": w}, x)
    # a full dict with one entry changed is what the package and its docs pass everywhere
    torch.testing.assert_close(fn({**params, "weight": w}, x), x @ w.T + model.bias.detach(), rtol=0, atol=0)

    loose, _ = tx.functionalize(model, strict=False)          # on purpose: the bias is the module's own
    torch.testing.assert_close(loose({"weight": w}, x), x @ w.T + model.bias.detach(), rtol=0, atol=0)
    torch.testing.assert_close(tx.saliency(loose, {"weight": w}, x, 1), w[1].expand(5, 4), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"unknown params key 'weigth'\. Did you mean 'weight'"):
        loose({"weigth": w}, x)                               # unknown keys stay errors
    with pytest.raises(TypeError, match=r"functionalize: expected strict, a bool"):
        tx.functionalize(model, strict="no")


def test_the_randomised_head_sanity_check_sees_the_new_head():
    """The issue's case: a map of a model whose head is replaced must change (a silent fallback to the
    module's own head gave the same map, so the check concluded the map ignores the weights)."""
    model = TinyCNN().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8)
    head = {"fc.weight": torch.randn_like(params["fc.weight"]), "fc.bias": torch.randn_like(params["fc.bias"])}
    with pytest.raises(ValueError, match="without 'conv1.bias', 'conv1.weight', 'features.0.bias' and 1 more"):
        tx.saliency(fn, head, x, 0)
    full = {**params, **head}
    expected = torch.func.functional_call(model, full, (x,))
    torch.testing.assert_close(fn(full, x), expected, rtol=0, atol=0)
    assert not torch.allclose(tx.saliency(fn, full, x, 0), tx.saliency(fn, params, x, 0))


def test_tied_names_count_as_present_and_a_state_dict_is_accepted():
    torch.manual_seed(0)
    model = _Tied().eval()
    fn, params = tx.functionalize(model)
    assert set(params) == {"embed.weight"}
    x = torch.randn(2, 4)
    w = torch.randn(3, 4)
    expected = 3 * x @ w.T                                       # both uses of the tensor take the new value
    torch.testing.assert_close(fn({"embed.weight": w}, x), expected)
    torch.testing.assert_close(fn({"head.weight": w}, x), expected)          # the tied name alone
    torch.testing.assert_close(fn({"embed.weight": w, "head.weight": w}, x), expected)   # as state_dict() has it
    sd = model.state_dict()
    assert set(sd) == {"embed.weight", "head.weight"}
    torch.testing.assert_close(fn(dict(sd), x), model(x))
    for name, p in model.named_parameters(remove_duplicate=False):     # the user's module is untouched
        assert isinstance(p, nn.Parameter), name
    assert model.head.weight is model.embed.weight


def test_integer_and_non_persistent_buffers_may_be_left_out_and_may_be_given():
    torch.manual_seed(0)
    model = _Counted().eval()
    model.register_buffer("scale", torch.tensor(2.0), persistent=False)
    fn, params = tx.functionalize(model)
    assert set(params) == {"lin.weight", "lin.bias", "scale"}     # no integer buffer
    x = torch.randn(2, 4)
    ref = model(x)
    torch.testing.assert_close(fn(params, x), ref, rtol=0, atol=0)
    no_scale = {k: v for k, v in params.items() if k != "scale"}
    torch.testing.assert_close(fn(no_scale, x), ref, rtol=0, atol=0)    # state_dict() leaves it out too
    flipped = fn({**params, "order": torch.tensor([0, 1, 2])}, x)      # given: it is used
    torch.testing.assert_close(flipped, model.lin(x), rtol=0, atol=0)


def test_the_key_check_works_under_vmap_and_grad():
    model = _linear()
    fn, params = tx.functionalize(model)
    x = torch.randn(5, 4)
    stacked = {k: torch.stack([v, 2 * v]) for k, v in params.items()}
    maps = torch.func.vmap(lambda p: tx.saliency(fn, p, x, 1))(stacked)
    torch.testing.assert_close(maps[1], 2 * maps[0], rtol=0, atol=0)
    torch.testing.assert_close(maps[0], params["weight"][1].expand(5, 4), rtol=0, atol=0)
    bad = {"weight": stacked["weight"], "bais": stacked["bias"]}
    with pytest.raises(ValueError, match=r"^saliency: unknown params key 'bais'\. Did you mean 'bias'"):
        torch.func.vmap(lambda p: tx.saliency(fn, p, x, 1))(bad)
    with pytest.raises(ValueError, match=r"without 'bias'"):
        torch.func.grad(lambda p: fn(p, x).sum())({"weight": params["weight"]})
    g = torch.func.grad(lambda p: fn(p, x).sum())(dict(params))
    torch.testing.assert_close(g["weight"], x.sum(0).expand(3, 4))
    torch.testing.assert_close(g["bias"], torch.full((3,), 5.0))


# ------------------------------------------------------------------------------ 3. functional_call model_fn
def test_a_functional_call_model_fn_asked_for_a_layer_is_told_to_use_functionalize():
    model = TinyCNN().eval()
    _, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8)

    def own(p, xx):
        return torch.func.functional_call(model, p, (xx,))

    with pytest.raises(ValueError, match=r"^grad_cam: expected layer 'features' to be called in the forward pass, "
                                         r"got a model_fn not built by `tx.functionalize`.*"
                                         r"model_fn, params = tx\.functionalize\(model\).*tx\.tap\('features', h\)"):
        tx.grad_cam(own, params, x, 0, layer="features")
    # what the message proposes works, also wrapped in a function of one's own
    fn, _ = tx.functionalize(model)
    direct = tx.grad_cam(fn, params, x, 0, layer="features")
    wrapped = tx.grad_cam(lambda p, xx: fn(p, xx), params, x, 0, layer="features")
    torch.testing.assert_close(wrapped, direct, rtol=0, atol=0)
    # a model_fn from functionalize keeps the old hint (the layer exists but the forward does not call it)
    model.unused = nn.Conv2d(6, 6, 1)
    fn, params = tx.functionalize(model)
    with pytest.raises(ValueError, match=r"'unused' to be called.*check `model\.named_modules\(\)`"):
        tx.grad_cam(fn, params, x, 0, layer="unused")


# ----------------------------------------------------------------------------------- 8. first-day mistakes
def test_grad_over_params_works_as_written_with_an_integer_buffer():
    torch.manual_seed(0)
    model = _Counted().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 4)
    # saliency of class 0 is row order[0] = 2 of the weight: loss = B * |W[2]|^2
    g = torch.func.grad(lambda p: tx.saliency(fn, p, x, 0).square().sum())(params)
    expected = torch.zeros(3, 4)
    expected[2] = 2 * 3 * params["lin.weight"][2]
    torch.testing.assert_close(g["lin.weight"], expected)
    torch.testing.assert_close(g["lin.bias"], torch.zeros(3))
    assert set(g) == {"lin.weight", "lin.bias"}


def test_grad_over_batch_norm_statistics_names_split_params():
    model = _bn_net()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 6, 6)

    def loss(p):
        return tx.grad_cam(fn, p, x, 1, layer="2").square().sum()

    with pytest.raises(ValueError, match=r"running_mean.*`weights, buffers = tx\.split_params\(model_fn, params\)`"):
        torch.func.grad(loss)(params)
    weights, buffers = tx.split_params(fn, params)
    assert set(weights) == {n for n, _ in model.named_parameters()}
    assert set(buffers) == {"1.running_mean", "1.running_var"}
    g = torch.func.grad(lambda w: loss({**buffers, **w}))(weights)

    def reference(w):   # the same loss written out: Grad-CAM of the ReLU layer, by autograd on functional_call
        p = {**buffers, **w}
        acts = {}
        handle = model[2].register_forward_hook(lambda m, a, out: acts.setdefault("a", out))
        try:
            out = torch.func.functional_call(model, p, (x,))
        finally:
            handle.remove()
        a = acts["a"]
        grad = torch.autograd.grad(out[:, 1].sum(), a, create_graph=True)[0]
        cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
        return cam.square().sum()

    w = {k: v.clone().requires_grad_() for k, v in weights.items()}
    ref = dict(zip(w, torch.autograd.grad(reference(w), list(w.values()), allow_unused=True)))
    assert ref["5.bias"] is None                                 # the head's bias does not move a Grad-CAM
    for name in weights:
        expected = torch.zeros_like(weights[name]) if ref[name] is None else ref[name]
        torch.testing.assert_close(g[name], expected, rtol=1e-5, atol=1e-7)
    assert g["0.weight"].abs().sum() > 0 and g["1.weight"].abs().sum() > 0
    with pytest.raises(TypeError, match=r"split_params: expected model_fn from `functionalize\(model\)`"):
        tx.split_params(lambda p, xx: xx, params)


def test_training_mode_does_not_count_batches_in_the_users_module():
    model = _bn_net().train()
    fn, params = tx.functionalize(model)
    assert "1.num_batches_tracked" not in params
    running = model[1].running_mean.clone()
    x = torch.randn(4, 3, 6, 6) + 2.0
    out = fn(params, x)                                  # batch statistics, as the module's own forward
    assert int(model[1].num_batches_tracked) == 0 and torch.equal(model[1].running_mean, running)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)   # (this one counts: it is the module's)
    assert int(model[1].num_batches_tracked) == 1


def test_an_image_without_its_batch_axis_is_told_x_none():
    model = _bn_net()
    fn, params = tx.functionalize(model)
    image = torch.randn(3, 6, 6)
    with pytest.raises(ValueError, match=r"^model_fn \(Sequential from functionalize\): expected x with the batch "
                                         r"axis first.*shape \(3, 6, 6\).*`x\[None\]` \(shape \(1, 3, 6, 6\)\)"):
        tx.saliency(fn, params, image, 0)
    leaf = image[None].clone().requires_grad_()
    expected = torch.autograd.grad(model(leaf)[0, 0], leaf)[0]
    torch.testing.assert_close(tx.saliency(fn, params, image[None], 0), expected)   # the fix it names works
    with pytest.raises(ValueError, match=r"`x\[None\]`"):
        fn(params, torch.randn(6, 6))                         # conv2d's own wording, "Expected 3D (unbatched)"
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(16, 8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32).eval()
    vit_fn, vit_params = tx.functionalize(vit)                # `n, c, h, w = x.shape` in its forward
    with pytest.raises(ValueError, match=r"^model_fn \(VisionTransformer from functionalize\).*`x\[None\]`"):
        tx.saliency(vit_fn, vit_params, torch.randn(3, 16, 16), 0)


def test_a_float64_input_into_a_float32_model_is_told_the_conversion():
    model = _bn_net()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"expected x of the parameters' dtype torch\.float32, got a torch\.float64 "
                                        r"tensor.*`x\.to\(torch\.float32\)`"):
        tx.saliency(fn, params, x, 0)
    lin, lp = tx.functionalize(_linear())
    with pytest.raises(TypeError, match=r"`x\.to\(torch\.float32\)`, or the parameters"):
        lin(lp, torch.randn(2, 4, dtype=torch.float64))
    # the conversion it proposes for a float64 check works
    p64 = {k: v.to(torch.float64) for k, v in lp.items()}
    assert torch.autograd.gradcheck(lambda xx: lin(p64, xx), (torch.randn(2, 4, dtype=torch.float64,
                                                                           requires_grad=True),))


def test_attribute_dataset_on_inputs_only_explains_the_predicted_class(tmp_path):
    model = TinyCNN().eval()
    fn, params = tx.functionalize(model)
    torch.manual_seed(1)
    X = torch.randn(5, 3, 8, 8)
    store = tx.attribute_dataset(tx.saliency, fn, params, TensorDataset(X), out=tmp_path / "s", batch_size=2,
                                 progress=False)
    predicted = model(X).argmax(1)
    assert torch.equal(store.targets, predicted) and torch.equal(store.predictions, predicted)
    maps = torch.stack([torch.as_tensor(store.maps[i]) for i in range(len(store))])
    expected = torch.cat([tx.saliency(fn, params, X[i:i + 2], predicted[i:i + 2]) for i in (0, 2, 4)])
    torch.testing.assert_close(maps, expected, rtol=0, atol=0)     # batch by batch, as the store computes


def _smooth(*args, **options):
    return tx.smooth(tx.saliency, samples=2, generator=torch.Generator().manual_seed(0))(*args, **options)


@pytest.mark.parametrize("method, options", [
    (tx.saliency, {}), (tx.grad_cam, {"layer": "features"}), (tx.integrated_gradients, {"steps": 4}),
    (tx.deeplift, {}), (tx.occlusion, {"window": (3, 4, 4)}), (tx.feature_ablation, {}), (_smooth, {}),
    (tx.lrp, {}), (tx.attention_rollout, None),
])
def test_numpy_integer_targets_equal_torch_ones(method, options):
    torch.manual_seed(0)
    model = TinyCNN(act=nn.ReLU).eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 3, 8, 8)
    if options is None:   # a check every method shares: check_call's targets
        with pytest.raises(TypeError, match="got float64"):
            tx.saliency(fn, params, x, np.float64(1.0))
        return
    labels = np.array([4, 0, 2], dtype=np.int64)
    by_array = method(fn, params, x, labels, **options)
    by_tensor = method(fn, params, x, torch.from_numpy(labels), **options)
    torch.testing.assert_close(by_array, by_tensor, rtol=0, atol=0)
    by_scalar = method(fn, params, x, labels[0], **options)          # numpy.int64: "got int64" before
    torch.testing.assert_close(by_scalar, method(fn, params, x, 4, **options), rtol=0, atol=0)
    with pytest.raises(TypeError, match="target of an integer dtype"):
        method(fn, params, x, np.array([0.5, 1.0, 2.0]), **options)
