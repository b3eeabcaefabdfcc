"""The one place that differentiates: ``d sum(f) / d primal`` through ``torch.func.vjp``.

``torch.func.grad`` always back-propagates with ``create_graph=True`` so that any outer transform
can differentiate the gradient again; recording that second graph costs 5-9 % of a resnet18
forward + backward on a CPU. ``torch.func.vjp`` lets the caller choose, so we ask for the second
graph exactly when something outside this call can differentiate the result: when the function's
output, seen from outside, requires grad (the caller's autograd, a closed-over parameter), is
wrapped by an enclosing ``torch.func`` transform (``grad``, ``vjp``, ``vmap``, ...) or carries a
forward-mode tangent. The gradient of the output depends only on what the output depends on, so
an output that nothing outside tracks has a gradient that nothing outside needs to differentiate.

Attention and outer derivatives
-------------------------------
The fused attention kernels behind ``F.scaled_dot_product_attention`` (flash / memory-efficient /
cuDNN on GPU, ``_scaled_dot_product_flash_attention_for_cpu`` on CPU) are differentiable once, not
twice: ``torch.func.grad`` of a loss on a saliency or Grad-CAM map of a ViT or BERT fails with
"derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented".
The math backend (``softmax(QK^T / sqrt(d) + mask) V`` in ordinary operations) is differentiable any
number of times. torchvision's ``nn.MultiheadAttention`` reaches the same function through
``F.multi_head_attention_forward``; its no-grad fast path ``torch._native_multi_head_attention`` is
only taken when nothing requires grad, so it never sits inside a gradient. This is torch's own math
backend, not the decomposition of :mod:`torchex_fn.core.attention`: that one serves the interceptor,
which must see the pieces; here the model runs unchanged, on a backend it can be differentiated through twice.

The choice is made here, because every gradient-based method differentiates through
:func:`grad_of_sum`, and only while one of its inner gradients is in progress (a plain forward,
and a user's own training step through ``model_fn``, keep whatever backend torch picks):

1. at entry, a primal that is already tracked (``x`` differentiated by a caller, as in
   ``grad(lambda x: saliency(fn, p, x).sum())``) => the whole inner gradient uses the math backend;
2. :class:`torchex_fn.core.model.FunctionalModel` asks :func:`attention_context` with its
   ``params``: a tracked parameter (``grad`` w.r.t. ``params`` of an explanation loss) => its
   forward uses the math backend;
3. otherwise the forward runs with the fused kernels, and only if its result turns out to be
   tracked from outside (``x`` closed over by a layer method and differentiated by a caller, or a
   custom ``model_fn`` closing over tracked tensors) *and* its graph holds a fused attention node,
   the forward is run again with the math backend (one extra forward, in this case only).

``nn.MultiheadAttention``'s fast path ``torch._native_multi_head_attention`` has no derivative at
all, and inside an inner gradient it mistakes a tensor tracked by an enclosing ``torch.func`` level
for an untracked one; so it is switched off whenever the math backend is held, and for a forward
whose input ``x`` is tracked (rule 2).

A plain call (nothing tracked) keeps the fused kernels and pays only the checks (about 0.3 ms to
look at resnet18's 122 tensors, ~0.1 % of its saliency at 224 px on one CPU thread). Tensors
wrapped by ``vmap`` count as tracked (see :func:`tracked`), so a ``vmap``-ed call also takes the
math backend: same values, up to rounding. Why not decide in ``FunctionalModel`` alone: it sees
``params`` and ``x``, but inside a method's own gradient ``x`` is tracked by that gradient too, so
it cannot tell a caller's derivative from the method's; :func:`grad_of_sum` sees the primal before
wrapping it, and the output's tracking after the forward.

Operations torch.func refuses
-----------------------------
An ``autograd.Function`` without ``setup_context`` (the legacy ``forward(ctx, ...)`` style, which is
also what ``torch.library.register_autograd`` generates, so torchvision's ``roi_align`` in Faster /
Mask R-CNN and any such custom op) cannot run inside a ``torch.func`` transform. When the forward of
:func:`grad_of_sum` (or :func:`grads_of_sums`) hits one, the same gradient is taken with
``torch.autograd`` instead: the forward runs once more under autograd w.r.t. fresh leaves standing for
the primal (the primal's own tensors where a caller's autograd tracks them, so the caller can
differentiate the result; the backward then records its graph). Every method that differentiates
goes through here, so all of them work on such models in a plain call, and under the caller's
``torch.autograd``. A module from ``functionalize`` whose forward was refused once is remembered
(weakly): its next gradients go to autograd at once, without the partial torch.func forward.
What cannot work: ``vmap``, ``grad``, ``jacrev``, ... *around* the call (the Function itself
refuses them); that raises a ``RuntimeError`` saying so.

Caveat: the backend flags (``torch.nn.attention.sdpa_kernel``, ``torch.backends.mha``) are
process-global, not per thread. While a call holds the math backend, attention run by other threads
also uses it (same values, up to rounding, slower), and a thread that sets the flags itself during
that time sees them restored when the hold ends. Calls of this library from several threads share
one reference-counted hold, so the flags are restored (in ``finally``) when the last of them leaves.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Iterator, List, Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.utils import _pytree

from . import checks as _checks
from .env import compiling


def tracked(t: Tensor) -> bool:
    """Whether ``t`` carries derivatives for a caller: autograd, a ``torch.func`` transform, a dual tensor.

    ``torch.func.debug_unwrap`` only *inspects* ``t`` here (is it wrapped by a transform?); its
    result never enters a computation. ``torch.compile`` cannot trace that inspection (it would break
    the graph), so while it traces every tensor counts as tracked: the backward records its own graph
    (free inside a compiled graph, which holds the backward as ordinary operations) and attention takes
    its math backend, which is always correct.
    """

    if compiling():
        return True
    return (t.requires_grad or torch.func.debug_unwrap(t, recurse=False) is not t
            or forward_ad.unpack_dual(t).tangent is not None)


def leaves(value: Any) -> List[Tensor]:
    """The tensors in ``value`` (a tensor, or mappings, lists and tuples of them), in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in leaves(item)]
    return []


