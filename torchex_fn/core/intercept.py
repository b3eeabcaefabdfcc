"""Intercept operations for the length of one call: the one interceptor of the package.

Modified back-propagation rules (DeepLIFT, guided back-propagation, LRP) act on *operations*, not on
modules: a module reused in one forward (torchvision's ``BasicBlock`` calls ``self.relu`` twice), an
in-place ``nn.ReLU(inplace=True)`` and a nonlinearity written as a function (``F.relu``,
``torch.sigmoid``, ``x.relu()``, ``x * x.sigmoid()``) all reach the same few functions. :func:`run`
enters a :class:`torch.overrides.TorchFunctionMode` (public API) around one call of a model. The
mode is entered and left in ``try/finally`` (a ``with`` block), so it never outlives the call, also
when the model raises; modes are thread-local, so other threads are not affected. The attention
methods (rollout, gradient rollout, LeGrad) use the same mode to read and perturb the attention
probabilities, which fused attention never forms.

Three ways to run:

* **Activations only** (``tainted=None``; guided back-propagation): every call of a known
  activation, softmax or max pooling is handed to the ``handler`` as a :class:`Call`; everything
  else runs unchanged.
* **Attention only** (``tainted=None, attention=True``; the attention methods): every call of
  ``F.scaled_dot_product_attention`` and ``F.multi_head_attention_forward`` is computed by the
  decomposition of :mod:`torchex_fn.core.attention`, and its probabilities are handed over as a
  :class:`Call` of kind ``"attention"``, in call order; everything else runs unchanged.
* **Tracking the input** (``tainted=[x]``; DeepLIFT): the mode follows which tensors depend on the
  given ones ("tainted": an operation's floating-point outputs are tainted when one of its tensor
  arguments is). Operations on untainted tensors run unchanged (``w * x`` with ``w`` a parameter is
  linear in ``x``). Every operation with a tainted argument is sorted into one of:

  - *linear* (affine) in its tainted arguments: conv / linear / matmul with one tainted operand,
    additions, sums and means, averaging pools, interpolation, padding, indexing and every shape
    operation, eval-mode batch norm, dropout in eval mode, ... They run unchanged;
  - *non-differentiable* queries (shapes, comparisons, ``argmax``, ``isnan``, ``zeros_like``):
    they run unchanged and taint nothing;
  - a *rule*: handed to the handler as a :class:`Call` of kind ``"elementwise"`` (any elementwise
    function of one tainted tensor: activations, ``exp``, ``rsqrt``, ``pow``, ``clamp``, ``x / t``
    in ``t``, ...), ``"bilinear"`` (``a * b``, ``a @ b``, ``einsum``, ``bmm``, ``F.linear`` with a
    tainted weight: both operands tainted), ``"softmax"`` or ``"maxpool"``;
  - a *decomposition* into the above, run with the mode still active so that its pieces are seen:
    layer / group / RMS / instance norm and batch norm with batch statistics (mean, centring,
    variance as a mean of a product, ``rsqrt``, a product, the affine map),
    ``F.scaled_dot_product_attention`` and ``F.multi_head_attention_forward``
    (``nn.MultiheadAttention``) by :mod:`torchex_fn.core.attention` (scores as a product, masks,
    softmax, a product; this replaces the fused kernels; with ``attention=True`` the probabilities
    are handed over too, as kind ``"attention"``),
    ``a / b`` (``a * reciprocal(b)``), ``maximum(a, b)`` (``a + relu(b - a)``), ``var``/``std``,
    ``F.normalize``, ``norm``, ``glu``, ``softmin``, ``addcmul``, ``addmm`` with two tainted factors;
  - anything else raises :class:`NoRule`: an operation that is not known to be linear is never
    treated as linear in silence.

Calls are numbered in the order the model makes them (``Call.index``), so that a caller running the
same model twice (on an input and on a baseline) can pair the k-th call of one pass with the k-th
call of the other; the taint pattern does not depend on values, so both passes number alike.

In-place variants (``torch.relu_``, ``F.relu(x, inplace=True)``, ``x.sigmoid_()``, ``a *= b``) of
operations that get a rule are handed over as their out-of-place operation: the handler's result is
returned to the model and the argument is left unchanged (augmented assignments such as ``a *= b``
use the returned value; code that calls ``a.mul_(b)`` and then uses ``a`` is not supported).
In-place *linear* operations (``out += identity``, ``buf[idx] = x``) run in place and taint their
target.
"""
from __future__ import annotations

import inspect
import math
import weakref
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import attention as _attention

__all__ = ["Call", "NoRule", "Held", "run", "supported", "activation", "LINEAR"]


class Call(NamedTuple):
    """One intercepted call of an operation that has a rule.

    Attributes:
      index: Position of the call among the intercepted calls of this run (0, 1, ...).
      kind: ``"elementwise"`` (``y = f(z)`` element by element, ``y`` possibly broadcast to a larger
        shape than ``z``), ``"bilinear"`` (``y = f(a, b)``, linear in each of ``a`` and ``b``),
        ``"softmax"``, ``"maxpool"``, ``"scale"`` (a normaliser's ``d * r``, see :func:`scale`),
        ``"linear"`` (only the linear operations a caller asked for with ``run(..., linear=...)``),
        ``"sdpa"`` (a whole ``F.scaled_dot_product_attention``, only with ``run(..., fused=True)``),
        ``"activation"`` (an activation module's output, see :func:`activation`: ``inputs`` is ``(z, y)``),
        or ``"attention"`` (an attention call's probabilities, only with ``run(..., attention=True)``:
        ``inputs`` is ``(probs,)``, ``apply`` the identity, and the handler's value replaces them).
      name: The operation's canonical name (``"relu"``, ``"mul"``, ``"softmax"``, ``"max_pool2d"``,
        ...), the same for every spelling (module, function, method, in-place variant).
      inputs: The tainted tensor inputs: ``(z,)``, or ``(a, b)`` for ``"bilinear"``.
      apply: The operation, out of place, with its other arguments bound: ``(*inputs) -> y`` (for
        ``"maxpool"``: ``z -> (y, indices)``, indices as ``return_indices=True`` gives them).
      options: Extra facts: ``dim`` for softmax; ``spatial`` (1, 2 or 3) and ``return_indices``
        (what the model asked for) for max pooling.
    """

    index: int  # type: ignore[assignment]  # a field named like tuple.index, as intended
    kind: str
    name: str
    inputs: Tuple[Tensor, ...]
    apply: Callable[..., Any]
    options: Mapping[str, Any]

    @property
    def input(self) -> Tensor:
        """The first (for all kinds but ``"bilinear"`` the only) tainted input."""
        return self.inputs[0]


