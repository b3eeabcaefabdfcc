"""Explanations of object detectors that need no gradient: D-RISE.

Gradient methods explain a detection through the target ``tx.targets.box_score`` (any method, e.g.
``tx.grad_cam(fn, params, x, tx.targets.box_score(boxes, labels), layer=...)``); a model with
torchvision's ``roi_align`` is differentiated with torch.autograd (``core/autodiff.py``).
"""
from __future__ import annotations

import contextlib
from typing import Any, List, Optional

import torch
from torch import Tensor
from tqdm import tqdm

from ..core import checks as _checks
from ..core import docs as _docs
from ..core import random_masks as _masks
from ..core import tasks as _tasks
from ..core.arguments import check_call
from ..core.types import ModelFn, Params

__all__ = ["drise"]


def _boxes_per_example(fn: str, boxes: Any, labels: Any, batch: int, box_format: str) -> tuple:
    """The given boxes as ``[B, K, 4]`` (xyxy) and labels ``[B, K]``: every example explains ``K`` detections."""
    given, classes = _tasks.given_boxes(fn, boxes, labels)
    if isinstance(given, list):
        sizes = {b.shape[0] for b in given}
        if len(given) != batch or len(sizes) != 1:
            raise _checks.value_error(fn, f"boxes for the {batch} examples, the same number K for each (the maps are "
                                      "[B, K, H, W])", f"{len(given)} examples with {sorted(sizes)} boxes",
                                      "Call drise once per image when the numbers differ.")
        given_t, classes_t = torch.stack(given), torch.stack(classes)  # type: ignore[arg-type]
    elif given.ndim == 3:
        if given.shape[0] != batch:
            raise _checks.value_error(fn, f"boxes [B, K, 4] with B = {batch}", _checks.describe(given))
        given_t, classes_t = given, classes  # type: ignore[assignment]
    else:
        given_t, classes_t = given.expand(batch, *given.shape), classes.expand(batch, *classes.shape)  # type: ignore
    if given_t.shape[1] == 0:
        raise _checks.value_error(fn, "at least one box to explain", _checks.describe(given_t))
    return _tasks.to_xyxy(given_t, box_format), classes_t