# --------------------------------------------------------------------------------------------
# The math attention backend, held by reference count (the flags are process-global).

def _math_backend_context() -> Any:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # torch >= 2.3
        return sdpa_kernel([SDPBackend.MATH])
    except ImportError:
        pass
    legacy = getattr(getattr(torch.backends, "cuda", None), "sdp_kernel", None)  # torch 2.1-2.2
    if legacy is not None:
        return legacy(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


_HOLD_LOCK = threading.Lock()


class _Hold:
    """A process-global setting held by reference count: the first holder sets it, the last restores it."""

    def __init__(self, make: Callable[[], Any]):
        self.make, self.count = make, 0
        self.ctx: Any = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with _HOLD_LOCK:
            if self.count == 0:
                ctx = self.make()
                ctx.__enter__()
                self.ctx = ctx
            self.count += 1
        try:
            yield
        finally:
            with _HOLD_LOCK:
                self.count -= 1
                if self.count == 0:
                    ctx, self.ctx = self.ctx, None
                    ctx.__exit__(None, None, None)


_MATH = _Hold(_math_backend_context)
_NO_FASTPATH = _Hold(_no_mha_fastpath)


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Attention that can be differentiated any number of times, for the length of the block.

    ``F.scaled_dot_product_attention`` runs its math backend, and ``nn.MultiheadAttention`` its
    ordinary path (its fast path ``torch._native_multi_head_attention`` has no derivative at all).
    Both settings are process-global and reference-counted across threads (module docstring).
    """
    with _MATH(), _NO_FASTPATH():
        yield


class _Inner:
    """State of one inner gradient of :func:`grad_of_sum` in progress."""

    __slots__ = ("math", "root", "autograd", "modules")

    def __init__(self, math: bool, autograd: bool = False):
        self.math = math      # the whole forward holds the math backend
        self.root: Any = None  # the inner output's autograd node (to look for fused attention)
        self.autograd = autograd  # the forward runs under torch.autograd (a legacy Function), not torch.func
        self.modules: List[Any] = []  # the functionalized modules the forward entered


_INNER: contextvars.ContextVar[Optional[_Inner]] = contextvars.ContextVar("torchex_fn_inner_gradient", default=None)


def attention_context(params: Any, x: Any = None) -> Any:
    """The context a model's forward runs in (rule 2 of the module docstring).

    A no-op outside an inner gradient of :func:`grad_of_sum` and inside one that holds the math
    backend already. Otherwise: a tracked value of ``params`` => :func:`math_attention`; a tracked
    ``x`` => only ``nn.MultiheadAttention``'s fast path is switched off (it has no derivative, and
    it takes a tensor tracked by an enclosing ``torch.func`` level for an untracked one).
    """
    state = _INNER.get()
    if state is None or state.math:
        return contextlib.nullcontext()
    if any(tracked(v) for v in leaves(params)):
        return math_attention()
    if any(tracked(v) for v in leaves(x)):
        return _NO_FASTPATH()
    return contextlib.nullcontext()


_FUSED = ("ScaledDotProductFlashAttention", "ScaledDotProductEfficientAttention", "ScaledDotProductCudnnAttention",
          "ScaledDotProductFusedAttention")


def _graph_has(root: Any, found: Callable[[Any], bool]) -> bool:
    """Whether the autograd graph below ``root`` holds a node for which ``found(node)`` is true (depth first,
    each node visited once)."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if found(node):
            return True
        stack.extend(nxt for nxt, _ in node.next_functions)
    return False


