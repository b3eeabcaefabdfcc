"""Layer-wise relevance propagation (LRP) with zennit's composites, as a pure function.

LRP (Bach et al., 2015) sends the target score back through the network layer by layer; each layer
splits the relevance arriving at its output among its inputs by a *rule*. For a layer
``z_j = sum_i a_i w_ij + b_j`` the rules are (``R_j`` the relevance at output ``j``, ``stab(t) = t +
eps * sign(t)`` with ``sign(0) = 1``, ``w+ = max(w, 0)``, ``a+ = max(a, 0)`` and so on):

* epsilon: ``R_i = a_i sum_j w_ij R_j / stab(z_j)`` (``epsilon=0``: LRP-0);
* z-plus (alpha1-beta0): ``R_i = sum_j (a+_i w+_ij + a-_i w-_ij) R_j / stab(z+_j)``, ``z+_j = sum_i
  (a+_i w+_ij + a-_i w-_ij) + b+_j``;
* alpha2-beta1: ``2 x`` the positive contributions' share minus ``1 x`` the negative ones';
* gamma: z-plus with weights ``w + gamma w+`` for outputs ``z_j > 0`` (``w + gamma w-`` for ``z_j < 0``);
* flat: every input of the receptive field gets an equal share (weights and inputs set to 1);
* w-square: shares ``w_ij^2 / sum_i w_ij^2``;
* z-box: the first layer, for inputs bounded by ``low <= x <= high``;
* pass: elementwise activations and batch norm pass relevance through unchanged;
* norm: average pooling and the residual sum split relevance in proportion to each input's
  contribution, ``R_i = a_i (d y / d a_i) R / stab(y)``.

The composites are zennit 0.5.1's (``zennit.composites``), with its layer assignment: activations
and batch norm ``pass``, average pooling and residual sums ``norm``; then

============================== ===================== ====================== ====================
composite                      first layer           other convolutions     linear layers
============================== ===================== ====================== ====================
``"epsilon_plus"``             z-plus                z-plus                 epsilon
``"epsilon_plus_flat"``        flat (conv or linear) z-plus                 epsilon
``"epsilon_gamma_box"``        z-box (convolution)   gamma                  epsilon
``"epsilon_alpha2_beta1"``     alpha2-beta1          alpha2-beta1           epsilon
``"epsilon_alpha2_beta1_flat"`` flat (conv or linear) alpha2-beta1          epsilon
============================== ===================== ====================== ====================

"First layer" is zennit's: the first module in ``named_modules()`` order of the given kind. Max
pooling, flattening, dropout and other shape operations move relevance as their gradients do.
Canonizers (``canonize=True``) are zennit's ``SequentialMergeBatchNorm`` (a batch norm that follows a
convolution or linear module in the order of ``module.modules()``'s leaves is merged into it: the
rule sees ``w * gamma / sqrt(var + eps)`` and the merged bias) and ``ResNetCanonizer`` (the residual
sum of a block gets the ``norm`` rule, here for every sum or difference of two input-dependent
tensors). The merge is a computation on ``params``: the user's module and tensors are never changed.

How it is computed (no hook, no module change; one call of :func:`torchex_fn.core.intercept.run` per pass):

1. **Record pass**, ordinary differentiable code: the model runs with every convolution, linear
   layer, batch norm, activation, pooling and residual sum handed to this module as an *operation*
   (also functional ``F.relu``, reused modules and in-place spellings). Each layer computes its
   normal output and what its rule needs (the stabilised denominators of the modified forward
   passes, e.g. ``z+ = conv(a, w+) + b+``).
2. **Relevance pass** inside one ``torch.func.vjp`` w.r.t. ``x``: the model runs again; each layer
   returns its recorded output through a function whose backward is its rule, written with
   differentiable operations (a transposed convolution of ``R / stab(z+)``, times ``a``). The
   cotangent at the output is ``score * d score / d out`` (for a class index, one-hot times the
   logit: the relevance entering the network is the target score, captum's convention).

Everything the relevance depends on comes from pass 1 as ordinary functions of ``params`` and ``x``,
so the map is differentiable: ``torch.func.grad`` of a loss on it w.r.t. ``params`` is its true
derivative (captum's LRP is not differentiable, captum issue #652). Pass 2 does no convolution
forward (its layers return recorded values), so the cost is one forward with the rules'
denominators and one backward with the rules' transposed products. Where an input of z-plus,
alpha-beta or gamma is known to be non-negative (a ReLU's or max pool's output) its negative part
is zero and is skipped, which changes no value and halves these rules' work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import checks as _checks, inputs as _inputs, intercept as _intercept
from ..core import docs as _docs
from ..core import relevance as _relevance, targets as _targets
from ..core.autodiff import grad_of_sum, leaves, tracked
from ..core.env import compiling
from ..core.capture import intermediates, layer_shapes, resolve_layers
from ..core.types import ModelFn, Params, Target, lock_of, module_of
from ..core.arguments import check_call

__all__ = ["lrp", "COMPOSITES", "RULES", "TRANSFORMER_COMPOSITES"]

FN = "lrp"

RULES = ("epsilon", "zero", "zplus", "alpha1_beta0", "alpha2_beta1", "gamma", "flat", "wsquare", "zbox")
"""Rule names accepted in ``rules=`` for convolution and linear layers."""

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LINEAR = (nn.Linear,)
_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# composite -> (first-layer module types, first-layer rule, convolution rule, linear rule)
_ANY_LINEAR = _CONV + _CONV_T + _LINEAR
COMPOSITES: Dict[str, Tuple[tuple, Optional[str], str, str]] = {
    "epsilon_plus": ((), None, "zplus", "epsilon"),
    "epsilon_plus_flat": (_ANY_LINEAR, "flat", "zplus", "epsilon"),
    "epsilon_gamma_box": (_CONV + _CONV_T, "zbox", "gamma", "epsilon"),
    "epsilon_alpha2_beta1": ((), None, "alpha2_beta1", "epsilon"),
    "epsilon_alpha2_beta1_flat": (_ANY_LINEAR, "flat", "alpha2_beta1", "epsilon"),
}
"""zennit 0.5.1's LRP composites: (first-layer types, first-layer rule, convolution rule, linear rule)."""

# Elementwise activations that pass relevance through (zennit's ``Activation`` types, as operations).
_PASS = frozenset(("relu", "leaky_relu", "elu", "selu", "celu", "sigmoid", "tanh", "softplus", "gelu", "silu",
                   "mish", "hardswish", "hardsigmoid", "logsigmoid", "hardtanh", "relu6", "softshrink",
                   "hardshrink", "tanhshrink", "softsign", "threshold", "prelu", "rrelu", "log_sigmoid"))
