"""AttnLRP timings (issue 17): torchex_fn's ``lrp(..., composite="attnlrp")`` vs LXT 2.1's patched model and a
bare forward + backward to the embeddings (the floor).

Model: HuggingFace ``LlamaForCausalLM`` from a config (4 layers, hidden 256, intermediate 688, 4 heads, vocab
1024, random weights, float32, eval mode, parameters without grad), eager and SDPA attention, batch 4 x 512
tokens by default; the target is each example's argmax logit at the last position. CPU, 2 threads.

LXT does not import under transformers 5.x, so this script runs in the LXT venv (transformers 4.57) with the
package taken from a checkout:

    PYTHONPATH=/work/main /work/lxtenv/bin/python benchmarks/bench_attnlrp.py            # batch 4 x 512
    PYTHONPATH=/work/main /work/lxtenv/bin/python benchmarks/bench_attnlrp.py --quick    # batch 2 x 128

On a shared machine add ``--threads 1 --clock cpu``: one thread, timed by the process's CPU time, which leaves out
the waits for a core (on 2 cores at load 5, wall-clock calls swung 3-6x; CPU-time medians and minima agree within
~10 %). ``--interleave`` puts LXT's calls into the same rounds as the others (see below).

Rows (seconds per call, medians over rounds, and ratios to the floor of the same attention):

* floor: ``inputs_embeds = embed(ids)`` with grad, forward with ``inputs_embeds=``, ``autograd.grad`` of the
  target logits to ``inputs_embeds``; relevance-free, the least an embedding-level map costs.
* ours: ``tx.lrp(model_fn, params, {"input_ids": ids}, target, composite="attnlrp", layer="model.embed_tokens")``.
  Skipped with a message while the package refuses ``composite="attnlrp"`` / ``layer=``.
* LXT: ``lxt.efficient.monkey_patch(modeling_llama, attnLRP)``, then the floor's computation on the patched
  model and ``inputs_embeds * grad``.

LXT patches transformers' classes and module globals process-wide, so the floor and ours are timed first
(interleaved round-robin), then LXT is patched in and timed. To see how much the machine's load moved between
the two phases, the script then puts back the attributes LXT replaced (saved before patching) and times the
floor once more; the LXT ratio is taken against the mean of the two floors, and both floors are printed.
With ``--interleave`` LXT is patched in and taken out again around each of its calls instead, so every row
shares every round (the script checks that the plain gradient comes back bit for bit after taking LXT out).
Run output: benchmarks/runs/attnlrp.md.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _common as C

import torchex_fn as tx


def build(attn: str, layers: int, hidden: int, intermediate: int, heads: int, vocab: int) -> torch.nn.Module:
    import transformers
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=heads, max_position_embeddings=2048)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def floor_fn(model: torch.nn.Module, ids: torch.Tensor, target: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        emb = model.get_input_embeddings()(ids).requires_grad_(True)
        logits = model(inputs_embeds=emb).logits[:, -1]
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), emb)
        return emb.detach() * grad
    return run


def ours_fn(model: torch.nn.Module, ids: torch.Tensor, target: torch.Tensor) -> Optional[Callable[[], Any]]:
    """The call, or None (with the reason printed) while the package refuses it."""
    model_fn, params = tx.functionalize(model, output=lambda o: o.logits[:, -1])

    def run() -> torch.Tensor:
        return tx.lrp(model_fn, params, {"input_ids": ids}, target, composite="attnlrp",
                      layer="model.embed_tokens")
    try:
        run()
    except (ValueError, TypeError) as e:
        print(f"ours: skipped, tx.lrp(..., composite='attnlrp', layer=...) is not available yet: "
              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return None
    return run


CLOCK = [time.perf_counter]


def timeit(f: Callable[[], Any]) -> float:
    """Seconds of one call of ``f`` on the chosen clock (wall: perf_counter; cpu: this process's CPU time, which
    leaves out the time the process waits for a core on a shared machine)."""
    start = CLOCK[0]()
    f()
    return CLOCK[0]() - start


def race(contenders: Dict[str, Callable[[], Any]], rounds: int) -> Dict[str, List[float]]:
    """_common.race's round-robin (a warm-up call each, then one call of each per round) on the chosen clock."""
    for f in contenders.values():
        f()
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, f in contenders.items():
            times[name].append(timeit(f))
    return times