def _has_fused_attention(root: Any) -> bool:
    """Whether an autograd graph holds a fused attention node (differentiable only once)."""
    return _graph_has(root, lambda node: type(node).__name__.startswith(_FUSED))


# --------------------------------------------------------------------------------------------
# Operations torch.func refuses: an ``autograd.Function`` without ``setup_context``.

_LEGACY_TEXT = "must override the setup_context staticmethod"

# Modules whose forward reached such a Function: their next inner gradient goes to torch.autograd at
# once (FunctionalModel calls enter_model first thing), instead of running the forward up to it again.
_LEGACY_MODULES: weakref.WeakSet[Any] = weakref.WeakSet()


class _NeedsAutograd(Exception):
    """Raised by :func:`enter_model` to leave a torch.func forward before it starts."""


def _is_legacy(error: BaseException) -> bool:
    seen: Optional[BaseException] = error
    while seen is not None:
        if isinstance(seen, _NeedsAutograd) or (isinstance(seen, RuntimeError) and _LEGACY_TEXT in str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def enter_model(module: Any) -> None:
    """Called by a functionalized model at the start of its forward (a no-op outside :func:`grad_of_sum`).

    Inside the torch.func forward of :func:`grad_of_sum`, a module already known to hold an operation
    torch.func refuses ends that forward before any work (the gradient is then taken with torch.autograd);
    any other module is noted, so that the refusal, if it comes, is remembered for the next call.
    """
    state = _INNER.get()
    if state is None or state.autograd:
        return
    if module in _LEGACY_MODULES:
        raise _NeedsAutograd()
    state.modules.append(module)


def _refused(cause: BaseException) -> RuntimeError:
    error = RuntimeError(_checks.message(
        "torchex_fn", "a model that torch.func transforms (vmap, grad, jacrev, ...) can run through",
        "an autograd.Function without setup_context inside the model (for instance torchvision's roi_align "
        "in Faster R-CNN / Mask R-CNN, or a custom Function written in the legacy style), under an enclosing "
        "torch.func transform",
        "A plain call differentiates such a model with torch.autograd; vmap, grad and jacrev around the call "
        "cannot. Loop over the batch in Python instead of vmap, or give the Function a setup_context "
        "(https://pytorch.org/docs/stable/notes/extending.func.html)."))
    error.__cause__ = cause
    return error


def _reaches_outside(root: Any, inside: List[Tensor]) -> bool:
    """Whether the autograd graph below ``root`` reaches a leaf other than ``inside`` (something a caller tracks)."""
    own = {id(t) for t in inside}

    def outside(node: Any) -> bool:
        variable = getattr(node, "variable", None)
        return isinstance(variable, Tensor) and id(variable) not in own
    return _graph_has(root, outside)


def _autograd_vjp(f: Callable[[Any], Any], primal: Any, has_aux: bool, math: bool, cause: BaseException) -> Any:
    """``torch.func.vjp``'s ``(out, vjp_fn, *aux)`` by torch.autograd, for a forward that torch.func refuses.

    Same values: the forward runs once under autograd w.r.t. fresh leaves standing for ``primal`` (or
    ``primal``'s own tensors where a caller's autograd tracks them, so that the caller can differentiate
    on). ``vjp_fn(cotangent, retain_graph=..., create_graph=...)`` is ``torch.autograd.grad``. The
    auxiliary values are detached unless the output is tracked from outside (then they keep the caller's
    graph). Under an enclosing torch.func transform there is no such way: a clear error.
    """
    if torch._C._are_functorch_transforms_active():
        raise _refused(cause)
    flat, spec = _pytree.tree_flatten(primal)
    enabled = torch.is_grad_enabled()
    inputs = [t if not isinstance(t, Tensor) or (enabled and t.requires_grad)
              else t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for t in flat]
    tensors = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    state = _Inner(math, autograd=True)
    token = _INNER.set(state)
    try:
        with torch.enable_grad(), math_attention() if math else contextlib.nullcontext():
            result = f(_pytree.tree_unflatten(inputs, spec))
    finally:
        _INNER.reset(token)
    out, aux = (result[0], result[1]) if has_aux else (result, None)
    outer = enabled and isinstance(out, Tensor) and out.requires_grad and _reaches_outside(out.grad_fn, [
        t for t, given in zip(inputs, flat) if t is not given])
    if not outer and has_aux:
        aux = _pytree.tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, aux)

    def vjp_fn(cotangent: Any, retain_graph: Optional[bool] = None, create_graph: bool = False) -> tuple:
        if not isinstance(out, Tensor) or not out.requires_grad:
            grads: Any = [None] * len(tensors)
        else:
            # the caller's graph goes through this one: keep it whenever the result is differentiated on
            grads = torch.autograd.grad(out, tensors, cotangent, retain_graph=bool(retain_graph) or create_graph,
                                        create_graph=create_graph, allow_unused=True)
        found = iter(grads)
        full = [(lambda g, t: torch.zeros_like(t) if g is None else g)(next(found), t)
                if isinstance(t, Tensor) and t.requires_grad else (torch.zeros_like(t) if isinstance(t, Tensor) else t)
                for t in inputs]
        return (_pytree.tree_unflatten(full, spec),)

    plain = out.detach() if isinstance(out, Tensor) and not outer else out
    return (plain, vjp_fn, aux, outer) if has_aux else (plain, vjp_fn, outer)


