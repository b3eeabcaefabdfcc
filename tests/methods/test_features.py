"""Feature family: parity with captum (FeatureAblation, ShapleyValues, ShapleyValueSampling, KernelShap,
Lime), closed forms on hand-weighted models, sampling error, determinism, chunking, gradients, errors, masks."""
import itertools
import math

import pytest
import torch
from torch import nn

import torchex_fn as tx
from support.models import TinyCNN

captum_attr = pytest.importorskip("captum.attr")

pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn(dtype=torch.float32, act=nn.ReLU):
    torch.manual_seed(0)
    model = TinyCNN(act).to(dtype).eval()
    return (model, *tx.functionalize(model))


def _mlp(dtype=torch.float32, features=6):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype).eval()
    return (model, *tx.functionalize(model))


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _gen(seed=5):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Parity with captum: feature ablation and exact Shapley values.

IMAGE_MASKS = {
    "shared": lambda b: tx.masks.grid((8, 8), 4),                              # 4 cells for all images
    "shared_channels": lambda b: tx.masks.grid((3, 8, 8), (2, 8, 4)),          # 4 features: channels x halves
    "per_example": lambda b: torch.stack([tx.masks.grid((8, 8), 4), tx.masks.grid((8, 8), (8, 4)) * 2])[:, None],
}
BASELINES = {
    "scalar": lambda x: 0.25,
    "per_example": lambda x: torch.rand_like(x),
    "shared": lambda x: torch.rand_like(x[:1]),
}


