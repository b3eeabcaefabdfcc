"""``functionalize(module) -> (model_fn, params)``: a pure function view of an ``nn.Module``."""
from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import autodiff as _autodiff, checks as _checks
from .capture import active as _active_capture
from . import env as _env
from .types import Params, aliases_of, lock_of, memo_owner_of, module_of, output_of

__all__ = ["functionalize", "FunctionalModel", "Wrapped", "params_of"]

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
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


def _aliases_and_caches(module: nn.Module):
    """Where ``functional_call`` must look beyond the names that ``named_parameters()`` gives.

    * aliases: ``(alias, name)`` for a parameter or buffer tied into a second module (GPT-2's
      ``lm_head.weight`` is ``transformer.wte.weight``): the alias gets the value given for the name.
      A module registered under two names (``self.shared`` also inside a ``Sequential``) is one slot:
      it is swapped once, under its first name. (Swapping it under both names, as ``functional_call``'s
      own ``tie_weights`` does, restores the first name's original and then overwrites it with the
      swapped-in tensor, leaving plain tensors in the user's module.)
    * caches: ``(module, attribute)`` of every public dict attribute, candidates for tensor caches
      such as timm LeViT's ``attention_bias_cache`` (a tensor derived from the parameters, kept in eval
      mode): see :func:`_is_tensor_cache`.
    """
    slots: Dict[tuple, str] = {}
    first: Dict[int, str] = {}
    aliases = []
    caches = []
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for attr, value in list(mod._parameters.items()) + list(mod._buffers.items()):
            if value is None or (id(mod), attr) in slots:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            slots[(id(mod), attr)] = name
            owner = first.setdefault(id(value), name)
            if owner != name:
                aliases.append((name, owner))
        for attr, value in vars(mod).items():
            if not attr.startswith("_") and type(value) is dict and (id(mod), attr) not in slots:
                slots[(id(mod), attr)] = attr
                caches.append((mod, attr))
    return aliases, caches


def _is_tensor_cache(value: Any) -> bool:
    """A plain dict whose values are all tensors: a cache of values derived from the parameters.

    For the length of a call such a dict is replaced by an empty one, so that the model recomputes its
    entries from the ``params`` of this call (a cache filled by an earlier call, or by the module's own
    eval-mode forward, would hold other parameters' values and no derivative w.r.t. these), and
    whatever the call writes into it is dropped with it.
    """
    return type(value) is dict and all(isinstance(v, Tensor) for v in value.values())


