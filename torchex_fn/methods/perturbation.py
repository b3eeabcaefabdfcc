"""Forward-only family: attribution by perturbing the input and watching the output (RISE, occlusion)."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from ..core import checks as _checks, inputs as _inputs
from ..core import docs as _docs
from ..core import random_masks as _masks
from ..core import targets as _targets
from ..core.types import ModelFn, Params, Target
from ..core.arguments import check_call

__all__ = ["rise", "occlusion"]

_NORMALIZATIONS = ("paper", "per_pixel")

_TABULAR_HINT = ("RISE's masks are smooth over neighbouring elements; use occlusion(window=1) or a gradient method "
                 "(saliency, integrated_gradients, deeplift).")

# Letters for the grid axes of masks in einsum formulas ("hw" for images, as before sequences and volumes).
_AXES = {1: "t", 2: "hw", 3: "dhw"}


@_docs.fill
def rise(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, num_masks: int = 8000,
         cell_size: int = 7, probability: float = 0.5, batch_size: int = 256,
         generator: Optional[torch.Generator] = None, progress: bool = False,
         score: Optional[Callable[[Tensor], Tensor]] = None, normalization: str = "paper") -> Tensor:
    """RISE: the saliency of a pixel is the mean score of randomly masked inputs that keep it.

    Images ``[B, C, H, W]``, sequences or audio ``[B, C, T]`` and volumes ``[B, C, D, H, W]``:
    the masks have ``x``'s grid (linear, bilinear or trilinear upsampling of a random grid of
    cells, shifted at random along every axis) and are shared by the channels.

    ``N`` random masks ``M_i`` with values in ``[0, 1]`` (see ``cell_size``) dim the input, and the
    model's score of each masked input weights its mask::

        paper:      S = sum_i score(x * M_i) M_i / (N p)
        per_pixel:  S = sum_i score(x * M_i) M_i / sum_i M_i

    Both estimate ``E[score(x * M) | pixel kept]``; they differ in the denominator.
    ``"paper"`` (Petsiuk et al.) divides by the expected mask sum ``N p``; ``"per_pixel"`` divides
    by the masks' actual sum at each pixel, as xplique's ``Rise`` does, which removes the
    sampling noise of the mask density (useful with few masks) and turns a constant score into
    a constant map. Exactly: ``per_pixel = paper * N p / sum_i M_i``. TorchRay's ``rise`` divides
    by ``N`` alone (``p`` times our ``"paper"`` map) and scores with a sigmoid of the output,
    for every class at once; pass ``score=torch.sigmoid`` to score the same way.

    Every image of the batch sees the same masks, so a batch gives the maps of its images one at
    a time under the same seed (up to float rounding). The masks are drawn from ``generator`` in
    fixed blocks of 64 on ``x``'s device, a few at a time, never all ``N`` at once: memory does not
    grow with ``num_masks``, and neither ``batch_size`` nor the number of images changes which
    masks a seed gives.

    Autograd is left as the caller has it: with ``params`` and ``x`` not requiring gradients (the
    usual case, ``functionalize`` detaches ``params``) no graph is recorded. If they require
    gradients, or under ``torch.func.grad``, the map is a differentiable function of them, but
    every forward pass is kept for the backward, so memory then grows with ``num_masks``; wrap the
    call in ``torch.no_grad()`` when no gradient is wanted.

    Args:
      {model_fn}
      {params}
      x: A batch ``[B, C, *grid]`` with 1 to 3 grid axes, floating point: images ``[B, C, H, W]``,
        sequences ``[B, C, T]``, volumes ``[B, C, D, H, W]``. The masks multiply it, so masked
        pixels become 0 (the mean colour for normalised images). Or a dict of named inputs batch
        first (e.g. ``{"pixel_values": ...}`` for a HuggingFace ViT): the masks multiply its one
        floating-point entry, which must be ``[B, C, *grid]``; every other entry (integer or
        non-tensor) goes with its example into each masked batch. Tabular ``[B, F]`` is refused
        (features have no neighbours for smooth masks: use :func:`occlusion` with ``window=1``).
      target: ``None`` (the class that ``score(model(x))`` ranks first for the unmasked image:
        one extra forward pass over ``x``), an int, ``[B]`` ints (these index the tensor that
        ``functionalize(model, output=)`` chooses from a structured output), or a callable
        ``out -> [g]`` that receives the model's raw output for the ``g`` images of one chunk
        under one mask at a time, in ``x``'s order (so it may close over per-example data).
      num_masks: ``N``, the number of masks. Default: 8000 (the paper's).
      cell_size: The grid has ``cell_size`` cells along every axis (``s`` in the paper; for images
        each cell covers ``ceil(H / cell_size) x ceil(W / cell_size)`` pixels before the random
        shift; ``cell_size ** 3`` cells for volumes). Default: 7.
      probability: ``p``, the chance that a cell is kept (1). Default: 0.5.
      batch_size: Memory cap: the most masked images in one forward pass. With ``B`` images,
        a forward holds ``max(1, batch_size // B)`` masks times all ``B`` images, or, when
        ``B > batch_size``, one mask times ``batch_size`` images. It never changes the masks, only
        the grouping of the work (results agree up to float rounding). Default: 256.
      generator: The source of the masks; the same seed gives the same map, bit for bit, on the
        same device and with the same ``batch_size`` and batch. ``None`` draws from the global
        generator of ``x``'s device. Default: None.
      progress: Show a tqdm bar over the masks. Default: False.
      score: A transform of the model output (of the tensor ``output=`` chooses, for index
        targets; of the raw output for a callable target) before ``target`` picks a value (e.g.
        ``torch.sigmoid`` for multi-label models, ``lambda out: out`` for logits). ``None`` (the
        paper): ``softmax(out, dim=1)`` for None / int / tensor targets, and the raw output for a
        callable target, which then is the whole score (e.g. ``tx.targets.prob(3)``). Default: None.
      normalization: ``"paper"`` (divide by ``N p``) or ``"per_pixel"`` (divide by the masks' sum
        at each pixel; pixels that no mask kept get 0). Default: ``"paper"``.

    Returns:
      Maps ``[B, 1, *grid]`` (``[B, 1, H, W]`` for images), on ``x``'s device and of ``x``'s dtype
      (masks and sums in at least float32, so bfloat16 and float16 maps are rounded only once).

    Raises:
      ValueError: ``rise: expected probability in (0, 1], got float 0.0.``; ``num_masks``,
        ``cell_size`` or ``batch_size`` below 1; ``x`` not of rank 3, 4 or 5 or with NaN; a generator on
        another device; an unknown ``normalization``; a target out of range (after the first
        forward pass, before the others).
      TypeError: integer images, a non-``torch.Generator`` generator, a bad target, score or
        option type.

    Example:
      >>> fn, params = functionalize(resnet.eval())
      >>> g = torch.Generator().manual_seed(0)
      >>> rise(fn, params, images, labels, generator=g).shape      # [8, 3, 224, 224] -> [8, 1, 224, 224]
      >>> rise(fn, params, images, normalization="per_pixel", num_masks=2000, batch_size=64)
      >>> # under vmap the masks come from the generator, drawn once for every member (vmap's default
      >>> # randomness works; randomness="different" with a generator is refused):
      >>> torch.func.vmap(lambda p: rise(fn, p, images, labels, generator=torch.Generator().manual_seed(0)),
      ...                 )(stacked)                                   # ensemble [E, 8, 1, 224, 224]
      >>> rise(fn1d, params1d, audio, labels, cell_size=16, generator=g).shape  # [8, 2, 16000] -> [8, 1, 16000]

    Cost: ``ceil(N / max(1, batch_size // B))`` forward passes of up to ``batch_size`` images (for
    ``B <= batch_size``), plus ``ceil(B / batch_size)`` for ``target=None``; no backward. Memory:
    one forward of ``batch_size`` images plus ``batch_size + 64`` masks ``[*grid]`` and the ``B``
    maps, whatever ``num_masks`` is (without autograd, see above).
    References: Petsiuk, Das and Saenko, "RISE: Randomized Input Sampling for Explanation of
    Black-box Models", BMVC 2018.
    """
    fn = "rise"
    target = check_call(fn, model_fn, params, x, target, min_ndim=1, layer_option=False)
    key, value = _inputs.perturbed_entry(fn, x)
    if key is not None:
        _checks.check_input(fn, value, name=f"x[{key!r}]")
    _checks.check_grid_rank(fn, value, name="x" if key is None else f"x[{key!r}]", tabular_hint=_TABULAR_HINT)
    _masks.check_options(fn, value, num_masks, cell_size, batch_size, probability, generator, progress)
    _checks.check_optional_callable(fn, "score", score)
    if normalization not in _NORMALIZATIONS:
        raise _checks.value_error(fn, f"normalization in {_NORMALIZATIONS}", _checks.describe(normalization))

    batch, grid = value.shape[0], tuple(value.shape[2:])
    output = _targets.selector(model_fn)
    by_index = not _targets.is_callable(target)
    if by_index:  # score the tensor that functionalize's output= chooses (softmax by default)
        transform = score if score is not None else (lambda out: torch.softmax(out, dim=1))

        def scored(out: Any) -> Any:
            return transform(_targets.select_output(out, output, fn=fn))
    else:  # a callable target is the whole score, on the raw output (after ``score``, if given)
        def scored(out: Any) -> Any:
            return score(out) if score is not None else out
    # Masks per forward, and groups of images: each forward holds at most max(batch_size, 1) images.
    per_forward = max(1, batch_size // batch)
    groups = [(start, min(start + batch_size, batch)) for start in range(0, batch, batch_size)]

    index: Optional[Tensor] = None
    if target is None:  # the predicted class of the unmasked images, chunk by chunk
        index = torch.cat([_targets.resolve_index(scored(model_fn(params, _inputs.take(x, g0, g1))), None, fn=fn)
                           for g0, g1 in groups])

    acc_dtype = torch.promote_types(value.dtype, torch.float32)
    make = _masks.sampler(cell_size, probability, grid, acc_dtype, value.device, generator)
    axes = _AXES[len(grid)]

    def draw(count: int) -> Tensor:
        with _checks.draws(fn, generator):      # under vmap: every member gets the generator's masks
            return make(count)

    sums: List[Any] = [None] * len(groups)
    mask_sum: Any = None
    # no bar object at all without progress: torch.compile cannot trace tqdm (a graph break)
    with tqdm(total=num_masks, desc=fn, unit="mask") if progress else contextlib.nullcontext() as bar:
        for masks in _masks.pieces(num_masks, per_forward, draw):            # [m, *grid]
            m = masks.shape[0]
            for gi, (g0, g1) in enumerate(groups):
                size = g1 - g0
                # mask after mask, each over all examples of the group: [m * g, C, *grid]
                masked = (value[g0:g1][None] * masks[:, None, None].to(value.dtype)).flatten(0, 1)
                out = scored(model_fn(params, _inputs.rows_with(x, key, g0, g1, m, masked)))
                if not by_index:
                    scores = _targets.resolve(out, _targets.for_blocks(target, m, size), fn=fn)
                else:
                    if index is None:  # an int / tensor target, checked against the first output
                        probe = out[:1].expand(batch, *out.shape[1:]) if out.ndim == 2 else out
                        index = _targets.resolve_index(probe, target, fn=fn)
                    scores = out.gather(1, index[g0:g1].repeat(m)[:, None]).squeeze(1)
                contribution = torch.einsum(f"mg,m{axes}->g{axes}", scores.reshape(m, size).to(acc_dtype), masks)
                sums[gi] = contribution if sums[gi] is None else sums[gi] + contribution
            if normalization == "per_pixel":
                piece_sum = masks.sum(dim=0)
                mask_sum = piece_sum if mask_sum is None else mask_sum + piece_sum
            if bar is not None:
                bar.update(m)

    total = torch.cat(sums)                                                  # [B, *grid]
    if normalization == "paper":
        maps = total / (num_masks * probability)
    else:
        maps = total / mask_sum.clamp_min(torch.finfo(acc_dtype).tiny)
    return maps.unsqueeze(1).to(value.dtype)


# --------------------------------------------------------------------------------------------
# Occlusion.

def _check_sizes(fn: str, name: str, value: Any, rank: int) -> Tuple[int, ...]:
    """``value`` (an int or a tuple of ``rank`` positive ints) as a tuple of ints; an int is not expanded here."""
    if isinstance(value, (tuple, list)) and len(value) == rank and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        if min(value) < 1:
            raise _checks.value_error(fn, f"{name} >= 1 in every dimension", f"{tuple(value)}")
        return tuple(value)
    raise _checks.type_error(fn, f"{name}, an int or a tuple of {rank} ints (one per dimension of an example)",
                             _checks.describe(value) if not isinstance(value, (tuple, list)) else f"{tuple(value)}")


def _as_window(fn: str, name: str, value: Any, shape: Tuple[int, ...], *, whole_first: bool) -> Tuple[int, ...]:
    rank = len(shape)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise _checks.value_error(fn, f"{name} >= 1", _checks.describe(value))
        if whole_first and rank >= 2:  # an int window spans every channel and is square over the rest
            return (shape[0],) + (value,) * (rank - 1)
        return (value,) * rank
    return _check_sizes(fn, name, value, rank)


def _starts(size: int, window: int, stride: int) -> List[int]:
    """Window starts along one dimension: ``0, s, 2s, ...`` until a window reaches the end.

    The last window may be cut short by the end of the dimension (as in captum's ``Occlusion``).
    """
    return [k * stride for k in range(math.ceil((size - window) / stride) + 1)]


def _cover(size: int, window: int, stride: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[K, size]`` 0/1 matrix: row ``k`` marks the elements that the ``k``-th window covers."""
    starts = torch.tensor(_starts(size, window, stride)).to(device, non_blocking=True)[:, None]  # no wait
    pos = torch.arange(size, device=device)[None]
    return ((pos >= starts) & (pos < starts + window)).to(dtype)


@_docs.fill
def occlusion(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, window: Any = 8,
              stride: Any = None, baseline: Any = 0.0, batch_size: int = 64) -> Tensor:
    """Occlusion: the drop of the score when a sliding window of the input is replaced by a baseline.

    A window of shape ``window`` slides over each example ``[*input]`` (e.g. ``[C, H, W]``) with
    steps ``stride``, starting at 0 in every dimension and stopping once a window reaches the end
    (the last window of a dimension may stick out and is then cut off). For every position ``n``
    the covered elements are set to the baseline, giving ``x_n = x * (1 - M_n) + baseline * M_n``,
    and every element gets the mean of ``score(x) - score(x_n)`` over the windows that cover it::

        A = sum_n (score(x) - score(x_n)) M_n / sum_n M_n

    This is the definition of captum's ``Occlusion`` (``sliding_window_shapes``, ``strides``,
    ``baselines``), which returns float32 whatever the input's dtype; this function keeps ``x``'s
    dtype. The masks are separable, so the sums are taken one dimension at a time and no mask
    of the whole input is kept beyond the forward batch being built.

    Autograd is left as the caller has it (no backward pass is made): the map is an ordinary
    differentiable function of ``params``, ``x`` and ``baseline`` (a.e.; see ``target``), and it
    works under ``torch.func.vmap`` and ``torch.func.grad``. Wrap the call in ``torch.no_grad()``
    when ``params`` require gradients but none is wanted: every forward pass is kept otherwise.

    Args:
      {model_fn}
      {params}
      x: A batch ``[B, *input]``, floating point, or a dict of named inputs batch first (e.g.
        ``{"pixel_values": ..., "attention_mask": ...}``): the windows slide over its one
        floating-point entry (the one float tensor of the dict; a dict with none or several is an
        error), and every other entry goes with its example into each occluded batch.
      target: ``None`` (the class the model ranks first for the unoccluded input), an int, ``[B]``
        ints (these index the tensor that ``functionalize(model, output=)`` chooses from a
        structured output such as a HuggingFace ``ModelOutput``), or a callable ``out -> [g]``
        that receives the model's raw output for the ``g`` examples of one chunk under one window
        position at a time, in ``x``'s order (so it may close over per-example data).
      window: The window's shape, a tuple with one size per dimension of an example, or an int
        ``k``: ``(C, k, k, ...)`` for examples of rank >= 2 (all channels, ``k`` along the others),
        ``(k,)`` for rank 1. Default: 8 (``(3, 8, 8)`` for RGB images).
      stride: The steps, an int for every dimension or a tuple with one per dimension, each at most
        the window's size where the window is shorter than the input (so that every element is
        covered). ``None`` takes the window's shape (non-overlapping tiles; captum's default is 1,
        which costs one forward pass per position). Default: None.
      baseline: The value of occluded elements: a float, or a tensor broadcastable to
        ``[B, *input]``. Default: 0.0.
      batch_size: Memory cap: the most occluded examples in one forward pass. With ``B`` examples,
        a forward holds ``max(1, batch_size // B)`` windows times all ``B`` examples, or, when
        ``B > batch_size``, one window times ``batch_size`` examples. It changes only the grouping
        (results agree up to float rounding). Default: 64.

    Returns:
      ``[B, *input]`` attributions on ``x``'s device and dtype (of the floating-point entry's shape
      for a dict ``x``).

    Raises:
      ValueError: ``occlusion: expected window no larger than an example [3, 8, 8], got ...``;
        a stride or window size below 1; a stride larger than the window where the window is
        shorter than the input; ``batch_size`` below 1; NaN in ``x`` or ``baseline``; a target out
        of range (after the first forward pass).
      TypeError: integer ``x`` or ``baseline``, a window or stride that is neither an int nor a
        tuple of ints of the example's rank, a bad target type.

    Example:
      >>> fn, params = functionalize(resnet.eval())
      >>> occlusion(fn, params, images, labels, window=16, stride=8).shape   # [8, 3, 224, 224] -> same
      >>> occlusion(fn, params, images, labels, window=(1, 15, 15), stride=(1, 8, 8), baseline=0.5)

    Cost: ``P = prod_d (ceil((size_d - window_d) / stride_d) + 1)`` occluded forwards per example,
    in ``ceil(P / max(1, batch_size // B))`` forward passes of up to ``max(batch_size, B)`` examples
    (for ``B <= batch_size``), plus one forward of ``x``; no backward. Memory: one forward batch
    and ``B * P`` scores.

    References:
      Zeiler and Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014.
    """
    fn = "occlusion"
    target = check_call(fn, model_fn, params, x, target, layer_option=False)
    key, value = _inputs.perturbed_entry(fn, x)
    if value.is_complex():
        raise _checks.type_error(fn, "x of a real floating-point dtype", _checks.describe(value))
    base = _inputs.check_baseline(fn, baseline, value)
    _checks.check_positive_int(fn, "batch_size", batch_size)
    shape = tuple(value.shape[1:])
    win = _as_window(fn, "window", window, shape, whole_first=True)
    steps = win if stride is None else _as_window(fn, "stride", stride, shape, whole_first=False)
    if any(w > s for w, s in zip(win, shape)):
        raise _checks.value_error(fn, f"window no larger than an example {list(shape)}", f"{list(win)}",
                                  "Shrink the window or pass it per dimension.")
    if any(st > w and w < s for st, w, s in zip(steps, win, shape)):
        raise _checks.value_error(fn, f"stride at most the window {list(win)} where it is shorter than the input",
                                  f"{list(steps)}", "Larger steps would leave elements that no window covers.")

    batch = value.shape[0]
    device = value.device
    output = _targets.selector(model_fn)
    counts = [len(_starts(s, w, st)) for s, w, st in zip(shape, win, steps)]
    positions = math.prod(counts)
    by_index = not _targets.is_callable(target)
    per_forward = max(1, batch_size // batch)
    groups = [(start, min(start + batch_size, batch)) for start in range(0, batch, batch_size)]
    acc_dtype = torch.promote_types(value.dtype, torch.float32)
    covers = [_cover(s, w, st, acc_dtype, device) for s, w, st in zip(shape, win, steps)]  # [K_d, size_d]

    def masks_of(first: int, last: int) -> Tensor:
        """Masks ``[last - first, *input]`` of the windows numbered ``first .. last - 1`` (row-major)."""
        index = torch.arange(first, last, device=device)
        mask: Any = None
        for d in range(len(shape)):
            stride_d = math.prod(counts[d + 1:])
            rows = covers[d][(index // stride_d) % counts[d]]                       # [m, size_d]
            rows = rows.reshape(rows.shape[0], *([1] * d), shape[d], *([1] * (len(shape) - d - 1)))
            mask = rows if mask is None else mask * rows
        return mask.expand(last - first, *shape)

    # Scores of the unoccluded examples, chunk by chunk (any output structure; see targets.resolve).
    indices: List[Tensor] = []
    references: List[Tensor] = []
    for g0, g1 in groups:
        out = model_fn(params, _inputs.take(x, g0, g1))
        if by_index:
            chosen = _targets.select_output(out, output, fn=fn)
            g_index = _targets.resolve_index(chosen, _targets.for_rows(target, batch, g0, g1), fn=fn)
            indices.append(g_index)
            references.append(chosen.gather(1, g_index[:, None]).squeeze(1))
        else:
            references.append(_targets.resolve(out, target, fn=fn))

    drops: List[List[Tensor]] = [[] for _ in groups]
    for first in range(0, positions, per_forward):
        last = min(first + per_forward, positions)
        m = last - first
        mask = masks_of(first, last).to(value.dtype)[:, None]                        # [m, 1, *input]
        for gi, (g0, g1) in enumerate(groups):
            size = g1 - g0
            vs = value[g0:g1][None]
            bs = base.expand(value.shape)[g0:g1][None] if base.ndim == value.ndim else base
            occluded = (vs * (1 - mask) + bs * mask).flatten(0, 1)                      # [m * g, *input]
            out = model_fn(params, _inputs.rows_with(x, key, g0, g1, m, occluded))
            if by_index:
                chosen = _targets.select_output(out, output, fn=fn)
                scores = chosen.gather(1, indices[gi].repeat(m)[:, None]).squeeze(1)
            else:
                scores = _targets.resolve(out, _targets.for_blocks(target, m, size), fn=fn)
            drops[gi].append(references[gi][:, None] - scores.reshape(m, size).T)
    diff = torch.cat([torch.cat(d, dim=1) for d in drops]).to(acc_dtype)              # [B, P]
    total = diff.reshape(batch, *counts)
    weight: Any = None
    for d, cover in enumerate(covers):                          # contract window index d with cover d
        total = torch.tensordot(total, cover, dims=([1], [0]))  # the window axis moves to the end
        per_dim = cover.sum(0).reshape(*([1] * d), shape[d], *([1] * (len(shape) - d - 1)))
        weight = per_dim if weight is None else weight * per_dim
    return (total / weight).to(value.dtype)
