"""float16 and bfloat16 on CUDA against float64 on CUDA, every method and rank (skipped without CUDA).

The same nets and metric as tests/test_dtypes.py; bfloat16's tolerance is the CPU one, float16's
twice the CPU one (CUDA kernels may accumulate in other orders). The masks, noise and maps stay on
the device. Not run on the development machine (no CUDA there): the tolerances come from CPU
measurements, not CUDA measurements.
"""
import pytest
import torch

import torchex_fn as tx
from support.dtypes import EXCEPTIONS, RANDOM, SCORE_SCALED, TARGET, TOLERANCE, act_for as _act
from support.ranks import CALLS, SUPPORTED, RANKS, input_for, model_for

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name, rank", [(n, r) for n in CALLS for r in RANKS if r in SUPPORTED[n]])
def test_half_precision_on_cuda_close_to_float64(name, rank, dtype):
    target = TARGET.cuda()
    model64 = model_for(rank, torch.float64, _act(name)).cuda()
    fn64, p64 = tx.functionalize(model64)
    x64 = input_for(rank).cuda()
    fn, params = tx.functionalize(model_for(rank, dtype, _act(name)).cuda())
    got = CALLS[name](fn, params, x64.to(dtype), target)
    assert got.dtype == dtype and got.device.type == "cuda" and torch.isfinite(got).all()
    if name in RANDOM:
        ref = CALLS[name](lambda p, x: fn64(p, x.double()), p64, x64.to(dtype), target).double()
    else:
        ref = CALLS[name](fn64, p64, x64, target)
    scale = model64(x64).gather(1, target[:, None]).abs().max() if name in SCORE_SCALED else ref.abs().max()
    err = ((got.double() - ref).abs().max() / scale).item()
    tolerance = 2 * TOLERANCE[dtype] if dtype == torch.float16 else TOLERANCE[dtype]
    assert err <= EXCEPTIONS.get((name, dtype, rank), tolerance), err
