"""tx.metrics complexity, effective_complexity, sparseness: closed forms on hand-made maps, per-example
normalisation, gradcheck, vmap."""
import math

import pytest
import torch

from torchex_fn import metrics

N = 16


def one_hot(batch=1):
    a = torch.zeros(batch, 1, 4, 4, dtype=torch.float64)
    a[:, 0, 1, 2] = 3.0
    return a


def constant(batch=1, value=0.5):
    return torch.full((batch, 1, 4, 4), value, dtype=torch.float64)


def test_complexity_closed_forms():
    torch.testing.assert_close(metrics.complexity(one_hot()), torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(metrics.complexity(constant()), torch.full((1,), math.log(N), dtype=torch.float64))
    two = torch.zeros(1, N, dtype=torch.float64)
    two[0, 3], two[0, 9] = -2.0, 2.0  # abs: two equal shares
    torch.testing.assert_close(metrics.complexity(two), torch.full((1,), math.log(2), dtype=torch.float64))
    # shares 1/2, 1/4, 1/4 -> 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2
    three = torch.tensor([[2.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(metrics.complexity(three), torch.full((1,), 1.5 * math.log(2), dtype=torch.float64))


def test_sparseness_closed_forms():
    torch.testing.assert_close(metrics.sparseness(one_hot()), torch.full((1,), 1 - 1 / N, dtype=torch.float64))
    torch.testing.assert_close(metrics.sparseness(constant()), torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(metrics.sparseness(torch.zeros(1, N, dtype=torch.float64)),
                               torch.zeros(1, dtype=torch.float64))
    # sorted 0, 1, 2, 3: weights -3, -1, 1, 3 -> (0 - 1 + 2 + 9) / (4 * 6) = 10 / 24
    ramp = torch.tensor([[3.0, 0.0, 2.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(metrics.sparseness(ramp), torch.full((1,), 10 / 24, dtype=torch.float64))


def test_effective_complexity_closed_forms():
    assert metrics.effective_complexity(one_hot()).tolist() == [1]
    assert metrics.effective_complexity(constant()).tolist() == [N]
    a = torch.tensor([[1.0, -0.5, 1e-6, 2e-5, 0.0]], dtype=torch.float64)
    assert metrics.effective_complexity(a).tolist() == [3]                  # 1, 0.5, 2e-5 > 1e-5
    assert metrics.effective_complexity(a, abs=False).tolist() == [2]       # -0.5 is not > eps
    assert metrics.effective_complexity(a, eps=0.5).tolist() == [1]                # strictly above
    assert metrics.effective_complexity(a * 1e-3, normalise=False).tolist() == [2]  # 1e-3, 5e-4 only
    assert metrics.effective_complexity(a).dtype == torch.int64


def test_values_are_per_example_not_per_batch():
    # Quantus divides by the batch's maximum: a map next to one 1000 x larger loses the elements that fall
    # under eps relative to the other map. Here each example is normalised by its own maximum.
    gen = torch.Generator().manual_seed(0)
    small = torch.rand(1, 64, generator=gen, dtype=torch.float64) * 1e-3
    big = torch.rand(1, 64, generator=gen, dtype=torch.float64)
    small[0, :8] = 5e-9  # 5e-6 of its own maximum at most ... and under 1e-5 either way
    both = torch.cat([small, big])
    for metric in (metrics.complexity, metrics.sparseness, metrics.effective_complexity):
        torch.testing.assert_close(metric(both), torch.cat([metric(small), metric(big)]))
    # the batch-wide normalisation Quantus does, written out: counts differ for the small map
    batch_wide = (both.abs() / both.abs().max() > 1e-5).sum(1)
    ours = metrics.effective_complexity(both)
    assert ours[0] == 56 and batch_wide[0] < ours[0] and batch_wide[1] == ours[1]


def test_the_callers_tensor_is_not_written():
    a = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    before = a.clone()
    for metric in (metrics.complexity, metrics.sparseness, metrics.effective_complexity):
        metric(a)
        metric(a, abs=False, normalise=False)
    assert torch.equal(a, before)


@pytest.mark.parametrize("metric", [metrics.complexity, metrics.sparseness])
def test_gradcheck(metric):
    gen = torch.Generator().manual_seed(1)
    a = (torch.rand(2, 1, 3, 3, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: metric(t), (a,))
    assert torch.autograd.gradcheck(lambda t: metric(t, normalise=False), (a,))


@pytest.mark.parametrize("metric", [metrics.complexity, metrics.sparseness, metrics.effective_complexity])
def test_vmap_over_an_ensemble_equals_a_loop(metric):
    maps = torch.randn(3, 4, 1, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(metric)(maps), torch.stack([metric(m) for m in maps]))


def test_bad_arguments():
    with pytest.raises(TypeError, match="complexity: expected attribution of a floating-point dtype"):
        metrics.complexity(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="sparseness: expected attribution, a floating-point tensor"):
        metrics.sparseness([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"sparseness: expected attribution of shape \[B, \.\.\.\]"):
        metrics.sparseness(torch.ones(4))
    with pytest.raises(ValueError, match="effective_complexity: expected eps, a number >= 0"):
        metrics.effective_complexity(torch.ones(2, 4), eps=-1.0)
    with pytest.raises(TypeError, match="complexity: expected abs"):
        metrics.complexity(torch.ones(2, 4), abs=1)
