"""Command line: ``python -m torchex_fn demo|explain`` (also ``torchex-fn demo|explain``).

``explain`` builds a torchvision classifier by name (random weights, or a user's state_dict with
``--weights``), explains one or more image files with a chosen method and writes one overlay PNG
per image, e.g.::

    torchex-fn explain --model torchvision:resnet50 --weights resnet50.pt --image cat.jpg \
        --method grad_cam --layer layer4 --target 281 --out maps/

``demo`` trains (or loads from the cache) a small CNN on the synthetic shapes data set, explains a
batch of held-out images with every method the installed package offers, scores each method
against the ground-truth masks and the model (pointing game, energy pointing game, deletion and
insertion AUC, the parameter-randomisation sanity check, time per image), prints a table, and
writes ``grid.png`` and ``results.csv`` to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import functools
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["main"]


class _Method(NamedTuple):
    name: str
    run: Callable[[Callable, dict, Tensor, Tensor], Tensor]
    to_map: Callable[[Tensor], Tensor]  # method output -> [B, 1, H, W] used for ranking
    cmap: str


def _methods(tx, args) -> List[_Method]:
    """Every method the installed package offers, with the demo's settings."""
    def channel_max_abs(a: Tensor) -> Tensor:
        return a.abs().amax(dim=1, keepdim=True)

    def channel_sum(a: Tensor) -> Tensor:
        return a.sum(dim=1, keepdim=True)

    def same(a: Tensor) -> Tensor:
        return a

    methods = [
        _Method("saliency", tx.saliency, channel_max_abs, "jet"),
        _Method("input_x_gradient", tx.input_x_gradient, channel_sum, "diverging"),
        _Method("cam", functools.partial(tx.cam, layer="features", fc="fc"), same, "jet"),
        _Method("grad_cam", functools.partial(tx.grad_cam, layer="features"), same, "jet"),
    ]
    methods.append(_Method("deeplift", functools.partial(tx.deeplift, baseline=0.0), channel_sum, "diverging"))

    def run_rise(fn, params, x, target):
        # per-pixel normalisation: with ~1000 masks the paper's N·p leaves the mask density's
        # sampling noise in the map (pointing game 0.72-0.75 vs 0.97-1.00 here, tolerance 4 px)
        gen = torch.Generator(device=x.device).manual_seed(args.seed)
        with torch.no_grad():
            return tx.rise(fn, params, x, target, num_masks=args.rise_masks, cell_size=8, generator=gen,
                           normalization="per_pixel")
    methods.append(_Method("rise", run_rise, same, "jet"))

    def run_random(fn, params, x, target):
        del fn, params, target
        gen = torch.Generator(device=x.device).manual_seed(args.seed)
        return torch.rand(x.shape[0], 1, *x.shape[2:], generator=gen, device=x.device)
    methods.append(_Method("random (baseline)", run_random, same, "jet"))
    return methods


