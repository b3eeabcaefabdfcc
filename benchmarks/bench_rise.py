"""RISE on resnet18 (224 x 224, CPU, 2 threads): time against bare forward passes, and peak memory.

For each number of masks N this runs three child processes, so that each peak RSS
(``ru_maxrss``) is that of one job only:

* ``rise``: ``torchex_fn.methods.perturbation.rise`` on one image;
* ``bare``: ``ceil(N / batch_size)`` forward passes of ``batch_size`` images, no masks: the floor
  that RISE cannot beat (its ratio to this time is the overhead; the goal is <= 1.10);
* ``reference``: a plain implementation that draws and keeps all N masks ``[N, H, W]`` before the
  forwards. Only its memory is of interest, so it runs one forward batch (later batches allocate
  the same again); above ``--measure-reference-up-to`` masks its RSS is estimated as the bare
  forward's plus ``N * H * W * 4`` bytes of masks.

Usage::

    .venv/bin/python benchmarks/bench_rise.py            # N = 1000 and 8000 (long on a laptop CPU)
    .venv/bin/python benchmarks/bench_rise.py --quick    # N = 32 and 128

Timings on a shared machine are noisy; compare ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HEIGHT = WIDTH = 224


def _setup():
    import torchvision

    import torchex_fn as tx
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()   # random weights: the cost does not depend on them
    fn, params = tx.functionalize(model)
    x = torch.randn(1, 3, HEIGHT, WIDTH)
    return fn, params, x


def _reference_masks(num_masks, cells, p, generator):
    """All masks at once, as a straightforward implementation keeps them: ``[N, H, W]``."""
    ch, cw = math.ceil(HEIGHT / cells), math.ceil(WIDTH / cells)
    masks = torch.empty(num_masks, HEIGHT, WIDTH)
    for start in range(0, num_masks, 256):
        n = min(256, num_masks - start)
        grid = (torch.rand(n, 1, cells, cells, generator=generator) < p).float()
        up = F.interpolate(grid, size=((cells + 1) * ch, (cells + 1) * cw), mode="bilinear", align_corners=False)
        dy = torch.randint(ch, (n,), generator=generator).tolist()
        dx = torch.randint(cw, (n,), generator=generator).tolist()
        for i in range(n):
            masks[start + i] = up[i, 0, dy[i]:dy[i] + HEIGHT, dx[i]:dx[i] + WIDTH]
    return masks


def child(job: str, num_masks: int, batch_size: int) -> None:
    from torchex_fn.methods.perturbation import rise
    fn, params, x = _setup()
    with torch.no_grad():
        fn(params, x.expand(batch_size, -1, -1, -1).contiguous())           # warm-up, same for every job
        start = time.perf_counter()
        if job == "rise":
            rise(fn, params, x, 0, num_masks=num_masks, batch_size=batch_size,
                 generator=torch.Generator().manual_seed(0))
        elif job == "bare":
            batch = torch.randn(batch_size, 3, HEIGHT, WIDTH)
            for _ in range(math.ceil(num_masks / batch_size)):
                fn(params, batch)
        elif job == "reference":
            masks = _reference_masks(num_masks, 7, 0.5, torch.Generator().manual_seed(0))
            scores = torch.softmax(fn(params, x * masks[:batch_size, None]), 1)[:, 0]
            (scores[:, None, None] * masks[:batch_size]).sum(0)
        else:
            raise SystemExit(f"unknown job {job!r}")
        seconds = time.perf_counter() - start
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "rss_mib": rss_mib}))


def _run(job: str, num_masks: int, batch_size: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: no heap growth from freed big blocks
    out = subprocess.run([sys.executable, __file__, "--child", job, str(num_masks), str(batch_size)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 32 and 128 instead of 1000 and 8000")
    parser.add_argument("--batch-size", type=int, default=32, help="masked images per forward (default 32)")
    parser.add_argument("--measure-reference-up-to", type=int, default=1000,
                        help="run the all-masks reference up to this N, estimate its RSS above")
    parser.add_argument("--child", nargs=3, metavar=("JOB", "N", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return

    counts = (32, 128) if args.quick else (1000, 8000)
    bs = args.batch_size
    print(f"resnet18, 1 x 3 x {HEIGHT} x {WIDTH}, CPU, torch {torch.__version__}, 2 threads, batch_size={bs}; "
          "peak RSS per child process\n")
    print("| N masks | RISE s | bare forwards s | ratio (goal <= 1.10) | masks/s | RISE peak RSS MiB "
          "| bare peak RSS MiB | all-masks reference peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in counts:
        rise_run, bare_run = _run("rise", n, bs), _run("bare", n, bs)
        if n <= args.measure_reference_up_to:
            reference = f"{_run('reference', n, bs)['rss_mib']:.0f}"
        else:
            reference = f"{bare_run['rss_mib'] + n * HEIGHT * WIDTH * 4 / 2 ** 20:.0f} (est.)"
        print(f"| {n} | {rise_run['seconds']:.1f} | {bare_run['seconds']:.1f} "
              f"| {rise_run['seconds'] / bare_run['seconds']:.3f} | {n / rise_run['seconds']:.1f} "
              f"| {rise_run['rss_mib']:.0f} | {bare_run['rss_mib']:.0f} | {reference} |", flush=True)


if __name__ == "__main__":
    main()
