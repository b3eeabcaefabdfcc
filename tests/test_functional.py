import threading

import pytest
import torch
from torch import nn

import torchex_fn as tx
from _models import TinyCNN


def test_functionalize_params_and_buffers_detached():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    fn, params = tx.functionalize(model)
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert set(params) == names
    assert all(not t.requires_grad for t in params.values())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fn(params, x), model(x), rtol=0, atol=0)


def test_model_fn_uses_given_params_and_leaves_module_alone():
    model = TinyCNN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fn, params = tx.functionalize(model)
    other = {k: v + 1.0 if v.is_floating_point() else v for k, v in params.items()}
    x = torch.randn(2, 3, 8, 8)
    assert not torch.allclose(fn(other, x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training


def test_buffers_are_copies_so_train_mode_cannot_write_back():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    running = model[1].running_mean.clone()
    fn, params = tx.functionalize(model)
    fn(params, torch.randn(4, 3, 8, 8) + 3.0)
    assert torch.equal(model[1].running_mean, running)


def test_functionalize_rejects_non_module():
    with pytest.raises(TypeError, match="functionalize: expected module, an nn.Module"):
        tx.functionalize(lambda x: x)


def test_two_threads_with_different_params_on_one_module():
    model = TinyCNN().eval()
    fn, params = tx.functionalize(model)
    params_b = {k: v * 1.5 if v.is_floating_point() else v for k, v in params.items()}
    x = torch.randn(4, 3, 16, 16)
    expected = {
        "a": tx.grad_cam(fn, params, x, 1, layer="features"),
        "b": tx.grad_cam(fn, params_b, x, 1, layer="features"),
        "sa": tx.saliency(fn, params, x, 1),
        "sb": tx.saliency(fn, params_b, x, 1),
    }
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def work(tag, p):
        try:
            barrier.wait()
            for i in range(15):
                results[(tag, i)] = (tx.grad_cam(fn, p, x, 1, layer="features"), tx.saliency(fn, p, x, 1))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=("a", params)), threading.Thread(target=work, args=("b", params_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (tag, _), (gcam, sal) in results.items():
        torch.testing.assert_close(gcam, expected[tag], rtol=0, atol=0)
        torch.testing.assert_close(sal, expected["s" + tag], rtol=0, atol=0)
    assert all(not m._forward_hooks for m in model.modules())