def _table(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    cells = [[str(c) for c in columns]] + [[_fmt(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def demo(args: argparse.Namespace) -> int:
    """The ``demo`` subcommand; returns the exit code."""
    from tqdm.auto import tqdm

    import torchex_fn as tx
    from . import _demo_model, datasets, metrics, viz

    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    config = _demo_model.TrainConfig(epochs=args.epochs, train_size=args.train_size)
    cache = False if args.no_cache else (args.cache_dir if args.cache_dir is not None else True)
    trained = _demo_model.load_or_train(config, cache=cache, progress=not args.quiet, log=say)
    model = trained.model
    model_fn, params = tx.functionalize(model)

    data = datasets.shapes(args.num, seed=args.seed + 20_000, difficulty=config.difficulty)
    x, y, masks = data.images, data.labels, data.masks
    with torch.no_grad():
        batch_acc = float((model_fn(params, x).argmax(1) == y).float().mean())
    say(f"model: test accuracy {trained.accuracy:.3f} on {config.test_size} held-out images, "
        f"{batch_acc:.3f} on this batch of {args.num}")

    tolerance = args.tolerance
    methods = _methods(tx, args)
    tx.saliency(model_fn, params, x[:1], y[:1])  # one-off autograd set-up, kept out of the timings
    rows, maps = [], {}
    for method in tqdm(methods, desc="explain + score", disable=args.quiet, unit="method"):
        start = time.perf_counter()
        attribution = method.run(model_fn, params, x, y)
        seconds = time.perf_counter() - start
        ranking = method.to_map(attribution.detach())
        maps[method.name] = (ranking, method.cmap)
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

    shown = min(args.rows, args.num)
    grid = []
    for i in range(shown):
        row = [x[i], viz.mask_overlay(x[i], masks[i])]
        row += [viz.overlay(x[i], m[i], cmap=cmap, alpha=0.8 if cmap == "diverging" else 0.5)
                for m, cmap in maps.values()]
        grid.append(row)
    names = [datasets.CLASSES[int(c)] for c in y[:shown]]
    path = viz.save_grid(grid, out_dir / "grid.png", titles=["image", "mask"] + list(maps), row_titles=names)

    print(f"\n{args.num} images, target = true class; pointing game tolerance {tolerance:g} px; "
          f"deletion (zero substrate) / insertion (blur substrate) AUC of the softmax score, "
          f"{args.step} pixels per step; lower deletion and higher insertion are better; rand_rho: "
          f"Spearman correlation of |map| with the map after randomising every layer (Adebayo et al.; "
          f"near 0 = the map depends on the model, 1 = it does not).")
    print(_table(rows, columns))
    total = time.perf_counter() - wall
    print(f"\nwrote {path} and {out_dir / 'results.csv'}; total {total:.1f} s "
          f"(training {trained.seconds:.1f} s{', weights from the cache' if trained.cached else ''}).")
    return 0


# ----------------------------------------------------------------------------------------- explain
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_EXPLAIN_METHODS = ("saliency", "input_x_gradient", "cam", "grad_cam", "rise", "deeplift")


def _explain_methods(tx) -> Dict[str, Callable]:
    """Name -> method for ``explain``."""
    return {name: getattr(tx, name) for name in _EXPLAIN_METHODS}


def _build_model(spec: str, fail: Callable[[str], None], seed: int) -> torch.nn.Module:
    """``torchvision:<name>`` -> a randomly initialised torchvision classifier (global RNG left alone)."""
    source, _, name = spec.partition(":")
    if source != "torchvision" or not name:
        fail(f"--model: expected 'torchvision:<name>' (e.g. torchvision:resnet50), got {spec!r}")
    try:
        import torchvision
    except ImportError:
        fail(f"--model {spec} needs torchvision, an optional extra: pip install torchex-fn[vision] "
             "(or pip install torchvision)")
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        import difflib
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; see torchvision.models.list_models()"
        fail(f"--model: unknown torchvision classifier {name!r}{hint}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision.models.get_model(name, weights=None).eval()


def _load_weights(model: torch.nn.Module, path: str, fail: Callable[[str], None]) -> None:
    if not Path(path).is_file():
        fail(f"--weights: no such file {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, unsafe globals, truncated files
        fail(f"--weights: could not read {path!r} as a state_dict ({type(err).__name__}: {err})")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        fail(f"--weights: expected {path!r} to hold a state_dict (a dict of name -> tensor), "
             f"got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        fail(f"--weights: {path!r} does not fit the model: {' '.join(line.strip() for line in first[:3])}")


def _load_images(paths: Sequence[str], size: int, fail: Callable[[str], None]) -> Tensor:
    """``[B, 3, size, size]`` floats in [0, 1] (RGB, bilinear resize)."""
    try:
        from PIL import Image
    except ImportError:
        fail("reading images needs Pillow: pip install torchex-fn[viz] (or pip install pillow)")
    images = []
    for path in paths:
        if not Path(path).is_file():
            fail(f"--image: no such file {path!r}")
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
                data = bytearray(rgb.tobytes())
        except OSError as err:
            fail(f"--image: could not read {path!r} as an image ({err})")
        pixels = torch.frombuffer(data, dtype=torch.uint8).view(size, size, 3)
        images.append(pixels.permute(2, 0, 1).float() / 255)
    return torch.stack(images)


def explain(args: argparse.Namespace) -> int:
    """The ``explain`` subcommand; returns the exit code."""
    import torchex_fn as tx
    from . import viz

    fail = args.fail
    methods = _explain_methods(tx)
    if args.method not in methods:
        fail(f"--method: unknown method {args.method!r}; choose one of {', '.join(methods)}")
    images = _load_images(args.image, args.size, fail)
    model = _build_model(args.model, fail, args.seed)
    if args.weights is not None:
        _load_weights(model, args.weights, fail)
    else:
        print(f"warning: no --weights given: {args.model} has random weights, so these maps explain an "
              f"untrained (randomly initialised) model, not a trained classifier.", file=sys.stderr, flush=True)
    torch.set_num_threads(args.threads)
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    x = (images - mean) / std
    model_fn, params = tx.functionalize(model)
    with torch.no_grad():
        out = model_fn(params, x)
    classes = out.shape[1]
    if args.target is not None and not 0 <= args.target < classes:
        fail(f"--target: expected a class index in [0, {classes}), got {args.target}")
    target = torch.full((x.shape[0],), args.target, dtype=torch.long) if args.target is not None else out.argmax(1)

    method = methods[args.method]
    try:
        if args.method in ("cam", "grad_cam"):
            options = dict(layer=args.layer, fc=args.fc) if args.method == "cam" else dict(layer=args.layer)
            maps = method(model_fn, params, x, target, **options)
        elif args.method == "rise":
            gen = torch.Generator().manual_seed(args.seed)
            with torch.no_grad():
                maps = method(model_fn, params, x, target, num_masks=args.rise_masks, generator=gen)
        elif args.method == "deeplift":
            maps = method(model_fn, params, x, target, baseline=0.0)
        else:
            maps = method(model_fn, params, x, target)
    except (ValueError, TypeError) as err:  # e.g. an unknown --layer: the library's message says why
        fail(str(err))
    maps = maps.detach()
    if args.method == "saliency":
        maps, cmap = maps.abs().amax(dim=1, keepdim=True), "jet"
    elif args.method in ("input_x_gradient", "deeplift"):
        maps, cmap = maps.sum(dim=1, keepdim=True), "diverging"
    else:
        cmap = "jet"
    blended = viz.overlay(images, maps, cmap=cmap, alpha=0.8 if cmap == "diverging" else 0.5)

    from PIL import Image
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(args.image):
        tile = viz.to_uint8(blended[i])
        name = out_dir / f"{Path(path).stem}_{args.method}.png"
        Image.frombytes("RGB", (args.size, args.size), bytes(tile.flatten().tolist())).save(name)
        print(f"wrote {name} ({args.method}, target class {int(target[i])}, predicted {int(out[i].argmax())})")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchex-fn", description="torchex_fn command line tools.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    d = commands.add_parser("demo", help="train a small CNN on synthetic shapes, explain it, score the methods",
                            description="Train (or load) a small CNN on synthetic shapes, run every attribution "
                                        "method on a batch, and score them against ground-truth masks.")
    d.add_argument("--out", default="torchex_fn_demo", help="output folder (default: ./torchex_fn_demo)")
    d.add_argument("--num", type=int, default=32, help="images to explain (default: 32)")
    d.add_argument("--seed", type=int, default=0, help="seed of the evaluation images and RISE masks (default: 0)")
    d.add_argument("--rows", type=int, default=8, help="examples shown in grid.png (default: 8)")
    d.add_argument("--epochs", type=int, default=_default("epochs"), help="training epochs (default: %(default)s)")
    d.add_argument("--train-size", type=int, default=_default("train_size"),
                   help="training images per epoch (default: %(default)s)")
    d.add_argument("--rise-masks", type=int, default=1000, help="RISE masks, if RISE is installed (default: 1000)")
    d.add_argument("--step", type=int, default=64, help="pixels per deletion/insertion step (default: 64)")
    d.add_argument("--tolerance", type=float, default=4.0,
                   help="pointing game tolerance in pixels (default: 4, TorchRay's 15 px scaled from 224 to 64)")
    d.add_argument("--cache-dir", default=None, help="weight cache folder (default: $TORCHEX_FN_CACHE, "
                                                     "$XDG_CACHE_HOME/torchex_fn or ~/.cache/torchex_fn)")
    d.add_argument("--no-cache", action="store_true", help="always train; read and write no cache")
    d.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; this small CNN gains little from more, and on a "
                        "shared machine extra threads wait on each other)")
    d.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    d.set_defaults(handler=demo)

    e = commands.add_parser("explain", help="explain image files with a torchvision classifier; write overlay PNGs",
                            description="Explain image files with a torchvision classifier (random weights, or "
                                        "your state_dict with --weights) and write one overlay PNG per image.")
    e.add_argument("--model", required=True, help="torchvision:<name>, e.g. torchvision:resnet50")
    e.add_argument("--weights", default=None,
                   help="state_dict file for the model (torch.save(model.state_dict(), FILE)); without it "
                        "the model is randomly initialised")
    e.add_argument("--image", nargs="+", required=True, metavar="IMG", help="image files (any format Pillow reads)")
    e.add_argument("--method", default="grad_cam", help=f"one of {', '.join(_EXPLAIN_METHODS)} "
                                                        "(deeplift where installed; default: grad_cam)")
    e.add_argument("--layer", default="layer4", help="layer of cam / grad_cam (default: layer4)")
    e.add_argument("--fc", default="fc", help="final linear layer of cam (default: fc)")
    e.add_argument("--target", type=int, default=None, help="class index (default: the predicted class)")
    e.add_argument("--size", type=int, default=224, help="images are resized to SIZE x SIZE (default: 224)")
    e.add_argument("--out", default="torchex_fn_explain", help="output folder (default: ./torchex_fn_explain)")
    e.add_argument("--rise-masks", type=int, default=1000, help="RISE masks (default: 1000)")
    e.add_argument("--seed", type=int, default=0, help="seed of the random init and the RISE masks (default: 0)")
    e.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()),
                   help="torch CPU threads (default: %(default)s)")
    e.set_defaults(handler=explain, fail=e.error)
    return parser


def _default(field: str):
    from ._demo_model import TrainConfig
    return getattr(TrainConfig(), field)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m torchex_fn`` and the ``torchex-fn`` console script."""
    args = _parser().parse_args(argv)
    for name in ("num", "rows", "epochs", "train_size", "rise_masks", "step", "threads", "size"):
        if getattr(args, name, 1) < 1:
            _parser().error(f"--{name.replace('_', '-')} must be >= 1")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
