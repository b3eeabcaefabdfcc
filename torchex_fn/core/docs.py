"""Docstring text that several public functions share, written once here and filled in at import.

A docstring names a shared piece by a placeholder alone on its line, at the indentation the text
takes, and the function is decorated with :func:`fill`::

    @_docs.fill
    def layer_cam(model_fn, params, x, target=None, *, layer, relu=True, upsample=True, reshape=None):
        \"\"\"Layer-CAM: ...

        Args:
          {args.grad_cam}

        {text.cam_maps}
        \"\"\"

A placeholder stands for

* an Args entry of :data:`ARGS` (``{model_fn}``, ``{x.cam}``): ``name: text``, where the name is the
  key up to its first dot (``x.cam`` is the CAM family's ``x``), wrapped to :data:`WIDTH` columns
  (never inside a ````code```` span). Lines after the placeholder that are indented deeper continue
  the entry: a function adds a sentence of its own to a shared entry;
* a list of such entries, :data:`GROUPS` (``{args.grad_cam}``), in that order;
* a block of :data:`TEXT` (``{text.features_autograd}``: a paragraph, or whole sections), as written.

``help()``, ``__doc__`` and the docs site thus read as if the text were written out in each
docstring (docs/griffe_templates.py gives Griffe the filled docstring; docs/hooks.py fails the strict
build on a placeholder left in a page). A placeholder with no text here fails at import. A fragment
is shared only where the meaning is the same: a method whose argument differs keeps its own line.
"""
from __future__ import annotations

import re
import textwrap
from typing import Callable, Dict, List, Tuple, TypeVar

from .checks import value_error

__all__ = ["ARGS", "GROUPS", "TEXT", "WIDTH", "fill", "render", "entry", "unfilled"]

WIDTH = 100

# The reshape= of the CAM family; the gradient methods re-index the gradient with it too.
_RESHAPE = ("A callable from the layer's output to ``[B, K, *grid]`` (pytorch-grad-cam's ``reshape_transform``){}, "
            "e.g. ``tx.postprocess.tokens_to_grid(prefix_tokens=1)`` for ViT tokens or "
            "``tx.postprocess.channels_last_to_first`` for Swin; a layer whose output is a dict, list or tuple of "
            "tensors (an FPN backbone's levels) passes that structure to it (a method that cannot read one says so, "
            "naming the layer). Default: ``None``: the output must "
            "already be "
            "``[B, K, *grid]`` with ``x``'s rank and a grid down-sampled from ``x``'s by one factor; any other "
            "layout is refused, never guessed.")

# The generator= of the sampling methods of the feature family.
_GENERATOR = ("The source of the {}, on ``x``'s device; the same seed gives the same result, bit for bit (on the "
              "same device, with the same ``batch_size`` and batch). ``None`` draws from the global generator. "
              "Default: None.")

# The feature_mask= of the feature family; the methods with a limit on the number of features add it.
_FEATURE_MASK = ("Integer feature ids, broadcastable to ``x``'s shape: one mask for the batch (``[*input]`` or "
                 "any shape that broadcasts, e.g. ``[H, W]`` for images ``[B, C, H, W]``, see "
                 ":func:`torchex_fn.masks.grid`) or one per example (``[B, *input]``, e.g. ``[B, 1, H, W]`` "
                 "from :func:`torchex_fn.masks.superpixels`). Elements with the same id form one feature. Ids "
                 "need not be contiguous or start at 0: the features are the distinct ids of the whole mask "
                 "(with per-example masks, an id missing from one example is a feature that does nothing "
                 "there; it gets no element of that example). ``None``: every element is its own feature.")

