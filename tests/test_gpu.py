"""No host-device synchronisation in the methods, checks that stay clear, torch.compile, bf16 and channels_last.

What counts as the hot path (docs/gpu_and_compile.md): everything a method computes. The only
values read back on the host are the validation checks of :func:`torchex_fn.core.checks.check_values`
(NaN inputs and baselines, target ranges, non-finite scores), and only on a CPU tensor run eagerly,
where the value already lives in host memory. On an accelerator, and while ``torch.compile`` traces,
the same checks are ``torch._assert_async``: nothing is read back at all. The CPU tests below check
both halves: (1) every read recorded on the CPU comes from ``check_values``; (2) with the device
path forced on the CPU, there is no read at all, and the checks still fail loudly. The CUDA tests
(skipped without CUDA) run the methods under ``torch.cuda.set_sync_debug_mode("error")``.
"""
import traceback

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torchex_fn as tx
from torchex_fn.core import checks as _checks
from support.models import TinyCNN
from support.contracts import METHODS, call, contract_model as _model

pytestmark = pytest.mark.usefixtures("one_thread")

# Operations that read a tensor's value on the host (a synchronisation on an accelerator):
# .item() / bool() / int() / float() go through _local_scalar_dense (is_nonzero for bool()), and
# these others size their output by the data.
_READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2",
          "unique_consecutive", "equal", "allclose"}


class _Reads(TorchDispatchMode):
    """Records every host read of a tensor value, with the torchex_fn frames that led to it."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _READS:
            frames = [f"{f.filename.rsplit('/', 1)[-1]}:{f.name}" for f in traceback.extract_stack()
                      if "torchex_fn" in f.filename]
            self.reads.append((func.overloadpacket.__name__, frames))
        return func(*args, **(kwargs or {}))


# The one read allowed outside the checks: the feature-mask methods count the mask's feature ids
# (the number of forwards depends on it), once per call and on the mask's own device; a mask built
# on the host (tx.masks) reads nothing from an accelerator.
_SIZING = "features.py:_feature_ids"
# feature_permutation redraws a permutation that is the identity (captum's rule): the draw and its check run
# on the generator's device, the CPU without one, whatever the input's device.
_HOST_DRAW = "features.py:_permutation"


def _allowed(frames, *allowed):
    return any(a in frames for a in allowed)


def _device_path(monkeypatch):
    """The checks as on an accelerator (torch._assert_async), on the CPU."""
    monkeypatch.setattr(_checks, "reads_values", lambda t: False)


@pytest.mark.parametrize("target", [torch.tensor([0, 1, 2]), None], ids=["labels", "predicted"])
@pytest.mark.parametrize("name", METHODS)
def test_only_checks_read_values_on_cpu(name, target):
    fn, params = tx.functionalize(_model())
    with _Reads() as recorder:
        call(name, fn, params, torch.randn(3, 3, 8, 8), target)
    outside = [(op, frames[-3:]) for op, frames in recorder.reads
               if not _allowed(frames, "checks.py:check_values", _SIZING, _HOST_DRAW)]
    assert not outside, f"{name} reads tensor values outside checks.check_values: {outside}"


@pytest.mark.parametrize("name", METHODS)
def test_no_read_at_all_on_the_device_path(name, monkeypatch):
    fn, params = tx.functionalize(_model())
    x, target = torch.randn(3, 3, 8, 8), torch.tensor([4, 0, 2])
    host = call(name, fn, params, x, target)
    _device_path(monkeypatch)
    with _Reads() as recorder:
        device = call(name, fn, params, x, target)
    assert [read for read in recorder.reads if not _allowed(read[1], _SIZING, _HOST_DRAW)] == []
    torch.testing.assert_close(device, host, rtol=0, atol=0)


class _NaNAfter(nn.Module):
    """TinyCNN whose class 1 is NaN (or +Inf) when ``x[:, 0, 0, 0] > 10``, and for every input with ``always``."""

    def __init__(self, inf=False, always=False):
        super().__init__()
        self.net, self.inf, self.always = TinyCNN(nn.ReLU).eval(), inf, always

    def forward(self, x):
        out = self.net(x)
        hit = (x[:, 0, 0, 0] > 10) | self.always
        column = torch.where(hit, float("inf") if self.inf else float("nan"), out[:, 1])
        return torch.cat([out[:, :1], column[:, None], out[:, 2:]], dim=1)


OUTPUT_CHECKED = {
    "saliency": lambda fn, p, x, t: tx.saliency(fn, p, x, t),
    "grad_cam": lambda fn, p, x, t: tx.grad_cam(fn, p, x, t, layer="net.features"),
    "cam": lambda fn, p, x, t: tx.cam(fn, p, x, t, layer="net.features", fc="net.fc"),
    "integrated_gradients": lambda fn, p, x, t: tx.integrated_gradients(fn, p, x, t, steps=4),
    "deeplift": lambda fn, p, x, t: tx.deeplift(fn, p, x, t),
    "rise": lambda fn, p, x, t: tx.rise(fn, p, x, t, num_masks=8, cell_size=3, batch_size=8,
                                        generator=torch.Generator().manual_seed(0)),
}


@pytest.mark.parametrize("inf", [False, True], ids=["nan", "inf"])
@pytest.mark.parametrize("name, target", [(name, target) for name in OUTPUT_CHECKED for target in [1, None, "callable"]
                                          if not (name == "cam" and target == "callable")])  # cam: class indices only
def test_non_finite_output_is_a_value_error_naming_the_method(name, target, inf):
    fn, params = tx.functionalize(_NaNAfter(inf, always=True).eval())
    x = torch.randn(2, 3, 8, 8)
    target = (lambda out: out[:, 1]) if target == "callable" else target  # None: argmax picks NaN / +Inf
    with pytest.raises(ValueError, match=f"^{name}: expected a finite model output at the target"):
        OUTPUT_CHECKED[name](fn, params, x, target)


@pytest.mark.parametrize("name", ["saliency", "grad_cam", "deeplift", "integrated_gradients"])
def test_device_path_checks_still_fail_loudly(name, monkeypatch):
    """torch._assert_async raises (a RuntimeError, on the CPU at once) with the method's message."""
    _device_path(monkeypatch)
    fn, params = tx.functionalize(_NaNAfter().eval())
    x = torch.randn(2, 3, 8, 8)
    method = OUTPUT_CHECKED[name]
    with pytest.raises(RuntimeError, match=f"^{name}: expected target values in \\[0, 5\\)"):
        method(fn, params, x, torch.tensor([1, 7]))
    nan = x.clone()
    nan[0, 1, 2, 3] = float("nan")
    with pytest.raises(RuntimeError, match=f"^{name}: expected x without NaN"):
        method(fn, params, nan, 1)
    x[0, 0, 0, 0] = 11.0
    with pytest.raises(RuntimeError, match=f"^{name}: expected a finite model output at the target"):
        method(fn, params, x, 1)


