"""Token ablation of a continuation with and without the clean run's key/value cache: FLOPs and time.

``continuation_ablation(cache=True)`` reruns, for ablated prompt token ``i``, only the tokens ``i ..`` over
the clean run's keys and values of the prefix; ``cache=False`` reruns every sequence in full. FLOPs are
counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and attention), time is the
median over rounds, both contenders in this one process, interleaved. GPT-2 shape (random weights, eval,
eager attention); the maps of the two agree to float rounding (printed).

    python benchmarks/bench_generation_cache.py [--threads 1] [--prompt 64] [--out 8] [--layers 4]
        [--hidden 256] [--heads 4] [--vocab 8192] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
import _common as C  # noqa: E402

import torchex_fn as tx  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--out", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    C.setup(args.threads)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=max(128, args.prompt + args.out),
                                  n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
                                  attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    fn, params = tx.functionalize(transformers.GPT2LMHeadModel(cfg).eval())
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, args.vocab, (1, args.prompt), generator=g)
    generated = torch.randint(1, args.vocab, (1, args.out), generator=g)
    contenders = {f"cache={c}": (lambda c=c: tx.continuation_ablation(fn, params, prompt, generated, cache=c).token_attr)
                  for c in (False, True)}
    flops, maps = {}, {}
    with torch.no_grad():
        for name, f in contenders.items():
            counter = FlopCounterMode(display=False)
            with counter:
                maps[name] = f()
            flops[name] = counter.get_total_flops()
        times = C.race(contenders, args.rounds, warmup=False)
    gap = float((maps["cache=True"] - maps["cache=False"]).abs().max() / maps["cache=False"].abs().max())
    print(C.machine(args.threads, f"GPT-2 {args.layers} layers hidden {args.hidden} vocabulary {args.vocab}, "
                    f"prompt {args.prompt}, {args.out} output tokens, {args.rounds} rounds"))
    print(f"max |cache - full| / max |full| = {gap:.1e}\n")
    print("| contender | GFLOP | FLOP ratio | median s | time ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base_f, base_t = flops["cache=False"], statistics.median(times["cache=False"])
    for name in contenders:
        t = statistics.median(times[name])
        print(f"| continuation_ablation({name}) | {flops[name] / 1e9:.1f} | {flops[name] / base_f:.2f} | {t:.2f} | "
              f"{t / base_t:.2f} |")


if __name__ == "__main__":
    main()
