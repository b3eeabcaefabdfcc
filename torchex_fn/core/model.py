"""``functionalize(module) -> (model_fn, params)``: a pure function view of an ``nn.Module``."""
from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from . import autodiff as _autodiff, checks as _checks
from .capture import INPUT as _capture_input
from .capture import active as _active_capture
from . import env as _env
from .types import Params, aliases_of, lock_of, memo_owner_of, module_of, output_of, params_check_of

__all__ = ["functionalize", "FunctionalModel", "Wrapped", "params_of", "split_params"]

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_for(module: nn.Module) -> threading.RLock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


def _differentiable(t: Tensor) -> bool:
    """A tensor ``torch.func.grad`` can take a derivative with respect to (floating point or complex)."""
    return t.is_floating_point() or t.is_complex()


def params_of(module: nn.Module) -> Dict[str, Tensor]:
    """Parameters and floating-point buffers of ``module`` as a detached name -> tensor dict.

    Parameters share storage with the module (no copy; nothing writes to them). Buffers are
    cloned, so that a module left in training mode (BatchNorm statistics) cannot write into the
    user's module through them. Integer and boolean buffers (batch norm's ``num_batches_tracked``,
    index tables) are left out, so that ``torch.func.grad(loss)(params)`` works as written (it
    refuses tensors that cannot require gradients): the ``model_fn`` of :func:`functionalize` takes
    them from the module when ``params`` does not give them.
    """
    params = {name: p.detach() for name, p in module.named_parameters()}
    params.update({name: b.detach().clone() for name, b in module.named_buffers() if _differentiable(b)})
    return params


def split_params(model_fn: Any, params: Params) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """``(weights, buffers)``: ``params`` split into the module's parameters and everything else.

    ``torch.func.grad`` differentiates w.r.t. every tensor of its argument, and batch norm refuses a
    derivative w.r.t. its running statistics (``params`` holds the floating-point buffers, so that
    ``model_fn(params, x)`` is the whole model). Differentiate w.r.t. the weights and pass the rest along.

    Args:
      model_fn: A ``model_fn`` from :func:`functionalize` (it knows which names are parameters).
      params: The name -> tensor mapping to split; a name tied to a parameter counts as one.

    Returns:
      Two dicts whose union is ``params``.

    Raises:
      TypeError: ``model_fn`` does not know its module, or ``params`` is not a mapping.

    Example:
      >>> weights, buffers = split_params(model_fn, params)
      >>> g = torch.func.grad(lambda w: tx.grad_cam(model_fn, {**buffers, **w}, x, y, layer="layer4").sum())(weights)
    """
    module = module_of(model_fn)
    if module is None:
        raise _checks.type_error("split_params", "model_fn from `functionalize(model)` (it knows the parameters)",
                                 _checks.describe(model_fn),
                                 "For a model written as a function, split the dict by its keys yourself.")
    _checks.check_params("split_params", params)
    names = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    weights = {k: v for k, v in params.items() if k in names}
    return weights, {k: v for k, v in params.items() if k not in names}


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


