"""Issue 22 items 6 and 7: the draws of the seeded methods.

Item 7: with a batch, kernel_shap and lime draw each example's coalitions after the previous example's
(and skip what captum's regression draws in between), so a batch of four equals ONE captum call on it,
every example, not only the first; shapley_value_sampling shares each permutation with the batch as
captum does; gradient_shap shares its draws with the batch (documented; captum's own draws, numpy
ones among them, are replayed in tests/core/test_inputs.py on a batch of three).

Item 6: under ``torch.func.vmap`` over an ensemble of params, every seeded method with a generator
works with vmap's default randomness and equals the loop over the members; ``randomness="different"``
with a generator and ``generator=None`` under the default randomness are refused with a message that
names ``randomness='same'``.
"""
import warnings

import pytest
import torch
from torch import nn

import torchex_fn as tx
from support.models import TinyCNN

captum_attr = pytest.importorskip("captum.attr")

pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn(seed=0):
    torch.manual_seed(seed)
    model = TinyCNN(nn.ReLU).eval()
    return (model, *tx.functionalize(model))


def _gen(seed=3):
    return torch.Generator().manual_seed(seed)


def _captum_batch(explainer, x, **options):
    """One captum call on the whole batch (it fits one example after the other and says so)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are providing multiple inputs")
        return explainer.attribute(x, **options)


# ---------------------------------------------------------------------------------------------
# Item 7: a batch draws as captum does.

@pytest.mark.parametrize("method", ["kernel_shap", "lime", "lime_ridge"])
def test_kernel_shap_and_lime_equal_one_captum_call_on_a_batch_of_four(method):
    from captum._utils.models.linear_model import SkLearnLinearRegression, SkLearnRidge
    pytest.importorskip("sklearn")
    model, fn, params = _cnn()
    x = torch.randn(4, 3, 8, 8, generator=_gen(11))
    mask = tx.masks.grid((8, 8), (4, 2))                                        # 8 features
    target = torch.tensor([1, 3, 0, 4])
    if method == "kernel_shap":
        ours = tx.kernel_shap(fn, params, x, target, feature_mask=mask, samples=40, generator=_gen(), batch_size=24)
        explainer = captum_attr.KernelShap(model)
    else:
        ridge = method == "lime_ridge"
        ours = tx.lime(fn, params, x, target, feature_mask=mask, samples=40, generator=_gen(), batch_size=24,
                       **(dict(regression="ridge", alpha=0.5) if ridge else {}))
        explainer = captum_attr.Lime(model, interpretable_model=SkLearnRidge(alpha=0.5) if ridge
                                     else SkLearnLinearRegression())
    torch.manual_seed(3)
    ref = _captum_batch(explainer, x, target=target, feature_mask=mask[None, None], n_samples=40)
    assert ref.shape == ours.shape == x.shape
    # every example, each against its own scale (captum solves in float32, we in float64)
    for i in range(4):
        torch.testing.assert_close(ours[i], ref[i], rtol=2e-5, atol=2e-5 * float(ref[i].abs().max()))
    # the examples after the first do see other coalitions than the first: with one example's draws for
    # all (the old behaviour) example 3 differs from captum by a large part of its map
    alone = tx.kernel_shap(fn, params, x[3:], target[3:], feature_mask=mask, samples=40, generator=_gen()) \
        if method == "kernel_shap" else None
    if alone is not None:
        assert (alone[0] - ref[3]).abs().max() > 0.05 * ref[3].abs().max()


def test_a_batch_equals_its_examples_called_one_after_the_other_with_one_generator():
    """What holds instead of "a batch equals one example at a time": one generator carried through the
    calls, with captum's regression draws skipped between them."""
    from torchex_fn.methods import features
    _, fn, params = _cnn()
    x = torch.randn(3, 3, 8, 8, generator=_gen(2))
    mask = tx.masks.grid((8, 8), 4)
    for method in (tx.kernel_shap, tx.lime):
        whole = method(fn, params, x, 2, feature_mask=mask, samples=12, generator=_gen())
        g = _gen()
        parts = []
        for i in range(3):
            if i:
                features._skip_fit_draws(4, g, x.device)
            parts.append(method(fn, params, x[i:i + 1], 2, feature_mask=mask, samples=12, generator=g))
        torch.testing.assert_close(whole, torch.cat(parts), rtol=1e-6, atol=1e-7)


def test_shapley_value_sampling_equals_captum_on_a_batch_of_four_with_per_example_masks():
    model, fn, params = _cnn()
    x = torch.randn(4, 3, 8, 8, generator=_gen(5))
    mask = torch.stack([tx.masks.grid((8, 8), 4), tx.masks.grid((8, 8), (8, 4)) * 2,
                        tx.masks.grid((8, 8), (4, 8)), tx.masks.grid((8, 8), 4).flip(-1)])[:, None]   # [4, 1, 8, 8]
    target = torch.tensor([1, 3, 0, 2])
    ours = tx.shapley_value_sampling(fn, params, x, target, feature_mask=mask, baseline=0.2, samples=5,
                                     generator=_gen(7), batch_size=12)
    torch.manual_seed(7)
    ref = captum_attr.ShapleyValueSampling(model).attribute(x, baselines=0.2, target=target, feature_mask=mask,
                                                            n_samples=5)
    for i in range(4):
        torch.testing.assert_close(ours[i], ref[i], rtol=1e-5, atol=1e-5 * float(ref[i].abs().max()))