LXT_TARGETS = [("LlamaMLP", "forward"), ("LlamaRMSNorm", "forward")]


def patch_lxt() -> Callable[[], None]:
    """Apply LXT's attnLRP patch map to modeling_llama; return a function that puts the originals back."""
    from torch.nn import Dropout
    from transformers.models.llama import modeling_llama as ml
    saved: List[tuple] = [(getattr(ml, c), a, getattr(getattr(ml, c), a)) for c, a in LXT_TARGETS]
    saved.append((Dropout, "forward", Dropout.forward))
    saved += [(ml, name, getattr(ml, name)) for name in ("eager_attention_forward", "ALL_ATTENTION_FUNCTIONS")]
    from lxt.efficient import monkey_patch
    from lxt.efficient.models.llama import attnLRP
    monkey_patch(ml, attnLRP)

    def restore() -> None:
        for owner, name, value in saved:
            setattr(owner, name, value)
    return restore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 2 x 128 tokens, 3 rounds")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--interleave", action="store_true",
                        help="patch LXT in and out around each of its calls, so all rows share every round")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time (with --threads 1, the work done, whatever the machine's load)")
    parser.add_argument("--attn", nargs="+", default=["eager", "sdpa"], choices=["eager", "sdpa"])
    args = parser.parse_args()
    batch = args.batch or (2 if args.quick else 4)
    tokens = args.tokens or (128 if args.quick else 512)
    rounds = args.rounds or (3 if args.quick else 5)
    C.setup(args.threads)
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    warnings.filterwarnings("ignore")

    import lxt  # noqa: F401  (fail early outside the LXT venv)
    import importlib.metadata as md
    import transformers
    print(C.machine(args.threads, f"transformers {transformers.__version__}, lxt {md.version('lxt')}"))
    print(f"Llama {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads, "
          f"vocab {args.vocab}, batch {batch} x {tokens} tokens, float32, {rounds} rounds; attention {args.attn}; "
          f"{args.clock} clock")

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (batch, tokens), generator=g)
    models = {a: build(a, args.layers, args.hidden, args.intermediate, args.heads, args.vocab) for a in args.attn}
    targets = {}
    for a, m in models.items():
        with torch.no_grad():
            targets[a] = m(input_ids=ids).logits[:, -1].argmax(-1)

    plain_maps = {a: floor_fn(m, ids, targets[a])() for a, m in models.items()}
    contenders: Dict[str, Callable[[], Any]] = {}
    ours_maps: Dict[str, torch.Tensor] = {}
    for a, m in models.items():
        contenders[f"floor {a}"] = floor_fn(m, ids, targets[a])
        run = ours_fn(m, ids, targets[a])
        if run is not None:
            contenders[f"ours {a}"] = run
            ours_maps[a] = run()
    lxt_runs = {a: floor_fn(m, ids, targets[a]) for a, m in models.items()}

    if args.interleave:
        print("LXT patched in and taken out again around each of its calls (originals saved by this script); "
              "one call of each row per round")
        restore = patch_lxt()
        lxt_maps = {a: f() for a, f in lxt_runs.items()}
        restore()
        for a in args.attn:   # the restore is complete: the plain map comes back bit for bit
            assert torch.equal(floor_fn(models[a], ids, targets[a])(), plain_maps[a]), "LXT not fully removed"
        times: Dict[str, List[float]] = {name: [] for name in contenders}
        times.update({f"LXT {a}": [] for a in args.attn})
        for f in contenders.values():   # warm-up
            f()
        for r in range(rounds + 1):          # round 0: LXT's warm-up
            for a in args.attn:
                for name in (f"floor {a}", f"ours {a}"):
                    if name in contenders:
                        t = timeit(contenders[name])
                        if r:
                            times[name].append(t)
                restore = patch_lxt()
                try:
                    t = timeit(lxt_runs[a])
                finally:
                    restore()
                if r:
                    times[f"LXT {a}"].append(t)
        med = C.medians(times)
        mins = {k: min(v) for k, v in times.items()}
        floors = {a: med[f"floor {a}"] for a in args.attn}
        after: Dict[str, float] = {}
    else:
        print("floor and ours timed first (unpatched, interleaved); then LXT's attnLRP patched into transformers' "
              "Llama classes (process-wide) and timed; then the originals put back and the floor timed again")
        raw = race(contenders, rounds)
        restore = patch_lxt()
        lxt_maps = {a: f() for a, f in lxt_runs.items()}
        raw.update(race({f"LXT {a}": f for a, f in lxt_runs.items()}, rounds))
        med = C.medians(raw)
        mins = {k: min(v) for k, v in raw.items()}
        restore()
        for a in args.attn:
            assert torch.equal(floor_fn(models[a], ids, targets[a])(), plain_maps[a]), "LXT not fully removed"
        after = C.medians(race({a: floor_fn(m, ids, targets[a]) for a, m in models.items()}, rounds))
        floors = {a: (med[f"floor {a}"] + after[a]) / 2 for a in args.attn}

    rows = []
    for a in args.attn:
        f1 = med[f"floor {a}"]
        fo, lx = f"floor {a}", f"LXT {a}"
        rows.append((fo + ("" if args.interleave else " (before LXT)"), f"{f1:.3f}", f"{mins[fo]:.3f}", "1.000",
                     "", "1.000", ""))
        if f"ours {a}" in med:
            o = f"ours {a}"
            rows.append((o, f"{med[o]:.3f}", f"{mins[o]:.3f}", C.ratio(med[o], f1), C.ratio(med[o], med[lx]),
                         C.ratio(mins[o], mins[fo]), C.ratio(mins[o], mins[lx])))
        else:
            rows.append((f"ours {a}", "skipped", "", "", "", "", ""))
        rows.append((f"LXT attnLRP {a}", f"{med[lx]:.3f}", f"{mins[lx]:.3f}", C.ratio(med[lx], floors[a]), "1.000",
                     C.ratio(mins[lx], mins[fo]), "1.000"))
        if a in after:
            rows.append((f"floor {a} (after LXT, unpatched)", f"{after[a]:.3f}", "", C.ratio(after[a], f1), "", "",
                         ""))
    print()
    print(C.table(["row", "median (s)", "min (s)", "x floor", "x LXT", "min x floor", "min x LXT"], rows,
                  right=(1, 2, 3, 4, 5, 6)))
    if not args.interleave:
        print("(LXT's x floor is against the mean of the floors before and after it)")
    print()
    for a in args.attn:
        lxt_map = lxt_maps[a]
        line = f"{a}: max|LXT - grad x input| / max|LXT| = " \
               f"{((plain_maps[a] - lxt_map).abs().max() / lxt_map.abs().max()).item():.1e}"
        if a in ours_maps:
            gap = ((ours_maps[a] - lxt_map).abs().max() / lxt_map.abs().max()).item()
            ours = med[f"ours {a}"]
            line += (f"; max|ours - LXT| / max|LXT| = {gap:.1e}; ours / floor = {ours / med[f'floor {a}']:.2f}"
                     f" (goal <= 1.3), ours / LXT = {ours / med[f'LXT {a}']:.2f} (goal <= 1.0)")
        print(line)
    print(f"load average at the end: {C.load()}; {time.strftime('%Y-%m-%d %H:%M:%S')}")


if __name__ == "__main__":
    main()
