"""The faithfulness metrics of ``tx.metrics`` against Quantus 0.6.0 and against their floor: resnet18 (random
weights) at 112 x 112, a batch of 8, the same numbers of perturbations (forwards of an image) on both sides.

The floor of a metric is the bare forwards it makes (recorded on a first call: how many images, in which
batches), replayed as ``model(images)`` without autograd in the same process (``_common.Calls`` /
``_common.replay``). Reported per metric: seconds of ours, Quantus and the floor (median over interleaved
rounds), ours / floor (the overhead ours adds to its forwards) and Quantus / floor (the most any implementation
making these forwards can gain on Quantus on this machine), and the images each library sent through the model.

Quantus calls the model once per perturbation step with the batch of 8 and builds every perturbed image in NumPy;
``tx.metrics`` builds them on ``x``'s device and scores ``batch_size`` images per forward pass. Needs Quantus, so
it runs in the environment that has it (see ``tests/references/quantus/README.md``), with this checkout first::

    PYTHONPATH=. /work/quantusenv/bin/python benchmarks/bench_faithfulness.py --threads 1 --clock cpu \
        [--only pixel_flipping]

IROF and ROAD raise in Quantus on 3-channel images: only ours and the floor are timed. Sensitivity-n differs in
kind (Quantus removes features cumulatively, 24 steps; ours draws 6 random subsets for each of 4 sizes: 24
forwards too).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # NumPy's BLAS: one thread, as torch
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402
from _common import machine, resnet18, setup  # noqa: E402

import torchex_fn as tx  # noqa: E402

STEP = 112 * 112 // 8  # 1568 elements a step: 3 * 112 * 112 / 1568 = 24 steps


class _Sized:
    """``tx.metrics`` with ``batch_size`` bound."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __getattr__(self, name):
        metric = getattr(tx.metrics, name)
        return lambda *args, **options: metric(*args, batch_size=self.batch_size, **options)


def quantus_cases(quantus):
    return {
        "pixel_flipping": (quantus.PixelFlipping, {"features_in_step": STEP}),
        "region_perturbation": (quantus.RegionPerturbation, {"patch_size": 28, "regions_evaluation": 16}),
        "selectivity": (quantus.Selectivity, {"patch_size": 28}),
        "monotonicity": (quantus.Monotonicity, {"features_in_step": STEP}),
        "monotonicity_correlation": (quantus.MonotonicityCorrelation, {"features_in_step": 4 * STEP,
                                                                       "nr_samples": 4}),
        "faithfulness_estimate": (quantus.FaithfulnessEstimate, {"features_in_step": STEP}),
        "faithfulness_correlation": (quantus.FaithfulnessCorrelation, {"nr_runs": 24, "subset_size": 224}),
        "sensitivity_n": (quantus.SensitivityN, {"features_in_step": STEP}),
        "infidelity": (quantus.Infidelity, {"perturb_patch_sizes": [28], "n_perturb_samples": 2}),
        "sufficiency": (quantus.Sufficiency, {}),
    }


