"""Modified back-propagation: DeepLIFT with the Rescale rule, DeepLIFT-SHAP, guided back-propagation, deconvolution.

DeepLIFT explains ``f(x) - f(baseline)``. Every nonlinear operation on the path gets a *multiplier*
in place of its derivative, chosen so that it maps the operation's input difference (baseline
``z_0`` vs. input ``z_x``) exactly onto its output difference; linear operations keep their
derivatives. The attribution is ``(x - baseline) * dscore/dx`` with these multipliers, and because
every step conserves the difference, the map sums to ``f(x) - f(baseline)`` (completeness, the
method's defining property) on any network built from the operations below:

* elementwise ``y = g(z)`` (every activation, ``exp``, ``log``, ``rsqrt``, ``pow``, ``clamp``,
  ``1 / z``, ...): the Rescale rule, ``m = (g(z_x) - g(z_0)) / (z_x - z_0)`` (Shrikumar et al.);
* products of two input-dependent tensors and every bilinear operation (``a * b``, ``a @ b``,
  ``bmm``, ``einsum``, ``F.linear`` with an input-dependent weight; squeeze-excitation gates,
  ``x * sigmoid(x)`` written out, attention's ``Q K^T`` and ``A V``): the joint term split evenly,
  ``f(a_x, b_x) - f(a_0, b_0) = f(Δa, (b_x + b_0) / 2) + f((a_x + a_0) / 2, Δb)`` (for ``a * b``
  the two-factor Shapley value); ``a / b`` is ``a * (1 / b)``;
* normalisations (layer / group / RMS / instance norm, batch norm with batch statistics) run as
  centring (linear), variance (a product), ``rsqrt`` (Rescale) and the scaling ``d * r``, whose
  split credits the change of scale at the pass with the smaller variance (:class:`_Scale`: exact,
  and bounded where the even split cancels catastrophically at zero-variance baselines); batch
  norm in eval mode is linear;
* softmax: exp, sum, reciprocal and product, with the same split for the normaliser
  (:class:`_Softmax`); ``softmax="captum"`` selects captum's rule instead, which does not conserve;
* ``F.scaled_dot_product_attention`` (also its fused kernels) and ``nn.MultiheadAttention`` run as
  their math: products, masks, softmax;
* max pooling: captum's rule (it conserves).

Which tensors depend on the input is tracked through the call (:mod:`..core.intercept`), so that
``w * x`` with a parameter ``w`` stays linear while ``a * b`` of two activations is a product. An
operation on an input-dependent tensor that has no rule and is not known to be linear raises
``NotImplementedError`` naming it: it is never treated as linear in silence (which is how completeness
used to fail, by factors up to 3,900, on ConvNeXt, EfficientNet, Swin, ViT and BERT).

How it is computed here (native, no captum at run time), for one call:

1. **Baseline pass** ``model_fn(params, baseline)``: every operation with a rule (see
   :mod:`..core.intercept`; it is intercepted as an *operation*, so reused modules, in-place modules and
   ``F.relu`` in ``forward`` are all seen) records its inputs ``z_0`` and output ``y_0``. A baseline
   shared by all examples (a number, or a tensor whose batch dimension is 1 or absent) runs as a
   batch of one.
2. **Input pass** ``model_fn(params, x)``, outside any gradient: the k-th call is paired with the
   k-th call of the baseline pass and records ``z_x``, ``y_x`` and the multipliers, e.g.
   ``m = where(|z_x - z_0| < eps, g'(z_x), (y_x - y_0) / (z_x - z_0))`` for an elementwise op.
3. **Gradient pass** inside ``torch.func.grad`` w.r.t. ``x``: the k-th call returns a surrogate,
   ``y_x + m * (z - z_x)`` for an elementwise op, ``t_x + f(a - a_x, b_mean) + f(a_mean, b - b_x)``
   for a product. Its value is ``y_x``; its derivative w.r.t. ``x`` is ``m``, because
   ``y_x``, ``z_x`` and ``m`` come from pass 2, made outside this ``grad``. Passes 1 and 2 are
   ordinary differentiable code, so the map is an ordinary function of ``params`` and ``x``:
   ``torch.func.grad`` of a loss on the map w.r.t. ``params`` is the true derivative (a custom
   ``autograd.Function`` replacing the backward would give the right map but the wrong derivative
   of the map), and everything composes with ``torch.func`` transforms.

Pass 2 exists only for the caller's derivatives: the surrogate needs ``z_x`` constant for the inner
``grad`` yet differentiable for outer transforms, and no public ``torch.func`` operation stops the
inner derivative alone (``detach`` stops all of them). When nothing reaching a nonlinearity is
tracked (no ``requires_grad``, no ``torch.func`` transform, no dual tensor; the plain call),
pass 2 is skipped: the gradient pass computes the multipliers itself from the detached ``z``.
Merging passes 1 and 2 into one batch of ``2B`` (captum's way) would cost more on CPU than a batch
of ``B`` plus a batch of one.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import checks as _checks, inputs as _inputs
from ..core import docs as _docs
from ..core import intercept as _intercept
from ..core.autodiff import grad_of_sum, tracked
from ..core import targets as _targets
from ..core.types import ModelFn, Params, Target
from ..core.arguments import check_call
from ..core.capture import intermediates, layer_shapes, resolve_layers
from ..core.model import FunctionalModel

__all__ = ["deeplift", "deeplift_shap", "guided_backprop", "deconvolution"]

_BACKENDS = ("native", "captum")


# --------------------------------------------------------------------------------------------
# Validation.

def _check_eps(fn: str, eps: Any) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise _checks.type_error(fn, "eps, a float >= 0", _checks.describe(eps))
    if not eps >= 0 or math.isinf(eps):
        raise _checks.value_error(fn, "eps, a finite float >= 0", _checks.describe(eps))


def _check_backend(fn: str, backend: Any) -> None:
    if not isinstance(backend, str):
        raise _checks.type_error(fn, "backend, 'native' or 'captum'", _checks.describe(backend))
    if backend not in _BACKENDS:
        raise _checks.value_error(fn, "backend 'native' or 'captum'", _checks.describe(backend))


_SOFTMAX_RULES = ("conserving", "captum")


def _check_softmax(fn: str, softmax: Any):
    """The rule table for ``softmax=``: ``"conserving"`` (default) or ``"captum"``."""
    if not isinstance(softmax, str):
        raise _checks.type_error(fn, "softmax, 'conserving' or 'captum'", _checks.describe(softmax))
    if softmax not in _SOFTMAX_RULES:
        raise _checks.value_error(fn, "softmax 'conserving' or 'captum'", _checks.describe(softmax))
    return _RULES if softmax == "conserving" else _CAPTUM_RULES


# --------------------------------------------------------------------------------------------
# The rules: what the gradient pass returns in place of each intercepted call.

class _Record(NamedTuple):
    """One call of a pass: the op's name, its tainted inputs and full output (``(y, indices)`` for max pooling)."""

    name: str
    inputs: tuple
    out: Any


