"""Concept heatmaps (CRP): ``tx.lrp(..., condition={layer: K channels})`` vs zennit-crp's way on zennit.

zennit-crp 0.6.0 pins zennit <= 0.4.6 and cannot be installed beside our zennit 0.5.1, so its method is
written here on zennit 0.5.1, as zennit-crp's ``CondAttribution`` does it: the input repeated ``K`` times
(one row per concept), zennit's composite, a forward hook on the layer registering a tensor hook that
masks row ``k``'s gradient to concept ``k``'s channels, one backward from the target logit. (With zennit
0.4.6, zennit-crp's values equal ours to 2e-6: tests/composite/test_concepts.py.) Ours: one LRP forward,
a backward from the output to the layer, and one ``vmap``-batched backward of the ``K`` masked relevances
from the layer to the input. Also timed: the plain heatmap (``tx.lrp``) and ``K`` separate calls with one
concept each.

Model: torchvision resnet18 (random weights, non-trivial batch-norm statistics, eval mode), layer
``layer3`` (every path passes through it), ``EpsilonPlusFlat`` with zennit's ``ResNetCanonizer``.
Repetitions are interleaved and medians reported; compare ratios from one run.

Usage::

    python benchmarks/bench_crp.py              # 1 image at 224 x 224, K = 8, 5 rounds, 2 threads
    python benchmarks/bench_crp.py --quick      # 1 image at 112 x 112, K = 8, 3 rounds
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torchvision
from torch import nn
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

import torchex_fn as tx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="112 x 112, 3 rounds")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--concepts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    size = args.size or (112 if args.quick else 224)
    rounds = args.rounds or (3 if args.quick else 5)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.2)
                m.eps = 0.0  # zennit's merge is then the model itself (see tests/methods/test_lrp.py)
    for p in model.parameters():
        p.requires_grad_(False)
    fn, params = tx.functionalize(model)
    layer, k = "layer3", args.concepts
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    target = 7
    channels = list(range(0, 256, 256 // k))[:k]

    def ours():
        return tx.lrp(fn, params, x, target, condition={layer: channels})

    def ours_loop():
        return torch.stack([tx.lrp(fn, params, x, target, condition={layer: c}) for c in channels], 1)

    def plain():
        return tx.lrp(fn, params, x, target)

    def zennit_crp_way():
        mask = torch.zeros(k, 256, 1, 1)
        mask[torch.arange(k), channels] = 1
        xx = x.repeat(k, 1, 1, 1).requires_grad_()

        def on_layer(module, args, out):
            out.register_hook(lambda g: g * mask)

        composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
        with composite.context(model) as m:
            handle = dict(m.named_modules())[layer].register_forward_hook(on_layer)
            try:
                out = m(xx)
                seed = torch.zeros_like(out)
                seed[:, target] = out[:, target]
                (rel,) = torch.autograd.grad(out, xx, grad_outputs=seed)
            finally:
                handle.remove()
        return rel[None]

    methods = {f"condition, K={k} (ours, one call)": ours, f"{k} calls of one concept (ours)": ours_loop,
               f"zennit, input repeated K={k} (zennit-crp's way)": zennit_crp_way, "plain lrp (ours)": plain}
    a, b = ours(), zennit_crp_way()
    gap = ((a - b).abs().max() / b.abs().max()).item()
    load = os.getloadavg()
    print(f"resnet18, {layer}, 1 image at {size}x{size}, K = {k}, {args.threads} threads, {rounds} rounds; "
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
    peer = med[f"zennit, input repeated K={k} (zennit-crp's way)"]
    base = med["plain lrp (ours)"]
    print()
    print("| method | median (s) | min (s) | × plain lrp | × zennit-crp's way |")
    print("| --- | --- | --- | --- | --- |")
    for name, t in times.items():
        print(f"| {name} | {med[name]:.3f} | {min(t):.3f} | {med[name] / base:.2f} | {med[name] / peer:.2f} |")


if __name__ == "__main__":
    main()