@_docs.fill
def drise(model_fn: ModelFn, params: Params, x: Tensor, boxes: Any, labels: Any, *, num_masks: int = 5000,
          cell_size: int = 16, probability: float = 0.5, batch_size: int = 32,
          generator: Optional[torch.Generator] = None, box_format: str = "xyxy", progress: bool = False) -> Tensor:
    """D-RISE: the saliency of a pixel for a detection is the mean similarity, over random masks that keep it,
    of the masked image's detections to that detection.

    ``N`` random masks ``M_i`` (RISE's, the same draws as :func:`rise` for a seed) dim the image; the
    detector runs on each masked image, and every given detection ``d_k`` weights the mask by its
    similarity to the best-matching detection found there::

        w_ik = max_j IoU(box_k, box_ij) * cos(P_k, P_ij) * O_ij        S_k = sum_i w_ik M_i / (N p)

    With torchvision's detectors (a label and a score per box) the class vectors are one-hot, so the
    cosine is 1 for the same label and 0 otherwise, and ``O_ij`` is the box's score; with a raw
    YOLO-style output ``[B, N, 4 + classes]`` ``P_ij`` is the box's class scores and ``O_ij = 1``.
    All given detections of an image are explained by the same forward passes.

    Autograd is left as the caller has it (nothing is recorded for ``params`` from ``functionalize``
    and an ``x`` that does not require gradients); the model runs on at most ``batch_size`` masked
    images at a time, and memory does not grow with ``num_masks``.

    Args:
      model_fn: Pure ``(params, x) -> out`` of a detector in eval mode, e.g. from ``functionalize(net)``:
        torchvision's Faster R-CNN, RetinaNet, FCOS, SSD (a list of dicts with ``boxes``, ``labels``,
        ``scores``), or a model with a raw output ``[B, N, 4 + classes]``.
      {params}
      x: Images ``[B, C, H, W]``, floating point (masked pixels become 0).
      boxes: The detections to explain, ``(x1, y1, x2, y2)`` in ``x``'s pixels: ``[K, 4]`` for every
        image, ``[B, K, 4]``, or a list of ``B`` tensors ``[K, 4]`` (the same ``K``).
      labels: Their classes, integer: ``[K]``, ``[B, K]`` or a list like ``boxes``.
      num_masks: ``N``. Default: 5000 (the paper's).
      cell_size: Cells per axis of a mask's grid (``s``; the paper's is 16). Default: 16.
      probability: ``p``, the chance that a cell is kept. Default: 0.5.
      batch_size: Memory cap: the most masked images in one forward pass (``max(1, batch_size // B)``
        masks times the ``B`` images, or one mask times ``batch_size`` images when ``B`` is larger). It
        never changes the masks. Default: 32.
      generator: The source of the masks, on ``x``'s device; the same seed gives the same masks as
        :func:`rise` with the same ``cell_size`` and ``probability``. ``None`` draws from the global
        generator. Default: None.
      box_format: ``"xyxy"`` or ``"cxcywh"``, for the given boxes and a raw output's boxes. Default: ``"xyxy"``.
      progress: Show a tqdm bar over the masks. Default: False.

    Returns:
      Maps ``[B, K, H, W]``, one per given detection, of ``x``'s dtype (sums in at least float32).

    Raises:
      ValueError: ``x`` not ``[B, C, H, W]``; boxes not ``[K, 4]`` / ``[B, K, 4]``, labels of another
        shape; ``num_masks``, ``cell_size`` or ``batch_size`` below 1; ``probability`` outside ``(0, 1]``;
        an output that is not a detector's.
      TypeError: a bad option type, integer images.

    Example:
      >>> fn, params = tx.functionalize(fasterrcnn.eval())
      >>> top = {k: v[:5] for k, v in fasterrcnn(image)[0].items()}       # image [1, 3, H, W]
      >>> maps = tx.drise(fn, params, image, top["boxes"], top["labels"], num_masks=1000,
      ...                 generator=torch.Generator().manual_seed(0))      # [1, 5, H, W]

    Cost: ``ceil(N / max(1, batch_size // B))`` forward passes of up to ``batch_size`` images; no
    backward. Memory: one forward of ``batch_size`` images, ``batch_size + 64`` masks ``[H, W]`` and
    the ``B K`` maps.
    References: Petsiuk, Ma, Bargal, Zhang, Saenko et al., "Black-box Explanation of Object Detectors
    via Saliency Maps", CVPR 2021.
    """
    fn = "drise"
    check_call(fn, model_fn, params, x, None, ndim=4, layer_option=False)
    _masks.check_options(fn, x, num_masks, cell_size, batch_size, probability, generator, progress)
    _tasks.check_box_format(fn, box_format)
    batch, grid = x.shape[0], tuple(x.shape[2:])
    given, classes = _boxes_per_example(fn, boxes, labels, batch, box_format)
    k = given.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)
    make = _masks.sampler(cell_size, probability, grid, acc, x.device, generator)
    per_forward = max(1, batch_size // batch)
    groups = [(start, min(start + batch_size, batch)) for start in range(0, batch, batch_size)]
    sums: List[Any] = [None] * len(groups)
    with tqdm(total=num_masks, desc=fn, unit="mask") if progress else contextlib.nullcontext() as bar:
        for masks in _masks.pieces(num_masks, per_forward, make):            # [m, H, W]
            m = masks.shape[0]
            for gi, (g0, g1) in enumerate(groups):
                size = g1 - g0
                masked = (x[g0:g1][None] * masks[:, None, None].to(x.dtype)).flatten(0, 1)   # mask after mask
                found = _tasks.detections(model_fn(params, masked), fn=fn, box_format=box_format)
                if len(found) != m * size:
                    raise _checks.value_error(fn, f"the detector to return one result per image ({m * size})",
                                              f"{len(found)}")
                weights = torch.stack([_tasks.best_match(found[i], given[g0 + i % size], classes[g0 + i % size])
                                       for i in range(m * size)]).reshape(m, size, k).to(acc)
                part = torch.einsum("mgk,mhw->gkhw", weights, masks)
                sums[gi] = part if sums[gi] is None else sums[gi] + part
            if bar is not None:
                bar.update(m)
    return (torch.cat(sums) / (num_masks * probability)).to(x.dtype)