class _Mismatch(Exception):
    """Internal: the two passes did not make the same calls (the message says what differed)."""


def _returned(call: _intercept.Call, out: Any) -> Any:
    """What the model receives from a call whose full result is ``out``."""
    if call.kind == "maxpool" and not call.options["return_indices"]:
        return out[0]
    return out


def _derivative(call: _intercept.Call, z: Tensor, shape: Sequence[int]) -> Tensor:
    """``g'(z)`` of an elementwise op, shaped like its output ``shape`` (used where ``z_x ≈ z_0``)."""
    if call.name == "relu":
        return (z > 0).to(z.dtype)
    if call.name == "sigmoid":
        y = torch.sigmoid(z)
        return y * (1 - y)
    if call.name == "tanh":
        y = torch.tanh(z)
        return 1 - y * y
    # elementwise: the Jacobian is diagonal, so a vector-Jacobian product with ones is g'(z). (vjp,
    # not jvp: torch.func.jvp's first use imports decompositions that warn under recent torch.) An
    # op that broadcasts z against a larger fixed argument gets z expanded first.
    zb = z if tuple(z.shape) == tuple(shape) else z.expand(shape).contiguous()
    y_again, pullback = torch.func.vjp(call.apply, zb)  # type: ignore[misc]  # 2 values without has_aux
    return pullback(torch.ones_like(y_again))[0]


def _differences(z_x: Tensor, z_0: Tensor, eps: float):
    """``dz = z_x - z_0``, the mask ``|dz| < eps`` (or NaN), and ``dz`` made safe to divide by (1 where small).

    The safe denominator keeps every derivative finite, so that a ``where`` choosing the other
    branch cannot receive NaN from the unused one. ``dz`` is NaN where both passes hold the same
    infinity (a masked attention score): such an element counts as unchanged.
    """
    dz = z_x - z_0
    small = ~(dz.abs() >= eps)
    return dz, small, torch.where(small, 1.0, dz)


def _near(z_x: Tensor, z_0: Tensor, dz: Tensor, small: Tensor) -> Tensor:
    """``small``, or ``|dz|`` within ``sqrt(eps_machine)`` of ``|z_x| + |z_0|``: where the secant is round-off.

    There ``(g(z_x) - g(z_0)) / dz`` keeps at most half of its digits (its error is
    ``eps_machine |g| / |dz|``), and where ``z_x`` and ``z_0`` agree up to round-off (a norm of a
    normalised vector, whose variance is 1 in both passes) it is noise: a map that jumps with every
    change of the parameters. The derivative at the midpoint differs from the exact secant by
    ``O(dz^2)``, below round-off here.
    """
    tol = torch.finfo(dz.dtype).eps ** 0.5
    return small | (dz.abs() <= tol * (z_x.abs() + z_0.abs()))


class _Elementwise:
    """``y = g(z)`` element by element (the Rescale rule); surrogate ``y_x + m * (z - z_x)``.

    ``m = (g(z_x) - g(z_0)) / (z_x - z_0)``; where ``|z_x - z_0| < eps`` or the two agree up to
    round-off (see :func:`_near`), ``g'((z_x + z_0) / 2)``.
    """

    def __init__(self, call: _intercept.Call, x: _Record, base: _Record, eps: float):
        (z_x,), (z_0,) = x.inputs, base.inputs
        dz, small, safe = _differences(z_x, z_0, eps)
        self.z_x, self.y_x = z_x, x.out
        self.shapes = (z_x.shape,)
        if call.name == "relu":  # piecewise linear: the secant is exact in floating point (the fast path)
            self.m = torch.where(small, (z_x > 0).to(z_x.dtype), (x.out - base.out) / safe)
            return
        small = _near(z_x, z_0, dz, small)
        safe = torch.where(small, 1.0, dz)
        mid = torch.where(small, 0.5 * (z_x + z_0), z_x)
        self.m = torch.where(small, _derivative(call, mid, x.out.shape), (x.out - base.out) / safe)

    def __call__(self, call: _intercept.Call) -> Tensor:
        return self.y_x + self.m * (call.input - self.z_x)


class _Bilinear:
    """``t = f(a, b)`` linear in each argument: the difference's joint term split evenly.

    ``f(a_x, b_x) - f(a_0, b_0) = f(a_x - a_0, (b_x + b_0) / 2) + f((a_x + a_0) / 2, b_x - b_0)``
    exactly, for every bilinear ``f`` (products, matrix products, einsum, ...): ``a`` passes back
    through ``f(., b_mean)`` and ``b`` through ``f(a_mean, .)``. The surrogate
    ``t_x + f(a - a_x, b_mean) + f(a_mean, b - b_x)`` has the value ``t_x`` and these derivatives.
    For ``a * b`` this is the Shapley value of the two-factor product (each factor's effect averaged
    over the other factor at its input and at its baseline value).
    """

    def __init__(self, call: _intercept.Call, x: _Record, base: _Record, eps: float):
        (a_x, b_x), (a_0, b_0) = x.inputs, base.inputs
        self.a_x, self.b_x, self.t_x = a_x, b_x, x.out
        self.a_mean, self.b_mean = 0.5 * (a_x + a_0), 0.5 * (b_x + b_0)
        self.shapes = (a_x.shape, b_x.shape)

    def __call__(self, call: _intercept.Call) -> Tensor:
        a, b = call.inputs
        return self.t_x + call.apply(a - self.a_x, self.b_mean) + call.apply(self.a_mean, b - self.b_x)