ARGS: Dict[str, str] = {
    # every family
    "model_fn": "Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.",
    "params": "Name -> tensor mapping accepted by ``torch.func.functional_call``.",
    "target": "``None`` (predicted class), int, ``[B]`` ints, or a callable ``out -> [B]``.",
    "x.batch": "A batch ``[B, *input]``.",
    "x.float": "A batch ``[B, *input]``, floating point.",
    # gradient
    "x.gradient": ("A batch ``[B, *input]``, or a dict of named inputs batch first (the map is w.r.t. its one "
                   "floating-point entry, e.g. ``pixel_values``). With ``layer``, ``x`` may be integer token ids."),
    "post_process": "A callable applied to the ``[B, *input]`` map last (e.g. a normalisation).",
    # the path family's layer methods (conductance, internal influence)
    "x.path": ("A floating-point batch ``[B, *input]``, or a dict of named inputs batch first (the path runs in "
               "its one floating-point entry; the other entries are the same at every path point)."),
    "target.path": ("``None`` (the class predicted for ``x``, not for each path point; one extra forward), int, "
                    "``[B]`` ints, or a callable ``out -> [B]`` receiving the output of one chunk's examples for "
                    "one path point at a time, in ``x``'s order."),
    "baseline.path": ("The reference input ``x0``, in the input's space: a float, or a float tensor broadcastable "
                      "to ``x``; for a dict ``x`` a dict of the entries to replace, or a number / tensor for the "
                      "floating-point entry. Default: 0.0."),
    "batch_size.path": ("Memory cap: the most examples in one forward pass (``B`` times the path points per "
                        "chunk; one path point of ``batch_size`` examples when ``B > batch_size``). Default: "
                        "None (as many path points per forward as the input's size allows, as "
                        ":func:`integrated_gradients`). It never changes the result beyond floating-point "
                        "summation order."),
    # cam
    "x.cam": ("A batch ``[B, C, *spatial]``: sequences ``[B, C, T]``, images, volumes ``[B, C, D, H, W]`` "
              "(docs/input_ranks.md); tabular ``[B, F]`` has no grid and is refused."),
    "layer.cam": "Dotted module name or the module; a list / tuple / dict of them gives a list / dict of maps.",
    "relu.cam": "Keep only positive evidence, as in the paper. Default: True.",
    "upsample.cam": ("Resize to ``x``'s spatial size (linear, bilinear or trilinear for 1, 2 or 3 grid axes, "
                     "``align_corners=False``). Default: True."),
    "reshape.cam": _RESHAPE.format(""),
    "reshape.grad_cam": _RESHAPE.format(", applied to the activation and to its gradient alike"),
    # features
    "x.features": ("A batch ``[B, *input]``, floating point, or a dict of named inputs batch first whose one "
                   "floating-point entry is perturbed (every other entry goes with its example into each batch)."),
    "target.features": ("``None`` (the class the model ranks first for the unperturbed input: one extra forward of "
                        "``x``), an int, ``[B]`` ints (these index the tensor that ``functionalize(model, output=)`` "
                        "chooses), or a callable ``out -> [g]`` that receives the raw output of the ``g`` examples "
                        "of one chunk under one coalition at a time, in ``x``'s order."),
    "feature_mask": _FEATURE_MASK,
    "feature_mask.exact": _FEATURE_MASK + " At most 20 features (``MAX_EXACT_FEATURES``).",
    "feature_mask.regression": _FEATURE_MASK + " At most 10000 features (``MAX_REGRESSION_FEATURES``).",
    "baseline.features": ("The value of absent elements: a float, or a tensor broadcastable to ``[B, *input]`` "
                          "(one per example or one for all; as ``baseline`` elsewhere in the package). Default: 0.0."),
    "batch_size.features": ("Memory cap: the most perturbed examples in one forward pass. With ``B`` examples a "
                            "forward holds ``max(1, batch_size // B)`` coalitions times all ``B`` examples, or one "
                            "coalition times ``batch_size`` examples when ``B > batch_size``. It changes only the "
                            "grouping (results agree up to float rounding). Default: 64."),
    "generator.coalitions": _GENERATOR.format("coalitions"),
    "generator.permutations": _GENERATOR.format("permutations"),
    "layer.features": ("Attribute to this layer's output instead of ``x`` (a dotted name or a module of a "
                       "``functionalize``-d model). Default: None."),
    # attention
    "x.attention": "A batch ``[B, C, H, W]`` (any ``[B, ...]`` with ``upsample=False``).",
    "layers.attention": "Indices of the attention calls used (``-1`` the last). Default: all.",
    "token.attention": ("Row of the query token read out (0: the class token); ``None`` averages the rows of all "
                        "tokens (models without a class token). Default: 0."),
    "prefix_tokens.attention": ("Non-patch tokens before the patches (class, distillation, register tokens), dropped "
                                "from the map. Default: 1."),
    "grid.attention": "Patch grid ``(h, w)``; inferred when the patch count is a square.",
    "upsample.attention": "Resize to ``x``'s spatial size (bilinear, as the CAM family). Default: True.",
    # evaluation
    "attribution.map": "``[B, H, W]``, ``[B, 1, H, W]`` or ``[B, C, h, w]`` (channels summed, resized).",
    "mask.object": "``[B, 1, H, W]`` or ``[B, H, W]``, bool (or nonzero = object).",
    "n_perturb_samples": "Perturbations per example. Default: 10.",
    "x.images": "Images ``[B, C, H, W]``.",
    "attribution.broadcast": "``[B, ...]`` of ``x``'s rank, broadcastable to ``x``.",
    "attribution.images": "``[B, C, H, W]`` or ``[B, 1, H, W]``, broadcastable to ``x``.",
    "target.metric": "``None`` (the class predicted for ``x``), an int or ``[B]`` ints.",
    # the robustness metrics (evaluation/robustness.py): a method called on perturbed inputs
    "method.perturbed": "``(model_fn, params, x, target) -> map``; called on stacks of perturbed batches.",
    "method.sensitivity": ("``(model_fn, params, x, target) -> map``, e.g. ``tx.saliency`` or "
                           "``functools.partial(tx.grad_cam, layer=\"features\")``; called on stacks of perturbed "
                           "batches."),
    "target.perturbed": "``None`` (the predicted class), an int or ``[B]`` ints; kept for the perturbed inputs.",
    "nr_samples.perturbed": "Perturbations per example. Default: 200.",
    "nr_samples.sensitivity": "Perturbations per example. Default: 200 (Quantus's).",
    "lower_bound.sensitivity": "Half-width of the uniform noise (or its lower end with ``upper_bound``). Default: 0.2.",
    "upper_bound.sensitivity": "Noise uniform in ``[lower_bound, upper_bound]`` instead. Default: None.",
    "perturb_func.sensitivity": ("``(x, generator) -> perturbed x`` of ``x``'s shape, called once per draw, in order. "
                                 "Default: None (:func:`uniform_noise` with the bounds)."),
    "similarity_func": "``(maps, perturbed maps) -> differences``, both ``[..., N]``. Default: None (``a - b``).",
    "norm_numerator": "``[..., N] -> [...]`` norm of the differences. Default: None (Euclidean).",
    "norm_denominator": "``[B, N] -> [B]`` norm of the map. Default: None (Euclidean; a zero norm counts as 1).",
    "return_nan_when_prediction_changes.sensitivity": ("NaN for an example when any draw changes its predicted "
                                                       "class (one more forward per draw). Default: False."),
    "batch_size.sensitivity": ("Perturbed inputs per call of ``method`` (at least one draw of the whole batch). "
                               "Default: 64."),
    "lower_bound.stability": "Lower end of the uniform noise. Default: 0.02.",
    "upper_bound.stability": ("Upper end of the uniform noise (``None``: ``[-lower_bound, lower_bound]``). "
                              "Default: 0.2."),
    "perturb_func.stability": ("``(x, generator) -> perturbed x``, called once per draw. Default: None "
                               "(:func:`uniform_noise`)."),
    "eps_min": "Replaces zeros in the divisions. Default: 1e-6.",
    "abs.robustness": "Compare magnitudes. Default: False.",
    "normalise.robustness": "Divide each map by its own largest magnitude first. Default: False.",
    "return_nan_when_prediction_changes.stability": ("NaN for an example when any draw changes its predicted class. "
                                                     "Default: True (Quantus's)."),
    "batch_size.perturbed": "Perturbed inputs per call of ``method``. Default: 64.",
    "generator.noise": "Source of the noise. Default: None (the global generator).",
    # generated text
    "model_fn.lm": ("Pure ``(params, ids) -> out`` of a causal language model (e.g. ``functionalize(gpt2)``); "
                    "``out`` is logits ``[B, T, vocab]`` or a ``ModelOutput`` / dict with ``logits`` (else choose "
                    "it with ``functionalize(model, output=...)``)."),
    "prompt_ids": "``[B, T_in]`` integer token ids (one length for all prompts).",
    "continuation_ids": ("``[B, T_out]`` integer token ids of the continuation, e.g. generated (or ``[T_out]``, the "
                         "same for every example)."),
    "mask.continuation": ("``[B, T_out]`` (or ``[T_out]``) bool or 0/1 marking the real continuation tokens (right "
                          "padding, for continuations of different lengths). ``None``: all."),
}

