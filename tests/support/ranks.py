"""Tiny models for each input rank and the method table shared by test_ranks.py, test_dtypes.py and test_cuda_dtypes.py.

Ranks: tabular ``[B, F]`` (an MLP), sequences ``[B, C, T]`` (1-d convolutions), images
``[B, C, H, W]`` (2-d) and volumes ``[B, C, D, H, W]`` (3-d). The convolutional nets are built the
same way for every rank: conv -> ReLU -> strided conv ``features`` -> ReLU -> global average pool
-> linear ``fc``, so that ``features`` outputs ``[B, K, *grid]`` with the grid halved.
"""
from collections import OrderedDict

import torch
from torch import nn

import torchex_fn as tx
from torchex_fn import registry
from torchex_fn.registry import METHODS as REGISTRY

BATCH = 2
CLASSES = 3
# One example's shape per rank: F = 6 features; 2 channels over T = 20, 8 x 8, 6 x 8 x 8.
SHAPES = {"tabular": (6,), "sequence": (2, 20), "image": (2, 8, 8), "volume": (2, 6, 8, 8)}
RANKS = list(registry.RANKS)
GRID_RANKS = list(registry.GRID_RANKS)

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


class ConvNet(nn.Module):
    """conv1 -> act1 -> features (stride 2, or ``stride``) -> act2 -> pool -> fc, for 1, 2 or 3 grid axes."""

    def __init__(self, dims: int, channels: int = 2, act: type = nn.ReLU, stride: int = 2):
        super().__init__()
        self.conv1 = _CONV[dims](channels, 4, 3, padding=1)
        self.act1 = act()
        self.features = _CONV[dims](4, 5, 3, padding=1, stride=stride)
        self.act2 = act()
        self.pool = _POOL[dims](1)
        self.fc = nn.Linear(5, CLASSES)

    def forward(self, x):
        return self.fc(self.pool(self.act2(self.features(self.act1(self.conv1(x))))).flatten(1))


def mlp(act: type = nn.ReLU) -> nn.Module:
    return nn.Sequential(OrderedDict(fc1=nn.Linear(6, 16), act=act(), fc=nn.Linear(16, CLASSES)))