class _Scale:
    """``y = d * r`` inside a normalisation, ``r = rsqrt(var(d) + eps)``: a product split by the variances.

    Every split ``Δ(d r) = Δd * r_w + d_w * Δr`` with ``r_w = β r_x + (1 - β) r_0`` and
    ``d_w = (1 - β) d_x + β d_0`` is exact, for any ``β`` (per element). The even split
    ``β = 1/2`` (the product rule) is badly conditioned at the usual baselines: a zero or constant
    baseline has ``var_0 ≈ 0``, where ``r_0 = eps^-1/2`` is large and the secant of ``rsqrt`` huge,
    so that two large terms cancel at every normalisation and float32 round-off grows layer after
    layer (measured on timm's convnext_atto at its initialisation with a zero baseline: a
    completeness error 7e4 times the output difference in float32, 5e-5 in float64). Here
    ``β = (var_x + eps) / (var_x + var_0 + 2 eps)``: 1/2 (the product rule) when the two variances
    agree, and the change of scale credited at the centred vector of the pass with the smaller
    variance as they part (``β -> 1`` as ``var_0 -> 0``), which keeps every multiplier bounded; ``β``
    is continuous, so the map is a smooth function of the parameters. For a baseline with
    ``d_0 = 0`` (zero, constant) the normalisation passes differences back as nearly the linear map
    ``Δz -> r_x (Δz - mean Δz)``, the treatment of layer norm as linear of Ali et al., "XAI for
    Transformers: Better Explanations through Conservative Propagation", ICML 2022.
    """

    def __init__(self, call: _intercept.Call, x: _Record, base: _Record, eps: float):
        (d_x, r_x), (d_0, r_0) = x.inputs, base.inputs
        beta = torch.reciprocal(1 + (r_x / r_0) ** 2)        # (var_x + eps) / (var_x + var_0 + 2 eps)
        self.r_w = beta * r_x + (1 - beta) * r_0
        self.d_w = (1 - beta) * d_x + beta * d_0
        self.d_x, self.r_x, self.t_x = d_x, r_x, x.out
        self.shapes = (d_x.shape, r_x.shape)

    def __call__(self, call: _intercept.Call) -> Tensor:
        d, r = call.inputs
        return self.t_x + (d - self.d_x) * self.r_w + self.d_w * (r - self.r_x)


class _Softmax:
    """Softmax as exp, sum, reciprocal and product, each with a conserving rule (the default).

    With ``e = exp(z - c)``, ``S = sum(e)`` and ``y = e * (1 / S)``: ``exp`` gets the Rescale
    multiplier ``m = (e_x - e_0) / (z_x - z_0)`` (computed as ``exp(mid - c) sinh(dz/2) / (dz/2)``,
    free of cancellation, for moderate ``dz``; ``exp(z_x - c)`` where ``dz = 0``), the sum is
    linear, ``1 / S`` gets its secant ``-1 / (S_x S_0)``, and the product ``e * (1 / S)`` the split of
    :class:`_Scale` with ``β = sigmoid(lse_x - lse_0)`` (``lse`` the log-sum-exp of a row): the even
    split when the two sums agree, the normaliser's change credited at the exponentials of the pass
    with the smaller sum as they part. The chain is ``L v = (a_x + a_0) m v - (a_0 y_x + a_x y_0)
    sum(m v)`` with ``a_x = β / S_x`` and ``a_0 = (1 - β) / S_0`` (each at most 1 with ``c`` the
    larger ``lse``, computed in log space), and ``L (z_x - z_0) = y_x - y_0`` exactly. The even split
    alone would give coefficients that grow like ``exp |lse_x - lse_0|`` and cancel (overflowing
    float32 for attention scores that move by ~90 between the input and the baseline).
    """

    def __init__(self, call: _intercept.Call, x: _Record, base: _Record, eps: float):
        (z_x,), (z_0,) = x.inputs, base.inputs
        self.dim = call.options["dim"]
        dz, small, safe = _differences(z_x, z_0, eps)
        self.dead = small & ~torch.isfinite(z_x)      # -inf in both passes (masked): no contribution
        lse_x = torch.logsumexp(z_x, self.dim, keepdim=True)
        lse_0 = torch.logsumexp(z_0, self.dim, keepdim=True)
        c = torch.maximum(lse_x, lse_0)
        e_x, e_0 = torch.exp(z_x - c), torch.exp(z_0 - c)       # both <= 1
        # The secant of exp, (e_x - e_0) / dz = exp(mid - c) sinh(dz / 2) / (dz / 2), in the second form
        # where dz is moderate: the first loses every digit when dz is below the round-off of z - c.
        half = torch.where(small, 0.0, 0.5 * dz)
        close = half.abs() < 10
        h = torch.where(close & ~small, half, 1.0)
        sinhc = torch.where(close & ~small, torch.sinh(h) / h, 1.0)
        near = torch.exp(0.5 * (z_x + z_0) - c) * sinhc
        self.m = torch.where(close, near, (e_x - e_0) / safe)
        delta = lse_x - lse_0
        a_x = torch.exp(F.logsigmoid(delta) + c - lse_x)       # β / S_x
        a_0 = torch.exp(F.logsigmoid(-delta) + c - lse_0)      # (1 - β) / S_0
        self.r_w = a_x + a_0
        self.e_w = a_0 * x.out + a_x * base.out
        self.z_x, self.y_x = z_x, x.out
        self.shapes = (z_x.shape,)

    def __call__(self, call: _intercept.Call) -> Tensor:
        v = torch.where(self.dead, 0.0, call.input - self.z_x)
        mv = self.m * v
        return self.y_x + self.r_w * mv - self.e_w * mv.sum(dim=self.dim, keepdim=True)


class _SoftmaxCaptum:
    """Softmax as captum's rule treats it, for one example at a time (``softmax="captum"``).

    captum's backward: ``u = where(|dz| < eps, J^T g, g * dy/dz)`` element by element, minus the
    mean of ``u`` over the input *and* the baseline copy (captum runs both as one batch, and the
    baseline copy's ``u`` uses the baseline's Jacobian ``J_0`` where ``|dz| < eps``). The surrogate
    is ``y_x + L(z - z_x)`` with ``L`` the transpose of that map:
    ``L v = J_x(s v) + m v - [(J_x + J_0)(s mean(v)) / 2 + m mean(v)]``, ``s`` the small-difference
    mask and ``mean`` over the example. captum takes that mean over the whole batch instead, which
    couples the examples; here each example is its own. This rule does not conserve the difference.
    """

    def __init__(self, call: _intercept.Call, x: _Record, base: _Record, eps: float):
        (z_x,), (z_0,) = x.inputs, base.inputs
        dz, small, safe = _differences(z_x, z_0, eps)
        self.dim = call.options["dim"]
        self.z_x, self.y_x, self.y_0 = z_x, x.out, base.out
        self.m = torch.where(small, torch.zeros_like(dz), (x.out - base.out) / safe)
        self.small = small.to(dz.dtype)
        self.reduce = tuple(range(1, dz.ndim)) if dz.ndim > 1 else tuple(range(dz.ndim))
        self.shapes = (z_x.shape,)

    def _jvp(self, y: Tensor, t: Tensor) -> Tensor:
        """The softmax Jacobian at output ``y`` times ``t`` (the Jacobian is symmetric)."""
        return y * (t - (y * t).sum(dim=self.dim, keepdim=True))

    def __call__(self, call: _intercept.Call) -> Tensor:
        v = call.input - self.z_x
        mean = v.mean(dim=self.reduce, keepdim=True)
        sv, smean = self.small * v, self.small * mean
        centre = 0.5 * (self._jvp(self.y_x, smean) + self._jvp(self.y_0, smean)) + self.m * mean
        return self.y_x + self._jvp(self.y_x, sv) + self.m * v - centre