class NoRule(NotImplementedError):
    """An operation with an input-dependent argument that has no rule and is not known to be linear."""

    def __init__(self, op: str, detail: str = ""):
        self.op = op
        self.detail = detail
        super().__init__(f"no rule for operation '{op}' on an input-dependent tensor"
                         + (f" ({detail})" if detail else ""))


class Held:
    """A handler's result that is *held*: input-dependent, but flagged as a quantity held constant.

    A handler returns ``Held(value)`` instead of ``value`` to flag it (LRP's conservative propagation
    flags the attention probabilities). The flag follows the value through linear operations (an
    output is held when every input-dependent argument is), and the calls handed over later say which
    of their inputs are held, in ``options["held"]`` (one bool per input; present once anything is held).
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


Handler = Callable[[Call], Any]
_Bound = Tuple[str, str, Tensor, Callable[[Tensor], Any], Dict[str, Any]]


# --------------------------------------------------------------------------------------------
# Binders of the activations-only registry (also used by the tracking mode): each takes the
# arguments of one spelling and returns (kind, name, input, out-of-place op, options).

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
    add(_bind_softmax, torch.softmax, T.softmax, get(torch.special, "softmax", None))
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
"""Canonical names of the operations that :func:`run` hands over without input tracking (``Call.name``)."""


def supported() -> Tuple[str, ...]:
    """The canonical names of the operations that :func:`run` hands over without input tracking."""
    return SUPPORTED


# --------------------------------------------------------------------------------------------
# Input tracking: state shared by a mode and the modes nested in it for decompositions.

def _remember(table: Dict[int, Any], t: Any, floating: bool) -> None:
    """Put ``t`` (a tensor, or the tensors of a tuple / list; with ``floating``, only floating-point and complex
    ones) into ``table`` by id, with a weak reference that removes the entry when the tensor goes."""
    if isinstance(t, Tensor):
        if not floating or t.is_floating_point() or t.is_complex():
            key = id(t)

            def forget(ref, key=key, table=table):
                if table.get(key) is ref:
                    del table[key]
            table[key] = weakref.ref(t, forget)
    elif isinstance(t, (tuple, list)):
        for item in t:
            _remember(table, item, floating)


class _State:
    def __init__(self, handler: Handler, tracking: bool, linear: Sequence[str] = (), attention: bool = False,
                 fused: bool = False):
        self.handler = handler
        self.fused = fused  # hand F.scaled_dot_product_attention over whole (kind "sdpa") instead of decomposing
        self.count = 0
        self.ids: Optional[Dict[int, Any]] = {} if tracking else None
        self.held: Dict[int, Any] = {}  # id -> weakref of the tainted tensors flagged as held (see Held)
        self.linear = frozenset(linear)  # canonical names of linear operations handed over as kind "linear"
        self.attention = attention  # hand over the attention probabilities as kind "attention"

    def mark(self, t: Any) -> None:
        """Taint ``t`` (a tensor, or the floating-point tensors of a tuple / list)."""
        if self.ids is not None:
            _remember(self.ids, t, floating=True)

    def hold(self, t: Any) -> None:
        """Flag ``t`` (a tensor, or the tensors of a tuple / list) as held (see :class:`Held`)."""
        _remember(self.held, t, floating=False)

    def is_held(self, t: Any) -> bool:
        return isinstance(t, Tensor) and id(t) in self.held

    def tainted(self, t: Any) -> bool:
        if isinstance(t, Tensor):
            return id(t) in self.ids  # type: ignore[operator]  # only asked while tracking
        if isinstance(t, (tuple, list)):
            return any(self.tainted(item) for item in t)
        return False

    def hand(self, kind: str, name: str, inputs: Tuple[Tensor, ...], apply: Callable[..., Any],
             options: Mapping[str, Any]) -> Any:
        if self.held:
            options = {**options, "held": tuple(self.is_held(t) for t in inputs)}
        call = Call(self.count, kind, name, tuple(inputs), apply, options)
        self.count += 1
        out = self.handler(call)
        if isinstance(out, Held):
            out = out.value
            self.hold(out)
        self.mark(out)
        return out


def _name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # a property such as Tensor.shape
        return getattr(getattr(func, "__self__", None), "__name__", "property")
    return name


def _qualified(func: Any) -> str:
    name = _name(func)
    module = getattr(func, "__module__", None)
    owner = getattr(func, "__qualname__", "")
    if owner and "." in owner:
        return f"torch.Tensor.{name}" if owner.startswith(("Tensor", "TensorBase", "_TensorBase")) else owner
    return f"{module}.{name}" if module else name


def _tensor_positions(state: _State, args: Sequence[Any], kwargs: Mapping[str, Any]):
    """Positions (int for args, str for kwargs) of the tainted arguments."""
    pos: List[Any] = [i for i, a in enumerate(args) if state.tainted(a)]
    pos += [k for k, a in kwargs.items() if state.tainted(a)]
    return pos


def _get(args, kwargs, pos):
    return args[pos] if isinstance(pos, int) else kwargs[pos]


def _substitute(args, kwargs, pos, value):
    if isinstance(pos, int):
        args = list(args)
        args[pos] = value
        return tuple(args), kwargs
    kwargs = dict(kwargs)
    kwargs[pos] = value
    return args, kwargs


# --------------------------------------------------------------------------------------------
# Entries of the tracking table: (mode, func, args, kwargs) -> result, called when at least one
# argument is tainted.

def _run_linear(mode: _Mode, func, args, kwargs):
    out = func(*args, **kwargs)
    st = mode.state
    st.mark(out)
    if st.held:  # held when every input-dependent argument is held
        tainted = [a for a in list(args) + list(kwargs.values()) if st.tainted(a)]
        if tainted and all(st.is_held(a) for a in tainted):
            st.hold(out)
    name = getattr(func, "__name__", "")
    if args and isinstance(args[0], Tensor) and (name.endswith("_") and not name.endswith("__")
                                                 or name.startswith("__i") or name == "__setitem__"):
        st.mark(args[0])  # an in-place write of a tainted value taints its target
    if "out" in kwargs:
        st.mark(kwargs["out"])
    return out


def _run_query(mode: _Mode, func, args, kwargs):
    return func(*args, **kwargs)


def _run_property(mode: _Mode, func, args, kwargs):
    name = _name(func)
    if name in ("T", "mT", "H", "mH", "data", "real"):
        return _run_linear(mode, func, args, kwargs)
    if name in ("grad", "imag"):
        raise NoRule(name)
    return func(*args, **kwargs)


def _run_detach(mode: _Mode, func, args, kwargs):
    # DeepLIFT explains values, and detaching does not change a value: an alias that keeps the path
    out = args[0].view_as(args[0])
    mode.state.mark(out)
    return out


_SIGNATURES: Dict[Any, Optional[inspect.Signature]] = {}


def _without_inplace(func, args, kwargs):
    """``args, kwargs`` with an ``inplace`` argument of ``func`` (positional or keyword) set to False."""
    if func not in _SIGNATURES:
        try:
            sig = inspect.signature(func)
            _SIGNATURES[func] = sig if "inplace" in sig.parameters else None
        except (TypeError, ValueError):
            _SIGNATURES[func] = None
    maybe = _SIGNATURES[func]
    if maybe is None:
        return args, kwargs
    sig = maybe
    bound = sig.bind(*args, **kwargs)
    bound.arguments["inplace"] = False
    return bound.args, bound.kwargs


def _unary(oop: Callable[..., Any], name: Optional[str] = None):
    """Elementwise in its one tainted argument (at any position; the others fixed): the Rescale rule."""
    def entry(mode: _Mode, func, args, kwargs):
        st = mode.state
        pos = _tensor_positions(st, args, kwargs)
        if len(pos) != 1 or not isinstance(_get(args, kwargs, pos[0]), Tensor):
            raise NoRule(_name(func), "more than one input-dependent argument")
        a, kw = _without_inplace(oop, args, kwargs)
        z = _get(a, kw, pos[0])

        def apply(v: Tensor) -> Tensor:
            aa, kk = _substitute(a, kw, pos[0], v)
            return oop(*aa, **kk)
        return st.hand("elementwise", name or _name(oop), (z,), apply, {})
    return entry


def _activation(binder):
    """The binders of the activations-only registry, inside the tracking mode."""
    def entry(mode: _Mode, func, args, kwargs):
        st = mode.state
        pos = _tensor_positions(st, args, kwargs)
        if pos not in ([0], ["input"]):
            raise NoRule(_name(func), "an input-dependent argument other than the input")
        kind, name, z, apply, options = binder(*args, **kwargs)
        if kind == "maxpool":
            return st.hand(kind, name, (z,), apply, options)
        return st.hand(kind, name, (z,), apply, options)
    return entry


def _decompose(body: Callable[..., Any]):
    """Run ``body`` (plain torch code) with the mode active, so that its pieces get their rules."""
    def entry(mode: _Mode, func, args, kwargs):
        with _Mode(mode.state):
            return body(*args, **kwargs)
    return entry


def _bilinear_or_linear(positions: Sequence[Any], name: str, decompose: Optional[Callable[..., Any]] = None):
    """An operation linear in each operand at ``positions``: the bilinear rule when two are tainted.

    ``decompose(mode, func, args, kwargs)``, if given, handles the two-tainted case instead (used
    where the operation also adds a term, e.g. ``F.linear``'s bias or ``addmm``'s input).
    """
    def entry(mode: _Mode, func, args, kwargs):
        st = mode.state
        tainted = [p for p in positions if _has(args, kwargs, p) and st.tainted(_get(args, kwargs, p))]
        if len(tainted) < 2:
            return _run_linear(mode, func, args, kwargs)
        if decompose is not None:
            return decompose(mode, func, args, kwargs)
        pa, pb = tainted
        a, b = _get(args, kwargs, pa), _get(args, kwargs, pb)

        def apply(u: Tensor, v: Tensor) -> Tensor:
            aa, kk = _substitute(args, kwargs, pa, u)
            aa, kk = _substitute(aa, kk, pb, v)
            return _out_of_place(func)(*aa, **kk)
        return st.hand("bilinear", name, (a, b), apply, {})
    return entry


def _has(args, kwargs, pos) -> bool:
    return pos < len(args) if isinstance(pos, int) else pos in kwargs


def _out_of_place(func):
    """The out-of-place operation of an in-place spelling (``mul_``, ``__imul__``, ``torch.relu_``)."""
    name = getattr(func, "__name__", "")
    if name.startswith("__i") and name.endswith("__"):
        return getattr(Tensor, "__" + name[3:])
    if name.endswith("_") and not name.endswith("__"):
        for ns in (Tensor, torch, F, torch._C._nn):
            oop = getattr(ns, name[:-1], None)
            if callable(oop):
                return oop
    return func


def _mul_entry(mode, func, args, kwargs):
    return _bilinear_or_linear((0, 1), "mul")(mode, func, args, kwargs)


def _einsum_entry(mode, func, args, kwargs):
    st = mode.state
    equation, operands = args[0], list(args[1:])
    listed = len(operands) == 1 and isinstance(operands[0], (list, tuple))
    if listed:
        operands = list(operands[0])
    tainted = [i for i, t in enumerate(operands) if st.tainted(t)]
    if len(tainted) < 2:
        return _run_linear(mode, func, args, kwargs)
    if len(tainted) > 2:
        raise NoRule("einsum", f"{len(tainted)} input-dependent operands; at most two are supported")
    i, j = tainted

    def apply(u, v):
        ops = list(operands)
        ops[i], ops[j] = u, v
        return torch.einsum(equation, *ops)
    return st.hand("bilinear", "einsum", (operands[i], operands[j]), apply, {})


def _div_entry(mode, func, args, kwargs):
    st = mode.state
    name = getattr(func, "__name__", "")
    num, den = (1, 0) if name in ("__rtruediv__", "__rdiv__") else (0, 1)
    if kwargs.get("rounding_mode") is not None:
        return _unary(torch.div, "div")(mode, func, args, kwargs)
    if not st.tainted(args[den]):
        return _run_linear(mode, func, args, kwargs)
    a, b = args[num], args[den]
    with _Mode(st):  # a / b = a * (1 / b): reciprocal (Rescale), then a product
        return torch.mul(a, torch.reciprocal(b))


def _pow_entry(mode, func, args, kwargs):
    st = mode.state
    name = getattr(func, "__name__", "")
    base, exp = (1, 0) if name == "__rpow__" else (0, 1)  # type: Tuple[Any, Any]
    if len(args) < 2:
        base, exp = "input", "exponent"
    if st.tainted(_get(args, kwargs, base)) and st.tainted(_get(args, kwargs, exp)):
        b, e = _get(args, kwargs, base), _get(args, kwargs, exp)
        with _Mode(st):  # b ** e = exp(e * log(b)) for a positive base
            return torch.exp(torch.mul(e, torch.log(b)))
    oop = _out_of_place(func)
    return _unary(oop, "pow")(mode, oop, args, kwargs)


def _extremum(kind: str):
    def entry(mode, func, args, kwargs):
        st = mode.state
        tensors = [a for a in args[:2] if isinstance(a, Tensor)]
        if len(args) >= 2 and isinstance(args[1], Tensor) and st.tainted(args[0]) and st.tainted(args[1]):
            a, b = args[0], args[1]
            with _Mode(st):  # max(a, b) = a + relu(b - a); min(a, b) = a - relu(a - b)
                return a + torch.relu(b - a) if kind == "max" else a - torch.relu(a - b)
        if len(tensors) == 2:
            return _unary(_out_of_place(func), kind + "imum")(mode, func, args, kwargs)
        raise NoRule(_name(func), "a reduction of an input-dependent tensor to its maximum or minimum")
    return entry


def _dropout_entry(mode, func, args, kwargs):
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
        bound.apply_defaults()
        p = bound.arguments.get("p", 0.5)
        training = bound.arguments.get("training", bound.arguments.get("train", True))
    except (TypeError, ValueError):  # torch.dropout(input, p, train)
        p, training = (args[1] if len(args) > 1 else 0.5), (args[2] if len(args) > 2 else True)
    if training and p > 0:
        raise NoRule(_name(func), "dropout in training mode draws different masks for the input and the baseline; "
                     "put the model in eval mode")
    return _run_linear(mode, func, args, kwargs)


def _batch_norm_entry(mode, func, args, kwargs):
    bound = inspect.signature(F.batch_norm).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if not a["training"] and a["running_mean"] is not None and a["running_var"] is not None:
        return _run_linear(mode, func, args, kwargs)
    with _Mode(mode.state):
        return _norm_by_stats(a["input"], [0] + list(range(2, a["input"].ndim)), a["weight"], a["bias"], a["eps"],
                              channel=True)


def _instance_norm_entry(mode, func, args, kwargs):
    bound = inspect.signature(F.instance_norm).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if not a["use_input_stats"]:
        return _run_linear(mode, func, args, kwargs)
    with _Mode(mode.state):
        return _norm_by_stats(a["input"], list(range(2, a["input"].ndim)), a["weight"], a["bias"], a["eps"],
                              channel=True)


# --------------------------------------------------------------------------------------------
# Decompositions (run with the mode active: every piece below is linear or has a rule).

def scale(d: Tensor, r: Tensor) -> Tensor:
    """``d * r`` where ``r`` is a normaliser's scale (``rsqrt(var + eps)``) and ``d`` what it scales.

    The value is the product; the mode hands it over as a call of kind ``"scale"``, whose rule
    credits the product differently from a plain ``"bilinear"`` product (see ``propagation``).
    """
    if torch.overrides.has_torch_function((d, r)):
        return torch.overrides.handle_torch_function(scale, (d, r), d, r)
    return d * r


def activation(z: Tensor, y: Tensor) -> Tensor:
    """``y``, an activation module's output, computed from ``z`` element by element (any code inside).

    The value is ``y``; the mode hands it over as a call of kind ``"activation"`` with inputs
    ``(z, y)`` (``apply`` returns ``y``), so that a rule can treat an activation written as several
    operations (``0.5 * z * (1 + tanh(...))``) as one elementwise function. Its pieces were handed over
    before it, as they ran.
    """
    if torch.overrides.has_torch_function((z, y)):
        return torch.overrides.handle_torch_function(activation, (z, y), z, y)
    return y


def _activation_entry(mode: _Mode, func, args, kwargs):
    st = mode.state
    z, y = args
    if not st.tainted(z) or not isinstance(y, Tensor):
        return y
    return st.hand("activation", "activation", (z, y), lambda *_: y, {})


def _scale_entry(mode: _Mode, func, args, kwargs):
    st = mode.state
    d, r = args
    if not (st.tainted(d) and st.tainted(r)):
        return _run_linear(mode, torch.mul, args, kwargs)
    return st.hand("scale", "scale", (d, r), torch.mul, {})


def _norm_by_stats(x: Tensor, dims: Sequence[int], weight, bias, eps: float, channel: bool = False) -> Tensor:
    """``(x - mean) * rsqrt(var + eps) * weight + bias`` over ``dims`` (biased variance)."""
    dims = tuple(dims)
    d = x - x.mean(dims, keepdim=True)
    var = (d * d).mean(dims, keepdim=True)
    y = scale(d, torch.rsqrt(var + eps))
    shape = (-1,) + (1,) * (x.ndim - 2) if channel else None
    if weight is not None:
        y = y * (weight.reshape(shape) if channel else weight)
    if bias is not None:
        y = y + (bias.reshape(shape) if channel else bias)
    return y


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *_, **__):
    n = len(normalized_shape) if isinstance(normalized_shape, (list, tuple, torch.Size)) else 1
    return _norm_by_stats(input, range(input.ndim - n, input.ndim), weight, bias, eps)


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    b, c = input.shape[:2]
    grouped = input.reshape(b, num_groups, -1)
    y = _norm_by_stats(grouped, (2,), None, None, eps).reshape(input.shape)
    shape = (-1,) + (1,) * (input.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _rms_norm(input, normalized_shape, weight=None, eps=None):
    n = len(normalized_shape) if isinstance(normalized_shape, (list, tuple, torch.Size)) else 1
    dims = tuple(range(input.ndim - n, input.ndim))
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    y = scale(input, torch.rsqrt((input * input).mean(dims, keepdim=True) + eps))
    return y * weight if weight is not None else y


def _moments(input, dim=None, *, correction=None, unbiased=None, keepdim=False):
    if isinstance(dim, bool):  # var(input, unbiased)
        unbiased, dim = dim, None
    if correction is None:
        correction = 1 if unbiased is None or unbiased else 0
    dims = tuple(range(input.ndim)) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
    count = math.prod(input.shape[d] for d in dims)
    mean = input.mean(dims, keepdim=True)
    d = input - mean
    var = (d * d).sum(dims, keepdim=keepdim) / max(count - correction, 0)
    return var, (mean if keepdim else mean.squeeze(dims) if dims else mean)


def _var(input, dim=None, *args, **kwargs):
    if args:  # var(input, dim, unbiased, keepdim) positionally
        kwargs.setdefault("unbiased", args[0])
        if len(args) > 1:
            kwargs.setdefault("keepdim", args[1])
    return _moments(input, dim, **kwargs)[0]


def _std(input, dim=None, *args, **kwargs):
    return torch.sqrt(_var(input, dim, *args, **kwargs))


def _var_mean(input, dim=None, *args, **kwargs):
    if args:
        kwargs.setdefault("unbiased", args[0])
        if len(args) > 1:
            kwargs.setdefault("keepdim", args[1])
    return _moments(input, dim, **kwargs)


def _std_mean(input, dim=None, *args, **kwargs):
    var, mean = _var_mean(input, dim, *args, **kwargs)
    return torch.sqrt(var), mean


def _vector_norm(x, ord=2, dim=None, keepdim=False, *, dtype=None):
    if ord in ("fro", None):
        ord = 2
    if isinstance(dim, int):
        dim = (dim,)
    dims = tuple(range(x.ndim)) if dim is None else tuple(dim)
    if ord == 2:
        return torch.sqrt((x * x).sum(dims, keepdim=keepdim))
    if ord == 1:
        return torch.abs(x).sum(dims, keepdim=keepdim)
    if isinstance(ord, (int, float)) and math.isfinite(ord) and ord > 0:
        return torch.pow(torch.pow(torch.abs(x), ord).sum(dims, keepdim=keepdim), 1.0 / ord)
    raise NoRule("norm", f"p={ord!r}")


def _norm(input, p="fro", dim=None, keepdim=False, dtype=None):
    return _vector_norm(input, p, dim, keepdim)


def _normalize(input, p=2.0, dim=1, eps=1e-12, out=None):
    if out is not None:
        raise NoRule("normalize", "out=")
    norm = _vector_norm(input, p, dim, keepdim=True)
    return input * torch.reciprocal(torch.clamp_min(norm, eps))


def _glu(input, dim=-1):
    a, b = input.chunk(2, dim)
    return a * torch.sigmoid(b)


def _softmin(input, dim=None, _stacklevel=3, dtype=None):
    return F.softmax(-input, dim, dtype=dtype)


def _addmm_like(product):
    def body(input, a, b, *, beta=1, alpha=1):
        out = product(a, b)
        out = out if alpha == 1 else out * alpha
        return out + (input if beta == 1 else input * beta) if beta != 0 else out
    return body


def _addcmul(input, tensor1, tensor2, *, value=1):
    return input + value * (tensor1 * tensor2)


def _addcdiv(input, tensor1, tensor2, *, value=1):
    return input + value * (tensor1 / tensor2)


def _lerp(input, end, weight):
    return input + weight * (end - input)


def _linear_with_weight(mode, func, args, kwargs):
    bound = inspect.signature(lambda input, weight, bias=None: None).bind(*args, **kwargs)
    a = bound.arguments
    st = mode.state
    x, w, bias = a["input"], a["weight"], a.get("bias")
    out = st.hand("bilinear", "linear", (x, w), lambda u, v: F.linear(u, v), {})
    if bias is not None:
        with _Mode(st):
            out = out + bias
    return out


def _conv_with_weight(mode, func, args, kwargs):
    raise NoRule(_name(func), "a convolution whose weight depends on the input")


# --------------------------------------------------------------------------------------------
# Attention: the one decomposition of core/attention.py, in every mode that sees attention.

_SDPA_SIGNATURE = inspect.signature(_attention.sdpa)


def _sdpa_entry(mode: _Mode, func, args, kwargs):
    """``F.scaled_dot_product_attention`` as its math (products, masks, softmax), in place of the fused kernels."""
    st = mode.state
    if st.ids is not None and _SDPA_SIGNATURE.bind(*args, **kwargs).arguments.get("dropout_p", 0.0) > 0:
        raise NoRule("scaled_dot_product_attention", "dropout_p > 0 draws different masks for the input and "
                     "the baseline; use the model in eval mode")
    if st.fused and st.ids is not None:  # handed over whole (kind "sdpa"), the caller's rule on its operands
        bound = _SDPA_SIGNATURE.bind(*args, **kwargs)
        q, k, v = (bound.arguments[n] for n in ("query", "key", "value"))
        if not (st.tainted(bound.arguments.get("attn_mask")) or st.tainted(bound.arguments.get("scale"))):
            rest = {n: a for n, a in bound.arguments.items() if n not in ("query", "key", "value")}
            return st.hand("sdpa", "scaled_dot_product_attention", (q, k, v),
                           lambda a, b, c: func(a, b, c, **rest), {"tainted": tuple(st.tainted(t) for t in (q, k, v))})
    with _Mode(st):  # the pieces are seen: rules (tracking) and the probabilities (attention)
        return _attention.sdpa(*args, **kwargs)


def _mha_entry(mode: _Mode, func, args, kwargs):
    """``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) written with batch and heads apart."""
    st = mode.state
    a = _attention.mha_arguments(*args, **kwargs)
    if _attention.adds_keys(a):
        raise NoRule("multi_head_attention_forward", _attention.ADDED_KEYS)
    if st.ids is not None and a["training"] and a["dropout_p"] > 0:
        raise NoRule("multi_head_attention_forward", "dropout in training mode; use the model in eval mode")
    with _Mode(st):
        return _attention.multi_head_attention(a)


def _same(p: Tensor) -> Tensor:
    return p


def _probabilities_entry(mode: _Mode, func, args, kwargs):
    """The attention probabilities (:func:`torchex_fn.core.attention.probabilities`): handed over when asked for."""
    st = mode.state
    p = args[0]
    if not st.attention:
        return p
    return st.hand("attention", "probabilities", (p,), _same, {})


_ATTENTION = {F.scaled_dot_product_attention: _sdpa_entry, F.multi_head_attention_forward: _mha_entry,
              _attention.probabilities: _probabilities_entry}


# --------------------------------------------------------------------------------------------
# The tracking table.

_UNARY = """exp exp2 expm1 log log2 log10 log1p sqrt rsqrt reciprocal sin cos tan asin acos atan sinh cosh asinh
acosh atanh arcsin arccos arctan arcsinh arccosh arctanh erf erfc erfinv abs absolute sign sgn square floor ceil
round trunc fix frac clamp clip clamp_min clamp_max nan_to_num logit i0 lgamma digamma sinc
softplus softshrink hardshrink tanhshrink softsign threshold prelu rrelu log_sigmoid""".split()

_LINEAR = """add sub subtract neg negative positive rsub sum mean nansum cumsum diff trace flatten unflatten ravel
reshape view view_as reshape_as expand expand_as broadcast_to repeat repeat_interleave tile permute transpose
swapaxes swapdims t movedim moveaxis squeeze unsqueeze contiguous clone chunk split split_with_sizes tensor_split
hsplit vsplit dsplit unbind narrow select index_select gather take take_along_dim scatter scatter_add index_add
index_copy index_put index_fill masked_fill masked_scatter masked_select where cat concat concatenate stack hstack
vstack dstack flip fliplr flipud roll rot90 tril triu diagonal diag diag_embed to type type_as float double half
bfloat16 cpu cuda copy_ zero_ fill_ unfold as_strided conv1d conv2d conv3d conv_transpose1d conv_transpose2d
conv_transpose3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle embedding constant_pad_nd pad interpolate
upsample upsample_nearest upsample_bilinear fold grid_sample affine_grid deg2rad rad2deg
reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d replication_pad3d
upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_bilinear2d upsample_bicubic2d
upsample_linear1d upsample_trilinear3d _upsample_nearest_exact2d""".split()

_DUNDER_LINEAR = """__add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __neg__ __pos__ __getitem__ __setitem__
__mul__ __rmul__ __imul__""".split()

_QUERIES = """size dim ndimension numel nelement __len__ __bool__ __int__ __float__ __index__ __complex__ item tolist
argmax argmin argsort eq ne lt le gt ge greater less greater_equal less_equal not_equal __eq__ __ne__ __lt__ __le__
__gt__ __ge__ isnan isinf isfinite isneginf isposinf isreal signbit logical_and logical_or logical_not logical_xor
__and__ __or__ __xor__ __invert__ __rand__ __ror__ __rxor__ any all nonzero count_nonzero is_floating_point
is_complex is_contiguous stride data_ptr element_size storage_offset get_device zeros_like ones_like empty_like
full_like rand_like randn_like randint_like new_zeros new_ones new_empty new_full new_tensor __format__ __repr__
__str__ is_nonzero bucketize searchsorted equal allclose isclose __contains__ numpy __array__ is_same_size
bincount histc __hash__ __reduce_ex__ __deepcopy__ untyped_storage storage dim_order is_pinned requires_grad_
retain_grad register_hook __dlpack__ __dlpack_device__ sort_indices is_inference _is_view is_shared
has_names __iter__ __setstate__ __getstate__""".split()


def _namespaces():
    return (torch, torch.Tensor, F, torch.special, torch.linalg, torch._C._nn, torch._C.TensorBase)


def _funcs(name: str) -> List[Any]:
    out = []
    for ns in _namespaces():
        f = getattr(ns, name, None)
        if f is not None and callable(f) and not isinstance(f, type):
            out.append(f)
    return out


def _tracking_table() -> Dict[Any, Callable[..., Any]]:
    table: Dict[Any, Callable[..., Any]] = {}

    def put(entry, funcs):
        for f in funcs:
            if f is not None:
                table[f] = entry

    for name in _LINEAR + _DUNDER_LINEAR:
        put(_run_linear, _funcs(name))
    for name in _LINEAR:  # in-place spellings of linear operations (add_, masked_fill_, ...)
        put(_run_linear, _funcs(name + "_"))
    for name in _QUERIES:
        put(_run_query, _funcs(name))
    for name in _UNARY:
        for f in _funcs(name):
            table[f] = _unary(f, name)
        for f in _funcs(name + "_"):
            oop = _out_of_place(f)
            table[f] = _unary(oop if oop is not f else f, name)
    put(_run_detach, _funcs("detach") + _funcs("detach_"))
    for func, binder in _REGISTRY.items():
        table[func] = _activation(binder)
    # products and bilinear operations
    put(_mul_entry, _funcs("mul") + _funcs("multiply") + _funcs("__mul__") + _funcs("__rmul__") + _funcs("__imul__")
        + _funcs("mul_") + _funcs("multiply_"))
    for name in ("matmul", "mm", "bmm", "mv", "dot", "inner", "outer", "ger", "vdot", "__matmul__", "__rmatmul__",
                 "kron", "tensordot"):
        put(_bilinear_or_linear((0, 1), "matmul" if name in ("__matmul__", "__rmatmul__") else name), _funcs(name))
    put(_einsum_entry, _funcs("einsum"))
    put(_div_entry, _funcs("div") + _funcs("divide") + _funcs("true_divide") + _funcs("__truediv__")
        + _funcs("__itruediv__") + _funcs("__rtruediv__") + _funcs("__rdiv__") + _funcs("__div__")
        + _funcs("div_") + _funcs("divide_") + _funcs("true_divide_"))
    put(_pow_entry, _funcs("pow") + _funcs("pow_") + _funcs("__pow__") + _funcs("__rpow__") + _funcs("__ipow__")
        + _funcs("float_power"))
    put(_extremum("max"), _funcs("maximum") + _funcs("fmax") + _funcs("max") + _funcs("amax"))
    put(_extremum("min"), _funcs("minimum") + _funcs("fmin") + _funcs("min") + _funcs("amin"))
    for name, product in (("addmm", torch.mm), ("baddbmm", torch.bmm), ("addbmm", lambda a, b: torch.bmm(a, b).sum(0)),
                          ("addmv", torch.mv), ("addr", torch.outer)):
        put(_bilinear_or_linear((1, 2), name, _decompose(_addmm_like(product))), _funcs(name) + _funcs(name + "_"))
    put(_bilinear_or_linear((1, 2), "addcmul", _decompose(_addcmul)), _funcs("addcmul") + _funcs("addcmul_"))
    put(lambda m, f, a, k: (_decompose(_addcdiv)(m, f, a, k) if m.state.tainted(a[2]) else _run_linear(m, f, a, k)),
        _funcs("addcdiv") + _funcs("addcdiv_"))
    put(lambda m, f, a, k: (_decompose(_lerp)(m, f, a, k) if m.state.tainted(a[2] if len(a) > 2 else k.get("weight"))
                            else _run_linear(m, f, a, k)), _funcs("lerp") + _funcs("lerp_"))
    put(_bilinear_or_linear((0, 1), "linear", _linear_with_weight), [F.linear, getattr(torch._C._nn, "linear", None)])
    for name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        put(_bilinear_or_linear((0, 1), name, _conv_with_weight), _funcs(name))
    # normalisation, attention and other compositions
    put(_scale_entry, [scale])
    put(_activation_entry, [activation])
    put(_decompose(_layer_norm), [F.layer_norm, torch.layer_norm])
    put(_decompose(_group_norm), [F.group_norm, torch.group_norm])
    put(_decompose(_rms_norm), [getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)])
    put(_batch_norm_entry, [F.batch_norm])
    put(_instance_norm_entry, [F.instance_norm])
    put(_decompose(_var), _funcs("var"))
    put(_decompose(_std), _funcs("std"))
    put(_decompose(_var_mean), _funcs("var_mean"))
    put(_decompose(_std_mean), _funcs("std_mean"))
    put(_decompose(_norm), _funcs("norm"))
    put(_decompose(_vector_norm), [torch.linalg.vector_norm])
    put(_decompose(_normalize), [F.normalize])
    put(_decompose(_glu), [F.glu])
    put(_decompose(_softmin), [F.softmin])
    for func, entry in _ATTENTION.items():
        table[func] = entry
    for name in ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
                 "feature_dropout"):
        put(_dropout_entry, _funcs(name) + _funcs(name + "_"))
    return table


_TABLE = _tracking_table()


# Linear operations that a caller may ask to see (``run(..., linear=names)``), by canonical name.
_LINEAR_KINDS = {
    "conv1d": ("conv1d",), "conv2d": ("conv2d",), "conv3d": ("conv3d",),
    "conv_transpose1d": ("conv_transpose1d",), "conv_transpose2d": ("conv_transpose2d",),
    "conv_transpose3d": ("conv_transpose3d",),
    "avg_pool1d": ("avg_pool1d",), "avg_pool2d": ("avg_pool2d",), "avg_pool3d": ("avg_pool3d",),
    "adaptive_avg_pool1d": ("adaptive_avg_pool1d",), "adaptive_avg_pool2d": ("adaptive_avg_pool2d",),
    "adaptive_avg_pool3d": ("adaptive_avg_pool3d",),
    "add": ("add", "__add__", "__radd__", "__iadd__", "add_"),
    "sub": ("sub", "subtract", "__sub__", "__rsub__", "__isub__", "sub_", "subtract_", "rsub"),
    "mean": ("mean",), "sum": ("sum",),
}


def _linear_calls() -> Dict[Any, str]:
    table: Dict[Any, str] = {}
    for canonical, spellings in _LINEAR_KINDS.items():
        for spelling in spellings:
            for f in _funcs(spelling):
                table.setdefault(f, canonical)
    for f in (F.linear, getattr(torch._C._nn, "linear", None)):
        if f is not None:
            table[f] = "linear"
    table[F.batch_norm] = "batch_norm"
    return table


_LINEAR_CALLS = _linear_calls()
LINEAR = tuple(sorted(set(_LINEAR_CALLS.values())))
"""Canonical names of the linear operations that ``run(..., linear=...)`` can hand over."""


def _hand_linear(mode: _Mode, func, name: str, args, kwargs):
    """A linear operation the caller asked for, as a :class:`Call` of kind ``"linear"``.

    ``inputs`` are its input-dependent tensor arguments; ``options`` holds ``args`` and ``kwargs``
    (the call as made, in-place spellings made out of place) and the ``positions`` of ``inputs`` there.
    """
    st = mode.state
    oop = _out_of_place(func)
    pos = _tensor_positions(st, args, kwargs)
    if not all(isinstance(_get(args, kwargs, p), Tensor) for p in pos):
        return _run_linear(mode, func, args, kwargs)  # a tainted list argument: not one of ours

    def apply(*values):
        aa, kk = args, kwargs
        for p, v in zip(pos, values):
            aa, kk = _substitute(aa, kk, p, v)
        return oop(*aa, **kk)
    inputs = tuple(_get(args, kwargs, p) for p in pos)
    return st.hand("linear", name, inputs, apply, {"args": args, "kwargs": kwargs, "positions": tuple(pos),
                                                    "func": oop})


class _Mode(TorchFunctionMode):
    """Hands operations to ``state.handler`` (see the module docstring); everything else runs unchanged.

    Inside ``__torch_function__`` torch has already taken the mode off the stack, so the handler
    and pass-through calls run without interception (no call is seen twice); decompositions push
    a new mode on the same state to see their pieces.
    """

    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        st = self.state
        if st.ids is None:
            if st.attention:  # attention only: decompose attention calls, hand over their probabilities
                entry = _ATTENTION.get(func)
                return func(*args, **kwargs) if entry is None else entry(self, func, args, kwargs)
            binder = _REGISTRY.get(func)
            if binder is not None:
                kind, name, z, apply, options = binder(*args, **kwargs)
                if isinstance(z, Tensor) and z.is_floating_point():
                    return st.hand(kind, name, (z,), apply, options)
            return func(*args, **kwargs)
        if not (any(st.tainted(a) for a in args) or any(st.tainted(a) for a in kwargs.values())):
            return func(*args, **kwargs)
        if st.linear:
            linear = _LINEAR_CALLS.get(func)
            if linear is not None and linear in st.linear:
                return _hand_linear(self, func, linear, args, kwargs)
        entry = _TABLE.get(func)
        if entry is None:
            if getattr(func, "__name__", "") == "__get__":
                return _run_property(self, func, args, kwargs)
            raise NoRule(_name(func), _qualified(func))
        return entry(self, func, args, kwargs)


def run(fn: Callable[..., Any], handler: Handler, *args: Any, tainted: Optional[Sequence[Tensor]] = None,
        linear: Sequence[str] = (), attention: bool = False, fused: bool = False) -> Tuple[Any, int]:
    """Call ``fn(*args)`` with operations handed to ``handler`` (see the module docstring).

    Args:
      fn: Any callable, typically a ``model_fn``.
      handler: ``Call -> value``; the value is returned to the model in place of the operation's
        result (for max pooling with ``return_indices`` a ``(values, indices)`` pair).
      *args: Passed to ``fn``.
      tainted: ``None``: hand over the known activations, softmax and max pooling only. Tensors:
        track what depends on them and hand over every nonlinear operation on it; operations
        without a rule raise :class:`NoRule`.
      linear: With ``tainted``, canonical names (see :data:`LINEAR`: ``"conv2d"``, ``"linear"``,
        ``"batch_norm"``, ``"avg_pool2d"``, ``"add"``, ...) of linear operations to hand over too, as
        calls of kind ``"linear"`` (layer-wise relevance propagation gives them rules). Default: none.
      attention: Hand over the probabilities ``[B, heads, L, S]`` of every attention call
        (``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward``), computed by the
        decomposition of :mod:`torchex_fn.core.attention`, as calls of kind ``"attention"``; the
        handler's value is used in their place. Without ``tainted``, *only* these are handed over
        (every other operation runs unchanged); with it, they come in addition to the rules (each
        right after its softmax), for attention calls on input-dependent tensors. Default: False.
      fused: With ``tainted``, hand ``F.scaled_dot_product_attention`` over whole as a call of kind
        ``"sdpa"`` (``inputs`` query, key, value; ``apply`` the fused kernel with the call's other
        arguments; ``options["tainted"]`` which of the three depend on the input) instead of decomposing
        it, when its mask and scale do not depend on the input. Default: False.

    Returns:
      ``(fn's result, number of intercepted calls)``.

    Raises:
      NoRule: with ``tainted``, an operation on an input-dependent tensor that has no rule.

    Example:
      >>> out, n = run(model_fn, lambda call: call.apply(*call.inputs), params, x)   # an unchanged run
    """
    state = _State(handler, tracking=tainted is not None, linear=linear, attention=attention, fused=fused)
    for t in tainted or ():
        state.mark(t)
    mode = _Mode(state)
    with mode:  # pushed here and popped in __exit__, which runs as a `finally` when fn raises
        out = fn(*args)
    return out, state.count