def model_for(rank: str, dtype=torch.float64, act: type = nn.ReLU, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = mlp(act) if rank == "tabular" else ConvNet(len(SHAPES[rank]) - 1, act=act)
    return model.to(dtype).eval()


def input_for(rank: str, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, *SHAPES[rank], generator=gen, dtype=torch.float64).to(dtype)


def _five(x):
    """Five features interleaved over one example's elements (any rank): few enough for exact Shapley."""
    return (torch.arange(x[0].numel(), device=x.device) % 5).view(x.shape[1:])


def _first_act(x):
    """The first activation of the rank's model: the MLP's ``act`` ``[B, 16]``, the ConvNet's ``act1`` ``[B, 4, *grid]``."""
    return "act" if x.ndim == 2 else "act1"


def _gen(x):
    return torch.Generator(device=x.device).manual_seed(0)


# Each method's keyword options for a call on x, small; the CAM family names the strided conv's ReLU ``act2``.
# Which function each name calls, its output (a map on the grid or x's shape) and its ranks come from the
# registry (torchex_fn/registry.py). A registry method with no entry here must be listed in ``NOT_IN_RANKS``
# with the reason (tests/test_ranks.py checks both ways).
OPTIONS = {
    "saliency": lambda x: {},
    "input_x_gradient": lambda x: {},
    "smooth": lambda x: {"method": tx.saliency, "samples": 3, "generator": _gen(x)},
    "integrated_gradients": lambda x: {"steps": 8},
    "layer_conductance": lambda x: {"layer": _first_act(x), "steps": 6},
    "internal_influence": lambda x: {"layer": _first_act(x), "steps": 6},
    "neuron_conductance": lambda x: {"layer": _first_act(x), "index": (1,) * (x.ndim - 1), "steps": 6},
    "gradient_shap": lambda x: {"baselines": 0.5 * torch.ones_like(x[:1]), "samples": 4, "generator": _gen(x)},
    "deeplift": lambda x: {"baseline": 0.1},
    "deeplift_shap": lambda x: {"baselines": 0.1 * torch.ones_like(x[:1]).expand(2, *x.shape[1:]).clone()},
    "guided_backprop": lambda x: {},
    "deconvolution": lambda x: {},
    "occlusion": lambda x: {"window": 2 if x.ndim <= 3 else 3, "stride": 2},
    "cam": lambda x: {"layer": "act2"},
    "grad_cam": lambda x: {"layer": "act2", "relu": False},
    "grad_cam_pp": lambda x: {"layer": "act2", "relu": False},
    "score_cam": lambda x: {"layer": "act2", "relu": False},
    "layer_cam": lambda x: {"layer": "act2", "relu": False},
    "xgrad_cam": lambda x: {"layer": "act2", "relu": False},
    "hires_cam": lambda x: {"layer": "act2", "relu": False},
    "eigen_cam": lambda x: {"layer": "act2", "relu": False},
    "ablation_cam": lambda x: {"layer": "act2", "relu": False},
    "fullgrad": lambda x: {},
    "eigen_grad_cam": lambda x: {"layer": "act2", "relu": False},
    "seg_eigen_cam": lambda x: {"layer": "act2", "relu": False},
    "grad_cam_element_wise": lambda x: {"layer": "act2", "relu": False},
    "fem": lambda x: {"layer": "act2", "relu": False, "k": 0.5},
    "kpca_cam": lambda x: {"layer": "act2", "relu": False},
    "finer_cam": lambda x: {"layer": "act2", "relu": False, "comparison": (1, 2)},
    "shapley_cam": lambda x: {"layer": "act2", "relu": False},
    "sscam": lambda x: {"layer": "act2", "relu": False, "samples": 2, "std": 0.5, "generator": _gen(x)},
    "iscam": lambda x: {"layer": "act2", "relu": False, "samples": 2},
    "smooth_grad_cam_pp": lambda x: {"layer": "act2", "relu": False, "samples": 2, "std": 0.1, "generator": _gen(x)},
    "refine_cam": lambda x: {"layer": ["act1", "act2"]},
    "sess": lambda x: {"layer": "act2", "num_scales": 2},
    "rise": lambda x: {"num_masks": 24, "cell_size": 3, "batch_size": 16, "generator": _gen(x)},
    "lrp": lambda x: {},
    "feature_ablation": lambda x: {"feature_mask": _five(x)},
    "feature_permutation": lambda x: {"feature_mask": _five(x), "generator": _gen(x)},
    "shapley_values": lambda x: {"feature_mask": _five(x)},
    "shapley_value_sampling": lambda x: {"feature_mask": _five(x), "samples": 4, "generator": _gen(x)},
    "kernel_shap": lambda x: {"feature_mask": _five(x), "samples": 20, "generator": _gen(x)},
    "lime": lambda x: {"feature_mask": _five(x), "samples": 20, "generator": _gen(x)},
}

# Registry methods without an entry in OPTIONS, and why.
NOT_IN_RANKS = {name: "needs a model with attention layers; every rank on a token grid: tests/methods/"
                      "test_attention.py::test_attention_maps_on_a_token_grid_at_every_rank_and_upsampled_for_images"
                for name in ("attention_rollout", "grad_rollout", "legrad")}


def _call(method, options):
    """``method`` (a registry entry) called as ``call(fn, params, x, target)`` with ``options(x)``."""
    if method.transform:   # smooth(inner, **options)(fn, params, x, target)
        def call(fn, p, x, t):
            kwargs = options(x)
            return method.function(kwargs.pop("method"), **kwargs)(fn, p, x, t)
    else:
        def call(fn, p, x, t):
            return method.function(fn, p, x, t, **options(x))
    return call


CALLS = {name: _call(REGISTRY[name], options) for name, options in OPTIONS.items()}

# Methods whose maps live on the input's grid as [B, 1, *grid]; the others return x's shape.
MAP_METHODS = {name for name in CALLS if REGISTRY[name].output == "map"}
# The ranks each method supports (checked cell by cell, and against docs/input_ranks.md).
SUPPORTED = {name: set(REGISTRY[name].ranks) for name in CALLS}

# Methods for 2-D images only (SESS slides a square window): their error on the other grid ranks.
IMAGES_ONLY_ERRORS = {"sess": {rank: r"^sess: expected images x of shape \[B, C, H, W\]" for rank in ("sequence", "volume")}}


# Methods whose maps have the layer output's shape (the layer of OPTIONS: _first_act).
LAYER_METHODS = {name for name in CALLS if REGISTRY[name].output == "layer"}


def expected_shape(name: str, x: torch.Tensor) -> tuple:
    if name in LAYER_METHODS:
        return (x.shape[0], 16) if x.ndim == 2 else (x.shape[0], 4, *x.shape[2:])
    return (x.shape[0], 1, *x.shape[2:]) if name in MAP_METHODS else tuple(x.shape)


def functional(rank: str, dtype=torch.float64, act: type = nn.ReLU):
    model = model_for(rank, dtype, act)
    return (model, *tx.functionalize(model))