def _gather(values: Tensor, index: Tensor, spatial: int) -> Tensor:
    """``values`` at the pooling ``index`` (flat positions within each plane), shaped like ``index``."""
    flat = values.flatten(values.ndim - spatial)
    picked = torch.gather(flat, -1, index.flatten(index.ndim - spatial))
    return picked.reshape(index.shape)


class _MaxPool:
    """Max pooling as captum's rule treats it; windows that overlap add up.

    With ``o_x``, ``o_0`` the pooled input and baseline, and ``M = max(o_x, o_0)``, each output's
    difference ``o_x - o_0`` is split into ``M - o_0`` credited to the input's arg-max and
    ``o_x - M`` credited to the baseline's arg-max; each input element's share is divided by its own
    ``z_x - z_0`` (the ordinary max-pool gradient where that is below ``eps``). The surrogate is
    ``o_x + a * w[i_x] + c * w[i_0] + u[i_x]`` with ``v = z - z_x``, ``w = v / dz`` and ``u = v``
    where ``|dz| < eps``: the value is ``o_x`` and its transpose is that rule.
    """

    def __init__(self, call: _intercept.Call, x: _Record, base: _Record, eps: float):
        (z_x,), (z_0,) = x.inputs, base.inputs
        dz, small, safe = _differences(z_x, z_0, eps)
        (o_x, self.i_x), (o_0, i_0) = x.out, base.out
        top = torch.maximum(o_x, o_0)
        self.spatial = call.options["spatial"]
        self.z_x, self.o_x = z_x, o_x
        self.i_0 = i_0.expand(o_x.shape)
        self.a, self.c = top - o_0, o_x - top
        self.small = small.to(dz.dtype)
        self.inv = (1 - self.small) / safe
        self.shapes = (z_x.shape,)

    def __call__(self, call: _intercept.Call) -> Any:
        v = call.input - self.z_x
        w = v * self.inv
        n = self.spatial
        y = (self.o_x + self.a * _gather(w, self.i_x, n) + self.c * _gather(w, self.i_0, n)
             + _gather(v * self.small, self.i_x, n))
        return y, self.i_x


_RULES = {"elementwise": _Elementwise, "bilinear": _Bilinear, "scale": _Scale, "softmax": _Softmax,
          "maxpool": _MaxPool}
_CAPTUM_RULES = dict(_RULES, softmax=_SoftmaxCaptum)


def _describe_call(name: str, inputs: Sequence[Tensor]) -> str:
    return f"{name} on " + " and ".join(str(list(t.shape)) for t in inputs)


def _pair(records: List[_Record], call: _intercept.Call) -> _Record:
    """The baseline record paired with ``call`` of the input side (the k-th with the k-th)."""
    k = call.index
    if k >= len(records):
        raise _Mismatch(f"{_describe_call(call.name, call.inputs)} at call {k} for the input and only "
                        f"{len(records)} calls for the baseline")
    rec = records[k]
    if (rec.name != call.name or len(rec.inputs) != len(call.inputs)
            or not all(_inputs.broadcasts_to(r.shape, c.shape) for r, c in zip(rec.inputs, call.inputs))):
        raise _Mismatch(f"{_describe_call(call.name, call.inputs)} at call {k} for the input and "
                        f"{_describe_call(rec.name, rec.inputs)} for the baseline")
    return rec


def _no_rule(fn: str, err: _intercept.NoRule) -> NotImplementedError:
    detail = f" ({err.detail})" if err.detail else ""
    return NotImplementedError(_checks.message(
        fn, "operations with a DeepLIFT rule on input-dependent tensors",
        f"'{err.op}'{detail}, which has no rule and is not known to be linear",
        "DeepLIFT never treats an unknown operation as linear, since that would break completeness silently; "
        "rewrite that part of the model with supported operations (see torchex_fn.core.intercept)."))


def _rescale(fn: str, model_fn, params, x: Tensor, target: Any, baseline: Tensor, eps: float,
             rules: Optional[Mapping[str, Any]] = None) -> Tensor:
    """The native Rescale rule; arguments already checked (see the module docstring for the passes)."""
    rules = _RULES if rules is None else rules
    shared = baseline.ndim < x.ndim or baseline.shape[0] == 1
    batches = [1, x.shape[0]] if shared and x.shape[0] > 1 else [x.shape[0]]
    for batch in batches:
        base = torch.broadcast_to(baseline, x.shape)[:batch].contiguous()
        try:
            return _rescale_once(fn, model_fn, params, x, target, baseline, base, eps, rules)
        except _intercept.NoRule as err:
            raise _no_rule(fn, err) from None
        except _Mismatch as err:
            if batch != x.shape[0]:
                continue  # the baseline alone did not behave like one example of the batch: run it in full
            raise _checks.value_error(
                fn, "the baseline pass to make the same nonlinear calls as the input pass", str(err),
                "DeepLIFT pairs the k-th nonlinearity of both passes, so the model must not branch on its "
                "input's values (data-dependent control flow).") from None
    raise AssertionError("unreachable")


class _Wrt:
    """What DeepLIFT attributes, and how a pass reaches it.

    ``run(handler, inp, v)`` runs the model on ``inp`` under :func:`_intercept.run` with input
    dependence tracked from ``v`` and returns ``(out, value, count)``: for the input itself ``v`` is
    the input and ``value`` is ``v``; for a layer, ``v`` is a perturbation of the layer's output (zero;
    the gradient pass differentiates w.r.t. it, which gives the gradient w.r.t. the layer's output) and
    ``value`` is that output, so only what follows the layer gets DeepLIFT's rules.
    """

    def __init__(self, fn: str, model_fn, params, layer: Optional[str] = None, key: Optional[str] = None):
        self.fn, self.model_fn, self.params, self.layer, self.key = fn, model_fn, params, layer, key

    def start(self, inp: Any) -> Tensor:
        """The tensor the tracking starts from: the (attributed entry of the) input, or a zero perturbation."""
        if self.layer is None:
            return inp if self.key is None else inp[self.key]
        shape, dtype = layer_shapes(self.model_fn, self.params, inp, [self.layer], self.fn)[self.layer]
        return torch.zeros(shape, dtype=dtype, device=_inputs.device_of(inp))

    def run(self, handler, inp: Any, v: Tensor):
        if self.layer is None:
            def forward(params, v):
                return self.model_fn(params, _inputs.replace(inp, self.key, v)), v
        else:
            step = intermediates(self.model_fn, layers=[self.layer], perturb={self.layer: v}, fn=self.fn)

            def forward(params, v):
                out, acts = step(params, inp)
                return out, acts[self.layer]
        (out, value), count = _intercept.run(forward, handler, self.params, v, tainted=[v])
        return out, value, count