_NONNEGATIVE = frozenset(("relu", "relu6", "sigmoid", "softplus", "hardsigmoid"))
_POOLS = frozenset(("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                    "adaptive_avg_pool3d", "mean", "sum"))
_HANDED = tuple(name for name in _intercept.LINEAR)
_USES_OUTPUT = frozenset(("epsilon", "zero", "gamma", "zbox"))  # rules that need the layer's own output

# Leaf modules that need no rule of their own (their operations are handled one by one).
_PLAIN_LEAVES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU,
                 nn.ELU, nn.SELU, nn.CELU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.GELU, nn.SiLU, nn.Mish,
                 nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Hardtanh, nn.Softshrink, nn.Hardshrink,
                 nn.Tanhshrink, nn.Softsign, nn.Threshold, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
                 nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d) + _BATCH_NORM


# --------------------------------------------------------------------------------------------
# Validation and the plan (which module gets which rule, which batch norms merge).

def _check_float(name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _checks.type_error(FN, f"{name}, a float >= 0", _checks.describe(value))
    if not value >= 0 or math.isinf(value) or (positive and value == 0):
        raise _checks.value_error(FN, f"{name}, a finite float {'> 0' if positive else '>= 0'}",
                                  _checks.describe(value))
    return float(value)


def _check_bound(name: str, value: Any, x: Tensor) -> Optional[Tensor]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise _checks.type_error(FN, f"{name}, a float or a tensor broadcastable to x {list(x.shape)}",
                                 _checks.describe(value))
    if not isinstance(value, Tensor):
        return torch.tensor(float(value), dtype=x.dtype, device=x.device)
    if not value.is_floating_point():
        raise _checks.type_error(FN, f"{name} of a floating-point dtype", _checks.describe(value))
    try:
        ok = tuple(torch.broadcast_shapes(tuple(value.shape), tuple(x.shape))) == tuple(x.shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise _checks.value_error(FN, f"{name} broadcastable to x's shape {list(x.shape)}", _checks.describe(value),
                                  "Pass a float, per-channel bounds of shape [1, C, 1, 1], or one bound per pixel.")
    return value.to(x.dtype)


class _Plan:
    """Rules per module name, batch-norm merges, and the module owning each parameter tensor."""

    def __init__(self, module: nn.Module, composite: str, rules: Optional[Mapping], canonize: bool):
        first_types, first_rule, conv_rule, linear_rule = COMPOSITES[composite]
        self.rules: Dict[str, str] = {}
        self.modules: Dict[str, nn.Module] = {}
        first_done = not first_types
        user = dict(rules or {})
        missing: List[str] = []
        like: List[str] = []
        for name, mod in module.named_modules():
            self.modules[name] = mod
            rule = user.get(name)
            if rule is None:
                rule = next((r for key, r in user.items() if isinstance(key, type) and isinstance(mod, key)), None)
            if not first_done and isinstance(mod, first_types):
                first_done = True
                rule = first_rule if rule is None else rule
            if rule is None and isinstance(mod, _CONV + _CONV_T):
                rule = conv_rule
            elif rule is None and isinstance(mod, _LINEAR):
                rule = linear_rule
            if rule is not None and not _linear_like(mod):
                raise _checks.value_error(
                    FN, "rules for convolutions and linear layers (modules that own a weight of 2 or more axes), "
                    "whose rules the zennit composites know", f"rule {rule!r} for module {name or '<root>'!r} "
                    f"({type(mod).__name__})", "Layer norms, attention and the other modules of transformers have "
                    "rules in composite='attnlrp' and 'cp_lrp': lrp(..., composite='attnlrp').")
            if rule is not None:
                self.rules[name] = rule
            if isinstance(mod, _CONV_T):
                missing.append(f"{name or '<root>'} ({type(mod).__name__}: transposed convolutions have no rule here)")
            elif (rule is None and not any(True for _ in mod.children()) and not isinstance(mod, _PLAIN_LEAVES)
                  and any(True for _ in mod.parameters(recurse=False))):
                missing.append(f"{name or '<root>'} ({type(mod).__name__})")
                if _linear_like(mod):
                    like.append(name)
        if missing:
            hint = ("Layer norms, attention and the other modules of transformers: use composite='attnlrp' or "
                    "'cp_lrp', which run on every architecture.")
            if like:  # only where a rule works: a module that owns a matrix (or kernel) like a linear layer
                hint += (f" A linear-like module calling F.linear or a convolution: give it a rule with "
                         f"`rules={{{like[0]!r}: 'epsilon'}}`.")
            raise NotImplementedError(_checks.message(
                FN, "modules that LRP has rules for (convolutions, linear layers, batch norm, activations, pooling)",
                f"{len(missing)} without a rule: {', '.join(missing[:6])}" + (", ..." if len(missing) > 6 else ""),
                hint))
        # zennit's SequentialMergeBatchNorm: a batch norm right after a linear module among the leaves.
        self.merges: Dict[str, str] = {}
        if canonize:
            leaves = [(n, m) for n, m in module.named_modules() if not any(True for _ in m.children())]
            for (prev_name, prev), (name, leaf) in zip(leaves, leaves[1:]):
                if isinstance(prev, _CONV + _LINEAR) and isinstance(leaf, _BATCH_NORM) and leaf.track_running_stats:
                    self.merges[prev_name] = name
        self.canonize = canonize

    def owners(self, params: Mapping[str, Tensor]) -> Dict[int, str]:
        """``id(tensor) -> module name`` for the tensors of this call's ``params``."""
        return {id(t): name.rpartition(".")[0] for name, t in params.items() if isinstance(t, Tensor)}


# --------------------------------------------------------------------------------------------
# Geometry of a convolution or linear call: its forward with other weights, and its transpose.

def _tuple(value: Any, n: int) -> Tuple[int, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


class _Geometry:
    """A linear layer's call: ``forward(a, w, b)`` with other weights, ``transpose(g, w)`` to its input."""

    def __init__(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any], in_shape: Sequence[int]):
        self.name = name
        self.in_shape = tuple(in_shape)
        if name == "linear":
            return
        n = int(name[-2])
        self.n = n
        bound = _bind_conv(*args, **kwargs)
        weight = bound["weight"]
        self.kernel = tuple(weight.shape[2:])
        self.stride = _tuple(bound["stride"], n)
        self.dilation = _tuple(bound["dilation"], n)
        self.groups = bound["groups"]
        padding = bound["padding"]
        self.padding_arg = padding
        if isinstance(padding, str):
            if padding == "valid":
                left = right = (0,) * n
            else:  # "same" (stride 1): torch pads total = d (k - 1), the left half rounded down
                total = tuple(d * (k - 1) for d, k in zip(self.dilation, self.kernel))
                left = tuple(t // 2 for t in total)
                right = tuple(t - lo for t, lo in zip(total, left))
        else:
            left = right = _tuple(padding, n)
        self.left, self.right = left, right

    def forward(self, a: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        if self.name == "linear":
            return F.linear(a, w, b)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.n - 1]
        return conv(a, w, b, self.stride, self.padding_arg, self.dilation, self.groups)

    def transpose(self, g: Tensor, w: Tensor) -> Tensor:
        """``J^T g``: the gradient of ``forward(a, w, 0)`` w.r.t. ``a`` (the shape of the input)."""
        if self.name == "linear":
            return g @ w
        conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.n - 1]
        size = self.in_shape[-self.n:]
        out = g.shape[-self.n:]
        if self.left == self.right:
            natural = tuple((o - 1) * s - 2 * p + d * (k - 1) + 1 for o, s, p, d, k in
                            zip(out, self.stride, self.left, self.dilation, self.kernel))
            extra = tuple(i - m for i, m in zip(size, natural))
            return conv_t(g, w, None, self.stride, self.left, extra, self.groups, self.dilation)
        full = conv_t(g, w, None, self.stride, 0, 0, self.groups, self.dilation)
        pads: List[int] = []
        for dim in reversed(range(self.n)):  # crop the left padding, crop or zero-fill to the input's size
            length = full.shape[full.ndim - self.n + dim]
            pads += [-self.left[dim], size[dim] + self.left[dim] - length]
        return F.pad(full, pads)

    def transpose_ones(self, g: Tensor, w_shape: Sequence[int]) -> Tensor:
        """``J^T g`` for weights of ones (the flat rule): a sum over output channels, then a box filter."""
        if self.name == "linear":
            return g.sum(-1, keepdim=True).expand(*g.shape[:-1], w_shape[-1])
        if self.groups != 1:
            return self.transpose(g, torch.ones(w_shape, dtype=g.dtype, device=g.device))
        ones = torch.ones((1, 1) + tuple(w_shape[2:]), dtype=g.dtype, device=g.device)
        summed = self.transpose(g.sum(1, keepdim=True), ones)
        return summed.expand(*summed.shape[:1], w_shape[1], *summed.shape[2:])

    def forward_ones(self, a: Tensor, w_shape: Sequence[int]) -> Tensor:
        """``forward(1, 1, 0)``: the number of inputs in each output's receptive field, one example ``[1, ...]``."""
        if self.name == "linear":
            return torch.full((1,) * (a.ndim - 1) + (w_shape[0],), float(w_shape[1]), dtype=a.dtype, device=a.device)
        ones = torch.ones((1, self.groups) + tuple(a.shape[2:]), dtype=a.dtype, device=a.device)
        box = torch.ones((self.groups, 1) + tuple(w_shape[2:]), dtype=a.dtype, device=a.device)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.n - 1]
        count = conv(ones, box, None, self.stride, self.padding_arg, self.dilation, self.groups)
        per_group = w_shape[0] // self.groups
        return (count * w_shape[1]).repeat_interleave(per_group, dim=1)


def _bind_conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return {"input": input, "weight": weight, "bias": bias, "stride": stride, "padding": padding,
            "dilation": dilation, "groups": groups}


def _bind_linear(input, weight, bias=None):
    return {"input": input, "weight": weight, "bias": bias}


def _bind_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                     eps=1e-5):
    return {"input": input, "running_mean": running_mean, "running_var": running_var, "weight": weight,
            "bias": bias, "training": training, "eps": eps}


# --------------------------------------------------------------------------------------------
# The rules: what a layer records, and the backward of the relevance pass.

def _stab(t: Tensor, eps: float) -> Tensor:
    """``t + eps * sign(t)`` with ``sign(0) = 1`` (zennit's stabiliser)."""
    return torch.where(t >= 0, t + eps, t - eps)


class _Terms:
    """``R_in = sum_k coef_k * inp_k * J(w_k)^T (R * s_k)`` (``inp_k = None``: no product; ``w_k = None``: ones).

    Built in the record pass; the tensors travel through :class:`_Propagate`'s inputs, this object
    holds only their layout and the layer's geometry.
    """

    def __init__(self, geometry: _Geometry):
        self.geometry = geometry
        self.layout: List[Tuple[float, bool, bool, Optional[Tuple[int, ...]]]] = []
        self.tensors: List[Tensor] = []

    def add(self, coef: float, inp: Optional[Tensor], w: Optional[Tensor], s: Tensor,
            w_shape: Optional[Sequence[int]] = None) -> None:
        self.layout.append((coef, inp is not None, w is not None, tuple(w_shape) if w_shape is not None else None))
        self.tensors += [t for t in (inp, w) if t is not None] + [s]

    def relevance(self, g: Tensor, tensors: Sequence[Tensor], gradient: bool = False) -> Tensor:
        """``R_in`` from ``R = g``; with ``gradient``, ``R_in / a``: each term's input factor (``a``, ``a+`` or
        ``a-``) replaced by where it is non-zero (the rule in input x gradient form; inputs other than
        ``a`` and its parts have no such form)."""
        total: Optional[Tensor] = None
        it = iter(tensors)
        for coef, has_inp, has_w, w_shape in self.layout:
            inp = next(it) if has_inp else None
            w = next(it) if has_w else None
            s = next(it)
            gs = g * s
            back = (self.geometry.transpose(gs, w) if w is not None
                    else self.geometry.transpose_ones(gs, w_shape))  # type: ignore[arg-type]  # set without w
            term = back if inp is None else ((inp != 0).to(back.dtype) if gradient else inp) * back
            term = term if coef == 1 else coef * term
            total = term if total is None else total + term
        assert total is not None  # every layer adds at least one term
        return total


class _Identity:
    """The pass rule: relevance goes through unchanged."""

    tensors: List[Tensor] = []

    @staticmethod
    def relevance(g: Tensor, tensors: Sequence[Tensor]) -> Tensor:
        return g


class _Propagate(torch.autograd.Function):
    """Returns a layer's recorded output; its backward maps the relevance at the output to the input by a rule.

    The backward is written with differentiable operations on the recorded tensors (inputs of this
    function), so outer derivatives of the relevance map (w.r.t. ``params`` or ``x``) differentiate
    the rule's formula. The output's value never reaches the relevance map (later layers return
    their own recorded outputs), so the backward gives no gradient to the recorded output itself.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(v: Tensor, y: Tensor, rule: Any, *tensors: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Tensor) -> None:
        ctx.rule = inputs[2]
        ctx.save_for_backward(*inputs[3:])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Any:
        tensors = ctx.saved_tensors
        return (ctx.rule.relevance(g, tensors), None, None) + (None,) * len(tensors)


class _Options:
    def __init__(self, epsilon: float, gamma: float, stabilizer: float, low: Optional[Tensor],
                 high: Optional[Tensor]):
        self.epsilon, self.gamma, self.stabilizer, self.low, self.high = epsilon, gamma, stabilizer, low, high


def _layer_terms(rule: str, geometry: _Geometry, a: Tensor, w: Tensor, b: Optional[Tensor], z: Tensor,
                 nonneg: bool, opt: _Options) -> _Terms:
    """The rule ``rule`` of a layer ``z = forward(a, w, b)`` (``w``, ``b`` merged with a batch norm if any)."""
    terms = _Terms(geometry)
    fwd: Any = geometry.forward  # called with the optional halves of a and w the rules build
    eps = opt.stabilizer

    def pos(t: Any) -> Any:
        return None if t is None else t.clamp(min=0)

    def neg(t: Any) -> Any:
        return None if t is None else t.clamp(max=0)

    if rule in ("epsilon", "zero"):
        terms.add(1.0, a, w, torch.reciprocal(_stab(z, opt.epsilon if rule == "epsilon" else 0.0)))
    elif rule in ("zplus", "alpha1_beta0", "alpha2_beta1"):
        alpha, beta = (2.0, 1.0) if rule == "alpha2_beta1" else (1.0, 0.0)
        wp, wn = pos(w), (neg(w) if beta or not nonneg else None)  # w- is unused by z-plus on inputs >= 0
        ap, an = (a, None) if nonneg else (pos(a), neg(a))
        zp = fwd(ap, wp, pos(b)) if nonneg else fwd(ap, wp, pos(b)) + fwd(an, wn, None)
        sp = torch.reciprocal(_stab(zp, eps))
        terms.add(alpha, ap, wp, sp)
        if not nonneg:
            terms.add(alpha, an, wn, sp)
        if beta:
            zn = fwd(ap, wn, neg(b)) if nonneg else fwd(ap, wn, neg(b)) + fwd(an, wp, None)
            sn = torch.reciprocal(_stab(zn, eps))
            terms.add(-beta, ap, wn, sn)
            if not nonneg:
                terms.add(-beta, an, wp, sn)
    elif rule == "gamma":
        g = opt.gamma
        w_up, w_dn = w + g * pos(w), w + g * neg(w)
        b_up = None if b is None else b + g * pos(b)
        b_dn = None if b is None else b + g * neg(b)
        ap, an = (a, None) if nonneg else (pos(a), neg(a))
        z_up = fwd(ap, w_up, b_up) if nonneg else fwd(ap, w_up, b_up) + fwd(an, w_dn, None)
        z_dn = fwd(ap, w_dn, b_dn) if nonneg else fwd(ap, w_dn, b_dn) + fwd(an, w_up, None)
        s_up = (z > 0).to(z.dtype) / _stab(z_up, eps)
        s_dn = (z < 0).to(z.dtype) / _stab(z_dn, eps)
        terms.add(1.0, ap, w_up, s_up)
        terms.add(1.0, ap, w_dn, s_dn)
        if not nonneg:
            terms.add(1.0, an, w_dn, s_up)
            terms.add(1.0, an, w_up, s_dn)
    elif rule == "zbox":
        bounds: Any = (opt.low, opt.high)  # set for z-box by lrp()
        low = bounds[0].expand(a.shape) if bounds[0].shape != a.shape else bounds[0]
        high = bounds[1].expand(a.shape) if bounds[1].shape != a.shape else bounds[1]
        wp, wn = pos(w), neg(w)
        s = torch.reciprocal(_stab(z - fwd(low, wp, pos(b)) - fwd(high, wn, neg(b)), eps))
        terms.add(1.0, a, w, s)
        terms.add(-1.0, low, wp, s)
        terms.add(-1.0, high, wn, s)
    elif rule == "flat":
        terms.add(1.0, None, None, torch.reciprocal(_stab(geometry.forward_ones(a, w.shape), eps)), w.shape)
    elif rule == "wsquare":
        w2 = w * w
        terms.add(1.0, None, w2, torch.reciprocal(_stab(fwd(torch.ones_like(a), w2, None if b is None else b * b),
                                                        eps)))
    else:  # pragma: no cover - rules are checked at the boundary
        raise AssertionError(rule)
    return terms


# --------------------------------------------------------------------------------------------
# The two passes.

class _Record:
    """What the record pass keeps of one call: its name, output and (for a rule) what the backward needs."""

    __slots__ = ("name", "out", "rule", "norm")

    def __init__(self, name: str, out: Any, rule: Any = None, norm: Any = None):
        self.name, self.out, self.rule, self.norm = name, out, rule, norm


def _linear_like(mod: nn.Module) -> bool:
    """Whether a zennit rule can apply to ``mod``: a convolution or linear layer, a container (the rule goes to
    its leaves), or a leaf that owns a weight of 2 or more axes (a linear layer of its own kind)."""
    if isinstance(mod, _CONV + _LINEAR) or any(True for _ in mod.children()):
        return True
    if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):  # a look-up, not a product with the input
        return False
    return any(p.ndim >= 2 for p in mod.parameters(recurse=False))


def _where(module: nn.Module, model_fn: Any, rerun: Any) -> str:
    """The module that was running when ``rerun()`` raised :class:`NoRule`: ``"name (Type)"``, ``"-"`` outside
    every module, ``""`` when the run did not raise it again.

    A diagnostic run after the error: forward pre-hooks and hooks on every submodule keep a stack of the
    modules entered, for the length of this one call (removed before it returns, also when it raises).
    """
    stack: List[str] = []
    names = {id(m): n for n, m in module.named_modules() if n}

    def enter(mod: nn.Module, args: Any) -> None:
        stack.append(f"{names[id(mod)]} ({type(mod).__name__})")

    def leave(mod: nn.Module, args: Any, out: Any) -> None:
        if stack:
            stack.pop()

    handles = []
    with lock_of(model_fn) or contextlib.nullcontext():
        try:
            for name, mod in module.named_modules():
                if name:
                    handles += [mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave)]
            try:
                rerun()
            except (_intercept.NoRule, _NoRuleError):
                return stack[-1] if stack else "-"  # outside every module of the model
            except Exception:  # a diagnostic only: the first error is the one reported
                return ""
        finally:
            for handle in handles:
                handle.remove()
    return ""


class _NoRuleError(NotImplementedError):
    """lrp's error for an operation without a rule; keeps what it says, so that the module can be added."""

    def __init__(self, message: str, what: str, detail: str, transformer: bool):
        super().__init__(message)
        self.what, self.detail, self.transformer = what, detail, transformer


def _in_module(err: Exception, transformer: bool, where: str) -> NotImplementedError:
    """``err`` (an operation without a rule) again, naming the module it ran in."""
    if isinstance(err, _NoRuleError):
        return _no_rule(err.what, err.detail, err.transformer, where)
    return _no_rule(getattr(err, "op", "?"), getattr(err, "detail", ""), transformer, where)


def _no_rule(what: str, detail: str = "", transformer: bool = False, where: str = "") -> NotImplementedError:
    hint = ("LRP never treats an operation without a rule as if it had one; explain a model built from these "
            "operations, or attribute with a gradient method (saliency, integrated_gradients, deeplift).")
    if not transformer:
        hint = ("Layer norms, softmax, attention and products of two input-dependent tensors (transformers) have "
                "rules in composite='attnlrp' and 'cp_lrp'. " + hint)
    return _NoRuleError(_checks.message(
        FN, "operations with an LRP rule (convolution, linear, batch norm, activations, pooling, residual sums)",
        f"'{what}'" + (f" ({detail})" if detail else "") + " on an input-dependent tensor"
        + ("" if not where else " outside every module of the model" if where == "-" else f" in module {where}"),
        hint), what, detail, transformer)


class _Recorder:
    """The record pass's handler: computes each layer's output and the tensors of its rule."""

    def __init__(self, plan: _Plan, params: Mapping[str, Tensor], opt: _Options):
        self.plan, self.params, self.opt = plan, params, opt
        self.owners = plan.owners(params)
        self.records: List[_Record] = []
        self.nonneg: Dict[int, Tensor] = {}  # id -> tensor (kept alive, so that ids stay unique)

    def _is_nonneg(self, t: Tensor) -> bool:
        return self.nonneg.get(id(t)) is t

    def _mark(self, t: Tensor) -> None:
        self.nonneg[id(t)] = t

    def __call__(self, call: _intercept.Call) -> Any:
        record, value = self._record(call)
        self.records.append(record)
        return value

    def _record(self, call: _intercept.Call) -> Tuple[_Record, Any]:
        name = call.name
        if call.kind == "elementwise":
            if name not in _PASS:
                raise _no_rule(name, "an elementwise operation that is not an activation")
            y = call.apply(call.input)
            if name in _NONNEGATIVE:
                self._mark(y)
            return _Record(name, y, _Identity), y
        if call.kind == "maxpool":
            out = call.apply(call.input)
            if self._is_nonneg(call.input):
                self._mark(out[0])
            return _Record(name, None), (out if call.options["return_indices"] else out[0])
        if call.kind != "linear":
            raise _no_rule(name)
        if name in ("conv1d", "conv2d", "conv3d", "linear"):
            return self._layer(call)
        if name.startswith("conv_transpose"):
            raise _no_rule(name, "transposed convolutions have no rule here")
        if name == "batch_norm":
            bound = _bind_batch_norm(*call.options["args"], **call.options["kwargs"])
            if call.options["positions"] not in ((0,), ("input",)):
                raise _no_rule(name, "batch norm whose statistics or affine parameters depend on the input")
            if bound["training"] or bound["running_mean"] is None:
                raise _no_rule(name, "batch norm with batch statistics (training mode); put the model in eval mode")
            y = call.apply(call.input)
            return _Record(name, y, _Identity), y
        if name in ("add", "sub"):
            y = call.apply(*call.inputs)
            if len(call.inputs) < 2 or not self.plan.canonize:
                return _Record(name, None), y  # a bias or a constant: moves relevance as its gradient does
            if name == "add" and all(self._is_nonneg(t) for t in call.inputs):
                self._mark(y)
            return _Record(name, y, norm=self._norm(call, y)), y
        if name in _POOLS:
            y = call.apply(*call.inputs)
            if all(self._is_nonneg(t) for t in call.inputs):
                self._mark(y)
            return _Record(name, y, norm=self._norm(call, y)), y
        raise _no_rule(name)

    def _norm(self, call: _intercept.Call, y: Tensor):
        """The norm rule's record: the inputs and ``1 / stab(y)``."""
        return call.inputs, torch.reciprocal(_stab(y, self.opt.stabilizer))

    def _layer(self, call: _intercept.Call) -> Tuple[_Record, Tensor]:
        name = call.name
        binder = _bind_linear if name == "linear" else _bind_conv
        bound = binder(*call.options["args"], **call.options["kwargs"])
        if call.options["positions"] not in ((0,), ("input",)):
            raise _no_rule(name, "a weight or bias that depends on the input")
        w, b, a = bound["weight"], bound["bias"], call.input
        owner = self.owners.get(id(w))
        if owner is None or owner not in self.plan.rules:
            raise _no_rule(name, "its weight is not the parameter of a module with a rule (rules are assigned to "
                           "modules, as zennit does); pass `params` from functionalize")
        rule = self.plan.rules[owner]
        y = call.apply(a)
        z = y
        merged = self.plan.merges.get(owner)
        if merged is not None:
            w, b, z = self._merge(merged, w, b, y, name, rule in _USES_OUTPUT)
        geometry = _Geometry(name, call.options["args"], call.options["kwargs"], a.shape)
        terms = _layer_terms(rule, geometry, a, w, b, z, self._is_nonneg(a), self.opt)
        return _Record(name, y, terms), y

    def _merge(self, bn: str, w: Tensor, b: Optional[Tensor], y: Tensor, name: str, output: bool):
        """zennit's batch-norm merge, on this call's tensors: weights, bias and the merged output."""
        p = self.params
        module = self.plan.modules[bn]
        mean, var = p[f"{bn}.running_mean"], p[f"{bn}.running_var"]
        gamma, beta = p.get(f"{bn}.weight"), p.get(f"{bn}.bias")
        scale = torch.rsqrt(var + float(module.eps))  # type: ignore[arg-type]  # a BatchNorm's float eps
        scale = scale if gamma is None else gamma * scale
        shift = -mean * scale if beta is None else beta - mean * scale
        shape = (-1,) + (1,) * (w.ndim - 1)
        w_merged = w * scale.reshape(shape)
        b_merged = shift if b is None else b * scale + shift
        if not output:
            return w_merged, b_merged, y  # the rule does not use the merged layer's output
        out_shape = (-1,) if name == "linear" else (-1,) + (1,) * (y.ndim - 2)
        return w_merged, b_merged, y * scale.reshape(out_shape) + shift.reshape(out_shape)


def _check_layer_options(model_fn: ModelFn, params: Params, x: Tensor, layer: Any, condition: Any
                         ) -> Tuple[Optional[str], Optional[List[List[int]]], bool]:
    """``layer=`` / ``condition=``: (the layer to read at or None, the concept groups or None, one concept)."""
    if layer is not None and condition is not None:
        raise _checks.value_error(FN, "layer= or condition=, not both", "both",
                                  "condition= gives input heatmaps of concepts; layer= the relevance at a layer.")
    if layer is None and condition is None:
        return None, None, False
    groups: Optional[List[List[int]]] = None
    single = False
    if condition is not None:
        name, groups, single = _relevance.check_condition(FN, model_fn, condition)
    else:
        name = _relevance.check_layer(FN, model_fn, layer)
    shape, dtype = layer_shapes(model_fn, params, x, (name,), FN)[name]
    if groups is not None:
        _relevance.channel_masks(FN, groups, torch.empty((0,) + tuple(shape[1:]), dtype=dtype))
    return name, groups, single


def _at_layer(model_fn: ModelFn, x: Tensor, name: str, value: Tensor, total: Any,
              groups: Optional[List[List[int]]], single: bool) -> Tensor:
    """The relevance pass ``total`` read at layer ``name`` (``layer=``) or conditioned there (``condition=``)."""
    if groups is None:
        return _relevance.layer_relevance(FN, model_fn, x, name, value, total)
    masks = _relevance.channel_masks(FN, groups, value)
    heatmaps = _relevance.conditional_relevance(FN, model_fn, x, name, value, total, masks)
    return heatmaps[:, 0] if single else heatmaps


def _relevance_handler(records: List[_Record]):
    """The relevance pass's handler: the k-th call returns the k-th record's output, with its rule as backward."""

    def handler(call: _intercept.Call) -> Any:
        k = call.index
        record = records[k] if k < len(records) else None
        if record is None or record.name != call.name:
            raise RuntimeError(_checks.message(FN, "the relevance pass to repeat the record pass's operations",
                                               f"'{call.name}' at call {k}",
                                               "The model must not branch on its input's values."))
        if record.rule is not None:
            rule = record.rule
            return _Propagate.apply(call.input, record.out, rule, *rule.tensors)
        if record.norm is not None:
            inputs, s = record.norm
            # value y + f(a * (v - a)) * s = y; derivative a * f^T(R * s) per input (f linear, no constant)
            zero = call.apply(*(a * (v - a) for a, v in zip(inputs, call.inputs)))
            return record.out + zero * s
        out = call.apply(*call.inputs)
        if call.kind == "maxpool" and not call.options["return_indices"]:
            return out[0]
        return out

    return handler


def _as_pytree(out: Any, choice: Any) -> Tuple[Any, Any]:
    """A dataclass output as the dict of its tensor fields (``torch.func`` takes pytrees only), and
    ``choice`` applied to the dataclass rebuilt from such a dict; anything else as it is."""
    if not _inputs.is_dataclass_instance(out):
        return out, choice
    fields = _inputs.tensors_only(out)
    return fields, lambda leaves: choice(dataclasses.replace(out, **leaves))


def _leaves_dot(out: Any, cot: Any) -> Any:
    if isinstance(out, Tensor):
        return (out * cot).sum()
    if isinstance(out, Mapping):
        return sum(_leaves_dot(out[k], cot[k]) for k in cot)
    if isinstance(out, (tuple, list)):
        return sum(_leaves_dot(o, c) for o, c in zip(out, cot))
    raise TypeError(type(out).__name__)


@_docs.fill
def lrp(model_fn: ModelFn, params: Params, x: Any, target: Target = None, *, layer: Any = None,
        composite: str = "epsilon_plus_flat", epsilon: Optional[float] = None, gamma: float = 0.25,
        stabilizer: float = 1e-6,
        low: Any = None, high: Any = None, canonize: bool = True,
        rules: Optional[Mapping[Any, str]] = None, condition: Optional[Mapping[Any, Any]] = None) -> Tensor:
    """Layer-wise relevance propagation: zennit's composites for CNNs, AttnLRP and CP-LRP for transformers.

    The relevance entering the network is the target score (captum's convention): for a class
    index ``c`` the output relevance is ``one_hot(c) * out_c``, for a callable target ``s`` it is
    ``s * d s / d out``. Each layer passes it to its input by its rule (module docstring: the rules,
    the composites and their layer assignment, the canonizers). Where the rules conserve (epsilon
    -> 0 without biases, z-plus on non-negative inputs without biases), the map sums to the target
    score per example.

    ``composite="attnlrp"`` (Achtibat et al., ICML 2024) and ``"cp_lrp"`` (Ali et al., ICML 2022) run on
    every architecture, transformers and language models included, as input x modified gradient (LXT's
    formulation; equal to LXT 2.1 without patching any class): elementwise non-linearities and
    activation modules get the identity rule; products of two input-dependent tensors (``QK^T``,
    ``AV``, gated MLPs) the uniform rule (half the relevance to each); softmax its gradient (AttnLRP's
    softmax rule, which absorbs relevance like a bias and does not conserve); layer and RMS norms their
    scale held constant; convolution and linear layers the epsilon rule (default ``epsilon=0``, LXT's);
    residual sums, embeddings and shape operations pass relevance in proportion. ``"cp_lrp"`` also
    holds the attention probabilities and the gates of gated units constant, and conserves: with every
    additive constant zero (biases, position embeddings) the map sums to the target logit. The
    relevance entering the network is ``out * d score / d out`` (the logit for a class index). Fused
    attention (SDPA, ``nn.MultiheadAttention``) is decomposed, grouped-query attention included. For
    token ids pass ``layer=`` the embedding layer: ``lrp(fn, params, {{"input_ids": ids}}, target,
    composite="attnlrp", layer="model.embed_tokens")`` gives ``[B, T, D]``; ``tx.text.token_scores`` sums it
    per token. Cost: one forward and one backward (a second forward when ``params`` or ``x`` carry
    derivatives, so that the map's derivative is exact).

    Args:
      model_fn: From ``functionalize(model)``: rules are assigned to its modules by type and name,
        as zennit does. The model must be in eval mode (batch norm with running statistics). A function
        of yours that calls one model is accepted: ``lambda p, x: model_fn(p, (x - mean) / std)`` (a
        closure, a global it names, a ``functools.partial``) or a ``torch.func.functional_call(model,
        p, x)`` closure; the rules apply to that model's modules and what runs outside it passes the
        gradient (the same map as the normalisation inside an ``nn.Sequential``). The transformer
        composites need the model run through ``functionalize`` when it has HuggingFace or timm
        activation modules.
      {params}
      x: Input batch ``[B, *input]`` (float); with ``layer=`` and a transformer composite, token ids or a
        tokenizer's dict too.
      {target}
      layer: Optional layer (dotted name or submodule): return the relevance at its output instead of
        at ``x`` (captum's ``LayerLRP``), ``[B, *layer output]``: the relevance arriving there from every
        path after it. Where the rules conserve, it sums to the same total as the input relevance when
        every path from the input to the output passes through the layer.
      composite: ``"epsilon_plus_flat"`` (default), ``"epsilon_plus"``, ``"epsilon_gamma_box"``,
        ``"epsilon_alpha2_beta1"`` or ``"epsilon_alpha2_beta1_flat"`` (zennit's names and layer maps);
        ``"attnlrp"`` or ``"cp_lrp"`` (transformers, any architecture; see above).
      epsilon: The epsilon rule's stabiliser (linear layers). Default: 1e-6 (zennit's) for the zennit
        composites, 0 (LXT's) for ``"attnlrp"`` and ``"cp_lrp"``.
      gamma: The gamma rule's weight on positive parts. Default: 0.25 (zennit's).
      stabilizer: The stabiliser of every other rule's denominator. Default: 1e-6 (zennit's).
      low: z-box's lower bound of the input (``"epsilon_gamma_box"`` only): a float or a tensor
        broadcastable to ``x`` (per-channel ``[1, C, 1, 1]``, or per pixel).
      high: z-box's upper bound, as ``low``.
      canonize: Merge batch norms into the preceding convolution / linear layer and give residual
        sums the norm rule (zennit's ``SequentialMergeBatchNorm`` and ``ResNetCanonizer``). Default: True.
      rules: Optional ``{module name or type: rule}`` overriding the composite for convolution and
        linear modules; rules are ``"epsilon"``, ``"zero"`` (LRP-0), ``"zplus"`` (= ``"alpha1_beta0"``),
        ``"alpha2_beta1"``, ``"gamma"``, ``"flat"``, ``"wsquare"``, ``"zbox"``; with ``"attnlrp"`` /
        ``"cp_lrp"`` (which give every layer the epsilon rule): ``"epsilon"``, ``"zero"``, ``"gamma"``,
        ``"zplus"``, ``"alpha2_beta1"``, e.g. ``rules={nn.Linear: "gamma"}`` on a ViT as LXT recommends
        (``"flat"``, ``"wsquare"`` and ``"zbox"`` give relevance that is not the input times a gradient).
      condition: Optional concept condition (CRP, Achtibat et al. 2023) ``{layer: channels}``: the
        relevance at ``layer``'s output is masked to the given channels (dimension 1 of the output,
        zennit-crp's ``ChannelConcept``) and sent on to ``x``. ``channels`` is an int (one concept:
        ``[B, *input]``), a list or 1-D integer tensor of ``K`` ints (``K`` concepts of one channel
        each, in one batched call: ``[B, K, *input]``), or a list of ``K`` lists of ints (``K``
        concept groups, each masking several channels: ``[B, K, *input]``). Only relevance that passes
        through the layer is counted (zennit-crp's default ``exclude_parallel=True``): the heatmaps of
        all channels sum to the unconditioned map when every path from the input to the output
        passes through the layer, and to the map minus what bypasses the layer otherwise (a
        residual connection around it). One layer per call; not together with ``layer=``; zennit
        composites only.

    Returns:
      ``[B, *input]`` relevance on ``x``'s device and dtype; ``[B, *layer output]`` with ``layer=``;
      ``[B, K, *input]`` with a list of ``K`` concepts in ``condition=``.

    Raises:
      TypeError: a ``model_fn`` that reaches no model, or several; non-float ``x``; a bad ``target``,
        ``low``, ``high`` or option type.
      ValueError: an unknown composite or rule (the known names are listed), missing ``low`` /
        ``high`` for z-box, a target out of range, NaN in ``x``, an unknown layer, a condition on
        more than one layer or with a channel out of range, ``layer=`` and ``condition=`` together.
      NotImplementedError: modules or operations without a rule (named); for the zennit composites
        e.g. layer norm, attention, softmax, transposed convolutions, products of two input-dependent
        tensors (use ``"attnlrp"`` / ``"cp_lrp"`` there).

    Example:
      >>> fn, params = functionalize(resnet.eval())
      >>> lrp(fn, params, images, labels).shape                  # [8, 3, 224, 224] -> [8, 3, 224, 224]
      >>> lrp(fn, params, images, composite="epsilon_gamma_box", low=-3.0, high=3.0)
      >>> lrp(fn, params, images, labels, layer="layer3").shape                 # [8, 256, 14, 14]
      >>> lrp(fn, params, images, labels, condition={"layer3": [5, 17]}).shape  # [8, 2, 3, 224, 224]
      >>> fn, params = functionalize(llama.eval(), output=lambda o: o.logits[:, -1])
      >>> lrp(fn, params, {"input_ids": ids}, composite="attnlrp", layer="model.embed_tokens").shape  # [B, T, D]
      >>> torch.func.vmap(lambda p: lrp(fn, p, images, labels))(stacked)   # ensemble [E, 8, 3, 224, 224]

    Cost: one forward with the rules' modified forward passes (z-plus: one more convolution per
      layer on non-negative inputs, two otherwise), one backward with their transposes; no
      parameter gradients. Memory: each layer's input and denominators until the backward.
      ``layer=``: the backward stops at the layer. ``condition=`` with ``K`` concepts: one more
      backward from the output to the layer, then ``K`` backwards from the layer to ``x`` as one
      batched (``vmap``) backward.

    References:
      Bach, Binder, Montavon, Klauschen, Müller and Samek, "On Pixel-Wise Explanations for Non-Linear
      Classifier Decisions by Layer-Wise Relevance Propagation", PLoS ONE 2015.
      Montavon, Binder, Lapuschkin, Samek and Müller, "Layer-Wise Relevance Propagation: An
      Overview", in Explainable AI, LNCS 11700, 2019.
      Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin and Samek, "AttnLRP: Attention-Aware
      Layer-Wise Relevance Propagation for Transformers", ICML 2024.
      Ali, Schnake, Eberle, Montavon, Müller and Wolf, "XAI for Transformers: Better Explanations
      through Conservative Propagation", ICML 2022.
      Anders, Neumann, Samek, Müller and Lapuschkin, "Software for Dataset-wide XAI: From Local
      Explanations to Global Insights with Zennit, CoRelAy, and ViRelAy", 2021 (the composites).
    """
    transformer = isinstance(composite, str) and composite in TRANSFORMER_COMPOSITES
    # every composite takes layer= (the zennit ones read the relevance there): token ids are told to name the
    # embedding layer, and the zennit composites then point to composite='attnlrp' for the transformer's modules
    target = check_call(FN, model_fn, params, x, target, layer=layer, layer_option=True)
    if transformer:
        if condition is not None:
            raise _checks.value_error(FN, "condition= with a zennit composite (concept relevance on CNNs)",
                                      f"condition with composite={composite!r}",
                                      "Concept conditions are implemented for the CNN composites only; read the "
                                      "relevance at the layer with layer= instead.")
        return _lrp_transformer(model_fn, params, x, target, composite=composite, layer=layer, epsilon=epsilon,
                                gamma=gamma, stabilizer=stabilizer, rules=rules)
    if not isinstance(x, Tensor):
        raise _checks.type_error(FN, "x, a floating-point tensor [B, *input]", _checks.describe(x),
                                 f"composite={composite!r} follows one input tensor through the model; "
                                 "composite='attnlrp' or 'cp_lrp' take a dict of named inputs (with layer= at the "
                                 "embeddings for token ids).")
    module, _ = _module(model_fn, "LRP assigns rules to modules by type and name", params)
    if not isinstance(composite, str):
        raise _checks.type_error(FN, f"composite, one of {', '.join(COMPOSITES)}", _checks.describe(composite))
    if composite not in COMPOSITES:
        listed = ", ".join(repr(c) for c in (*COMPOSITES, *TRANSFORMER_COMPOSITES))
        raise _checks.value_error(FN, f"composite one of {listed}",
                                  _checks.describe(composite))
    _checks.check_bool(FN, "canonize", canonize)
    opt = _Options(_check_float("epsilon", 1e-6 if epsilon is None else epsilon), _check_float("gamma", gamma),
                   _check_float("stabilizer", stabilizer), _check_bound("low", low, x), _check_bound("high", high, x))
    rules = _check_rules(module, rules, RULES, "a rule in rules")
    plan = _Plan(module, composite, rules, canonize)
    if "zbox" in plan.rules.values() and (opt.low is None or opt.high is None):
        raise _checks.value_error(FN, "low= and high= (the input's bounds) for the z-box rule",
                                  f"low={low!r}, high={high!r}" if not isinstance(low, Tensor) else "a missing bound",
                                  f"composite {composite!r} uses z-box on the first convolution; e.g. for images "
                                  "normalised per channel, low=(0 - mean) / std and high=(1 - mean) / std.")
    read_at, groups, single = _check_layer_options(model_fn, params, x, layer, condition)

    recorder = _Recorder(plan, params, opt)
    record_fn = model_fn if read_at is None else intermediates(model_fn, layers=[read_at], fn=FN)
    try:
        out, count = _intercept.run(record_fn, recorder, params, x, tainted=[x], linear=_HANDED)
    except (_intercept.NoRule, _NoRuleError) as err:
        where = _where(module, model_fn, lambda: _intercept.run(record_fn, _Recorder(plan, params, opt), params, x,
                                                                tainted=[x], linear=_HANDED))
        raise _in_module(err, False, where) from None
    if read_at is not None:
        out, acts = out
    recorder.nonneg.clear()
    records = recorder.records
    output = _targets.selector(model_fn)
    if callable(target) and not isinstance(target, Tensor):
        choice = target
    else:
        index = _targets.resolve_index(out, target, fn=FN, output=output)

        def choice(o):
            return _targets.resolve(o, index, fn=FN, output=output)
    out, choice = _as_pytree(out, choice)
    scores, pullback = torch.func.vjp(choice, out)  # type: ignore[misc]  # 2 values without has_aux
    (cotangent,) = pullback(scores)  # score * d score / d out: the relevance entering the network
    handler = _relevance_handler(records)

    def total(v: Tensor, model: Any = model_fn, extra: Sequence[Tensor] = ()) -> Tensor:
        try:
            out_v, n = _intercept.run(model, handler, params, v, tainted=[v, *extra], linear=_HANDED)
        except _intercept.NoRule as err:
            raise _no_rule(err.op, err.detail) from None
        if n != count:
            raise RuntimeError(_checks.message(FN, f"the relevance pass to make the record pass's {count} calls",
                                               f"{n} calls", "The model must not branch on its input's values."))
        return _leaves_dot(_as_pytree(out_v, choice)[0], cotangent)

    if read_at is None:
        return grad_of_sum(total, x)
    return _at_layer(model_fn, x, read_at, acts[read_at], total, groups, single)


# --------------------------------------------------------------------------------------------
# Transformer composites: AttnLRP and CP-LRP as input x modified gradient.

TRANSFORMER_COMPOSITES = ("attnlrp", "cp_lrp")
"""Composites for transformers (and every other architecture): AttnLRP and conservative propagation."""

_TINY = 1e-30  # the identity rule's stabiliser of ``y / z`` (at least the dtype's smallest normal number)


def _sum_to(t: Tensor, shape: Sequence[int]) -> Tensor:
    """``t`` summed over the dimensions it was broadcast along to reach its shape from ``shape``."""
    if tuple(t.shape) == tuple(shape):
        return t
    lead = t.ndim - len(shape)
    t = t.sum(tuple(range(lead))) if lead else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dims, keepdim=True) if dims else t


