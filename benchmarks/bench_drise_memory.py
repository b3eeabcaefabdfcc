"""D-RISE's peak memory against ``num_masks``: each row in a fresh process, so that one row's peak is not another's.

torchvision's fasterrcnn_mobilenet_v3_large_fpn, random weights, eval, a low score threshold so that boxes
exist, one image, CPU, ``tx.drise`` under ``torch.no_grad`` with a fixed ``batch_size``. A child process
builds the model, runs one warm-up D-RISE of one batch (so that allocator pools and lazily loaded kernels
count before the measure), reads its peak resident set size (``ru_maxrss``), runs D-RISE with ``num_masks``
masks and reads the peak again. Memory flat in ``num_masks`` means the second peak does not grow with it:
masks are drawn in fixed blocks and the saliency is accumulated batch by batch.

Usage::

    .venv/bin/python benchmarks/bench_drise_memory.py                          # 96 x 128, N = 64, 256, 1024
    .venv/bin/python benchmarks/bench_drise_memory.py --masks 64 512 --batch-size 8 --size 128 160
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

import _common
import torchex_fn as tx


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def child(masks: int, batch_size: int, height: int, width: int, threads: int) -> None:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn
    _common.setup(threads)
    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, min_size=height, max_size=width,
                                              box_score_thresh=0.0)
    with torch.no_grad():
        torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.05)
    model.eval()
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        found = model(x)[0]
    boxes, labels = found["boxes"][:3], found["labels"][:3]
    fn, params = tx.functionalize(model)

    def run(n: int) -> torch.Tensor:
        with torch.no_grad():
            return tx.drise(fn, params, x, boxes, labels, num_masks=n, batch_size=batch_size,
                            generator=torch.Generator().manual_seed(0))
    run(batch_size)
    before = _peak_mib()
    start = time.perf_counter()
    maps = run(masks)
    seconds = time.perf_counter() - start
    print(json.dumps({"masks": masks, "before": before, "after": _peak_mib(), "seconds": seconds,  # noqa: T201
                      "shape": list(maps.shape)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(96, 128))
    parser.add_argument("--masks", type=int, nargs="+", default=(64, 256, 1024))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    height, width = args.size
    if args.child is not None:
        child(args.child, args.batch_size, height, width, args.threads)
        return
    rows = []
    for n in args.masks:
        done = subprocess.run([sys.executable, __file__, "--child", str(n), "--batch-size", str(args.batch_size),
                               "--size", str(height), str(width), "--threads", str(args.threads)],
                              check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(_common.machine(args.threads, f"fasterrcnn_mobilenet_v3_large_fpn {height}x{width}, batch 1, "  # noqa: T201
                                        f"batch_size {args.batch_size}"))
    print()  # noqa: T201
    first = rows[0]["after"]
    print(_common.table(["num_masks", "peak RSS before MiB", "peak RSS after MiB", "growth MiB",  # noqa: T201
                         "x first row's peak", "s"],
                        [(r["masks"], f"{r['before']:.0f}", f"{r['after']:.0f}", f"{r['after'] - r['before']:.0f}",
                          f"{r['after'] / first:.3f}", f"{r['seconds']:.1f}") for r in rows],
                        right=(0, 1, 2, 3, 4, 5)))


if __name__ == "__main__":
    main()
