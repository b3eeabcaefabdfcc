"""torchex_fn: functional, stateless attribution methods for PyTorch, built on ``torch.func``."""
from . import postprocess, targets
from .cam import cam, grad_cam
from .capture import capture, intermediates, layer_gradients, tap
from .classes import CAM, RISE, GradCAM, InputXGradient, SimpleGradient
from .functional import functionalize, params_of
from .gradient import input_x_gradient, saliency
from .perturbation import rise

__version__ = "0.1.0"

__all__ = [
    "functionalize", "params_of",
    "capture", "intermediates", "layer_gradients", "tap",
    "saliency", "input_x_gradient",
    "cam", "grad_cam",
    "rise",
    "CAM", "GradCAM", "SimpleGradient", "InputXGradient", "RISE",
    "postprocess", "targets",
]