def _rescale_once(fn: str, model_fn, params, x: Tensor, target: Any, baseline: Tensor, base: Tensor,
                  eps: float, rule_set: Mapping[str, Any], wrt: Optional[_Wrt] = None) -> Tensor:
    wrt = _Wrt(fn, model_fn, params) if wrt is None else wrt
    output = _targets.selector(model_fn)
    records0: List[_Record] = []

    def on_baseline(call: _intercept.Call) -> Any:
        out = call.apply(*call.inputs)
        records0.append(_Record(call.name, call.inputs, out))
        return _returned(call, out)

    out0, value0, _ = wrt.run(on_baseline, base, wrt.start(base))
    base_tracked = any(tracked(t) for r in records0 for t in r.inputs)
    by_index = target is None or isinstance(target, (int, Tensor))
    x_value = wrt.start(x)
    if base_tracked or tracked(x_value) or tracked(value0) or (isinstance(baseline, Tensor) and tracked(baseline)):
        # General path: an input pass outside the gradient, so that the multipliers stay
        # differentiable for the caller's transforms while constant for the inner gradient.
        rules: list = []

        def on_input(call: _intercept.Call) -> Any:
            rec0 = _pair(records0, call)
            out = call.apply(*call.inputs)
            rules.append(rule_set[call.kind](call, _Record(call.name, call.inputs, out), rec0, eps))
            return _returned(call, out)

        out_x, _, count = wrt.run(on_input, x, x_value)
        _check_count(count, len(records0), out_x, out0)
        choice = _targets.resolve_index(out_x, target, fn=fn, output=output) if by_index else target
        del out_x

        def on_gradient(call: _intercept.Call) -> Any:
            k = call.index
            rule = rules[k] if k < len(rules) else None
            if rule is None or rule.shapes != tuple(t.shape for t in call.inputs):
                raise _checks.value_error(fn, "the gradient pass to repeat the input pass's nonlinear calls",
                                          f"{_describe_call(call.name, call.inputs)} at call {k}",
                                          "The model must be deterministic and must not branch on its input's values.")
            return _returned(call, rule(call))
    else:
        # Nothing outside this call is differentiated (no autograd, no torch.func transform, no
        # dual tensor reaches a nonlinearity): the multipliers may be computed inside the gradient
        # pass from detached inputs, which saves the input pass.
        choice = target

        def on_gradient(call: _intercept.Call) -> Any:
            rec0 = _pair(records0, call)
            zs = tuple(t.detach() for t in call.inputs)
            rule = rule_set[call.kind](call, _Record(call.name, zs, call.apply(*zs)), rec0, eps)
            return _returned(call, rule(call))

    expected = len(records0)

    def total(v: Tensor):
        out, value, count = wrt.run(on_gradient, x, v)
        _check_count(count, expected, out, out0)
        return _targets.resolve(out, choice, fn=fn, output=output).sum(), value

    grads, value_x = grad_of_sum(total, x_value, has_aux=True)
    if wrt.layer is None:
        value_x = x_value  # the caller's own tensor, with whatever derivatives it carries
    return (value_x - value0) * grads


def _check_count(count: int, expected: int, out: Any, out0: Any) -> None:
    if count != expected:
        raise _Mismatch(f"{count} calls for the input and {expected} for the baseline")
    if isinstance(out, Tensor) and (not isinstance(out0, Tensor) or not _inputs.broadcasts_to(out0.shape, out.shape)):
        raise _Mismatch(f"an output of shape {list(out.shape)} for the input and {_checks.describe(out0)} "
                        "for the baseline")


# --------------------------------------------------------------------------------------------
# captum, for comparison.

def _captum(fn: str, model_fn, params, x: Tensor, target: Any, baseline: Tensor, eps: float) -> Tensor:
    try:
        with warnings.catch_warnings():  # captum's import warns about torch.jit.script under recent torch
            warnings.filterwarnings("ignore", message=".*torch.jit.script")
            from captum.attr import DeepLift as CaptumDeepLift
    except ImportError as err:
        raise ImportError(f"{fn}: backend='captum' needs the captum package, which is not installed. "
                          "Install it with `pip install captum` (or `pip install torchex-fn[captum]`), "
                          "or use backend='native'.") from err
    if not isinstance(model_fn, FunctionalModel):
        raise _checks.type_error(fn, "a model_fn built by functionalize for backend='captum'",
                                 type(model_fn).__name__,
                                 "captum hooks nn.Module nonlinearities; use `functionalize(model)` or "
                                 "backend='native'.")
    module = model_fn.module
    by_index = target is None or isinstance(target, (int, Tensor))
    if by_index:
        with torch.no_grad():
            index = _targets.resolve_index(model_fn(params, x), target, fn=fn)

    class _Wrapped(torch.nn.Module):
        # captum hooks the nonlinear submodules of the model it is given: the user's module is a child
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, inputs):
            out = model_fn(params, inputs)
            return out if by_index else target(out)[:, None]

    names = ("input", "output", "input_ref")
    before = {id(m): {a for a in names if a in m.__dict__} for m in module.modules()}
    inputs = x.detach().clone()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*Setting forward, backward hooks", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"(?s).*did not already require gradients", category=UserWarning)
            attr = CaptumDeepLift(_Wrapped(), eps=eps).attribute(
                inputs, baselines=torch.broadcast_to(baseline.detach(), x.shape).contiguous(),
                target=index if by_index else 0)
    finally:  # captum may leave its per-module attributes behind when it raises
        for m in module.modules():
            for a in names:
                if a in m.__dict__ and a not in before.get(id(m), set()):
                    delattr(m, a)
    return attr.detach()


# --------------------------------------------------------------------------------------------
# Public functions.