GROUPS: Dict[str, Tuple[str, ...]] = {
    "args.grad_cam": ("model_fn", "params", "x.cam", "target", "layer.cam", "relu.cam", "upsample.cam",
                      "reshape.grad_cam"),
    "args.features": ("model_fn", "params", "x.features", "target.features"),
    "args.attention_map": ("prefix_tokens.attention", "grid.attention", "upsample.attention"),
    # the faithfulness metrics (evaluation/faithfulness.py): model, input, map, target
    "args.faithfulness": ("model_fn", "params", "x.float", "attribution.broadcast", "target.metric"),
    "args.faithfulness_images": ("model_fn", "params", "x.images", "attribution.images", "target.metric"),
    # the robustness metrics: method, model, input, target; the options of the sensitivities and the stabilities
    "args.perturbed": ("method.perturbed", "model_fn", "params", "x.float", "target.perturbed"),
    "args.sensitivity": ("method.sensitivity", "model_fn", "params", "x.float", "target.perturbed",
                         "nr_samples.sensitivity", "lower_bound.sensitivity", "upper_bound.sensitivity",
                         "perturb_func.sensitivity", "similarity_func", "norm_numerator", "norm_denominator",
                         "abs.robustness", "normalise.robustness", "return_nan_when_prediction_changes.sensitivity",
                         "batch_size.sensitivity", "generator.noise"),
    "args.stability": ("nr_samples.perturbed", "lower_bound.stability", "upper_bound.stability",
                       "perturb_func.stability", "eps_min", "abs.robustness", "normalise.robustness",
                       "return_nan_when_prediction_changes.stability", "batch_size.perturbed", "generator.noise"),
}

