"""Type aliases shared by every module of the package.

Shape vocabulary used in docstrings: ``b`` batch, ``c h w`` an input image, ``*input`` any input,
``k`` layer channels, ``*spatial`` a layer's grid, ``classes`` model outputs, ``s`` samples/steps.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Dict, Mapping, Optional, Protocol, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["Params", "ModelFn", "Target", "LayerSpec", "Layer", "ModelView", "view_of", "module_of", "output_of",
           "lock_of", "aliases_of", "layer_names_of", "layer_name_of", "memo_owner_of", "params_check_of"]

Params = Mapping[str, Tensor]
"""Name -> tensor mapping accepted by ``torch.func.functional_call`` (parameters and buffers)."""

ModelFn = Callable[[Params, Any], Any]
"""A pure ``(params, x) -> out`` function; ``x`` a tensor or a mapping of named inputs, ``out`` a tensor,
a mapping (``logits``) or a tuple."""

Target = Union[None, int, Tensor, Callable[[Tensor], Tensor]]
"""``None`` (argmax per example), an ``int``, an integer ``[B]`` tensor, or ``out -> [B]``."""

LayerSpec = Union[str, torch.nn.Module]
"""A dotted module name (``"layer4.1"``) or the module object itself."""

Layer = Union[LayerSpec, Sequence[LayerSpec], Mapping[str, LayerSpec]]
"""One layer, or a list / tuple / dict of layers; results mirror the structure."""


class ModelView(Protocol):
    """What a ``model_fn`` that knows its module carries besides being a ``(params, x) -> out`` function.

    :class:`torchex_fn.core.model.FunctionalModel` (what :func:`torchex_fn.functionalize` returns) and a
    :class:`torchex_fn.core.model.Wrapped` around one implement it; a plain function does not. The package
    never reads these attributes directly: it asks the accessors below (:func:`module_of`, :func:`output_of`,
    :func:`lock_of`, :func:`aliases_of`, :func:`layer_names_of`, :func:`layer_name_of`, :func:`memo_owner_of`),
    which give ``None`` or an empty default for a ``model_fn`` without them.
    """

    module: nn.Module
    """The ``nn.Module`` the function evaluates: layers are named by their dotted path in it."""
    output: Any
    """``functionalize(..., output=)``: which tensor of a structured output integer and ``None`` targets index."""
    lock: Optional[ContextManager[Any]]
    """Serialises calls on :attr:`module` (a re-entrant lock per module): hold it while a hook is registered."""
    aliases: Sequence[Tuple[str, str]]
    """``(alias, name)`` for every parameter tied into a second module (GPT-2's ``lm_head.weight``)."""
    memo_owner: Any
    """What memos of layer shapes are kept under (weakly): the user's module, not a short-lived wrapper."""

    def __call__(self, params: Params, x: Any) -> Any: ...

    def layer_names(self) -> Dict[str, nn.Module]:
        """``{dotted name: submodule}`` of :attr:`module` (``""`` the module itself)."""
        ...

    def name_of(self, layer: nn.Module) -> str:
        """The dotted name of ``layer`` in :attr:`module`; ``KeyError`` when it is not part of it."""
        ...

    def check_params(self, fn: str, params: Params) -> None:
        """Raise a ``ValueError`` naming ``fn`` when ``params``'s keys do not fit :attr:`module`."""
        ...


def module_of(model_fn: Any) -> Optional[nn.Module]:
    """The ``nn.Module`` behind ``model_fn`` (:attr:`ModelView.module`), or ``None`` for a plain function."""
    module = getattr(model_fn, "module", None)
    return module if isinstance(module, nn.Module) else None


def view_of(model_fn: Any) -> Optional[ModelView]:
    """``model_fn`` itself when it knows its module (a :class:`ModelView`), else ``None``."""
    return model_fn if module_of(model_fn) is not None else None


def output_of(model_fn: Any) -> Any:
    """The ``output=`` choice ``model_fn`` carries (:attr:`ModelView.output`), else ``None``."""
    return getattr(model_fn, "output", None)


def lock_of(model_fn: Any) -> Optional[ContextManager[Any]]:
    """The lock serialising calls on ``model_fn``'s module (:attr:`ModelView.lock`), else ``None``."""
    return getattr(model_fn, "lock", None)


def aliases_of(model_fn: Any) -> Tuple[Tuple[str, str], ...]:
    """``(alias, name)`` of the tied parameters of ``model_fn``'s module (:attr:`ModelView.aliases`), else ``()``."""
    return tuple(getattr(model_fn, "aliases", ()))


def layer_names_of(model_fn: Any) -> Optional[Dict[str, nn.Module]]:
    """``{dotted name: submodule}`` (:meth:`ModelView.layer_names`), or ``None`` for a plain function."""
    view = view_of(model_fn)
    return None if view is None else view.layer_names()


def layer_name_of(model_fn: Any, layer: nn.Module) -> Optional[str]:
    """The dotted name of ``layer`` in ``model_fn``'s module (:meth:`ModelView.name_of`); ``None`` when ``layer``
    is not part of it or ``model_fn`` is a plain function."""
    view = view_of(model_fn)
    if view is None:
        return None
    try:
        return view.name_of(layer)
    except KeyError:
        return None


def memo_owner_of(model_fn: Any) -> Any:
    """What per-model memos are keyed by (:attr:`ModelView.memo_owner`): the module behind ``model_fn``, the
    function a :class:`~torchex_fn.core.model.Wrapped` wraps, or ``model_fn`` itself."""
    owner = getattr(model_fn, "memo_owner", None)
    if owner is not None:
        return owner
    module = module_of(model_fn)
    return model_fn if module is None else module


def params_check_of(model_fn: Any) -> Optional[Callable[[str, Params], None]]:
    """``check(fn, params)`` of ``params``'s keys against ``model_fn``'s module (:meth:`ModelView.check_params`),
    or ``None`` for a ``model_fn`` that knows no module."""
    check = getattr(model_fn, "check_params", None)
    return check if callable(check) and module_of(model_fn) is not None else None
