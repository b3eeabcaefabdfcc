"""``torchex-fn demo``: a small CNN on synthetic shapes, explained with several methods and scored.

It trains (or loads from the cache) a small CNN on the synthetic shapes data set, explains a batch of
held-out images with a curated choice of the registry's methods (:func:`_methods`, each with the demo's
settings), scores each method against the ground-truth masks and the model (pointing game, energy pointing
game, deletion and insertion AUC, the parameter-randomisation sanity check, time per image), prints a table,
then prints :func:`torchex_fn.evaluate`'s table of the same maps (:data:`EVALUATED`: sparseness, complexity and
two localisation metrics against the masks, mean and spread over the images), and writes ``grid.png``,
``results.csv`` and ``evaluation.csv`` (``Evaluation.rows()``) to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import functools
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Sequence

import torch
from torch import Tensor

from ..composite.evaluate import evaluate
from ..core.model import functionalize
from ..data import CLASSES, demo_model, shapes
from ..evaluation import metrics
from ..registry import METHODS
from ..tools import viz

__all__ = ["run", "EVALUATED"]

# The metrics of tx.evaluate the demo prints for its methods: cheap ones (no model call), two against the masks.
EVALUATED = ("sparseness", "complexity", "relevance_mass_accuracy", "relevance_rank_accuracy")


class _Method(NamedTuple):
    name: str
    run: Callable[[Callable, dict, Tensor, Tensor], Tensor]
    to_map: Callable[[Tensor], Tensor]  # method output -> [B, 1, H, W] used for ranking
    cmap: str


def _methods(args: argparse.Namespace) -> List[_Method]:
    """The demo's choice of the registry's methods, each with its settings, and a random baseline."""
    def channel_max_abs(a: Tensor) -> Tensor:
        return a.abs().amax(dim=1, keepdim=True)

    def channel_sum(a: Tensor) -> Tensor:
        return a.sum(dim=1, keepdim=True)

    def same(a: Tensor) -> Tensor:
        return a

    def method(name: str, **settings: Any) -> Callable:
        function = METHODS[name].function
        return functools.partial(function, **settings) if settings else function

    methods = [
        _Method("saliency", method("saliency"), channel_max_abs, "jet"),
        _Method("input_x_gradient", method("input_x_gradient"), channel_sum, "diverging"),
        _Method("cam", method("cam", layer="features", fc="fc"), same, "jet"),
        _Method("grad_cam", method("grad_cam", layer="features"), same, "jet"),
        _Method("deeplift", method("deeplift", baseline=0.0), channel_sum, "diverging"),
    ]
    rise = method("rise")

    def run_rise(fn, params, x, target):
        # per-pixel normalisation: with ~1000 masks the paper's N·p leaves the mask density's
        # sampling noise in the map (pointing game 0.72-0.75 vs 0.97-1.00 here, tolerance 4 px)
        gen = torch.Generator(device=x.device).manual_seed(args.seed)
        with torch.no_grad():
            return rise(fn, params, x, target, num_masks=args.rise_masks, cell_size=8, generator=gen,
                        normalization="per_pixel")
    methods.append(_Method("rise", run_rise, same, "jet"))

    def run_random(fn, params, x, target):
        del fn, params, target
        gen = torch.Generator(device=x.device).manual_seed(args.seed)
        return torch.rand(x.shape[0], 1, *x.shape[2:], generator=gen, device=x.device)
    methods.append(_Method("random (baseline)", run_random, same, "jet"))
    return methods


def _explained(method: _Method, x: Tensor, target: Tensor, ranking: Tensor) -> Callable[..., Tensor]:
    """``method`` as :func:`evaluate` calls it, ``(model_fn, params, x, target) -> map`` (the map the demo ranks
    by); for the batch the demo already explained, the map it computed (the method is not run twice)."""
    def explain(model_fn: Callable, params: dict, inputs: Tensor, labels: Tensor) -> Tensor:
        if inputs is x and torch.equal(labels, target):
            return ranking
        return method.to_map(method.run(model_fn, params, inputs, labels).detach())
    return explain


def _table(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    cells = [[str(c) for c in columns]] + [[_fmt(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def run(args: argparse.Namespace) -> int:
    """The ``demo`` subcommand; returns the exit code."""
    from tqdm.auto import tqdm

    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    config = demo_model.TrainConfig(epochs=args.epochs, train_size=args.train_size)
    cache = False if args.no_cache else (args.cache_dir if args.cache_dir is not None else True)
    trained = demo_model.load_or_train(config, cache=cache, progress=not args.quiet, log=say)
    model = trained.model
    model_fn, params = functionalize(model)

    data = shapes(args.num, seed=args.seed + 20_000, difficulty=config.difficulty)
    x, y, masks = data.images, data.labels, data.masks
    with torch.no_grad():
        batch_acc = float((model_fn(params, x).argmax(1) == y).float().mean())
    say(f"model: test accuracy {trained.accuracy:.3f} on {config.test_size} held-out images, "
        f"{batch_acc:.3f} on this batch of {args.num}")

    tolerance = args.tolerance
    methods = _methods(args)
    METHODS["saliency"].function(model_fn, params, x[:1], y[:1])  # one-off autograd set-up, not timed
    rows, maps, explained = [], {}, {}
    for method in tqdm(methods, desc="explain + score", disable=args.quiet, unit="method"):
        start = time.perf_counter()
        attribution = method.run(model_fn, params, x, y)
        seconds = time.perf_counter() - start
        ranking = method.to_map(attribution.detach())
        maps[method.name] = (ranking, method.cmap)
        explained[method.name] = _explained(method, x, y, ranking)
        with torch.no_grad():
            dele = metrics.deletion(model_fn, params, x, ranking, y, step=args.step)
            ins = metrics.insertion(model_fn, params, x, ranking, y, step=args.step)
        rho: object = "-"
        if method.name != "rise":  # RISE would need L + 1 more runs of its 1000s of forwards
            def explain(fn, p, xx, t, method=method):
                return method.to_map(method.run(fn, p, xx, t).detach())
            check = metrics.randomization_check(explain, model_fn, params, x, y,
                                                generator=torch.Generator().manual_seed(args.seed))
            rho = float(check.correlation[-1].mean())
        rows.append({
            "method": method.name,
            "rand_rho": rho,
            "pointing": float(metrics.pointing_game(ranking, masks, tolerance=tolerance).hit.float().mean()),
            "energy_pg": float(metrics.energy_pointing_game(ranking, masks).mean()),
            "deletion_auc": float(dele.auc.mean()),
            "insertion_auc": float(ins.auc.mean()),
            "ms_per_image": 1000 * seconds / args.num,
        })

    columns = ["method", "pointing", "energy_pg", "deletion_auc", "insertion_auc", "rand_rho", "ms_per_image"]
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    evaluation = evaluate(explained, model_fn, params, x, y, metrics=list(EVALUATED), mask=masks)
    evaluation_rows = evaluation.rows()
    with open(out_dir / "evaluation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(evaluation_rows[0]))
        writer.writeheader()
        writer.writerows(evaluation_rows)

    shown = min(args.rows, args.num)
    grid = []
    for i in range(shown):
        row = [x[i], viz.mask_overlay(x[i], masks[i])]
        row += [viz.overlay(x[i], m[i], cmap=cmap, alpha=0.8 if cmap == "diverging" else 0.5)
                for m, cmap in maps.values()]
        grid.append(row)
    names = [CLASSES[int(c)] for c in y[:shown]]
    path = viz.save_grid(grid, out_dir / "grid.png", titles=["image", "mask"] + list(maps), row_titles=names)

    print(f"\n{args.num} images, target = true class; pointing game tolerance {tolerance:g} px; "
          f"deletion (zero substrate) / insertion (blur substrate) AUC of the softmax score, "
          f"{args.step} pixels per step; lower deletion and higher insertion are better; rand_rho: "
          f"Spearman correlation of |map| with the map after randomising every layer (Adebayo et al.; "
          f"near 0 = the map depends on the model, 1 = it does not).")
    print(_table(rows, columns))
    print(f"\ntx.evaluate on the same maps (mean ± std over the {args.num} images; ↑ higher is better, ↓ lower): "
          f"sparseness (Gini index), complexity (entropy of the map's shares), relevance mass and rank accuracy "
          f"(the share of the map's mass, and of its top-|mask| pixels, on the object).")
    print(evaluation)
    total = time.perf_counter() - wall
    print(f"\nwrote {path}, {out_dir / 'results.csv'} and {out_dir / 'evaluation.csv'}; total {total:.1f} s "
          f"(training {trained.seconds:.1f} s{', weights from the cache' if trained.cached else ''}).")
    return 0
