"""Every method on today's architectures: writes docs/architectures.md (OK, or the exact error a user gets).

Run from the repository root (about 10-20 minutes on 2 CPU cores):

    python docs/architectures.py            # all architectures whose package is installed
    python docs/architectures.py tv/swin_t  # some of them, printed only
    python docs/architectures.py --columns "lrp attnlrp,lrp cp_lrp"   # (re)compute these columns only

The models are those of ``tests/support/zoo.py`` (random weights, small inputs, batch 2), called as a user
would: images as tensors, the HuggingFace text models with a tokenizer's dict of token ids and the
input-space methods at their embedding layer (``layer=``), CAM methods on the layer and ``reshape=``
the zoo names. DeepLIFT's cell also reports its completeness error (the map's sum against
``f(x) - f(baseline)``, relative, float32; the goal is 1e-4).
"""
from __future__ import annotations

import os
import platform
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

import torchex_fn as tx  # noqa: E402
from support import zoo as _zoo  # noqa: E402


def _case(arch, model, fn, params, x, y) -> Dict[str, Callable[[], Any]]:
    """method name -> a call as a user writes it for this architecture."""
    text = arch.kind != "image"
    lay = {"layer": arch.embeddings} if text else {}
    cam = {"layer": arch.cam_layer, "reshape": arch.reshape}
    if text:
        cam["upsample"] = False
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    shape = arch.shape
    ids = x["input_ids"] if text else None
    base_shap = torch.zeros_like(ids) if text else torch.zeros(3, *shape)
    vit = arch.prefix_tokens is not None
    att = {"prefix_tokens": arch.prefix_tokens} if vit else {}
    window = (shape[0], shape[1] // 4, shape[2] // 4) if not text else 1

    def deeplift():
        attr = tx.deeplift(fn, params, x, y, **lay)
        with torch.no_grad():
            base = ({**x, "input_ids": torch.zeros_like(ids)} if text else torch.zeros_like(x))
            score = lambda out: tx.targets.resolve(out, y, output=tx.targets.selector(fn))  # noqa: E731
            gap = score(fn(params, x)) - score(fn(params, base))
        err = float((attr.flatten(1).sum(1) - gap).abs().max() / gap.abs().max())
        return f"{err:.0e}"

    def ensemble():
        stacked = {k: torch.stack([v, v * 1.01 if v.is_floating_point() else v]) for k, v in params.items()}
        return torch.func.vmap(lambda q: tx.saliency(fn, q, x, y, **lay))(stacked)

    def meta_grad():
        floats = {k: params[k] for k, _ in model.named_parameters()}
        def loss(sub):
            return tx.grad_cam(fn, {**params, **sub}, x, y, **cam).square().sum()
        return torch.func.grad(loss)(floats)

    return {
        "saliency": lambda: tx.saliency(fn, params, x, y, **lay),
        "input_x_gradient": lambda: tx.input_x_gradient(fn, params, x, y, **lay),
        "integrated_gradients": lambda: tx.integrated_gradients(fn, params, x, y, steps=8, **lay),
        "smoothgrad": lambda: tx.smooth(tx.saliency, samples=3, generator=g())(fn, params, x, y, **lay),
        "gradient_shap": lambda: tx.gradient_shap(fn, params, x, y, baselines=base_shap, samples=3, generator=g(),
                                                  **lay),
        "guided_backprop": lambda: tx.guided_backprop(fn, params, x, y),
        "deeplift": deeplift,
        "occlusion": lambda: tx.occlusion(fn, params, x, y, window=window, batch_size=64),
        "rise": lambda: tx.rise(fn, params, x, y, num_masks=32, cell_size=4, batch_size=64, generator=g()),
        "cam": lambda: tx.cam(fn, params, x, y, **cam),
        "grad_cam": lambda: tx.grad_cam(fn, params, x, y, **cam),
        "grad_cam_pp": lambda: tx.grad_cam_pp(fn, params, x, y, **cam),
        "layer_cam": lambda: tx.layer_cam(fn, params, x, y, **cam),
        "xgrad_cam": lambda: tx.xgrad_cam(fn, params, x, y, **cam),
        "hires_cam": lambda: tx.hires_cam(fn, params, x, y, **cam),
        "eigen_cam": lambda: tx.eigen_cam(fn, params, x, y, **cam),
        "score_cam": lambda: tx.score_cam(fn, params, x, y, batch_size=64, **cam),
        "ablation_cam": lambda: tx.ablation_cam(fn, params, x, y, batch_size=64, **cam),
        "fullgrad": lambda: tx.fullgrad(fn, params, x, y),
        "attention_rollout": lambda: tx.attention_rollout(fn, params, x, y, **att),
        "grad_rollout": lambda: tx.grad_rollout(fn, params, x, y, **att),
        "legrad": (lambda: tx.legrad(fn, params, x, y, blocks=list(arch.blocks), head=arch.head, **att))
        if arch.blocks else None,
        "lrp attnlrp": lambda: tx.lrp(fn, params, x, y, composite="attnlrp", **lay),
        "lrp cp_lrp": lambda: tx.lrp(fn, params, x, y, composite="cp_lrp", **lay),
        "vmap ensemble": ensemble,
        "grad of grad_cam": meta_grad,
    }


def run(arch) -> Dict[str, Tuple[bool, str]]:
    model = _zoo.build(arch)
    fn, params = _zoo.functionalize(arch, model)
    x = _zoo.inputs(arch)
    y = torch.tensor([1, 3])
    cells: Dict[str, Tuple[bool, str]] = {}
    for name, call in _case(arch, model, fn, params, x, y).items():
        if call is None:
            cells[name] = (None, "no blocks named")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = call()
            note = result if isinstance(result, str) else ""
            if name == "deeplift" and not float(note) <= 1e-4:  # NaN too: an output that does not move
                cells[name] = (False, f"completeness error {note} (goal 1e-4)")
            else:
                cells[name] = (True, note)
        except Exception as err:  # the exact error a user gets
            line = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            cells[name] = (False, line[:300])
            if os.environ.get("TRACE"):
                traceback.print_exc()
    return cells


def columns(names: List[str]) -> None:
    """Compute the methods ``names`` on every model and put them into docs/architectures.md as columns (new
    ones before the last two), keeping the other cells and the errors' numbering."""
    path = os.path.join(HERE, "architectures.md")
    text = open(path).read().split("\n")
    head = next(i for i, line in enumerate(text) if line.startswith("| model |"))
    methods = [c.strip() for c in text[head].strip("|").split("|")][1:]
    errors_at = text.index("## Errors")
    notes = {line.split(". ", 1)[1].strip("`"): int(line.split(".", 1)[0])
             for line in text[errors_at + 1:] if line[:1].isdigit()}
    table: Dict[str, Dict[str, str]] = {}
    for line in text[head + 2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = dict(zip(methods, cells[1:]))
    for name in names:
        if name not in methods:
            methods.insert(len(methods) - 2, name)
    for arch in _zoo.ARCHS:
        if arch.name not in table or not _zoo.available(arch):
            continue
        model = _zoo.build(arch)
        fn, params = _zoo.functionalize(arch, model)
        x = _zoo.inputs(arch)
        case = _case(arch, model, fn, params, x, torch.tensor([1, 3]))
        for name in names:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    case[name]()
                table[arch.name][name] = "OK"
            except Exception as err:  # the exact error a user gets
                note = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                table[arch.name][name] = f"[{notes.setdefault(note, len(notes) + 1)}]"
        print(arch.name, [table[arch.name][n] for n in names], flush=True)
    rows = [f"| {name} | " + " | ".join(cells.get(m, "n/a") for m in methods) + " |" for name, cells in table.items()]
    out = (text[:head] + ["| model | " + " | ".join(methods) + " |", "| --- | " + " | ".join("---" for _ in methods)
                          + " |"] + rows + ["", "## Errors", ""] + [f"{k}. `{note}`" for note, k in notes.items()])
    with open(path, "w") as fh:
        fh.write("\n".join(out) + "\n")


def main(argv: List[str]) -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if argv[:1] == ["--columns"]:
        columns(argv[1].split(","))
        return
    chosen = [a for a in _zoo.ARCHS if (not argv or a.name in argv) and _zoo.available(a)]
    rows, errors = [], {}
    started = time.perf_counter()
    for arch in chosen:
        t0 = time.perf_counter()
        cells = run(arch)
        rows.append((arch.name, cells))
        bad = [k for k, (ok, _) in cells.items() if ok is False]
        print(f"{arch.name:28s} {time.perf_counter() - t0:6.1f} s  failures: {bad}", flush=True)
        if argv:
            for k in bad:
                print(f"    {k}: {cells[k][1]}")
    if argv:
        return
    methods = list(rows[0][1])
    notes: Dict[str, int] = {}
    lines = ["# Every method on today's architectures", "",
             "Generated by `python docs/architectures.py` (do not edit by hand) on "
             f"{time.strftime('%Y-%m-%d')}: torch {torch.__version__}, " +
             ", ".join(f"{p} {__import__(p).__version__}" for p in ("torchvision", "timm", "transformers")
                       if _zoo.available(_zoo.Arch('', None, (), package=p))) +
             f", Python {platform.python_version()}, {time.perf_counter() - started:.0f} s.", "",
             "Random weights, batch 2; images 64 x 64 (ViTs 32 x 32, Swin 56 x 56), text 8 tokens. "
             "Text models are called with a tokenizer's dict of token ids; input-space methods then attribute "
             "the embedding layer (`layer=`), CAM methods the last block's tokens as a 1-d grid "
             "(`reshape=`, `upsample=False`). The layer and `reshape=` used for each model are in "
             "`tests/support/zoo.py`. OK: the call returns a map (DeepLIFT: with its relative completeness error); "
             "a number in brackets is the error a user gets, listed below the table.", "",
             "| model | " + " | ".join(methods) + " |",
             "| --- | " + " | ".join("---" for _ in methods) + " |"]
    for name, cells in rows:
        out = []
        for m in methods:
            ok, note = cells[m]
            if ok is None:
                out.append("n/a")
            elif ok:
                out.append(f"OK {note}".strip())
            else:
                k = notes.setdefault(note, len(notes) + 1)
                out.append(f"[{k}]")
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    lines += ["", "## Errors", ""]
    lines += [f"{k}. `{note}`" for note, k in notes.items()]
    with open(os.path.join(HERE, "architectures.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote docs/architectures.md: {len(rows)} models, {len(notes)} distinct errors")


if __name__ == "__main__":
    main(sys.argv[1:])