def test_check_values_under_vmap_checks_nothing_on_the_device_path(monkeypatch):
    _device_path(monkeypatch)
    fn, params = tx.functionalize(_model())
    many = torch.tensor([[0, 1, 2], [4, 4, 4]])
    x = torch.randn(3, 3, 8, 8)
    batched = torch.func.vmap(lambda t: tx.saliency(fn, params, x, t))(many)
    torch.testing.assert_close(batched, torch.stack([tx.saliency(fn, params, x, t) for t in many]))


# --------------------------------------------------------------------------------------------
# torch.compile. Every method compiles (graph breaks allowed) with the AOT-autograd eager backend and
# gives the same map; the ones listed in FULLGRAPH compile without any graph break.
# Why the others break: docs/gpu_and_compile.md.

FULLGRAPH = ["saliency", "saliency_abs", "input_x_gradient", "integrated_gradients", "integrated_gradients_chunked",
             "occlusion"]


def _seeded(name):
    """The method of METHODS[name] with a generator made outside the compiled region (an opaque object)."""
    method, options, _ = METHODS[name]
    if name == "rise":
        return lambda fn, p, x, t: tx.rise(fn, p, x, t, generator=torch.Generator().manual_seed(7), **options)
    return lambda fn, p, x, t: method(fn, p, x, t, **options)


# A few, because compiling costs 10-60 s each on a small CPU; benchmarks/compile_methods.py runs them all.
COMPILED = ["saliency", "grad_cam", "integrated_gradients", "occlusion"]


# After a graph break inside the method's own gradient, torch's resumed trace reads ``.grad`` of a
# non-leaf tensor and torch warns about it (its own UserWarning, not ours; the maps are right).
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("name", COMPILED)
def test_compiles_and_gives_the_same_map(name):
    torch._dynamo.reset()
    fn, params = tx.functionalize(_model())
    x, target = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    method = _seeded(name)
    compiled = torch.compile(lambda x: method(fn, params, x, target), backend="aot_eager",
                             fullgraph=name in FULLGRAPH)
    torch.testing.assert_close(compiled(x), method(fn, params, x, target), rtol=1e-5, atol=1e-6)
    x2 = torch.randn(2, 3, 8, 8)  # a second input: the same graph, the new values
    torch.testing.assert_close(compiled(x2), method(fn, params, x2, target), rtol=1e-5, atol=1e-6)


def test_gauss_legendre_equals_numpy():
    """Plain-Python nodes and weights (torch.compile folds them; it cannot trace numpy's leggauss)."""
    np = pytest.importorskip("numpy")
    from torchex_fn.methods.path import _gauss_legendre, quadrature
    for n in [1, 2, 3, 7, 8, 32, 50, 64, 128, 256]:
        nodes, weights = _gauss_legendre(n)
        ref_nodes, ref_weights = np.polynomial.legendre.leggauss(n)
        np.testing.assert_allclose(nodes, ref_nodes, rtol=0, atol=1e-13)
        np.testing.assert_allclose(weights, ref_weights, rtol=1e-10, atol=0)
        assert abs(sum(quadrature("gausslegendre", n)[1]) - 1.0) < 1e-13


