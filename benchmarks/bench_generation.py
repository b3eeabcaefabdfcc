"""Per-output-token attribution of a GPT-2 continuation: torchex_fn vs captum's LLMGradientAttribution.

A GPT-2 of a realistic small size (random init, eval, eager attention): 4 layers, n_embd 256, 4 heads,
vocabulary 8192; a prompt of 32 tokens and a continuation of 8. Both contenders compute the
``[T_out, T_in]`` layer integrated gradients matrix at ``transformer.wte`` with the same steps,
quadrature (Gauss-Legendre) and baseline token; captum runs one LayerIntegratedGradients per output
token, torchex_fn one call whose backward passes are batched over the output tokens. Every contender
runs in this one process, interleaved round-robin; the table gives medians over rounds, the median
of the per-round ratios (robust to a load that drifts on a shared machine) and the ratio of the minima.

    python benchmarks/bench_generation.py [--threads 2] [--rounds 5] [--steps 20] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
import _common as C  # noqa: E402

import torchex_fn as tx  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--out", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[0, 40],
                        help="torchex_fn internal_batch_size values (0: None, all path points in one forward)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    C.setup(args.threads)
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=128, n_embd=256, n_layer=4, n_head=4,
                                  attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval().to(device)
    fn, params = tx.functionalize(model)
    prompt = torch.randint(1, args.vocab, (1, args.prompt), device=device)
    generated = torch.randint(1, args.vocab, (args.out,), device=device)
    tokenizer = C.IntTokenizer()
    text = TextTokenInput(" ".join(map(str, prompt[0].tolist())), tokenizer, baselines=0)
    captum_llm = LLMGradientAttribution(LayerIntegratedGradients(model, model.transformer.wte), tokenizer)

    contenders = {"captum LLMGradientAttribution(LayerIntegratedGradients)":
                  lambda: captum_llm.attribute(text, target=generated, n_steps=args.steps).token_attr}
    for bs in [b or None for b in args.batch_sizes]:
        contenders[f"torchex_fn.continuation_attribution internal_batch_size={bs}"] = (
            lambda bs=bs: tx.continuation_attribution(fn, params, prompt, generated, steps=args.steps,
                                                      internal_batch_size=bs).token_attr)
    results = {name: f() for name, f in contenders.items()}                 # warm-up and parity
    ref = results[next(iter(contenders))]
    for name, r in results.items():
        gap = float((r.reshape(ref.shape) - ref).abs().max() / ref.abs().max())
        print(f"parity {name}: max|ours - captum| / max|captum| = {gap:.1e}")

    times = C.race(contenders, args.rounds, sync=sync, warmup=False)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"\n{where}, torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads; "
          f"GPT-2 4 layers n_embd 256 vocab {args.vocab}, prompt {args.prompt}, {args.out} output tokens, "
          f"{args.steps} steps, {args.rounds} rounds; load average {os.getloadavg()[0]:.2f}\n")
    base = statistics.median(times[next(iter(contenders))])
    first = times[next(iter(contenders))]
    print("| contender | median s | min s | ratio of medians | median of per-round ratios | ratio of mins |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, t in times.items():
        med = statistics.median(t)
        per_round = statistics.median(a / b for a, b in zip(t, first))
        print(f"| {name} | {med:.3f} | {min(t):.3f} | {med / base:.2f} | {per_round:.2f} | {min(t) / min(first):.2f} |")


if __name__ == "__main__":
    main()
