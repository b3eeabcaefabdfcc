"""The robustness family of tx.metrics against Quantus 0.6.0, side by side in one process.

resnet18 (random weights) at 112 x 112, batch 8, tx.saliency as the explanation for both, the same numbers of
perturbations (``--samples``, Quantus's ``nr_samples``; continuity ``--steps`` translations). Quantus calls the
method once per draw on the batch and loops in numpy; tx.metrics stacks ``batch_size // 8`` draws into one call.
Reports seconds per call (median over rounds, interleaved) and the ratio ours / Quantus.

Run with the environment that has Quantus (it is not a dependency of torchex_fn)::

    PYTHONPATH=. /work/quantusenv/bin/python benchmarks/bench_robustness.py [--device cuda] [--samples 10]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common

import torchex_fn as tx

if not hasattr(np, "trapz"):  # numpy 2.4 removed it; Quantus 0.6.0 still calls it
    np.trapz = np.trapezoid


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--metrics", default="")
    args = parser.parse_args()
    import quantus

    _common.setup()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    net = _common.resnet18().to(device)
    fn, params = tx.functionalize(net)
    x = torch.rand(8, 3, 112, 112, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        y = net(x).argmax(1)
    xn, yn = x.cpu().numpy(), y.cpu().numpy()

    def method(model_fn, p, inputs, target):
        return tx.saliency(model_fn, p, inputs, target).sum(1, keepdim=True)

    def explain(model, inputs, targets, **kwargs):
        inputs = torch.as_tensor(inputs, device=device)
        return method(fn, params, inputs, torch.as_tensor(targets, device=device).long()).detach().cpu().numpy()

    a = explain(None, xn, yn)
    n, gen = args.samples, lambda: torch.Generator(device=device).manual_seed(0)
    ours = {
        "avg_sensitivity": lambda: tx.metrics.avg_sensitivity(method, fn, params, x, y, nr_samples=n, generator=gen(),
                                                              batch_size=args.batch_size),
        "max_sensitivity": lambda: tx.metrics.max_sensitivity(method, fn, params, x, y, nr_samples=n, generator=gen(),
                                                              batch_size=args.batch_size),
        "local_lipschitz_estimate": lambda: tx.metrics.local_lipschitz_estimate(
            method, fn, params, x, y, nr_samples=n, generator=gen(), batch_size=args.batch_size),
        "relative_input_stability": lambda: tx.metrics.relative_input_stability(
            method, fn, params, x, y, nr_samples=n, generator=gen(), batch_size=args.batch_size),
        "relative_output_stability": lambda: tx.metrics.relative_output_stability(
            method, fn, params, x, y, nr_samples=n, generator=gen(), batch_size=args.batch_size),
        "continuity": lambda: tx.metrics.continuity(method, fn, params, x, y, nr_steps=args.steps,
                                                    batch_size=args.batch_size),
    }
    theirs_classes = {
        "avg_sensitivity": (quantus.AvgSensitivity, {"nr_samples": n}),
        "max_sensitivity": (quantus.MaxSensitivity, {"nr_samples": n}),
        "local_lipschitz_estimate": (quantus.LocalLipschitzEstimate, {"nr_samples": n}),
        "relative_input_stability": (quantus.RelativeInputStability, {"nr_samples": n}),
        "relative_output_stability": (quantus.RelativeOutputStability, {"nr_samples": n}),
        "continuity": (quantus.Continuity, {"nr_steps": args.steps}),
    }

    def quantus_call(metric, options):
        def call():
            return metric(disable_warnings=True, **options)(
                model=net, x_batch=xn, y_batch=yn, a_batch=a.copy(), s_batch=None, channel_first=True,
                explain_func=explain, explain_func_kwargs=None, model_predict_kwargs=None, softmax=False,
                batch_size=8, device=str(device))
        return call

    chosen = [m for m in args.metrics.split(",") if m] or list(ours)
    print(_common.machine(torch.get_num_threads(), f"{device}, resnet18 112x112, batch 8, tx.saliency, "
                                                   f"{n} draws, {args.steps} translations"))
    rows = []
    for name in chosen:
        times = _common.medians(_common.race({"ours": ours[name], "quantus": quantus_call(*theirs_classes[name])},
                                             rounds=args.rounds, sync=sync))
        rows.append([name, f"{times['ours']:.3f}", f"{times['quantus']:.3f}",
                     _common.ratio(times["ours"], times["quantus"]),
                     f"{times['quantus'] / times['ours']:.1f}x"])
        print(rows[-1], flush=True)
    print(_common.table(["metric", "ours s", "Quantus s", "ours / Quantus", "speed-up"], rows, right=[1, 2, 3, 4]))


if __name__ == "__main__":
    main()
