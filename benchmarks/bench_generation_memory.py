"""Peak memory and time of continuation attribution at length: torchex_fn vs captum, one fresh process each.

A GPT-2-small-shaped model (12 layers, hidden 768, 12 heads, vocabulary 50257; random weights, eval, eager
attention, float32), a prompt of 1,024 tokens and 32 generated tokens (teacher-forced), input x gradient at
the token embeddings (``transformer.wte``). Every configuration runs in its own child process (this script
calls itself with ``--child``), which builds the model, runs the configuration once and reports its time
and its peak resident memory (``VmHWM`` of ``/proc/self/status``, the high-water mark of the whole process:
interpreter, torch, weights and the work) and its resident memory before the work (``VmRSS``), so the
work's own peak is ``peak - before``, and the work's CPU time (user + system, ``getrusage``: with one thread, the
time the work had the core, which other processes on the machine do not inflate). ``--repeat N`` runs the rows
round-robin N times (ours and captum's alternate, so a change of load between rows falls on both) and reports
each row's median, min and max. Rows:

* ``plain forward + backward``: the unit: one forward of ``[prompt; continuation]`` (all logits, as a
  plain HuggingFace call) and one backward of the continuation's summed log-probability to the
  embeddings (parameters frozen); its time split into the forward and the backward;
* ``torchex_fn batch_size=k [checkpoint]``: ``continuation_attribution(method="input_x_gradient",
  batch_size=k, checkpoint=...)``;
* ``captum``: ``LLMGradientAttribution(LayerGradientXActivation(model, model.transformer.wte))`` with the
  same prompt, target and baseline (captum runs one forward and one backward per output token).

The goals (issue 18): with ``checkpoint=True`` peak <= 0.6 x the unit's and time <= 1.5 x (one forward +
32 backward passes of the unit); without checkpointing peak <= 1.1 x the unit's; ours <= 0.5 x captum's
time and below its peak.

    python benchmarks/bench_generation_memory.py --threads 1 [--prompt 1024] [--out 32] [--layers 12]
        [--hidden 768] [--heads 12] [--vocab 50257] [--batch-sizes 1 4 8 32] [--skip-captum]
        [--checkpoint-only | --plain-only] [--attn eager|sdpa] [--repeat N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _status(field: str) -> float:
    """``VmHWM`` / ``VmRSS`` of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _allocator() -> str:
    """The glibc malloc settings every row inherits. By default glibc raises its mmap threshold (up to 32 MiB)
    each time a large block is freed, so later blocks of that size come from the heap, whose freed pages stay
    resident: a checkpointed backward, which frees and reallocates each block's activations, then shows a peak
    of memory it no longer uses. ``MALLOC_MMAP_THRESHOLD_=131072`` fixes the threshold (large blocks are mmapped
    and returned on free), so the peak is the memory in use."""
    keys = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")
    set_ = [f"{k}={os.environ[k]}" for k in keys if k in os.environ]
    return ", ".join(set_) if set_ else "glibc malloc defaults (dynamic mmap threshold)"