@_docs.fill
def deeplift(model_fn: ModelFn, params: Params, x: Any, target: Target = None, *, layer: Any = None,
             baseline: Any = 0.0, eps: float = 1e-10, backend: str = "native", softmax: str = "conserving") -> Tensor:
    """DeepLIFT with the Rescale rule: ``(x - baseline) * m``, ``m`` the multipliers of the score.

    Every nonlinear operation on the way from ``x`` to the score gets a multiplier that maps its
    input difference (input vs. baseline) exactly onto its output difference: the Rescale rule
    ``(g(z_x) - g(z_0)) / (z_x - z_0)`` for every elementwise function (``g'`` where
    ``|z_x - z_0| < eps``), the even split of the joint term for products and bilinear operations
    of two input-dependent tensors (``a * b``, ``a @ b``, ``einsum``; squeeze-excitation, gated
    units, attention), conserving rules for layer / group / RMS norm and softmax, captum's rule for
    max pooling (overlapping windows add up); ``scaled_dot_product_attention`` and
    ``nn.MultiheadAttention`` run as their math. Linear operations keep their gradients. So the map
    sums to ``f(x) - f(baseline)`` (completeness; see the module docstring for the rules and
    ``tests/methods/test_deeplift_arch.py`` for 28 torchvision, timm and HuggingFace models, complete to
    1e-4 in float32). An operation on an input-dependent tensor that has neither a rule nor a place
    on the list of linear operations raises instead of passing as linear.

    Operations are recognised whether called by a module, a function or a method, in place or not;
    modules may be reused in one forward; in-place nonlinearities run out of place (the model must
    use their returned value). Dropout must be in eval mode (its masks would differ between the
    passes); batch norm with batch statistics is supported (its running statistics are not
    updated), but it couples the examples, so completeness then holds for the batch's total.

    Args:
      {model_fn}
        Examples must be independent (eval mode), the model must make the same sequence of nonlinear
        calls for the input and the baseline (no branching on input values), and it must run on a
        batch of one unless the baseline has one row per example.
      {params}
      x: A batch ``[B, *input]``, or a dict of named inputs batch first (its one floating-point entry
        is attributed). With ``layer``, token ids or a tokenizer's dict.
      {target}
      layer: Attribute to this layer's output instead (a dotted name or module; captum's
        ``LayerDeepLift``): ``(a_x - a_0) * m`` with ``a`` the layer's output on the input and on the
        baseline and ``m`` the multipliers of every operation after the layer. It sums to
        ``f(x) - f(baseline)``. captum's ``LayerDeepLift`` agrees where its module hooks are DeepLIFT's
        rules; on transformers it treats LayerNorm, softmax and attention's products as linear and
        does not sum to the difference. Default: None (the input).
      baseline: The reference input, always in the input's space: a float, or a tensor broadcastable
        to ``[B, *input]`` (one per example ``[B, *input]``, or one for all ``[*input]`` /
        ``[1, *input]``); reference token ids (an int or an integer tensor) for token ids; for a dict
        ``x`` a dict of the entries to replace. Default: 0.0.
      eps: Input differences below this keep the ordinary gradient. Default: 1e-10 (as captum).
      backend: ``"native"`` (this implementation) or ``"captum"`` (``captum.attr.DeepLift``, for
        comparison only: it needs a ``model_fn`` from ``functionalize``, hooks the module's
        nonlinear submodules for the call, raises on reused modules, couples the examples of a batch
        through Softmax, is neither differentiable nor ``vmap``-able, and is not thread-safe).
        Default: ``"native"``.
      softmax: ``"conserving"`` (exp, sum, reciprocal and product with their conserving rules; the
        map stays complete) or ``"captum"`` (captum's rule, centred per example: it reproduces
        ``captum.attr.DeepLift`` on softmax outputs and breaks completeness). Default:
        ``"conserving"``.

    Returns:
      ``[B, *input]`` attributions on ``x``'s dtype and device.

    Raises:
      TypeError: non-float ``x`` or ``baseline``, a bad ``target`` type, a non-functionalized
        ``model_fn`` with ``backend="captum"``.
      NotImplementedError: ``deeplift: expected operations with a DeepLIFT rule on input-dependent
        tensors, got 'cumprod' ...``: an operation without a rule on the path from ``x``.
      ValueError: ``deeplift: expected baseline broadcastable to x's shape [8, 3, 32, 32], got ...``;
        NaN in ``x`` or ``baseline``; ``target`` out of range; an unknown ``backend``; a model whose
        nonlinear calls differ between the input and the baseline.
      ImportError: ``backend="captum"`` without captum installed.

    Example:
      >>> fn, params = functionalize(resnet.eval())
      >>> deeplift(fn, params, images, labels, baseline=0.0).shape      # [8, 3, 224, 224] -> [8, 3, 224, 224]
      >>> torch.func.vmap(lambda p: deeplift(fn, p, images, labels))(stacked)   # ensemble [E, 8, 3, 224, 224]
      >>> torch.func.grad(lambda p: deeplift(fn, p, images, labels).abs().sum())(params)   # meta-learning

    Cost: a plain call makes two forward passes (the baseline, as a batch of one when it is shared
    by all examples; the input under ``torch.func.grad``) and one backward pass to the input (no
    parameter gradients). When the map itself is differentiated (``requires_grad`` inputs or
    parameters, a ``torch.func`` transform) one more forward of the input runs outside the gradient.
    Memory: each nonlinearity's input and output once more than a saliency pass. A product of two
    input-dependent tensors costs three evaluations of the product in the gradient pass (its value
    and one per operand); attention and normalisations run as their decomposed math, not fused
    kernels.

    References:
      Shrikumar, Greenside and Kundaje, "Learning Important Features Through Propagating Activation
      Differences", ICML 2017 (the Rescale rule); Lundberg and Lee, "A Unified Approach to
      Interpreting Model Predictions", NeurIPS 2017 (Shapley values: the even split of a product);
      Ali et al., "XAI for Transformers: Better Explanations through Conservative Propagation",
      ICML 2022 (layer norm passed back as a linear map at the input's scale, which the rule for
      normalisations reduces to at a zero or constant baseline).

    .. versionchanged:: products, normalisations, attention and every elementwise function get
       conserving rules; softmax conserves by default (``softmax="captum"`` for captum's rule);
       operations without a rule raise instead of passing as linear.
    """
    fn = "deeplift"
    target = check_call(fn, model_fn, params, x, target, layer=layer)
    _check_eps(fn, eps)
    _check_backend(fn, backend)
    rules = _check_softmax(fn, softmax)
    if layer is None and isinstance(x, Tensor):
        base: Any = _inputs.check_baseline(fn, baseline, x)
        if backend == "captum":
            return _captum(fn, model_fn, params, x, target, base, float(eps))
        return _rescale(fn, model_fn, params, x, target, base, float(eps), rules)
    if backend == "captum":
        raise _checks.value_error(fn, "backend='native' for layer= or a dict x", "backend='captum'")
    # A layer (captum's LayerDeepLift: (a_x - a_0) times the multipliers of the layer's output, every
    # operation after the layer under DeepLIFT's rules), or a dict x's floating-point entry: the
    # baseline is an input of the full batch, in the input's space.
    if layer is not None:
        names, _ = resolve_layers(fn, model_fn, layer)
        if len(names) != 1 or isinstance(layer, (list, tuple, dict)):
            raise _checks.type_error(fn, "layer, one dotted name or module", _checks.describe(layer),
                                     "Call deeplift once per layer.")
        wrt = _Wrt(fn, model_fn, params, layer=names[0])
        base = _inputs.baseline_input(fn, baseline, x)
    else:
        key = _inputs.attributed_key(fn, x)
        wrt = _Wrt(fn, model_fn, params, key=key)
        base = _inputs.baseline_input(fn, baseline, x, key)
    try:
        return _rescale_once(fn, model_fn, params, x, target, base, base, float(eps), rules, wrt)
    except _intercept.NoRule as err:
        raise _no_rule(fn, err) from None
    except _Mismatch as err:
        raise _checks.value_error(
            fn, "the baseline pass to make the same nonlinear calls as the input pass", str(err),
            "DeepLIFT pairs the k-th nonlinearity of both passes, so the model must not branch on its "
            "input's values (data-dependent control flow).") from None


