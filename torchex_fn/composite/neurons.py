"""``neuron(method, layer=, index=)``: any attribution method, explaining one neuron of a layer instead of an output.

The method runs unchanged on a wrapped ``model_fn`` whose output is the neuron's value ``[B, 1]`` (read
from the layer by a forward hook held for the length of each call, which also ends the forward there once a
first call has shown that the layer runs once per forward: the layers after it then never run), with target
``0``. So what holds for
the method holds for the neuron: integrated gradients sum to ``n(x) - n(x0)``, DeepLIFT too, and the
result is a differentiable function of ``params`` that ``vmap`` runs over ensembles.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict

from torch import Tensor

from ..core import checks as _checks
from ..core import targets as _targets
from ..core.capture import resolve_layers
from ..core.model import Wrapped
from ..core.types import ModelFn, Params, module_of

__all__ = ["neuron"]

# Layers known to run once per forward (True) or more often (False), learnt from a whole forward at their first
# use: only the first kind may end the forward (a module called twice, such as a ReLU a residual block
# reuses, gives the neuron of its last call, which needs the forward beyond the first one).
_CALLED_ONCE: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def neuron(method: Callable[..., Any], *, layer: Any, index: Any) -> Callable[..., Any]:
    """Turn ``method`` into the attribution of one neuron of ``layer`` (captum's ``Neuron*`` classes).

    ``neuron(tx.integrated_gradients, layer="layer3", index=(7, 2, 2))`` is a function
    ``(model_fn, params, x, **options) -> map`` that calls ``method(model_fn', params, x, 0, **options)``
    where ``model_fn'(params, x)`` runs the model and returns the neuron's value ``[B, 1]``. It equals
    captum's ``NeuronGradient`` (``tx.saliency``), ``NeuronIntegratedGradients``
    (``tx.integrated_gradients``), ``NeuronGradientShap`` (``tx.gradient_shap``; captum draws per
    example, ``tx.gradient_shap`` one draw per sample shared by the batch: equal when both are given the
    same draws, e.g. one example, or one baseline with ``stdev=0``), ``NeuronDeepLift`` (``tx.deeplift``),
    ``NeuronGuidedBackprop`` (``tx.guided_backprop``) and ``NeuronFeatureAblation``
    (``tx.feature_ablation``), with the same options.

    Args:
      method: An attribution method ``method(model_fn, params, x, target, **options)``: any of the
        package's per-input methods (``tx.saliency``, ``tx.integrated_gradients``, ``tx.deeplift``, ...).
      layer: The layer whose output holds the neuron: a dotted name or module of the model.
      index: The neuron: a tuple of ints into the layer's output without the batch axis, e.g. ``(3, 5, 5)``
        for channel 3 at row 5, column 5 (slices, and the axes an index shorter than the layer's rank
        leaves, are summed: ``(3,)`` is all of channel 3); or a callable ``layer output -> [B]``.

    Returns:
      A function ``(model_fn, params, x, **options)`` returning ``method``'s map for the neuron. The
      ``model_fn`` must come from :func:`torchex_fn.functionalize` (the layer is read by a forward hook on
      its module, removed when the call ends; the forward ends at the layer, so the layers after it cost
      nothing, from the second call on a model's layer, which the first showed to run once per forward, and
      unless the method itself reads or perturbs a later layer of its own, e.g. ``layer=``; a layer that runs
      more than once gives the neuron of its last call, as captum, from whole forwards). With the method's own
      ``layer=`` at the neuron's layer, the neuron is read from what the method puts there (layer integrated
      gradients then give ``n(x) - n(x0)`` at the neuron's index).

    Raises:
      TypeError: ``method`` not callable, a bad ``index`` (at once); at the call, a ``model_fn`` without a
        module, or a ``target=`` (the neuron is the target).
      ValueError: at the call, an unknown layer, several layers, an index out of the layer's shape.

    Example:
      >>> ig_neuron = tx.neuron(tx.integrated_gradients, layer="layer3", index=(7, 2, 2))
      >>> ig_neuron(fn, params, images, steps=32).shape                      # [8, 3, 224, 224]
    """
    fn = "neuron"
    if not callable(method):
        raise _checks.type_error(fn, "method, an attribution method (model_fn, params, x, target, ...)",
                                 _checks.describe(method))
    index = _targets.check_neuron_index(fn, index)

    def attribute(model_fn: ModelFn, params: Params, x: Any, **options: Any) -> Any:
        if "target" in options:
            raise _checks.type_error(fn, "no target= (the neuron is the target)", _checks.describe(options["target"]))
        module: Any = module_of(model_fn)
        if module is None:
            raise _checks.type_error(fn, "a model_fn from torchex_fn.functionalize (the layer is read by a forward "
                                     "hook on its module)", _checks.describe(model_fn))
        names, _ = resolve_layers(fn, model_fn, layer)
        if len(names) != 1:
            raise _checks.value_error(fn, "one layer (a dotted name or module)", f"{len(names)} layers")
        seen: Dict[str, Any] = {"calls": 0}
        try:
            owner: Any = module.get_submodule(names[0])
            once = _CALLED_ONCE.get(owner)
        except (AttributeError, TypeError):   # not a submodule (a layer's input), not weak-referenceable
            owner, once = None, False

        def keep(module: Any, args: Any, output: Any) -> None:
            seen["acts"] = output     # a module called more than once: its last call's output, as captum
            seen["calls"] += 1

        def value(x_given: Any, out: Any) -> Tensor:
            if once is None and owner is not None:   # a whole forward: how often the layer ran in it
                _CALLED_ONCE[owner] = seen["calls"] == 1
            seen["calls"] = 0
            return _targets.neuron_value(fn, index, seen.pop("acts"))[:, None]

        # the forward ends at the layer (nothing after it is needed for the neuron) once a whole forward has
        # shown that the layer runs once in it
        neuron_fn = Wrapped(model_fn, hook=(names[0], keep), after=value, output=None, end=bool(once),
                            last=True)   # after the method's own hooks: the neuron of what they put in place
        return method(neuron_fn, params, x, 0, **options)

    name = getattr(method, "__name__", "method")
    attribute.__name__ = attribute.__qualname__ = f"neuron_{name}"
    return attribute