class _Keys:
    """The names ``params`` may and must have for one module, and the check of a ``params`` dict.

    * ``known``: every name of a parameter or buffer, tied ones and those of a module registered
      twice (``named_parameters(remove_duplicate=False)``, what ``state_dict()`` also lists) included;
    * ``required``: one name per tensor (its first), less the buffers that may be left out: those
      :func:`params_of` leaves out (integer and boolean ones) and non-persistent ones (``state_dict()``
      leaves those out: constant tables such as rotary frequencies); ``functional_call`` then takes the
      module's own (and ``FunctionalModel`` a copy of it for a module in training mode);
    * ``expected``: the keys of :func:`params_of` (the fast path of :meth:`check`);
    * ``stands_for``: a tied or second name -> the first name of its tensor (present when either is).
    """

    def __init__(self, module: nn.Module, strict: bool):
        self.strict = strict
        known: Dict[str, None] = {}
        required: List[str] = []
        expected: List[str] = []
        self.stands_for: Dict[str, str] = {}
        slots: Dict[tuple, str] = {}
        first: Dict[int, str] = {}
        for prefix, mod in module.named_modules(remove_duplicate=False):
            for kind, table in (("p", mod._parameters), ("b", mod._buffers)):
                for attr, value in table.items():
                    if value is None:
                        continue
                    name = f"{prefix}.{attr}" if prefix else attr
                    known[name] = None
                    slot = slots.setdefault((id(mod), attr), name)
                    owner = first.setdefault(id(value), slot)
                    if owner != name:
                        self.stands_for[name] = owner
                        continue
                    if kind == "p" or _differentiable(value):
                        expected.append(name)
                    if kind == "p" or (_differentiable(value) and attr not in mod._non_persistent_buffers_set):
                        required.append(name)
        self.known: FrozenSet[str] = frozenset(known)
        self.required: FrozenSet[str] = frozenset(required)
        self.expected: FrozenSet[str] = frozenset(expected)
        self.synonyms: Dict[str, List[str]] = {}
        for name, owner in self.stands_for.items():
            self.synonyms.setdefault(owner, []).append(name)

    def check(self, fn: str, params: Any) -> None:
        """``params``'s keys against the module's: an unknown key is always an error, a missing one unless
        ``strict=False``. A set comparison per call (microseconds for hundreds of keys)."""
        keys = params.keys()
        if keys == self.expected:
            return
        unknown = [k for k in keys if k not in self.known]
        if unknown:
            more = f" (and {len(unknown) - 1} more unknown keys)" if len(unknown) > 1 else ""
            error = _checks.unknown_name(fn, "params key", str(unknown[0]), sorted(self.known))
            raise ValueError(f"{error}{more} params takes the names of the model's parameters and buffers, "
                             "as `functionalize(model)` returns them; a misspelled key would otherwise leave "
                             "the module's own tensor in place.")
        if not self.strict:
            return
        missing = [k for k in sorted(self.required) if k not in keys
                   and not any(s in keys for s in self.synonyms.get(k, ()))]
        if missing:
            shown = ", ".join(repr(k) for k in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise _checks.value_error(
                fn, f"params with every parameter of the model ({len(self.required)} keys, as "
                "`functionalize(model)` returns them)", f"a dict without {shown}{more}",
                "A key left out would silently take the module's own tensor. Pass a full dict, e.g. "
                "`{**params, **changed}`; to let the keys left out take the module's own tensors on purpose, "
                "build the model_fn with `functionalize(model, strict=False)`.")


_STATISTICS_ERROR = re.compile(r"not differentiable with respect to argument '(running_\w+)'")
_RANK_ERROR = re.compile(r"expected \d+D|\d+D \(unbatched\)|got \d+D input", re.IGNORECASE)
_UNPACK_ERROR = re.compile(r"not enough values to unpack \(expected (\d+), got (\d+)\)")   # n, c, h, w = x.shape
_DTYPE_ERROR = re.compile(r"dtype|scalar type|datatype|type \(.*\) and .* type|should be the same", re.IGNORECASE)


def _explained(module: nn.Module, params: Any, x: Any, error: Exception) -> Optional[Exception]:
    """A clearer error for what a first call often gets wrong, or ``None``: a derivative w.r.t. batch norm's
    running statistics, an example without its batch axis, or an input of another floating-point dtype than
    the model's parameters."""
    text = str(error)
    fn = f"model_fn ({type(module).__name__} from functionalize)"
    statistics = _STATISTICS_ERROR.search(text)
    if statistics:
        return _checks.value_error(
            fn, "a derivative w.r.t. the parameters", f"one w.r.t. batch norm's {statistics.group(1)} (which "
            "`torch.func.grad(loss)(params)` asks for: params holds the floating-point buffers too)",
            "Differentiate w.r.t. the parameters only: `weights, buffers = tx.split_params(model_fn, params)`, "
            "then `torch.func.grad(lambda w: loss({**buffers, **w}))(weights)`.")
    if not isinstance(x, Tensor):
        return None
    unpack = _UNPACK_ERROR.search(text)
    if _RANK_ERROR.search(text) or (unpack and int(unpack.group(2)) == x.ndim == int(unpack.group(1)) - 1):
        return _checks.value_error(
            fn, "x with the batch axis first ([B, *input])", f"{_checks.describe(x)}, whose rank the model refused "
            f"({text.splitlines()[0] if text else type(error).__name__})",
            f"A single example needs its batch axis: `x[None]` (shape {(1, *x.shape)}).")
    if _DTYPE_ERROR.search(text) and x.is_floating_point():
        dtypes = {t.dtype for t in params.values() if isinstance(t, Tensor) and t.is_floating_point()}
        if dtypes and x.dtype not in dtypes:
            dtype = next(iter(dtypes))
            return _checks.type_error(
                fn, f"x of the parameters' dtype {dtype}", f"{_checks.describe(x)} "
                f"({text.splitlines()[0]})",
                f"Convert the input, `x.to({dtype})`, or the parameters, e.g. "
                f"`{{k: v.to({x.dtype}) for k, v in params.items()}}` (a float64 check such as gradcheck).")
    return None


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

    def __init__(self, module: nn.Module, output: Any = None, *, strict: bool = True):
        self.module = module
        self.output = output
        self.lock = _lock_for(module)
        self.memo_owner: Any = module
        self.aliases, self._caches = _aliases_and_caches(module)
        self._keys = _Keys(module, strict)
        # modules with buffers: in training mode they may write into them (batch norm's running statistics)
        self._stateful = [(mod, [(f"{prefix}.{b}" if prefix else b, b) for b, v in mod._buffers.items()
                                 if v is not None])
                          for prefix, mod in module.named_modules()
                          if any(v is not None for v in mod._buffers.values())]

    def check_params(self, fn: str, params: Params) -> None:
        """Raise a ``ValueError`` naming ``fn`` when ``params`` has a key the module does not know, or
        (``strict``, the default) lacks one of its parameters; see :func:`functionalize`."""
        self._keys.check(fn, params)

    def layer_names(self) -> Dict[str, nn.Module]:
        return dict(self.module.named_modules())

    def name_of(self, layer: nn.Module) -> str:
        for name, mod in self.module.named_modules():
            if mod is layer:
                return name
        raise KeyError(layer)

    def __call__(self, params, x: Tensor):
        _autodiff.enter_model(self.module)  # a model torch.func refuses goes to torch.autograd at once
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
                        elif name.endswith(_capture_input) and name[:-len(_capture_input)] in modules:
                            module = modules[name[:-len(_capture_input)]]
                            handles.append(module.register_forward_pre_hook(session.input_hook(name)))
                    for name in session.transform:
                        if name in modules:
                            handles.append(modules[name].register_forward_hook(session.transform_hook(name)))
                    for name in session.enter:
                        if name in modules:
                            handles.append(modules[name].register_forward_pre_hook(session.enter_hook(name)))
                if not _env.compiling():
                    self._keys.check("model_fn", params)
                full = dict(params)
                if self._keys.stands_for and full.keys() != self._keys.expected:
                    for name in [k for k in full if k in self._keys.stands_for]:  # a tied or second name given
                        full.setdefault(self._keys.stands_for[name], full[name])
                        del full[name]   # given again below (tied) or the same slot (swapped once)
                for mod, names in self._stateful:  # pure: a training-mode write lands in a copy, not in params
                    if mod.training:         # (or, for a buffer params leaves out, not in the module)
                        for n, b in names:
                            value = full.get(n, mod._buffers.get(b))
                            if isinstance(value, Tensor):
                                full[n] = value.clone()
                for alias, name in self.aliases:  # a tensor tied into another module: the same value
                    if name in full and alias not in full:
                        full[alias] = full[name]
                hidden = [(mod, attr, getattr(mod, attr)) for mod, attr in self._caches
                          if _is_tensor_cache(mod.__dict__.get(attr))]
                for mod, attr, _ in hidden:
                    setattr(mod, attr, {})
                args, kwargs = ((), dict(x)) if isinstance(x, Mapping) else ((x,), None)  # named inputs as keywords
                with _autodiff.attention_context(params, x):  # twice-differentiable attention when needed
                    try:
                        return torch.func.functional_call(self.module, full, args, kwargs, tie_weights=False)
                    except (RuntimeError, ValueError) as error:
                        clearer = _explained(self.module, params, x, error)
                        if clearer is None:
                            raise
                        raise clearer from error
            finally:
                for handle in handles:
                    handle.remove()
                for mod, attr, cache in reversed(hidden):
                    setattr(mod, attr, cache)

    def __repr__(self) -> str:
        chosen = "" if self.output is None else f", output={self.output!r}"
        return f"FunctionalModel({type(self.module).__name__}{chosen})"


_KEEP: Any = object()  # Wrapped(output=): keep the inner model_fn's choice


class _EndForward(Exception):
    """Raised by the hook of a ``Wrapped(..., end=True)`` to end the forward after its layer; one instance per
    call, so that each wrapper catches its own."""


def _ending(hook: Callable[..., Any], token: _EndForward) -> Callable[..., Any]:
    """``hook``, then the end of the forward (``token`` raised), unless an active capture still waits for a
    layer (its hook on the same module runs after this one, and layers further on have not run yet)."""
    def forward_hook(module: nn.Module, args: Any, output: Any) -> Any:
        result = hook(module, args, output)
        session = _active_capture()
        if session is None or all(name in session.acts for name in session.names):
            raise token
        return result
    return forward_hook


def _register(module: nn.Module, name: str, hook: Callable[..., Any], last: bool = False) -> Any:
    """``hook(module, args, output)`` on the layer ``name`` for the length of a call: a forward hook, or for
    ``"<module>:input"`` a forward pre-hook that hands the module's first argument over as ``output``.

    ``last``: ``hook`` runs after every hook of the layer, an active capture's included (those are registered
    inside the call, after this one), so it sees the output (or input) the capture has replaced. A pre-hook
    then appends a one-shot forward hook each time the layer runs; for ``":input"`` that hook reads the first
    argument as the pre-hooks left it, after the module ran."""
    if not last:
        if not name.endswith(_capture_input):
            return module.get_submodule(name).register_forward_hook(hook)

        def pre_hook(mod: nn.Module, args: Any) -> None:
            hook(mod, args, args[0])
        return module.get_submodule(name[:-len(_capture_input)]).register_forward_pre_hook(pre_hook)
    is_input = name.endswith(_capture_input)
    target = module.get_submodule(name[:-len(_capture_input)] if is_input else name)
    pending: list = []

    def once(mod: nn.Module, args: Any, output: Any) -> Any:
        pending.pop().remove()
        return hook(mod, args, args[0] if is_input else output)

    def arm(mod: nn.Module, args: Any) -> None:
        pending.append(mod.register_forward_hook(once))   # after the hooks registered so far

    armed = target.register_forward_pre_hook(arm)

    class _Handles:
        def remove(self) -> None:
            armed.remove()
            while pending:
                pending.pop().remove()
    return _Handles()


_NO_FORWARD: Any = object()


@contextlib.contextmanager
def forwards_replaced(pairs: List[Tuple[nn.Module, Callable[..., Any]]]) -> Any:
    """Each module's ``forward`` replaced by its callable for the length of the block, and put back on exit
    (an instance ``forward`` the module had is restored, else the attribute is removed). The caller holds
    the model's lock."""
    saved = []
    try:
        for module, forward in pairs:
            saved.append((module, module.__dict__.get("forward", _NO_FORWARD)))
            module.forward = forward
        yield
    finally:
        for module, previous in reversed(saved):
            if previous is _NO_FORWARD:
                del module.forward
            else:
                module.forward = previous


def _hooked(module: nn.Module) -> bool:
    """Whether anything hooks ``module`` or a module inside it (or every module): skipping it would hide a call."""
    if any((_nn_module._global_forward_hooks, _nn_module._global_forward_pre_hooks,
            _nn_module._global_backward_hooks, _nn_module._global_backward_pre_hooks)):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in module.modules())


