"""Side-by-side timings for the CAM zoo against their floors and pytorch-grad-cam.

resnet18 (random init, eval), 224x224, CPU, layer4. Every contender runs in this one process,
interleaved round-robin, and is reported as a ratio to its floor (median over rounds) and to
pytorch-grad-cam's class for the same method. Floors, written with plain hooks and autograd:

* gradient methods (layer_cam, xgrad_cam, hires_cam; grad_cam for reference): one forward and
  ``autograd.grad`` of the target scores w.r.t. layer4's output (the partial backward);
* eigen_cam: one forward with a hook on layer4 (no backward; the SVD is the method's own work);
* fullgrad: one forward and ``autograd.grad`` w.r.t. the input and every batch norm's output;
* ablation_cam: one forward, then for each image and chunk of ``--ablation-chunk`` channels one
  forward of that image whose layer4 output a hook replaces by the chunk's ablated activations (the
  tail, avgpool -> fc, runs on the chunk; ``--ablation-batch`` images: each ablates all 512 channels,
  so it is run on a smaller batch). Also timed: the ``B K`` full forwards with one channel of layer4
  zeroed, in chunks, which pytorch-grad-cam's AblationCAM must do (it skips layer4 itself, not the
  layers before it).

    python benchmarks/bench_cam.py [--threads 2] [--rounds 5] [--batch 8] [--ablation-batch 1]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _common as C  # noqa: E402

import torchex_fn as tx  # noqa: E402


def race(contenders, rounds, number=1):
    return C.medians(C.race(contenders, rounds, number))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ablation-batch", type=int, default=1)
    parser.add_argument("--ablation-chunk", type=int, default=32)
    parser.add_argument("--ablation-rounds", type=int, default=2)
    args = parser.parse_args()
    C.setup(args.threads)
    from pytorch_grad_cam import AblationCAM, EigenCAM, FullGrad, GradCAM, HiResCAM, LayerCAM, XGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = C.resnet18()
    fn, params = tx.functionalize(model)
    where = platform.processor() or platform.machine()
    load = os.getloadavg()
    print(f"machine: {where}, {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, "
          f"torch {torch.__version__}, {args.threads} threads, resnet18 {args.size}x{args.size}, layer4\n")

    hooked = C.hooked

    def pgc(cls, layers, x, target, **options):
        extractor = cls(model=model, target_layers=layers, **options)
        targets = [ClassifierOutputTarget(int(t)) for t in target]

        def run():
            extractor(input_tensor=x, targets=targets)
            model.zero_grad(set_to_none=True)
        return extractor, run

    rows = []

    def record(method, times, floor="floor", peer=None):
        for name, t in times.items():
            rows.append((method, name, t, t / times[floor], t / times[peer] if peer else None))

    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 1000, (args.batch,))

    def floor_layer4():
        out, acts = hooked([model.layer4], lambda: model(x))
        return torch.autograd.grad(out.gather(1, target[:, None]).sum(), acts)

    for method, cls in [("grad_cam", GradCAM), ("layer_cam", LayerCAM), ("xgrad_cam", XGradCAM),
                        ("hires_cam", HiResCAM)]:
        extractor, peer = pgc(cls, [model.layer4], x, target)
        times = race({
            "floor": floor_layer4,
            f"torchex_fn.{method}": lambda m=method: getattr(tx, m)(fn, params, x, target, layer="layer4"),
            f"pytorch-grad-cam {cls.__name__}": peer,
        }, args.rounds)
        extractor.activations_and_grads.release()
        record(method, times, peer=f"pytorch-grad-cam {cls.__name__}")

    def floor_forward():
        with torch.no_grad():
            return hooked([model.layer4], lambda: model(x))

    extractor, peer = pgc(EigenCAM, [model.layer4], x, target)
    with torch.no_grad():
        times = race({
            "floor": floor_forward,
            "torchex_fn.eigen_cam": lambda: tx.eigen_cam(fn, params, x, target, layer="layer4"),
            "pytorch-grad-cam EigenCAM": peer,
        }, args.rounds)
    extractor.activations_and_grads.release()
    record("eigen_cam", times, peer="pytorch-grad-cam EigenCAM")

    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    def floor_fullgrad():
        xx = x.detach().requires_grad_(True)
        out, acts = hooked(norms, lambda: model(xx))
        return torch.autograd.grad(out.gather(1, target[:, None]).sum(), [xx, *acts])

    extractor, peer = pgc(FullGrad, [], x, target)
    times = race({
        "floor": floor_fullgrad,
        "torchex_fn.fullgrad": lambda: tx.fullgrad(fn, params, x, target),
        "pytorch-grad-cam FullGrad": peer,
    }, args.rounds)
    extractor.activations_and_grads.release()
    record("fullgrad", times, peer="pytorch-grad-cam FullGrad")

    if args.ablation_batch:
        xa, ta = x[:args.ablation_batch], target[:args.ablation_batch]
        chunk = args.ablation_chunk

        def floor_ablation():  # what pytorch-grad-cam must do: B K forwards with layer4's output replaced
            with torch.no_grad():
                model(xa)
                channels = 512
                rows_of = [(b, k) for b in range(xa.shape[0]) for k in range(channels)]
                for start in range(0, len(rows_of), chunk):
                    part = rows_of[start:start + chunk]
                    ks = torch.tensor([k for _, k in part])

                    def zero(m, o, ks=ks):
                        return o * (1 - torch.nn.functional.one_hot(ks, channels).to(o.dtype))[:, :, None, None]
                    hooked([model.layer4], lambda: model(xa[torch.tensor([b for b, _ in part])]), replace=zero)

        def floor_tail():  # one forward, then per image and chunk: the image once, the tail on the chunk
            with torch.no_grad():
                _, (act,) = hooked([model.layer4], lambda: model(xa))
                k = act.shape[1]
                for b in range(xa.shape[0]):
                    for c0 in range(0, k, chunk):
                        keep = 1 - torch.eye(k)[c0:c0 + chunk, :, None, None]
                        hooked([model.layer4], lambda: model(xa[b:b + 1]), replace=lambda m, o, keep=keep: o * keep)

        extractor, peer = pgc(AblationCAM, [model.layer4], xa, ta, batch_size=chunk)
        with torch.no_grad():
            times = race({
                "floor": floor_tail,
                "B K forwards (pytorch-grad-cam's work)": floor_ablation,
                "torchex_fn.ablation_cam": lambda: tx.ablation_cam(fn, params, xa, ta, layer="layer4",
                                                                   batch_size=chunk),
                "pytorch-grad-cam AblationCAM": peer,
            }, args.ablation_rounds)
        extractor.activations_and_grads.release()
        record(f"ablation_cam (batch {args.ablation_batch})", times, peer="pytorch-grad-cam AblationCAM")

    load = os.getloadavg()
    print(f"load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n")
    print(f"batch {args.batch}, {args.rounds} rounds (ablation: {args.ablation_rounds})\n")
    print(C.table(["method", "contender", "ms / call", "ratio to floor", "ratio to pytorch-grad-cam"],
                  [(method, name, f"{1000 * t:.1f}", f"{ratio:.3f}", f"{to_peer:.3f}")
                   for method, name, t, ratio, to_peer in rows], right=(2, 3, 4)))


if __name__ == "__main__":
    main()