# Blocks kept as written here (a paragraph, or whole sections), each line indented as the placeholder.
TEXT: Dict[str, str] = {
    "text.features_autograd": """\
Autograd is left as the caller has it: the result is an ordinary differentiable function of
``params``, ``x`` and ``baseline`` (plain forwards and tensor algebra), and it works under
``torch.func.vmap`` and ``torch.func.grad``. Wrap the call in ``torch.no_grad()`` when ``params``
require gradients but none is wanted: every forward pass is kept otherwise.""",
    "text.features_layer_returns": """\
Returns:
  ``[B, *input]`` attributions of ``x``'s device and dtype (every element its feature's value);
  with ``layer``, of the layer output's shape and dtype.""",
    "text.cam_maps": """\
Returns:
  Maps ``[B, 1, H, W]`` (``[B, 1, *grid]`` with ``upsample=False``), in ``layer``'s structure.

Raises:
  ValueError: an unknown layer (close names suggested), a layer never reached, an output
    that is not ``[B, K, *grid]`` (pass ``reshape=``), a target out of range, NaN input.
  TypeError: integer images, a bad target, layer or reshape type.""",
}

# A placeholder: ``{key}`` alone on a line (the key a dotted name).
_PLACEHOLDER = re.compile(r"^([ \t]*)\{([A-Za-z_][\w.]*)\}[ \t]*$", re.MULTILINE)
_CODE = re.compile(r"``.*?``")

F = TypeVar("F", bound=Callable)


def entry(key: str) -> str:
    """The Args entry ``name: text`` of :data:`ARGS`'s ``key``, on one line."""
    return f"{key.split('.')[0]}: {ARGS[key]}"


def _wrap(text: str, first: str, rest: str) -> List[str]:
    """``text`` wrapped to :data:`WIDTH` columns, never inside a ````code```` span."""
    kept = _CODE.sub(lambda m: m.group(0).replace(" ", "\0"), text)
    lines = textwrap.wrap(kept, WIDTH, initial_indent=first, subsequent_indent=rest, break_long_words=False,
                          break_on_hyphens=False)
    return [line.replace("\0", " ") for line in lines]


def _expand(key: str, indent: str, where: str) -> List[str]:
    if key in GROUPS:
        return [line for one in GROUPS[key] for line in _wrap(entry(one), indent, indent + "  ")]
    if key in ARGS:
        return _wrap(entry(key), indent, indent + "  ")
    if key in TEXT:
        return [indent + line if line.strip() else "" for line in TEXT[key].split("\n")]
    raise value_error("docs.fill", "a placeholder of torchex_fn/core/docs.py (ARGS, GROUPS or TEXT)",
                      f"{{{key}}} in the docstring of {where}")


def render(doc: str, where: str = "a docstring") -> str:
    """``doc`` with every placeholder line replaced by its text, at the placeholder's indentation."""
    return _PLACEHOLDER.sub(lambda m: "\n".join(_expand(m.group(2), m.group(1), where)), doc)


def fill(function: F) -> F:
    """Decorator: fill the placeholders of ``function``'s docstring (see the module's docstring).

    The function itself is returned, with only ``__doc__`` changed (``None`` under ``python -OO``
    stays ``None``).
    """
    if function.__doc__:
        function.__doc__ = render(function.__doc__, getattr(function, "__qualname__", repr(function)))
    return function


def unfilled(text: str) -> List[str]:
    """The placeholders left in ``text``: every ``{key}`` of a fragment here, wherever it stands (a docs
    page's HTML), and any other ``{name}`` alone on a line."""
    keys = [*ARGS, *GROUPS, *TEXT]
    found = [key for key in keys if "{" + key + "}" in text]
    return found + [m.group(2) for m in _PLACEHOLDER.finditer(text) if m.group(2) not in found]
