"""``torchex-fn explain --task detection|segmentation``: torchvision detectors and segmenters by name.

``--task classification`` (the default) is :mod:`torchex_fn.cli.explain`'s path. The other two explain
``--image`` files in memory with a torchvision model built by name (random weights, or ``--weights``):

* ``detection`` (Faster R-CNN, Mask R-CNN, Keypoint R-CNN, RetinaNet, FCOS, SSD, SSDlite): the detector runs
  on each image; its boxes scoring above ``--score-threshold`` (at most ``--max-boxes``, highest first, or
  the one of ``--box-index``) are each explained with ``--method`` through
  :func:`torchex_fn.targets.box_score` (``--iou-threshold``), or all at once with ``--method drise``
  (:func:`torchex_fn.drise`). Images are not normalised (the detectors normalise their input themselves)
  and run at ``--size``: the detector's own resize (``min_size`` / ``max_size``, SSD's ``fixed_size``) is
  set to it, and its own score threshold is lowered to ``--score-threshold`` where that is lower.
* ``segmentation`` (DeepLabV3, FCN, LR-ASPP; their ``{"out": ...}`` output): the ImageNet-normalised images
  are explained through :func:`torchex_fn.targets.segmentation` with ``--category`` (an index or a name
  of the weights' categories; default: each image's most predicted category) over ``--region``
  (``predicted``: the pixels predicted as the category, the default; ``all``; or a box ``X1,Y1,X2,Y2``).

Layer methods get a layer per family unless ``--layer`` names one: the last stage of the detector's
backbone body (``backbone.body.layer4``, ``backbone.body.16`` for MobileNet; SSD's ``backbone.features``,
SSDlite's ``backbone.features.1``),
the segmenter's backbone's last stage (``backbone.layer4``, ``backbone.16``). Per image the maps go to
``<stem>_<method>.pt`` (a dict: ``maps`` and the boxes, labels, scores or the category and mask they
explain) and the overlays to PNGs: one per box with the box drawn (``<stem>_<method>_box<k>.png``), or one
with the region's outline (``<stem>_<method>.png``), both in magenta, a colour the jet map never takes.
"""
from __future__ import annotations

import argparse
import difflib
import inspect
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import registry
from ..core import tasks as _tasks
from ..core.model import functionalize
from ..methods.detection import drise
from ..tools import viz
from . import choices, explain
from .explain import TASK_METHODS

__all__ = ["TASKS", "TASK_METHODS", "run", "default_layer", "region_mask", "draw_box", "draw_outline"]

TASKS = ("classification", "detection", "segmentation")
OUTLINE = (255, 0, 255)  # magenta: not a colour of the jet map, so a drawn box or outline stays visible
# Flags that only a task reads, and their defaults (None in the parser, so that a flag given to the wrong
# task can be told from one left out).
_TASK_FLAGS: Dict[str, Dict[str, Any]] = {
    "detection": {"score_threshold": 0.5, "iou_threshold": 0.5, "box_index": None, "max_boxes": 10},
    "segmentation": {"category": None, "region": "predicted"}}
