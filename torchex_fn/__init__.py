"""torchex_fn: functional, stateless attribution methods for PyTorch, built on ``torch.func``.

This file only hands names on. The package is layered, and imports point down only
(``docs/architecture.md``): ``core`` (primitives) <- ``methods`` (one file per family) and ``tools``, ``data``
<- ``evaluation`` <- ``composite`` (what composes methods) <- ``cli``.
"""
from . import data as datasets
from . import registry
from .composite import concepts, generation, influence, patching, robust
from .composite.evaluate import Evaluation, evaluate
from .composite.classes import CAM, RISE, DeepLift, GradCAM, InputXGradient, SimpleGradient
from .composite.generation import (continuation_ablation, continuation_attribution, continuation_logprob,
                                   continuation_score, next_token_kl, token_scores)
from .composite.guided import guided_grad_cam
from .composite.neurons import neuron
from .composite.patching import activation_patching, attribution_patching
from .composite.runner import Attributions, attribute_dataset, open_attributions
from .core import targets
from .core.capture import capture, intermediates, layer_gradients, tap
from .core.checks import TrainingModeWarning
from .core.model import functionalize, params_of, split_params
from .evaluation import metrics
from .evaluation.metrics import (deletion, energy_pointing_game, infidelity, insertion, pointing_game,
                                 randomization_check, sensitivity_max)
from .methods.attention import attention_probabilities, attention_rollout, grad_rollout, legrad
from .methods.cam import (ablation_cam, cam, eigen_cam, fullgrad, grad_cam, grad_cam_pp, hires_cam, layer_cam,
                          score_cam, xgrad_cam)
from .methods.cam import (deep_feature_factorization, eigen_grad_cam, fem, finer_cam, grad_cam_element_wise, iscam,
                          kpca_cam, refine_cam, seg_eigen_cam, sess, shapley_cam, smooth_grad_cam_pp,
                          sscam)
from .methods.detection import drise
from .methods.features import (feature_ablation, feature_permutation, kernel_shap, lime, shapley_value_sampling,
                                shapley_values)
from .methods.gradient import input_x_gradient, saliency, smooth
from .methods.lrp import lrp
from .methods.path import (gradient_shap, integrated_gradients, internal_influence, layer_conductance,
                           neuron_conductance)
from .methods.perturbation import occlusion, rise
from .methods.propagation import deconvolution, deeplift, deeplift_shap, guided_backprop
from .tools import masks, postprocess, text, viz

__version__ = "0.2.0"

__all__ = [
    "functionalize", "params_of", "split_params",
    "capture", "intermediates", "layer_gradients", "tap",
    "saliency", "input_x_gradient", "smooth", "integrated_gradients", "gradient_shap",
    "layer_conductance", "neuron_conductance", "internal_influence", "neuron", "guided_grad_cam",
    "cam", "grad_cam", "grad_cam_pp", "score_cam", "layer_cam", "xgrad_cam", "hires_cam", "eigen_cam", "ablation_cam",
    "fullgrad",
    "eigen_grad_cam", "seg_eigen_cam", "grad_cam_element_wise", "fem", "kpca_cam", "finer_cam", "shapley_cam",
    "sscam", "iscam", "smooth_grad_cam_pp", "refine_cam", "sess", "deep_feature_factorization",
    "deeplift", "deeplift_shap", "guided_backprop", "deconvolution",
    "lrp",
    "occlusion", "rise", "drise",
    "feature_ablation", "feature_permutation", "shapley_values", "shapley_value_sampling", "kernel_shap", "lime",
    "masks",
    "attention_rollout", "grad_rollout", "legrad", "attention_probabilities",
    "attribute_dataset", "open_attributions", "Attributions",
    "CAM", "GradCAM", "SimpleGradient", "InputXGradient", "RISE", "DeepLift",
    "deletion", "insertion", "pointing_game", "energy_pointing_game", "randomization_check",
    "infidelity", "sensitivity_max", "evaluate", "Evaluation",
    "datasets", "metrics", "postprocess", "targets", "text", "viz", "registry",
    "TrainingModeWarning",
    "concepts", "influence", "generation", "continuation_logprob", "continuation_attribution", "continuation_ablation",
    "continuation_score", "token_scores", "next_token_kl",
    "patching", "activation_patching", "attribution_patching",
    "robust",
]
