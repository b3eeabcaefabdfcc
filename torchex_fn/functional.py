"""``functionalize(module) -> (model_fn, params)``: a pure function view of an ``nn.Module``."""
from __future__ import annotations

import threading
import weakref
from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from . import _autodiff, _checks
from .capture import active as _active_capture

__all__ = ["functionalize", "FunctionalModel", "params_of"]

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_for(module: nn.Module) -> threading.RLock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


def params_of(module: nn.Module) -> Dict[str, Tensor]:
    """Parameters and buffers of ``module`` as a detached name -> tensor dict.

    Parameters share storage with the module (no copy; nothing writes to them). Buffers are
    cloned, so that a module left in training mode (BatchNorm statistics) cannot write into the
    user's module through them.
    """
    params = {name: p.detach() for name, p in module.named_parameters()}
    params.update({name: b.detach().clone() for name, b in module.named_buffers()})
    return params


class FunctionalModel:
    """``model_fn(params, x) -> out`` for one ``nn.Module``, built by :func:`functionalize`.

    Calls ``torch.func.functional_call``. It keeps the module so that layers can be named by
    their dotted path, and registers forward hooks only for the layers that the active
    :mod:`torchex_fn.capture` asked for, only for the length of one call. Calls on one module are
    serialised by a per-module lock, because ``functional_call`` swaps tensors into the shared
    module for the length of the call (two threads with different ``params`` would otherwise see
    each other's weights).
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self._lock = _lock_for(module)
        self._names: Dict[nn.Module, str] = {}

    def layer_names(self) -> Dict[str, nn.Module]:
        return dict(self.module.named_modules())

    def name_of(self, layer: nn.Module) -> str:
        for name, mod in self.module.named_modules():
            if mod is layer:
                return name
        raise KeyError(layer)

    def __call__(self, params, x: Tensor):
        session = _active_capture()
        with self._lock:
            handles = []
            try:
                if session is not None:
                    modules = self.layer_names()
                    for name in session.names:
                        if name in modules:
                            handles.append(modules[name].register_forward_hook(session.hook(name)))
                with _autodiff.attention_context(params, x):  # twice-differentiable attention when needed
                    return torch.func.functional_call(self.module, params, (x,))
            finally:
                for handle in handles:
                    handle.remove()

    def __repr__(self) -> str:
        return f"FunctionalModel({type(self.module).__name__})"


def functionalize(module: nn.Module) -> Tuple[FunctionalModel, Dict[str, Tensor]]:
    """Split an ``nn.Module`` into a pure function and its tensors.

    Args:
      module: Any ``nn.Module``. It is never mutated (no ``.eval()``, no ``requires_grad_``).
        Attribution assumes inference behaviour: put the model in eval mode yourself.

    Returns:
      ``(model_fn, params)`` where ``model_fn(params, x) -> module(x)`` evaluated with ``params``
      swapped in, and ``params`` is a dict of the module's parameters (detached, shared storage)
      and buffers (detached copies), keyed by their dotted names.

    Raises:
      TypeError: ``module`` is not an ``nn.Module``.

    Example:
      >>> model_fn, params = functionalize(resnet.eval())
      >>> model_fn(params, images).shape                     # [8, 3, 224, 224] -> [8, 1000]
      >>> ens = torch.func.stack_module_state([m1, m2])[0]   # ensembles: vmap over stacked params
    """
    if not isinstance(module, nn.Module):
        raise _checks.type_error("functionalize", "module, an nn.Module", _checks.describe(module))
    return FunctionalModel(module), params_of(module)