class _Modified(torch.autograd.Function):
    """One operation's recorded output, with its rule's gradient: ``Modified.apply(rule, n, *inputs, *tensors)``.

    ``tensors[0]`` is the operation's output, returned as it is and not kept for the backward (the rule
    sees ``None`` in its place: a rule that needs the output gets it again as a later tensor); the other
    tensors are what the rule's backward ``rule(g, tensors) -> n gradients`` needs. The gradients go to
    the ``n`` inputs of this call, none to the tensors: their values were computed from the recorded pass's
    tensors (or from this pass's, when no outer derivative is asked for), so outer derivatives w.r.t.
    ``params`` differentiate the rule's formula through ordinary autograd, as :class:`_Propagate` does for
    the zennit composites.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(rule: Any, n: int, *args: Tensor) -> Tensor:
        return args[n].view_as(args[n])

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Tensor) -> None:
        ctx.rule, ctx.n = inputs[0], inputs[1]
        ctx.save_for_backward(*inputs[3 + inputs[1]:])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Any:
        return _rule_backward(ctx, g)


def _rule_backward(ctx: Any, g: Tensor) -> Any:
    """The backward of :class:`_Modified` and :class:`_Once`: the rule's gradients for the ``n`` inputs."""
    saved = ctx.saved_tensors
    return (None, None) + tuple(ctx.rule(g, (None, *saved))) + (None,) * (1 + len(saved))