@contextlib.contextmanager
def skipped(model_fn: Any, name: str, value: Any) -> Any:
    """For the length of the block, the submodule ``name`` of ``model_fn``'s module returns ``value`` without
    running: for a forward whose capture replaces that layer's whole output by ``value`` anyway, so its
    result is the same, minus the layer's own work (a detector's backbone, when its output is replaced).

    Under the model's lock, the module's ``forward`` is replaced and put back on exit. Nothing is skipped
    (the module runs, and the replacement happens in the capture as before) where skipping could change
    something seen: a layer input (``"<module>:input"``), a model without a module, hooks on or inside the
    module (the user's, a neuron's) or global module hooks, or ``torch.compile`` tracing.
    """
    module = module_of(model_fn)
    target = None
    if module is not None and not name.endswith(_capture_input) and not _env.compiling():
        try:
            target = module.get_submodule(name)
        except AttributeError:
            target = None
    lock = lock_of(model_fn) if target is not None else None
    with lock if lock is not None else contextlib.nullcontext():
        if target is None or _hooked(target):
            yield
            return
        with forwards_replaced([(target, lambda *args, **kwargs: value)]):
            yield


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
       see what ``fn`` returns; with ``last=True`` after them, so ``fn`` sees what they return, e.g. a value
       a method's ``layer=`` put in place of the layer's output);
    3. ``out = model_fn(params, x)``; with ``hook=`` and ``end=True`` the forward ends right after ``fn`` ran
       (an exception raised from the hook and caught here: the layers after ``name`` never run) and ``out``
       is ``None``, unless a capture active for the call still waits for a layer (then the whole forward
       runs, as without ``end``);
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
                 hook: Optional[Tuple[str, Callable[..., Any]]] = None, output: Any = _KEEP, end: bool = False,
                 last: bool = False):
        _checks.check_model_fn("Wrapped", model_fn)
        _checks.check_bool("Wrapped", "end", end)
        _checks.check_bool("Wrapped", "last", last)
        if end and hook is None:
            raise _checks.value_error("Wrapped", "hook= with end=True (the forward ends after the hook's layer)",
                                      "end=True without a hook")
        if hook is not None and module_of(model_fn) is None:
            raise _checks.type_error("Wrapped", "a model_fn that knows its module (from functionalize) for hook=",
                                     _checks.describe(model_fn))
        self.inner = model_fn
        self.module = module_of(model_fn)
        self.output = output_of(model_fn) if output is _KEEP else output
        self.lock = lock_of(model_fn)
        self.aliases = aliases_of(model_fn)
        self.memo_owner = memo_owner_of(model_fn)
        self._before, self._after, self._hook, self._end, self._last = before, after, hook, end, last

    def layer_names(self) -> Dict[str, nn.Module]:
        return self.inner.layer_names()

    def check_params(self, fn: str, params: Params) -> None:
        check = params_check_of(self.inner)
        if check is not None:
            check(fn, params)

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
            token = _EndForward()
            if self._end:
                hook = _ending(hook, token)
            with self.lock if self.lock is not None else contextlib.nullcontext():
                handle = _register(self.module, name, hook, self._last)
                try:
                    out = self.inner(params, x)
                except _EndForward as ended:
                    if ended is not token:   # another wrapper's end: not this call's to catch
                        raise
                    out = None
                finally:
                    handle.remove()
        return out if self._after is None else self._after(given, out)

    def __repr__(self) -> str:
        return f"Wrapped({self.inner!r})"


