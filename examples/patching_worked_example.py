"""Activation patching finds where a small GPT-2 moves a name, and attribution patching (AtP) agrees.

    python examples/patching_worked_example.py

1. Trains a 2-block GPT-2 (n_embd 64, 4 heads; HuggingFace ``GPT2LMHeadModel``, random initialisation)
   for 300 steps on the package's name task (``tx.datasets.name_task``): prompts ``A B f f f f f X``
   whose answer is the name that ``X`` does not repeat. 5-15 s on one core of a shared 2-core CPU.
2. Takes a clean prompt ``A B .. A`` (answer ``B``) and its corruption ``A C .. A`` (answer ``C``), and
   the metric ``logit(B) - logit(C)`` at the last position.
3. Patches every layer's output at every position with its corrupt value (``tx.activation_patching``,
   one forward per cell) and estimates the same from two forwards and one backward
   (``tx.attribution_patching``); prints the two ``[L, T]`` tables (change of the metric) and their
   Spearman rank correlation, for the residual stream (the embeddings and each block's output), for
   the attention and MLP outputs, and per head at the last position.

What it shows: the name at position 1 matters in the embeddings only; after block 0 only the last
position carries it, so block 0's attention (one head above all) moved it there: the responsible
layer and position. AtP ranks the cells by size as activation patching does (Spearman of ``|effect|``, the
ranking Kramár et al. use to pick the nodes to verify), though it underestimates the largest effects (a
first-order estimate of saturated changes) and the signs of the tiny cells are noise.
"""
from __future__ import annotations

import time

import torch

import torchex_fn as tx


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two tensors' entries, ties given their average rank."""
    def ranks(t: torch.Tensor) -> torch.Tensor:
        flat = t.flatten().double()
        order = flat.argsort()
        r = torch.empty_like(flat)
        r[order] = torch.arange(flat.numel(), dtype=torch.float64)
        for value in flat.unique():                       # ties: the mean of their ranks
            same = flat == value
            r[same] = r[same].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def show(title: str, rows: list, table: torch.Tensor, column: str = "pos") -> None:
    print(title)
    print("            " + "".join(f"{f'{column} {t}':>9}" for t in range(table.shape[1])))
    for name, row in zip(rows, table):
        print(f"  {name:<10}" + "".join(f"{v:9.2f}" for v in row.tolist()))


def main() -> None:
    start = time.perf_counter()
    model = tx.datasets.train_name_model(n_layer=2, n_embd=64, n_head=4, steps=300, seed=0)
    trained = time.perf_counter() - start
    held_out = tx.datasets.name_task(512, seed=1)
    with torch.no_grad():
        accuracy = (model(held_out.clean).logits[:, -1].argmax(-1) == held_out.answer).float().mean()
    print(f"trained in {trained:.1f} s; held-out accuracy {float(accuracy):.3f}")

    task = tx.datasets.name_task(1, seed=2, repeat="first")
    clean, corrupt = task.clean[0], task.corrupt[0]                 # [T]: one prompt
    answer, wrong = int(task.answer[0]), int(task.corrupt_answer[0])
    print(f"clean {clean.tolist()} -> {answer}; corrupt {corrupt.tolist()} -> {wrong}")

    fn, params = tx.functionalize(model)
    metric = tx.patching.logit_difference(answer, wrong)
    with torch.no_grad():
        base = float(metric(model(clean[None])))
        print(f"metric logit({answer}) - logit({wrong}): clean {base:.2f}, "
              f"corrupt {float(metric(model(corrupt[None]))):.2f}")

    sites = {
        "residual stream": (["embed", "block 0", "block 1"], ["transformer.drop", "transformer.h.0", "transformer.h.1"]),
        "attention and MLP outputs": (["attn 0", "mlp 0", "attn 1", "mlp 1"],
                                      ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp",
                                       "transformer.h.1.attn.c_proj", "transformer.h.1.mlp"]),
    }
    for title, (rows, layers) in sites.items():
        start = time.perf_counter()
        patched = tx.activation_patching(fn, params, clean, corrupt, metric, layers=layers) - base
        t_patch = time.perf_counter() - start
        start = time.perf_counter()
        atp = tx.attribution_patching(fn, params, clean, corrupt, metric, layers=layers)
        t_atp = time.perf_counter() - start
        print()
        show(f"{title}: activation patching, metric(patched) - metric(clean)  [{t_patch * 1e3:.0f} ms]",
             rows, patched)
        show(f"{title}: attribution patching (AtP)  [{t_atp * 1e3:.0f} ms]", rows, atp)
        layer, position = divmod(int(patched.argmin()), patched.shape[1])
        print(f"largest effect: {rows[layer]} at position {position}; Spearman(activation patching, AtP): "
              f"of the sizes |.| {spearman(patched.abs(), atp.abs()):.3f}, signed {spearman(patched, atp):.3f}")

    heads = ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    patched = tx.activation_patching(fn, params, clean, corrupt, metric, layers=heads, heads=4, positions=[-1]) - base
    atp = tx.attribution_patching(fn, params, clean, corrupt, metric, layers=heads, heads=4, positions=[-1])
    print()
    show("per head at the last position: activation patching", ["attn 0", "attn 1"], patched[:, 0], "head")
    show("per head at the last position: AtP", ["attn 0", "attn 1"], atp[:, 0], "head")

    many = tx.datasets.name_task(32, seed=3, repeat="first")
    metric = tx.patching.logit_difference(many.answer, many.corrupt_answer)
    layers = sites["residual stream"][1] + sites["attention and MLP outputs"][1]
    with torch.no_grad():
        base_many = metric(model(many.clean))
    patched = tx.activation_patching(fn, params, many.clean, many.corrupt, metric, layers=layers,
                                     batch_size=64) - base_many[:, None, None]
    atp = tx.attribution_patching(fn, params, many.clean, many.corrupt, metric, layers=layers)
    sizes = torch.tensor([spearman(p.abs(), a.abs()) for p, a in zip(patched, atp)])
    signed = torch.tensor([spearman(p, a) for p, a in zip(patched, atp)])
    print(f"\n32 prompts, all 7 layers x 8 positions, Spearman(activation patching, AtP) per prompt:\n"
          f"  of the sizes |.|: median {float(sizes.median()):.3f}, min {float(sizes.min()):.3f}; "
          f"of the mean tables {spearman(patched.abs().mean(0), atp.abs().mean(0)):.3f}\n"
          f"  signed:           median {float(signed.median()):.3f}, min {float(signed.min()):.3f} "
          "(the cells below 1 % of the flip have AtP's sign at random)")


if __name__ == "__main__":
    main()
