"""Every public method against the shared contract (DESIGN.md, STYLE.md section 7.6)."""
import copy
import functools

import pytest
import torch
from torch import nn

import torchex_fn as tx
from _models import TinyCNN


def _model(seed=0, act=nn.ReLU):
    torch.manual_seed(seed)
    model = TinyCNN(act)
    model.features.add_module("2", nn.BatchNorm2d(6))
    with torch.no_grad():  # non-trivial running statistics, so buffers matter
        model.features[2].running_mean.uniform_(-0.5, 0.5)
        model.features[2].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _rise(model_fn, params, x, target, **options):
    """RISE with a fresh seeded generator per call (randomness only through ``generator``)."""
    return tx.rise(model_fn, params, x, target, generator=torch.Generator().manual_seed(7), **options)


def _smooth(model_fn, params, x, target, *, method, kind="smoothgrad", samples=3, **options):
    """SmoothGrad-style transform of ``method`` with a fresh seeded generator per call."""
    smoothed = tx.smooth(method, samples=samples, kind=kind, generator=torch.Generator().manual_seed(7))
    return smoothed(model_fn, params, x, target, **options)


def _gradient_shap(model_fn, params, x, target, **options):
    """GradientSHAP with two fixed baselines and a fresh seeded generator per call."""
    baselines = torch.linspace(-0.5, 0.5, 2 * x[0].numel(), dtype=x.dtype).view(2, *x.shape[1:])
    return tx.gradient_shap(model_fn, params, x, target, baselines=baselines,
                            generator=torch.Generator().manual_seed(7), **options)


def _cells(method, split, seeded=False):
    """A feature method on a grid mask of ``split`` cells over x's last two axes, whatever x's size
    (on 8 x 8 inputs: (2, 2) gives 4 features, 16 coalitions for exact Shapley values; (2, 4) gives 8),
    with a fresh seeded generator per call for the random ones."""
    def call(model_fn, params, x, target, **options):
        cells = tuple(-(-n // c) for n, c in zip(x.shape[-2:], split))
        if seeded:
            options["generator"] = torch.Generator().manual_seed(7)
        return method(model_fn, params, x, target, feature_mask=tx.masks.grid(x.shape[-2:], cells), **options)
    return call


# name -> (function, keyword options, output shape from x's shape)
METHODS = {
    "saliency": (tx.saliency, {}, lambda s: s),
    "saliency_abs": (tx.saliency, {"abs": True}, lambda s: s),
    "input_x_gradient": (tx.input_x_gradient, {}, lambda s: s),
    "cam": (tx.cam, {"layer": "features"}, lambda s: (s[0], 1, *s[2:])),
    "grad_cam": (tx.grad_cam, {"layer": "features"}, lambda s: (s[0], 1, *s[2:])),
    "grad_cam_small": (tx.grad_cam, {"layer": "conv1", "upsample": False, "relu": False}, lambda s: (s[0], 1, *s[2:])),
    "grad_cam_pp": (tx.grad_cam_pp, {"layer": "features"}, lambda s: (s[0], 1, *s[2:])),
    "score_cam": (tx.score_cam, {"layer": "features", "batch_size": 8}, lambda s: (s[0], 1, *s[2:])),
    "layer_cam": (tx.layer_cam, {"layer": "features"}, lambda s: (s[0], 1, *s[2:])),
    "xgrad_cam": (tx.xgrad_cam, {"layer": "features"}, lambda s: (s[0], 1, *s[2:])),
    "hires_cam": (tx.hires_cam, {"layer": "features"}, lambda s: (s[0], 1, *s[2:])),
    "eigen_cam": (tx.eigen_cam, {"layer": "features"}, lambda s: (s[0], 1, *s[2:])),
    "ablation_cam": (tx.ablation_cam, {"layer": "features", "batch_size": 8}, lambda s: (s[0], 1, *s[2:])),
    "fullgrad": (tx.fullgrad, {}, lambda s: (s[0], 1, *s[2:])),
    "integrated_gradients": (tx.integrated_gradients, {"baseline": 0.1, "steps": 8}, lambda s: s),
    "integrated_gradients_chunked": (tx.integrated_gradients,
                                     {"steps": 5, "method": "riemann_trapezoid", "batch_size": 4}, lambda s: s),
    "smoothgrad": (_smooth, {"method": tx.saliency}, lambda s: s),
    "vargrad_grad_cam": (_smooth, {"method": tx.grad_cam, "kind": "vargrad", "layer": "features"},
                         lambda s: (s[0], 1, *s[2:])),
    "occlusion": (tx.occlusion, {"window": (3, 4, 4), "stride": 2, "batch_size": 8}, lambda s: s),
    "guided_backprop": (tx.guided_backprop, {}, lambda s: s),
    "deeplift": (tx.deeplift, {"baseline": 0.1}, lambda s: s),
    "lrp": (tx.lrp, {"composite": "epsilon_alpha2_beta1_flat"}, lambda s: s),
    "rise": (_rise, {"num_masks": 24, "cell_size": 3, "batch_size": 16}, lambda s: (s[0], 1, *s[2:])),
    "gradient_shap": (_gradient_shap, {"samples": 3, "stdev": 0.1, "batch_size": 6}, lambda s: s),
    "feature_ablation": (_cells(tx.feature_ablation, (2, 4)), {"baseline": 0.1, "batch_size": 8}, lambda s: s),
    "shapley_values": (_cells(tx.shapley_values, (2, 2)), {"batch_size": 8}, lambda s: s),
    "shapley_value_sampling": (_cells(tx.shapley_value_sampling, (2, 4), seeded=True),
                               {"samples": 2, "batch_size": 8}, lambda s: s),
    "kernel_shap": (_cells(tx.kernel_shap, (2, 2), seeded=True), {"samples": 10, "batch_size": 8}, lambda s: s),
    "lime": (_cells(tx.lime, (2, 2), seeded=True), {"samples": 10, "batch_size": 8}, lambda s: s),
}
DIFFERENTIABLE = ["saliency", "input_x_gradient", "cam", "grad_cam", "grad_cam_small", "grad_cam_pp", "score_cam",
                  "layer_cam", "xgrad_cam", "hires_cam", "ablation_cam", "fullgrad",  # eigen_cam: no fc dependence (test_cam_zoo)
                  "integrated_gradients", "integrated_gradients_chunked", "smoothgrad", "vargrad_grad_cam",
                  "occlusion", "guided_backprop", "deeplift", "rise", "gradient_shap",
                  "lrp",
                  "feature_ablation", "shapley_values", "shapley_value_sampling", "kernel_shap", "lime"]


# FullGrad's gradient passes through a min-max scaling per channel (divisions by each map's range,
# some ~5e-6 here), which amplifies float32 rounding: vmap and the loop differ only in summation
# order (float64: 3e-14 relative, test_cam_zoo.py), float32: up to 3e-5 relative on entries ~30.
GRAD_TOLERANCE = {"fullgrad": {"rtol": 1e-4, "atol": 1e-3}}


def call(name, fn, params, x, target):
    method, options, _ = METHODS[name]
    return method(fn, params, x, target, **options)


@pytest.fixture
def x():
    return torch.randn(3, 3, 8, 8)


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
        single = torch.func.grad(lambda p: call(name, fn_i, p, x, torch.tensor([0, 1, 2])).pow(2).mean())(
            {k: v for k, v in p_i.items() if k in params})
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