@_docs.fill
def deeplift_shap(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, baselines: Tensor,
                  eps: float = 1e-10, batch_size: Optional[int] = None, softmax: str = "conserving",
                  layer: Any = None) -> Tensor:
    """DeepLIFT-SHAP: the mean of :func:`deeplift` over a set of baselines.

    ``mean_n deeplift(model_fn, params, x, target, baseline=baselines[n])``. Each baseline is shared
    by the whole batch. The baselines are processed with ``torch.func.vmap``, ``batch_size`` at a
    time: the input pass runs once for all of them (it does not depend on the baseline), the
    baseline passes run as one batch of ``N``, and the gradient pass as one batch of ``N * B``.
    Models that ``vmap`` cannot run (in-place writes of baseline-dependent values into other
    tensors, ``.item()``) need a Python loop over :func:`deeplift` instead. With ``layer``, the mean of
    ``deeplift(..., layer=layer, baseline=baselines[n])`` (captum's ``LayerDeepLiftShap``), one
    baseline after the other (``batch_size`` is then unused).

    Args:
      {model_fn}
      {params}
      {x.batch}
      {target}
      baselines: ``[N, *input]`` reference inputs (e.g. drawn from the training data), N >= 1.
      eps: As in :func:`deeplift`. Default: 1e-10.
      batch_size: At most this many baselines per vectorised call (a memory cap); ``None``: all.
      softmax: As in :func:`deeplift`. Default: ``"conserving"``.
      layer: Attribute to this layer's output (one dotted name or module), as :func:`deeplift`'s
        ``layer``. Default: None (the input).

    Returns:
      ``[B, *input]`` attributions on ``x``'s dtype and device (with ``layer``, of its output's shape).

    Raises:
      TypeError: non-float ``x`` or ``baselines``, a bad ``target`` or ``batch_size`` type.
      ValueError: ``deeplift_shap: expected baselines of shape [N, 3, 32, 32], got ...``; NaN;
        ``target`` out of range.

    Example:
      >>> deeplift_shap(fn, params, images, labels, baselines=background).shape   # [8, 3, 224, 224]

    Cost: one input forward of ``B``, one forward of ``N`` and one forward and backward of ``N * B``
    examples (``batch_size * B`` at a time).

    References:
      Lundberg and Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017;
      Shrikumar et al., ICML 2017.
    """
    fn = "deeplift_shap"
    target = check_call(fn, model_fn, params, x, target, layer=layer)
    if not isinstance(baselines, Tensor):
        raise _checks.type_error(fn, f"baselines, a tensor of shape [N, {', '.join(map(str, x.shape[1:]))}]",
                                 _checks.describe(baselines))
    if (baselines.ndim != x.ndim or baselines.shape[0] < 1
            or not _inputs.broadcasts_to(baselines.shape[1:], x.shape[1:])):
        raise _checks.value_error(fn, f"baselines of shape [N, {', '.join(map(str, x.shape[1:]))}] with N >= 1",
                                  _checks.describe(baselines), "Stack the baselines along a new first dimension.")
    _checks.check_positive_int(fn, "batch_size", batch_size, allow_none=True)
    _check_eps(fn, eps)
    rules = _check_softmax(fn, softmax)
    bases = _inputs.check_baseline(fn, baselines, x[:1].expand(baselines.shape[0], *x.shape[1:]), name="baselines")
    count = bases.shape[0]
    if layer is not None:
        names, _ = resolve_layers(fn, model_fn, layer)
        if len(names) != 1 or isinstance(layer, (list, tuple, dict)):
            raise _checks.type_error(fn, "layer, one dotted name or module", _checks.describe(layer),
                                     "Call deeplift_shap once per layer.")
        wrt = _Wrt(fn, model_fn, params, layer=names[0])
        layer_total: Any = None
        for n in range(count):
            base = bases[n:n + 1].expand(x.shape).contiguous()
            try:
                part = _rescale_once(fn, model_fn, params, x, target, base, base, float(eps), rules, wrt)
            except _intercept.NoRule as err:
                raise _no_rule(fn, err) from None
            layer_total = part if layer_total is None else layer_total + part
        return layer_total / count
    step = count if batch_size is None else batch_size
    # vmap has no batching rule for the as_strided_ that pooling takes on channels_last tensors
    # (a slow per-example fallback): the baselines are batched in the ordinary layout.
    x, bases = x.contiguous(), bases.contiguous()

    def one(b: Tensor) -> Tensor:
        return _rescale(fn, model_fn, params, x, target, b, float(eps), rules)

    total: Any = None
    for start in range(0, count, step):
        part = torch.func.vmap(one)(bases[start:start + step]).sum(0)
        total = part if total is None else total + part
    return total / count


# --------------------------------------------------------------------------------------------
# Guided back-propagation.