_FAMILY = {"detection": "detector", "segmentation": "segmenter"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run(args: argparse.Namespace) -> int:
    """The ``explain`` subcommand for every ``--task``; returns the exit code."""
    fail, task = args.fail, args.task
    for other, flags in _TASK_FLAGS.items():
        for name, default in flags.items():
            if getattr(args, name) is not None and other != task:
                fail(f"{_flag(name)}: only with --task {other}, got --task {task}")
            if other == task and getattr(args, name) is None:
                setattr(args, name, default)
    if args.method in TASK_METHODS and TASK_METHODS[args.method] != task:
        fail(f"--method: {args.method} explains detections: expected --task {TASK_METHODS[args.method]}, "
             f"got --task {task}")
    if task == "classification":
        return explain.run(args)
    if args.data is not None:
        fail(f"--data: --task {task} explains --image files (one overlay per box or region), got --data")
    if args.image is None:
        fail(f"--image: --task {task} needs image files, got none")
    if args.target is not None:
        what = "the boxes above --score-threshold (or --box-index)" if task == "detection" else "--category"
        fail(f"--target: with --task {task} the target is {what}, not a class index; got --target {args.target}")
    _check_numbers(args)
    method = explain.METHODS.get(args.method)
    if method is not None:
        explain._check_flags(method, args)
    else:
        _check_drise_flags(args)
    name = _model_name(args)
    images = explain._load_images(args.image, args.size, fail)
    model = _model(args, name)
    torch.set_num_threads(args.threads)
    if task == "detection":
        return _detection(args, name, method, model, images)
    return _segmentation(args, name, method, model, images)


def _check_numbers(args: argparse.Namespace) -> None:
    fail = args.fail
    for name in ("score_threshold", "iou_threshold"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value < 1:
            fail(f"{_flag(name)}: expected a number in [0, 1), got {value}")
    if getattr(args, "box_index", None) is not None and args.box_index < 0:
        fail(f"--box-index: expected an index >= 0 (0 is the highest-scoring box), got {args.box_index}")


def _check_drise_flags(args: argparse.Namespace) -> None:
    fail = args.fail
    for flag, value in (("--reshape", args.reshape), ("--features", args.features), ("--layer", args.layer),
                        ("--fc", args.fc)):
        if value is not None:
            fail(f"{flag}: drise takes no such option (it masks the image and needs no layer), got {flag} {value}")
    known = [p for p in inspect.signature(drise).parameters if p not in (
        "model_fn", "params", "x", "boxes", "labels", "num_masks", "generator", "progress")]
    for text in args.option:
        key, _ = explain._parse_option(text, fail)
        if key not in known:
            fail(f"--option: drise has no option {key!r}; its options are {', '.join(known)} (--rise-masks gives "
                 "num_masks, --seed the generator)")


def _model_name(args: argparse.Namespace) -> str:
    """The torchvision name of ``--model``, checked against ``--task`` before anything is built."""
    fail, task = args.fail, args.task
    source, _, name = args.model.partition(":")
    family = _FAMILY[task]
    if source != "torchvision" or not name:
        fail(f"--model: --task {task} expected 'torchvision:<{family}>' (e.g. torchvision:"
             f"{'fasterrcnn_mobilenet_v3_large_fpn' if task == 'detection' else 'deeplabv3_mobilenet_v3_large'}), "
             f"got {args.model!r}")
    try:
        import torchvision
    except ImportError:
        fail(f"--model {args.model} needs torchvision, an optional extra: pip install torchex-fn[vision] "
             "(or pip install torchvision)")
    module = torchvision.models.detection if task == "detection" else torchvision.models.segmentation
    known = torchvision.models.list_models(module=module)
    if name not in known:
        kind = _kind(name)
        if kind is not None:
            fail(f"--model: --task {task} expected a torchvision {family} ({', '.join(known)}), got {args.model}, "
                 f"a {kind}" + (f" (use --task {_task_of(kind)})" if _task_of(kind) else ""))
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; one of {', '.join(known)}"
        fail(f"--model: unknown torchvision {family} {name!r}{hint}")
    return name


def _kind(name: str) -> Optional[str]:
    """What kind of torchvision model ``name`` is (classifier, detector, ...), or None for no model."""
    import torchvision
    kinds = (("detector", torchvision.models.detection), ("segmenter", torchvision.models.segmentation),
             ("video classifier", torchvision.models.video), ("optical-flow model", torchvision.models.optical_flow),
             ("quantized classifier", torchvision.models.quantization), ("classifier", torchvision.models))
    for kind, module in kinds:
        if name in torchvision.models.list_models(module=module):
            return kind
    return None


def _task_of(kind: str) -> Optional[str]:
    return {"detector": "detection", "segmenter": "segmentation", "classifier": "classification"}.get(kind)


def _model(args: argparse.Namespace, name: str) -> torch.nn.Module:
    """The detector or segmenter: random init under ``--seed`` (no pretrained backbone either), ``--num-classes``,
    ``--weights``; a detector set to run at ``--size`` with its score threshold at most ``--score-threshold``."""
    import torchvision
    fail = args.fail
    extra: Dict[str, Any] = {} if args.num_classes is None else {"num_classes": args.num_classes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **extra).eval()
    if args.weights is not None:
        try:
            model.load_state_dict(explain._read_state(args.weights, fail))
        except RuntimeError as err:
            lines = [line.strip() for line in str(err).strip().splitlines()[:3]]
            hint = "" if args.num_classes is not None else \
                "; a checkpoint with another number of classes needs it given: --num-classes N"
            fail(f"--weights: {args.weights!r} does not fit {args.model}: {' '.join(lines)}{hint}")
    if args.task == "detection":
        prepare_detector(model, args.size, args.score_threshold)
    return model


def prepare_detector(model: torch.nn.Module, size: int, score_threshold: float) -> None:
    """Set a torchvision detector to run on ``size x size`` images as they are (its transform's resize is
    then the identity) and to keep boxes scoring above ``min(its own threshold, score_threshold)``."""
    transform = getattr(model, "transform", None)
    if transform is not None:
        if getattr(transform, "fixed_size", None) is not None:   # SSD, SSDlite
            transform.fixed_size = (size, size)
        transform.min_size, transform.max_size = (size,), size
    holder = model.roi_heads if hasattr(getattr(model, "roi_heads", None), "score_thresh") else model
    if hasattr(holder, "score_thresh"):
        holder.score_thresh = min(float(cast(float, holder.score_thresh)), score_threshold)


def default_layer(model: torch.nn.Module) -> Optional[str]:
    """The default layer of a detector or segmenter: its backbone's last stage (a module with one tensor output)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        return None
    body, prefix = (backbone.body, "backbone.body") if isinstance(getattr(backbone, "body", None), torch.nn.Module) \
        else (backbone, "backbone")
    features = getattr(body, "features", None)
    if isinstance(features, torch.nn.Sequential) and len(features):
        if type(body).__name__.startswith("SSDLite"):  # runs its features block by block: the last block
            return f"{prefix}.features.{len(features) - 1}"
        return f"{prefix}.features"                   # SSD's VGG runs them as one module
    children = [n for n, _ in body.named_children()]
    return f"{prefix}.{children[-1]}" if children else None


def _categories(name: str, classes: int) -> Optional[List[str]]:
    """The category names of ``name``'s torchvision weights when the model has that many classes."""
    import torchvision
    try:
        names = torchvision.models.get_model_weights(name).DEFAULT.meta.get("categories")
    except (ValueError, AttributeError, KeyError):
        return None
    return list(names) if isinstance(names, (list, tuple)) and len(names) == classes else None


def _label(names: Optional[List[str]], index: int) -> str:
    return f"{names[index]} ({index})" if names is not None and 0 <= index < len(names) else str(index)


def _options(args: argparse.Namespace, method: Optional[registry.Method], model: torch.nn.Module) -> Dict[str, Any]:
    """The method's keyword options: --layer (default: :func:`default_layer`), --option, --rise-masks, --seed."""
    if method is None:  # drise
        options: Dict[str, Any] = {"num_masks": args.rise_masks, "generator": torch.Generator().manual_seed(args.seed)}
        for text in args.option:
            key, value = explain._parse_option(text, args.fail)
            options[key] = value
        return options
    if args.layer is None and method.layer == "required":
        args.layer = default_layer(model)
    options = explain._method_options(method, args, model)
    if args.reshape is not None and method.takes("reshape"):
        function = choices.reshape_of(args.reshape)
        if function is not None:
            options["reshape"] = function
    return options


def _function(method: Optional[registry.Method], args: argparse.Namespace) -> Callable:
    return drise if method is None else explain._method_function(method, args)


def _forward(args: argparse.Namespace, model_fn: Callable, params: Any, x: Tensor) -> Any:
    """One forward without autograd; a size the model cannot take is the user's mistake."""
    try:
        with torch.no_grad():
            return model_fn(params, x)
    except RuntimeError as err:
        if args.size >= 320:
            raise  # at the size the detectors and segmenters are made for: not the user's mistake
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        args.fail(f"--size {args.size} does not fit {args.model} ({first}); try a larger --size (e.g. 320)")


def _outputs(args: argparse.Namespace) -> Tuple[Path, List[Path]]:
    """The output folder and each image's path relative to the images' common folder."""
    files = [Path(p) for p in args.image]
    root = explain._common_folder(files)
    return Path(args.out), [explain._relative(p, root) for p in files]


def _heat(image: Tensor, maps: Tensor, name: str) -> Tensor:
    """``[H, W, 3]`` uint8: ``maps`` ``[1, C, H, W]`` blended over ``image`` ``[3, H, W]`` as the classification
    overlays are."""
    shown, cmap = explain._display(maps.detach().float(), name)
    return viz.to_uint8(viz.overlay(image[None], shown, cmap=cmap, alpha=0.8 if cmap == "diverging" else 0.5)[0])


def draw_box(rgb: Tensor, box: Sequence[float], color: Sequence[int] = OUTLINE, width: int = 2) -> Tensor:
    """``rgb`` ``[H, W, 3]`` uint8 with the outline of ``box`` ``(x1, y1, x2, y2)`` (pixels, rounded, clipped)
    drawn ``width`` pixels wide inside the box: rows ``y1 .. y1 + width - 1`` and ``y2 - width + 1 .. y2``,
    columns likewise (a new tensor)."""
    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    x1, x2 = max(0, min(x1, w - 1)), max(0, min(x2, w - 1))
    y1, y2 = max(0, min(y1, h - 1)), max(0, min(y2, h - 1))
    edge = torch.zeros(h, w, dtype=torch.bool)
    edge[y1:y2 + 1, x1:min(x1 + width, x2 + 1)] = True
    edge[y1:y2 + 1, max(x2 - width + 1, x1):x2 + 1] = True
    edge[y1:min(y1 + width, y2 + 1), x1:x2 + 1] = True
    edge[max(y2 - width + 1, y1):y2 + 1, x1:x2 + 1] = True
    return _paint(rgb, edge, color)


def outline(mask: Tensor) -> Tensor:
    """The pixels of ``mask`` ``[H, W]`` (bool) with a 4- or 8-neighbour outside it (the image's border does not
    count as outside): the region's outline, one pixel wide."""
    outside = (~mask).float()[None, None]
    near = F.max_pool2d(F.pad(outside, (1, 1, 1, 1), value=0.0), 3, stride=1)[0, 0] > 0
    return mask & near


def draw_outline(rgb: Tensor, mask: Tensor, color: Sequence[int] = OUTLINE) -> Tensor:
    """``rgb`` ``[H, W, 3]`` uint8 with the outline of ``mask`` ``[H, W]`` (see :func:`outline`) painted."""
    return _paint(rgb, outline(mask.bool()), color)


def _paint(rgb: Tensor, where: Tensor, color: Sequence[int]) -> Tensor:
    out = rgb.clone()
    out[where] = torch.tensor(list(color), dtype=torch.uint8)
    return out


def _save_png(rgb: Tensor, path: Path) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", (rgb.shape[1], rgb.shape[0]), bytes(rgb.flatten().tolist())).save(path)


# --------------------------------------------------------------------------------------------
# Detection.

def _detections(args: argparse.Namespace, model_fn: Callable, params: Any, images: Tensor) -> List[Dict[str, Tensor]]:
    """Per image, the boxes to explain (``boxes``, ``labels``, ``scores``, ``index`` into the detector's
    output), highest score first: those above --score-threshold, at most --max-boxes, or the --box-index one."""
    fail, chosen = args.fail, []
    for i in range(images.shape[0]):
        found = _tasks.detections(_forward(args, model_fn, params, images[i:i + 1]), fn="explain")[0]
        boxes, labels, scores = found
        assert scores is not None and scores.ndim == 1
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[scores[order] > args.score_threshold]
        if order.numel() == 0:
            fail(f"--score-threshold: expected a detection scoring above {args.score_threshold} in {args.image[i]}, "
                 "got none; lower --score-threshold (a randomly initialised detector's boxes often score near "
                 "1 / classes)")
        if args.box_index is not None:
            if args.box_index >= order.numel():
                fail(f"--box-index: expected an index below {order.numel()} (the boxes above --score-threshold "
                     f"{args.score_threshold} in {args.image[i]}), got {args.box_index}")
            order = order[args.box_index:args.box_index + 1]
        else:
            order = order[:args.max_boxes]
        chosen.append({"boxes": boxes[order], "labels": labels[order], "scores": scores[order], "index": order})
    return chosen


def _detection(args: argparse.Namespace, name: str, method: Optional[registry.Method], model: torch.nn.Module,
               images: Tensor) -> int:
    fail = args.fail
    model_fn, params = functionalize(model)
    names = _categories(name, _detector_classes(model))
    options = _options(args, method, model)
    chosen = _detections(args, model_fn, params, images)             # every forward before any explanation
    function = _function(method, args)
    out, relative = _outputs(args)
    for i, found in enumerate(chosen):
        x = images[i:i + 1]
        try:
            if method is None:
                maps = function(model_fn, params, x, found["boxes"], found["labels"], **options)[0][:, None]
            else:
                maps = torch.cat([function(model_fn, params, x, _tasks.box_score(
                    found["boxes"][k:k + 1], found["labels"][k:k + 1], iou_threshold=args.iou_threshold), **options)
                    for k in range(found["boxes"].shape[0])])
        except (ValueError, TypeError) as err:  # e.g. an unknown --layer: the library's message says why
            fail(explain._cli_hint(str(err)))
        maps = maps.detach()
        stem = out / relative[i].parent / f"{relative[i].stem}_{args.method}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        saved = stem.parent / f"{stem.name}.pt"                       # (a name may hold dots: no with_suffix)
        torch.save({"maps": maps, **found}, saved)
        for k in range(maps.shape[0]):
            box = found["boxes"][k]
            path = stem.parent / f"{stem.name}_box{k}.png"
            _save_png(draw_box(_heat(images[i], maps[k:k + 1], args.method), box.tolist()), path)
            print(f"wrote {path} ({args.method}, box {k}: {_label(names, int(found['labels'][k]))}, score "
                  f"{float(found['scores'][k]):.3f}, at {[round(float(v), 1) for v in box]})")
        print(f"wrote {saved} (maps {list(maps.shape)}, boxes, labels, scores)")
    explain._warn_random(args)
    return 0


def _detector_classes(model: torch.nn.Module) -> int:
    """The class count of a torchvision detector (its classification layer's outputs), or -1."""
    heads = getattr(model, "roi_heads", None)
    predictor = getattr(heads, "box_predictor", None)
    if isinstance(getattr(predictor, "cls_score", None), torch.nn.Linear):
        return int(predictor.cls_score.out_features)  # type: ignore[union-attr]
    head = getattr(getattr(model, "head", None), "classification_head", None)
    count = getattr(head, "num_classes", getattr(head, "num_columns", None))   # RetinaNet, FCOS; SSD
    return int(count) if isinstance(count, int) else -1


# --------------------------------------------------------------------------------------------
# Segmentation.

def _segmenter_classes(model: torch.nn.Module) -> int:
    """The class count of a torchvision segmenter: the output channels of its classifier's last convolution."""
    convs = [m for m in getattr(model, "classifier", torch.nn.Sequential()).modules() if isinstance(m, torch.nn.Conv2d)]
    return int(convs[-1].out_channels) if convs else -1


def parse_category(text: str, names: Optional[List[str]], classes: int, fail: Callable[[str], None]) -> int:
    """``--category``'s value: an index in ``[0, classes)`` or one of ``names``."""
    if text.isdigit():
        if int(text) < classes:
            return int(text)
        fail(f"--category: expected a category index in [0, {classes}), got {text}")
    if names is not None:
        lower = [n.lower() for n in names]
        if text.lower() in lower:
            return lower.index(text.lower())
        close = difflib.get_close_matches(text.lower(), lower, n=3)
        hint = f"; did you mean {' or '.join(names[lower.index(c)] for c in close)}?" if close else ""
        fail(f"--category: expected a category index in [0, {classes}) or a name ({', '.join(names)}), "
             f"got {text!r}{hint}")
    fail(f"--category: expected a category index in [0, {classes}) (this model's categories have no names), "
         f"got {text!r}")
    raise AssertionError  # fail exits


def region_mask(text: str, size: int, fail: Callable[[str], None]) -> Optional[Tensor]:
    """``--region``'s value: None for ``predicted``, all pixels for ``all``, or the box ``X1,Y1,X2,Y2`` (pixels of
    the ``size x size`` image, ``x1 <= x < x2``, ``y1 <= y < y2``) as a ``[size, size]`` bool mask."""
    if text == "predicted":
        return None
    if text == "all":
        return torch.ones(size, size, dtype=torch.bool)
    parts = text.split(",")
    if len(parts) == 4 and all(p.strip().isdigit() for p in parts):
        x1, y1, x2, y2 = (int(p) for p in parts)
        if x1 < x2 <= size and y1 < y2 <= size:
            mask = torch.zeros(size, size, dtype=torch.bool)
            mask[y1:y2, x1:x2] = True
            return mask
    fail(f"--region: expected predicted, all, or a box X1,Y1,X2,Y2 with 0 <= x1 < x2 <= {size} and "
         f"0 <= y1 < y2 <= {size} (pixels of the --size image), got {text!r}")
    raise AssertionError  # fail exits


def _segmentation(args: argparse.Namespace, name: str, method: Optional[registry.Method], model: torch.nn.Module,
                  images: Tensor) -> int:
    fail = args.fail
    assert method is not None  # run() refused drise here
    classes = _segmenter_classes(model)
    names = _categories(name, classes)
    category = None if args.category is None else parse_category(args.category, names, classes, fail)
    region = region_mask(args.region, args.size, fail)
    x = explain._normalize(images)
    model_fn, params = functionalize(model)
    options = _options(args, method, model)
    out = _forward(args, model_fn, params, x)
    logits = out["out"] if isinstance(out, dict) else out
    predicted = logits.argmax(1)                                           # [B, H, W]
    if category is None:  # each image's most predicted category
        categories = [int(torch.bincount(p.flatten(), minlength=classes).argmax()) for p in predicted]
    else:
        categories = [category] * x.shape[0]
    masks = torch.stack([predicted[b] == c if region is None else region for b, c in enumerate(categories)])
    for b in range(x.shape[0]):
        if not masks[b].any():
            fail(f"--category: no pixel of {args.image[b]} is predicted as {_label(names, categories[b])}; expected "
                 f"a category the model predicts there, or --region all / X1,Y1,X2,Y2")
    target = _tasks.segmentation(torch.tensor(categories), masks)
    try:
        maps = explain._method_function(method, args)(model_fn, params, x, target, **options).detach()
    except (ValueError, TypeError) as err:
        fail(explain._cli_hint(str(err)))
    folder, relative = _outputs(args)
    for b in range(x.shape[0]):
        stem = folder / relative[b].parent / f"{relative[b].stem}_{args.method}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        saved, path = stem.parent / f"{stem.name}.pt", stem.parent / f"{stem.name}.png"
        torch.save({"maps": maps[b:b + 1], "category": categories[b], "mask": masks[b]}, saved)
        _save_png(draw_outline(_heat(images[b], maps[b:b + 1], args.method), masks[b]), path)
        print(f"wrote {path} and {saved} ({args.method}, category "
              f"{_label(names, categories[b])}, region of {int(masks[b].sum())} pixels)")
    explain._warn_random(args)
    return 0
