"""Command line: ``python -m torchex_fn demo|explain`` (also ``torchex-fn demo|explain``).

``explain`` builds a torchvision or timm classifier by name (random weights, or a user's state_dict
with ``--weights``, whose class count is read from it) and explains images with any method of the
package (options with ``--option KEY=VALUE``). ``--image`` explains a few files in memory and writes
one overlay PNG per file; ``--data`` explains a folder or glob through ``attribute_dataset`` into a
resumable store in ``--out`` (run it again after an interruption; under ``torchrun`` the processes
share the work), with overlays under ``--overlays`` if asked. Overlays keep each file's path relative
to the folder, so ``a/cat.jpg`` and ``b/cat.jpg`` give ``a/cat_grad_cam.png`` and ``b/cat_grad_cam.png``::

    torchex-fn explain --model torchvision:resnet50 --weights resnet50.pt --image cat.jpg \
        --method grad_cam --layer layer4 --target 281 --out maps/
    torchex-fn explain --model timm:vit_small_patch16_224 --weights ft.pt --data val/ --out store/ \
        --method integrated_gradients --option steps=32 --overlays overlays/

``demo`` trains (or loads from the cache) a small CNN on the synthetic shapes data set, explains a
batch of held-out images with every method the installed package offers, scores each method
against the ground-truth masks and the model (pointing game, energy pointing game, deletion and
insertion AUC, the parameter-randomisation sanity check, time per image), prints a table, and
writes ``grid.png`` and ``results.csv`` to ``--out``.
"""
from __future__ import annotations

import argparse
import ast
import csv
import functools
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

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
    from .. import data as datasets
    from ..data import demo_model as _demo_model
    from ..evaluation import metrics
    from ..tools import viz

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
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_NOT_METHODS = ("layer_gradients",)  # (model_fn, params, x, target, ...) but returns gradients, not a map


def _explain_methods(tx) -> Dict[str, Callable]:
    """Name -> method for ``explain``: every public function ``method(model_fn, params, x, target, ...)``."""
    methods: Dict[str, Callable[..., Any]] = {}
    for name in tx.__all__:
        obj = getattr(tx, name)
        if not inspect.isfunction(obj) or name in _NOT_METHODS:
            continue
        if list(inspect.signature(obj).parameters)[:4] == ["model_fn", "params", "x", "target"]:
            methods[name] = obj
    return methods


