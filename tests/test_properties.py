"""Property tests over the contract suite's ``METHODS`` table, with hypothesis.

For every method, hypothesis draws a batch size (1-5), an odd or non-square image size, a target
(None, an int, a ``LongTensor [B]``, a callable) and the method's options where they change the
computation, and checks the contract on each draw:

* shape and dtype as the table says, finite values;
* nothing left behind (``tests/support/state.py``): module hooks of every kind and global module hooks,
  parameter and buffer objects and values, ``requires_grad``, ``.grad``, ``training`` flags, the
  caller's ``params`` dict, global modes and flags, the global RNG (randomness comes only from
  ``generator=``);
* the same call again gives the same map bit for bit (random methods draw from a fresh generator
  with the same seed);
* the batch equals one example at a time, and ``vmap`` over the examples equals the loop (every
  method of the table promises per-example independence for a model in eval mode; the exceptions
  would be listed in ``NOT_PER_EXAMPLE`` with the reason).

Profiles (``tests/conftest.py``): ``ci`` (the default, few draws, derandomized so that CI runs
are reproducible) and ``dev`` (many draws): ``pytest tests/test_properties.py --hypothesis-profile=dev``.
"""
import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchex_fn as tx
from support.state import Snapshot
from support.contracts import METHODS, contract_model as _model

pytestmark = pytest.mark.usefixtures("one_thread")

# Methods whose map for one example depends on the other examples of the batch, with the reason.
# None of the table's methods does on an eval-mode model: every batch statistic they use (Score-CAM's
# and Ablation-CAM's normalisations, RISE's and occlusion's chunks, FullGrad's min-max scaling, ...)
# is taken per example.
NOT_PER_EXAMPLE = {
    "kernel_shap": "each example draws its coalitions after the previous one's (captum's draws)",
    "lime": "each example draws its coalitions after the previous one's (captum's draws)",
    "feature_permutation": "features are permuted across the batch",
}
# Methods that need a batch of at least two examples.
NEEDS_TWO = {"feature_permutation"}

# Methods that refuse a callable target (with a TypeError naming ``target``), with the reason.
REFUSES_CALLABLE = {"cam": "CAM weighs the channels with the fc row of a class index",
                    "finer_cam": "Finer-CAM ranks the other classes by their logit's distance to a class index's",
                    "sess": "SESS scores its patches by a class's softmax probability"}

# Options drawn per method, where they change the computation ({option: values}); the table's own
# options are the defaults. Methods not listed (e.g. added to METHODS later) run with the table's options.
OPTIONS = {
    "saliency": {"abs": [False, True]},
    "input_x_gradient": {},
    "cam": {"relu": [False, True], "upsample": [True, False]},
    "grad_cam": {"relu": [True, False], "upsample": [True, False], "layer": ["features", "conv1"]},
    "grad_cam_pp": {"upsample": [True, False]},
    "score_cam": {"batch_size": [8, 1, 5]},
    "layer_cam": {"layer": ["features", "conv1"]},
    "ablation_cam": {"batch_size": [8, 3]},
    "integrated_gradients": {"steps": [8, 3], "method": ["riemann_trapezoid", "riemann_left", "gausslegendre"],
                             "baseline": [0.1, 0.0]},
    "integrated_gradients_chunked": {"batch_size": [4, 1, 7]},
    "occlusion": {"stride": [2, 3, (1, 2, 3)], "batch_size": [8, 1]},
    "deeplift": {"baseline": [0.1, 0.0]},
    "rise": {"batch_size": [16, 5], "cell_size": [3, 2]},
    "gradient_shap": {"batch_size": [6, 1]},
}

def _callable_target(out):
    """A per-example score that is not a plain logit (log-probability margin of class 1 over 0)."""
    logp = torch.log_softmax(out, dim=1)
    return logp[:, 1] - logp[:, 0]


@st.composite
def cases(draw, name):
    batch = draw(st.integers(1, 5))
    height, width = draw(st.integers(4, 11)), draw(st.integers(4, 11))
    kind = draw(st.sampled_from(["none", "int", "tensor", "callable"]))
    if kind == "none":
        target = None
    elif kind == "int":
        target = draw(st.integers(0, 4))
    elif kind == "tensor":
        target = torch.tensor(draw(st.lists(st.integers(0, 4), min_size=batch, max_size=batch)), dtype=torch.long)
    else:
        target = _callable_target
    options = {key: draw(st.sampled_from(values)) for key, values in OPTIONS.get(name, {}).items()}
    seed = draw(st.integers(0, 2 ** 16))
    return batch, (height, width), target, options, seed


def _call(name, fn, params, x, target, options):
    method, table, _ = METHODS[name]
    return method(fn, params, x, target, **{**table, **options})


def _slice(target, i):
    return target[i:i + 1] if isinstance(target, torch.Tensor) else target


@pytest.mark.parametrize("name", METHODS)
def test_contract_on_random_batches_sizes_targets_and_options(name):
    model = _model()
    fn, params = tx.functionalize(model)

    @given(cases(name))
    def check(case):
        batch, (height, width), target, options, seed = case
        if name in NEEDS_TWO:
            batch = max(batch, 2)
            target = target[:1].repeat(2) if isinstance(target, torch.Tensor) and len(target) < 2 else target
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
        before = Snapshot(model, params)
        if callable(target) and name in REFUSES_CALLABLE:
            with pytest.raises(TypeError, match=r"^\w+: expected target"):
                _call(name, fn, params, x, target, options)
            before.check()
            return
        out = _call(name, fn, params, x, target, options)
        before.check()

        assert out.shape == METHODS[name][2](x.shape), (out.shape, x.shape)
        assert out.dtype == x.dtype and out.device == x.device
        assert torch.isfinite(out).all()
        assert torch.equal(out, _call(name, fn, params, x, target, options))

        if name in NOT_PER_EXAMPLE or batch == 1:
            return
        single = torch.cat([_call(name, fn, params, x[i:i + 1], _slice(target, i), options) for i in range(batch)])
        torch.testing.assert_close(out, single, rtol=1e-4, atol=1e-5)

        def one(xi, ti=None):
            return _call(name, fn, params, xi[None], target if ti is None else ti[None], options)[0]
        if isinstance(target, torch.Tensor):
            mapped = torch.func.vmap(one, randomness="same")(x, target)
        else:
            mapped = torch.func.vmap(one, randomness="same")(x)
        torch.testing.assert_close(mapped, single, rtol=1e-4, atol=1e-5)
        before.check()

    check()


def test_not_per_example_lists_only_table_methods():
    assert set(NOT_PER_EXAMPLE) <= set(METHODS)
    assert set(OPTIONS) <= set(METHODS) and set(REFUSES_CALLABLE) <= set(METHODS)
