"""``layer=`` on feature_ablation and feature_permutation (issue 20): captum's LayerFeatureAblation and
LayerFeaturePermutation, and the crash of the latter with a target."""
import pytest
import torch
from torch import nn

import torchex_fn as tx
from support.models import TinyCNN

captum_attr = pytest.importorskip("captum.attr")

pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn(dtype=torch.float32):
    torch.manual_seed(0)
    model = TinyCNN(nn.ReLU).to(dtype).eval()
    return (model, *tx.functionalize(model))


def _layer_mask():
    """4 features over conv1's output [4, 8, 8]: two channel pairs x two halves."""
    return (torch.arange(4)[:, None, None] // 2 * 2 + (torch.arange(8)[None, None, :] >= 4)).expand(4, 8, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask", ["elements", "grouped"])
def test_layer_feature_ablation_equals_captum(dtype, mask):
    model, fn, params = _cnn(dtype)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    target = torch.tensor([1, 3, 0])
    layer_mask = None if mask == "elements" else _layer_mask()
    ours = tx.feature_ablation(fn, params, x, target, layer="conv1", feature_mask=layer_mask, baseline=0.1,
                               batch_size=40)
    ref = captum_attr.LayerFeatureAblation(model, model.conv1).attribute(
        x, target=target, layer_baselines=0.1, layer_mask=None if layer_mask is None else layer_mask[None],
    )
    assert ours.shape == ref.shape == (3, 4, 8, 8) and ours.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours, ref, **tol)
    assert ours.abs().max() > 1e-4


def test_layer_feature_permutation_equals_captum_given_the_target_once_and_captum_crashes_with_it():
    model, fn, params = _cnn()
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([1, 3, 0, 2, 4])
    ours = tx.feature_permutation(fn, params, x, target, layer="conv1", feature_mask=_layer_mask(),
                                  generator=torch.Generator().manual_seed(5))
    # captum 0.9's LayerFeaturePermutation applies the target in its forward and again in the
    # FeaturePermutation it wraps: a [B] output indexed a second time fails
    with pytest.raises(AssertionError, match="Output must be 2D to select tensor of targets"):
        torch.manual_seed(5)
        captum_attr.LayerFeaturePermutation(model, model.conv1).attribute(x, target=target,
                                                                           layer_mask=_layer_mask()[None])
    # with the target applied once, in the forward function, captum agrees
    rows = torch.arange(5)

    def scored(inputs):
        return model(inputs)[rows[:inputs.shape[0]] % 5, target.repeat(inputs.shape[0] // 5)]
    torch.manual_seed(5)
    ref = captum_attr.LayerFeaturePermutation(scored, model.conv1).attribute(x, layer_mask=_layer_mask()[None])
    assert ours.shape == ref.shape == (5, 4, 8, 8)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours.abs().max() > 1e-4


def test_layer_errors():
    _, fn, params = _cnn()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^feature_ablation: .*'conv9'"):
        tx.feature_ablation(fn, params, x, 0, layer="conv9")
    with pytest.raises(ValueError, match=r"^feature_permutation: expected feature_mask broadcastable"):
        tx.feature_permutation(fn, params, x, 0, layer="conv1", feature_mask=torch.zeros(3, 8, 8, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_deeplift_shap_equals_captum(dtype):
    model, fn, params = _cnn(dtype)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=dtype)
    baselines = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=dtype) * 0.3
    target = torch.tensor([2, 0, 4])
    ours = tx.deeplift_shap(fn, params, x, target, baselines=baselines, layer="features.0")
    ref = captum_attr.LayerDeepLiftShap(model, model.features[0]).attribute(x, baselines, target=target)
    assert ours.shape == ref.shape == (3, 6, 8, 8) and ours.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, ref, **tol)
    # the mean over baselines of deeplift at the layer, one baseline at a time
    one_by_one = torch.stack([tx.deeplift(fn, params, x, target, layer="features.0", baseline=b[None])
                              for b in baselines]).mean(0)
    torch.testing.assert_close(ours, one_by_one, rtol=1e-6, atol=1e-7)
