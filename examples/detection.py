"""Explain a detector's boxes: Grad-CAM through ``tx.targets.box_score`` and D-RISE, then the same from the command
line (``torchex-fn explain --task detection``), whose maps equal the Python ones.

torchvision's Faster R-CNN MobileNetV3-FPN with random weights (no download), on a generated 96 x 96 picture
(two bright rectangles on noise): it runs in seconds on a CPU. A randomly initialised detector scores every box
near 1 / 91, so its own score threshold is set to 0 here (``--score-threshold 0`` on the command line); with
your trained detector, load its weights and keep a real threshold.

Writes ``detection.png`` (per box: Grad-CAM, D-RISE, box drawn) and the command line's overlays and maps under
``--out``.

Usage:
  python examples/detection.py [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import Tensor

import torchex_fn as tx
from torchex_fn.__main__ import main as command_line

NAME = "fasterrcnn_mobilenet_v3_large_fpn"
SIZE = 96
BOXES = 2


def picture() -> Tensor:
    """``[1, 3, 96, 96]`` in [0, 1], multiples of 1/255 (so the PNG the command line reads holds it exactly)."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 80, (3, SIZE, SIZE), generator=g)
    image[:, 20:60, 10:40] = torch.tensor([230, 200, 40]).view(3, 1, 1)
    image[:, 50:85, 55:90] = torch.tensor([40, 120, 230]).view(3, 1, 1)
    return image[None].float() / 255


def detector() -> torch.nn.Module:
    """The detector as the command line builds it: random init under seed 0 (backbone too), run at 96 px."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.get_model(NAME, weights=None, weights_backbone=None).eval()
    model.transform.min_size, model.transform.max_size = (SIZE,), SIZE   # the input's own size: no resize
    model.roi_heads.score_thresh = 0.0
    return model


def draw_box(image: Tensor, box: Tensor) -> Tensor:
    """``image`` ``[3, H, W]`` with ``box`` outlined in magenta, 1 pixel wide."""
    x1, y1, x2, y2 = (min(max(int(round(float(v))), 0), SIZE - 1) for v in box)
    out = image.clone()
    magenta = torch.tensor([1.0, 0.0, 1.0]).view(3, 1)
    out[:, y1, x1:x2 + 1] = out[:, y2, x1:x2 + 1] = magenta
    out[:, y1:y2 + 1, x1] = out[:, y1:y2 + 1, x2] = magenta
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="detection_example", help="output folder (default: ./detection_example)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.perf_counter()

    x = picture()
    model = detector()
    model_fn, params = tx.functionalize(model)
    with torch.no_grad():
        found = model(x)[0]                                  # boxes [N, 4] (x1, y1, x2, y2), labels, scores
    boxes, labels = found["boxes"][:BOXES], found["labels"][:BOXES]
    # Grad-CAM of each box: the target is the summed IoU + score of the predicted boxes matching it (signed maps,
    # relu=False: a random detector's maps are often negative everywhere)
    cams = torch.cat([tx.grad_cam(model_fn, params, x, tx.targets.box_score(boxes[k:k + 1], labels[k:k + 1]),
                                  layer="backbone.body.16", relu=False) for k in range(BOXES)])   # [K, 1, H, W]
    # D-RISE: all boxes from the same masked forwards, no gradients
    drise = tx.drise(model_fn, params, x, boxes, labels, num_masks=32, cell_size=8,
                     generator=torch.Generator().manual_seed(0))[0][:, None]             # [K, 1, H, W]
    rows = [[draw_box(x[0], boxes[k]), draw_box(tx.viz.overlay(x[0], cams[k]), boxes[k]),
             draw_box(tx.viz.overlay(x[0], drise[k]), boxes[k])] for k in range(BOXES)]
    grid = tx.viz.save_grid(rows, out / "detection.png", titles=["box", "Grad-CAM", "D-RISE"])
    print(f"Python: {BOXES} boxes, scores {[round(float(s), 4) for s in found['scores'][:BOXES]]}; wrote {grid}")

    # the same from the command line: it reads the picture from a PNG and writes maps and overlays
    image = out / "picture.png"
    tx.viz.save_grid([[x[0]]], image, scale=1, pad=0)
    common = ["explain", "--task", "detection", "--model", f"torchvision:{NAME}", "--image", str(image),
              "--size", str(SIZE), "--score-threshold", "0", "--max-boxes", str(BOXES), "--out", str(out / "cli"),
              "--threads", "1"]
    command_line(common + ["--option", "relu=False"])      # signed: a random detector's ReLU'd maps can be all 0
    command_line(common + ["--method", "drise", "--rise-masks", "32", "--option", "cell_size=8"])
    for name, mine in (("grad_cam", cams), ("drise", drise)):
        written = torch.load(out / "cli" / f"picture_{name}.pt")
        gap = float((written["maps"] - mine).abs().max() / mine.abs().max())
        print(f"command line {name}: maps {list(written['maps'].shape)}, largest difference to Python {gap:.1e} "
              "of the largest value")
        assert gap <= 1e-5
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
