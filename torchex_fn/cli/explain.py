"""``torchex-fn explain``: a torchvision or timm classifier by name explains image files or a folder.

The model is built by name (random weights, or a user's state_dict with ``--weights``, whose class count is
read from it) and explained with any method of :data:`torchex_fn.registry.METHODS` that a command line can
run (:data:`METHODS`; options with ``--option KEY=VALUE``). ``--image`` explains a few files in memory and
writes one overlay PNG per file; ``--data`` explains a folder or glob through ``attribute_dataset`` into a
resumable store in ``--out`` (run it again after an interruption; under ``torchrun`` the processes share the
work), with overlays under ``--overlays`` if asked. Overlays keep each file's path relative to the folder, so
``a/cat.jpg`` and ``b/cat.jpg`` give ``a/cat_grad_cam.png`` and ``b/cat_grad_cam.png``.

Any timm or torchvision classifier runs with its family's defaults (:mod:`torchex_fn.cli.choices`): the layer of a
layer method, the layout of its output (``--reshape`` overrides it), timm models set to ``--size``; the feature
methods take ``--features grid:N`` or ``superpixels:N``. Detectors and segmenters run with ``--task detection`` or
``--task segmentation`` (:mod:`torchex_fn.cli.tasks`, which hands ``--task classification`` to :func:`run`).
A user's mistake ends in one line ``torchex-fn: error: <message>`` and exit code 2 (the library's ValueError /
TypeError too); any other exception is a bug and keeps its traceback::

    torchex-fn explain --model torchvision:resnet50 --weights resnet50.pt --image cat.jpg \
        --method grad_cam --layer layer4 --target 281 --out maps/
    torchex-fn explain --model timm:vit_small_patch16_224 --weights ft.pt --data val/ --out store/ \
        --method integrated_gradients --option steps=32 --overlays overlays/
    torchex-fn explain --model timm:swin_tiny_patch4_window7_224 --image cat.jpg --size 64 --method lime \
        --features superpixels:50
"""
from __future__ import annotations

import argparse
import ast
import difflib
import glob
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor

from .. import registry
from ..composite.runner import attribute_dataset
from ..core.capture import intermediates, resolve_layers
from ..core.model import functionalize
from ..tools import viz
from . import choices

