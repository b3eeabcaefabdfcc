"""Private validators and error-message builders shared by all methods.

Every message has the shape ``"<function>: expected <what>, got <what>. <how to fix>"`` so that
wording is uniform across methods. Checks run at the public boundary, before hooks or forward passes.
"""
from __future__ import annotations

import contextlib
import difflib
import math
import warnings
from collections.abc import Mapping
from typing import Any, Iterable, Iterator, List, Optional

import torch
from torch import Tensor
from .env import concrete_any, reads_values
from .types import module_of, params_check_of


class TrainingModeWarning(UserWarning):
    """A method was called on a model with batch norm or dropout in training mode.

    Attribution assumes inference behaviour: in training mode batch norm normalises with the batch's
    own statistics (each example's map depends on the other examples), and dropout draws a new mask
    at every forward (the map changes from call to call, whatever ``generator=`` says). Nothing
    switches the mode for you: call ``model.eval()``.
    A model whose training-mode forward equals its eval-mode one (no batch norm, no dropout; e.g.
    group or layer norm only) does not warn. To explain a training-mode forward on purpose (a loss
    on explanations with dropout active), silence this category only::

        warnings.filterwarnings("ignore", category=torchex_fn.TrainingModeWarning)
    """


def message(fn: str, expected: str, got: str, hint: str = "") -> str:
    text = f"{fn}: expected {expected}, got {got}."
    return f"{text} {hint}" if hint else text


def value_error(fn: str, expected: str, got: str, hint: str = "") -> ValueError:
    return ValueError(message(fn, expected, got, hint))


def type_error(fn: str, expected: str, got: str, hint: str = "") -> TypeError:
    return TypeError(message(fn, expected, got, hint))