def _build_model(spec: str, fail: Callable[[str], None], seed: int,
                 num_classes: Optional[int] = None) -> torch.nn.Module:
    """``torchvision:<name>`` or ``timm:<name>`` -> a randomly initialised classifier (global RNG left alone)."""
    import difflib
    source, _, name = spec.partition(":")
    if source not in ("torchvision", "timm") or not name:
        fail(f"--model: expected 'torchvision:<name>' or 'timm:<name>' (e.g. torchvision:resnet50), got {spec!r}")
    extra: Dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if source == "timm":
        try:
            import timm
        except ImportError:
            fail(f"--model {spec} needs timm, an optional extra: pip install torchex-fn[timm] (or pip install timm)")
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; see timm.list_models()"
            fail(f"--model: unknown timm model {name!r}{hint}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return timm.create_model(name, pretrained=False, **extra).eval()
    try:
        import torchvision
    except ImportError:
        fail(f"--model {spec} needs torchvision, an optional extra: pip install torchex-fn[vision] "
             "(or pip install torchvision)")
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; see torchvision.models.list_models()"
        fail(f"--model: unknown torchvision classifier {name!r}{hint}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision.models.get_model(name, weights=None, **extra).eval()


def _read_state(path: str, fail: Callable[[str], None]) -> Dict[str, Tensor]:
    """A state_dict from a file: plain, or under "state_dict" / "model" (training checkpoints), "module." stripped."""
    if not Path(path).is_file():
        fail(f"--weights: no such file {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, unsafe globals, truncated files
        fail(f"--weights: could not read {path!r} as a state_dict ({type(err).__name__}: {err})")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        fail(f"--weights: expected {path!r} to hold a state_dict (a dict of name -> tensor), "
             f"got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _inferred_classes(model: torch.nn.Module, state: Dict[str, Tensor]) -> Optional[int]:
    """The class count of a checkpoint whose only difference from ``model`` is the classifier's rows."""
    mine = model.state_dict()
    differ = [k for k, v in state.items() if k in mine and mine[k].shape != v.shape]
    layers = {k.rsplit(".", 1)[0] for k in differ}
    if len(layers) != 1:
        return None
    weight = f"{layers.pop()}.weight"
    if weight not in differ or state[weight].shape[1:] != mine[weight].shape[1:]:
        return None
    return int(state[weight].shape[0])


def _load_weights(model: torch.nn.Module, state: Dict[str, Tensor], path: str, fail: Callable[[str], None]) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        fail(f"--weights: {path!r} does not fit the model: {' '.join(line.strip() for line in first[:3])}")


def _model(args: argparse.Namespace) -> torch.nn.Module:
    """The model of ``--model``, ``--num-classes`` and ``--weights`` (classes inferred from the weights)."""
    fail = args.fail
    model = _build_model(args.model, fail, args.seed, args.num_classes)
    if args.weights is None:
        print(f"warning: no --weights given: {args.model} has random weights, so these maps explain an "
              f"untrained (randomly initialised) model, not a trained classifier.", file=sys.stderr, flush=True)
        return model
    state = _read_state(args.weights, fail)
    if args.num_classes is None:
        classes = _inferred_classes(model, state)
        if classes is not None:
            print(f"note: {args.weights} has a {classes}-class classifier: building {args.model} with "
                  f"num_classes={classes}", file=sys.stderr, flush=True)
            model = _build_model(args.model, fail, args.seed, classes)
    _load_weights(model, state, args.weights, fail)
    return model


def _read_image(path: Path, size: int) -> Tensor:
    """``[3, size, size]`` floats in [0, 1] (RGB, bilinear resize). Raises OSError for unreadable files."""
    from PIL import Image
    with Image.open(path) as img:
        rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        data = bytearray(rgb.tobytes())
    pixels = torch.frombuffer(data, dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1).float() / 255


def _load_images(paths: Sequence[str], size: int, fail: Callable[[str], None]) -> Tensor:
    """``[B, 3, size, size]`` floats in [0, 1]."""
    _need_pillow(fail)
    images = []
    for path in paths:
        if not Path(path).is_file():
            fail(f"--image: no such file {path!r}")
        try:
            images.append(_read_image(Path(path), size))
        except OSError as err:
            fail(f"--image: could not read {path!r} as an image ({err})")
    return torch.stack(images)


def _need_pillow(fail: Callable[[str], None]) -> None:
    try:
        import PIL  # noqa: F401
    except ImportError:
        fail("reading images needs Pillow: pip install torchex-fn[viz] (or pip install pillow)")


def _normalize(images: Tensor) -> Tensor:
    mean = torch.tensor(_IMAGENET_MEAN).view(-1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(-1, 3, 1, 1)
    return ((images - mean) / std).view(images.shape)


class _ImageFiles(torch.utils.data.Dataset):
    """``(normalised image, target)`` for a list of files; target -1 explains the predicted class."""

    def __init__(self, files: Sequence[Path], size: int, target: int):
        self.files, self.size, self.target = list(files), size, target

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            image = _read_image(self.files[i], self.size)
        except OSError as err:
            raise ValueError(f"explain --data: could not read {str(self.files[i])!r} as an image ({err})") from err
        return _normalize(image), self.target


def _collect(pattern: str, fail: Callable[[str], None]) -> Tuple[List[Path], Path]:
    """Image files of a folder (recursively) or a glob, sorted, and the folder their names are relative to."""
    import glob
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        root = path
    else:
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True)
                       if Path(p).is_file() and Path(p).suffix.lower() in _IMAGE_SUFFIXES)
        root = _common_folder(files) if files else path.parent
    if not files:
        fail(f"--data: expected a folder or glob with image files ({', '.join(_IMAGE_SUFFIXES)}), "
             f"got {pattern!r} with none")
    return files, root


def _common_folder(files: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(p.resolve().parent) for p in files]))


def _relative(path: Path, root: Path) -> Path:
    return path.resolve().relative_to(root.resolve())


def _overlay_name(folder: Path, relative: Path, method: str) -> Path:
    """``folder/<relative folders>/<stem>_<method>.png``: same-named files of different folders stay apart."""
    return folder / relative.parent / f"{relative.stem}_{method}.png"


def _parse_option(text: str, fail: Callable[[str], None]) -> Tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        fail(f"--option: expected KEY=VALUE (e.g. steps=32, layer=layer3, baseline=0.0), got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a plain string such as a layer name
    return key, value


def _method_options(name: str, method: Callable, args: argparse.Namespace) -> Dict[str, Any]:
    """``method``'s keyword options from the flags: --layer, --fc, --rise-masks, --seed, then --option."""
    fail = args.fail
    signature = inspect.signature(method).parameters
    keywords = {k: p for k, p in signature.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    required = {k for k, p in keywords.items() if p.default is inspect.Parameter.empty}
    options: Dict[str, Any] = {}
    if "layer" in keywords and ("layer" in required or args.layer is not None):
        options["layer"] = args.layer if args.layer is not None else "layer4"
    if "fc" in keywords and ("fc" in required or args.fc is not None):  # else the method finds the last linear
        options["fc"] = args.fc if args.fc is not None else "fc"
    if "num_masks" in keywords:
        options["num_masks"] = args.rise_masks
    if "generator" in keywords:
        options["generator"] = torch.Generator().manual_seed(args.seed)
    if "baseline" in required:
        options["baseline"] = 0.0
    for text in args.option:
        key, value = _parse_option(text, fail)
        if key not in keywords:
            fail(f"--option: {name} has no option {key!r}; its options are {', '.join(keywords) or 'none'}")
        options[key] = value
    missing = required - set(options)
    if missing:
        fail(f"--option: {name} needs {', '.join(sorted(missing))} (e.g. --option {sorted(missing)[0]}=...)")
    return options


def _display(maps: Tensor, name: str) -> Tuple[Tensor, str]:
    """``[B, 1, H, W]`` maps and a colour map for an overlay."""
    if maps.shape[1] == 1:
        return maps, "jet"
    if name in ("saliency", "guided_backprop"):
        return maps.abs().amax(dim=1, keepdim=True), "jet"
    return maps.sum(dim=1, keepdim=True), "diverging"


def _save_overlays(images: Tensor, maps: Tensor, name: str, paths: Sequence[Path]) -> None:
    from PIL import Image

    from ..tools import viz
    maps, cmap = _display(maps.float(), name)
    blended = viz.overlay(images, maps, cmap=cmap, alpha=0.8 if cmap == "diverging" else 0.5)
    for tile, path in zip(blended, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb = viz.to_uint8(tile)
        Image.frombytes("RGB", (rgb.shape[1], rgb.shape[0]), bytes(rgb.flatten().tolist())).save(path)  # [H, W, 3]


def explain(args: argparse.Namespace) -> int:
    """The ``explain`` subcommand; returns the exit code."""
    import torchex_fn as tx

    fail = args.fail
    methods = _explain_methods(tx)
    if args.method not in methods:
        fail(f"--method: unknown method {args.method!r}; choose one of {', '.join(methods)}")
    if (args.image is None) == (args.data is None):
        fail("expected one of --image (files, explained in memory) or --data (a folder or glob, explained into a "
             "resumable store), got " + ("both" if args.image else "neither"))
    method = methods[args.method]
    options = _method_options(args.method, method, args)
    if args.image is not None:
        return _explain_files(args, method, options)
    return _explain_data(args, method, options)


def _check_target(args: argparse.Namespace, out: Tensor) -> None:
    classes = out.shape[1]
    if args.target is not None and not 0 <= args.target < classes:
        args.fail(f"--target: expected a class index in [0, {classes}), got {args.target}")


def _explain_files(args: argparse.Namespace, method: Callable, options: Dict[str, Any]) -> int:
    """``--image``: a few files, one batch in memory, one overlay per file."""
    import torchex_fn as tx

    fail = args.fail
    images = _load_images(args.image, args.size, fail)
    model = _model(args)
    torch.set_num_threads(args.threads)
    x = _normalize(images)
    model_fn, params = tx.functionalize(model)
    with torch.no_grad():
        out = model_fn(params, x)
    _check_target(args, out)
    target = torch.full((x.shape[0],), args.target, dtype=torch.long) if args.target is not None else out.argmax(1)
    try:
        maps = method(model_fn, params, x, target, **options)
    except (ValueError, TypeError) as err:  # e.g. an unknown --layer: the library's message says why
        fail(str(err))
    files = [Path(p) for p in args.image]
    root = _common_folder(files)
    names = [_overlay_name(Path(args.out), _relative(p, root), args.method) for p in files]
    _save_overlays(images, maps.detach(), args.method, names)
    for i, name in enumerate(names):
        print(f"wrote {name} ({args.method}, target class {int(target[i])}, predicted {int(out[i].argmax())})")
    return 0


def _explain_data(args: argparse.Namespace, method: Callable, options: Dict[str, Any]) -> int:
    """``--data``: a folder or glob, through ``attribute_dataset`` into ``--out`` (resumable), overlays optional."""
    import torchex_fn as tx

    fail = args.fail
    _need_pillow(fail)
    files, root = _collect(args.data, fail)
    listing = "".join(f"{_relative(p, root).as_posix()}\n" for p in files)
    out = Path(args.out)
    if (out / "files.txt").is_file() and (out / "files.txt").read_text() != listing:
        fail(f"--out: {str(out)!r} holds the maps of other files (see its files.txt); choose another --out folder")
    model = _model(args)
    torch.set_num_threads(args.threads)
    model_fn, params = tx.functionalize(model)
    data = _ImageFiles(files, args.size, -1 if args.target is None else args.target)
    with torch.no_grad():
        _check_target(args, model_fn(params, data[0][0][None]))
    try:
        store = tx.attribute_dataset(method, model_fn, params, data, out=out, batch_size=args.batch_size,
                                     num_workers=args.workers, progress=not args.quiet, **options)
    except (ValueError, TypeError) as err:  # e.g. an unknown --layer, another run's --out
        fail(str(err))
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 writes the listing and the overlays
        return 0
    if not (out / "files.txt").is_file():
        tmp = out / ".files.txt.tmp"
        tmp.write_text(listing)
        os.replace(tmp, out / "files.txt")
    written = 0
    if args.overlays is not None:
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            images = torch.stack([_read_image(p, args.size) for p in chunk])
            names = [_overlay_name(Path(args.overlays), _relative(p, root), args.method) for p in chunk]
            _save_overlays(images, store.maps[start:start + len(chunk)], args.method, names)
            written += len(chunk)
    print(f"explained {len(store)} images with {args.method} into {out} (maps {list(store.map_shape)} "
          f"{str(store.dtype).replace('torch.', '')}; files.txt lists them in index order)"
          + (f"; wrote {written} overlays under {args.overlays}" if args.overlays is not None else ""))
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

    e = commands.add_parser("explain",
                            help="explain images with a torchvision or timm classifier; write maps, overlays",
                            description="Explain image files (--image, in memory, one overlay PNG each) or a whole "
                                        "folder or glob (--data, through attribute_dataset into a resumable store "
                                        "in --out, overlays optional) with a torchvision or timm classifier (random "
                                        "weights, or your state_dict with --weights).")
    e.add_argument("--model", required=True, help="torchvision:<name> or timm:<name>, e.g. torchvision:resnet50")
    e.add_argument("--weights", default=None,
                   help="state_dict file for the model (torch.save(model.state_dict(), FILE)); a different class "
                        "count is read from it; without it the model is randomly initialised")
    e.add_argument("--num-classes", type=int, default=None,
                   help="classes of the model's head (default: the model's own, or the --weights file's)")
    e.add_argument("--image", nargs="+", default=None, metavar="IMG", help="image files (any format Pillow reads)")
    e.add_argument("--data", default=None, metavar="DIR|GLOB",
                   help="a folder (searched recursively) or a glob ('val/**/*.JPEG') of images, explained into "
                        "--out with attribute_dataset: resumable, and split over processes under torchrun")
    e.add_argument("--method", default="grad_cam", help="any method of the package, e.g. grad_cam, saliency, "
                                                        "integrated_gradients, rise (default: grad_cam)")
    e.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword option of the method, e.g. --option steps=32 --option relu=False (repeatable; "
                        "values are Python literals, else strings)")
    e.add_argument("--layer", default=None, help="layer of layer methods (default: layer4 where a layer is required)")
    e.add_argument("--fc", default=None, help="final linear layer of cam (default: the model's last linear layer)")
    e.add_argument("--target", type=int, default=None, help="class index (default: the predicted class)")
    e.add_argument("--size", type=int, default=224, help="images are resized to SIZE x SIZE (default: 224)")
    e.add_argument("--out", default="torchex_fn_explain",
                   help="output folder: overlays for --image, the attribution store for --data "
                        "(default: ./torchex_fn_explain)")
    e.add_argument("--overlays", default=None, metavar="DIR",
                   help="with --data: also write one overlay PNG per image under DIR, keeping the relative paths")
    e.add_argument("--batch-size", type=int, default=32, help="with --data: images per batch and shard (default: 32)")
    e.add_argument("--workers", type=int, default=0, help="with --data: image-loading worker processes (default: 0)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--rise-masks", type=int, default=1000, help="RISE masks (default: 1000)")
    e.add_argument("--seed", type=int, default=0, help="seed of the random init and of generator options (default: 0)")
    e.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()),
                   help="torch CPU threads (default: %(default)s)")
    e.set_defaults(handler=explain, fail=e.error)
    return parser


def _default(field: str):
    from ..data.demo_model import TrainConfig
    return getattr(TrainConfig(), field)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m torchex_fn`` and the ``torchex-fn`` console script."""
    args = _parser().parse_args(argv)
    for name in ("num", "rows", "epochs", "train_size", "rise_masks", "step", "threads", "size", "batch_size",
                 "num_classes"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            _parser().error(f"--{name.replace('_', '-')} must be >= 1")
    if getattr(args, "workers", 0) < 0:
        _parser().error("--workers must be >= 0")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
