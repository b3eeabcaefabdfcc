"""The one list of attribution methods: name, function, family, and which inputs and options each takes.

The contract tests, the command line's ``--method`` and the docs' method tables all read :data:`METHODS`;
adding a method is one :class:`Method` entry here plus its function in its family's file of ``methods/``.
What a signature already says (the keyword options, which of them are required, ``layer=``, ``reshape=``,
``generator=``) is read from the signature, not written twice.

Example:
  >>> from torchex_fn.registry import METHODS
  >>> METHODS["grad_cam"].family, METHODS["grad_cam"].layer, METHODS["grad_cam"].output
  ('cam', 'required', 'map')
  >>> [m.name for m in METHODS.values() if m.takes("generator")]   # the methods that draw
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Tuple

from .methods import attention, cam, features, gradient, lrp, path, perturbation, propagation

__all__ = ["Method", "METHODS", "RANKS", "GRID_RANKS", "FAMILIES", "OTHER_FILES"]

RANKS = ("tabular", "sequence", "image", "volume")   # [B, F], [B, C, T], [B, C, H, W], [B, C, D, H, W]
GRID_RANKS = ("sequence", "image", "volume")
FAMILIES = ("gradient", "path", "cam", "propagation", "lrp", "perturbation", "features", "attention")
# Files of methods/ whose functions are not per-input methods ``method(model_fn, params, x, target)``, and why:
# they stay out of METHODS (no contract case, no command-line --method) and are documented and tested on their own.
OTHER_FILES = {"detection": "drise explains given detections (boxes and labels, maps [B, K, H, W]), not one target "
                            "score per example"}


@dataclass(frozen=True)
class Method:
    """One attribution method and what it takes.

    Attributes:
      name: The public name, ``tx.<name>``.
      function: The function. For a ``transform`` (``smooth``) it takes a method and returns one.
      family: The file of ``methods/`` it lives in (one of :data:`FAMILIES`).
      output: ``"input"``: a map of ``x``'s shape (of the layer output's shape with ``layer=``);
        ``"map"``: ``[B, 1, *grid]`` on ``x``'s grid (the CAM family, RISE, the attention maps);
        ``"layer"``: a map of the (required) layer's output shape (layer conductance, internal influence).
      ranks: The input ranks it runs on (:data:`RANKS`; ``docs/input_ranks.md`` has the table).
      token_ids: Takes integer token ids ``[B, T]`` as ``x`` with ``layer=`` at the embeddings.
      transform: A transform of a method (``smooth(method, ...)``) rather than a method.
    """

    name: str
    function: Callable
    family: str
    output: str = "input"
    ranks: FrozenSet[str] = frozenset(RANKS)
    token_ids: bool = False
    transform: bool = False
    options: Tuple[str, ...] = field(init=False)       # keyword options, from the signature
    required: Tuple[str, ...] = field(init=False)      # keyword options without a default

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"registry: {self.name}'s family, one of {FAMILIES} (the files of methods/), "
                             f"got {self.family!r}")
        params = inspect.signature(self.function).parameters.values()
        keyword = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        object.__setattr__(self, "options", tuple(p.name for p in keyword))
        object.__setattr__(self, "required", tuple(p.name for p in keyword if p.default is inspect.Parameter.empty))

    def takes(self, option: str) -> bool:
        """Whether the function has the keyword option ``option`` (``"layer"``, ``"reshape"``, ...)."""
        return option in self.options

    @property
    def layer(self) -> str:
        """``"required"`` (a layer method: CAMs), ``"optional"`` (attributes at a layer's output with
        ``layer=``, else at ``x``) or ``"none"``."""
        if not self.takes("layer"):
            return "none"
        return "required" if "layer" in self.required else "optional"


_GRID = frozenset(GRID_RANKS)

_ALL = [
    Method("saliency", gradient.saliency, "gradient", token_ids=True),
    Method("input_x_gradient", gradient.input_x_gradient, "gradient", token_ids=True),
    Method("smooth", gradient.smooth, "gradient", transform=True),
    Method("integrated_gradients", path.integrated_gradients, "path", token_ids=True),
    Method("gradient_shap", path.gradient_shap, "path", token_ids=True),
    Method("layer_conductance", path.layer_conductance, "path", output="layer"),
    Method("neuron_conductance", path.neuron_conductance, "path"),
    Method("internal_influence", path.internal_influence, "path", output="layer"),
    Method("cam", cam.cam, "cam", output="map", ranks=_GRID),
    Method("grad_cam", cam.grad_cam, "cam", output="map", ranks=_GRID),
    Method("grad_cam_pp", cam.grad_cam_pp, "cam", output="map", ranks=_GRID),
    Method("score_cam", cam.score_cam, "cam", output="map", ranks=_GRID),
    Method("layer_cam", cam.layer_cam, "cam", output="map", ranks=_GRID),
    Method("xgrad_cam", cam.xgrad_cam, "cam", output="map", ranks=_GRID),
    Method("hires_cam", cam.hires_cam, "cam", output="map", ranks=_GRID),
    Method("eigen_cam", cam.eigen_cam, "cam", output="map", ranks=_GRID),
    Method("ablation_cam", cam.ablation_cam, "cam", output="map", ranks=_GRID),
    Method("fullgrad", cam.fullgrad, "cam", output="map", ranks=_GRID),
    Method("eigen_grad_cam", cam.eigen_grad_cam, "cam", output="map", ranks=_GRID),
    Method("seg_eigen_cam", cam.seg_eigen_cam, "cam", output="map", ranks=_GRID),
    Method("grad_cam_element_wise", cam.grad_cam_element_wise, "cam", output="map", ranks=_GRID),
    Method("fem", cam.fem, "cam", output="map", ranks=_GRID),
    Method("kpca_cam", cam.kpca_cam, "cam", output="map", ranks=_GRID),
    Method("finer_cam", cam.finer_cam, "cam", output="map", ranks=_GRID),
    Method("shapley_cam", cam.shapley_cam, "cam", output="map", ranks=_GRID),
    Method("sscam", cam.sscam, "cam", output="map", ranks=_GRID),
    Method("iscam", cam.iscam, "cam", output="map", ranks=_GRID),
    Method("smooth_grad_cam_pp", cam.smooth_grad_cam_pp, "cam", output="map", ranks=_GRID),
    Method("refine_cam", cam.refine_cam, "cam", output="map", ranks=_GRID),
    Method("sess", cam.sess, "cam", output="map", ranks=frozenset({"image"})),
    Method("deeplift", propagation.deeplift, "propagation", token_ids=True),
    Method("deeplift_shap", propagation.deeplift_shap, "propagation"),
    Method("guided_backprop", propagation.guided_backprop, "propagation"),
    Method("deconvolution", propagation.deconvolution, "propagation"),
    Method("lrp", lrp.lrp, "lrp"),
    Method("occlusion", perturbation.occlusion, "perturbation"),
    Method("rise", perturbation.rise, "perturbation", output="map", ranks=_GRID),
    Method("feature_ablation", features.feature_ablation, "features"),
    Method("feature_permutation", features.feature_permutation, "features"),
    Method("shapley_values", features.shapley_values, "features"),
    Method("shapley_value_sampling", features.shapley_value_sampling, "features"),
    Method("kernel_shap", features.kernel_shap, "features"),
    Method("lime", features.lime, "features"),
    # any rank the attention model takes; upsampled to x's grid only for images (upsample=False otherwise)
    Method("attention_rollout", attention.attention_rollout, "attention", output="map"),
    Method("grad_rollout", attention.grad_rollout, "attention", output="map"),
    Method("legrad", attention.legrad, "attention", output="map"),
]

METHODS: Dict[str, Method] = {m.name: m for m in _ALL}
