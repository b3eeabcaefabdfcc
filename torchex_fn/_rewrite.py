"""Intercept nonlinear operations for the length of one call.

Modified back-propagation rules (DeepLIFT's Rescale rule, guided back-propagation) act on
*operations*, not on modules: a module reused in one forward (torchvision's ``BasicBlock`` calls
``self.relu`` twice), an in-place ``nn.ReLU(inplace=True)`` and a nonlinearity written as a function
(``F.relu``, ``torch.sigmoid``, ``x.relu()``) all reach the same few functions. :func:`run` enters a
:class:`torch.overrides.TorchFunctionMode` (public API) around one call of a model and hands every
call of a supported operation to a ``handler`` as a :class:`Call`; every other operation runs
unchanged. The mode is entered and left in ``try/finally`` (a ``with`` block), so it never outlives
the call, also when the model raises; modes are thread-local, so other threads are not affected.

Calls are numbered in the order the model makes them (``Call.index``), so that a caller running the
same model twice (on an input and on a baseline) can pair the k-th call of one pass with the k-th
call of the other.

In-place variants (``torch.relu_``, ``F.relu(x, inplace=True)``, ``x.sigmoid_()``) are handed over
as their out-of-place operation: the handler's result is returned to the model and the argument is
left unchanged. Code that uses the mutated argument instead of the returned value is not supported.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["Call", "run", "supported"]


class Call(NamedTuple):
    """One intercepted call of a supported operation.

    Attributes:
      index: Position of the call among the intercepted calls of this run (0, 1, ...).
      kind: ``"elementwise"`` (``y = f(z)`` element by element), ``"softmax"`` or ``"maxpool"``.
      name: The operation's canonical name (``"relu"``, ``"softmax"``, ``"max_pool2d"``, ...),
        the same for every spelling (module, function, method, in-place variant).
      input: The tensor input ``z`` (for ``softmax(..., dtype=)`` already cast to ``dtype``).
      apply: The operation, out of place, with its other arguments bound: ``z -> y`` (for
        ``"maxpool"``: ``z -> (y, indices)``, indices as ``return_indices=True`` gives them).
      options: Extra facts: ``dim`` for softmax; ``spatial`` (1, 2 or 3) and ``return_indices``
        (what the model asked for) for max pooling.
    """

    index: int
    kind: str
    name: str
    input: Tensor
    apply: Callable[[Tensor], Any]
    options: Mapping[str, Any]


Handler = Callable[[Call], Any]
_Bound = Tuple[str, str, Tensor, Callable[[Tensor], Any], Dict[str, Any]]


# --------------------------------------------------------------------------------------------
# Binders: each takes the arguments of one spelling of an operation and returns
# (kind, name, input, out-of-place op with the other arguments bound, options).

def _elementwise(name: str, op: Callable[[Tensor], Tensor]) -> Callable[..., _Bound]:
    def bind(input, *_, **__):  # the one-argument ops: sigmoid, tanh, relu, ... (inplace flag ignored)
        return "elementwise", name, input, op, {}
    return bind


def _bind_relu(input, inplace=False):
    return "elementwise", "relu", input, torch.relu, {}


def _bind_leaky_relu(input, negative_slope=0.01, inplace=False):
    return "elementwise", "leaky_relu", input, lambda z: F.leaky_relu(z, negative_slope), {}


def _bind_elu(input, alpha=1.0, inplace=False):
    return "elementwise", "elu", input, lambda z: F.elu(z, alpha), {}


def _bind_elu_aten(input, alpha=1.0, scale=1.0, input_scale=1.0):
    return "elementwise", "elu", input, lambda z: torch._C._nn.elu(z, alpha, scale, input_scale), {}


def _bind_celu(input, alpha=1.0, inplace=False):
    return "elementwise", "celu", input, lambda z: F.celu(z, alpha), {}


def _bind_softplus(input, beta=1.0, threshold=20.0):
    return "elementwise", "softplus", input, lambda z: F.softplus(z, beta, threshold), {}


def _bind_gelu(input, approximate="none"):
    return "elementwise", "gelu", input, lambda z: F.gelu(z, approximate=approximate), {}


def _bind_hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    return "elementwise", "hardtanh", input, lambda z: F.hardtanh(z, min_val, max_val), {}


def _softmax_dim(ndim: int) -> int:
    # the implicit dim of F.softmax(x) without dim (deprecated in torch, kept for old models)
    return 0 if ndim in (0, 1, 3) else 1


def _bind_softmax_functional(input, dim=None, _stacklevel=3, dtype=None):
    return _bind_softmax(input, dim, dtype)


def _bind_softmax(input, dim=None, dtype=None):
    dim = _softmax_dim(input.ndim) if dim is None else dim
    z = input if dtype is None else input.to(dtype)
    return "softmax", "softmax", z, lambda v: torch.softmax(v, dim), {"dim": dim}


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_ADAPTIVE_MAX_POOL = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


def _max_pool(n: int, *, indices: Optional[bool] = None) -> Callable[..., _Bound]:
    pool = _MAX_POOL[n]

    def bind(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        stride = None if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else stride

        def apply(z):
            return pool(z, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
        wants = return_indices if indices is None else indices
        return "maxpool", f"max_pool{n}d", input, apply, {"spatial": n, "return_indices": bool(wants)}
    return bind


def _adaptive_max_pool(n: int, *, indices: Optional[bool] = None) -> Callable[..., _Bound]:
    pool = _ADAPTIVE_MAX_POOL[n]

    def bind(input, output_size, return_indices=False):
        wants = return_indices if indices is None else indices
        return ("maxpool", f"adaptive_max_pool{n}d", input, lambda z: pool(z, output_size, return_indices=True),
                {"spatial": n, "return_indices": bool(wants)})
    return bind


def _registry() -> Dict[Any, Callable[..., _Bound]]:
    nn_ = torch._C._nn  # the functions that F.softplus, F.gelu, F.hardtanh_ ... are
    table: Dict[Any, Callable[..., _Bound]] = {}

    def add(binder, *funcs):
        for func in funcs:
            if func is not None:
                table[func] = binder

    get = getattr
    T = torch.Tensor
    add(_bind_relu, torch.relu, torch.relu_, F.relu, get(F, "relu_", None), T.relu, T.relu_)
    add(_bind_leaky_relu, F.leaky_relu, get(F, "leaky_relu_", None), get(nn_, "leaky_relu", None),
        get(nn_, "leaky_relu_", None))
    add(_bind_elu, F.elu)
    add(_bind_elu_aten, get(nn_, "elu", None), get(nn_, "elu_", None), get(F, "elu_", None))
    add(_elementwise("selu", torch.selu), F.selu, torch.selu, get(torch, "selu_", None))
    add(_bind_celu, F.celu, torch.celu, get(torch, "celu_", None))
    add(_elementwise("sigmoid", torch.sigmoid), torch.sigmoid, get(torch, "sigmoid_", None), T.sigmoid,
        T.sigmoid_, F.sigmoid, get(torch.special, "expit", None))
    add(_elementwise("tanh", torch.tanh), torch.tanh, get(torch, "tanh_", None), T.tanh, T.tanh_, F.tanh)
    add(_bind_softplus, F.softplus)
    add(_bind_gelu, F.gelu)
    add(_elementwise("silu", F.silu), F.silu, get(nn_, "silu", None), get(nn_, "silu_", None))
    add(_elementwise("mish", F.mish), F.mish, get(nn_, "mish", None), get(nn_, "mish_", None))
    add(_elementwise("hardswish", F.hardswish), F.hardswish, get(nn_, "hardswish", None),
        get(nn_, "hardswish_", None))
    add(_elementwise("hardsigmoid", F.hardsigmoid), F.hardsigmoid, get(nn_, "hardsigmoid", None),
        get(nn_, "hardsigmoid_", None))
    add(_elementwise("logsigmoid", F.logsigmoid), F.logsigmoid)
    add(_bind_hardtanh, F.hardtanh, get(F, "hardtanh_", None), get(nn_, "hardtanh", None), get(nn_, "hardtanh_", None))
    add(_elementwise("relu6", F.relu6), F.relu6, get(nn_, "relu6", None), get(nn_, "relu6_", None))
    add(_bind_softmax_functional, F.softmax)
    add(_bind_softmax, torch.softmax, T.softmax)
    for n in (1, 2, 3):
        add(_max_pool(n), _MAX_POOL[n], get(torch, f"max_pool{n}d", None))
        add(_max_pool(n, indices=True), get(F, f"max_pool{n}d_with_indices", None),
            get(torch, f"max_pool{n}d_with_indices", None), get(nn_, f"max_pool{n}d_with_indices", None))
        add(_adaptive_max_pool(n), _ADAPTIVE_MAX_POOL[n])
        add(_adaptive_max_pool(n, indices=True), get(F, f"adaptive_max_pool{n}d_with_indices", None))
    return table


_REGISTRY = _registry()


SUPPORTED = ("relu", "leaky_relu", "elu", "selu", "celu", "sigmoid", "tanh", "softplus", "gelu", "silu", "mish",
             "hardswish", "hardsigmoid", "logsigmoid", "hardtanh", "relu6", "softmax",
             "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
             "adaptive_max_pool3d")
"""Canonical names of the operations that :func:`run` hands to a handler (``Call.name``)."""


def supported() -> Tuple[str, ...]:
    """The canonical names of the operations that :func:`run` hands to a handler."""
    return SUPPORTED


class _Mode(TorchFunctionMode):
    """Hands supported operations to ``handler``; everything else runs unchanged.

    Inside ``__torch_function__`` torch has already taken the mode off the stack, so the handler
    and pass-through calls run without interception (no call is seen twice).
    """

    def __init__(self, handler: Handler):
        super().__init__()
        self.handler = handler
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        binder = _REGISTRY.get(func)
        if binder is not None:
            kind, name, z, apply, options = binder(*args, **kwargs)
            if isinstance(z, Tensor) and z.is_floating_point():
                call = Call(self.count, kind, name, z, apply, options)
                self.count += 1
                return self.handler(call)
        return func(*args, **kwargs)


def run(fn: Callable[..., Any], handler: Handler, *args: Any, **kwargs: Any) -> Tuple[Any, int]:
    """Call ``fn(*args, **kwargs)`` with every supported operation handed to ``handler``.

    Args:
      fn: Any callable, typically a ``model_fn``.
      handler: ``Call -> value``; the value is returned to the model in place of the operation's
        result (for max pooling with ``return_indices`` a ``(values, indices)`` pair).
      *args: Passed to ``fn``; **kwargs likewise.

    Returns:
      ``(fn's result, number of intercepted calls)``.

    Example:
      >>> out, n = run(model_fn, lambda call: call.apply(call.input), params, x)   # an unchanged run
    """
    mode = _Mode(handler)
    with mode:  # pushed here and popped in __exit__, which runs as a `finally` when fn raises
        out = fn(*args, **kwargs)
    return out, mode.count