def test_gradient_shap_shares_its_draws_with_the_batch_as_documented():
    """captum draws per example (numpy's generator among them, which a torch generator cannot replay;
    tests/core/test_inputs.py replays captum's draws on a batch of three); ours shares each draw with
    the batch, so a batch equals its examples one at a time from the same seed."""
    _, fn, params = _cnn()
    x = torch.randn(3, 3, 8, 8, generator=_gen(4))
    baselines = torch.randn(5, 3, 8, 8, generator=_gen(6))
    target = torch.tensor([0, 2, 4])

    def call(xs, t):
        return tx.gradient_shap(fn, params, xs, t, baselines=baselines, samples=4, stdev=0.1, generator=_gen())
    whole = call(x, target)
    torch.testing.assert_close(whole, torch.cat([call(x[i:i + 1], target[i:i + 1]) for i in range(3)]),
                               rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Item 6: under vmap.

MASK = tx.masks.grid((8, 8), 4)
BASELINES = torch.linspace(-0.5, 0.5, 2 * 3 * 8 * 8).view(2, 3, 8, 8)

SEEDED = {
    "rise": lambda fn, p, x, t, g: tx.rise(fn, p, x, t, num_masks=12, cell_size=3, batch_size=12, generator=g),
    "kernel_shap": lambda fn, p, x, t, g: tx.kernel_shap(fn, p, x, t, feature_mask=MASK, samples=8, generator=g),
    "lime": lambda fn, p, x, t, g: tx.lime(fn, p, x, t, feature_mask=MASK, samples=8, generator=g),
    "shapley_value_sampling": lambda fn, p, x, t, g: tx.shapley_value_sampling(fn, p, x, t, feature_mask=MASK,
                                                                               samples=2, generator=g),
    "feature_permutation": lambda fn, p, x, t, g: tx.feature_permutation(fn, p, x, t, feature_mask=MASK,
                                                                         generator=g),
    "smoothgrad": lambda fn, p, x, t, g: tx.smooth(tx.saliency, samples=3, generator=g)(fn, p, x, t),
    "gradient_shap": lambda fn, p, x, t, g: tx.gradient_shap(fn, p, x, t, baselines=BASELINES, samples=3,
                                                             stdev=0.1, generator=g),
}


@pytest.fixture(scope="module")
def ensemble():
    models = [_cnn(seed)[0] for seed in range(3)]
    fn, _ = tx.functionalize(models[0])
    params, buffers = torch.func.stack_module_state(models)
    return models, fn, {**params, **buffers}


@pytest.mark.parametrize("name", SEEDED)
def test_vmap_with_a_generator_equals_the_loop_over_members_under_the_default_randomness(name, ensemble):
    models, fn, stacked = ensemble
    x = torch.randn(2, 3, 8, 8, generator=_gen(1))
    target = torch.tensor([1, 3])
    method = SEEDED[name]
    loop = torch.stack([method(*tx.functionalize(m), x, target, _gen()) for m in models])
    for randomness in ("error", "same"):
        batched = torch.func.vmap(lambda p: method(fn, p, x, target, _gen()), randomness=randomness)(stacked)
        torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-6)
    # the members differ (different weights), so the loop is not one map three times
    assert not torch.allclose(loop[0], loop[1])


@pytest.mark.parametrize("name", SEEDED)
def test_vmap_refuses_what_would_ignore_the_generator_or_fail_with_torchs_bare_error(name, ensemble):
    _, fn, stacked = ensemble
    x = torch.randn(2, 3, 8, 8, generator=_gen(1))
    method = SEEDED[name]
    fn_name = "smooth" if name == "smoothgrad" else name
    with pytest.raises(ValueError, match=rf"^{fn_name}: expected .*, got randomness='different' and a generator .*"
                                         r"randomness='same'"):
        torch.func.vmap(lambda p: method(fn, p, x, 1, _gen()), randomness="different")(stacked)
    with pytest.raises(ValueError, match=rf"^{fn_name}: expected a generator= under torch.func.vmap .*"
                                         r"randomness='same'"):
        torch.func.vmap(lambda p: method(fn, p, x, 1, None))(stacked)
    # generator=None with randomness="same": the global generator's draws, shared by the members
    torch.manual_seed(0)
    batched = torch.func.vmap(lambda p: method(fn, p, x, 1, None), randomness="same")(stacked)
    torch.manual_seed(0)
    first = method(fn, {k: v[0] for k, v in stacked.items()}, x, 1, None)
    torch.testing.assert_close(batched[0], first, rtol=1e-5, atol=1e-6)


def test_nested_vmap_over_members_and_inputs_with_a_generator():
    """vmap over members of vmap over inputs: the draws still come from the generator, made once."""
    models = [_cnn(seed)[0] for seed in range(2)]
    fn, _ = tx.functionalize(models[0])
    params, buffers = torch.func.stack_module_state(models)
    xs = torch.randn(3, 2, 3, 8, 8, generator=_gen(8))

    def one(p, x):
        return tx.kernel_shap(fn, p, x, 1, feature_mask=MASK, samples=8, generator=_gen())
    nested = torch.func.vmap(lambda p: torch.func.vmap(lambda x: one(p, x))(xs))({**params, **buffers})
    loop = torch.stack([torch.stack([one(tx.functionalize(m)[1], x) for x in xs]) for m in models])
    torch.testing.assert_close(nested, loop, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["smoothgrad", "gradient_shap", "rise", "lime"])
def test_vmap_over_inputs_with_a_generator_equals_the_loop(name):
    """The draws read shapes of x (a vmapped tensor here) before they are made outside vmap."""
    _, fn, params = _cnn()
    xs = torch.randn(3, 2, 3, 8, 8, generator=_gen(12))
    method = SEEDED[name]
    batched = torch.func.vmap(lambda x: method(fn, params, x, 1, _gen()))(xs)
    loop = torch.stack([method(fn, params, x, 1, _gen()) for x in xs])
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-6)