def child(args) -> dict:
    """Build the model, run one configuration once, return its numbers."""
    import warnings

    import captum.attr  # noqa: F401  (every child imports the same modules: equal baselines)
    import torch
    import transformers

    import torchex_fn as tx
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=max(1024, args.prompt + args.out),
                                  n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
                                  attn_implementation=args.attn, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, args.vocab, (1, args.prompt), generator=g)
    generated = torch.randint(1, args.vocab, (args.out,), generator=g)
    before = _status("VmRSS")
    result: dict = {}
    start = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    if args.child == "plain":
        ids = torch.cat([prompt, generated[None]], 1)
        emb = model.transformer.wte(ids).detach().requires_grad_()
        t0 = time.perf_counter()
        logits = model(inputs_embeds=emb).logits
        logp = torch.log_softmax(logits[:, args.prompt - 1:-1], -1).gather(-1, generated[None, :, None]).sum()
        t1 = time.perf_counter()
        (grad,) = torch.autograd.grad(logp, emb)
        t2 = time.perf_counter()
        result.update(forward_s=t1 - t0, backward_s=t2 - t1, check=float(grad.abs().sum()))
    elif args.child == "captum":
        from captum.attr import LayerGradientXActivation, LLMGradientAttribution, TextTokenInput
        sys.path.insert(0, str(Path(__file__).parent))
        from _common import IntTokenizer   # the benchmarks' one token-id tokenizer
        tok = IntTokenizer()
        llm = LLMGradientAttribution(LayerGradientXActivation(model, model.transformer.wte), tok)
        text = TextTokenInput(" ".join(map(str, prompt[0].tolist())), tok)
        res = llm.attribute(text, target=generated)
        result.update(check=float(torch.as_tensor(res.token_attr).abs().sum()))
    else:
        batch_size, checkpoint = args.child.split(":")
        fn, params = tx.functionalize(model)
        res = tx.continuation_attribution(fn, params, prompt, generated, method="input_x_gradient",
                                          layer="transformer.wte", batch_size=int(batch_size) or None,
                                          checkpoint=checkpoint == "ckpt")
        result.update(check=float(res.token_attr.abs().sum()))
    result.update(seconds=time.perf_counter() - start, peak_mib=_status("VmHWM"), before_mib=before)
    done = resource.getrusage(resource.RUSAGE_SELF)
    result.update(cpu_s=done.ru_utime - usage.ru_utime + done.ru_stime - usage.ru_stime,
                  sys_s=done.ru_stime - usage.ru_stime)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--out", type=int, default=32)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--skip-captum", action="store_true")
    parser.add_argument("--checkpoint-only", action="store_true", help="only the checkpoint=True rows (and the unit)")
    parser.add_argument("--plain-only", action="store_true", help="only the rows without checkpointing (and the unit)")
    parser.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                        help="GPT-2's attention implementation (transformers' default is sdpa)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all rows, round-robin; medians reported")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    configs = [("plain forward + backward (the unit)", "plain")]
    for k in args.batch_sizes:
        if not args.checkpoint_only:
            configs.append((f"torchex_fn batch_size={k}", f"{k}:plain"))
        if not args.plain_only:
            configs.append((f"torchex_fn batch_size={k} checkpoint=True", f"{k}:ckpt"))
    if not args.skip_captum:
        configs.append(("captum LLMGradientAttribution(LayerGradientXActivation)", "captum"))
    passed, skip = [], False   # the parent's arguments, less --repeat (a child runs once)
    for a in sys.argv[1:]:
        if skip or a.startswith("--repeat="):
            skip = False
        elif a == "--repeat":
            skip = True
        else:
            passed.append(a)
    runs: dict = {}
    for round_ in range(args.repeat):
        for name, key in configs:
            root = str(Path(__file__).resolve().parent.parent)   # this checkout's torchex_fn
            env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": str(args.threads),
                   "MKL_NUM_THREADS": str(args.threads)}
            done = subprocess.run([sys.executable, __file__, *passed, "--child", key], capture_output=True,
                                  text=True, env=env, cwd=root)
            if done.returncode != 0:
                print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            runs.setdefault(name, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {name}: {runs[name][-1]} (load {os.getloadavg()[0]:.1f})", file=sys.stderr,
                  flush=True)
    # a row's numbers: the median over rounds of each (peaks barely move; times move with the machine's load)
    rows = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    unit = rows.get(configs[0][0])
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}, {args.threads} thread(s); GPT-2 {args.layers} layers, "
          f"hidden {args.hidden}, {args.heads} heads, vocabulary {args.vocab}, {args.attn} attention; "
          f"prompt {args.prompt} tokens, "
          f"{args.out} output tokens; input x gradient at transformer.wte; one fresh process per row; "
          f"allocator: {_allocator()}\n")
    print("| configuration | time s | peak MiB | peak - before MiB | peak / unit's | time / (1 fwd + "
          f"{args.out} bwd) | time / captum's | peak / captum's | CPU s (system) | CPU / captum's |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    captum = rows.get("captum LLMGradientAttribution(LayerGradientXActivation)")
    for name, r in rows.items():
        cells = [name, f"{r['seconds']:.1f}", f"{r['peak_mib']:.0f}", f"{r['peak_mib'] - r['before_mib']:.0f}"]
        if unit:
            budget = unit["forward_s"] + args.out * unit["backward_s"]
            cells += [f"{r['peak_mib'] / unit['peak_mib']:.2f}", f"{r['seconds'] / budget:.2f}"]
        else:
            cells += ["", ""]
        cells += ([f"{r['seconds'] / captum['seconds']:.2f}", f"{r['peak_mib'] / captum['peak_mib']:.2f}"]
                  if captum else ["", ""])
        cells += [f"{r['cpu_s']:.1f} ({r['sys_s']:.1f})", f"{r['cpu_s'] / captum['cpu_s']:.2f}" if captum else ""]
        print("| " + " | ".join(cells) + " |")
    if args.repeat > 1 and captum:
        name_c = "captum LLMGradientAttribution(LayerGradientXActivation)"
        for name, rs in runs.items():
            if name.startswith("torchex_fn") and len(rs) == len(runs[name_c]):
                ratios = [r["seconds"] / c["seconds"] for r, c in zip(rs, runs[name_c])]
                print(f"\n{name}: time / captum's, round by round: " + ", ".join(f"{v:.3f}" for v in ratios))
    if unit:
        print(f"\nunit: forward {unit['forward_s']:.2f} s, backward {unit['backward_s']:.2f} s; "
              f"1 forward + {args.out} backward = {unit['forward_s'] + args.out * unit['backward_s']:.1f} s")
    checks = {name: r["check"] for name, r in rows.items() if name.startswith("torchex_fn") or name.startswith("captum")}
    if checks:
        print("sum |token_attr| per row (the same map everywhere): "
              + ", ".join(f"{v:.6g}" for v in checks.values()))


if __name__ == "__main__":
    main()
