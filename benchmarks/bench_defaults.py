"""Default settings, ours against captum's (issue 22 item 2): each method called as a first-day user calls
it, with no ``batch_size`` / ``internal_batch_size`` / ``perturbations_per_eval``, on three kinds of input.

* image: torchvision resnet18 (random weights) at 224 x 224, batch 4 (``--image-steps`` path points and
  samples, 16 by default to keep a round short on a shared CPU; the chunking question is the same);
* text: a small BERT (2 layers, hidden 64, vocabulary 100), batch 4 x 32 tokens, attributed at
  ``bert.embeddings`` (captum's ``LayerIntegratedGradients``; its ``LayerGradientShap`` interpolates
  the inputs, impossible for token ids);
* tabular: an MLP 16 -> 64 -> 64 -> 3 on a batch of 64 rows.

Methods: integrated_gradients (50 steps, Gauss-Legendre, as captum's default), smooth(saliency) vs
``NoiseTunnel(Saliency)`` (same number of samples), gradient_shap (5 samples, as captum), occlusion and
feature_ablation (captum's ``perturbations_per_eval=1`` default; ours ``batch_size=64``). Rounds are
interleaved (one call of each contender per round, after a warm-up call) and the median is reported as
the ratio ours / captum (below 1.05 is the goal: never slower than captum's default by more than 5 %).

Usage::

    python benchmarks/bench_defaults.py                   # all kinds, 5 rounds
    python benchmarks/bench_defaults.py --kinds text tabular --rounds 9
    python benchmarks/bench_defaults.py --kinds image --methods gradient_shap --threads 1
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torchex_fn as tx  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from captum import attr as ca  # noqa: E402


def image_cases(steps):
    model = C.resnet18()
    fn, params = tx.functionalize(model)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([1, 2, 3, 4])
    baselines = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 0.1
    return {
        "integrated_gradients": (
            lambda: tx.integrated_gradients(fn, params, x, target, steps=steps),
            lambda: ca.IntegratedGradients(model).attribute(x, target=target, n_steps=steps)),
        "smooth(saliency)": (
            lambda: tx.smooth(tx.saliency, samples=steps, stdev=0.1, stdev_spread=False,
                              generator=torch.Generator().manual_seed(0))(fn, params, x, target),
            lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(x, target=target, nt_type="smoothgrad",
                                                                 nt_samples=steps, stdevs=0.1, abs=False)),
        "gradient_shap": (
            lambda: tx.gradient_shap(fn, params, x, target, baselines=baselines, generator=torch.Generator()),
            lambda: ca.GradientShap(model).attribute(x, baselines, target=target)),
        "occlusion": (
            lambda: tx.occlusion(fn, params, x, target, window=(3, 56, 56), stride=(3, 56, 56)),
            lambda: ca.Occlusion(model).attribute(x, (3, 56, 56), strides=(3, 56, 56), target=target)),
        "feature_ablation": (
            lambda: tx.feature_ablation(fn, params, x, target, feature_mask=tx.masks.grid((224, 224), 56)),
            lambda: ca.FeatureAblation(model).attribute(x, target=target,
                                                        feature_mask=tx.masks.grid((224, 224), 56)[None, None])),
    }


def text_cases():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).eval()
    fn, params = tx.functionalize(model)
    ids = torch.randint(5, 100, (4, 32), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    x = {"input_ids": ids, "attention_mask": mask}
    reference = torch.zeros_like(ids)
    target = torch.tensor([0, 1, 0, 1])

    def forward(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    layer = model.bert.embeddings
    return {
        "integrated_gradients": (
            lambda: tx.integrated_gradients(fn, params, x, target, layer="bert.embeddings",
                                            baseline={"input_ids": reference}),
            lambda: ca.LayerIntegratedGradients(forward, layer).attribute(
                ids, baselines=reference, target=target, additional_forward_args=(mask,))),
    }


def tabular_cases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    target = torch.arange(64) % 3
    baselines = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    return {
        "integrated_gradients": (
            lambda: tx.integrated_gradients(fn, params, x, target),
            lambda: ca.IntegratedGradients(model).attribute(x, target=target)),
        "smooth(saliency)": (
            lambda: tx.smooth(tx.saliency, samples=25, stdev=0.1, stdev_spread=False,
                              generator=torch.Generator().manual_seed(0))(fn, params, x, target),
            lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(x, target=target, nt_type="smoothgrad",
                                                                 nt_samples=25, stdevs=0.1, abs=False)),
        "gradient_shap": (
            lambda: tx.gradient_shap(fn, params, x, target, baselines=baselines, generator=torch.Generator()),
            lambda: ca.GradientShap(model).attribute(x, baselines, target=target)),
        "occlusion": (
            lambda: tx.occlusion(fn, params, x, target, window=(1,), stride=(1,)),
            lambda: ca.Occlusion(model).attribute(x, (1,), target=target)),
        "feature_ablation": (
            lambda: tx.feature_ablation(fn, params, x, target),
            lambda: ca.FeatureAblation(model).attribute(x, target=target)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["image", "text", "tabular"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-steps", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods")
    args = parser.parse_args()
    C.setup(args.threads)
    rows = []
    for kind in args.kinds:
        cases = {"image": lambda: image_cases(args.image_steps), "text": text_cases, "tabular": tabular_cases}[kind]()
        for method, (ours, captum) in cases.items():
            if args.methods and method not in args.methods:
                continue
            times = C.medians(C.race({"ours": ours, "captum": captum}, args.rounds))
            rows.append((kind, method, f"{times['ours'] * 1e3:.1f}", f"{times['captum'] * 1e3:.1f}",
                         C.ratio(times["ours"], times["captum"])))
            print(" | ".join(rows[-1]), flush=True)
    print(C.machine(args.threads, f"{args.rounds} rounds, medians"))
    print(C.table(["input", "method", "ours ms", "captum ms", "ours / captum"], rows, right=(2, 3, 4)))


if __name__ == "__main__":
    main()
