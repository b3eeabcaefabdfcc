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
from collections.abc import Mapping
from typing import Any, Callable, Iterator, List, Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

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

    __slots__ = ("math", "root")

    def __init__(self, math: bool):
        self.math = math      # the whole forward holds the math backend
        self.root: Any = None  # the inner output's autograd node (to look for fused attention)


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


def _has_fused_attention(root: Any) -> bool:
    """Whether an autograd graph holds a fused attention node (differentiable only once)."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith(_FUSED):
            return True
        stack.extend(nxt for nxt, _ in node.next_functions)
    return False


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
    total, vjp_fn, *aux = _vjp(f, primal, has_aux, state)
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
    totals, vjp_fn, *aux = torch.func.vjp(f, primal, has_aux=has_aux)
    create_graph = torch.is_grad_enabled() and any(tracked(t) for t in totals)
    grads = []
    for k in range(len(totals)):
        cotangents = tuple(torch.ones_like(t) if j == k else torch.zeros_like(t) for j, t in enumerate(totals))
        (g,) = vjp_fn(cotangents, retain_graph=k < len(totals) - 1 or create_graph, create_graph=create_graph)
        grads.append(g)
    return (grads, aux[0]) if has_aux else grads
