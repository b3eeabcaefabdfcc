"""The contract suite's cases: each registry method with the options the tests call it with.

``CASES`` holds only what the tests choose (the options, and a wrapper that seeds a generator or
builds a feature mask); which function a case calls and the shape of its map come from
:data:`torchex_fn.registry.METHODS`. ``METHODS`` (``case -> (function, options, output shape)``) is
the table that tests/test_contracts.py, test_properties.py, test_untouched.py, test_misbehaving.py and
test_gpu.py run. A registry method with no case here must be listed in ``NOT_IN_CONTRACTS`` with the
reason (tests/test_contracts.py checks both ways).
"""
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.registry import METHODS as REGISTRY

from .models import TinyCNN


def contract_model(seed=0, act=nn.ReLU):
    torch.manual_seed(seed)
    model = TinyCNN(act)
    model.features.add_module("2", nn.BatchNorm2d(6))
    with torch.no_grad():  # non-trivial running statistics, so buffers matter
        model.features[2].running_mean.uniform_(-0.5, 0.5)
        model.features[2].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _named(call, function):
    call.__name__ = call.__qualname__ = function.__name__
    return call


def _rise(rise):
    """RISE with a fresh seeded generator per call (randomness only through ``generator``)."""
    def call(model_fn, params, x, target, **options):
        return rise(model_fn, params, x, target, generator=torch.Generator().manual_seed(7), **options)
    return _named(call, rise)


def _seeded(method):
    """A method that draws noise, with a fresh seeded generator per call."""
    def call(model_fn, params, x, target, **options):
        return method(model_fn, params, x, target, generator=torch.Generator().manual_seed(7), **options)
    return _named(call, method)


def _smooth(smooth):
    """SmoothGrad-style transform of ``method`` with a fresh seeded generator per call."""
    def call(model_fn, params, x, target, *, method, kind="smoothgrad", samples=3, **options):
        smoothed = smooth(method, samples=samples, kind=kind, generator=torch.Generator().manual_seed(7))
        return smoothed(model_fn, params, x, target, **options)
    return _named(call, smooth)


def _gradient_shap(gradient_shap):
    """GradientSHAP with two fixed baselines and a fresh seeded generator per call."""
    def call(model_fn, params, x, target, **options):
        baselines = torch.linspace(-0.5, 0.5, 2 * x[0].numel(), dtype=x.dtype).view(2, *x.shape[1:])
        return gradient_shap(model_fn, params, x, target, baselines=baselines,
                             generator=torch.Generator().manual_seed(7), **options)
    return _named(call, gradient_shap)


def _deeplift_shap(deeplift_shap):
    """DeepLIFT over two fixed baselines (the same two as GradientSHAP's)."""
    def call(model_fn, params, x, target, **options):
        baselines = torch.linspace(-0.5, 0.5, 2 * x[0].numel(), dtype=x.dtype).view(2, *x.shape[1:])
        return deeplift_shap(model_fn, params, x, target, baselines=baselines, **options)
    return _named(call, deeplift_shap)


