"""dtypes and memory layouts: every method in float32 and bfloat16 against float64 with stated
tolerances (docs/input_ranks.md, "dtypes"; tests/support/dtypes.py); channels_last and strided views
give the maps of contiguous inputs; inputs and params that require grad give the same maps, keep their
``requires_grad`` and get no ``.grad``. float16 runs here on the CPU (torch 2.14 has CPU kernels
for every operation these nets use) and on CUDA in tests/test_cuda_dtypes.py.

Models: Softplus nets (smooth, so that a difference measures rounding, not a ReLU unit whose
pre-activation rounds across 0), ReLU nets for the methods whose rules are written for ReLU
(deeplift, deeplift_shap, guided_backprop). Error: ``max |map_d - map_64| / max |map_64|``; for
occlusion and Ablation-CAM, which difference two scores, ``max |map_d - map_64|`` over the score's
scale ``max |score|`` (the rounding of a score, not of its drop, is what a low precision costs).
"""
import warnings

import pytest
import torch

import torchex_fn as tx
from support.dtypes import EXCEPTIONS, RANDOM, SCORE_SCALED, TARGET, TOLERANCE, act_for as _act
from support.ranks import CALLS, GRID_RANKS, RANKS, SUPPORTED, functional, input_for, model_for

pytestmark = pytest.mark.usefixtures("one_thread")


def _cells():
    return [(name, rank) for name in CALLS for rank in RANKS if rank in SUPPORTED[name]]


def _error(name, rank, dtype):
    model64 = model_for(rank, torch.float64, _act(name))
    fn64, p64 = tx.functionalize(model64)
    x64 = input_for(rank)
    fn, params = tx.functionalize(model_for(rank, dtype, _act(name)))
    got = CALLS[name](fn, params, x64.to(dtype), TARGET)
    assert got.dtype == dtype and got.shape == CALLS[name](fn64, p64, x64, TARGET).shape
    if name in RANDOM:  # the same draws (in dtype) through the float64 model
        ref = CALLS[name](lambda p, x: fn64(p, x.double()), p64, x64.to(dtype), TARGET).double()
    else:
        ref = CALLS[name](fn64, p64, x64, TARGET)
    scale = model64(x64).gather(1, TARGET[:, None]).abs().max() if name in SCORE_SCALED else ref.abs().max()
    assert torch.isfinite(got).all() and scale > 1e-6
    return ((got.double() - ref).abs().max() / scale).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name, rank", _cells())
def test_low_precision_close_to_float64(name, rank, dtype):
    err = _error(name, rank, dtype)
    assert err <= EXCEPTIONS.get((name, dtype, rank), TOLERANCE[dtype]), err


def test_score_cam_float16_constant_channel_gives_a_zero_mask_not_nan():
    """A channel that ReLU zeroes everywhere: (A - min) / (max - min + 1e-8) is 0 / 0 if the 1e-8
    is rounded to float16 (0); the masks are normalised in float32."""
    model = model_for("image", torch.float16)
    with torch.no_grad():
        model.features.bias[0] = -100.0
    fn, params = tx.functionalize(model)
    x = input_for("image", torch.float16)
    _, acts = tx.intermediates(fn, layers=["act2"])(params, x)
    assert (acts["act2"][:, 0] == 0).all()
    out = tx.score_cam(fn, params, x, TARGET, layer="act2", relu=False)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# Memory layouts: channels_last, and strided views, give the maps of contiguous inputs.

def _same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, rank", [(name, rank) for rank in ("image", "volume") for name in CALLS
                                        if rank in SUPPORTED[name]])
def test_channels_last_input_and_model_give_the_same_maps(name, rank):
    model, fn, params = functional(rank)
    x = input_for(rank)
    fmt = torch.channels_last if rank == "image" else torch.channels_last_3d
    expected = CALLS[name](fn, params, x, TARGET)
    x_cl = x.contiguous(memory_format=fmt)
    assert not x_cl.is_contiguous()
    _same(CALLS[name](fn, params, x_cl, TARGET), expected)
    fn_cl, params_cl = tx.functionalize(model_for(rank).to(memory_format=fmt))
    with warnings.catch_warnings():
        # deeplift_shap vmaps over baselines; a channels_last model's 2-d adaptive pooling takes an
        # as_strided_ that vmap runs by its slow fallback, with a warning (results are unaffected).
        warnings.filterwarnings("ignore", message=".*batching rule for aten::as_strided_")
        _same(CALLS[name](fn_cl, params_cl, x_cl, TARGET), expected)


@pytest.mark.parametrize("name, rank", _cells())
def test_strided_views_give_the_same_maps(name, rank):
    _, fn, params = functional(rank)
    x = input_for(rank)
    expected = CALLS[name](fn, params, x, TARGET)
    # a transposed view (last two axes of a swapped copy) and every other element of a wider tensor
    transposed = x.transpose(-1, -2).contiguous().transpose(-1, -2) if x.ndim > 2 else x.t().contiguous().t()
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    strided = wide[..., ::2]
    for view in (transposed, strided):
        assert not view.is_contiguous() and torch.equal(view, x)
        _same(CALLS[name](fn, params, view, TARGET), expected)


# --------------------------------------------------------------------------------------------
# Inputs and params that require grad: the same maps, requires_grad kept, no .grad filled.

@pytest.mark.parametrize("name, rank", _cells())
def test_inputs_and_params_that_require_grad(name, rank):
    model, fn, params = functional(rank)
    x = input_for(rank)
    expected = CALLS[name](fn, params, x, TARGET)
    x_req = x.clone().requires_grad_(True)
    params_req = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    got = CALLS[name](fn, params_req, x_req, TARGET)
    _same(got.detach(), expected)
    assert x_req.requires_grad and x_req.grad is None
    assert all(p.requires_grad and p.grad is None for p in params_req.values())
    assert not x.requires_grad and all(not p.requires_grad for p in params.values())
    assert all(p.grad is None for p in model.parameters())
    # the map is an ordinary differentiable function of them (almost everywhere): one backward works
    if got.requires_grad:
        grads = torch.autograd.grad(got.sum(), [x_req, *params_req.values()], allow_unused=True)
        assert any(g is not None for g in grads)
    # and plain inputs leave no graph behind
    assert not expected.requires_grad