def _vjp(f: Callable[[Any], Any], primal: Any, has_aux: bool, state: _Inner) -> Any:
    def inner(p: Any) -> Any:
        result = f(p)
        total = result[0] if has_aux else result
        if isinstance(total, Tensor):
            state.root = torch.func.debug_unwrap(total, recurse=False).grad_fn
        return result

    token = _INNER.set(state)
    try:
        with math_attention() if state.math else contextlib.nullcontext():
            return torch.func.vjp(inner, primal, has_aux=has_aux)
    finally:
        _INNER.reset(token)


def grad_of_sum(f: Callable[[Any], Any], primal: Any, *, has_aux: bool = False) -> Any:
    """``d f(primal) / d primal`` for a scalar ``f``; with ``has_aux``, ``f -> (total, aux)`` and ``(grad, aux)``.

    Same values and composability as ``torch.func.grad(f, has_aux=has_aux)(primal)``; the backward
    records a graph of itself only when an outer derivative may need it, and attention runs through
    its twice-differentiable math backend exactly then (see the module docstring).
    """

    if compiling():  # the plain gradient: torch.compile cannot trace ContextVar.set nor the global holds
        total, vjp_fn, *aux = torch.func.vjp(f, primal, has_aux=has_aux)
        (grads,) = vjp_fn(torch.ones_like(total), create_graph=True)
        return (grads, aux[0]) if has_aux else grads
    parent = _INNER.get()
    state = _Inner((parent is not None and parent.math) or any(tracked(t) for t in leaves(primal)))
    try:
        total, vjp_fn, *aux = _vjp(f, primal, has_aux, state)
    except (RuntimeError, _NeedsAutograd) as error:
        if not _is_legacy(error):
            raise
        _LEGACY_MODULES.update(state.modules)  # the next call skips the torch.func attempt
        total, vjp_fn, *rest = _autograd_vjp(f, primal, has_aux, state.math, error)
        *aux, outer = rest
        (grads,) = vjp_fn(torch.ones_like(total), retain_graph=False, create_graph=outer)
        return (grads, aux[0]) if has_aux else grads
    create_graph = torch.is_grad_enabled() and tracked(total)
    if create_graph and not state.math and _has_fused_attention(state.root):
        state = _Inner(True)  # rule 3: run the forward again, with attention that can be differentiated twice
        total, vjp_fn, *aux = _vjp(f, primal, has_aux, state)
    state.root = None
    (grads,) = vjp_fn(torch.ones_like(total), retain_graph=False, create_graph=create_graph)
    return (grads, aux[0]) if has_aux else grads


