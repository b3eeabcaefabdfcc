"""Side-by-side timings for saliency and Grad-CAM against their floors and the peer libraries.

resnet18 (random init, eval), 224x224, CPU. Every contender runs in this one process, interleaved
round-robin, and each is reported as a ratio to its floor (median over rounds).

    python benchmarks/bench_foundation.py [--threads 2] [--rounds 7] [--batches 1 8 32]
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _common as C  # noqa: E402

import torchex_fn as tx  # noqa: E402


def race(contenders, rounds, number, sync=lambda: None):
    return C.medians(C.race(contenders, rounds, number, sync))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    C.setup(args.threads)
    from captum.attr import LayerGradCam, Saliency
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    model = C.resnet18().to(device)
    fn, params = tx.functionalize(model)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"machine: {where}, torch {torch.__version__}, {args.threads} CPU threads, resnet18 {args.size}x{args.size}\n")
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size, device=device)
        target = torch.randint(0, 1000, (batch,), device=device)
        number = max(1, 8 // batch) if device.type == "cpu" else 10

        def floor_input():
            return C.grad_input(model, x, target)

        def floor_layers(layers):
            return lambda: C.grad_layers(model, layers, x, target)

        sal = race({
            "floor": floor_input,
            "torchex_fn.saliency": lambda: tx.saliency(fn, params, x, target),
            "captum Saliency": lambda: Saliency(model).attribute(x, target=target, abs=False),
        }, args.rounds, number, sync)
        rows += [(batch, "saliency", k, v, v / sal["floor"]) for k, v in sal.items()]
        if batch == 8 or len(args.batches) == 1:
            gcam_pg = GradCAM(model=model, target_layers=[model.layer4])
            targets_pg = [ClassifierOutputTarget(int(t)) for t in target]
            one = race({
                "floor": floor_layers([model.layer4]),
                "torchex_fn.grad_cam": lambda: tx.grad_cam(fn, params, x, target, layer="layer4"),
                "captum LayerGradCam": lambda: LayerGradCam(model, model.layer4).attribute(
                    x, target=target, relu_attributions=True),
                "pytorch-grad-cam GradCAM": lambda: gcam_pg(input_tensor=x, targets=targets_pg),
            }, args.rounds, number, sync)
            gcam_pg.activations_and_grads.release()
            rows += [(batch, "grad_cam layer4", k, v, v / one["floor"]) for k, v in one.items()]
            two = race({
                "floor": floor_layers([model.layer3, model.layer4]),
                "torchex_fn.grad_cam": lambda: tx.grad_cam(fn, params, x, target, layer=["layer3", "layer4"]),
            }, args.rounds, number, sync)
            rows += [(batch, "grad_cam layer3+4", k, v, v / two["floor"]) for k, v in two.items()]
    print(C.table(["batch", "method", "contender", "ms / call", "ratio to floor"],
                  [(batch, method, name, f"{1000 * t:.1f}", f"{ratio:.3f}") for batch, method, name, t, ratio in rows],
                  right=(0, 3, 4)))


if __name__ == "__main__":
    main()
