import threading

import pytest
import torch
from torch import nn

import torchex_fn as tx
from support.models import TinyCNN


def test_functionalize_params_and_buffers_detached():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    fn, params = tx.functionalize(model)
    names = {n for n, _ in model.named_parameters()} | {n for n, b in model.named_buffers() if b.is_floating_point()}
    assert set(params) == names    # integer buffers (num_batches_tracked) are left out: model_fn takes the module's
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


class _Aliased(nn.Module):
    """A submodule registered under two names, and a weight tied into a second module."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.seq = nn.Sequential(self.shared, nn.Tanh())
        self.embed = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.embed.weight          # tied, as GPT-2's lm_head and wte

    def forward(self, x):
        return self.head(self.seq(self.embed(x)))


def test_aliased_module_and_tied_weight_keep_the_users_parameters():
    import copy
    torch.manual_seed(0)
    net = _Aliased().eval()
    originals = {name: p for name, p in net.named_parameters()}
    fn, params = tx.functionalize(net)
    assert set(params) == {"shared.weight", "shared.bias", "embed.weight"}
    x = torch.randn(3, 4, dtype=torch.float32)
    other = {k: v * 2 for k, v in params.items()}
    w, b, e = other["shared.weight"], other["shared.bias"], other["embed.weight"]
    expected = torch.tanh(x @ e.T @ w.T + b) @ e.T       # both uses of each tensor take the new value
    torch.testing.assert_close(fn(other, x), expected)
    tx.saliency(fn, params, x, 1)
    torch.func.grad(lambda p: tx.saliency(fn, p, x, 1).square().sum())(dict(params))
    for name, p in net.named_parameters():
        assert p is originals[name] and type(p) is nn.Parameter and p.requires_grad, name
    assert net.seq[0].weight is net.shared.weight and net.head.weight is net.embed.weight
    copy.deepcopy(net)                                   # no TensorWrapper left behind


class _Cached(nn.Module):
    """Keeps a tensor derived from its parameters in eval mode, as timm's LeViT attention biases."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4))
        self.lin = nn.Linear(4, 2)
        self.cache = {}

    def forward(self, x):
        if "b" not in self.cache:
            self.cache["b"] = torch.tanh(self.bias)
        return self.lin(x * self.cache["b"])


def test_tensor_caches_are_recomputed_from_the_calls_params():
    torch.manual_seed(0)
    net = _Cached().eval()
    x = torch.randn(2, 4)
    net(x)                                              # the user's own call fills the cache
    users_cache = net.cache
    kept = users_cache["b"]
    fn, params = tx.functionalize(net)
    grads = torch.func.grad(lambda p: fn(p, x)[:, 1].sum())(dict(params))
    expected = (net.lin.weight[1] * x).sum(0) * (1 - torch.tanh(net.bias) ** 2)
    torch.testing.assert_close(grads["bias"], expected.detach())
    shifted = dict(params, bias=params["bias"] + 1)
    members = torch.func.vmap(lambda b: fn(dict(params, bias=b), x))(torch.stack([params["bias"], shifted["bias"]]))
    torch.testing.assert_close(members[1], net.lin(x * torch.tanh(net.bias + 1)).detach())
    assert net.cache is users_cache and net.cache["b"] is kept and set(net.cache) == {"b"}


def test_levit_attention_bias_cache_gets_gradients():
    timm = pytest.importorskip("timm")
    import timm.models.levit as levit
    torch.manual_seed(0)
    net = timm.create_model("levit_128s", pretrained=False, num_classes=5, img_size=64).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "attention_biases" in name:
                p.normal_()
    x = torch.randn(2, 3, 64, 64)
    net(x)
    fn, params = tx.functionalize(net)
    names = [k for k in params if "attention_biases" in k]

    def grads():
        return torch.func.grad(lambda sub: fn(dict(params, **sub), x)[:, 1].sum())({k: params[k] for k in names})
    ours = grads()
    originals = {cls: cls.get_attention_biases for cls in (levit.Attention, levit.AttentionDownsample)}
    try:  # the reference: LeViT without its cache
        for cls in originals:
            cls.get_attention_biases = lambda self, device: self.attention_biases[:, self.attention_bias_idxs]
        reference = grads()
    finally:
        for cls, method in originals.items():
            cls.get_attention_biases = method
    assert sum(int(reference[k].abs().sum() > 0) for k in names) >= 2   # the others meet one-token stages
    for k in names:
        torch.testing.assert_close(ours[k], reference[k])
