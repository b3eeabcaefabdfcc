"""RISE (torchex_fn.methods.perturbation.rise): masks, known-region maps, determinism, batching, memory, errors."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from torchex_fn import targets
from torchex_fn.core.random_masks import DRAW_BLOCK, draw, interpolation_matrix
from torchex_fn.methods.perturbation import rise
from torchex_fn.core.model import functionalize
from support.models import TinyCNN


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _region_fn(params, x):
    """Two logits: ``10 (mean of x over the top-left 16 x 16 patch - 1/2)`` and 0."""
    del params
    v = 10.0 * (x[:, :, :16, :16].mean(dim=(1, 2, 3)) - 0.5)
    return torch.stack([v, torch.zeros_like(v)], dim=1)


def _reference_masks(num_masks, cells, p, height, width, generator, dtype=torch.float64):
    """All masks at once, the plain way: F.interpolate the grid, then crop in a Python loop.

    Draws in the same blocks and order as the implementation (grids, row offsets, column offsets).
    """
    ch, cw = math.ceil(height / cells), math.ceil(width / cells)
    out = []
    for start in range(0, num_masks, DRAW_BLOCK):
        n = min(DRAW_BLOCK, num_masks - start)
        grid = (torch.rand(n, cells, cells, generator=generator) < p).to(dtype)
        dy = torch.randint(ch, (n,), generator=generator)
        dx = torch.randint(cw, (n,), generator=generator)
        up = F.interpolate(grid[:, None], size=((cells + 1) * ch, (cells + 1) * cw), mode="bilinear",
                           align_corners=False)[:, 0]
        out += [up[i, dy[i]:dy[i] + height, dx[i]:dx[i] + width] for i in range(n)]
    return torch.stack(out)


def test_masks_equal_interpolate_then_crop():
    height, width, cells = 20, 27, 4
    rows = interpolation_matrix(cells, (cells + 1) * 5, torch.float64, torch.device("cpu"))
    cols = interpolation_matrix(cells, (cells + 1) * 7, torch.float64, torch.device("cpu"))
    masks = draw(50, cells, 0.3, (height, width), (rows, cols), _gen(1))
    expected = _reference_masks(50, cells, 0.3, height, width, _gen(1))
    torch.testing.assert_close(masks, expected, rtol=0, atol=1e-12)
    assert masks.min() >= 0 and masks.max() <= 1 and 0 < masks.mean() < 1


@pytest.mark.parametrize("normalization", ["paper", "per_pixel"])
def test_map_is_highest_on_the_region_the_score_reads(normalization):
    x = torch.ones(2, 3, 64, 64)
    sal = rise(_region_fn, {}, x, 0, num_masks=400, generator=_gen(), normalization=normalization)
    assert sal.shape == (2, 1, 64, 64)
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[:16, :16] = False
    inside_mean, outside_mean = sal[:, 0, :16, :16].mean(), sal[:, 0][:, outside].mean()
    assert inside_mean > outside_mean + 0.1, (inside_mean, outside_mean)
    # the far corner is uncorrelated with the patch: its value is the mean score, below the patch's
    assert sal[:, 0, 8, 8].min() > sal[:, 0, 48:, 48:].max()


def test_equals_a_plain_all_masks_reference():
    model = TinyCNN().double().eval()
    fn, params = functionalize(model)
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    num_masks, p = 100, 0.4
    sal = rise(fn, params, x, torch.tensor([1, 3]), num_masks=num_masks, cell_size=3, probability=p,
               batch_size=14, generator=_gen(5))
    masks = _reference_masks(num_masks, 3, p, 12, 10, _gen(5))                    # [N, H, W]
    expected = []
    for b, cls in enumerate([1, 3]):
        probs = torch.softmax(model(x[b:b + 1] * masks[:, None]), dim=1)[:, cls]  # [N]
        expected.append((probs[:, None, None] * masks).sum(0) / (num_masks * p))
    torch.testing.assert_close(sal, torch.stack(expected)[:, None])


def test_same_seed_same_map_bit_for_bit_and_other_seed_differs():
    fn, params = functionalize(TinyCNN().eval())
    x = torch.randn(2, 3, 16, 16)
    first = rise(fn, params, x, num_masks=150, batch_size=64, generator=_gen(3))
    again = rise(fn, params, x, num_masks=150, batch_size=64, generator=_gen(3))
    other = rise(fn, params, x, num_masks=150, batch_size=64, generator=_gen(4))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert first.dtype == x.dtype and first.device == x.device


@pytest.mark.parametrize("batch_size, num_masks", [(2, 24), (7, 70), (256, 70)])  # B > batch_size; B <= batch_size
def test_batch_equals_one_image_at_a_time_for_any_batch_size(batch_size, num_masks):
    fn, params = functionalize(TinyCNN().double().eval())
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([4, 0, 2])
    whole = rise(fn, params, x, target, num_masks=num_masks, batch_size=batch_size, generator=_gen())
    single = torch.cat([rise(fn, params, x[i:i + 1], target[i:i + 1], num_masks=num_masks, batch_size=64,
                             generator=_gen()) for i in range(3)])
    torch.testing.assert_close(whole, single)


def test_normalizations_are_related_exactly_by_the_mask_sum():
    fn, params = functionalize(TinyCNN().double().eval())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    options = dict(num_masks=200, cell_size=5, probability=0.3, generator=None)
    paper = rise(fn, params, x, 1, **{**options, "generator": _gen(2)})
    per_pixel = rise(fn, params, x, 1, normalization="per_pixel", **{**options, "generator": _gen(2)})
    mask_sum = _reference_masks(200, 5, 0.3, 16, 16, _gen(2)).sum(0)
    torch.testing.assert_close(per_pixel * mask_sum / (200 * 0.3), paper)
    assert not torch.allclose(per_pixel, paper, rtol=1e-3)


def test_constant_score_gives_a_constant_per_pixel_map_and_about_that_constant_for_the_paper():
    def constant(params, x):  # softmax of [log 3, 0] is [3/4, 1/4] whatever the input
        return torch.tensor([[math.log(3.0), 0.0]], dtype=x.dtype).expand(x.shape[0], 2)
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    per_pixel = rise(constant, {}, x, 0, num_masks=1000, generator=_gen(), normalization="per_pixel")
    torch.testing.assert_close(per_pixel, torch.full_like(per_pixel, 0.75))
    paper = rise(constant, {}, x, 0, num_masks=1000, generator=_gen())
    assert abs(paper.mean() - 0.75) < 0.02                      # E[M] = p
    assert (paper - 0.75).abs().max() < 0.15 and paper.std() > 1e-3


def test_target_none_is_the_unmasked_prediction_and_score_options():
    fn, params = functionalize(TinyCNN().eval())
    x = torch.randn(2, 3, 16, 16)
    predicted = fn(params, x).argmax(1)
    options = dict(num_masks=64, batch_size=64)
    none = rise(fn, params, x, None, generator=_gen(), **options)
    assert torch.equal(none, rise(fn, params, x, predicted, generator=_gen(), **options))
    # a callable target is the whole score: tx.targets.prob(c) gives the default softmax score
    assert torch.equal(rise(fn, params, x, targets.prob(2), generator=_gen(), **options),
                       rise(fn, params, x, 2, generator=_gen(), **options))
    logits = rise(fn, params, x, 2, score=lambda out: out, generator=_gen(), **options)
    torch.testing.assert_close(logits, rise(fn, params, x, lambda out: out[:, 2], generator=_gen(), **options))
    assert not torch.allclose(logits, none)


def test_under_vmap_with_same_randomness_equals_loop():
    fn, params = functionalize(TinyCNN().double().eval())
    xs = torch.randn(2, 1, 3, 8, 8, dtype=torch.float64)

    def one(x):
        return rise(fn, params, x, 1, num_masks=70, batch_size=32, generator=_gen())
    batched = torch.func.vmap(one, randomness="same")(xs)
    torch.testing.assert_close(batched, torch.stack([one(x) for x in xs]))


def test_differentiable_in_x_when_the_caller_asks():
    def smooth(params, x):
        return torch.stack([torch.tanh(x.sum((1, 2, 3))), x[:, 0, 0, 0]], 1)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: rise(smooth, {}, x, 0, num_masks=6, cell_size=2, generator=_gen()), (x,))


def test_progress_bar(capsys):
    rise(_region_fn, {}, torch.ones(1, 3, 16, 16), 0, num_masks=10, progress=True, generator=_gen())
    assert "rise" in capsys.readouterr().err


_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    import torch
    from torchex_fn.methods.perturbation import rise
    torch.set_num_threads(1)
    weight = torch.randn(10, 3)
    def model_fn(params, x):
        return x.mean(dim=(2, 3)) @ params["w"].T
    x = torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        rise(model_fn, {"w": weight}, x, 0, num_masks=int(sys.argv[1]), generator=torch.Generator().manual_seed(0))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
""")


