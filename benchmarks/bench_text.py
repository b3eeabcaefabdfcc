"""Layer integrated gradients on a BERT classifier: torchex_fn vs its floor and captum, in one process.

A 4-layer BERT (hidden 256, 4 heads, intermediate 1024; random init, eval), sequence 128, batch 8,
32 path points (Gauss-Legendre), attributed at ``bert.embeddings``. Every contender runs in this one
process, interleaved round-robin; the median over rounds is reported as a ratio to the floor.

Floor: 32 times a plain forward of the 8 sequences with the embeddings' output made a leaf (a forward
hook), and ``torch.autograd.grad`` of the target logits to it (the work integrated gradients cannot
avoid: one forward and one backward to the layer per path point, 8 examples per forward).

    python benchmarks/bench_text.py [--threads 2] [--rounds 5] [--steps 32]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _common as C  # noqa: E402

import torchex_fn as tx  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--extra", action="store_true", help="also other chunk sizes")
    args = parser.parse_args()
    C.setup(args.threads)
    import transformers
    from captum.attr import LayerIntegratedGradients

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=1024, max_position_embeddings=512, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).eval()
    fn, params = tx.functionalize(model)
    batch, length, steps = args.batch, args.length, args.steps
    ids = torch.randint(1000, 30000, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    x = {"input_ids": ids, "attention_mask": mask}
    reference = torch.zeros_like(ids)
    target = torch.tensor([i % 2 for i in range(batch)])
    layer = model.bert.embeddings

    def ours(batch_size=None):
        return lambda: tx.integrated_gradients(fn, params, x, target, layer="bert.embeddings", steps=steps,
                                               baseline={"input_ids": reference}, batch_size=batch_size)

    def forward(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    lig = LayerIntegratedGradients(forward, layer)

    def captum(internal):
        return lambda: lig.attribute(ids, baselines=reference, target=target, additional_forward_args=(mask,),
                                     n_steps=steps, internal_batch_size=internal)

    def floor():
        grads = None
        for _ in range(steps):
            seen = {}

            def hook(module, inputs, output):
                seen["a"] = output.detach().requires_grad_(True)
                return seen["a"]
            handle = layer.register_forward_hook(hook)
            try:
                logits = model(input_ids=ids, attention_mask=mask).logits
            finally:
                handle.remove()
            g = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), seen["a"])[0]
            grads = g if grads is None else grads + g
        return grads

    contenders = {
        "floor: 32 x (forward + backward to embeddings), 8 per forward": floor,
        "torchex_fn integrated_gradients(layer=), default batch_size": ours(),
        f"captum LayerIntegratedGradients, internal_batch_size={batch}": captum(batch),
    }
    if args.extra:
        contenders["captum LayerIntegratedGradients, internal_batch_size=None (all 256 rows)"] = captum(None)
        contenders["torchex_fn, batch_size=32 (4 points per forward)"] = ours(32)
    # warm-up (and the layer-shape memo), and the same numbers: ours against captum
    warm = {name: f() for name, f in contenders.items()}
    a = warm["torchex_fn integrated_gradients(layer=), default batch_size"]
    b = warm[f"captum LayerIntegratedGradients, internal_batch_size={batch}"]
    err = ((a - b).abs().max() / b.abs().max()).item()
    del warm
    times = C.race(contenders, args.rounds, warmup=False, progress=lambda r, times: print(
        f"round {r + 1}: " + ", ".join(f"{t[-1]:.2f}" for t in times.values()), flush=True))
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"BERT 4 layers hidden 256, batch {batch} x {length} tokens, {steps} steps, {args.rounds} rounds; "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; max|ours - captum| / max|captum| = {err:.1e}")
    floor_time = statistics.median(times[next(iter(times))])
    captum_time = statistics.median(times[f"captum LayerIntegratedGradients, internal_batch_size={batch}"])
    print("| contender | median s | min s | ratio to floor | ratio to captum (same layout) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med:.3f} | {min(t):.3f} | {med / floor_time:.3f} | {med / captum_time:.3f} |")


if __name__ == "__main__":
    main()
