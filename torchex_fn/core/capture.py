"""Intermediate activations for the length of one call: read them, or perturb them.

The role of flax's ``sow`` / ``perturb`` / ``capture_intermediates`` for PyTorch:

* :func:`tap` is the identity unless a capture is active; hand-written models call it directly.
* :func:`intermediates` wraps a ``model_fn`` into one that returns ``(out, {name: activation})``;
  with ``perturb`` it returns ``activation + perturb[name]`` in place of the activation.
* :func:`layer_gradients` differentiates the target score w.r.t. a zero perturbation of each layer's
  output, which equals the gradient w.r.t. the activation. No backward hook is involved, the
  result composes with ``torch.func.grad`` / ``vmap``, and autograd computes only the path from the
  layers to the output (no parameter gradients, no input gradient).
* :func:`run_tail` runs the network from one layer on for ``n`` variants of one example's activation
  (the layers before it once, on the one example; the rest on the ``n`` rows): Ablation-CAM's chunks.

The active collector lives in a :class:`contextvars.ContextVar` set and reset in ``try/finally``
around one call, so a hook acts only for the call (and the thread) that asked for it. The
``model_fn`` built by :func:`torchex_fn.functionalize` registers forward hooks only for the names
the active capture asked for, and removes them before the call returns or raises.
"""
from __future__ import annotations

import contextvars
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.utils._pytree as _pytree
from torch import Tensor, nn

from . import checks as _checks, inputs as _inputs
from . import targets as _targets
from .autodiff import grad_of_sum, leaves
from .types import ModelFn, layer_name_of, layer_names_of, memo_owner_of, module_of

__all__ = ["tap", "intermediates", "capture", "layer_gradients", "LayerGradients", "resolve_layers", "run_tail",
           "TailMismatch"]


class _ShapeMismatch(Exception):
    """Internal: a memoised layer shape no longer matches; recompute and retry."""


class _Session:
    """What one call asked to capture, and what it found."""

    def __init__(self, names: Sequence[str], perturb: Optional[Mapping[str, Tensor]], fn: str,
                 replace: Optional[Mapping[str, Tensor]] = None, widen: bool = False,
                 transform: Optional[Mapping[str, Callable[[Any, Any], Any]]] = None,
                 enter: Optional[Mapping[str, Callable[[Any], None]]] = None, structured: bool = False):
        self.names = tuple(dict.fromkeys(names))
        self.structured = structured  # a layer may output a dict, list or tuple of tensors (an FPN's levels)
        self.transform = dict(transform or {})  # name -> (args, output) -> output, every call of the module
        self.enter = dict(enter or {})          # name -> (args) -> None, before every call of the module
        self.perturb = dict(perturb or {})
        self.replace = dict(replace or {})
        self.widen = widen    # a replacement may have more rows than the output of one example it replaces
        self.acts: Dict[str, Tensor] = {}
        self.fn = fn

    def visit(self, name: str, value: Any) -> Any:
        if name not in self.names:
            return value
        if name in self.acts:
            raise ValueError(f"{self.fn}: layer {name!r} was called more than once in one forward pass; "
                             "its activation is ambiguous. Name a layer that runs once (e.g. a block "
                             "instead of a shared activation module).")
        if not isinstance(value, Tensor) and not (self.structured and is_structure(value)):
            raise _checks.type_error(self.fn, f"layer {name!r} to output a tensor", _checks.describe(value),
                                     "Name a layer whose output is a single tensor.")
        self.acts[name] = value
        new = self.replace.get(name)
        if new is not None:
            if self.widen and _fits_widened(new, value):
                return new
            if not _same_shapes(new, value):
                raise _checks.value_error(self.fn, f"a replacement for layer {name!r} of its output's shape "
                                          f"{_shapes_of(value)}", _describe_structure(new))
            value = new
        delta = self.perturb.get(name)
        if delta is None:
            return value
        if isinstance(value, Tensor):
            if not isinstance(delta, Tensor) or delta.shape != value.shape or delta.dtype != value.dtype:
                raise _ShapeMismatch(name)
            return value + delta
        if not _same_shapes(delta, value, dtypes=True):
            raise _ShapeMismatch(name)
        return _pytree.tree_map(lambda v, d: v + d, value, delta)

    def hook(self, name: str) -> Callable:
        def forward_hook(module: nn.Module, args: Any, output: Any) -> Any:
            return self.visit(name, output) if _ACTIVE.get() is self else output
        return forward_hook

    def input_hook(self, name: str) -> Callable:
        """A forward pre-hook for the layer ``"<module>:input"``: the module's first positional argument."""
        def forward_pre_hook(module: nn.Module, args: Any) -> Any:
            if _ACTIVE.get() is not self:
                return None
            if not args:
                raise _checks.value_error(self.fn, f"layer {name!r}: a module called with a positional input",
                                          "a call with keyword arguments only")
            return (self.visit(name, args[0]), *args[1:])
        return forward_pre_hook

    def transform_hook(self, name: str) -> Callable:
        function = self.transform[name]

        def forward_hook(module: nn.Module, args: Any, output: Any) -> Any:
            return function(args, output) if _ACTIVE.get() is self else output
        return forward_hook

    def enter_hook(self, name: str) -> Callable:
        function = self.enter[name]

        def forward_pre_hook(module: nn.Module, args: Any) -> None:
            if _ACTIVE.get() is self:
                function(args)
        return forward_pre_hook