def grads_of_sums(f: Callable[[Any], Any], primal: Any, *, has_aux: bool = False) -> Any:
    """``[d f(primal)[k] / d primal for each k]`` for ``f -> (total_0, total_1, ...)`` (a tuple of scalars).

    One forward and one backward per total (each reaches back only as far as its total depends on
    ``primal``); with ``has_aux``, ``f -> (totals, aux)`` and ``(grads, aux)``. The second graph is
    recorded as in :func:`grad_of_sum`. Attention is not switched here: callers that need this compute
    attention explicitly (the decomposition of :mod:`torchex_fn.core.attention`, through
    ``intercept.run(..., attention=True)``).
    """
    try:
        totals, vjp_fn, *aux = torch.func.vjp(f, primal, has_aux=has_aux)
        create_graph = torch.is_grad_enabled() and any(tracked(t) for t in totals)
    except RuntimeError as error:
        if not _is_legacy(error):
            raise
        stacked = (lambda p: (lambda r: (torch.stack(list(r[0])), r[1]))(f(p))) if has_aux else \
            (lambda p: torch.stack(list(f(p))))
        joined, vjp_fn, *rest = _autograd_vjp(stacked, primal, has_aux, False, error)
        *aux, create_graph = rest
        totals = tuple(joined.unbind(0))
        grads = []
        for k in range(len(totals)):
            (g,) = vjp_fn(torch.nn.functional.one_hot(torch.tensor(k), len(totals)).to(joined),
                          retain_graph=k < len(totals) - 1 or create_graph, create_graph=create_graph)
            grads.append(g)
        return (grads, aux[0]) if has_aux else grads
    grads = []
    for k in range(len(totals)):
        cotangents = tuple(torch.ones_like(t) if j == k else torch.zeros_like(t) for j, t in enumerate(totals))
        (g,) = vjp_fn(cotangents, retain_graph=k < len(totals) - 1 or create_graph, create_graph=create_graph)
        grads.append(g)
    return (grads, aux[0]) if has_aux else grads


# --------------------------------------------------------------------------------------------
# Two gradients of one forward, for a call that nothing outside differentiates.

def untracked(*values: Any) -> bool:
    """Whether nothing outside this call can differentiate a result computed from ``values``: no ``torch.func``
    transform is active, ``torch.compile`` is not tracing, and no tensor of ``values`` is :func:`tracked`."""
    if compiling() or torch._C._are_functorch_transforms_active():
        return False
    return not any(tracked(t) for value in values for t in leaves(value))


def staged_grads(f: Callable[[Tensor], Any], primal: Tensor, then: Callable[[Tensor, Tensor], Tensor]) -> Any:
    """Two gradients from one forward: ``(g, d then(mid, g) / d primal, aux)`` for ``f(primal) -> (total, mid, aux)``.

    ``g = d total / d mid`` comes from a backward that stops at ``mid`` (an intermediate value of ``f``), and
    the second backward runs from the scalar ``then(mid, g)`` down to ``primal``, ``g`` held constant. That is
    one forward where a ``torch.func`` formulation needs two (the first gradient w.r.t. a zero perturbation of
    ``mid``, the second w.r.t. ``primal`` through a second forward): both backwards are taken with
    ``torch.autograd`` on the one graph, and the gradients are plain tensors (no graph of them is recorded).

    So it serves only calls whose results nothing outside differentiates: the caller checks
    :func:`untracked` on ``primal`` and the tensors it passes, and this returns ``None`` (the caller then
    differentiates with :func:`grad_of_sum`) when the forward's graph reaches a tensor that a caller's autograd
    tracks (a ``model_fn`` closing over one). ``aux`` comes back detached.
    """
    def detach(v: Any) -> Any:
        return v.detach() if isinstance(v, Tensor) else v

    with torch.enable_grad():
        leaf = primal.detach().requires_grad_(True)
        total, mid, aux = f(leaf)
        roots = [t.grad_fn for t in (total, mid) if t.requires_grad]
        if any(_reaches_outside(root, [leaf]) for root in roots):
            return None
        g = None
        if total.requires_grad and mid.requires_grad:
            (g,) = torch.autograd.grad(total, mid, retain_graph=True, allow_unused=True)
        g = torch.zeros_like(mid) if g is None else g
        below = None
        if mid.requires_grad:
            head = then(mid, g)
            if head.requires_grad:
                (below,) = torch.autograd.grad(head, leaf, allow_unused=True)
    below = torch.zeros_like(primal) if below is None else below
    return g, below, _pytree.tree_map(detach, aux)