def describe(value: Any) -> str:
    """A short description of ``value`` for error messages (never its contents)."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}" if isinstance(value, (int, float, str)) else type(value).__name__


def check_values(fn: str, bad: Tensor, expected: str, got: Any, hint: str = "") -> None:
    """Fail when any entry of the boolean tensor ``bad`` is true, without a host-device synchronisation.

    On a CPU tensor run eagerly (:func:`reads_values`): a ``ValueError``
    ``"<fn>: expected <expected>, got <got()>. <hint>"`` (``got`` a callable, called only on failure).
    Elsewhere (CUDA, other accelerators, ``torch.compile``): ``torch._assert_async`` with the same
    message without the values; the device raises when it reaches the check (on CUDA a device-side
    assertion: a ``RuntimeError`` at the next synchronisation, and the CUDA context is then unusable,
    as after any device-side assertion). Under ``torch.func.vmap`` values are not available and
    nothing is checked here (the kernels still refuse out-of-range indices).
    """
    if reads_values(bad):
        if concrete_any(bad):
            raise value_error(fn, expected, got() if callable(got) else str(got), hint)
        return
    assert_async = getattr(torch, "_assert_async", None)
    if assert_async is None:  # not in this torch: one read per check, as on the CPU
        if concrete_any(bad):
            raise value_error(fn, expected, got() if callable(got) else str(got), hint)
        return
    ok = bad.logical_not().all()
    try:
        try:
            assert_async(ok, message(fn, expected, "values that are not (checked on the device)", hint))
        except TypeError:  # a torch without the message overload
            assert_async(ok)
    except RuntimeError as err:  # vmap: no batching rule for an op without outputs
        if "atching rule" not in str(err):
            raise


def check_model_fn(fn: str, model_fn: Any) -> None:
    if isinstance(model_fn, torch.nn.Module):
        raise type_error(fn, "model_fn, a pure (params, x) -> out function", "an nn.Module",
                         "Build one with `model_fn, params = torchex_fn.functionalize(model)`.")
    if not callable(model_fn):
        raise type_error(fn, "model_fn, a callable (params, x) -> out", describe(model_fn))


def check_params(fn: str, params: Any, model_fn: Any = None) -> None:
    """``params`` is a mapping; with a ``model_fn`` from ``functionalize``, its keys fit the module (no unknown
    key; every parameter unless ``functionalize(model, strict=False)``)."""
    if not isinstance(params, Mapping):
        raise type_error(fn, "params, a mapping of name -> tensor", describe(params),
                         "Use the dict returned by `torchex_fn.functionalize(model)`.")
    check = params_check_of(model_fn)
    if check is not None:
        check(fn, params)


def check_input(fn: str, x: Any, *, ndim: Optional[int] = None, min_ndim: int = 1, name: str = "x",
                layer_option: bool = True) -> None:
    """``x`` is a floating-point batch of the expected rank without NaN."""
    if not isinstance(x, Tensor):
        raise type_error(fn, f"{name}, a floating-point tensor of shape [B, ...]", describe(x))
    if not (x.is_floating_point() or x.is_complex()):
        tokens = ("Token ids: attribute the embedding layer's output with `layer=` (e.g. `layer='bert.embeddings'`, "
                  "a name from `model.named_modules()`); the map then has that layer's shape." if layer_option else
                  f"Token ids: {fn} has no layer= option; use saliency, integrated_gradients or deeplift with "
                  "layer=.")
        raise type_error(fn, f"{name} of a floating-point dtype", describe(x),
                         f"{tokens} Integer images: convert first, e.g. `x.float() / 255`.")
    if ndim is not None and x.ndim != ndim:
        raise value_error(fn, f"{name} of rank {ndim} ([B, C, H, W])" if ndim == 4 else f"{name} of rank {ndim}",
                          describe(x), "A single example is `x[None]`." if x.ndim == ndim - 1 else "")
    if x.ndim < min_ndim:
        raise value_error(fn, f"{name} of rank >= {min_ndim} with the batch first", describe(x),
                          "A single example is `x[None]`.")
    if x.is_floating_point():
        check_values(fn, torch.isnan(x), f"{name} without NaN", lambda: f"{int(torch.isnan(x).sum())} NaN values")


# Modules whose forward depends on ``training`` in a way that changes a map; found by type, and by the
# names of common stochastic-depth modules (timm's DropPath, torchvision's StochasticDepth).
_DROP_NAMES = ("DropPath", "StochasticDepth", "DropBlock2d", "DropBlock")


def _mode_dependent(module: torch.nn.Module) -> Optional[str]:
    """Why ``module`` (in training mode) makes maps depend on the batch or on chance, or ``None``."""
    nn = torch.nn
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batch statistics"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return "its own statistics instead of the running ones" if module.track_running_stats else None
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return "a random dropout mask" if module.p > 0 else None
    if isinstance(module, nn.MultiheadAttention):
        return "a random dropout mask" if module.dropout > 0 else None
    if type(module).__name__ in _DROP_NAMES:
        p = getattr(module, "drop_prob", getattr(module, "p", 1.0))
        return "a random dropout mask" if not isinstance(p, (int, float)) or p > 0 else None
    return None


def check_eval_mode(fn: str, model_fn: Any) -> None:
    """Warn (:class:`TrainingModeWarning`) when the model behind ``model_fn`` would run batch norm or
    dropout in training mode. Looks at the modules' ``training`` flags only (no forward pass); a
    ``model_fn`` not built by ``functionalize`` is not inspected."""
    module = module_of(model_fn)
    if module is None:
        return
    found = []
    for name, sub in module.named_modules():
        if sub.training:
            why = _mode_dependent(sub)
            if why is not None:
                found.append(f"{type(sub).__name__} {name or '(the model)'!r} ({why})")
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        warnings.warn(message(
            fn, "a model in eval mode", f"{', '.join(found[:3])}{more} in training mode",
            "Each map then depends on the other examples of the batch (batch norm) or on chance (dropout). "
            "Call `model.eval()` first (the mode is read at every call; torchex_fn never changes it). "
            "To explain a training-mode forward on purpose: "
            "`warnings.filterwarnings('ignore', category=torchex_fn.TrainingModeWarning)`."),
            TrainingModeWarning, stacklevel=4)


def check_positive_int(fn: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise type_error(fn, f"{name}, a positive int", describe(value))
    if value < 1:
        raise value_error(fn, f"{name} >= 1", describe(value))


def check_bool(fn: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise type_error(fn, f"{name}, a bool", describe(value))


def check_optional_callable(fn: str, name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise type_error(fn, f"{name}, a callable or None", describe(value))


def check_probability(fn: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise type_error(fn, f"{name}, a float in (0, 1]", describe(value))
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise value_error(fn, f"{name} in (0, 1]", describe(value))


def check_generator(fn: str, generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise type_error(fn, "generator, a torch.Generator or None", describe(generator))


def check_generator_device(fn: str, generator: Optional[torch.Generator], x: Tensor) -> None:
    if generator is None:
        return
    gen, dev = generator.device, x.device
    if gen.type != dev.type or (gen.index is not None and dev.index is not None and gen.index != dev.index):
        raise value_error(fn, f"generator on x's device {dev}", f"a generator on {gen}",
                                  f"Create it with `torch.Generator(device={str(dev)!r}).manual_seed(seed)`.")


def vmap_randomness() -> List[str]:
    """The ``randomness`` of every ``torch.func.vmap`` level the current call runs under, outermost first
    (``"error"``, ``"same"`` or ``"different"``); empty outside ``vmap``."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    vmap = torch._C._functorch.TransformType.Vmap
    return [torch._C._functorch.CVmapInterpreterPtr(level).randomness().name.lower()
            for level in stack if level.key() == vmap]