def _cells(split, seeded=False):
    """A feature method on a grid mask of ``split`` cells over x's last two axes, whatever x's size
    (on 8 x 8 inputs: (2, 2) gives 4 features, 16 coalitions for exact Shapley values; (2, 4) gives 8),
    with a fresh seeded generator per call for the random ones."""
    def wrap(method):
        def call(model_fn, params, x, target, **options):
            cells = tuple(-(-n // c) for n, c in zip(x.shape[-2:], split))
            if seeded:
                options["generator"] = torch.Generator().manual_seed(7)
            return method(model_fn, params, x, target, feature_mask=tx.masks.grid(x.shape[-2:], cells), **options)
        return _named(call, method)
    return wrap


# case -> (registry method, keyword options[, a wrapper of the registry's function]). The CAM family
# names TinyCNN's last conv block ``features``; the rest run on x directly.
CASES = {
    "saliency": ("saliency", {}),
    "saliency_abs": ("saliency", {"abs": True}),
    "input_x_gradient": ("input_x_gradient", {}),
    "cam": ("cam", {"layer": "features"}),
    "grad_cam": ("grad_cam", {"layer": "features"}),
    "grad_cam_small": ("grad_cam", {"layer": "conv1", "upsample": False, "relu": False}),
    "grad_cam_pp": ("grad_cam_pp", {"layer": "features"}),
    "score_cam": ("score_cam", {"layer": "features", "batch_size": 8}),
    "layer_cam": ("layer_cam", {"layer": "features"}),
    "xgrad_cam": ("xgrad_cam", {"layer": "features"}),
    "hires_cam": ("hires_cam", {"layer": "features"}),
    "eigen_cam": ("eigen_cam", {"layer": "features"}),
    "ablation_cam": ("ablation_cam", {"layer": "features", "batch_size": 8}),
    "fullgrad": ("fullgrad", {}),
    "eigen_grad_cam": ("eigen_grad_cam", {"layer": "features"}),
    "seg_eigen_cam": ("seg_eigen_cam", {"layer": "features"}),
    "grad_cam_element_wise": ("grad_cam_element_wise", {"layer": "features"}),
    "fem": ("fem", {"layer": "features", "k": 0.5}),
    "kpca_cam": ("kpca_cam", {"layer": "features"}),
    "finer_cam": ("finer_cam", {"layer": "features", "comparison": (1, 2)}),
    "shapley_cam": ("shapley_cam", {"layer": "features"}),
    # sscam, smooth_grad_cam_pp: torchcam's noise is one draw of the batch's shape, so an example's noise depends
    # on its place in the batch; std=0 here (batch == one at a time), the noise in tests/methods/test_cam_zoo_more.py
    "sscam": ("sscam", {"layer": "features", "samples": 2, "std": 0.0, "batch_size": 8}, _seeded),
    "iscam": ("iscam", {"layer": "features", "samples": 2, "batch_size": 8}),
    "smooth_grad_cam_pp": ("smooth_grad_cam_pp", {"layer": "features", "samples": 2, "std": 0.0}, _seeded),
    "refine_cam": ("refine_cam", {"layer": ["conv1", "features"]}),
    "sess": ("sess", {"layer": "features", "num_scales": 2}),
    "integrated_gradients": ("integrated_gradients", {"baseline": 0.1, "steps": 8}),
    "integrated_gradients_chunked": ("integrated_gradients",
                                     {"steps": 5, "method": "riemann_trapezoid", "batch_size": 4}),
    "layer_conductance": ("layer_conductance", {"layer": "conv1", "baseline": 0.1, "steps": 4}),
    "layer_conductance_chunked": ("layer_conductance", {"layer": "conv1", "steps": 5, "method": "riemann_trapezoid",
                                                        "batch_size": 4}),
    "internal_influence": ("internal_influence", {"layer": "conv1", "steps": 4}),
    "neuron_conductance": ("neuron_conductance", {"layer": "features.0", "index": (4,), "steps": 4,
                                                  "batch_size": 4}),
    "smoothgrad": ("smooth", {"method": tx.saliency}, _smooth),
    "vargrad_grad_cam": ("smooth", {"method": tx.grad_cam, "kind": "vargrad", "layer": "features"}, _smooth),
    "occlusion": ("occlusion", {"window": (3, 4, 4), "stride": 2, "batch_size": 8}),
    "guided_backprop": ("guided_backprop", {}),
    "deconvolution": ("deconvolution", {}),
    "deeplift": ("deeplift", {"baseline": 0.1}),
    "deeplift_shap": ("deeplift_shap", {}, _deeplift_shap),
    "lrp": ("lrp", {"composite": "epsilon_alpha2_beta1_flat"}),
    "rise": ("rise", {"num_masks": 24, "cell_size": 3, "batch_size": 16}, _rise),
    "gradient_shap": ("gradient_shap", {"samples": 3, "stdev": 0.1, "batch_size": 6}, _gradient_shap),
    "feature_ablation": ("feature_ablation", {"baseline": 0.1, "batch_size": 8}, _cells((2, 4))),
    "feature_permutation": ("feature_permutation", {"batch_size": 8}, _cells((2, 4), seeded=True)),
    "shapley_values": ("shapley_values", {"batch_size": 8}, _cells((2, 2))),
    "shapley_value_sampling": ("shapley_value_sampling", {"samples": 2, "batch_size": 8}, _cells((2, 4), seeded=True)),
    "kernel_shap": ("kernel_shap", {"samples": 10, "batch_size": 8}, _cells((2, 2), seeded=True)),
    "lime": ("lime", {"samples": 10, "batch_size": 8}, _cells((2, 2), seeded=True)),
}

# Cases whose map of an example depends on the other examples of the batch, and why (the contract's
# "a batch equals one example at a time" does not hold for them; what holds instead is tested there).
BATCH_DEPENDENT = {
    "kernel_shap": "each example draws its coalitions after the previous one's, as captum: tests/methods/test_draws.py",
    "lime": "each example draws its coalitions after the previous one's, as captum: tests/methods/test_draws.py",
    "feature_permutation": "features are permuted across the batch: tests/methods/test_feature_permutation.py",
}

# Registry methods without a case, and why (each is tested elsewhere, named here).
NOT_IN_CONTRACTS = {
    "attention_rollout": "needs a model with attention layers: tests/methods/test_attention.py",
    "grad_rollout": "needs a model with attention layers: tests/methods/test_attention.py",
    "legrad": "needs a model with attention blocks: tests/methods/test_attention.py",
}

# The output shape from x's shape, by the registry's ``output`` (``"layer"``: the cases' layer is TinyCNN's
# ``conv1``, 4 channels on x's grid).
OUTPUT_SHAPES = {"input": lambda s: s, "map": lambda s: (s[0], 1, *s[2:]), "layer": lambda s: (s[0], 4, *s[2:])}


def output_of(method, options):
    """The registry's ``output`` of a case: a transform's (``smooth``) is that of the method it wraps."""
    entry = REGISTRY[method]
    if entry.transform:
        return next(m.output for m in REGISTRY.values() if m.function is options["method"])
    return entry.output


def _entry(method, options, wrap=None):
    function = REGISTRY[method].function
    return (wrap(function) if wrap else function), options, OUTPUT_SHAPES[output_of(method, options)]


# case -> (function, keyword options, output shape from x's shape)
METHODS = {case: _entry(*spec) for case, spec in CASES.items()}
DIFFERENTIABLE = ["saliency", "input_x_gradient", "cam", "grad_cam", "grad_cam_small", "grad_cam_pp", "score_cam",
                  "layer_cam", "xgrad_cam", "hires_cam", "ablation_cam", "fullgrad",  # eigen_cam: no fc dependence (test_cam_zoo)
                  "eigen_grad_cam", "seg_eigen_cam", "grad_cam_element_wise", "finer_cam", "shapley_cam", "sscam",
                  "iscam", "smooth_grad_cam_pp", "refine_cam",  # fem, kpca_cam: no fc dependence (test_cam_zoo_more)
                  "integrated_gradients", "integrated_gradients_chunked", "smoothgrad",
                  "layer_conductance", "layer_conductance_chunked", "internal_influence", "neuron_conductance", "vargrad_grad_cam",
                  "occlusion", "guided_backprop", "deconvolution", "deeplift", "deeplift_shap", "rise", "gradient_shap",
                  "lrp",
                  "feature_ablation", "feature_permutation", "shapley_values", "shapley_value_sampling",
                  "kernel_shap", "lime"]


def call(name, fn, params, x, target):
    method, options, _ = METHODS[name]
    return method(fn, params, x, target, **options)
