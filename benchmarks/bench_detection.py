"""Detectors: Grad-CAM with ``tx.targets.box_score`` vs pytorch-grad-cam, and D-RISE vs its bare forwards.

torchvision's fasterrcnn_mobilenet_v3_large_fpn, random weights (the cost does not depend on them), eval
mode, a low score threshold so that boxes exist, CPU. Interleaved round-robin in one process
(``_common.race``), medians, ratios:

* Grad-CAM at ``backbone.body.16`` explaining 3 detected boxes: ``tx.grad_cam`` (the model holds
  torchvision's ``roi_align``, which torch.func refuses: the gradient is torch.autograd's) against
  pytorch-grad-cam 1.5.7's ``GradCAM`` with ``FasterRCNNBoxScoreTarget`` (its whole call, min-max scaled and
  resized maps included) and against the floor: a forward with a hook on the layer and
  ``torch.autograd.grad`` to its output. Goal: ours <= 0.5 x pytorch-grad-cam.
* ``tx.drise`` (N masks, ``batch_size`` masked images per forward) against the floor: the same number of
  forward passes of ``batch_size`` masked images under ``torch.no_grad``. Goal: <= 1.1 x.

Usage::

    .venv/bin/python benchmarks/bench_detection.py                    # 224 x 288, N = 64, 5 rounds
    .venv/bin/python benchmarks/bench_detection.py --size 160 208 --masks 32 --rounds 3
"""
from __future__ import annotations

import argparse
import math

import torch

import _common
import torchex_fn as tx
from torchex_fn.core import random_masks


def _model(height: int, width: int):
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn
    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, min_size=height, max_size=width,
                                              box_score_thresh=0.0)
    with torch.no_grad():
        torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.05)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(224, 288))
    parser.add_argument("--masks", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-cam", action="store_true", help="D-RISE only")
    args = parser.parse_args()
    _common.setup(args.threads)
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    height, width = args.size
    model = _model(height, width)
    layer_name = "backbone.body.16"
    layer = dict(model.named_modules())[layer_name]
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        found = model(x)[0]
    boxes, labels = found["boxes"][:3], found["labels"][:3]
    fn, params = tx.functionalize(model)
    target = tx.targets.box_score(boxes, labels)
    peer = GradCAM(model=model, target_layers=[layer])
    peer_targets = [FasterRCNNBoxScoreTarget(labels, boxes)]

    def floor():
        out, (acts,) = _common.hooked([layer], lambda: model(x))
        return torch.autograd.grad(target(out).sum(), acts)

    cam = {} if args.skip_cam else _common.medians(_common.race({
        "torchex_fn grad_cam": lambda: tx.grad_cam(fn, params, x, target, layer=layer_name),
        "pytorch-grad-cam GradCAM": lambda: peer(input_tensor=x, targets=peer_targets),
        "floor (forward + grad to the layer)": floor,
    }, args.rounds))
    peer.activations_and_grads.release()

    print(_common.machine(args.threads, f"fasterrcnn_mobilenet_v3_large_fpn {height}x{width}, batch 1"))  # noqa: T201
    print()  # noqa: T201
    floor_t = cam.get("floor (forward + grad to the layer)")
    print(_common.table(["Grad-CAM, 3 boxes", "median s", "x floor", "x pytorch-grad-cam"], [  # noqa: T201
        (name, f"{t:.3f}", _common.ratio(t, floor_t), _common.ratio(t, cam["pytorch-grad-cam GradCAM"]))
        for name, t in cam.items()], right=(1, 2, 3)))
    print(flush=True)  # noqa: T201
    n, bs = args.masks, args.batch_size
    # the floor sees the very images drise makes (the same masks, drawn before the timing): a detector's cost
    # depends on what it finds
    make = random_masks.sampler(16, 0.5, (height, width), torch.float32, x.device, torch.Generator().manual_seed(0))
    batches = [x[0] * piece[:, None] for piece in random_masks.pieces(n, bs, make)]

    def bare():
        with torch.no_grad():
            for batch in batches:
                model(batch)

    def drise():
        with torch.no_grad():
            return tx.drise(fn, params, x, boxes, labels, num_masks=n, batch_size=bs,
                            generator=torch.Generator().manual_seed(0))

    rise = _common.medians(_common.race({"torchex_fn drise": drise, "bare forwards": bare}, max(2, args.rounds // 2)))

    forwards = math.ceil(n / bs)
    print(_common.table([f"D-RISE, N = {n}, {forwards} forwards of {bs}", "median s", "x bare forwards"], [  # noqa: T201
        (name, f"{t:.3f}", _common.ratio(t, rise["bare forwards"])) for name, t in rise.items()], right=(1, 2)))


if __name__ == "__main__":
    main()
