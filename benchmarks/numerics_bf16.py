"""bfloat16 autocast and channels_last against float32: how far the maps move (resnet18).

For each method, three maps of the same batch: float32 (the reference), the same call under
``torch.autocast(device, dtype=torch.bfloat16)``, and float32 with the model and the input in
``torch.channels_last``. Printed per method: the relative L2 error ``||m - ref|| / ||ref||``, the
worst entry relative to the map's largest ``max|m - ref| / max|ref|``, and the Spearman rank
correlation of the entries (what a heat map shows). Not a test: run by hand, paste the table.

Usage::

    python benchmarks/numerics_bf16.py                    # CPU, resnet18, batch 2 at 224 x 224
    python benchmarks/numerics_bf16.py --device cuda      # the same on a GPU
    python benchmarks/numerics_bf16.py --quick            # batch 1 at 64 x 64, fewer masks
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

import torchex_fn as tx


def _ranks(t: torch.Tensor) -> torch.Tensor:
    flat = t.flatten().double()
    ranks = torch.empty_like(flat)
    ranks[flat.argsort()] = torch.arange(flat.numel(), dtype=torch.float64, device=flat.device)
    return ranks


def compare(a: torch.Tensor, ref: torch.Tensor) -> tuple:
    a, ref = a.double(), ref.double()
    rel = float((a - ref).norm() / ref.norm())
    worst = float((a - ref).abs().max() / ref.abs().max())
    ra, rr = _ranks(a), _ranks(ref)
    ra, rr = ra - ra.mean(), rr - rr.mean()
    spearman = float((ra * rr).sum() / (ra.norm() * rr.norm()))
    return rel, worst, spearman


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--masks", type=int, default=None, help="RISE masks (default 256, quick 64)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    batch, size = (1, 64) if args.quick else (2, 224)
    masks = args.masks or (64 if args.quick else 256)
    model = torchvision.models.resnet18().eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.arange(batch, device=device) * 7

    def rise(fn, p, x, t):
        gen = torch.Generator(device=device).manual_seed(0)
        return tx.rise(fn, p, x, t, num_masks=masks, cell_size=7 if size >= 112 else 4, batch_size=32, generator=gen)

    methods = {
        "saliency": lambda fn, p, x, t: tx.saliency(fn, p, x, t),
        "grad_cam layer4": lambda fn, p, x, t: tx.grad_cam(fn, p, x, t, layer="layer4"),
        "integrated_gradients (32 steps)": lambda fn, p, x, t: tx.integrated_gradients(fn, p, x, t, steps=32,
                                                                                       batch_size=16),
        "deeplift": lambda fn, p, x, t: tx.deeplift(fn, p, x, t),
        f"rise ({masks} masks)": rise,
    }
    fn, params = tx.functionalize(model)
    last = torchvision.models.resnet18().eval().to(device)
    last.load_state_dict(model.state_dict())
    last = last.to(memory_format=torch.channels_last)
    last_fn, last_params = tx.functionalize(last)
    x_last = x.contiguous(memory_format=torch.channels_last)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, resnet18 random init, batch {batch} at {size} x {size}\n")
    print("| method | variant | rel. L2 error | max error / max | Spearman | s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, method in methods.items():
        start = time.perf_counter()
        ref = method(fn, params, x, target)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            half = method(fn, params, x, target)
        cl = method(last_fn, last_params, x_last, target)
        seconds = time.perf_counter() - start
        for variant, m in (("bf16 autocast", half), ("channels_last", cl)):
            rel, worst, rho = compare(m, ref)
            dtype = "" if m.dtype == ref.dtype else f" (returned {m.dtype})"
            print(f"| {name} | {variant}{dtype} | {rel:.2e} | {worst:.2e} | {rho:.4f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