class _GuidedReLU(torch.autograd.Function):
    """``relu(z)`` forward; backward ``max(g, 0) * (z > 0)``: only positive signals, only where ``z > 0``.

    A vector-Jacobian product is linear in the incoming gradient ``g`` for any function built from
    differentiable operations, and ``max(g, 0)`` is not, so this rule needs its own backward. The
    backward is itself written with differentiable operations on ``g`` and the saved ``z``, so an
    outer derivative of the guided map (w.r.t. ``params`` or ``x``) differentiates that formula:
    ``d/dg = (g > 0) * (z > 0)``, and 0 w.r.t. ``z`` (a step). Written with ``setup_context`` so
    that ``torch.func`` transforms run it; ``generate_vmap_rule`` batches it under ``vmap``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor) -> Tensor:
        return torch.relu(z)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Tensor) -> None:
        # The output relu(z) > 0 exactly where z > 0: keeping it rather than z lets z be freed after the
        # forward (the next layer keeps the output anyway), so memory is that of an in-place ReLU.
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        # max(g, 0) * (z > 0) in two kernels: ReLU's own backward (``threshold_backward``: g where
        # y > 0, else 0) of relu(g). Both are differentiable operations, any number of times.
        if torch.is_grad_enabled():  # an outer derivative follows: out-of-place, differentiable operations
            return torch.ops.aten.threshold_backward(torch.relu(grad), y, 0)
        return torch.ops.aten.threshold_backward(grad, y, 0).relu_()   # one fresh tensor, masked, then clamped in place

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(tangent, y, 0)


def _relu_rule(rule: Any) -> Callable[[_intercept.Call], Any]:
    """A handler: ReLU calls get ``rule`` (an autograd Function); every other intercepted operation runs unchanged."""
    def handler(call: _intercept.Call) -> Any:
        if call.name == "relu":
            return rule.apply(call.input)
        return _returned(call, call.apply(*call.inputs))
    return handler


_guided = _relu_rule(_GuidedReLU)


@_docs.fill
def guided_backprop(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None) -> Tensor:
    """Guided back-propagation: ``d score / d x`` with every ReLU passing back only positive gradients.

    The backward pass through each ReLU ``y = max(z, 0)`` becomes ``max(g, 0) * (z > 0)`` in place
    of ``g * (z > 0)``, ``g`` the gradient arriving at ``y``: a signal goes back only where the
    forward input was positive *and* the signal itself is positive. Every other operation keeps
    its gradient. With no ReLU on the path the map is the plain gradient (:func:`saliency`).

    ReLU is recognised as an operation for the length of one call (see :mod:`..core.intercept`):
    ``nn.ReLU`` modules (reused ones too, as torchvision's ``BasicBlock`` reuses ``self.relu``),
    ``nn.ReLU(inplace=True)`` (run out of place; the model must use the returned value),
    ``F.relu``, ``torch.relu`` and ``x.relu()``. Other rectifiers (ReLU6, LeakyReLU, Hardtanh) keep
    their ordinary gradients. captum's ``GuidedBackprop`` hooks ``nn.ReLU`` modules instead, so it
    misses functional ReLUs and cannot handle reused modules; where each ReLU is a module called
    once, the two agree.

    The map is differentiable w.r.t. ``params`` and ``x`` (``torch.func.grad``, ``vmap``, and
    ``torch.autograd.gradcheck`` in float64 away from ReLU kinks): the rule's backward is written
    with differentiable operations, and its outer derivative is that of the formula above
    (``max(g, 0)`` contributes ``g > 0``; the masks ``z > 0`` are steps); ``jacfwd`` agrees with
    ``jacrev``.

    Args:
      {model_fn}
      {params}
      {x.float}
      {target}

    Returns:
      ``[B, *input]`` guided gradients on ``x``'s device and dtype.

    Raises:
      TypeError: non-float ``x``, a non-callable ``model_fn``, a bad ``target`` type.
      ValueError: ``guided_backprop: expected target in [0, 10), got int 12.``; ``x`` of rank
        below 2; NaN in ``x``.

    Example:
      >>> fn, params = functionalize(resnet.eval())
      >>> guided_backprop(fn, params, images, labels).shape     # [8, 3, 224, 224] -> [8, 3, 224, 224]
      >>> torch.func.vmap(lambda p: guided_backprop(fn, p, images, labels))(stacked)   # [E, 8, 3, 224, 224]

    Cost: one forward and one backward to the input, as :func:`saliency`; the same memory.

    References:
      Springenberg, Dosovitskiy, Brox and Riedmiller, "Striving for Simplicity: The All
      Convolutional Net", ICLR 2015 workshop.
    """
    fn = "guided_backprop"
    target = check_call(fn, model_fn, params, x, target, layer_option=False)

    def total(xi: Tensor) -> Tensor:
        out, _ = _intercept.run(model_fn, _guided, params, xi)
        return _targets.resolve(out, target, fn=fn, output=_targets.selector(model_fn)).sum()
    return grad_of_sum(total, x)


# --------------------------------------------------------------------------------------------
# Deconvolution: the ReLU's backward rectifies the arriving signal and ignores the forward mask.

class _DeconvReLU(torch.autograd.Function):
    """``relu(z)`` forward; backward ``max(g, 0)``, whatever the sign of ``z`` (the deconvnet's rule).

    As :class:`_GuidedReLU`, the backward is written with differentiable operations on ``g`` (an outer
    derivative of the map sees ``d/dg = (g > 0)``, and nothing w.r.t. ``z``); ``jvp`` is the ReLU's own
    forward derivative; ``generate_vmap_rule`` batches it under ``vmap``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor) -> Tensor:
        return torch.relu(z)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Tensor) -> None:
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return torch.relu(grad)

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(tangent, y, 0)


_deconv = _relu_rule(_DeconvReLU)


@_docs.fill
def deconvolution(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None) -> Tensor:
    """Deconvolution (the deconvnet's backward): ``d score / d x`` with each ReLU passing back ``max(g, 0)``.

    The backward pass through each ReLU ``y = max(z, 0)`` becomes ``max(g, 0)``, ``g`` the gradient
    arriving at ``y``, in place of ``g * (z > 0)``: the signal is rectified as it goes back and the
    forward pass's mask is not used (guided back-propagation, :func:`guided_backprop`, applies both).
    Every other operation keeps its gradient. As captum's ``Deconvolution``, which hooks ``nn.ReLU``
    modules; here ReLU is recognised as an operation for the length of one call (modules, reused
    modules, in-place, ``F.relu``, ``torch.relu``, ``x.relu()``), so where each ReLU is a module called
    once the two agree.

    Args:
      {model_fn}
      {params}
      {x.float}
      {target}

    Returns:
      ``[B, *input]`` maps on ``x``'s device and dtype.

    Raises:
      TypeError: non-float ``x``, a non-callable ``model_fn``, a bad ``target`` type.
      ValueError: ``deconvolution: expected target in [0, 10), got int 12.``; ``x`` of rank below 2;
        NaN in ``x``.

    Example:
      >>> deconvolution(fn, params, images, labels).shape     # [8, 3, 224, 224]

    Cost: one forward and one backward to the input, as :func:`guided_backprop`.

    References:
      Zeiler and Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014.
    """
    fn = "deconvolution"
    check_call(fn, model_fn, params, x, target, layer_option=False)

    def total(xi: Tensor) -> Tensor:
        out, _ = _intercept.run(model_fn, _deconv, params, xi)
        return _targets.resolve(out, target, fn=fn, output=_targets.selector(model_fn)).sum()
    return grad_of_sum(total, x)