def is_structure(value: Any) -> bool:
    """Whether a layer's output is a non-empty dict, list or tuple of tensors (nested or not): what a
    layer method may read with ``structured=True`` (an FPN backbone's ``OrderedDict`` of levels)."""
    if not isinstance(value, (Mapping, list, tuple)):
        return False
    flat, _ = _pytree.tree_flatten(value)
    return bool(flat) and all(isinstance(t, Tensor) for t in flat)


def _shapes_of(value: Any) -> Any:
    """The shapes of a tensor or structure of tensors, as lists in plain dicts and lists (for messages)."""
    if isinstance(value, Tensor):
        return list(value.shape)
    if isinstance(value, Mapping):
        return {key: _shapes_of(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shapes_of(item) for item in value]
    return value


def _describe_structure(value: Any) -> str:
    if isinstance(value, Tensor):
        return _checks.describe(value)
    return f"{type(value).__name__} of shapes {_shapes_of(value)}"


def _same_shapes(new: Any, value: Any, dtypes: bool = False) -> bool:
    """``new`` has ``value``'s structure, and each tensor its shape (and dtype, with ``dtypes``)."""
    if isinstance(value, Tensor) or isinstance(new, Tensor):
        return (isinstance(new, Tensor) and isinstance(value, Tensor) and new.shape == value.shape
                and (not dtypes or new.dtype == value.dtype))
    flat_new, spec_new = _pytree.tree_flatten(new)
    flat, spec = _pytree.tree_flatten(value)
    return spec_new == spec and all(isinstance(a, Tensor) and a.shape == b.shape and (not dtypes or a.dtype == b.dtype)
                                    for a, b in zip(flat_new, flat))


def _fits_widened(new: Any, value: Any) -> bool:
    """``new`` stands for ``n`` rows of ``value``, an output of one example (:func:`run_tail`)."""
    if isinstance(value, Tensor) or isinstance(new, Tensor):
        return (isinstance(new, Tensor) and isinstance(value, Tensor) and value.shape[:1] == (1,)
                and new.shape[1:] == value.shape[1:])
    flat_new, spec_new = _pytree.tree_flatten(new)
    flat, spec = _pytree.tree_flatten(value)
    rows = {a.shape[0] for a in flat_new if isinstance(a, Tensor) and a.ndim}
    return spec_new == spec and len(rows) == 1 and all(
        isinstance(a, Tensor) and b.shape[:1] == (1,) and a.shape[1:] == b.shape[1:] for a, b in zip(flat_new, flat))


_ACTIVE: contextvars.ContextVar[Optional[_Session]] = contextvars.ContextVar("torchex_fn_capture", default=None)


def active() -> Optional[_Session]:
    """The capture session of the current call, if any (used by ``FunctionalModel``)."""
    return _ACTIVE.get()


def tap(name: str, value: Tensor) -> Tensor:
    """Mark ``value`` as the activation called ``name``: the identity unless a capture is active.

    Under an active capture that asked for ``name`` it records ``value`` and returns
    ``value + perturb[name]`` when a perturbation was given.

    Example:
      >>> def model_fn(params, x):
      ...     h = tap("hidden", torch.tanh(x @ params["w1"]))
      ...     return h @ params["w2"]
    """
    session = _ACTIVE.get()
    return value if session is None else session.visit(name, value)


def _run(model_fn, params, x, names: Sequence[str], perturb=None, fn: str = "capture", replace=None,
         widen: bool = False, transform=None, enter=None, structured: bool = False):
    session = _Session(names, perturb, fn, replace, widen, transform, enter, structured)
    token = _ACTIVE.set(session)
    try:
        out = model_fn(params, x)
    finally:
        _ACTIVE.reset(token)
    return out, session.acts


def _check_reached(fn: str, names: Sequence[str], acts: Mapping[str, Tensor], model_fn: Any = None) -> None:
    missing = [n for n in dict.fromkeys(names) if n not in acts]
    if not missing:
        return
    if module_of(model_fn) is None:
        # a plain function: its layers are what it passes to tap(); a module it runs itself (through
        # torch.func.functional_call or a call of its own) reports nothing
        raise _checks.value_error(
            fn, f"layer {missing[0]!r} to be called in the forward pass", "a model_fn not built by "
            "`tx.functionalize`, whose forward never marked it with `tx.tap`",
            "Layer methods see the submodules of a model_fn from `tx.functionalize` only (a function that "
            "calls `torch.func.functional_call` or the module itself hides them): build it with "
            "`model_fn, params = tx.functionalize(model)` and call that one inside your function "
            "(`lambda p, x: model_fn(p, normalize(x))` keeps the layer names). "
            f"In a function of your own, name the value: `h = tx.tap({missing[0]!r}, h)`.")
    raise _checks.value_error(fn, f"layer {missing[0]!r} to be called in the forward pass",
                              "a forward pass that never called it",
                              "Name a layer that the model's forward uses (check `model.named_modules()`).")


def intermediates(model_fn: ModelFn, *, layers: Sequence[str], perturb: Optional[Mapping[str, Tensor]] = None,
                  fn: str = "intermediates", replace: Optional[Mapping[str, Tensor]] = None,
                  transform: Optional[Mapping[str, Callable[[Any, Any], Any]]] = None,
                  enter: Optional[Mapping[str, Callable[[Any], None]]] = None,
                  structured: bool = False) -> Callable:
    """Wrap ``model_fn`` into ``(params, x) -> (out, {name: activation})`` for one call at a time.

    Args:
      model_fn: Pure ``(params, x) -> out``; layers are module names of a ``functionalize``-d
        model or names passed to :func:`tap`.
      layers: The names to capture (already resolved, see :func:`resolve_layers`).
      perturb: Optional ``{name: delta}``; the model continues with ``activation + delta``.
      replace: Optional ``{name: value}``; the model continues with ``value`` (of the activation's
        shape) in place of the activation, whose own value is still returned in ``acts`` (the layer
        attribution of integrated gradients runs the model from interpolated layer outputs).
      transform: Optional ``{name: f}``: every call of module ``name`` returns ``f(args, output)``
        instead of ``output`` (``args`` its positional inputs); not captured, and a module may run
        more than once (LRP marks activation modules this way).
      enter: Optional ``{name: f}``: ``f(args)`` runs before every call of module ``name`` (a forward
        pre-hook for the length of the call; attribution patching learns which attention runs this way).
      structured: Whether a layer may output a dict, list or tuple of tensors (an FPN backbone's
        ``OrderedDict`` of levels); its activation, perturbation and replacement are then structures of
        the same keys and shapes. Default False: such an output is a TypeError naming the layer.

    Raises:
      ValueError: right after the call, if a name was never reached.
    """
    names = tuple(layers)

    def wrapped(params, x):
        out, acts = _run(model_fn, params, x, names, perturb, fn, replace, transform=transform, enter=enter,
                         structured=structured)
        _check_reached(fn, names, acts, model_fn)
        return out, acts

    return wrapped


class TailMismatch(Exception):
    """Internal: a model whose rest after a layer does not run on a widened batch (see :func:`run_tail`)."""


def run_tail(model_fn, params, x: Any, name: str, values: Any, *, fn: str = "run_tail",
             structured: bool = False) -> Any:
    """The model's output when layer ``name``'s output on ONE example ``x`` (``[1, ...]``) is replaced by
    ``n`` rows ``values`` (``[n, *layer output]``): ``n`` variants of that example's activation, one forward.

    A module's forward cannot start in the middle, so the layers before ``name`` (the prefix) still
    run, but once, on the one example; ``name`` itself runs on it too, and everything after ``name`` (the
    tail) runs on the ``n`` rows. This equals ``n`` forwards of the example with the activation replaced
    whenever the tail meets the prefix's tensors only through broadcasting (residual additions, masks,
    scales): a tensor of one row broadcast over ``n`` rows equals the same tensor repeated ``n`` times,
    which is what the prefix would compute on ``n`` copies of the example (examples are independent in
    eval mode). That holds for any chain of layers (torchvision's ResNet: ``layer4 -> avgpool -> fc``;
    a ViT's blocks, whose residual stream runs through each block) and for skip connections that are
    added. A tail that concatenates a prefix tensor, reshapes by a batch size taken from ``x``, or
    otherwise needs the prefix's row count raises :class:`TailMismatch`, and so does an output whose
    tensors do not have ``n`` rows, or a list of per-example outputs (a torchvision detector's dicts)
    whose length is not ``n``; the caller then runs full forwards. With ``structured``, ``values`` is a
    structure of the layer's (dict, list or tuple) output, each tensor with ``n`` rows.

    Cost: one forward of one example up to ``name``, then the tail on ``n`` rows.

    Raises:
      TailMismatch: the tail does not run on the widened batch (see above).
    """
    if _inputs.batch_of(x) != 1:
        raise _checks.value_error(fn, "x with one example for a tail run", f"{_inputs.batch_of(x)} examples")
    try:
        out, acts = _run(model_fn, params, x, (name,), None, fn, {name: values}, widen=True, structured=structured)
    except RuntimeError as error:   # shapes that do not broadcast: the tail needs the prefix's rows
        raise TailMismatch(str(error)) from None
    _check_reached(fn, (name,), acts, model_fn)
    n = leaves(values)[0].shape[0]
    if isinstance(out, (list, tuple)) and out and all(isinstance(item, Mapping) for item in out):
        # one output per example (torchvision's detectors): the tail ran them as one example
        if len(out) != n:
            raise TailMismatch(f"{len(out)} per-example outputs, expected {n}")
        return out
    rows = [t.shape[0] for t in leaves(out) if t.ndim > 0]
    if not rows or any(r != n for r in rows):
        raise TailMismatch(f"output rows {rows}, expected {n}")
    return out


# --------------------------------------------------------------------------------------------
# Layer specs: names, module objects, and structures of them.

INPUT = ":input"


def input_of(name: str) -> Optional[str]:
    """The module whose (first positional) input the layer name ``"<module>:input"`` stands for, else ``None``.

    A layer named ``"layer4:input"`` is the tensor ``layer4`` is called with (captum's
    ``attribute_to_layer_input=True``): it is read, replaced and perturbed like an output, by a forward
    pre-hook on ``layer4`` for the length of the call. ``":input"`` alone is the model's own input module (the
    root, ``""``)."""
    return name[:-len(INPUT)] if name.endswith(INPUT) else None


def _layer_name(fn: str, model_fn, spec: Any) -> str:
    if isinstance(spec, nn.Module):
        if module_of(model_fn) is None:
            raise _checks.type_error(fn, "layer given by name for a model_fn not built by functionalize",
                                     "an nn.Module", "Use `functionalize(model)` or name the tapped layer.")
        name = layer_name_of(model_fn, spec)
        if name is None:
            raise _checks.value_error(fn, "layer to be a submodule of the functionalized model",
                                      f"a {type(spec).__name__} that is not part of it")
        return name
    if isinstance(spec, str):
        known = layer_names_of(model_fn)
        base = input_of(spec)
        if base is not None and known is None:
            raise _checks.type_error(fn, f"a model_fn from functionalize for a layer's input ({spec!r})",
                                     _checks.describe(model_fn), "Build it with `tx.functionalize(model)`.")
        if known is not None:
            if (spec if base is None else base) not in known:
                raise _checks.unknown_name(fn, "layer", spec if base is None else base, known)
        return spec
    raise _checks.type_error(fn, "layer, a dotted name, an nn.Module, or a list/tuple/dict of them",
                             _checks.describe(spec))


def resolve_layers(fn: str, model_fn, layer: Any) -> Tuple[List[str], Callable[[Mapping[str, Any]], Any]]:
    """Names of the layers in ``layer``, and a function rebuilding ``layer``'s structure.

    One layer gives one value, a list or tuple a list, a dict a dict with the same keys.
    """
    if layer is None:
        raise _checks.type_error(fn, "layer, a dotted name or module", "None")
    if isinstance(layer, Mapping):
        if not layer:
            raise _checks.value_error(fn, "at least one layer", "an empty dict")
        keyed = {key: _layer_name(fn, model_fn, spec) for key, spec in layer.items()}
        return list(keyed.values()), lambda values: {key: values[name] for key, name in keyed.items()}
    if isinstance(layer, (list, tuple)):
        if not layer:
            raise _checks.value_error(fn, "at least one layer", f"an empty {type(layer).__name__}")
        names = [_layer_name(fn, model_fn, spec) for spec in layer]
        return names, lambda values: [values[name] for name in names]
    name = _layer_name(fn, model_fn, layer)
    return [name], lambda values: values[name]


def capture(model_fn, params, x: Tensor, layers: Any) -> Tuple[Any, Any]:
    """Run ``model_fn(params, x)`` once and return ``(out, activations)``.

    ``activations`` mirrors ``layers``: one tensor for one layer, a list for a list, a dict for a dict.

    Example:
      >>> out, acts = capture(model_fn, params, images, ["layer3", "layer4"])
      >>> [a.shape for a in acts]   # [[8, 256, 14, 14], [8, 512, 7, 7]]
    """
    _checks.check_model_fn("capture", model_fn)
    names, rebuild = resolve_layers("capture", model_fn, layers)
    out, acts = intermediates(model_fn, layers=names, fn="capture")(params, x)
    return out, rebuild(acts)


# --------------------------------------------------------------------------------------------
# Layer gradients by zero perturbation.

# Memo of layer output shapes, so that a layer gradient needs no extra forward pass to learn the
# perturbation's shape. Keyed weakly by the module (or model_fn); checked on every use.
_SHAPES: weakref.WeakKeyDictionary[Any, Dict[tuple, Dict[str, Tuple[torch.Size, torch.dtype]]]] = \
    weakref.WeakKeyDictionary()


def _shapes_key(names, x, params) -> tuple:
    if isinstance(x, Tensor):
        return (tuple(names), tuple(x.shape), x.dtype, x.device)
    return (tuple(names),) + tuple((k, tuple(v.shape), v.dtype, v.device) if isinstance(v, Tensor) else (k, v)
                                   for k, v in x.items())


def _probe_shapes(model_fn, params, x, names, fn, structured: bool = False) -> Dict[str, Any]:
    """Learn the layers' output shapes with one forward pass without autograd."""
    with torch.no_grad():
        _, acts = _run(model_fn, params, x, names, None, fn, structured=structured)
    _check_reached(fn, names, acts, model_fn)
    return {name: _shape_of(acts[name]) for name in names}


def _shape_of(value: Any) -> Any:
    """``(shape, dtype)`` of a tensor; ``(spec, [(shape, dtype), ...])`` of a structure of tensors."""
    if isinstance(value, Tensor):
        return value.shape, value.dtype
    flat, spec = _pytree.tree_flatten(value)
    return spec, [(t.shape, t.dtype) for t in flat]


def _zeros_like_shape(shape: Any, device: Any) -> Any:
    """Zeros of a :func:`_shape_of` (a tensor, or a structure of them)."""
    if isinstance(shape[0], torch.Size):
        return torch.zeros(shape[0], dtype=shape[1], device=device)
    spec, flat = shape
    return _pytree.tree_unflatten([torch.zeros(s, dtype=d, device=device) for s, d in flat], spec)


def layer_shapes(model_fn, params, x, names, fn, *, refresh: bool = False, structured: bool = False):
    """``{name: (shape, dtype)}`` of the layers' outputs for ``x``, from the memo (one forward without
    autograd on a miss, or when ``refresh``). With ``structured``, a layer that outputs a structure of
    tensors gives ``(spec, [(shape, dtype), ...])`` (its pytree spec and its tensors')."""
    owner = memo_owner_of(model_fn)
    key = _shapes_key(names, x, params) + (("structured",) if structured else ())
    try:
        memo = _SHAPES.setdefault(owner, {})
    except TypeError:  # not weak-referenceable: no memo
        memo = {}
    if refresh or key not in memo:
        memo[key] = _probe_shapes(model_fn, params, x, names, fn, structured)
    return memo[key]


class LayerGradients(NamedTuple):
    """What :func:`layer_gradients` returns; ``acts`` and ``grads`` are ``{name: tensor}``."""

    scores: Tensor          # [B] the target scores
    out: Any                # the model's output (its tensors: a ModelOutput becomes a dict without caches)
    acts: Dict[str, Tensor]
    grads: Dict[str, Tensor]


def layer_gradients(model_fn, params, x: Any, target: Any = None, *, layers: Sequence[str],
                    fn: str = "layer_gradients", replace: Optional[Mapping[str, Tensor]] = None,
                    structured: bool = False) -> LayerGradients:
    """Activations of ``layers`` and the gradient of the target scores w.r.t. them, in one pass.

    Each layer's output ``a`` is replaced by ``a + delta`` with ``delta = 0``; ``torch.func.vjp``
    of the summed target scores w.r.t. ``delta`` is ``d score / d a`` (examples are independent,
    so the gradient of the sum is every example's own gradient). Everything returned is a
    differentiable function of ``params`` and ``x``. ``x`` may be a dict of named inputs; integer
    and ``None`` targets index the output that ``functionalize(..., output=)`` selects.

    ``replace`` (``{name: value}``, see :func:`intermediates`) runs the model on from ``value`` in place of
    the layer's output; the gradient is then w.r.t. that value (integrated gradients at a layer).
    With ``structured``, a layer may output a dict, list or tuple of tensors; its activation and
    gradient are then structures of the same keys and shapes.

    Cost: one forward, one backward from the output down to the deepest of ``layers`` only.
    The perturbation's shape comes from a memo (a forward pass without autograd on a miss).
    """
    names = tuple(dict.fromkeys(layers))
    for attempt in range(2):
        shapes = layer_shapes(model_fn, params, x, names, fn, refresh=attempt > 0, structured=structured)
        device = _inputs.device_of(x)
        deltas = {name: _zeros_like_shape(shape, device) for name, shape in shapes.items()}

        def score_fn(deltas):
            out, acts = intermediates(model_fn, layers=names, perturb=deltas, fn=fn, replace=replace,
                                      structured=structured)(params, x)
            scores = _targets.resolve(out, target, fn=fn, output=_targets.selector(model_fn))
            return scores.sum(), (scores, _inputs.tensors_only(out), acts)

        try:
            grads, (scores, out, acts) = grad_of_sum(score_fn, deltas, has_aux=True)
        except _ShapeMismatch:
            if attempt:
                raise RuntimeError(f"{fn}: the layers' output shapes change between calls with the same "
                                   "input shape; cannot perturb them") from None
            continue
        return LayerGradients(scores, out, acts, grads)
    raise AssertionError("unreachable")
