"""Inputs and outputs beyond one tensor: dict inputs batch first, structured model outputs.

A model input ``x`` is a tensor ``[B, ...]`` or a mapping of named tensors that all share the batch
dimension (``{"input_ids": [B, T], "attention_mask": [B, T]}``), passed to the module as keywords.
Non-tensor entries (flags such as ``return_dict``) are passed unchanged. Chunked methods slice,
index and repeat every tensor entry along the batch together, with the helpers here.

A model output is a tensor, a tuple / list, a mapping (a dict, a HuggingFace ``ModelOutput``) or a dataclass;
:func:`split_output` cuts any of them into row blocks, so that a callable target sees the output of
the examples it was written for.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import checks as _checks

Input = Union[Tensor, Mapping]


def entries(x: Input) -> Iterator[Tensor]:
    """The tensors of ``x`` (itself, or a mapping's tensor values)."""
    if isinstance(x, Tensor):
        yield x
    else:
        yield from (v for v in x.values() if isinstance(v, Tensor))


def batch_of(x: Input) -> int:
    """``B``, the size of the first dimension shared by every tensor of ``x``."""
    return next(entries(x)).shape[0]


def device_of(x: Input) -> torch.device:
    return next(entries(x)).device


def map_batch(x: Input, op) -> Input:
    """``op`` applied to every tensor of ``x``; a mapping keeps its keys and type ``dict``."""
    if isinstance(x, Tensor):
        return op(x)
    return {k: op(v) if isinstance(v, Tensor) else v for k, v in x.items()}


def take(x: Input, start: int, stop: int) -> Input:
    """Rows ``start:stop`` of every tensor of ``x``."""
    return map_batch(x, lambda v: v[start:stop])


def select_rows(x: Input, rows: Tensor) -> Input:
    """Rows ``rows`` (an index tensor) of every tensor of ``x``."""
    return map_batch(x, lambda v: v.index_select(0, rows.to(v.device, non_blocking=True)))


def repeat(x: Input, k: int) -> Input:
    """``x`` repeated ``k`` times along the batch, block after block: ``[x; x; ...]``, ``[k * B, ...]``."""
    if k == 1:
        return x
    return map_batch(x, lambda v: v.repeat(k, *([1] * (v.ndim - 1))))


def replace(x: Input, key: Optional[str], value: Tensor) -> Input:
    """``x`` with its entry ``key`` replaced by ``value`` (``x`` itself is replaced when ``key`` is None)."""
    if key is None:
        return value
    out = dict(x)
    out[key] = value
    return out


def perturbed_entry(fn: str, x: Any) -> Tuple[Optional[str], Tensor]:
    """The entry a forward-only method perturbs: ``x`` itself, or a dict's one floating-point tensor."""
    if isinstance(x, Tensor):
        return None, x
    key = attributed_key(fn, x)
    return key, x[key]


def rows_with(x: Any, key: Optional[str], g0: int, g1: int, k: int, value: Tensor) -> Any:
    """Examples ``g0:g1`` of ``x`` repeated ``k`` times block after block, with ``value`` ``[k * g, ...]``
    as the perturbed entry (every other entry of a dict follows the batch)."""
    if key is None:
        return value
    return replace(repeat(take(x, g0, g1), k), key, value)


def check_mapping(fn: str, x: Mapping, name: str = "x") -> None:
    """A dict input: string keys, at least one tensor, every tensor batch first with the same ``B``."""
    tensors = {k: v for k, v in x.items() if isinstance(v, Tensor)}
    if not tensors:
        raise _checks.type_error(fn, f"{name}, a tensor or a dict of named tensors (batch first)",
                                 "a mapping without tensors")
    if not all(isinstance(k, str) for k in x):
        raise _checks.type_error(fn, f"{name}, a dict with string keys (the model's keyword arguments)",
                                 f"keys {list(x)!r}")
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in tensors.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise _checks.value_error(fn, f"every tensor of {name} with the same batch size first",
                                  ", ".join(f"{k}: {tuple(v.shape)}" for k, v in tensors.items()))
    for k, v in tensors.items():
        if v.is_floating_point():
            _checks.check_values(fn, torch.isnan(v), f"{name}[{k!r}] without NaN",
                                 lambda v=v: f"{int(torch.isnan(v).sum())} NaN values")


_NO_LAYER_HINT = ("{fn} works on a floating-point input itself and has no layer= option: pass the model's "
                  "floating-point input (e.g. inputs_embeds or pixel_values); for token ids use a method with "
                  "layer= (saliency, integrated_gradients, deeplift, ...).")


def attributed_key(fn: str, x: Mapping, *, layer_option: bool = True) -> str:
    """The entry of a dict ``x`` that an input-space method attributes: its one floating-point tensor.

    ``layer_option``: whether the method could attribute a layer instead (the error's hint says so).
    """
    floats = [k for k, v in x.items() if isinstance(v, Tensor) and v.is_floating_point()]
    if len(floats) != 1:
        got = (f"{len(floats)} floating-point entries {floats}" if floats
               else f"only integer entries {[k for k, v in x.items() if isinstance(v, Tensor)]}")
        hint = ("Attribute a layer instead, e.g. `layer='bert.embeddings'` for token ids (the map then has the "
                "layer output's shape), or pass that entry alone." if layer_option else _NO_LAYER_HINT.format(fn=fn))
        raise _checks.value_error(fn, "a dict x with exactly one floating-point entry to attribute", got, hint)
    return floats[0]


def noised_entry(fn: str, x: Input) -> Tuple[Optional[str], Optional[Tensor]]:
    """Where a method adds input noise: ``(None, x)`` for a float tensor, ``(key, x[key])`` for a dict's
    one floating-point entry, ``(None, None)`` for token ids (integer ``x`` or a dict without a float
    entry; such methods then add the noise to the layer's output). Several float entries are an error."""
    if isinstance(x, Tensor):
        return (None, x) if x.is_floating_point() else (None, None)
    if not any(isinstance(v, Tensor) and v.is_floating_point() for v in x.values()):
        return None, None
    key = attributed_key(fn, x)
    return key, x[key]


# --------------------------------------------------------------------------------------------
# Structured outputs.

def split_output(out: Any, size: int) -> List[Any]:
    """``out`` cut into blocks of ``size`` rows: a tensor, a tuple / list or a mapping of them.

    Entries that are not tensors with a batch dimension (``None``, scalars, caches of other shapes)
    are repeated in every block. A ``ModelOutput`` (or any mapping type constructible from keyword
    arguments) keeps its type. A list of mappings is one output per example (torchvision's detectors:
    a dict of boxes, labels and scores per image), cut into lists of ``size`` of them.
    """
    if isinstance(out, Tensor):
        return list(out.split(size))
    if isinstance(out, list) and out and all(isinstance(item, Mapping) for item in out):
        return [out[i:i + size] for i in range(0, len(out), size)]
    if isinstance(out, Mapping):
        keys = list(out.keys())
        parts = [split_output(out[k], size) if _splittable(out[k]) else None for k in keys]
        count = _count(parts)
        blocks: List[Any] = []
        for i in range(count):
            fields = {k: (p[i] if p is not None else out[k]) for k, p in zip(keys, parts)}
            blocks.append(_rebuild_mapping(out, fields))
        return blocks
    if isinstance(out, (tuple, list)):
        parts = [split_output(v, size) if _splittable(v) else None for v in out]
        count = _count(parts)
        seq_type = type(out)
        blocks = []
        for i in range(count):
            items = [p[i] if p is not None else v for v, p in zip(out, parts)]
            blocks.append(seq_type(*items) if hasattr(out, "_fields") else seq_type(items))
        return blocks
    if is_dataclass_instance(out):  # a dataclass output: split its fields, keep its type
        names = [f.name for f in dataclasses.fields(out)]
        parts = [split_output(getattr(out, k), size) if _splittable(getattr(out, k)) else None for k in names]
        return [dataclasses.replace(out, **{k: p[i] for k, p in zip(names, parts) if p is not None})
                for i in range(_count(parts))]
    return [out]


def tensors_only(out: Any) -> Any:
    """``out`` without what is not a tensor (caches such as HuggingFace's ``DynamicCache``, flags).

    Mappings become dicts and sequences tuples of what is left, so that the result can leave a
    ``torch.func`` transform (its auxiliary outputs must be tensors).
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        kept = {k: tensors_only(v) for k, v in out.items()}
        return {k: v for k, v in kept.items() if v is not None}
    if isinstance(out, (tuple, list)):
        return tuple(v for v in (tensors_only(item) for item in out) if v is not None)
    if is_dataclass_instance(out):  # a dict of its tensor fields (a dataclass cannot leave a torch.func transform)
        kept = {f.name: tensors_only(getattr(out, f.name)) for f in dataclasses.fields(out)}
        return {k: v for k, v in kept.items() if v is not None}
    return None


def is_dataclass_instance(v: Any) -> bool:
    return dataclasses.is_dataclass(v) and not isinstance(v, type)


def _splittable(v: Any) -> bool:
    return (isinstance(v, Tensor) and v.ndim > 0) or isinstance(v, (Mapping, tuple, list)) or is_dataclass_instance(v)


def _count(parts: List[Optional[List[Any]]]) -> int:
    counts = {len(p) for p in parts if p is not None}
    return max(counts) if counts else 1


def _rebuild_mapping(out: Mapping, fields: dict) -> Mapping:
    if type(out) is dict:
        return fields
    try:
        return type(out)(**fields)
    except TypeError:
        return dict(fields)


# --------------------------------------------------------------------------------------------
# Baselines in the input's space.

def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    try:
        return tuple(torch.broadcast_shapes(tuple(shape), tuple(target))) == tuple(target)
    except RuntimeError:
        return False


def check_baseline(fn: str, baseline: Any, x: Tensor, name: str = "baseline") -> Tensor:
    """``baseline`` as a tensor of ``x``'s dtype that broadcasts to ``x``'s shape."""
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float, Tensor)):
        raise _checks.type_error(fn, f"{name}, a float or a tensor broadcastable to x {list(x.shape)}",
                                 _checks.describe(baseline))
    if not isinstance(baseline, Tensor):
        if math.isnan(baseline):
            raise _checks.value_error(fn, f"{name} without NaN", _checks.describe(baseline))
        return torch.full((), float(baseline), dtype=x.dtype, device=x.device)  # a fill: no host-to-device copy
    if not baseline.is_floating_point():
        raise _checks.type_error(fn, f"{name} of a floating-point dtype", _checks.describe(baseline),
                                 "Convert it like the input, e.g. `baseline.float()`.")
    if baseline.device != x.device:
        raise _checks.value_error(fn, f"{name} on x's device {x.device}", f"a tensor on {baseline.device}")
    if not broadcasts_to(baseline.shape, x.shape):
        raise _checks.value_error(fn, f"{name} broadcastable to x's shape {list(x.shape)}", _checks.describe(baseline),
                                  "Pass one baseline per example [B, *input], one for all [*input] or [1, *input], "
                                  "or a float.")
    _checks.check_values(fn, torch.isnan(baseline), f"{name} without NaN",
                         lambda: f"{int(torch.isnan(baseline).sum())} NaN values")
    return baseline.to(x.dtype)


def _entry_baseline(fn: str, baseline: Any, value: Tensor, name: str) -> Tensor:
    """``baseline`` for one tensor input, broadcast to its full shape and dtype."""
    if value.is_floating_point():
        return torch.broadcast_to(check_baseline(fn, baseline, value, name=name), value.shape)
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float, Tensor)):
        raise _checks.type_error(fn, f"{name}, an int or an integer tensor broadcastable to {list(value.shape)} "
                                 "(reference token ids)", _checks.describe(baseline))
    if not isinstance(baseline, Tensor):
        if float(baseline) != int(baseline):
            raise _checks.value_error(fn, f"{name}, a whole number for the integer input", _checks.describe(baseline))
        return torch.full_like(value, int(baseline))
    if baseline.is_floating_point() or baseline.is_complex():
        raise _checks.type_error(fn, f"{name} of an integer dtype like the input {value.dtype}",
                                 _checks.describe(baseline), "Pass reference token ids, e.g. the pad token's id.")
    try:
        return torch.broadcast_to(baseline.to(device=value.device, dtype=value.dtype), value.shape)
    except RuntimeError:
        raise _checks.value_error(fn, f"{name} broadcastable to {list(value.shape)}", _checks.describe(baseline),
                                  "Pass one baseline per example [B, ...], one for all [...], or a number.") from None


def baseline_input(fn: str, baseline: Any, x: Input, key: Optional[str] = None) -> Input:
    """The reference input, the structure of ``x`` with every tensor at full batch size.

    A tensor ``x`` takes a number or a tensor that broadcasts to it (integer ids for an integer ``x``).
    A dict ``x`` takes a dict of the entries to replace (the others are the input's own), or a number /
    tensor for the entry ``key`` (the attributed entry), else its first tensor entry (``input_ids`` in a
    tokenizer's output).
    """
    if isinstance(x, Tensor):
        return _entry_baseline(fn, baseline, x, "baseline")
    if isinstance(baseline, Mapping):
        unknown = [k for k in baseline if k not in x or not isinstance(x[k], Tensor)]
        if unknown:
            raise _checks.unknown_name(fn, "baseline entry", str(unknown[0]),
                                       [k for k, v in x.items() if isinstance(v, Tensor)])
        chosen = dict(baseline)
    else:
        name = key if key is not None else next(k for k, v in x.items() if isinstance(v, Tensor))
        chosen = {name: baseline}
    out = dict(x)
    for name, value in chosen.items():
        out[name] = _entry_baseline(fn, value, x[name], f"baseline[{name!r}]")
    return out


# --------------------------------------------------------------------------------------------
# How many copies of a batch one forward holds.

# On a CPU the cost per example of a forward grows once a batch outgrows the caches: measured on a
# 2-core x86 CPU (one thread, resnet18, forward + backward to the input), an image of 224 x 224 costs
# 96 ms in batches of 4-8, 110 ms in batches of 32 and 131 ms in batches of 64. So on a CPU a forward
# holds at most this many input elements of copies (path points, noise samples): about 7 images of
# 224 x 224, any number of short token sequences. On other devices larger batches are faster.
CPU_ELEMENTS = 1 << 20


# With no batch_size from the user, a forward holds as many copies (path points, samples) as fit in this
# many input elements on an accelerator (on a CPU, CPU_ELEMENTS): small inputs (a table, a sentence) run
# all their copies in one forward as captum's defaults do, large ones (images on a CPU) one at a time.
DEVICE_ELEMENTS = 1 << 24


def default_copies(count: int, batch: int, value: Optional[Tensor]) -> int:
    """Copies of a batch per forward when ``batch_size`` is None: all ``count`` copies within an element
    budget (:data:`CPU_ELEMENTS` on a CPU, :data:`DEVICE_ELEMENTS` elsewhere), at least one. ``value``
    is the varying tensor of the whole batch (``[B, ...]``), whose size is what a forward's cost follows."""
    if value is None:
        return max(1, count)
    budget = CPU_ELEMENTS if value.device.type == "cpu" else DEVICE_ELEMENTS
    return max(1, min(count, budget // max(1, value.numel())))


def copies_per_forward(cap: int, batch: int, value: Optional[Tensor]) -> int:
    """Copies of a ``batch`` of ``value`` (``[B, ...]``, the tensor that varies) per forward, for a cap of ``cap``
    examples: ``max(1, cap // batch)``, and on a CPU no more than keep a forward within :data:`CPU_ELEMENTS`
    (never below one copy). It changes results only by floating-point summation order."""
    k = max(1, cap // batch)
    if value is not None and value.device.type == "cpu" and k > 1:
        k = min(k, max(1, CPU_ELEMENTS // max(1, value.numel())))
    return k
