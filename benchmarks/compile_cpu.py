"""What ``torch.compile`` buys: eager against compiled saliency, Grad-CAM and DeepLIFT on resnet18.

Each method is wrapped as ``torch.compile(lambda x: method(fn, params, x, target, ...))`` (inductor,
default mode; ``fullgraph=True`` where the method has no graph break, see docs/gpu_and_compile.md),
compiled by a first call (its time is reported), checked against the eager map, then eager and compiled
calls run interleaved and the median is reported. Not a test.

Usage::

    python benchmarks/compile_cpu.py                      # CPU, resnet18, batch 8 at 224 x 224, 2 threads
    python benchmarks/compile_cpu.py --device cuda        # the same on a GPU
    python benchmarks/compile_cpu.py --quick              # batch 2 at 64 x 64
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torchvision

import torchex_fn as tx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--methods", nargs="+", default=["saliency", "grad_cam", "deeplift"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batch, size = (2, 64) if args.quick else (8, 224)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().to(device)
    fn, params = tx.functionalize(model)
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.arange(batch, device=device) * 3
    methods = {
        "saliency": (lambda x: tx.saliency(fn, params, x, target), True),
        "grad_cam": (lambda x: tx.grad_cam(fn, params, x, target, layer="layer4"), False),
        "deeplift": (lambda x: tx.deeplift(fn, params, x, target), False),
    }
    print(f"{device}, torch {torch.__version__}, {args.threads} threads, resnet18 batch {batch} at {size} x {size}, "
          f"backend {args.backend}\n")
    print("| method | fullgraph | compile (first call) s | eager ms | compiled ms | compiled / eager | max rel. diff |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.methods:
        eager, fullgraph = methods[name]
        torch._dynamo.reset()
        compiled = torch.compile(eager, backend=args.backend, fullgraph=fullgraph)
        ref = eager(x)
        sync()
        start = time.perf_counter()
        got = compiled(x)
        sync()
        first = time.perf_counter() - start
        diff = float((got - ref).abs().max() / ref.abs().max())
        times = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            for key, f in (("eager", eager), ("compiled", compiled)):
                sync()
                start = time.perf_counter()
                f(x)
                sync()
                times[key].append(time.perf_counter() - start)
        e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
        print(f"| {name} | {'yes' if fullgraph else 'no'} | {first:.0f} | {1000 * e:.0f} | {1000 * c:.0f} | "
              f"{c / e:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