def _peak_rss_mib(num_masks):
    # A fixed mmap threshold stops glibc from moving freed large blocks onto the heap, where
    # fragmentation adds a few MiB that grow slowly with the number of allocations (not masks).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(num_masks)], capture_output=True,
                            text=True, check=True, timeout=120, env=env)
    return int(result.stdout.split()[-1]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
def test_peak_memory_does_not_grow_with_num_masks():
    # All 8000 masks of 48 x 48 alone would take 8000 * 48 * 48 * 4 B = 70 MiB (drawing them all
    # at once measured +82 MiB over 500 masks); the chunked implementation holds a few hundred.
    small, large = _peak_rss_mib(500), _peak_rss_mib(8000)
    assert large - small < 20, (small, large)


@pytest.mark.parametrize("options, error, match", [
    (dict(probability=0.0), ValueError, r"rise: expected probability in \(0, 1\], got float 0.0"),
    (dict(probability=1.5), ValueError, r"rise: expected probability in \(0, 1\]"),
    (dict(probability="half"), TypeError, "rise: expected probability, a float"),
    (dict(cell_size=0), ValueError, "rise: expected cell_size >= 1"),
    (dict(cell_size=2.0), TypeError, "rise: expected cell_size, a positive int"),
    (dict(num_masks=0), ValueError, "rise: expected num_masks >= 1"),
    (dict(batch_size=0), ValueError, "rise: expected batch_size >= 1"),
    (dict(generator=0), TypeError, "rise: expected generator, a torch.Generator or None"),
    (dict(normalization="xplique"), ValueError, r"rise: expected normalization in \('paper', 'per_pixel'\)"),
    (dict(score=3), TypeError, "rise: expected score, a callable or None"),
    (dict(progress=1), TypeError, "rise: expected progress, a bool"),
    (dict(x=torch.ones(3, 8)), ValueError, r"rise: expected x of rank 3, 4 or 5 \(\[B, C, T\], \[B, C, H, W\].*x\[None\]"),
    (dict(x=torch.ones(1, 1, 2, 2, 2, 2)), ValueError, r"rise: expected x of rank 3, 4 or 5 .*more than 3 axes"),
    (dict(x=torch.ones(1, 3, 8, 8, dtype=torch.uint8)), TypeError, "rise: expected x of a floating-point dtype"),
    (dict(x=torch.full((1, 3, 8, 8), float("nan"))), ValueError, "rise: expected x without NaN"),
    (dict(target=torch.tensor([0, 1])), ValueError, r"rise: expected target of shape \[B\] = \[1\]"),
    (dict(target=-1), ValueError, "rise: expected target >= 0"),
    (dict(target=1.0), TypeError, "rise: expected target: None, an int"),
])
def test_bad_arguments_raise_before_any_forward(options, error, match):
    calls = []

    def counting(params, x):
        calls.append(x.shape[0])
        return _region_fn(params, x)
    kwargs = dict(x=torch.ones(1, 3, 8, 8), target=0, num_masks=8)
    kwargs.update(options)
    x, target = kwargs.pop("x"), kwargs.pop("target")
    with pytest.raises(error, match=match):
        rise(counting, {}, x, target, **kwargs)
    assert calls == []


def test_model_fn_and_params_are_checked():
    with pytest.raises(TypeError, match="rise: expected model_fn"):
        rise(torch.nn.Linear(2, 2), {}, torch.ones(1, 3, 8, 8))
    with pytest.raises(TypeError, match="rise: expected params"):
        rise(_region_fn, [], torch.ones(1, 3, 8, 8))


@pytest.mark.parametrize("target, match", [
    (2, r"rise: expected target in \[0, 2\), got int 2"),
    (torch.tensor([1, 5]), r"rise: expected target values in \[0, 2\), got \[5\]"),
])
def test_target_out_of_range_raises_after_the_first_forward(target, match):
    calls = []

    def counting(params, x):
        calls.append(x.shape[0])
        return _region_fn(params, x)
    with pytest.raises(ValueError, match=match):
        rise(counting, {}, torch.ones(2, 3, 8, 8), target, num_masks=100, batch_size=16, generator=_gen())
    assert calls == [16]


def test_generator_on_another_device_is_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with pytest.raises(ValueError, match="rise: expected generator on x's device"):
        rise(_region_fn, {}, torch.ones(1, 3, 8, 8), 0, generator=torch.Generator(device="cuda"))


def test_seed_class_binds_options():
    from support.models import TinyCNN
    import torchex_fn as tx

    model = TinyCNN().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8)
    gen = tx.RISE(model, num_masks=20, cell_size=2, probability=0.4, batch_size=8,
                  generator=torch.Generator().manual_seed(5))
    expected = tx.rise(fn, params, x, 1, num_masks=20, cell_size=2, probability=0.4, batch_size=8,
                       generator=torch.Generator().manual_seed(5))
    assert torch.equal(gen(x, 1), expected)
