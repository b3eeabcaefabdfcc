"""attribute_dataset vs calling grad_cam on batches already in memory; peak RSS against data-set size.

Usage (CPU):
    PYTHONPATH=. python benchmarks/bench_dataset.py                 # throughput ratio + RSS table
    PYTHONPATH=. python benchmarks/bench_dataset.py --n 256 --repeats 1 --rss-sizes 256 1024   # quick

Throughput: 2,048 images of 3x96x96 (drawn on the fly from a per-index seed, as a data set read from
disk would be), grad_cam on a random-weight torchvision resnet18 at layer4, batches of 32. The
baseline calls ``grad_cam`` on the same batches already stacked in memory; ``attribute_dataset``
loads, explains, writes shards (fsync'd) and records predictions. Runs alternate and the medians
are reported, as wall-clock throughput and as images per CPU-second of the process (all threads:
the writer's and the loader's work counts), which other processes on a shared machine disturb less. RSS: one subprocess per data-set size runs ``attribute_dataset`` and reports its
``ru_maxrss``; a flat peak means nothing grows with the number of examples.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch


class Synthetic(torch.utils.data.Dataset):
    """Image i: N(0, 1) noise from a generator seeded with i (never the whole set in memory)."""

    def __init__(self, n: int, size: int = 96):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.size, self.size, generator=g), i % 1000


def model():
    import torchvision

    import torchex_fn as tx
    torch.manual_seed(0)
    return tx.functionalize(torchvision.models.resnet18().eval())


def run_store(n: int, batch_size: int, workers: int, out: str, fn, params):
    """``(wall seconds, CPU seconds of this process, all threads)``."""
    import torchex_fn as tx
    start, cpu = time.perf_counter(), time.process_time()
    tx.attribute_dataset(tx.grad_cam, fn, params, Synthetic(n), out=out, batch_size=batch_size, progress=False,
                         num_workers=workers, layer="layer4")
    return time.perf_counter() - start, time.process_time() - cpu


def run_memory(batches, fn, params):
    import torchex_fn as tx
    start, cpu = time.perf_counter(), time.process_time()
    for x, t in batches:
        tx.grad_cam(fn, params, x, t, layer="layer4")
    return time.perf_counter() - start, time.process_time() - cpu


def rss_child(args) -> None:
    torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix="bench_dataset_")
    try:
        seconds = run_store(args.rss_child, args.batch_size, args.workers, out, *model())[0]
    finally:
        shutil.rmtree(out)
    print(json.dumps({"n": args.rss_child, "seconds": seconds,
                      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--rss-sizes", type=int, nargs="*", default=[2048, 8192])
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child is not None:
        return rss_child(args)

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.workers} loader worker(s), "
          f"batch {args.batch_size}; before: {uptime()}", flush=True)
    fn, params = model()
    data = Synthetic(args.n)
    batches = []
    for s in range(0, args.n, args.batch_size):
        items = [data[i] for i in range(s, min(s + args.batch_size, args.n))]
        batches.append((torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])))
    run_memory(batches[:1], fn, params)  # warm-up
    memory, store = [], []
    for r in range(args.repeats):
        memory.append(run_memory(batches, fn, params))
        out = tempfile.mkdtemp(prefix="bench_dataset_")
        try:
            store.append(run_store(args.n, args.batch_size, args.workers, out, fn, params))
        finally:
            shutil.rmtree(out)
        (mw, mc), (sw, sc) = memory[-1], store[-1]
        print(f"repeat {r}: in memory {args.n / mw:.1f} img/s ({args.n / mc:.1f} per CPU-s), attribute_dataset "
              f"{args.n / sw:.1f} img/s ({args.n / sc:.1f} per CPU-s), ratio {mw / sw:.3f} wall, {mc / sc:.3f} CPU",
              flush=True)
    wall = statistics.median(m[0] / s[0] for m, s in zip(memory, store))
    cpu = statistics.median(m[1] / s[1] for m, s in zip(memory, store))
    print(f"\n| {args.n} images 3x96x96, grad_cam resnet18 layer4 | img/s wall | img per CPU-second |")
    print("| --- | --- | --- |")
    print(f"| grad_cam on batches in memory | {args.n / statistics.median(m[0] for m in memory):.1f} | "
          f"{args.n / statistics.median(m[1] for m in memory):.1f} |")
    print(f"| attribute_dataset (load + explain + write + predictions) | "
          f"{args.n / statistics.median(s[0] for s in store):.1f} | {args.n / statistics.median(s[1] for s in store):.1f} |")
    print(f"| ratio, median of per-repeat ratios (goal >= 0.90) | {wall:.3f} | {cpu:.3f} |")
    del batches

    rows = []
    for n in args.rss_sizes:
        done = subprocess.run([sys.executable, __file__, "--rss-child", str(n), "--threads", str(args.threads),
                               "--workers", str(args.workers), "--batch-size", str(args.batch_size)],
                              capture_output=True, text=True, env=dict(os.environ))
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if rows:
        print("\n| images | peak RSS (MiB) | seconds |")
        print("| --- | --- | --- |")
        for row in rows:
            print(f"| {row['n']} | {row['maxrss_mib']:.0f} | {row['seconds']:.1f} |")
        print(f"\npeak RSS ratio {rows[-1]['n']} vs {rows[0]['n']} images: "
              f"{rows[-1]['maxrss_mib'] / rows[0]['maxrss_mib']:.3f} (goal within 10 %)")
    print(f"after: {uptime()}")


if __name__ == "__main__":
    main()
