"""Command line: ``python -m torchex_fn demo|explain`` (also ``torchex-fn demo|explain``).

This file holds the parser and :func:`main`; each subcommand lives in its own file:

- ``explain`` (:mod:`torchex_fn.cli.explain`) builds a torchvision or timm classifier by name (random weights,
  or a user's state_dict with ``--weights``) and explains image files (``--image``) or a folder or glob
  (``--data``, through ``attribute_dataset`` into a resumable store) with any method of
  :data:`torchex_fn.registry.METHODS` that a command line can run::

    torchex-fn explain --model torchvision:resnet50 --weights resnet50.pt --image cat.jpg \
        --method grad_cam --layer layer4 --target 281 --out maps/
    torchex-fn explain --model timm:vit_small_patch16_224 --weights ft.pt --data val/ --out store/ \
        --method integrated_gradients --option steps=32 --overlays overlays/

  ``explain --task detection|segmentation`` (:mod:`torchex_fn.cli.tasks`) builds a torchvision detector or
  segmenter instead and explains each box above ``--score-threshold`` (``tx.targets.box_score``, or
  ``--method drise``) or a ``--category`` over a ``--region`` (``tx.targets.segmentation``)::

    torchex-fn explain --task detection --model torchvision:fasterrcnn_resnet50_fpn --weights det.pt \
        --image street.jpg --score-threshold 0.7 --out maps/
    torchex-fn explain --task segmentation --model torchvision:deeplabv3_resnet50 --image street.jpg \
        --category person --out maps/

- ``demo`` (:mod:`torchex_fn.cli.demo`) trains (or loads from the cache) a small CNN on the synthetic shapes
  data set, explains a batch of held-out images with several methods, scores them against the ground-truth
  masks and the model, prints a table, and writes ``grid.png`` and ``results.csv`` to ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Optional, Sequence

import torch

from ..data.demo_model import TrainConfig
from . import demo, explain, tasks

__all__ = ["main"]

# Flags that must be >= 1 (--workers must be >= 0), checked after parsing for both subcommands.
_POSITIVE = ("num", "rows", "epochs", "train_size", "rise_masks", "step", "threads", "size", "batch_size",
             "num_classes", "max_boxes")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``torchex-fn: error: <message>``, with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"torchex-fn: error: {_one_line(message)}\n")


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="torchex-fn", description="torchex_fn command line tools.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    d = commands.add_parser("demo", help="train a small CNN on synthetic shapes, explain it, score the methods",
                            description="Train (or load) a small CNN on synthetic shapes, run every attribution "
                                        "method on a batch, and score them against ground-truth masks.")
    d.add_argument("--out", default="torchex_fn_demo", help="output folder (default: ./torchex_fn_demo)")
    d.add_argument("--num", type=int, default=32, help="images to explain (default: 32)")
    d.add_argument("--seed", type=int, default=0, help="seed of the evaluation images and RISE masks (default: 0)")
    d.add_argument("--rows", type=int, default=8, help="examples shown in grid.png (default: 8)")
    d.add_argument("--epochs", type=int, default=_default("epochs"), help="training epochs (default: %(default)s)")
    d.add_argument("--train-size", type=int, default=_default("train_size"),
                   help="training images per epoch (default: %(default)s)")
    d.add_argument("--rise-masks", type=int, default=1000, help="RISE masks, if RISE is installed (default: 1000)")
    d.add_argument("--step", type=int, default=64, help="pixels per deletion/insertion step (default: 64)")
    d.add_argument("--tolerance", type=float, default=4.0,
                   help="pointing game tolerance in pixels (default: 4, TorchRay's 15 px scaled from 224 to 64)")
    d.add_argument("--cache-dir", default=None, help="weight cache folder (default: $TORCHEX_FN_CACHE, "
                                                     "$XDG_CACHE_HOME/torchex_fn or ~/.cache/torchex_fn)")
    d.add_argument("--no-cache", action="store_true", help="always train; read and write no cache")
    d.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; this small CNN gains little from more, and on a "
                        "shared machine extra threads wait on each other)")
    d.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    d.set_defaults(handler=demo.run)

    e = commands.add_parser("explain",
                            help="explain images with a torchvision or timm classifier; write maps, overlays",
                            description="Explain image files (--image, in memory, one overlay PNG each) or a whole "
                                        "folder or glob (--data, through attribute_dataset into a resumable store "
                                        "in --out, overlays optional) with a torchvision or timm classifier (random "
                                        "weights, or your state_dict with --weights).")
    e.add_argument("--model", required=True, help="torchvision:<name> or timm:<name>, e.g. torchvision:resnet50")
    e.add_argument("--weights", default=None,
                   help="state_dict file for the model (torch.save(model.state_dict(), FILE)); a different class "
                        "count is read from it; without it the model is randomly initialised")
    e.add_argument("--num-classes", type=int, default=None,
                   help="classes of the model's head (default: the model's own, or the --weights file's)")
    e.add_argument("--image", nargs="+", default=None, metavar="IMG", help="image files (any format Pillow reads)")
    e.add_argument("--data", default=None, metavar="DIR|GLOB",
                   help="a folder (searched recursively) or a glob ('val/**/*.JPEG') of images, explained into "
                        "--out with attribute_dataset: resumable, and split over processes under torchrun")
    e.add_argument("--task", default="classification", choices=tasks.TASKS,
                   help="classification (default), detection (a torchvision detector: each box above "
                        "--score-threshold is explained through tx.targets.box_score, or with --method drise) or "
                        "segmentation (a torchvision segmenter: --category over --region through "
                        "tx.targets.segmentation); detection and segmentation take --image files")
    e.add_argument("--method", default="grad_cam", type=explain.method_name,
                   choices=explain.MethodChoices(explain.METHODS), metavar="NAME",
                   help="the attribution method (default: grad_cam), one of %(choices)s; with --task detection "
                        "also drise")
    e.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword option of the method, e.g. --option steps=32 --option relu=False (repeatable; "
                        "values are Python literals, else strings)")
    e.add_argument("--layer", default=None,
                   help="layer of layer methods (default, by model family: a ViT's last block's norm1, the last "
                        "stage of timm's feature_info (Swin, ConvNeXt, ResNet, ...), torchvision's layer4 or "
                        "features)")
    e.add_argument("--reshape", default=None, metavar="LAYOUT",
                   help="layout of the layer's output for CAM methods: tokens (tokens:N, N tokens before the patch "
                        "tokens, e.g. tokens:1 for a class token), channels-last ([B, h, w, C], Swin) or none "
                        "([B, C, h, w]); default: read from the layer's output")
    e.add_argument("--features", default=None, metavar="KIND:N",
                   help="feature mask of the feature methods (kernel_shap, lime, feature_ablation, ...): grid:N "
                        "(cells of N x N pixels) or superpixels:N (about N segments per image)")
    e.add_argument("--fc", default=None, help="final linear layer of cam (default: the model's last linear layer)")
    e.add_argument("--target", type=int, default=None, help="class index (default: the predicted class)")
    e.add_argument("--size", type=int, default=224, help="images are resized to SIZE x SIZE (default: 224)")
    e.add_argument("--out", default="torchex_fn_explain",
                   help="output folder: overlays for --image, the attribution store for --data "
                        "(default: ./torchex_fn_explain)")
    e.add_argument("--overlays", default=None, metavar="DIR",
                   help="with --data: also write one overlay PNG per image under DIR, keeping the relative paths")
    e.add_argument("--batch-size", type=int, default=32, help="with --data: images per batch and shard (default: 32)")
    e.add_argument("--workers", type=int, default=0, help="with --data: image-loading worker processes (default: 0)")
    e.add_argument("--score-threshold", type=float, default=None,
                   help="--task detection: explain the boxes scoring above it (default: 0.5; the detector's own "
                        "threshold is lowered to it where higher)")
    e.add_argument("--iou-threshold", type=float, default=None,
                   help="--task detection: a predicted box matches an explained one above this IoU "
                        "(tx.targets.box_score; default: 0.5)")
    e.add_argument("--box-index", type=int, default=None,
                   help="--task detection: explain only this box (0: the highest-scoring box above the threshold)")
    e.add_argument("--max-boxes", type=int, default=None,
                   help="--task detection: explain at most this many boxes per image, highest score first "
                        "(default: 10)")
    e.add_argument("--category", default=None,
                   help="--task segmentation: the category, an index or a name of the weights' categories "
                        "(e.g. person; default: each image's most predicted category)")
    e.add_argument("--region", default=None,
                   help="--task segmentation: predicted (the pixels predicted as --category, default), all, or a "
                        "box X1,Y1,X2,Y2 in pixels of the --size image")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--rise-masks", type=int, default=1000, help="RISE masks (default: 1000)")
    e.add_argument("--seed", type=int, default=0, help="seed of the random init and of generator options (default: 0)")
    e.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()),
                   help="torch CPU threads (default: %(default)s)")
    e.set_defaults(handler=tasks.run, fail=e.error)
    return parser



def _default(field: str):
    """The demo model's default training setting ``field`` (shown in ``demo --help``)."""
    return getattr(TrainConfig(), field)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m torchex_fn`` and the ``torchex-fn`` console script."""
    args = _parser().parse_args(argv)
    for name in _POSITIVE:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            _parser().error(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(args, "workers", 0) < 0:
        _parser().error("--workers must be >= 0")
    try:
        return args.handler(args)
    except (ValueError, TypeError) as err:  # the package's messages for a user's mistake; other errors are bugs
        _parser().error(str(err))


if __name__ == "__main__":
    sys.exit(main())