class FunctionalModel:
    """``model_fn(params, x) -> out`` for one ``nn.Module``, built by :func:`functionalize`.

    Calls ``torch.func.functional_call``. It is pure: ``params`` is never written, also when a module
    in training mode updates its buffers (batch norm's running statistics land in a copy that is
    dropped after the call; train such statistics with ``torch.func.functional_call`` directly).
    It keeps the module so that layers can be named by
    their dotted path, and registers forward hooks only for the layers that the active
    :mod:`torchex_fn.core.capture` asked for, only for the length of one call. Calls on one module are
    serialised by a per-module lock, because ``functional_call`` swaps tensors into the shared
    module for the length of the call (two threads with different ``params`` would otherwise see
    each other's weights).

    It implements :class:`torchex_fn.core.types.ModelView`: ``module``, ``output``, ``lock`` (the per-module
    lock), ``aliases`` (tied parameters), ``memo_owner`` (the module), ``layer_names()`` and ``name_of()``.
    """

    def __init__(self, module: nn.Module, output: Any = None):
        self.module = module
        self.output = output
        self.lock = _lock_for(module)
        self.memo_owner: Any = module
        self.aliases, self._caches = _aliases_and_caches(module)
        # modules with buffers: in training mode they may write into them (batch norm's running statistics)
        self._stateful = [(mod, [f"{prefix}.{b}" if prefix else b for b, v in mod._buffers.items() if v is not None])
                          for prefix, mod in module.named_modules()
                          if any(v is not None for v in mod._buffers.values())]

    def layer_names(self) -> Dict[str, nn.Module]:
        return dict(self.module.named_modules())

    def name_of(self, layer: nn.Module) -> str:
        for name, mod in self.module.named_modules():
            if mod is layer:
                return name
        raise KeyError(layer)

    def __call__(self, params, x: Tensor):
        session = _active_capture()
        # torch.compile cannot enter a lock; a compiled graph takes the parameters as its inputs and
        # swaps nothing into the module at run time, so there is nothing to serialise there.
        with contextlib.nullcontext() if _env.compiling() else self.lock:
            handles: list = []
            hidden: list = []
            try:
                if session is not None:
                    modules = self.layer_names()
                    for name in session.names:
                        if name in modules:
                            handles.append(modules[name].register_forward_hook(session.hook(name)))
                    for name in session.transform:
                        if name in modules:
                            handles.append(modules[name].register_forward_hook(session.transform_hook(name)))
                full = dict(params)
                for mod, names in self._stateful:  # pure: a training-mode write lands in a copy, not in params
                    if mod.training:
                        full.update((n, full[n].clone()) for n in names if isinstance(full.get(n), Tensor))
                for alias, name in self.aliases:  # a tensor tied into another module: the same value
                    if name in full and alias not in full:
                        full[alias] = full[name]
                hidden = [(mod, attr, getattr(mod, attr)) for mod, attr in self._caches
                          if _is_tensor_cache(mod.__dict__.get(attr))]
                for mod, attr, _ in hidden:
                    setattr(mod, attr, {})
                args, kwargs = ((), dict(x)) if isinstance(x, Mapping) else ((x,), None)  # named inputs as keywords
                with _autodiff.attention_context(params, x):  # twice-differentiable attention when needed
                    return torch.func.functional_call(self.module, full, args, kwargs, tie_weights=False)
            finally:
                for handle in handles:
                    handle.remove()
                for mod, attr, cache in reversed(hidden):
                    setattr(mod, attr, cache)

    def __repr__(self) -> str:
        chosen = "" if self.output is None else f", output={self.output!r}"
        return f"FunctionalModel({type(self.module).__name__}{chosen})"


_KEEP: Any = object()  # Wrapped(output=): keep the inner model_fn's choice


class Wrapped:
    """``model_fn`` with its view kept and only its call changed.

    The view (:class:`torchex_fn.core.types.ModelView`) is the inner ``model_fn``'s: its module, layer names,
    ``name_of``, lock, tied-parameter aliases and memo owner (so memos of layer shapes stay keyed by the
    user's model or function, not by this wrapper), and its ``output=`` choice unless ``output`` overrides it.
    Around a :class:`FunctionalModel` the wrapper is a :class:`FunctionalModel` too (what needs one, such as
    ``deeplift(backend="captum")``, accepts it); around a plain function it knows no module.

    A call ``wrapped(params, x)``:

    1. ``x = before(x)`` (when given);
    2. with ``hook=(name, fn)``: under the model's lock, ``fn`` is registered as a forward hook on the
       submodule ``name`` for the length of the call (before the hooks of an active capture, which therefore
       see what ``fn`` returns);
    3. ``out = model_fn(params, x)``;
    4. ``out = after(x_given, out)`` (when given; ``x_given`` the input the wrapper was called with).

    Example:
      >>> logits_fn = Wrapped(model_fn, after=lambda x, out: out.logits, output=None)
      >>> seen = []
      >>> spy = Wrapped(model_fn, after=lambda x, out: seen.append(out) or out)
    """

    inner: Any
    module: Any
    output: Any
    lock: Any
    aliases: Any
    memo_owner: Any

    def __new__(cls, model_fn: Any, **changes: Any) -> Wrapped:
        if cls is Wrapped and isinstance(model_fn, FunctionalModel):
            cls = _WrappedFunctional
        return super().__new__(cls)

    def __init__(self, model_fn: Any, *, before: Optional[Callable[[Any], Any]] = None,
                 after: Optional[Callable[[Any, Any], Any]] = None,
                 hook: Optional[Tuple[str, Callable[..., Any]]] = None, output: Any = _KEEP):
        _checks.check_model_fn("Wrapped", model_fn)
        if hook is not None and module_of(model_fn) is None:
            raise _checks.type_error("Wrapped", "a model_fn that knows its module (from functionalize) for hook=",
                                     _checks.describe(model_fn))
        self.inner = model_fn
        self.module = module_of(model_fn)
        self.output = output_of(model_fn) if output is _KEEP else output
        self.lock = lock_of(model_fn)
        self.aliases = aliases_of(model_fn)
        self.memo_owner = memo_owner_of(model_fn)
        self._before, self._after, self._hook = before, after, hook

    def layer_names(self) -> Dict[str, nn.Module]:
        return self.inner.layer_names()

    def name_of(self, layer: nn.Module) -> str:
        return self.inner.name_of(layer)

    def __call__(self, params: Params, x: Any) -> Any:
        given = x
        if self._before is not None:
            x = self._before(x)
        if self._hook is None:
            out = self.inner(params, x)
        else:
            name, hook = self._hook
            with self.lock if self.lock is not None else contextlib.nullcontext():
                handle = self.module.get_submodule(name).register_forward_hook(hook)
                try:
                    out = self.inner(params, x)
                finally:
                    handle.remove()
        return out if self._after is None else self._after(given, out)

    def __repr__(self) -> str:
        return f"Wrapped({self.inner!r})"