@contextlib.contextmanager
def draws(fn: str, generator: Optional[torch.Generator]) -> Iterator[None]:
    """The context of a method's random draws: outside ``vmap`` nothing changes.

    Under ``torch.func.vmap`` the draws of an explicit ``generator`` are made as if outside the vmapped
    function (functorch is disabled for them): every vmapped member gets the draws that one call of the
    method gets, so a vmapped call equals the loop over members, each with a generator of the same seed,
    whatever vmap's ``randomness`` is among ``"error"`` (the default) and ``"same"``. Two cases are refused
    with a message naming the fix: ``generator=None`` under ``randomness="error"`` (torch would raise its
    bare "randomness error mode"), and a generator under ``randomness="different"`` (torch would ignore
    it). The block must only draw (shapes from Python numbers), never touch a vmapped tensor.
    """
    modes = vmap_randomness()
    if not modes:
        yield
        return
    if generator is None:
        if "error" in modes:
            raise value_error(fn, "a generator= under torch.func.vmap (or vmap(..., randomness='same'))",
                              "generator=None under vmap's default randomness='error'",
                              "Pass generator=torch.Generator().manual_seed(seed) (every member gets the draws of "
                              "one call), or vmap(..., randomness='same') for draws of the global generator "
                              "shared by the members, or randomness='different' for draws of their own.")
        yield
        return
    if "different" in modes:
        raise value_error(fn, "vmap's randomness 'error' (its default) or 'same' with an explicit generator",
                          "randomness='different' and a generator (vmap would ignore the generator)",
                          "Keep the generator and use randomness='same' or the default (every member gets the "
                          "generator's draws), or pass generator=None for different draws per member.")
    with torch._C._DisableFuncTorch():
        yield


def unknown_name(fn: str, what: str, name: str, known: Iterable[str]) -> ValueError:
    known = [k for k in known if k]
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"Did you mean {' or '.join(repr(c) for c in close)}?" if close else (
        f"Known names start with {', '.join(repr(k) for k in known[:6])}." if known else "")
    return ValueError(f"{fn}: unknown {what} {name!r}. {hint}".rstrip())


GRID_LAYOUTS = "[B, C, T], [B, C, H, W] or [B, C, D, H, W]"


def check_grid_rank(fn: str, x: Tensor, *, name: str = "x", low: int = 3, high: Optional[int] = 5,
                    tabular_hint: str = "") -> None:
    """``x`` has a channel axis and a grid of 1 to 3 axes (``high=None``: any number of grid axes).

    Methods that resize maps to ``x``'s grid or draw masks on it need 1 to 3 grid axes
    (``F.interpolate``'s linear, bilinear and trilinear modes). Rank 2 gets ``tabular_hint``.
    """
    if low <= x.ndim and (high is None or x.ndim <= high):
        return
    expected = (f"{name} of rank 3, 4 or 5 ({GRID_LAYOUTS}: channels and 1 to 3 grid axes)" if high == 5
                else f"{name} of rank >= 3 ([B, C, *grid]: channels and grid axes)")
    if x.ndim < low:
        hint = f"A single example is `{name}[None]`."
        if x.ndim == 2 and tabular_hint:
            hint = f"{hint} Tabular features [B, F] have no grid: {tabular_hint}"
    else:
        hint = ("Grids of more than 3 axes cannot be resized (F.interpolate): fold the extra axes into the batch "
                "or the channels.")
    raise value_error(fn, expected, describe(x), hint)
