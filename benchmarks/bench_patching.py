"""Activation patching and attribution patching on a GPT-2: torchex_fn vs a plain loop of hooked forwards.

A GPT-2 of a realistic small size (random init, eval, eager attention): 4 layers, n_embd 256, 4 heads,
vocabulary 8192, one prompt of 32 tokens whose token 10 is corrupted; the metric is a logit difference
at the last position; the layers are the 4 blocks' outputs (the residual stream). Contenders:

* the plain loop: what one writes with forward hooks (TransformerLens' ``run_with_hooks`` is the same
  pattern): for every layer and position, a hook that replaces the layer's output at that position by the
  corrupt run's, one forward each (``L * T`` forwards of one sequence);
* ``tx.activation_patching`` with ``batch_size`` 1 (one forward a cell, as the loop), 8, and ``None``
  (every position of a layer in one forward); cells whose activations are equal (positions before the
  corrupted one) cost nothing;
* ``tx.attribution_patching`` (two forwards, one backward);
* the floor: one forward of the one prompt, the unit of everything above.

Every contender runs in this one process, interleaved round-robin; medians over rounds and the median of
the per-round ratios to the plain loop.

    python benchmarks/bench_patching.py [--threads 2] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
import _common as C  # noqa: E402

import torchex_fn as tx  # noqa: E402


def plain_loop(model, names, clean, corrupt, answer, wrong):
    """Activation patching with forward hooks: one hooked forward per layer and position."""
    def last_diff(logits):
        return logits[:, -1, answer] - logits[:, -1, wrong]

    kept = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: kept.__setitem__(n, o))
               for n in names]
    with torch.no_grad():
        model(corrupt)
    for h in handles:
        h.remove()
    table = torch.empty(len(names), clean.shape[1])
    for li, name in enumerate(names):
        for t in range(clean.shape[1]):
            def patch(m, a, o, name=name, t=t):
                o = o.clone()
                o[:, t] = kept[name][:, t]
                return o
            handle = model.get_submodule(name).register_forward_hook(patch)
            with torch.no_grad():
                table[li, t] = last_diff(model(clean).logits)[0]
            handle.remove()
    return table


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    C.setup(args.threads)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=128, n_embd=256, n_layer=4, n_head=4,
                                  attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    fn, params = tx.functionalize(model)
    clean = torch.randint(1, args.vocab, (1, args.length))
    corrupt = clean.clone()
    corrupt[:, 10] = (clean[:, 10] + 1) % args.vocab
    answer, wrong = 5, 9
    metric = tx.patching.logit_difference(answer, wrong)
    names = [f"transformer.h.{i}" for i in range(4)]

    contenders = {"plain loop of hooked forwards": lambda: plain_loop(model, names, clean, corrupt, answer, wrong)}
    for bs in (1, 8, None):
        contenders[f"tx.activation_patching batch_size={bs}"] = (
            lambda bs=bs: tx.activation_patching(fn, params, clean, corrupt, metric, layers=names, batch_size=bs)[0])
    contenders["tx.attribution_patching"] = lambda: tx.attribution_patching(fn, params, clean, corrupt, metric,
                                                                            layers=names)[0]

    def one_forward():
        with torch.no_grad():
            return model(clean).logits
    contenders["floor: one forward of the prompt"] = one_forward

    ref = contenders["plain loop of hooked forwards"]()
    for name in list(contenders)[1:4]:
        print(f"parity {name}: max |ours - loop| = {float((contenders[name]() - ref).abs().max()):.1e}")
    atp = contenders["tx.attribution_patching"]()
    effect = ref - metric(one_forward())[0]
    print(f"AtP vs activation patching: Spearman (ties by position) of |effect| "
          f"{float(tx.metrics.spearman(effect.abs()[None], atp.abs()[None])[0]):.3f}")

    times = C.race(contenders, args.rounds)
    print(f"\n{C.machine(args.threads)}, transformers {transformers.__version__}; GPT-2 4 layers n_embd 256, "
          f"vocab {args.vocab}, prompt {args.length}, corrupted at position 10, {args.rounds} rounds\n")
    first = times["plain loop of hooked forwards"]
    rows = []
    for name, t in times.items():
        per_round = statistics.median(a / b for a, b in zip(t, first))
        rows.append((name, f"{statistics.median(t) * 1e3:.1f}", f"{min(t) * 1e3:.1f}", f"{per_round:.3f}"))
    print(C.table(["contender", "median ms", "min ms", "median per-round ratio to the loop"], rows, right=(1, 2, 3)))


if __name__ == "__main__":
    main()