class _WrappedFunctional(Wrapped, FunctionalModel):
    """A :class:`Wrapped` around a :class:`FunctionalModel`: also a :class:`FunctionalModel` (its own
    ``__init__`` and ``__call__`` are :class:`Wrapped`'s; it evaluates through the inner one)."""


def functionalize(module: nn.Module, *, output: Any = None,
                  strict: bool = True) -> Tuple[FunctionalModel, Dict[str, Tensor]]:
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
      strict: Whether every call needs every parameter in ``params``. ``True`` (default): a key left out
        is a ``ValueError`` (pass full dicts, ``{**params, **changed}``). ``False``: the keys left out take
        the module's own tensors (a partial dict on purpose). Either way a key the module does not
        know (``"fc.weigth"``) is a ``ValueError`` naming the closest real key, and integer, boolean and
        non-persistent buffers may be left out (they come from the module). Tied parameters are
        present under any of their names.

    Returns:
      ``(model_fn, params)`` where ``model_fn(params, x) -> module(x)`` evaluated with ``params``
      swapped in, and ``params`` is a dict of the module's parameters (detached, shared storage)
      and floating-point buffers (detached copies), keyed by their dotted names. Integer and boolean
      buffers (batch norm's ``num_batches_tracked``) are left out of ``params``, so that
      ``torch.func.grad(loss)(params)`` differentiates w.r.t. all of it as written (the running
      statistics get their gradients too); ``model_fn`` takes them from the module.

    Raises:
      TypeError: ``module`` is not an ``nn.Module``; ``strict`` is not a bool. When ``model_fn`` is called:
        an input of another floating-point dtype than the parameters (the message names the conversion).
      ValueError: when ``model_fn`` is called: a ``params`` key the module does not know, a missing one
        (``strict``); an input the model refuses for its rank (a single example without its batch
        axis: ``x[None]``); ``torch.func.grad`` w.r.t. batch norm's running statistics (see
        :func:`split_params`).

    Example:
      >>> model_fn, params = functionalize(resnet.eval())
      >>> model_fn(params, images).shape                     # [8, 3, 224, 224] -> [8, 1000]
      >>> g = torch.func.grad(lambda p: tx.saliency(model_fn, p, images).square().sum())(params)
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
    _checks.check_bool("functionalize", "strict", strict)
    return FunctionalModel(module, output, strict=strict), params_of(module)
