"""The low-precision measure shared by tests/test_dtypes.py (CPU) and tests/test_cuda_dtypes.py (CUDA).

Error: ``max |map_d - map_64| / scale``, the scale being ``max |map_64|`` (``max |score|`` for
``SCORE_SCALED``); the reasons are in tests/test_dtypes.py's docstring and docs/input_ranks.md.
"""
import torch
from torch import nn

TARGET = torch.tensor([1, 2])
RELU_METHODS = {"deeplift", "deeplift_shap", "guided_backprop"}
RANDOM = {"smooth", "gradient_shap"}        # noise drawn in x's dtype: compared on the same draws
SCORE_SCALED = {"occlusion", "feature_ablation", "feature_permutation", "shapley_values", "shapley_value_sampling", "kernel_shap",
                "lime"}  # differences of two nearly equal scores: measured against the score

# max |map_d - map_64| / scale, the scale being max |map_64| (max |score| for SCORE_SCALED).
TOLERANCE = {torch.float32: 5e-6, torch.bfloat16: 4e-2, torch.float16: 5e-3}
# Measured exceptions (seed 0 nets; see docs/input_ranks.md): bfloat16 flips ReLU units of the
# 3-d ReLU net (pre-activations within bfloat16 rounding of 0), which moves guided back-propagation.
# refine_cam multiplies min-max scaled maps of two layers, so their rounding errors add up (measured on
# sequences: 0.067 in bfloat16, 0.012 in float16).
EXCEPTIONS = {("guided_backprop", torch.bfloat16, "volume"): 0.25, ("refine_cam", torch.bfloat16, "sequence"): 0.1,
              ("refine_cam", torch.float16, "sequence"): 0.02}


def act_for(name):
    return nn.ReLU if name in RELU_METHODS else nn.Softplus