__all__ = ["METHODS", "TASK_METHODS", "MethodChoices", "method_name", "run", "unavailable"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Keyword options that take a tensor, which ``--option KEY=VALUE`` (a Python literal) cannot give: a method
# that requires one cannot run from the command line (the registry does not record option types).
_TENSOR_OPTIONS = frozenset({"baselines"})


def unavailable(method: registry.Method) -> Optional[str]:
    """Why ``explain`` cannot run ``method`` (a short reason), or None when it can."""
    if method.transform:
        return f"a transform of a method ({method.name}(method, ...) returns one), not a method"
    if "image" not in method.ranks:
        return "takes no images"
    if method.output == "layer":
        return "returns a map of a layer's output, not of the image"
    tensors = sorted(_TENSOR_OPTIONS & set(method.required))
    if tensors:
        return f"needs {', '.join(tensors)}, a tensor, which --option KEY=VALUE (a Python literal) cannot give"
    return None


# ``--method``'s choices: the registry's methods that ``explain`` can run, in the registry's order.
METHODS: Dict[str, registry.Method] = {name: m for name, m in registry.METHODS.items() if unavailable(m) is None}


# Methods outside the registry that one --task runs (checked against --task by torchex_fn.cli.tasks).
TASK_METHODS = {"drise": "detection"}


class MethodChoices(list):
    """``--method``'s choices: the registry's methods of :data:`METHODS` (listed in the help), and the methods of
    :data:`TASK_METHODS` (accepted too, not listed)."""

    def __contains__(self, name: object) -> bool:
        return name in TASK_METHODS or super().__contains__(name)


def method_name(name: str) -> str:
    """``--method``'s type: ``name`` when :data:`METHODS` or :data:`TASK_METHODS` has it, else an error that says
    why or names close matches."""
    choices = f"choose one of {', '.join(METHODS)}"
    if name in METHODS or name in TASK_METHODS:
        return name
    if name in registry.METHODS:
        raise argparse.ArgumentTypeError(f"{name} cannot run from the command line "
                                         f"({unavailable(registry.METHODS[name])}); {choices}")
    close = difflib.get_close_matches(name, list(METHODS), n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise argparse.ArgumentTypeError(f"unknown method {name!r}; {choices}{hint}")


def _build_model(spec: str, fail: Callable[[str], None], seed: int,
                 num_classes: Optional[int] = None) -> torch.nn.Module:
    """``torchvision:<name>`` or ``timm:<name>`` -> a randomly initialised classifier (global RNG left alone)."""
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
        for task, module in (("detection", torchvision.models.detection),
                             ("segmentation", torchvision.models.segmentation)):
            if name in torchvision.models.list_models(module=module):
                hint = f"; it is a {'detector' if task == 'detection' else 'segmenter'}: add --task {task}"
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
    """The model of ``--model``, ``--num-classes`` and ``--weights`` (classes inferred from the weights), set to
    take ``--size`` images where timm can (its ``set_input_size``: ViT, DeiT, Swin, ...; after the weights are
    loaded, so a checkpoint of the model's own size fits and its position embeddings are resampled)."""
    fail = args.fail
    model = _build_model(args.model, fail, args.seed, args.num_classes)
    if args.weights is not None:
        state = _read_state(args.weights, fail)
        if args.num_classes is None:
            classes = _inferred_classes(model, state)
            if classes is not None:
                print(f"note: {args.weights} has a {classes}-class classifier: building {args.model} with "
                      f"num_classes={classes}", file=sys.stderr, flush=True)
                model = _build_model(args.model, fail, args.seed, classes)
        _load_weights(model, state, args.weights, fail)
    if _own_size(model) not in (None, args.size) and callable(getattr(model, "set_input_size", None)):
        try:
            with warnings.catch_warnings():  # timm's resampling of position embeddings warns about its own code
                warnings.simplefilter("ignore")
                cast(Any, model).set_input_size(img_size=args.size)
        except (AssertionError, RuntimeError, ValueError, TypeError) as err:
            fail(_size_message(args, model, err))
    return model


def _warn_random(args: argparse.Namespace) -> None:
    if args.weights is None:
        print(f"warning: no --weights given: {args.model} has random weights, so these maps explain an "
              f"untrained (randomly initialised) model, not a trained one.", file=sys.stderr, flush=True)


def _own_size(model: torch.nn.Module) -> Optional[int]:
    """The image size a timm model was built for (its pretrained_cfg's input_size), or None."""
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return int(size[-1]) if isinstance(size, (tuple, list)) and len(size) == 3 and size[-1] == size[-2] else None


def _works(args: argparse.Namespace, size: int) -> bool:
    """Whether ``--model`` (a timm model with ``set_input_size``; a new one, random weights) runs on ``size x size``
    images."""
    model = _build_model(args.model, args.fail, args.seed, args.num_classes)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            cast(Any, model).set_input_size(img_size=size)
            model(torch.zeros(1, 3, size, size))
    except Exception:  # any failure means: not this size
        return False
    return True


def _size_message(args: argparse.Namespace, model: torch.nn.Module, err: BaseException) -> str:
    """``--size N does not fit MODEL (<first line of the error>); sizes that work: ...`` (tried near N)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    own = _own_size(model)
    if callable(getattr(model, "set_input_size", None)):
        near = sorted({m * k for m in (16, 32) for k in (args.size // m, -(-args.size // m)) if m * k >= m})
        good = [size for size in near if size != args.size and _works(args, size)]
        if own is not None and own not in good:
            good.append(own)
        sizes = ", ".join(str(size) for size in good) or "none near it"
        return f"--size {args.size} does not fit {args.model} ({first}); sizes that work: {sizes}"
    return f"--size {args.size} does not fit {args.model} ({first}); try --size 224, the size it was built for"


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


# Options that take a Python object which a literal cannot give, and the flag that gives it.
_FLAG_OPTIONS = {"reshape": "--reshape tokens[:N] / channels-last / none",
                 "feature_mask": "--features grid:N / superpixels:N"}


def _check_flags(method: registry.Method, args: argparse.Namespace) -> None:
    """--reshape, --features and --option KEY=VALUE checked before any model is built."""
    fail, name = args.fail, method.name
    for flag, option, value in (("--reshape", "reshape", args.reshape), ("--features", "feature_mask", args.features)):
        if value is not None and not method.takes(option):
            fail(f"{flag}: {name} takes no {option}= (methods that do: "
                 f"{', '.join(m for m, v in METHODS.items() if v.takes(option))})")
    try:
        args.reshape = None if args.reshape is None else choices.parse_reshape(args.reshape)
        args.features = None if args.features is None else choices.parse_features(args.features)
    except ValueError as err:
        fail(str(err))
    if "feature_mask" in method.required and args.features is None:
        fail(f"--features: {name} needs a feature mask: --features grid:N (cells of N x N pixels) or "
             "--features superpixels:N (about N segments per image)")
    for text in args.option:
        key, _ = _parse_option(text, fail)
        if key in _FLAG_OPTIONS:
            fail(f"--option: {key}= takes a Python object, which --option cannot give; use {_FLAG_OPTIONS[key]}")
        if not method.takes(key):
            fail(f"--option: {name} has no option {key!r}; its options are {', '.join(method.options) or 'none'}")


def _method_options(method: registry.Method, args: argparse.Namespace, model: torch.nn.Module) -> Dict[str, Any]:
    """``method``'s keyword options from the flags: --layer (default: the model family's, see
    :func:`choices.default_layer`), --fc, --rise-masks, --seed, then --option."""
    fail, name = args.fail, method.name
    required = set(method.required)
    options: Dict[str, Any] = {}
    if method.layer == "required" or (method.layer == "optional" and args.layer is not None):
        layer = args.layer if args.layer is not None else choices.default_layer(model)
        if layer is None:
            fail(f"--layer: {name} needs a layer and {args.model} is of no family with a default one; name one of "
                 "its modules (print(model) lists them), e.g. --layer layer4")
        options["layer"] = layer
    if method.takes("fc") and ("fc" in required or args.fc is not None):  # else the method finds the last linear
        options["fc"] = args.fc if args.fc is not None else "fc"
    if method.takes("num_masks"):
        options["num_masks"] = args.rise_masks
    if method.takes("generator"):
        options["generator"] = torch.Generator().manual_seed(args.seed)
    if "baseline" in required:
        options["baseline"] = 0.0
    for text in args.option:
        key, value = _parse_option(text, fail)
        options[key] = value
    missing = required - set(options) - {"feature_mask"}
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

    maps, cmap = _display(maps.float(), name)
    blended = viz.overlay(images, maps, cmap=cmap, alpha=0.8 if cmap == "diverging" else 0.5)
    for tile, path in zip(blended, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb = viz.to_uint8(tile)
        Image.frombytes("RGB", (rgb.shape[1], rgb.shape[0]), bytes(rgb.flatten().tolist())).save(path)  # [H, W, 3]


def run(args: argparse.Namespace) -> int:
    """The ``explain`` subcommand; returns the exit code. ``args.method`` is a name of :data:`METHODS`
    (:func:`method_name` checked it)."""
    fail = args.fail
    if (args.image is None) == (args.data is None):
        fail("expected one of --image (files, explained in memory) or --data (a folder or glob, explained into a "
             "resumable store), got " + ("both" if args.image else "neither"))
    method = METHODS[args.method]
    _check_flags(method, args)
    if args.image is not None:
        return _explain_files(args, method)
    return _explain_data(args, method)


def _probe(args: argparse.Namespace, model: torch.nn.Module, method: registry.Method, model_fn: Callable,
           params: Any, x: Tensor) -> Dict[str, Any]:
    """One forward on ``x`` (one image): the size fits the model, --target the classes; the method's options,
    with ``reshape=`` from --reshape or, for a layer method, read from the layer's output."""
    options = _method_options(method, args, model)
    layer = options.get("layer")
    try:
        with torch.no_grad():
            if isinstance(layer, str):
                names, _ = resolve_layers(method.name, model_fn, layer)
                out, acts = intermediates(model_fn, layers=names, fn=method.name)(params, x)
                act = acts[names[0]]
            else:
                out, act = model_fn(params, x), None
    except (AssertionError, RuntimeError) as err:  # the model refuses the size (timm asserts it)
        if args.size == (_own_size(model) or 224):
            raise  # at the size it was built for: not the user's mistake
        args.fail(_size_message(args, model, err))
    classes = out.shape[1]
    if args.target is not None and not 0 <= args.target < classes:
        args.fail(f"--target: expected a class index in [0, {classes}), got {args.target}")
    if method.takes("reshape"):
        reshape = args.reshape
        if reshape is None and isinstance(act, Tensor):
            reshape = choices.default_reshape(model, act)
        function = None if reshape is None else choices.reshape_of(reshape)
        if function is not None:
            options["reshape"] = function
    return options


def _method_function(method: registry.Method, args: argparse.Namespace) -> Callable:
    return method.function if args.features is None else choices.with_features(method.function, args.features)


def _cli_hint(message: str) -> str:
    """A library message that names a Python option, with the flag that gives it."""
    hints = [flag for option, flag in _FLAG_OPTIONS.items() if f"{option}=" in message]
    return message + "".join(f" (from the command line: {flag})" for flag in hints)


def _explain_files(args: argparse.Namespace, method: registry.Method) -> int:
    """``--image``: a few files, one batch in memory, one overlay per file."""
    fail = args.fail
    images = _load_images(args.image, args.size, fail)
    model = _model(args)
    torch.set_num_threads(args.threads)
    x = _normalize(images)
    model_fn, params = functionalize(model)
    try:
        options = _probe(args, model, method, model_fn, params, x[:1])
        with torch.no_grad():
            out = model_fn(params, x)
        target = torch.full((x.shape[0],), args.target, dtype=torch.long) if args.target is not None else out.argmax(1)
        maps = _method_function(method, args)(model_fn, params, x, target, **options)
    except (ValueError, TypeError) as err:  # e.g. an unknown --layer: the library's message says why
        fail(_cli_hint(str(err)))
    _warn_random(args)
    files = [Path(p) for p in args.image]
    root = _common_folder(files)
    names = [_overlay_name(Path(args.out), _relative(p, root), args.method) for p in files]
    _save_overlays(images, maps.detach(), args.method, names)
    for i, name in enumerate(names):
        print(f"wrote {name} ({args.method}, target class {int(target[i])}, predicted {int(out[i].argmax())})")
    return 0


def _explain_data(args: argparse.Namespace, method: registry.Method) -> int:
    """``--data``: a folder or glob, through ``attribute_dataset`` into ``--out`` (resumable), overlays optional."""
    fail = args.fail
    _need_pillow(fail)
    files, root = _collect(args.data, fail)
    listing = "".join(f"{_relative(p, root).as_posix()}\n" for p in files)
    out = Path(args.out)
    if (out / "files.txt").is_file() and (out / "files.txt").read_text() != listing:
        fail(f"--out: {str(out)!r} holds the maps of other files (see its files.txt); choose another --out folder")
    model = _model(args)
    torch.set_num_threads(args.threads)
    model_fn, params = functionalize(model)
    data = _ImageFiles(files, args.size, -1 if args.target is None else args.target)
    try:
        options = _probe(args, model, method, model_fn, params, data[0][0][None])
        store = attribute_dataset(_method_function(method, args), model_fn, params, data, out=out,
                                  batch_size=args.batch_size, num_workers=args.workers, progress=not args.quiet,
                                  **options)
    except (ValueError, TypeError) as err:  # e.g. an unknown --layer, another run's --out
        fail(_cli_hint(str(err)))
    _warn_random(args)
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
