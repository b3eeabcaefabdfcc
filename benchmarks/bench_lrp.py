"""LRP timings: torchex_fn's ``lrp`` vs zennit (same composite) and a forward+backward floor.

Model: torchvision resnet18 (random weights with non-trivial batch-norm statistics, eval mode),
batch 8 at 224 x 224, 2 threads, CPU. Composite ``epsilon_plus_flat`` by default, zennit with its
``ResNetCanonizer`` (the same batch-norm merge and residual rule as ``canonize=True``). zennit runs
on a model whose parameters do not require grad (its cheapest setting: no parameter gradients);
the floor is ``d score / d x`` by plain autograd on the same model.

Before timing, the two maps are compared (max abs difference over the map's max abs). zennit's
batch-norm merge turns each merged batch norm into ``(x - 0) / sqrt(1 + eps) * 1 + 0``, a scaling
by ``1 / sqrt(1 + eps)`` that the model does not have; on this model at 224 px in float32 that gives
4e-4, and 3e-5 (float32 rounding) once the batch norms' ``eps`` is 0. tests/methods/test_lrp.py compares
with ``eps = 0`` at 32 px: <= 3.2e-6 in float32, 8e-15 in float64.

Repetitions are interleaved (one of each method per round) and the median is reported; the
machine may be shared, so compare ratios from one run and expect a few percent of noise.

Usage::

    python benchmarks/bench_lrp.py            # 5 rounds, batch 8 at 224 x 224, 2 threads
    python benchmarks/bench_lrp.py --quick    # 3 rounds, batch 2 at 112 x 112
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

import torchex_fn as tx
import torchvision
from zennit.composites import COMPOSITES as ZENNIT
from zennit.torchvision import ResNetCanonizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, batch 2 at 112 x 112")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--composite", default="epsilon_plus_flat")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    batch = args.batch or (2 if args.quick else 8)
    size = args.size or (112 if args.quick else 224)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.2)
    for p in model.parameters():
        p.requires_grad_(False)
    fn, params = tx.functionalize(model)
    x = torch.randn(batch, 3, size, size)
    target = torch.arange(batch) * 7 % 1000
    options = {"low": -3.0, "high": 3.0} if args.composite == "epsilon_gamma_box" else {}
    zennit_options = {k: torch.full_like(x, v) for k, v in options.items()}

    def ours():
        return tx.lrp(fn, params, x, target, composite=args.composite, **options)

    def zennit():
        composite = ZENNIT[args.composite](canonizers=[ResNetCanonizer()], **zennit_options)
        xx = x.clone().requires_grad_()
        with composite.context(model) as m:
            out = m(xx)
            seed = torch.zeros_like(out).scatter_(1, target[:, None], out.gather(1, target[:, None]))
            (rel,) = torch.autograd.grad(out, xx, grad_outputs=seed)
        return rel

    def floor():
        xx = x.clone().requires_grad_()
        return torch.autograd.grad(model(xx).gather(1, target[:, None]).sum(), xx)[0]

    methods = {"lrp (ours)": ours, "zennit": zennit, "forward+backward": floor}
    a, b = ours(), zennit()
    gap = ((a - b).abs().max() / b.abs().max()).item()
    load = os.getloadavg()
    print(f"resnet18, {args.composite}, batch {batch} at {size}x{size}, {args.threads} threads, {rounds} rounds; "
          f"max|ours - zennit| / max|zennit| = {gap:.1e}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for f in methods.values():
        f()
    times = {name: [] for name in methods}
    for _ in range(rounds):
        for name, f in methods.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    floor_t = med["forward+backward"]
    print()
    print("| method | median (s) | min (s) | × floor | × zennit |")
    print("| --- | --- | --- | --- | --- |")
    for name, t in times.items():
        print(f"| {name} | {med[name]:.3f} | {min(t):.3f} | {med[name] / floor_t:.2f} | "
              f"{med[name] / med['zennit']:.2f} |")
    print()
    print(f"ours / zennit = {med['lrp (ours)'] / med['zennit']:.2f}   (goal <= 0.6)")


if __name__ == "__main__":
    main()
