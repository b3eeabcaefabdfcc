"""The same maps on a CUDA device as on the CPU (skipped without CUDA).

float64 for parity: float32 convolutions on CUDA may use TF32, which would need a loose tolerance.
"""
import pytest
import torch
from torch import nn

import torchex_fn as tx
from support.models import TinyCNN

pytestmark = pytest.mark.cuda


def _rise(fn, params, x, target):
    gen = torch.Generator(device=x.device).manual_seed(3)
    return tx.rise(fn, params, x, target, num_masks=32, cell_size=3, batch_size=16, generator=gen)


METHODS = {
    "saliency": tx.saliency,
    "input_x_gradient": tx.input_x_gradient,
    "cam": lambda fn, p, x, t: tx.cam(fn, p, x, t, layer="features"),
    "grad_cam": lambda fn, p, x, t: tx.grad_cam(fn, p, x, t, layer=["conv1", "features"]),
    "deeplift": lambda fn, p, x, t: tx.deeplift(fn, p, x, t, baseline=0.2),
}


@pytest.mark.parametrize("name", METHODS)
def test_cuda_equals_cpu_in_float64(name):
    model = TinyCNN(nn.ReLU).double().eval()
    x, target = torch.randn(3, 3, 12, 12, dtype=torch.float64), torch.tensor([0, 3, 1])
    cpu = METHODS[name](*tx.functionalize(model), x, target)
    gpu = METHODS[name](*tx.functionalize(model.cuda()), x.cuda(), target.cuda())
    for a, b in zip(cpu if isinstance(cpu, list) else [cpu], gpu if isinstance(gpu, list) else [gpu]):
        assert b.device.type == "cuda" and b.dtype == torch.float64
        torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-12)


def test_rise_on_cuda_is_seeded_and_stays_on_device():
    model = TinyCNN().cuda().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 12, 12, device="cuda")
    first, second = _rise(fn, params, x, 1), _rise(fn, params, x, 1)
    assert first.device.type == "cuda" and first.shape == (2, 1, 12, 12)
    assert torch.equal(first, second)


def test_vmap_ensemble_and_grad_through_params_on_cuda():
    models = [TinyCNN(nn.Softplus).cuda().eval() for _ in range(2)]
    fn, _ = tx.functionalize(models[0])
    params, buffers = torch.func.stack_module_state(models)
    x, target = torch.randn(2, 3, 8, 8, device="cuda"), torch.tensor([1, 2], device="cuda")

    def loss(p):
        return tx.grad_cam(fn, {**p, **buffers}, x, target, layer="features").pow(2).mean()
    ens = torch.func.vmap(lambda p: tx.grad_cam(fn, p, x, target, layer="features"))({**params, **buffers})
    assert ens.shape == (2, 2, 1, 8, 8) and ens.device.type == "cuda"
    grads = torch.func.vmap(torch.func.grad(loss))(params)
    assert grads["fc.weight"].shape == (2, 5, 6) and grads["fc.weight"].device.type == "cuda"
    assert grads["fc.weight"].abs().sum() > 0
