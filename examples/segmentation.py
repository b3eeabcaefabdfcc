"""Explain a segmenter's category over a region: Grad-CAM through ``tx.targets.segmentation``, then the same from the
command line (``torchex-fn explain --task segmentation``), whose maps equal the Python ones.

torchvision's DeepLabV3 MobileNetV3 with random weights (no download), on a generated 96 x 96 picture (two bright
rectangles on noise): it runs in seconds on a CPU. The target is the category's logits summed over a region: the
pixels predicted as the category (the command line's default), or here a box around the yellow rectangle
(``--region 10,20,40,60``). A randomly initialised segmenter predicts one category nearly everywhere, which is
the category explained here.

Writes ``segmentation.png`` (the region, Grad-CAM over the region, Grad-CAM over the predicted pixels) and the
command line's overlay and maps under ``--out``.

Usage:
  python examples/segmentation.py [--out DIR]
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

NAME = "deeplabv3_mobilenet_v3_large"
SIZE = 96
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # the ImageNet statistics torchvision's weights expect


def picture() -> Tensor:
    """``[1, 3, 96, 96]`` in [0, 1], multiples of 1/255 (so the PNG the command line reads holds it exactly)."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 80, (3, SIZE, SIZE), generator=g)
    image[:, 20:60, 10:40] = torch.tensor([230, 200, 40]).view(3, 1, 1)
    image[:, 50:85, 55:90] = torch.tensor([40, 120, 230]).view(3, 1, 1)
    return image[None].float() / 255


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="segmentation_example",
                        help="output folder (default: ./segmentation_example)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.perf_counter()

    image = picture()
    x = (image - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.random.fork_rng(devices=[]):                  # as the command line builds it: seed 0
        torch.manual_seed(0)
        model = torchvision.models.get_model(NAME, weights=None, weights_backbone=None).eval()
    model_fn, params = tx.functionalize(model)
    with torch.no_grad():
        predicted = model(x)["out"].argmax(1)[0]             # [H, W]; the output is {"out": [B, 21, H, W]}
    category = int(torch.bincount(predicted.flatten(), minlength=21).argmax())
    region = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    region[20:60, 10:40] = True                              # x in [10, 40), y in [20, 60): the yellow rectangle
    maps = {}
    for name, mask in (("box", region), ("predicted", predicted == category)):
        target = tx.targets.segmentation(category, mask)     # sum of the category's logits over the mask
        maps[name] = tx.grad_cam(model_fn, params, x, target, layer="backbone.16", relu=False)   # [1, 1, H, W]
    shown = [tx.viz.mask_overlay(image[0], region[None]), tx.viz.overlay(image[0], maps["box"][0]),
             tx.viz.overlay(image[0], maps["predicted"][0])]
    grid = tx.viz.save_grid([shown], out / "segmentation.png", titles=["region", "Grad-CAM, box", "predicted"])
    print(f"Python: category {category}, predicted at {int((predicted == category).sum())} of {SIZE * SIZE} "
          f"pixels; wrote {grid}")

    # the same from the command line: it reads the picture from a PNG and writes maps and an overlay
    path = out / "picture.png"
    tx.viz.save_grid([[image[0]]], path, scale=1, pad=0)
    common = ["explain", "--task", "segmentation", "--model", f"torchvision:{NAME}", "--image", str(path),
              "--size", str(SIZE), "--threads", "1", "--option", "relu=False", "--category", str(category)]
    for name, region_flag in (("box", "10,20,40,60"), ("predicted", "predicted")):
        command_line(common + ["--region", region_flag, "--out", str(out / "cli" / name)])
        written = torch.load(out / "cli" / name / "picture_grad_cam.pt")
        gap = float((written["maps"] - maps[name]).abs().max() / maps[name].abs().max())
        print(f"command line, region {region_flag}: maps {list(written['maps'].shape)}, largest difference to "
              f"Python {gap:.1e} of the largest value")
        assert gap <= 1e-5
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