def blackout(count: list, patch: int = 28, side: int = 4):
    """Quantus's Infidelity perturbation: one more patch blacked out per sample, raster order."""
    def perturb(x, generator):
        k = count[0] % (side * side)
        count[0] += 1
        mask = torch.zeros(x.shape[-2:], dtype=torch.bool, device=x.device)
        for j in range(k + 1):
            r, c = divmod(j, side)
            mask[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = True
        floor = x.reshape(x.shape[0], -1).amin(1).view(-1, 1, 1, 1)
        perturbed = torch.where(mask, floor, x)
        return x - perturbed, perturbed
    return perturb


def ours_cases(fn, params, x, a, y, batch_size):
    m = _Sized(batch_size)
    gen = torch.Generator().manual_seed(0)
    return {
        "pixel_flipping": lambda: m.pixel_flipping(fn, params, x, a, y, features_in_step=STEP),
        "region_perturbation": lambda: m.region_perturbation(fn, params, x, a, y, patch_size=28),
        "selectivity": lambda: m.selectivity(fn, params, x, a, y, patch_size=28),
        "monotonicity": lambda: m.monotonicity(fn, params, x, a, y, features_in_step=STEP),
        "monotonicity_correlation": lambda: m.monotonicity_correlation(fn, params, x, a, y, nr_samples=4,
                                                                       features_in_step=4 * STEP, generator=gen),
        "faithfulness_estimate": lambda: m.faithfulness_estimate(fn, params, x, a, y, features_in_step=STEP),
        "faithfulness_correlation": lambda: m.faithfulness_correlation(fn, params, x, a, y, nr_runs=24,
                                                                       generator=gen),
        "sensitivity_n": lambda: m.sensitivity_n(fn, params, x, a, y, features_in_step=7526, nr_samples=6,
                                                 generator=gen),
        "infidelity": lambda: m.infidelity(fn, params, x, a, y, perturb_fn=blackout([0]), n_perturb_samples=32),
        "sufficiency": lambda: tx.metrics.sufficiency(fn, params, x, a),
        "irof": lambda: m.irof(fn, params, x, a, y, patch_size=28),
        "road": lambda: m.road(fn, params, x, a, y, percentages=list(range(5, 100, 20)), generator=gen),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                        help="cpu: the process's CPU time (with one thread it leaves out the waits for a core)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--model", choices=("resnet18", "small"), default="resnet18",
                        help="small: a 2-layer CNN (8 channels), where the per-call overhead shows")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per forward pass of ours (on CPU 8 beats 64: the activations stay in cache)")
    parser.add_argument("--skip", nargs="*", default=[])
    args = parser.parse_args()
    setup(args.threads)
    import quantus
    if not hasattr(np, "trapz"):  # numpy 2.4 removed it; Quantus 0.6.0 still calls it
        np.trapz = np.trapezoid
    warnings.filterwarnings("ignore")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    net = resnet18() if args.model == "resnet18" else torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(128, 10)).eval()
    fn, params = tx.functionalize(net)
    x = torch.rand(8, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)
        a = tx.saliency(fn, params, x, y).detach()
    theirs = quantus_cases(quantus)
    print(machine(args.threads, f"{args.model} 112 x 112, batch 8, CPU, ours batch_size {args.batch_size}, "  # noqa: T201
                                f"{args.clock} clock, {args.rounds} rounds"))
    header = ["metric", "ours s", "Quantus s", "floor s", "ours / floor", "Quantus / floor", "Quantus's floor s",
              "Quantus / its floor", "calls: ours", "calls: Quantus"]
    rows = []

    def quantus_call(name):
        metric, options = theirs[name]

        def call():
            metric(disable_warnings=True, **options)(
                model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy(), s_batch=None, batch_size=8,
                channel_first=True, explain_func=None, explain_func_kwargs=None, model_predict_kwargs=None,
                softmax=False, device="cpu")
        return call

    with torch.no_grad():
        fn(params, x)  # warm-up
        for name in ours_cases(fn, params, x, a, y, args.batch_size):
            if (args.only and name not in args.only) or name in args.skip:
                continue
            ours_calls = _common.Calls()
            handle = ours_calls.hook(net)
            try:
                ours_cases(fn, params, x, a, y, args.batch_size)[name]()  # records the calls; a warm-up
            finally:
                handle.remove()
            contenders = {"ours": ours_cases(fn, params, x, a, y, args.batch_size)[name],
                          "floor": _common.replay(net, ours_calls.calls, x, y)}
            contenders["floor"]()  # warm-up
            their_calls = _common.Calls()
            if name in theirs:
                contenders["quantus"] = quantus_call(name)
                handle = their_calls.hook(net)
                try:
                    contenders["quantus"]()  # records the calls; a warm-up
                finally:
                    handle.remove()
                contenders["their_floor"] = _common.replay(net, their_calls.calls, x, y)
                contenders["their_floor"]()  # warm-up
            times = _common.medians(_common.race(contenders, args.rounds, warmup=False, clock=clock))
            floor, their, their_floor = times["floor"], times.get("quantus"), times.get("their_floor")

            def cell(value, digits=2):
                return "-" if value is None else f"{value:.{digits}f}"
            rows.append([name, cell(times["ours"]), cell(their), cell(floor), cell(times["ours"] / floor),
                         cell(None if their is None else their / floor), cell(their_floor),
                         cell(None if their is None or their_floor is None else their / their_floor),
                         ours_calls.summary(), their_calls.summary() if their is not None else "-"])
            print("| " + " | ".join(rows[-1]) + " |", flush=True)  # noqa: T201
    print(_common.table(header, rows, right=[1, 2, 3, 4, 5, 6, 7]))  # noqa: T201


if __name__ == "__main__":
    main()