def _captum_mask(mask, x):
    return mask.reshape((1,) * (x.ndim - mask.ndim) + tuple(mask.shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_name", list(IMAGE_MASKS))
@pytest.mark.parametrize("baseline_name, target", [("scalar", 1), ("per_example", [4, 0]), ("shared", [2, 2])])
def test_feature_ablation_and_shapley_values_equal_captum_on_a_cnn(dtype, mask_name, baseline_name, target):
    model, fn, params = _cnn(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    mask = IMAGE_MASKS[mask_name](2)
    baseline = BASELINES[baseline_name](x)
    target = torch.tensor(target) if isinstance(target, list) else target
    ours = tx.feature_ablation(fn, params, x, target, feature_mask=mask, baseline=baseline, batch_size=5)
    ref = captum_attr.FeatureAblation(model).attribute(x, baselines=baseline, target=target,
                                                       feature_mask=_captum_mask(mask, x), perturbations_per_eval=3)
    assert ours.dtype == ref.dtype == dtype and ours.shape == x.shape
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours, ref, **tol)
    ours = tx.shapley_values(fn, params, x, target, feature_mask=mask, baseline=baseline, batch_size=7)
    ref = captum_attr.ShapleyValues(model).attribute(x, baselines=baseline, target=target,
                                                     feature_mask=_captum_mask(mask, x), perturbations_per_eval=8)
    # captum accumulates the K! orderings in float32 whatever the input's dtype; we sum 2^K weighted values
    # in float64: the two agree to float32 rounding of sums of terms about as large as the largest value
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.float(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask", [None, torch.tensor([0, 0, 1, 2, 2, 3]),
                                  torch.tensor([[0, 1, 1, 2, 3, 4], [0, 0, 0, 1, 1, 2], [4, 3, 2, 1, 0, 0]])])
def test_feature_ablation_and_shapley_values_equal_captum_on_tabular_data(dtype, mask):
    model, fn, params = _mlp(dtype)
    x = torch.randn(3, 6, dtype=dtype)
    baseline = x.mean(0, keepdim=True)
    target = torch.tensor([0, 2, 1])
    ours = tx.feature_ablation(fn, params, x, target, feature_mask=mask, baseline=baseline)
    ref = captum_attr.FeatureAblation(model).attribute(x, baselines=baseline, target=target, feature_mask=mask)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours, ref, **tol)
    ours = tx.shapley_values(fn, params, x, target, feature_mask=mask, baseline=baseline, batch_size=16)
    ref = captum_attr.ShapleyValues(model).attribute(x, baselines=baseline, target=target, feature_mask=mask,
                                                     perturbations_per_eval=50)
    torch.testing.assert_close(ours.float(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def _shapley_by_orderings(fn, params, x, target, mask, baseline):
    """float64 oracle: the mean over all K! orderings of each feature's marginal gain (one example)."""
    ids = mask.unique().tolist()
    total = torch.zeros(len(ids), dtype=torch.float64)

    def value(present):
        keep = torch.zeros_like(x, dtype=torch.bool)
        for k in present:
            keep |= (mask == ids[k]).expand_as(x)
        return fn(params, torch.where(keep, x, baseline))[0, target]
    for order in itertools.permutations(range(len(ids))):
        before = value([])
        for j, k in enumerate(order):
            after = value(order[:j + 1])
            total[k] += after - before
            before = after
    phi = total / math.factorial(len(ids))
    return phi[torch.searchsorted(torch.tensor(ids), mask.expand_as(x).contiguous())]


def test_shapley_values_float64_equal_the_mean_over_orderings():
    _, fn, params = _cnn(torch.float64, nn.Tanh)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    mask = tx.masks.grid((8, 8), (4, 3)) * 7 - 5                                 # 6 ids, not contiguous
    mask = torch.where(mask > 10, 9, mask)                                      # 5: two cells merged
    ours = tx.shapley_values(fn, params, x, 3, feature_mask=mask, baseline=0.1)
    torch.testing.assert_close(ours, _shapley_by_orderings(fn, params, x, 3, mask, 0.1), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Parity with captum's sampling methods, draw for draw.

@pytest.mark.parametrize("per_example", [False, True])
def test_shapley_value_sampling_equals_captum_with_the_same_seed(per_example):
    model, fn, params = _cnn()
    x = torch.randn(2, 3, 8, 8)
    mask = IMAGE_MASKS["per_example" if per_example else "shared_channels"](2)
    ours = tx.shapley_value_sampling(fn, params, x, torch.tensor([1, 3]), feature_mask=mask, baseline=0.2,
                                     samples=6, generator=_gen(5), batch_size=9)
    torch.manual_seed(5)
    ref = captum_attr.ShapleyValueSampling(model).attribute(x, baselines=0.2, target=torch.tensor([1, 3]),
                                                            feature_mask=_captum_mask(mask, x), n_samples=6)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("method", ["kernel_shap", "lime", "lime_ridge", "lime_euclidean"])
def test_kernel_shap_and_lime_equal_captum_with_the_same_draws(method):
    from captum._utils.models.linear_model import SkLearnLinearRegression, SkLearnRidge
    from captum.attr._core.lime import get_exp_kernel_similarity_function
    pytest.importorskip("sklearn")
    model, fn, params = _cnn()
    x = torch.randn(2, 3, 8, 8)
    mask = tx.masks.grid((8, 8), (4, 2))                                        # 8 features
    target = torch.tensor([1, 3])
    if method == "kernel_shap":
        ours = tx.kernel_shap(fn, params, x, target, feature_mask=mask, samples=40, generator=_gen(3), batch_size=16)
        explainer = captum_attr.KernelShap(model)
    else:
        options = {"lime": {}, "lime_ridge": dict(regression="ridge", alpha=0.5),
                   "lime_euclidean": dict(distance="euclidean", kernel_width=3.0)}[method]
        ours = tx.lime(fn, params, x, target, feature_mask=mask, samples=40, generator=_gen(3), **options)
        explainer = captum_attr.Lime(
            model, interpretable_model=SkLearnRidge(alpha=0.5) if method == "lime_ridge" else SkLearnLinearRegression(),
            similarity_func=get_exp_kernel_similarity_function(options.get("distance", "cosine"),
                                                                options.get("kernel_width", 1.0)))
    # captum fits one example at a time with draws continuing from the global generator, and so do we
    # (a batch in one captum call is the same loop: tests/methods/test_draws.py)
    torch.manual_seed(3)
    ref = torch.cat([explainer.attribute(x[i:i + 1], target=target[i:i + 1], feature_mask=mask[None, None],
                                         n_samples=40) for i in range(2)])
    # captum solves in float32 (sklearn on float32 arrays; 1e6 weights for Kernel SHAP), we in float64
    torch.testing.assert_close(ours, ref, rtol=2e-5, atol=2e-5 * float(ref.abs().max()))


def test_kernel_shap_converges_to_the_exact_shapley_values():
    """5 features of a nonlinear tabular model: the error shrinks like 1/sqrt(samples)."""
    _, fn, params = _mlp(torch.float64, features=5)
    x = torch.randn(4, 5, dtype=torch.float64)
    exact = tx.shapley_values(fn, params, x, 0, baseline=0.0)
    errors = []
    for samples in (100, 3000):
        estimate = tx.kernel_shap(fn, params, x, 0, samples=samples, generator=_gen(0), batch_size=512)
        errors.append(_rel(estimate, exact))
    # measured: 0.031 at 100 and 0.0068 at 3000 (relative to the largest |phi|)
    assert errors[1] < 0.015 and errors[1] < errors[0]
    sampled = tx.shapley_value_sampling(fn, params, x, 0, samples=400, generator=_gen(0), batch_size=512)
    assert _rel(sampled, exact) < 0.03                                          # measured: 0.0095


# ---------------------------------------------------------------------------------------------
# Closed forms on hand-weighted models.

def _additive(params, x):
    """``out[:, 0] = sum_k tanh(sum_{i in k} w_i x_i)`` over the features k of a fixed 4-group mask of 8 inputs."""
    parts = (params["w"] * x).reshape(x.shape[0], 4, 2).sum(-1)
    return torch.tanh(parts).sum(1, keepdim=True)


ADDITIVE_MASK = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def test_additive_model_every_method_gives_each_feature_its_own_contribution():
    w = torch.randn(8, dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64)
    base = torch.randn(1, 8, dtype=torch.float64)
    contribution = (torch.tanh((w * x).reshape(3, 4, 2).sum(-1)) - torch.tanh((w * base).reshape(1, 4, 2).sum(-1)))
    expected = contribution.repeat_interleave(2, dim=1)                         # [3, 8]
    params = {"w": w}
    options = dict(feature_mask=ADDITIVE_MASK, baseline=base)
    for method in (tx.feature_ablation, tx.shapley_values):
        torch.testing.assert_close(method(_additive, params, x, 0, **options), expected, rtol=1e-12, atol=1e-13)
    # every ordering gives every feature its contribution, and the regression fits an additive game exactly
    torch.testing.assert_close(tx.shapley_value_sampling(_additive, params, x, 0, samples=1, generator=_gen(), **options),
                               expected, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(tx.kernel_shap(_additive, params, x, 0, samples=12, generator=_gen(), **options),
                               expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(tx.lime(_additive, params, x, 0, samples=12, generator=_gen(), **options),
                               expected, rtol=1e-9, atol=1e-10)


def test_linear_model_lime_recovers_weights_times_input_minus_baseline():
    """LIME on ``w . x``: the perturbed scores are linear in z, so any weighting fits them exactly."""
    w = torch.randn(1, 3, 4, 4, dtype=torch.float64)

    def linear(params, x):
        return (params["w"] * x).flatten(1).sum(1, keepdim=True)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    mask = tx.masks.grid((4, 4), 2)
    attr = tx.lime(linear, {"w": w}, x, 0, feature_mask=mask, baseline=0.5, samples=50, generator=_gen())
    per_feature = (w * (x - 0.5)).reshape(2, 3, 2, 2, 2, 2).sum((1, 3, 5))        # [2, 2, 2] cells
    expected = per_feature.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None].expand_as(x)
    torch.testing.assert_close(attr, expected, rtol=1e-9, atol=1e-10)


def test_interaction_is_split_by_shapley_and_counted_twice_by_ablation():
    """``f = x_0 x_1`` with baseline 0: Shapley gives x_0 x_1 / 2 to each, ablation x_0 x_1 to each."""
    def product(params, x):
        return (x[:, :1] * x[:, 1:2]) * params["scale"]
    x = torch.tensor([[2.0, 3.0], [-1.0, 0.5]], dtype=torch.float64)
    params = {"scale": torch.tensor(1.0, dtype=torch.float64)}
    prod = (x[:, 0] * x[:, 1])[:, None].expand(2, 2)
    torch.testing.assert_close(tx.shapley_values(product, params, x, 0), prod / 2)
    torch.testing.assert_close(tx.feature_ablation(product, params, x, 0), prod)


def test_shapley_values_add_up_to_the_score_difference():
    _, fn, params = _cnn(torch.float64, nn.Tanh)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    mask = tx.masks.grid((8, 8), 4)
    phi = tx.shapley_values(fn, params, x, 2, feature_mask=mask, baseline=-0.3)
    per_feature = phi[:, 0, ::4, ::4].flatten(1)                                 # one element per feature
    gap = fn(params, x)[:, 2] - fn(params, torch.full_like(x, -0.3))[:, 2]
    torch.testing.assert_close(per_feature.sum(1), gap, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# Seeds, chunking, targets, masks and batches.

SAMPLED = {
    "shapley_value_sampling": (tx.shapley_value_sampling, dict(samples=3)),
    "kernel_shap": (tx.kernel_shap, dict(samples=20)),
    "lime": (tx.lime, dict(samples=20)),
}


@pytest.mark.parametrize("name", SAMPLED)
def test_same_seed_is_bit_identical_and_chunking_does_not_change_the_result(name):
    method, options = SAMPLED[name]
    _, fn, params = _cnn()
    x = torch.randn(3, 3, 8, 8)
    mask = tx.masks.grid((8, 8), (4, 2))
    first = method(fn, params, x, 1, feature_mask=mask, generator=_gen(1), **options)
    assert torch.equal(first, method(fn, params, x, 1, feature_mask=mask, generator=_gen(1), **options))
    assert not torch.equal(first, method(fn, params, x, 1, feature_mask=mask, generator=_gen(2), **options))
    for batch_size in (1, 2, 7, 200):
        torch.testing.assert_close(method(fn, params, x, 1, feature_mask=mask, generator=_gen(1),
                                          batch_size=batch_size, **options), first, rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)
    draws = method(fn, params, x, 1, feature_mask=mask, **options)               # the global generator
    torch.manual_seed(1)
    assert torch.equal(draws, method(fn, params, x, 1, feature_mask=mask, **options))


@pytest.mark.parametrize("method", [tx.feature_ablation, tx.shapley_values])
def test_chunking_targets_and_relabelled_ids(method):
    _, fn, params = _cnn()
    x = torch.randn(3, 3, 8, 8)
    mask = tx.masks.grid((8, 8), 4)
    base = method(fn, params, x, None, feature_mask=mask, batch_size=64)
    for batch_size in (1, 2, 5):
        torch.testing.assert_close(method(fn, params, x, None, feature_mask=mask, batch_size=batch_size), base)
    predicted = fn(params, x).argmax(1)
    torch.testing.assert_close(method(fn, params, x, predicted, feature_mask=mask), base)
    torch.testing.assert_close(method(fn, params, x, lambda out: out[:, 2], feature_mask=mask),
                               method(fn, params, x, 2, feature_mask=mask))
    torch.testing.assert_close(method(fn, params, x, None, feature_mask=mask * 10 - 3), base)


def test_per_example_masks_equal_calls_one_example_at_a_time():
    _, fn, params = _cnn()
    x = torch.randn(2, 3, 8, 8)
    masks = torch.stack([tx.masks.grid((8, 8), 4), tx.masks.grid((8, 8), (8, 2)) + 100])[:, None]   # disjoint ids
    for method in (tx.feature_ablation, tx.shapley_values):
        whole = method(fn, params, x, 1, feature_mask=masks)
        single = torch.cat([method(fn, params, x[i:i + 1], 1, feature_mask=masks[i]) for i in range(2)])
        torch.testing.assert_close(whole, single)


def test_dict_input_perturbs_its_floating_point_entry():
    model, fn, params = _mlp()

    def keyed(params, x):
        return fn(params, x["values"]) + 0.0 * x["rows"][:, None]
    x = torch.randn(2, 6)
    inputs = {"values": x, "rows": torch.arange(2)}
    for method in (tx.feature_ablation, tx.shapley_values):
        torch.testing.assert_close(method(keyed, params, inputs, 1, batch_size=10), method(fn, params, x, 1))


# ---------------------------------------------------------------------------------------------
# Gradients w.r.t. params (plain forwards): gradcheck in float64.

@pytest.mark.parametrize("name", ["feature_ablation", "shapley_values", "shapley_value_sampling", "kernel_shap",
                                  "lime"])
def test_gradcheck_wrt_params(name):
    _, fn, params = _cnn(torch.float64, nn.Tanh)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    mask = tx.masks.grid((6, 6), 3)
    method = getattr(tx, name)
    options = {} if name in ("feature_ablation", "shapley_values") else dict(samples=8)

    def attribution(weight):
        extra = {} if not options else {"generator": _gen(0)}
        return method(fn, {**params, "fc.weight": weight}, x, 1, feature_mask=mask, baseline=0.1, **options, **extra)
    weight = params["fc.weight"].clone().requires_grad_()
    assert torch.autograd.gradcheck(attribution, (weight,))


def test_gradgradcheck_feature_ablation_wrt_params():
    _, fn, params = _cnn(torch.float64, nn.Tanh)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    weight = params["fc.bias"].clone().requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda b: tx.feature_ablation(fn, {**params, "fc.bias": b}, x, 1, feature_mask=tx.masks.grid((4, 4), 2))
        .pow(2).sum(), (weight,))


# ---------------------------------------------------------------------------------------------
# Errors, before any heavy work.

ERRORS = [
    ("feature_ablation", dict(feature_mask=torch.zeros(5, 8, dtype=torch.long)), ValueError,
     r"^feature_ablation: expected feature_mask broadcastable to x's shape \[2, 3, 8, 8\]"),
    ("feature_ablation", dict(feature_mask=torch.zeros(8, 8)), TypeError,
     r"^feature_ablation: expected feature_mask of an integer dtype"),
    ("lime", dict(feature_mask=[[0, 1]]), TypeError, r"^lime: expected feature_mask, an integer tensor"),
    ("shapley_values", dict(), ValueError,
     r"^shapley_values: expected at most 20 features .*got 192 features \(feature_mask=None .*shapley_value_sampling"),
    ("shapley_value_sampling", dict(samples=0), ValueError, r"^shapley_value_sampling: expected samples >= 1"),
    ("kernel_shap", dict(samples=1), ValueError, r"^kernel_shap: expected samples >= 2"),
    ("lime", dict(samples=2.0), TypeError, r"^lime: expected samples, a positive int"),
    ("lime", dict(regression="lasso"), ValueError, r"^lime: expected regression in \('linear', 'ridge'\), got 'lasso'"),
    ("lime", dict(distance="l1"), ValueError, r"^lime: expected distance in"),
    ("lime", dict(kernel_width=0.0), ValueError, r"^lime: expected kernel_width > 0"),
    ("kernel_shap", dict(generator=0), TypeError, r"^kernel_shap: expected generator, a torch.Generator"),
    ("feature_ablation", dict(batch_size=0), ValueError, r"^feature_ablation: expected batch_size >= 1"),
    ("shapley_values", dict(baseline=torch.zeros(3, 3)), ValueError, r"^shapley_values: expected baseline broadcastable"),
]


@pytest.mark.parametrize("name, options, error, match", ERRORS)
def test_errors(name, options, error, match):
    calls = []

    def fn(params, x):
        calls.append(x.shape)
        return x.flatten(1)[:, :5]
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(error, match=match):
        getattr(tx, name)(fn, {}, x, None, **options)                           # None: the first forward is x's
    assert not calls                                                             # raised before any forward


def test_too_many_features_for_a_regression_and_target_out_of_range():
    def fn(params, x):
        return x.flatten(1)[:, :5]
    for method in (tx.kernel_shap, tx.lime):
        with pytest.raises(ValueError, match=r"^(kernel_shap|lime): expected at most 10000 features .*got 12288 features"):
            method(fn, {}, torch.randn(1, 3, 64, 64), None)
    with pytest.raises(ValueError, match=r"^feature_ablation: expected target in \[0, 5\)"):
        tx.feature_ablation(fn, {}, torch.randn(2, 3, 4, 4), 7, feature_mask=tx.masks.grid((4, 4), 2))


# ---------------------------------------------------------------------------------------------
# Mask helpers.

def test_grid_mask():
    mask = tx.masks.grid((5, 7), (2, 3))
    assert mask.dtype == torch.long and mask.shape == (5, 7)
    expected = (torch.arange(5)[:, None] // 2) * 3 + torch.arange(7)[None] // 3
    assert torch.equal(mask, expected)
    assert torch.equal(tx.masks.grid((4,), 2), torch.tensor([0, 0, 1, 1]))
    assert tx.masks.grid((2, 4, 4), (1, 2, 2)).unique().numel() == 8
    with pytest.raises(ValueError, match=r"^masks.grid: expected cell >= 1"):
        tx.masks.grid((4, 4), 0)
    with pytest.raises(TypeError, match=r"^masks.grid: expected cell, an int or a tuple of 2 ints"):
        tx.masks.grid((4, 4), (1, 2, 3))


def test_superpixels_follow_colour_edges_and_are_deterministic():
    x = torch.zeros(2, 3, 16, 16)
    x[0, :, :, 7:] = 1.0                          # a vertical edge off the grid's cell boundaries
    x[1, 0, 5:, :] = 1.0                          # a horizontal one
    mask = tx.masks.superpixels(x, 4, compactness=0.1)
    assert mask.shape == (2, 1, 16, 16) and mask.dtype == torch.long
    assert torch.equal(mask, tx.masks.superpixels(x, 4, compactness=0.1))
    assert 0 <= int(mask.min()) and int(mask.max()) < 4
    left, right = set(mask[0, 0, :, :7].unique().tolist()), set(mask[0, 0, :, 7:].unique().tolist())
    assert left.isdisjoint(right)                 # no segment crosses the edge
    top, bottom = set(mask[1, 0, :5].unique().tolist()), set(mask[1, 0, 5:].unique().tolist())
    assert top.isdisjoint(bottom)
    _, fn, params = _cnn()
    attr = tx.lime(fn, params, x, 1, feature_mask=mask, samples=16, generator=_gen())
    assert attr.shape == x.shape
    with pytest.raises(ValueError, match=r"^masks.superpixels: expected x of rank 4"):
        tx.masks.superpixels(x[0])


def test_one_feature_is_the_whole_score_difference():
    _, fn, params = _mlp(torch.float64)
    x = torch.randn(2, 6, dtype=torch.float64)
    whole = torch.zeros(6, dtype=torch.long)
    gap = (fn(params, x)[:, 1] - fn(params, torch.zeros_like(x))[:, 1])[:, None].expand(2, 6)
    for method, options in [(tx.feature_ablation, {}), (tx.shapley_values, {}),
                            (tx.shapley_value_sampling, dict(samples=2)), (tx.kernel_shap, dict(samples=5))]:
        torch.testing.assert_close(method(fn, params, x, 1, feature_mask=whole, **options), gap)
