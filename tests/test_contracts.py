"""Every public method against the shared contract (DESIGN.md, STYLE.md section 7.6).

The cases (tests/support/contracts.py) take their functions and output shapes from the registry
(torchex_fn/registry.py); the first tests below fail when a registry method has no case, or a case
names a method or an option the registry does not have."""
import copy
import functools

import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.registry import METHODS as REGISTRY
from support.contracts import (BATCH_DEPENDENT, CASES, DIFFERENTIABLE, METHODS, NOT_IN_CONTRACTS, OUTPUT_SHAPES,
                               call, contract_model as _model, output_of)
from support.models import TinyCNN


# FullGrad's gradient passes through a min-max scaling per channel (divisions by each map's range,
# some ~5e-6 here), which amplifies float32 rounding: vmap and the loop differ only in summation
# order (float64: 3e-14 relative, test_cam_zoo.py), float32: up to 3e-5 relative on entries ~30.
GRAD_TOLERANCE = {"fullgrad": {"rtol": 1e-4, "atol": 1e-3}}


@pytest.fixture
def x():
    return torch.randn(3, 3, 8, 8)


def test_every_registry_method_has_a_case_and_every_case_a_registry_method():
    covered = {spec[0] for spec in CASES.values()}
    missing = set(REGISTRY) - covered - set(NOT_IN_CONTRACTS)
    assert not missing, f"registry methods without a case in tests/support/contracts.py CASES: {sorted(missing)}"
    assert covered <= set(REGISTRY), sorted(covered - set(REGISTRY))
    assert set(NOT_IN_CONTRACTS) <= set(REGISTRY) and not covered & set(NOT_IN_CONTRACTS), \
        sorted(covered & set(NOT_IN_CONTRACTS))
    assert set(DIFFERENTIABLE) <= set(METHODS)


@pytest.mark.parametrize("name", CASES)
def test_case_options_are_options_of_its_registry_method(name):
    method, options = CASES[name][:2]
    entry = REGISTRY[method]
    if entry.transform:  # smooth(method, ...): its own options, the rest go to the method it wraps
        inner = next(m for m in REGISTRY.values() if m.function is options["method"])
        assert set(options) - {"method"} <= set(entry.options) | set(inner.options), (name, options)
    else:
        assert set(options) <= set(entry.options), (name, sorted(set(options) - set(entry.options)))
    assert METHODS[name][2] is OUTPUT_SHAPES[output_of(method, options)]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_device_and_determinism(name, dtype):
    model = _model().to(dtype)
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 3, 8, 8, dtype=dtype)
    first = call(name, fn, params, x, torch.tensor([0, 1, 2]))
    assert first.shape == METHODS[name][2](x.shape)
    assert first.dtype == dtype and first.device == x.device
    assert torch.equal(first, call(name, fn, params, x, torch.tensor([0, 1, 2])))
    assert first.abs().sum() > 0


@pytest.mark.parametrize("name", METHODS)
def test_batch_equals_one_example_at_a_time(name, x):
    if name in BATCH_DEPENDENT:
        pytest.skip(BATCH_DEPENDENT[name])
    fn, params = tx.functionalize(_model())
    target = torch.tensor([4, 0, 2])
    whole = call(name, fn, params, x, target)
    single = torch.cat([call(name, fn, params, x[i:i + 1], target[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(whole, single)


@pytest.mark.parametrize("name", METHODS)
def test_vmap_over_ensemble_params_equals_loop(name, x):
    models = [_model(seed) for seed in range(3)]
    fn, _ = tx.functionalize(models[0])
    params, buffers = torch.func.stack_module_state(models)
    stacked = {**params, **buffers}
    target = torch.tensor([1, 0, 3])
    batched = torch.func.vmap(lambda p: call(name, fn, p, x, target), randomness="same")(stacked)
    loop = torch.stack([call(name, *tx.functionalize(m), x, target) for m in models])
    torch.testing.assert_close(batched, loop)


@pytest.mark.parametrize("name", METHODS)
def test_vmap_over_targets_and_over_inputs_equals_loop(name, x):
    fn, params = tx.functionalize(_model())
    many = torch.tensor([[0, 1, 2], [4, 4, 4], [3, 0, 1]])
    batched = torch.func.vmap(functools.partial(call, name, fn, params, x), randomness="same")(many)
    torch.testing.assert_close(batched, torch.stack([call(name, fn, params, x, t) for t in many]))
    xs = torch.randn(2, 3, 3, 8, 8)
    batched = torch.func.vmap(lambda xi: call(name, fn, params, xi, many[0]), randomness="same")(xs)
    torch.testing.assert_close(batched, torch.stack([call(name, fn, params, xi, many[0]) for xi in xs]))


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_grad_through_params_under_vmap(name, x):
    """A meta-learning loop: per-member gradients of a loss on the map w.r.t. ensemble params."""
    models = [_model(seed, act=nn.Softplus) for seed in range(2)]
    fn, _ = tx.functionalize(models[0])
    params, buffers = torch.func.stack_module_state(models)

    def loss(p, b):
        return call(name, fn, {**p, **b}, x, torch.tensor([0, 1, 2])).pow(2).mean()
    grads = torch.func.vmap(torch.func.grad(loss), randomness="same")(params, buffers)
    for i, model in enumerate(models):
        fn_i, p_i = tx.functionalize(model)
        weights_i, buffers_i = tx.split_params(fn_i, p_i)
        single = torch.func.grad(lambda p, f=fn_i, b=buffers_i: call(name, f, {**b, **p}, x, torch.tensor([0, 1, 2]))
                                 .pow(2).mean())(weights_i)
        for key in single:
            torch.testing.assert_close(grads[key][i], single[key], **GRAD_TOLERANCE.get(name, {}))
    assert grads["fc.weight"].abs().sum() > 0


@pytest.mark.parametrize("name", METHODS)
def test_model_and_caller_tensors_untouched(name):
    model = _model().train()  # even in training mode nothing may change
    model.features[2].eval()
    snapshot = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    call(name, fn, params, x, None)
    assert x.requires_grad and x.grad is None
    assert [m.training for m in model.modules()] == modes
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot[key]), key
    assert all(not (m._forward_hooks or m._backward_hooks or m._forward_pre_hooks) for m in model.modules())


class _Raising(TinyCNN):
    def forward(self, x):
        h = self.features(self.act1(self.conv1(x)))
        self.fc(self.pool(h).flatten(1))
        raise RuntimeError("model failed")


@pytest.mark.parametrize("name", METHODS)
def test_no_hooks_after_a_failing_call(name, x):
    model = _Raising().eval()
    model.features.add_module("2", nn.Identity())
    fn, params = tx.functionalize(model)
    with pytest.raises(RuntimeError, match="model failed"):
        call(name, fn, params, x, 0)
    assert all(not (m._forward_hooks or m._backward_hooks) for m in model.modules())
