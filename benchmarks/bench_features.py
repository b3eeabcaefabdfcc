"""Feature methods: torchex_fn vs captum at the same number of model evaluations.

Model: torchvision resnet18 (random weights, eval mode), a batch of 2 images at 64 x 64 (``--size``),
CPU, 2 threads; feature mask: a 4 x 4 grid of 16 cells (``tx.masks.grid``). Methods and settings:

* ``feature_ablation`` vs captum ``FeatureAblation``: 16 ablations + the input;
* ``shapley_value_sampling`` vs ``ShapleyValueSampling``: 4 permutations (captum 4 x 16 + 1
  evaluations; ours 4 x 15 + 2, since every ordering ends at the input, evaluated once);
* ``kernel_shap`` vs ``KernelShap``: 64 coalitions;
* ``lime`` vs ``Lime(interpretable_model=SkLearnLinearRegression())`` (the same regression as ours;
  captum's default lasso costs about the same): 64 coalitions.

The floor is bare forwards of as many images as ours evaluates, in batches of ``16 B``. captum runs twice: with its default ``perturbations_per_eval=1`` (one perturbed batch of ``B`` images
per forward) and with ``perturbations_per_eval=16``, the forward batch that ours uses
(``batch_size=16 B``). Lime and KernelShap in captum fit one example at a time. The number of images
that went through the model is counted once per contender (outside the timing). Rounds are
interleaved (one call of every contender per round) and the median is reported, in a markdown table.

Usage::

    python benchmarks/bench_features.py              # 5 rounds, batch 2 at 64 x 64
    python benchmarks/bench_features.py --size 112 --rounds 7
    python benchmarks/bench_features.py --quick      # 2 rounds at 32 x 32
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

import torchex_fn as tx

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # captum's import warns about torch.jit.script
    from captum._utils.models.linear_model import SkLearnLinearRegression
    from captum.attr import FeatureAblation, KernelShap, Lime, ShapleyValueSampling
import torchvision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 rounds at 32 x 32")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: time.process_time (this process's CPU time, steadier "
                             "on a loaded machine; use it with --threads 1)")
    args = parser.parse_args()
    size, rounds = (32, 2) if args.quick else (args.size, args.rounds)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    fn, params = tx.functionalize(model)
    batch = args.batch
    x = torch.randn(batch, 3, size, size)
    target = torch.arange(batch)
    mask = tx.masks.grid((size, size), size // 4)                              # 16 cells
    captum_mask = mask[None, None]
    per_eval = 16
    samples = {"shapley_value_sampling": 4, "kernel_shap": 64, "lime": 64}

    def gen():
        return torch.Generator().manual_seed(0)

    ours = {
        "feature_ablation": lambda: tx.feature_ablation(fn, params, x, target, feature_mask=mask,
                                                        batch_size=per_eval * batch),
        "shapley_value_sampling": lambda: tx.shapley_value_sampling(
            fn, params, x, target, feature_mask=mask, samples=samples["shapley_value_sampling"],
            batch_size=per_eval * batch, generator=gen()),
        "kernel_shap": lambda: tx.kernel_shap(fn, params, x, target, feature_mask=mask, samples=samples["kernel_shap"],
                                              batch_size=per_eval * batch, generator=gen()),
        "lime": lambda: tx.lime(fn, params, x, target, feature_mask=mask, samples=samples["lime"],
                                batch_size=per_eval * batch, generator=gen()),
    }

    def captum(name, ppe):
        def run():
            torch.manual_seed(0)
            if name == "feature_ablation":
                return FeatureAblation(model).attribute(x, target=target, feature_mask=captum_mask,
                                                        perturbations_per_eval=ppe)
            if name == "shapley_value_sampling":
                return ShapleyValueSampling(model).attribute(x, target=target, feature_mask=captum_mask,
                                                             n_samples=samples[name], perturbations_per_eval=ppe)
            explainer = KernelShap(model) if name == "kernel_shap" else Lime(
                model, interpretable_model=SkLearnLinearRegression())
            return explainer.attribute(x, target=target, feature_mask=captum_mask, n_samples=samples[name],
                                       perturbations_per_eval=ppe)
        return run

    floor_images = {"feature_ablation": 17 * batch,
                    "shapley_value_sampling": (samples["shapley_value_sampling"] * 15 + 2) * batch,
                    "kernel_shap": samples["kernel_shap"] * batch, "lime": samples["lime"] * batch}

    def floor(name):
        """Bare forwards of as many images as ours evaluates, ``per_eval * B`` per forward."""
        def run():
            left = floor_images[name]
            while left:
                n = min(per_eval * batch, left)
                model(x[:1].expand(n, -1, -1, -1))
                left -= n
        return run

    contenders = {}
    for name in ours:
        contenders[(name, "floor")] = floor(name)
        contenders[(name, "torchex_fn")] = ours[name]
        contenders[(name, "captum ppe=1")] = captum(name, 1)
        contenders[(name, f"captum ppe={per_eval}")] = captum(name, per_eval)

    # images through the model, counted once per contender with a forward pre-hook (not timed)
    images = {}
    handle = model.register_forward_pre_hook(lambda m, inputs: images.__setitem__("n", images["n"] + inputs[0].shape[0]))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for key, call in contenders.items():
                images["n"] = 0
                call()
                images[key] = images["n"]
    finally:
        handle.remove()

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    times = {key: [] for key in contenders}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(rounds):
            for key, call in contenders.items():
                start = clock()
                call()
                times[key].append(clock() - start)
    med = {key: statistics.median(t) for key, t in times.items()}
    load = os.getloadavg()
    print(f"resnet18 (random init), batch {batch} at {size}x{size}, 16-cell grid mask, {args.threads} threads, "
          f"{rounds} rounds, {args.clock} clock, torch {torch.__version__}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print("| method | contender | images through the model | ms / call | ours / this |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in ours:
        mine = med[(name, "torchex_fn")]
        for who in ("floor", "torchex_fn", "captum ppe=1", f"captum ppe={per_eval}"):
            key = (name, who)
            ratio = "" if who == "torchex_fn" else f"{mine / med[key]:.2f}"
            print(f"| {name} | {who} | {images[key]} | {1000 * med[key]:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
