"""feature_permutation (issue 20): captum's FeaturePermutation draw for draw, a closed form on a linear
model, chunking, and its errors."""
import pytest
import torch
from torch import nn

import torchex_fn as tx
from support.models import TinyCNN

captum_attr = pytest.importorskip("captum.attr")

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed=4):
    return torch.Generator().manual_seed(seed)


def _cnn(dtype=torch.float32):
    torch.manual_seed(0)
    model = TinyCNN(nn.ReLU).to(dtype).eval()
    return (model, *tx.functionalize(model))


MASKS = {
    "shared": lambda: tx.masks.grid((8, 8), 4),                                    # [8, 8], 4 cells
    "channels": lambda: tx.masks.grid((3, 8, 8), (1, 8, 4)),                       # [3, 8, 8], 6 features
    "per_example": lambda: torch.stack([tx.masks.grid((8, 8), 4), tx.masks.grid((8, 8), (8, 4)) * 2,
                                        tx.masks.grid((8, 8), (4, 8)), tx.masks.grid((8, 8), 4).flip(-1),
                                        tx.masks.grid((8, 8), 4).T])[:, None],     # [5, 1, 8, 8]
    "sparse_ids": lambda: tx.masks.grid((8, 8), 4) * 3 + 1,                        # ids 1, 4, 7, 10
}


def _captum_mask(mask, x):
    return mask.reshape((1,) * (x.ndim - mask.ndim) + tuple(mask.shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_equals_captum_with_the_same_seed_on_a_cnn(mask_name, dtype):
    model, fn, params = _cnn(dtype)
    x = torch.randn(5, 3, 8, 8, generator=_gen(1), dtype=dtype)
    target = torch.tensor([1, 3, 0, 2, 4])
    mask = MASKS[mask_name]()
    ours = tx.feature_permutation(fn, params, x, target, feature_mask=mask, generator=_gen(9), batch_size=7)
    torch.manual_seed(9)
    ref = captum_attr.FeaturePermutation(model).attribute(x, target=target, feature_mask=_captum_mask(mask, x),
                                                          perturbations_per_eval=2)
    assert ours.shape == ref.shape == x.shape and ours.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours, ref, **tol)
    assert ours.abs().max() > 1e-3


def test_equals_captum_on_a_tabular_mlp_with_every_column_a_feature():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(7, 6, generator=_gen(3))
    ours = tx.feature_permutation(fn, params, x, 2, generator=_gen(0))
    torch.manual_seed(0)
    ref = captum_attr.FeaturePermutation(model).attribute(x, target=2)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_closed_form_on_a_linear_model_and_batch_size_changes_nothing():
    """``f(x) = w . x``: feature k of example b gets ``w_k (x_bk - x_{pi_k(b) k})`` with pi_k the k-th
    permutation drawn from the generator (drawn again while the identity)."""
    w = torch.tensor([0.5, -2.0, 1.5, 3.0], dtype=torch.float64)

    def fn(p, x):
        return (x * p["w"]).sum(1, keepdim=True)
    x = torch.randn(3, 4, generator=_gen(5), dtype=torch.float64)
    got = tx.feature_permutation(fn, {"w": w}, x, 0, generator=_gen(6))
    g = _gen(6)
    expected = torch.empty_like(x)
    for k in range(4):
        perm = torch.randperm(3, generator=g)
        while torch.equal(perm, torch.arange(3)):
            perm = torch.randperm(3, generator=g)
        expected[:, k] = w[k] * (x[:, k] - x[perm, k])
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-15)
    for batch_size in (1, 2, 5, 100):    # the draws come first: the grouping of forwards changes nothing
        torch.testing.assert_close(tx.feature_permutation(fn, {"w": w}, x, 0, generator=_gen(6),
                                                          batch_size=batch_size), got, rtol=1e-14, atol=1e-15)


def test_a_batch_of_two_always_swaps_and_one_example_is_refused():
    def fn(p, x):
        return x.sum(1, keepdim=True)
    x = torch.tensor([[1.0, 10.0], [2.0, 30.0]])
    got = tx.feature_permutation(fn, {}, x, 0, generator=_gen(0))
    # the only permutation that is not the identity swaps the two examples
    torch.testing.assert_close(got, torch.tensor([[-1.0, -20.0], [1.0, 20.0]]))
    with pytest.raises(ValueError, match=r"^feature_permutation: expected a batch of at least 2 examples .*"
                                         r"got a batch of 1"):
        tx.feature_permutation(fn, {}, x[:1], 0)
    with pytest.raises(TypeError, match=r"^feature_permutation: expected generator"):
        tx.feature_permutation(fn, {}, x, 0, generator=0)
