"""torchex_fn: functional, stateless attribution methods for PyTorch, built on ``torch.func``."""
from . import datasets, generation, metrics, postprocess, targets, text, viz
from . import masks
from .attention import attention_probabilities, attention_rollout, grad_rollout, legrad
from .cam import (ablation_cam, cam, eigen_cam, fullgrad, grad_cam, grad_cam_pp, hires_cam, layer_cam, score_cam,
                  xgrad_cam)
from ._checks import TrainingModeWarning
from .capture import capture, intermediates, layer_gradients, tap
from .classes import CAM, RISE, DeepLift, GradCAM, InputXGradient, SimpleGradient
from .features import feature_ablation, kernel_shap, lime, shapley_value_sampling, shapley_values
from .dataset import Attributions, attribute_dataset, open_attributions
from .functional import functionalize, params_of
from .generation import continuation_ablation, continuation_attribution, continuation_logprob
from .gradient import input_x_gradient, saliency, smooth
from .metrics import (deletion, energy_pointing_game, infidelity, insertion, pointing_game, randomization_check,
                      sensitivity_max)
from .lrp import lrp
from .path import gradient_shap, integrated_gradients
from .perturbation import occlusion, rise
from .propagation import deeplift, deeplift_shap, guided_backprop

__version__ = "0.2.0"

__all__ = [
    "functionalize", "params_of",
    "capture", "intermediates", "layer_gradients", "tap",
    "saliency", "input_x_gradient", "smooth", "integrated_gradients", "gradient_shap",
    "cam", "grad_cam", "grad_cam_pp", "score_cam", "layer_cam", "xgrad_cam", "hires_cam", "eigen_cam", "ablation_cam",
    "fullgrad",
    "deeplift", "deeplift_shap", "guided_backprop",
    "lrp",
    "occlusion", "rise",
    "feature_ablation", "shapley_values", "shapley_value_sampling", "kernel_shap", "lime", "masks",
    "attention_rollout", "grad_rollout", "legrad", "attention_probabilities",
    "attribute_dataset", "open_attributions", "Attributions",
    "CAM", "GradCAM", "SimpleGradient", "InputXGradient", "RISE", "DeepLift",
    "deletion", "insertion", "pointing_game", "energy_pointing_game", "randomization_check",
    "infidelity", "sensitivity_max",
    "datasets", "metrics", "postprocess", "targets", "text", "viz",
    "TrainingModeWarning",
    "generation", "continuation_logprob", "continuation_attribution", "continuation_ablation",
]