class _WrappedFunctional(Wrapped, FunctionalModel):
    """A :class:`Wrapped` around a :class:`FunctionalModel`: also a :class:`FunctionalModel` (its own
    ``__init__`` and ``__call__`` are :class:`Wrapped`'s; it evaluates through the inner one)."""


def functionalize(module: nn.Module, *, output: Any = None) -> Tuple[FunctionalModel, Dict[str, Tensor]]:
    """Split an ``nn.Module`` into a pure function and its tensors.

    ``model_fn(params, x)`` returns what the module returns. ``x`` is a tensor (passed as the one
    positional argument) or a dict of named inputs, batch first, passed as keywords
    (``{"input_ids": ..., "attention_mask": ...}`` for a HuggingFace model).

    Args:
      module: Any ``nn.Module``. It is never mutated (no ``.eval()``, no ``requires_grad_``).
        Attribution assumes inference behaviour: put the model in eval mode yourself (the methods
        warn with :class:`torchex_fn.TrainingModeWarning` when batch norm or dropout would run in
        training mode; the mode is read at every call). ``model_fn`` never writes into ``params``:
        batch norm in training mode normalises with batch statistics and updates only a copy.
      output: Which tensor of a structured output (a HuggingFace ``ModelOutput``, a dict, a tuple)
        integer and ``None`` targets index: a key or attribute name (``"logits"``), an index into a
        tuple (``0``), or a callable ``out -> [B, classes]`` (``lambda o: o.logits[:, -1]`` for the
        last position of a causal language model). ``None`` (default): the output itself when it is a
        tensor, its ``"logits"`` entry when it is a mapping that has one. Callable targets always
        receive the raw output.

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
      >>> bert_fn, bert_params = functionalize(bert.eval(), output="logits")
      >>> tx.saliency(bert_fn, bert_params, tokens, 1, layer="bert.embeddings")   # tokens: a tokenizer's dict
    """
    if not isinstance(module, nn.Module):
        raise _checks.type_error("functionalize", "module, an nn.Module", _checks.describe(module))
    if not (output is None or callable(output) or isinstance(output, str)
            or (isinstance(output, int) and not isinstance(output, bool))):
        raise _checks.type_error("functionalize", "output: None, a key or attribute name, a tuple index or a callable",
                                 _checks.describe(output))
    return FunctionalModel(module, output), params_of(module)
