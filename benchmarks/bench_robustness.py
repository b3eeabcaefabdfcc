"""The robustness family of tx.metrics against Quantus 0.6.0 and against their floor, side by side in one process.

resnet18 (random weights) at 112 x 112, batch 8, tx.saliency (channels summed) as the explanation for both, the
same numbers of perturbations (``--samples``, Quantus's ``nr_samples``; continuity ``--steps`` translations).
Quantus calls the method once per draw on the batch and loops in numpy; tx.metrics stacks ``batch_size // 8``
draws into one call.

The floor of a metric is the model calls it makes (recorded on a first call: each explanation of a perturbed
batch, a forward and a backward to the input, and each bare forward, with their batch sizes), replayed with plain
autograd in the same process (``_common.Calls`` / ``_common.replay``). Reported per metric: seconds of ours,
Quantus and the floor (median over interleaved rounds), ours / floor, Quantus / floor (the most any implementation
making these calls can gain on Quantus on this machine) and the images each library sent through the model.

The representation of relative representation stability: the outputs of resnet18's four stages' last blocks (Quantus
skips ``nn.Sequential`` modules; ours's default,
every leaf module, refuses resnet18's ReLU modules, each called twice in a forward).

Run with the environment that has Quantus (it is not a dependency of torchex_fn); ``--metrics`` runs some (e.g.
one per process, so that a long one cannot stop the others)::

    PYTHONPATH=. /work/quantusenv/bin/python benchmarks/bench_robustness.py --threads 1 --clock cpu [--samples 10]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # NumPy's BLAS: one thread, as torch
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

import torchex_fn as tx  # noqa: E402

if not hasattr(np, "trapz"):  # numpy 2.4 removed it; Quantus 0.6.0 still calls it
    np.trapz = np.trapezoid

METRICS = ("avg_sensitivity", "max_sensitivity", "local_lipschitz_estimate", "relative_input_stability",
           "relative_output_stability", "relative_representation_stability", "continuity", "consistency")
BLOCKS = ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]  # the representation of relative_representation_stability


def row(name: str, times: dict, ours_calls: _common.Calls, their_calls: _common.Calls) -> list:
    """A table row: seconds, each library's time over the floor of ours' calls, Quantus's over its own calls'."""
    floor, their_floor = times["floor"], times["their_floor"]
    return [name, f"{times['ours']:.3f}", f"{times['quantus']:.3f}", f"{floor:.3f}", f"{times['ours'] / floor:.2f}",
            f"{times['quantus'] / floor:.2f}", f"{their_floor:.3f}", f"{times['quantus'] / their_floor:.2f}",
            ours_calls.summary(), their_calls.summary()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                        help="cpu: the process's CPU time (with one thread it leaves out the waits for a core)")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per call of ours (on this CPU 8 beats 64: the activations stay in cache)")
    parser.add_argument("--metrics", default="", help="comma-separated names (default: all 8)")
    args = parser.parse_args()
    import quantus

    _common.setup(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.process_time if args.clock == "cpu" and not cuda else time.perf_counter
    net = _common.resnet18().to(device)
    fn, params = tx.functionalize(net)
    x = torch.rand(8, 3, 112, 112, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        y = net(x).argmax(1)
    xn, yn = x.cpu().numpy(), y.cpu().numpy()

    def saliency(model_fn, p, inputs, target):
        return tx.saliency(model_fn, p, inputs, target).sum(1, keepdim=True)

    def explainer(method):
        def explain(model, inputs, targets, **kwargs):
            inputs = torch.as_tensor(inputs, device=device)
            return method(fn, params, inputs, torch.as_tensor(targets, device=device).long()).detach().cpu().numpy()
        return explain

    a = explainer(saliency)(None, xn, yn)
    at = torch.as_tensor(a, device=device)
    n, bs = args.samples, args.batch_size

    def ours(name, method, model_fn):
        gen = torch.Generator(device=device).manual_seed(0)
        draws = {"nr_samples": n, "generator": gen, "batch_size": bs}
        if name == "continuity":
            return lambda: tx.metrics.continuity(method, model_fn, params, x, y, nr_steps=args.steps, batch_size=bs)
        if name == "consistency":
            return lambda: tx.metrics.consistency(model_fn, params, x, at)
        if name == "relative_representation_stability":
            draws["layer"] = BLOCKS
        return lambda: getattr(tx.metrics, name)(method, model_fn, params, x, y, **draws)

    theirs_classes = {
        "avg_sensitivity": (quantus.AvgSensitivity, {"nr_samples": n}),
        "max_sensitivity": (quantus.MaxSensitivity, {"nr_samples": n}),
        "local_lipschitz_estimate": (quantus.LocalLipschitzEstimate, {"nr_samples": n}),
        "relative_input_stability": (quantus.RelativeInputStability, {"nr_samples": n}),
        "relative_output_stability": (quantus.RelativeOutputStability, {"nr_samples": n}),
        "relative_representation_stability": (quantus.RelativeRepresentationStability,
                                              {"nr_samples": n, "layer_names": BLOCKS}),
        "continuity": (quantus.Continuity, {"nr_steps": args.steps}),
        "consistency": (quantus.Consistency, {}),
    }

    def quantus_call(metric, options, method):
        explain = explainer(method)

        def call():
            return metric(disable_warnings=True, **options)(
                model=net, x_batch=xn, y_batch=yn, a_batch=a.copy(), s_batch=None, channel_first=True,
                explain_func=explain, explain_func_kwargs=None, model_predict_kwargs=None, softmax=False,
                batch_size=8, device=str(device))
        return call

    chosen = [m for m in args.metrics.split(",") if m] or list(METRICS)
    what = (f"{device}, resnet18 112x112, batch 8, tx.saliency, {n} draws, {args.steps} translations, "
            f"ours batch_size {bs}, {args.clock} clock, {args.rounds} rounds")
    print(_common.machine(torch.get_num_threads(), what))  # noqa: T201
    header = ["metric", "ours s", "Quantus s", "floor s", "ours / floor", "Quantus / floor", "Quantus's floor s",
              "Quantus / its floor", "calls: ours", "calls: Quantus"]
    rows = []
    for name in chosen:
        ours_calls, their_calls = _common.Calls(), _common.Calls()
        metric, options = theirs_classes[name]
        for calls, call in ((ours_calls, ours(name, ours_calls.method(saliency), fn)),
                            (their_calls, quantus_call(metric, options, their_calls.method(saliency)))):
            handle = calls.hook(net)
            try:
                call()  # records the calls; a warm-up
            finally:
                handle.remove()
        floor = _common.replay(net, ours_calls.calls, x, y)
        their_floor = _common.replay(net, their_calls.calls, x, y)
        floor(), their_floor()  # warm-up
        times = _common.medians(_common.race({"ours": ours(name, saliency, fn),
                                              "quantus": quantus_call(metric, options, saliency), "floor": floor,
                                              "their_floor": their_floor},
                                             rounds=args.rounds, sync=sync, warmup=False, clock=clock))
        rows.append(row(name, times, ours_calls, their_calls))
        print("| " + " | ".join(rows[-1]) + " |", flush=True)  # noqa: T201
    print(_common.table(header, rows, right=[1, 2, 3, 4, 5, 6, 7]))  # noqa: T201


if __name__ == "__main__":
    main()