class _Once(torch.autograd.Function):
    """:class:`_Modified` for plain autograd (no outer derivative, no ``torch.func`` transform active): the
    same rule and tensors, set up in the forward, which spares the argument binding a ``setup_context``
    costs on every call (~80 us, dozens of calls per forward); ``torch.func`` refuses it."""

    @staticmethod
    def forward(ctx: Any, rule: Any, n: int, *args: Tensor) -> Tensor:
        ctx.rule = rule
        ctx.save_for_backward(*args[n + 1:])
        return args[n].view_as(args[n])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Any:
        return _rule_backward(ctx, g)


def _modified(rule: Any, n: int, *args: Tensor) -> Tensor:
    """``_Modified.apply(rule, n, *args)``; :class:`_Once` where it can serve (nothing differentiates the rule)."""
    plain = not any(t.requires_grad for t in args[n:]) and not torch._C._are_functorch_transforms_active()
    return (_Once if plain else _Modified).apply(rule, n, *args)


def _scaled_gradient(t: Tensor, factor: float = 0.5) -> Tensor:
    """``t``, whose gradient is scaled by ``factor`` (the uniform rule's half by default)."""
    return _modified(_scaled(factor), 1, t, t.detach())


def _larger_than_operands(name: str, a: Tensor, b: Tensor) -> bool:
    """Whether ``a @ b`` (``[..., n, k] @ [..., k, m]``) has more elements than ``a`` and ``b`` together
    (``Q K^T`` over more tokens than twice the head size); False for every other product."""
    if name not in ("matmul", "bmm") or a.ndim < 2 or b.ndim < 2:
        return False
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return math.prod(lead) * a.shape[-2] * b.shape[-1] > a.numel() + b.numel()