def test_inductor_compiles_saliency_fullgraph_and_its_checks_fire():
    torch._dynamo.reset()
    fn, params = tx.functionalize(_model())
    x, target = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    compiled = torch.compile(lambda x, t: tx.saliency(fn, params, x, t), fullgraph=True)
    torch.testing.assert_close(compiled(x, target), tx.saliency(fn, params, x, target), rtol=1e-5, atol=1e-6)
    nan = x.clone()
    nan[1, 2, 3, 4] = float("nan")
    with pytest.raises(RuntimeError, match="saliency: expected x without NaN"):
        compiled(nan, target)
    # inductor may run the gather's own bounds check before the enqueued assert: either message
    with pytest.raises(RuntimeError, match="saliency: expected target values in|index out of bounds"):
        compiled(x, torch.tensor([1, 9]))


# --------------------------------------------------------------------------------------------
# bfloat16 autocast and channels_last. Tolerances: docs/gpu_and_compile.md (measured on resnet18);
# here a small model, so the bf16 bound is a relative L2 error.

def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


AUTOCAST = {  # method -> bound on ||bf16 - fp32|| / ||fp32|| on the small model (measured: 0.062, 0.006,
    # 0.017, 0.006, 0.003; input gradients lose most, as on resnet18)
    "saliency": (lambda fn, p, x, t: tx.saliency(fn, p, x, t), 0.15),
    "grad_cam": (lambda fn, p, x, t: tx.grad_cam(fn, p, x, t, layer="features"), 0.03),
    "integrated_gradients": (lambda fn, p, x, t: tx.integrated_gradients(fn, p, x, t, steps=8), 0.1),
    "deeplift": (lambda fn, p, x, t: tx.deeplift(fn, p, x, t), 0.05),
    "rise": (lambda fn, p, x, t: tx.rise(fn, p, x, t, num_masks=32, cell_size=3, batch_size=16,
                                         generator=torch.Generator().manual_seed(0)), 0.02),
}


@pytest.mark.parametrize("name", AUTOCAST)
def test_bf16_autocast_close_to_float32_and_returns_x_dtype(name):
    method, bound = AUTOCAST[name]
    fn, params = tx.functionalize(_model())
    x, target = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    full = method(fn, params, x, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = method(fn, params, x, target)
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert 0 < _rel(half, full) < bound  # > 0: bfloat16 did run


@pytest.mark.parametrize("name", AUTOCAST)
def test_channels_last_equals_contiguous(name):
    method, _ = AUTOCAST[name]
    model = _model()
    fn, params = tx.functionalize(model)
    x, target = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    full = method(fn, params, x, target)
    last_fn, last_params = tx.functionalize(model.to(memory_format=torch.channels_last))
    last = method(last_fn, last_params, x.contiguous(memory_format=torch.channels_last), target)
    torch.testing.assert_close(last, full, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# CUDA (skipped without it): no synchronisation at all, under the sync debug mode.

CUDA_METHODS = ["saliency", "input_x_gradient", "grad_cam", "grad_cam_pp", "layer_cam", "integrated_gradients",
                "integrated_gradients_chunked", "deeplift", "rise", "occlusion", "smoothgrad", "guided_backprop",
                "cam", "score_cam", "ablation_cam"]


@pytest.mark.cuda
@pytest.mark.parametrize("name", CUDA_METHODS)
def test_no_synchronisation_on_cuda(name):
    model = _model().cuda()
    fn, params = tx.functionalize(model)
    x, target = torch.randn(3, 3, 8, 8, device="cuda"), torch.tensor([4, 0, 2], device="cuda")
    method, options, _ = METHODS[name]
    if name == "rise":
        run = lambda: tx.rise(fn, params, x, target, generator=torch.Generator("cuda").manual_seed(7), **options)
    elif name == "smoothgrad":
        run = lambda: tx.smooth(tx.saliency, samples=3, generator=torch.Generator("cuda").manual_seed(7))(
            fn, params, x, target)
    else:
        run = lambda: method(fn, params, x, target, **options)
    expected = run()  # warm-up (library loading, memos) outside the debug mode
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(got, expected)


@pytest.mark.cuda
def test_bad_target_on_cuda_is_a_device_assertion_with_the_message():
    """The async assert: the error surfaces at the next synchronisation. Run in a subprocess,
    because a device-side assertion leaves the CUDA context unusable."""
    import subprocess
    import sys
    code = ("import torch, torchex_fn as tx, sys; sys.path.insert(0, 'tests')\n"
            "from support.contracts import contract_model as _model\n"
            "fn, p = tx.functionalize(_model().cuda())\n"
            "m = tx.saliency(fn, p, torch.randn(2, 3, 8, 8, device='cuda'), torch.tensor([1, 9], device='cuda'))\n"
            "torch.cuda.synchronize()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "saliency: expected target values in [0, 5)" in done.stderr or "device-side assert" in done.stderr
