"""DeepLIFT timings: torchex_fn (native) vs its saliency, captum's DeepLift and a forward+backward floor.

Model: torchvision resnet18 (random weights, eval mode), batch 8 at 224 x 224, 2 threads, CPU.

captum cannot run torchvision's ResNet as is (``BasicBlock`` calls ``self.relu`` twice and captum
raises on a reused module), so captum runs on a copy whose blocks use one fresh, not in-place ReLU
per call; torchex_fn runs on the original model. Both maps are checked for completeness first.

Repetitions are interleaved (one of each method per round) and the median is reported; the
machine may be shared, so compare ratios from one run and expect a few percent of noise.

Usage::

    python benchmarks/bench_deeplift.py            # 7 rounds, batch 8 at 224 x 224
    python benchmarks/bench_deeplift.py --quick    # 3 rounds, batch 2 at 112 x 112
"""
from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _common as C  # noqa: E402
from _common import captum_ready_copy  # noqa: E402,F401  (kept importable from here)

import torchex_fn as tx  # noqa: E402
from torchex_fn.methods.propagation import deeplift  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # captum's import warns about torch.jit.script
    from captum.attr import DeepLift as CaptumDeepLift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, batch 2 at 112 x 112")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    batch = args.batch or (2 if args.quick else 8)
    size = args.size or (112 if args.quick else 224)
    torch.set_num_threads(args.threads)
    model = C.resnet18()
    with torch.no_grad():  # non-trivial BN shifts, so that DeepLIFT differs from gradient x input
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.bias.uniform_(-0.2, 0.2)
    for p in model.parameters():
        p.requires_grad_(False)
    twin = captum_ready_copy(model)
    fn, params = tx.functionalize(model)
    x = torch.randn(batch, 3, size, size)
    target = torch.arange(batch) * 7 % 1000
    baseline = 0.0

    def ours():
        return deeplift(fn, params, x, target, baseline=baseline)

    def saliency():
        return tx.saliency(fn, params, x, target)

    def captum():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return CaptumDeepLift(twin).attribute(x.clone(), baselines=baseline, target=target)

    def floor():
        xx = x.clone().requires_grad_()
        return torch.autograd.grad(model(xx).gather(1, target[:, None]).sum(), xx)[0]

    methods = {"deeplift (ours)": ours, "saliency (ours)": saliency, "captum DeepLift": captum,
               "forward+backward": floor}
    # Warm-up, and completeness: each map should sum to f(x) - f(baseline). The two maps are not
    # equal on resnet18: in its stem a ReLU feeds an overlapping 3x3 / stride 2 max pool, where
    # captum's adjacent module hooks give another map (and its un-pooling keeps one of the
    # overlapping windows' shares). Where a layer separates them and windows do not overlap, the
    # maps agree to float precision (tests/methods/test_deeplift.py::test_equals_captum).
    with torch.no_grad():
        delta = (model(x) - model(torch.full_like(x, baseline))).gather(1, target[:, None])[:, 0]
    gaps = {name: ((f().flatten(1).sum(1) - delta).abs().max() / delta.abs().max()).item()
            for name, f in (("ours", ours), ("captum", captum))}
    print(f"resnet18, batch {batch} at {size}x{size}, {args.threads} threads, {rounds} rounds; "
          f"completeness gap max|sum(map) - delta| / max|delta|: ours {gaps['ours']:.1e}, "
          f"captum {gaps['captum']:.1e}")
    times = C.race(methods, rounds)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:18s} median {med[name]:7.3f} s   (min {min(t):.3f}, max {max(t):.3f})")
    ours_t = med["deeplift (ours)"]
    print(f"ours / saliency  = {ours_t / med['saliency (ours)']:.2f}   (goal <= 2.3)")
    print(f"ours / captum    = {ours_t / med['captum DeepLift']:.2f}   (goal <= 0.75)")
    print(f"ours / floor     = {ours_t / med['forward+backward']:.2f}")
    print(f"captum / floor   = {med['captum DeepLift'] / med['forward+backward']:.2f}")
    print(f"saliency / floor = {med['saliency (ours)'] / med['forward+backward']:.2f}")


if __name__ == "__main__":
    main()