def _product_vjp(name: str, apply: Any, a: Tensor, b: Tensor, g: Tensor) -> Tuple[Tensor, Tensor]:
    """``(J_a^T g, J_b^T g)`` of a product ``y = f(a, b)`` linear in each operand."""
    if name == "mul":
        return _sum_to(g * b, a.shape), _sum_to(g * a, b.shape)
    if name == "matmul" and a.ndim >= 2 and b.ndim >= 2:
        return _sum_to(g @ b.mT, a.shape), _sum_to(a.mT @ g, b.shape)
    _, pull = torch.func.vjp(apply, a, b)  # type: ignore[misc]  # 2 values without has_aux
    ga, gb = pull(g)
    return ga, gb


class _Rules:
    """The handler of the transformer composites, in one of three roles (see :func:`_modified_lrp`).

    For each operation it computes the output and the tensors of its rule from the call's inputs
    (``"once"``: and returns the output with the rule as its gradient; ``"record"``: and keeps them,
    returning the plain output), or (``"replay"``) returns the recorded output with the recorded rule.

    * elementwise operations and activation modules: the identity rule, ``d/dz := y / z``;
    * products of two input-dependent tensors (``QK^T``, ``AV``, gates): AttnLRP's uniform rule, half of
      the gradient to each operand; a normaliser's ``x * rsqrt(var)`` or ``x / std`` (one operand the
      output of ``rsqrt`` / ``reciprocal`` broadcast over the other): the normaliser held constant;
    * softmax: its gradient (AttnLRP's softmax rule in input x gradient form); CP-LRP holds the
      probabilities constant: no gradient, and the products they enter pass all of it to the other operand;
    * CP-LRP's gated units ``act(gate) * up``: the gate held constant;
    * normalisation layers (the interceptor's ``scale``): the scale held constant;
    * convolution and linear layers: the epsilon rule, ``g -> W^T (g z / stab(z))`` (``epsilon = 0``:
      the gradient); everything else is linear and passes the gradient (residual sums, shapes, pooling,
      embeddings), which shares relevance in proportion to each input's contribution.
    """

    def __init__(self, role: str, composite: str, options: _Options, layer_rules: Mapping[str, str],
                 owners: Mapping[int, str], records: Optional[List[Any]] = None):
        self.role, self.cp, self.options = role, composite == "cp_lrp", options
        self.epsilon = options.epsilon
        self.layer_rules, self.owners = layer_rules, owners
        self.records: List[Any] = [] if records is None else records
        self.normalisers: Dict[int, Tensor] = {}
        self.activations: Dict[int, Tensor] = {}

    def __call__(self, call: _intercept.Call) -> Any:
        if self.role == "replay":
            k = call.index
            record = self.records[k] if k < len(self.records) else None
            if record is None or record[0] != call.name:
                raise RuntimeError(_checks.message(FN, "the relevance pass to repeat the record pass's operations",
                                                   f"'{call.name}' at call {k}",
                                                   "The model must not branch on its input's values."))
            _, rule, tensors, held, extra = record
        else:
            rule, tensors, held, extra = self._prepare(call)
            if extra == "fused":  # the rule is in the value's own graph (one pass: no outer derivative)
                return self._returned(call, tensors[0], held)
            if self.role == "record":
                self.records.append((call.name, rule, tensors, held, extra))
                return self._returned(call, tensors[0] if extra is None else (tensors[0], extra), held)
        inputs = call.inputs if call.kind != "activation" else call.inputs[:1]
        if self.role == "once":  # nothing differentiates the rule's tensors: no graph through them (an
            # activation module's pieces, or an elementwise output, would otherwise get a backward of zeros)
            tensors = tuple(t.detach() for t in tensors)
        out = _modified(rule, len(inputs), *inputs, *tensors)
        return self._returned(call, out if extra is None else (out, extra), held)  # max pooling: its indices

    def _returned(self, call: _intercept.Call, out: Any, held: bool) -> Any:
        """``out`` as the model gets it; an elementwise output is remembered (the products that meet it ask)."""
        if call.kind in ("elementwise", "activation") and self.role != "replay":
            (self.normalisers if call.name in _NORMALISERS else self.activations)[id(out)] = out
        return _intercept.Held(out) if held else out

    def _is(self, table: Dict[int, Tensor], t: Tensor) -> bool:
        return table.get(id(t)) is t

    def _prepare(self, call: _intercept.Call) -> Tuple[Any, Tuple[Tensor, ...], bool, Any]:
        """``(rule, tensors, held, extra)`` of one call, ``tensors[0]`` its output."""
        kind = call.kind
        if kind in ("elementwise", "activation"):
            z = call.inputs[0]
            y = call.apply(z) if kind == "elementwise" else call.inputs[1]
            shape, tiny = z.shape, max(_TINY, torch.finfo(z.dtype).tiny)
            # y / z, with z = 0 read as the smallest normal number (adding it changes no other z); formed in
            # the backward, so that an operation no gradient reaches (a norm's held statistics) costs nothing
            return ((lambda g, t: (_sum_to(g * t[1] / torch.where(t[2] == 0, tiny, t[2]), shape),)), (y, y, z), False,
                    None)
        if kind == "softmax":
            y = call.apply(call.input)
            if self.role == "once":  # nothing differentiates the map: autograd's own softmax backward, or none
                return None, ((y.detach() if self.cp else y),), self.cp, "fused"
            if self.cp:
                return (lambda g, t: (None,)), (y,), True, None
            dim, dtype = call.options["dim"], call.input.dtype
            return (lambda g, t: ((t[1] * (g - (t[1] * g).sum(dim, keepdim=True))).to(dtype),)), (y, y), False, None
        if kind == "maxpool":
            z = call.input
            y, idx = call.apply(z)
            apply = call.apply

            def pool(g: Tensor, t: Sequence[Tensor]) -> Tuple[Tensor]:
                _, pull = torch.func.vjp(lambda u: apply(u)[0], t[1])  # type: ignore[misc]
                return (pull(g)[0],)
            return pool, (y, z), False, (idx if call.options["return_indices"] else None)
        if kind == "scale":
            d, r = call.inputs
            shape = d.shape
            return (lambda g, t: (_sum_to(g * t[1], shape), None)), (d * r, r), False, None
        if kind == "bilinear":
            return self._product(call)
        if kind == "linear":
            return self._layer(call)
        if kind == "sdpa":  # (one pass only) the fused kernel with its operands' gradients scaled: AttnLRP's
            # uniform rule on QK^T and AV is a quarter of the gradient to q and k and half to v (LXT's form);
            # CP-LRP holds the probabilities: nothing to q and k, the gradient to v
            factors = (0.0, 0.0, 1.0) if self.cp else (0.25, 0.25, 0.5)
            scaled = [_scaled_gradient(t, f) if tainted else t
                      for t, f, tainted in zip(call.inputs, factors, call.options["tainted"])]
            return None, (call.apply(*scaled),), False, "fused"
        raise _no_rule(call.name, f"an operation of kind {kind!r}", True)  # pragma: no cover - kinds are fixed

    def _product(self, call: _intercept.Call) -> Tuple[Any, Tuple[Tensor, ...], bool, Any]:
        a, b = call.inputs
        name, apply = call.name, call.apply
        held = call.options.get("held", (False, False))
        if held[0] and held[1]:
            return (lambda g, t: (None, None)), (apply(a, b),), True, None
        keep: Optional[int] = None  # the one operand that gets all of the gradient
        if held[0] or held[1]:
            keep = 1 if held[0] else 0
        elif name == "mul":
            for i, (mine, other) in enumerate(((a, b), (b, a))):  # type: Tuple[int, Tuple[Tensor, Tensor]]  # x * rsqrt(var), x / std
                if self._is(self.normalisers, other) and other.numel() < mine.numel():
                    keep = i
            if keep is None and self.cp and self._is(self.activations, a) != self._is(self.activations, b):
                keep = 1 if self._is(self.activations, a) else 0  # act(gate) * up: the gate held constant
        factor = 0.5 if keep is None else 1.0
        if self.role == "once":  # autograd's own product backward, the rule by a stop or a scaled gradient
            if keep is None:  # half of the gradient, scaled where it is smaller: the output (A V), or
                # both operands (Q K^T, whose T x T output is larger than Q and K together)
                if not _larger_than_operands(name, a, b):
                    y = apply(a, b)
                    return None, (_scaled_gradient(y),), False, "fused"
                half = [_scaled_gradient(t) for t in (a, b)]
                return None, (apply(*half),), False, "fused"
            return None, (apply(a, b.detach()) if keep == 0 else apply(a.detach(), b),), False, "fused"
        y = apply(a, b)

        def rule(g: Tensor, t: Sequence[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
            ga, gb = _product_vjp(name, apply, t[1], t[2], g * factor if factor != 1 else g)
            return (None if keep == 1 else ga), (None if keep == 0 else gb)
        return rule, (y, a, b), False, None

    def _layer(self, call: _intercept.Call) -> Tuple[Any, Tuple[Tensor, ...], bool, Any]:
        a = call.input
        y = call.apply(a)
        args, kwargs = call.options["args"], call.options["kwargs"]
        apply = call.apply
        if call.options["positions"] not in ((0,), ("input",)):  # pragma: no cover - a weight is never "linear"
            def plain(g: Tensor, t: Sequence[Tensor]) -> Tuple[Tensor]:
                _, pull = torch.func.vjp(apply, t[1])  # type: ignore[misc]
                return (pull(g)[0],)
            return plain, (y, a), False, None
        bound = (_bind_linear if call.name == "linear" else _bind_conv)(*args, **kwargs)
        w = bound["weight"]
        owner = self.owners.get(id(w))
        rule = self.layer_rules.get(owner or "", "epsilon")
        eps = 0.0 if rule == "zero" else self.epsilon
        geometry = _Geometry(call.name, args, kwargs, a.shape)
        if rule not in ("epsilon", "zero"):  # zennit's rules, in input x gradient form: R = z g at the output
            terms = _layer_terms(rule, geometry, a, w, bound["bias"], y, False, self.options)
            n = len(terms.tensors)
            return ((lambda g, t: (terms.relevance(t[1] * g, t[2:2 + n], gradient=True),)), (y, y, *terms.tensors),
                    False, None)
        if eps == 0:
            return (lambda g, t: (geometry.transpose(g, t[1]),)), (y, w), False, None
        s = y / _stab(y, eps)
        return (lambda g, t: (geometry.transpose(g * t[2], t[1]),)), (y, w, s), False, None


def _scaled(factor: float) -> Any:
    """The rule ``g -> factor * g`` (None for 0)."""
    return lambda g, t: ((g * factor) if factor else None,)


_NORMALISERS = frozenset(("rsqrt", "reciprocal"))
_ACTIVATION_MODULES = ("transformers.activations", "timm.layers.activations")


def _activation_modules(module: nn.Module) -> List[str]:
    """Names of the activation modules written as several operations (HuggingFace's, timm's)."""
    names = []
    for name, mod in module.named_modules():
        if any(True for _ in mod.children()) or any(True for _ in mod.parameters(recurse=False)):
            continue
        if type(mod).__module__.startswith(_ACTIVATION_MODULES):
            names.append(name)
    return names


def _as_activation(args: Any, out: Any) -> Any:
    if args and isinstance(args[0], Tensor) and isinstance(out, Tensor) and out.shape == args[0].shape:
        return _intercept.activation(args[0], out)
    return out


def _modified_lrp(model_fn: ModelFn, module: nn.Module, params: Params, x: Any, target: Target, *, composite: str,
                  layer: Optional[str], epsilon: float, gamma: float, stabilizer: float,
                  rules: Optional[Mapping[Any, str]]) -> Tensor:
    """AttnLRP / CP-LRP: the relevance ``value * d score / d value`` with every operation's gradient modified.

    Without outer derivatives (nothing in ``params`` or ``x`` tracked) one forward computes each
    operation with its rule and one backward gives the map. When ``params`` or ``x`` carry derivatives,
    a record pass first runs the model with true derivatives and keeps each operation's output and its
    rule's tensors; the relevance pass returns those (the rule's formula then differentiates correctly).
    """
    layer_rules: Dict[str, str] = {}
    for name, mod in module.named_modules():
        for key, rule in (rules or {}).items():
            if key == name or (isinstance(key, type) and isinstance(mod, key)):
                layer_rules[name] = rule
    owners = {id(t): name.rpartition(".")[0] for name, t in params.items() if isinstance(t, Tensor)}
    transform = {name: _as_activation for name in _activation_modules(module)}
    output = _targets.selector(model_fn)
    # with epsilon 0 and no rule of zennit's, every layer's rule is its gradient: nothing to hand over
    linear = ("linear", "conv1d", "conv2d", "conv3d") if epsilon > 0 or layer_rules else ()
    options = _Options(epsilon, gamma, stabilizer, None, None)
    if layer is None:
        step = intermediates(model_fn, layers=(), transform=transform, fn=FN)

        def forward(v: Tensor) -> Tuple[Any, Tensor]:
            return step(params, v)[0], v
        start = x
    else:
        names = (layer,)
        shape, dtype = layer_shapes(model_fn, params, x, [layer], FN)[layer]
        start = torch.zeros(shape, dtype=dtype, device=_inputs.device_of(x))

        def forward(v: Tensor) -> Tuple[Any, Tensor]:
            step = intermediates(model_fn, layers=names, perturb={layer: v}, transform=transform, fn=FN)
            out, acts = step(params, x)
            return out, acts[layer]

    def run(handler: _Rules, v: Tensor) -> Tuple[Any, Tensor, int]:
        try:  # one pass: fused attention kept, its operands' gradients scaled (record / replay decompose it)
            (out, value), count = _intercept.run(forward, handler, v, tainted=[v], linear=linear,
                                                 fused=handler.role == "once" and not transforms)
        except (_intercept.NoRule, _NoRuleError) as err:
            where = _where(module, model_fn, lambda: _intercept.run(
                forward, _Rules("once", composite, options, layer_rules, owners), v.detach(), tainted=[v],
                linear=linear, fused=False))
            raise _in_module(err, True, where) from None
        return out, value, count

    records: Optional[List[Any]] = None
    count = 0
    outer = any(tracked(t) for t in leaves([params, x]))
    # fused attention's backward has no batching rule: decomposed under vmap (and every torch.func transform)
    transforms = torch._C._are_functorch_transforms_active()
    if not outer and not transforms and not compiling():
        # nothing asks for derivatives of the map: one forward and one backward of plain autograd
        leaf = start.detach().requires_grad_(True)
        with torch.enable_grad():
            out, value, _ = run(_Rules("once", composite, options, layer_rules, owners), leaf)
            scores = _targets.resolve(out, target, fn=FN, output=output)
            summed = scores.sum()  # no graph at all when every path is held (cp_lrp's softmax alone)
            (g,) = torch.autograd.grad(summed, leaf, allow_unused=True) if summed.requires_grad else (None,)
        return value.detach() * g if g is not None else torch.zeros_like(value.detach())
    if outer:
        recorder = _Rules("record", composite, options, layer_rules, owners)
        _, _, count = run(recorder, start)
        records = recorder.records

    def total(v: Tensor) -> Tuple[Tensor, Tensor]:
        handler = _Rules("once" if records is None else "replay", composite, options, layer_rules, owners, records)
        out, value, n = run(handler, v)
        if records is not None and n != count:
            raise RuntimeError(_checks.message(FN, f"the relevance pass to make the record pass's {count} calls",
                                               f"{n} calls", "The model must not branch on its input's values."))
        scores = _targets.resolve(out, target, fn=FN, output=output)
        return scores.sum(), value

    grads, value = grad_of_sum(total, start, has_aux=True)
    return value * grads


_WRAP_HINT = ("Call the model_fn of `model_fn, params = tx.functionalize(model)` inside your function "
              "(`lambda p, x: model_fn(p, (x - mean) / std)`: what runs outside the model, such as a normalisation, "
              "passes the gradient), or put the normalisation in the model: "
              "`tx.functionalize(nn.Sequential(Normalize(mean, std), model))`.")


def _reachable(model_fn: Any, depth: int = 3) -> List[Any]:
    """The objects a wrapper function can call: its closure's cells, defaults and the globals its code names,
    a ``functools.partial``'s function and arguments, a bound method's object; ``depth`` levels deep."""
    found: List[Any] = []
    seen: set = set()
    frontier = [model_fn]
    for _ in range(depth):
        following: List[Any] = []
        for obj in frontier:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj is not model_fn:
                found.append(obj)
            if module_of(obj) is not None or isinstance(obj, nn.Module):
                continue  # a model: its insides are not the wrapper's
            if isinstance(obj, functools.partial):
                following += [obj.func, *obj.args, *obj.keywords.values()]
            elif inspect.ismethod(obj):
                following += [obj.__self__, obj.__func__]
            elif inspect.isfunction(obj):
                following += [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
                following += [*(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()]
                names = obj.__code__.co_names
                following += [obj.__globals__[n] for n in names if n in obj.__globals__]
        frontier = following
    return found


def _filled(cell: Any) -> bool:
    try:
        return cell.cell_contents is not _filled  # always True once the cell has a value
    except ValueError:  # a cell not yet assigned
        return False


def _module(model_fn: ModelFn, why: str, params: Optional[Params] = None) -> Tuple[nn.Module, bool]:
    """The module whose layers the rules are assigned to, and whether ``model_fn`` runs it through
    ``functionalize`` (its hooks: layers, activation modules) rather than a call that hides them.

    A ``model_fn`` from ``functionalize`` (or ``tx.Wrapped``) names its module. A function of the user's that
    wraps one (a normalisation in front: ``lambda p, x: model_fn(p, (x - mean) / std)``, or a
    ``torch.func.functional_call(model, p, x)`` closure) is searched for the model it calls (see
    :func:`_reachable`): it must reach exactly one, and ``params``' names must be that model's.
    """
    module = module_of(model_fn)
    if module is not None:
        return module, True
    found: Dict[int, Tuple[nn.Module, bool]] = {}
    for obj in _reachable(model_fn):
        inner = module_of(obj)
        if inner is not None:
            found[id(inner)] = (inner, True)
        elif isinstance(obj, nn.Module) and id(obj) not in found:
            found[id(obj)] = (obj, False)
    # a functionalized model and its own module reached twice count once, as the functionalized one
    if len(found) != 1:
        kinds = ", ".join(type(m).__name__ for m, _ in found.values())
        what = f"{len(found)} models ({kinds})" if found else "no model"
        raise _checks.type_error(FN, "model_fn from functionalize(model), or a function that calls one model",
                                 f"{_checks.describe(model_fn)} that reaches {what}", f"{why}. {_WRAP_HINT}")
    module, hooked = next(iter(found.values()))
    if params is not None and isinstance(params, Mapping):
        known = set(dict(module.named_parameters(remove_duplicate=False)))
        known |= set(dict(module.named_buffers(remove_duplicate=False)))
        unknown = [k for k in params if k not in known]
        if unknown:
            raise _checks.value_error(FN, f"params named as the parameters of the {type(module).__name__} that "
                                      "model_fn calls", f"a key {unknown[0]!r} it does not have",
                                      f"{why}. {_WRAP_HINT}")
    return module, hooked


def _check_rules(module: nn.Module, rules: Any, allowed: Sequence[str], what: str) -> Optional[Dict[Any, str]]:
    """``rules`` checked (module names or types to rule names in ``allowed``), ``"alpha1_beta0"`` as ``"zplus"``."""
    if rules is None:
        return None
    if not isinstance(rules, Mapping):
        raise _checks.type_error(FN, "rules, a dict {module name or type: rule name}", _checks.describe(rules))
    known = dict(module.named_modules())
    for key, rule in rules.items():
        if isinstance(key, str):
            if key not in known:
                raise _checks.unknown_name(FN, "layer in rules", key, list(known))
        elif not (isinstance(key, type) and issubclass(key, nn.Module)):
            raise _checks.type_error(FN, "rules keys, module names or nn.Module types", _checks.describe(key))
        if not isinstance(rule, str) or rule not in allowed:
            raise _checks.value_error(FN, f"{what}, one of {', '.join(repr(r) for r in allowed)}",
                                      _checks.describe(rule))
    return {k: ("zplus" if r == "alpha1_beta0" else r) for k, r in rules.items()}


_GRADIENT_FORM_RULES = ("epsilon", "zero", "zplus", "alpha1_beta0", "alpha2_beta1", "gamma")


def _lrp_transformer(model_fn: ModelFn, params: Params, x: Any, target: Target, *, composite: str, layer: Any,
                     epsilon: Optional[float], gamma: float, stabilizer: float,
                     rules: Optional[Mapping[Any, str]]) -> Tensor:
    """Checks for the transformer composites, then :func:`_modified_lrp`."""
    module, hooked = _module(model_fn, "LRP finds activation modules and assigns layer rules by module", params)
    if not hooked and _activation_modules(module):
        raise _checks.type_error(FN, f"for composite={composite!r}, a model_fn that runs the model through "
                                 "functionalize (its activation modules get their rule there)",
                                 f"{_checks.describe(model_fn)} that calls {type(module).__name__} directly "
                                 "(torch.func.functional_call or module(x))", _WRAP_HINT)
    eps = _check_float("epsilon", 0.0 if epsilon is None else epsilon)
    rules = _check_rules(module, rules, _GRADIENT_FORM_RULES, f"a rule in rules for composite {composite!r}")
    name: Optional[str] = None
    if layer is not None:
        names, _ = resolve_layers(FN, model_fn, layer)
        if len(names) != 1 or isinstance(layer, (list, tuple, dict)):
            raise _checks.type_error(FN, "layer, one dotted name or module", _checks.describe(layer),
                                     "Call lrp once per layer.")
        name = names[0]
    elif not isinstance(x, Tensor):
        raise _checks.value_error(FN, "layer= for a dict x (e.g. the token embeddings)", "layer=None",
                                  "Relevance is read at a floating-point tensor: name the embedding layer, e.g. "
                                  "layer='model.embed_tokens'.")
    return _modified_lrp(model_fn, module, params, x, target, composite=composite, layer=name, epsilon=eps,
                         gamma=_check_float("gamma", gamma), stabilizer=_check_float("stabilizer", stabilizer),
                         rules=rules)
