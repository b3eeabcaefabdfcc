"""Training-data influence: which training examples made the model say what it says.

Five estimators, each a pure function of a ``model_fn``, its parameters at one or more checkpoints, a loss
and the training data (captum's ``captum.influence`` classes, without their state):

* :func:`tracin_cp` -- TracIn over checkpoints (Pruthi et al., NeurIPS 2020): the influence of a training
  example ``z`` on a test example ``z'`` is ``sum_c lr_c * grad L(z; w_c) . grad L(z'; w_c)``, the gradients
  of the per-example loss w.r.t. the parameters (or those of ``layers=``) at checkpoint ``c``. Per-example
  gradients come from ``torch.func.vmap(torch.func.grad(...))``, one chunk of the data set at a time.
* :func:`tracin_cp_fast` -- the same restricted to the weight of the last linear layer, whose per-example
  gradient is ``outer(dL/dout, a)`` (``a`` the layer's input), so that the dot product is
  ``(g . g') * (a . a')`` and no gradient is ever formed.
* :func:`tracin_cp_fast_rand_proj` -- :func:`tracin_cp_fast` with both factors randomly projected (TracIn's
  appendix F), a vector per example whose dot products are the (approximate) scores.
* :func:`similarity_influence` -- the similarity (cosine or euclidean) of a layer's activations.
* :func:`naive_influence_function` -- ``grad L(z')^T H^-1 grad L(z)`` with ``H`` the exact Hessian of the
  training loss w.r.t. the chosen parameters (Koh & Liang, ICML 2017), damped and inverted through its
  eigen-decomposition.

Every TracIn-style function answers the three questions captum's classes do, chosen by its arguments:

* ``test`` given, ``k=None``: the scores ``[N_test, N_train]``;
* ``test`` given, ``k`` an int: the ``k`` proponents (``proponents=True``, highest scores) or opponents
  (lowest) of each test example, a :class:`TopK` of ``indices`` and ``scores``, both ``[N_test, k]``;
* ``test=None``: the self-influence of every training example, ``[N_train]``.

Data: ``train`` (and ``test``) is a pair ``(x, y)`` of tensors with examples along dimension 0, a map-style
``torch.utils.data.Dataset`` whose items are ``(x, y)`` pairs, or a ``DataLoader`` yielding ``(x, y)`` batches
(taken as it is; ``batch_size`` is then not used). The loss is ``loss_fn(out, y) -> [B]``, one loss per
example (``torch.nn.CrossEntropyLoss(reduction="none")``), the model's output for a batch and its labels.
Checkpoints are a list of parameter dicts (``{name: tensor}``, what ``model_fn`` takes), or anything
``load=`` turns into one (a path, a step): ``load(entry)`` returns the params or ``(params, learning_rate)``.
Without ``load``, a ``str`` or ``Path`` is read with ``torch.load``, and a ``"learning_rate"`` entry of the
loaded dict is its learning rate (captum's ``_load_flexible_state_dict`` convention).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from ..core import checks as _checks
from ..core.capture import capture, resolve_layers
from ..core.model import Wrapped
from ..core.types import module_of

__all__ = ["TopK", "tracin_cp", "tracin_cp_fast", "tracin_cp_fast_rand_proj", "similarity_influence",
           "naive_influence_function"]

LossFn = Callable[[Any, Tensor], Tensor]


class TopK(NamedTuple):
    """The ``k`` proponents (or opponents) of each test example: training indices and their scores.

    Attributes:
      indices: ``[N_test, k]`` int64 indices into the training data, best first.
      scores: ``[N_test, k]`` the matching scores.
    """

    indices: Tensor
    scores: Tensor


# --------------------------------------------------------------------------------------------
# Data and checkpoints.

def _check_pair(fn: str, name: str, batch: Any) -> Tuple[Any, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise _checks.type_error(fn, f"{name} as a pair (x, y) (or a Dataset / DataLoader of such pairs)",
                                 _checks.describe(batch),
                                 "Pass the inputs and the labels, e.g. train=(x_train, y_train).")
    x, y = batch
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise _checks.type_error(fn, f"{name}'s x and y as tensors",
                                 f"({_checks.describe(x)}, {_checks.describe(y)})")
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise _checks.value_error(fn, f"{name}'s x and y with one row per example along dimension 0",
                                  f"shapes {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


def _check_data(fn: str, name: str, data: Any, batch_size: int) -> Any:
    """Validate ``data`` before any work; return what :func:`_chunks` iterates."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, IterableDataset):
        raise _checks.type_error(fn, f"{name} as (x, y), a map-style Dataset or a DataLoader",
                                 "an IterableDataset", "Wrap it in a DataLoader (its order is then the index).")
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    x, y = _check_pair(fn, name, data)
    if x.shape[0] == 0:
        raise _checks.value_error(fn, f"{name} with at least one example", "0 examples")
    return (x, y)


def _chunks(fn: str, name: str, data: Any, batch_size: int, device: torch.device) -> Iterator[Tuple[Any, Tensor]]:
    if isinstance(data, DataLoader):
        for batch in data:
            x, y = _check_pair(fn, f"each batch of {name}", batch)
            yield x.to(device), y.to(device)
        return
    x, y = data
    for start in range(0, x.shape[0], batch_size):
        yield x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)


def _n_chunks(data: Any, batch_size: int) -> Optional[int]:
    if isinstance(data, DataLoader):
        try:
            return len(data)
        except TypeError:
            return None
    return -(-data[0].shape[0] // batch_size)


class _Checkpoint(NamedTuple):
    params: Dict[str, Tensor]
    lr: float


def _default_load(entry: Any) -> Any:
    state = torch.load(entry, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "learning_rate" in state:
        state = dict(state)
        lr = state.pop("learning_rate")
        return state, float(lr)
    return state


def _checkpoints(fn: str, checkpoints: Any, load: Optional[Callable[[Any], Any]],
                 learning_rates: Any) -> List[Callable[[], _Checkpoint]]:
    """One loader per checkpoint (loaded when its turn comes, so that a long list of paths is never in memory)."""
    if isinstance(checkpoints, dict) or not isinstance(checkpoints, (list, tuple)):
        raise _checks.type_error(fn, "checkpoints, a list of params dicts (or of entries for load=)",
                                 _checks.describe(checkpoints), "One checkpoint is a list of one: [params].")
    if not checkpoints:
        raise _checks.value_error(fn, "at least one checkpoint", "an empty list")
    _checks.check_optional_callable(fn, "load", load)
    if learning_rates is None:
        rates: List[Optional[float]] = [None] * len(checkpoints)
    elif isinstance(learning_rates, (int, float)) and not isinstance(learning_rates, bool):
        rates = [float(learning_rates)] * len(checkpoints)
    elif isinstance(learning_rates, (list, tuple)) and len(learning_rates) == len(checkpoints):
        rates = [float(r) for r in learning_rates]
    else:
        raise _checks.value_error(fn, f"learning_rates, a float or {len(checkpoints)} floats (one per checkpoint)",
                                  _checks.describe(learning_rates))
    for entry in checkpoints:
        if load is None and not isinstance(entry, (dict, str, os.PathLike)):
            raise _checks.type_error(fn, "each checkpoint a params dict or a path (or pass load=)",
                                     _checks.describe(entry))

    def loader(entry: Any, rate: Optional[float]) -> Callable[[], _Checkpoint]:
        def get() -> _Checkpoint:
            loaded = entry if (load is None and isinstance(entry, dict)) else (load or _default_load)(entry)
            lr = 1.0
            if isinstance(loaded, tuple) and len(loaded) == 2:
                loaded, lr = loaded
            if not isinstance(loaded, dict):
                raise _checks.type_error(fn, "each loaded checkpoint a params dict (or (params, learning_rate))",
                                         _checks.describe(loaded))
            return _Checkpoint(dict(loaded), float(lr) if rate is None else rate)
        return get

    return [loader(entry, rate) for entry, rate in zip(checkpoints, rates)]


def _device(params: Dict[str, Tensor]) -> torch.device:
    for value in params.values():
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")


def _selected(fn: str, params: Dict[str, Tensor], layers: Optional[Sequence[str]], model_fn: Any) -> List[str]:
    """Names of the differentiated params: all floating-point ones (only the module's parameters, not its
    buffers, for a ``model_fn`` from ``functionalize``: captum's ``model.parameters()``), or those of
    ``layers`` (a param's name or a module's dotted prefix)."""
    floating = [k for k, v in params.items() if isinstance(v, Tensor) and v.is_floating_point()]
    module = module_of(model_fn)
    if module is not None:
        own = {name for name, _ in module.named_parameters()}
        floating = [k for k in floating if k in own]
    if layers is None:
        return floating
    if isinstance(layers, str) or not isinstance(layers, (list, tuple)) or not layers:
        raise _checks.type_error(fn, "layers, a non-empty list of parameter or module names",
                                 _checks.describe(layers))
    chosen: List[str] = []
    for layer in layers:
        hits = [k for k in floating if k == layer or k.startswith(layer + ".")]
        if not hits:
            raise _checks.unknown_name(fn, "layer (a parameter or a module owning parameters)", str(layer),
                                       sorted({k.rsplit(".", 1)[0] for k in floating} | set(floating)))
        chosen += [k for k in hits if k not in chosen]
    return chosen


def _bar(progress: bool, total: Optional[int], desc: str) -> Any:
    return tqdm(total=total, desc=desc, unit="chunk") if progress else None


def _tick(bar: Any) -> None:
    if bar is not None:
        bar.update(1)


def _check_k(fn: str, k: Any, proponents: Any) -> None:
    _checks.check_positive_int(fn, "k", k, allow_none=True)
    _checks.check_bool(fn, "proponents", proponents)


def _loss_of_one(fn: str, loss_fn: LossFn, out: Any, y: Tensor) -> Tensor:
    loss = loss_fn(out, y)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise _checks.value_error(fn, "loss_fn(out, y) -> one loss per example ([B])",
                                  f"{_checks.describe(loss)} for a batch of 1",
                                  "Use a per-example loss, e.g. torch.nn.CrossEntropyLoss(reduction='none').")
    return loss.sum()


class _Merger:
    """Running top-k over the columns of score blocks ``[N_test, n_chunk]`` given in order."""

    def __init__(self, k: int, largest: bool):
        self.k, self.largest = k, largest
        self.scores: Optional[Tensor] = None
        self.indices: Optional[Tensor] = None
        self.seen = 0

    def add(self, block: Tensor) -> None:
        idx = torch.arange(self.seen, self.seen + block.shape[1], device=block.device).expand_as(block)
        self.seen += block.shape[1]
        if self.scores is not None and self.indices is not None:
            block, idx = torch.cat([self.scores, block], 1), torch.cat([self.indices, idx], 1)
        top = torch.topk(block, min(self.k, block.shape[1]), dim=1, largest=self.largest, sorted=True)
        self.scores, self.indices = top.values, idx.gather(1, top.indices)

    def result(self, fn: str) -> TopK:
        assert self.scores is not None and self.indices is not None
        if self.seen < self.k:
            raise _checks.value_error(fn, f"k <= the number of training examples ({self.seen})", str(self.k))
        return TopK(self.indices, self.scores)


def _answer(fn: str, blocks: Iterator[Tensor], k: Optional[int], proponents: bool) -> Union[Tensor, TopK]:
    if k is None:
        return torch.cat(list(blocks), dim=1)
    merger = _Merger(k, proponents)
    for block in blocks:
        merger.add(block)
    return merger.result(fn)


# --------------------------------------------------------------------------------------------
# Per-example gradients.

def _grad_fn(fn: str, model_fn: Any, loss_fn: LossFn) -> Callable[..., Dict[str, Tensor]]:
    def loss_one(chosen: Dict[str, Tensor], rest: Dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        batch = x.unsqueeze(0)
        out = model_fn({**rest, **chosen}, batch)
        return _loss_of_one(fn, loss_fn, out, y.unsqueeze(0))

    return torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, None, 0, 0))


def _probe_loss(fn: str, model_fn: Any, loss_fn: LossFn, params: Dict[str, Tensor], x: Any, y: Tensor) -> None:
    """Once per call, on two examples: a loss reduced over the batch (``reduction="mean"``) is refused (on
    one example at a time, as the per-example gradients see it, it cannot be told from a per-example loss)."""
    if y.shape[0] >= 2:
        with torch.no_grad():
            _batch_loss(fn, loss_fn, model_fn(params, x[:2]), y[:2])


def _flat_grads(grad_fn: Callable[..., Dict[str, Tensor]], params: Dict[str, Tensor], names: List[str],
                x: Any, y: Tensor) -> Tensor:
    """``[B, P]``: each example's loss gradient w.r.t. ``params[names]``, flattened in the order of ``names``."""
    chosen = {k: params[k].detach() for k in names}
    rest = {k: v.detach() if isinstance(v, Tensor) else v for k, v in params.items() if k not in chosen}
    grads = grad_fn(chosen, rest, x, y)
    return torch.cat([grads[k].reshape(y.shape[0], -1) for k in names], dim=1)


def _check_common(fn: str, model_fn: Any, loss_fn: Any, batch_size: Any, progress: Any) -> None:
    _checks.check_model_fn(fn, model_fn)
    if not callable(loss_fn):
        raise _checks.type_error(fn, "loss_fn, a callable (out, y) -> [B] per-example losses",
                                 _checks.describe(loss_fn))
    _checks.check_positive_int(fn, "batch_size", batch_size)
    _checks.check_bool(fn, "progress", progress)
    _checks.check_eval_mode(fn, model_fn)


def _over_checkpoints(fn: str, loaders: List[Callable[[], _Checkpoint]], train: Any, test: Any, batch_size: int,
                      progress: bool, k: Optional[int], proponents: bool,
                      train_side: Callable[[_Checkpoint], Callable[[Any, Tensor], Any]],
                      self_score: Callable[[Any], Tensor], test_side: Callable[[_Checkpoint], Any],
                      pair_score: Callable[[Any, Any], Tensor]) -> Union[Tensor, TopK]:
    """The checkpoint loop of :func:`tracin_cp` and :func:`tracin_cp_fast`, which differ only in what an example
    is at a checkpoint: ``train_side(ckpt)`` turns a train chunk ``(x, y)`` into it (gradients, or the fast
    factors), ``self_score`` gives a chunk's ``[B]`` self-influence from it (times the checkpoint's learning
    rate here), ``test_side(ckpt)`` gives the test examples' (learning rate included) and
    ``pair_score(test, train)`` their ``[N_test, B]`` block.

    Self-influence loads one checkpoint at a time and sums over them; test scores load every checkpoint at
    once, so that each train chunk meets all of them (the chunks' order is the same for each) and its block is
    summed over checkpoints in their order, then go through :func:`_answer`."""
    n = _n_chunks(train, batch_size)
    bar = _bar(progress, None if n is None else n * len(loaders), fn)
    try:
        if test is None:
            total: Optional[Tensor] = None
            for get in loaders:
                ckpt = get()
                of_chunk = train_side(ckpt)
                parts = []
                for x, y in _chunks(fn, "train", train, batch_size, _device(ckpt.params)):
                    parts.append(self_score(of_chunk(x, y)))
                    _tick(bar)
                score = torch.cat(parts) * ckpt.lr
                total = score if total is None else total + score
            assert total is not None
            return total
        ckpts = [get() for get in loaders]
        tests = [test_side(ckpt) for ckpt in ckpts]

        def blocks() -> Iterator[Tensor]:
            iters = [_chunks(fn, "train", train, batch_size, _device(c.params)) for c in ckpts]
            sides = [train_side(c) for c in ckpts]
            for batches in zip(*iters):
                block: Optional[Tensor] = None
                for of_chunk, test_part, (x, y) in zip(sides, tests, batches):
                    part = pair_score(test_part, of_chunk(x, y))
                    block = part if block is None else block + part
                    _tick(bar)
                assert block is not None
                yield block

        return _answer(fn, blocks(), k, proponents)
    finally:
        if bar is not None:
            bar.close()


def tracin_cp(model_fn: Any, checkpoints: Sequence[Any], train: Any, test: Any = None, *, loss_fn: LossFn,
              k: Optional[int] = None, proponents: bool = True, layers: Optional[Sequence[str]] = None,
              learning_rates: Any = None, load: Optional[Callable[[Any], Any]] = None,
              test_loss_fn: Optional[LossFn] = None, batch_size: int = 64,
              progress: bool = False) -> Union[Tensor, TopK]:
    """TracIn over checkpoints (captum's ``TracInCP``): ``sum_c lr_c * grad L(z_train) . grad L(z_test)``.

    Per-example gradients are ``torch.func.vmap(torch.func.grad(loss))`` over the params dict, one chunk of
    ``batch_size`` examples at a time; the test gradients of a checkpoint are computed once for all chunks.

    Args:
      model_fn: Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.
      checkpoints: A list of params dicts, the model's parameters at each checkpoint, or of entries that
        ``load`` turns into one (paths without ``load`` are read with ``torch.load``).
      train: The training data: ``(x, y)`` tensors, a map-style Dataset of ``(x, y)`` items, or a DataLoader.
      test: The test examples, ``(x, y)`` (or a Dataset / DataLoader); None: the self-influence of ``train``.
      loss_fn: ``(out, y) -> [B]`` per-example losses (e.g. ``CrossEntropyLoss(reduction="none")``).
      k: None: every score. An int: the ``k`` proponents / opponents of each test example.
      proponents: With ``k``: the highest scores (True) or the lowest (False). Default: True.
      layers: Restrict the gradients to these parameters (a parameter's name or a module's dotted name,
        whose parameters are all taken); None: every parameter (not the buffers, such as batch norm's
        running statistics; with a plain function for ``model_fn``, every floating-point entry of the
        params). Default: None.
      learning_rates: A float, or one float per checkpoint; None: what ``load`` returns, else 1.
      load: ``entry -> params`` or ``entry -> (params, learning_rate)`` for each checkpoint entry.
      test_loss_fn: The loss of the test examples (default: ``loss_fn``).
      batch_size: Examples per chunk of ``train`` and ``test`` (not used for a DataLoader). Default: 64.
      progress: Show a tqdm bar over the chunks. Default: False.

    Returns:
      ``[N_test, N_train]`` scores (``k=None``), a :class:`TopK` (``k`` an int), or ``[N_train]`` self-influence
      scores (``test=None``).

    Example:
      >>> fn, _ = tx.functionalize(net.eval())
      >>> ckpts = [torch.load(p) for p in paths]
      >>> tx.influence.tracin_cp(fn, ckpts, (x_train, y_train), (x_test, y_test), loss_fn=ce, k=5).indices
    """
    fn = "influence.tracin_cp"
    _check_common(fn, model_fn, loss_fn, batch_size, progress)
    _check_k(fn, k, proponents)
    if test_loss_fn is not None and not callable(test_loss_fn):
        raise _checks.type_error(fn, "test_loss_fn, a callable or None", _checks.describe(test_loss_fn))
    loaders = _checkpoints(fn, checkpoints, load, learning_rates)
    train = _check_data(fn, "train", train, batch_size)
    if test is not None:
        test = _check_data(fn, "test", test, batch_size)
    train_grads = _grad_fn(fn, model_fn, loss_fn)
    test_grads = _grad_fn(fn, model_fn, test_loss_fn or loss_fn)
    first = loaders[0]().params
    x0, y0 = next(_chunks(fn, "train", train, batch_size, _device(first)))
    _probe_loss(fn, model_fn, loss_fn, first, x0, y0)
    del first, x0, y0

    def train_side(ckpt: _Checkpoint) -> Callable[[Any, Tensor], Tensor]:
        names = _selected(fn, ckpt.params, layers, model_fn)
        return lambda x, y: _flat_grads(train_grads, ckpt.params, names, x, y)

    def test_side(ckpt: _Checkpoint) -> Tensor:
        names = _selected(fn, ckpt.params, layers, model_fn)
        device = _device(ckpt.params)
        return torch.cat([_flat_grads(test_grads, ckpt.params, names, x, y)
                          for x, y in _chunks(fn, "test", test, batch_size, device)]) * ckpt.lr

    return _over_checkpoints(fn, loaders, train, test, batch_size, progress, k, proponents, train_side,
                             lambda g: g.pow(2).sum(1), test_side, lambda g_test, g: g_test @ g.T)


# --------------------------------------------------------------------------------------------
# The last linear layer: the outer-product trick.

def _layer_name(fn: str, model_fn: Any, layer: Any) -> str:
    if module_of(model_fn) is None:
        raise _checks.type_error(fn, "a model_fn from functionalize (the layer's input is read by a hook)",
                                 _checks.describe(model_fn))
    names, _ = resolve_layers(fn, model_fn, layer)
    if len(names) != 1:
        raise _checks.value_error(fn, "one layer, the model's last linear layer", f"{len(names)} layers")
    return names[0]


def _fast_factors(fn: str, model_fn: Any, name: str, params: Dict[str, Tensor], loss_fn: LossFn,
                  x: Any, y: Tensor) -> Tuple[Tensor, Tensor]:
    """``(g, a)``, ``[B, out]`` and ``[B, in]``: each example's loss gradient w.r.t. the model's output and
    the last layer's input; the example's gradient w.r.t. the layer's weight is ``outer(g, a)``."""
    seen: Dict[str, Any] = {}

    def record(module: Any, args: Any, output: Any) -> None:
        seen["a"], seen["out"] = args[0], output

    with torch.no_grad():
        out = Wrapped(model_fn, hook=(name, record))(params, x)
    if not isinstance(out, Tensor) or not isinstance(seen.get("out"), Tensor) or seen["out"].shape != out.shape \
            or not torch.equal(seen["out"], out):
        raise _checks.value_error(fn, "layer, the model's last layer (its output is the model's output)",
                                  repr(name), "The trick needs dL/d(layer output) = dL/d(model output).")
    if y.shape[0] >= 2:
        _batch_loss(fn, loss_fn, out[:2], y[:2])
    g = torch.func.vmap(torch.func.grad(lambda o, t: _loss_of_one(fn, loss_fn, o.unsqueeze(0), t.unsqueeze(0))))(
        out, y)
    return g.reshape(g.shape[0], -1), seen["a"].reshape(g.shape[0], -1)


def tracin_cp_fast(model_fn: Any, checkpoints: Sequence[Any], train: Any, test: Any = None, *, layer: Any,
                   loss_fn: LossFn, k: Optional[int] = None, proponents: bool = True, learning_rates: Any = None,
                   load: Optional[Callable[[Any], Any]] = None, test_loss_fn: Optional[LossFn] = None,
                   batch_size: int = 64, progress: bool = False) -> Union[Tensor, TopK]:
    """TracIn on the weight of the last linear layer (captum's ``TracInCPFast``), without forming gradients.

    An example's gradient w.r.t. the weight of a linear layer is ``outer(g, a)``, ``g`` the loss gradient
    w.r.t. the layer's output and ``a`` the layer's input, so the TracIn dot product is ``(g . g') * (a . a')``.
    The bias is left out, as captum does. The layer's output must be the model's output (``g`` is taken
    there); inputs with more than one dimension per example are flattened (captum's convention).

    Args:
      model_fn: From ``functionalize(net)`` (the layer's input is read by a forward hook for one call).
      checkpoints: A list of params dicts (or entries for ``load``), as for :func:`tracin_cp`.
      train: The training data: ``(x, y)`` tensors, a map-style Dataset of ``(x, y)`` items, or a DataLoader.
      test: The test examples, ``(x, y)`` (or a Dataset / DataLoader); None: the self-influence of ``train``.
      layer: The last linear layer (dotted name or submodule).
      loss_fn: ``(out, y) -> [B]`` per-example losses.
      k: None: every score. An int: the ``k`` proponents / opponents of each test example.
      proponents: With ``k``: the highest scores (True) or the lowest (False). Default: True.
      learning_rates: A float, or one float per checkpoint; None: what ``load`` returns, else 1.
      load: ``entry -> params`` or ``entry -> (params, learning_rate)`` for each checkpoint entry.
      test_loss_fn: The loss of the test examples (default: ``loss_fn``).
      batch_size: Examples per chunk (not used for a DataLoader). Default: 64.
      progress: Show a tqdm bar over the chunks. Default: False.

    Returns:
      ``[N_test, N_train]`` scores, a :class:`TopK`, or ``[N_train]`` self-influence scores, as :func:`tracin_cp`.

    Example:
      >>> tx.influence.tracin_cp_fast(fn, ckpts, (x_train, y_train), (x_test, y_test), layer="fc", loss_fn=ce)
    """
    fn = "influence.tracin_cp_fast"
    _check_common(fn, model_fn, loss_fn, batch_size, progress)
    _check_k(fn, k, proponents)
    name = _layer_name(fn, model_fn, layer)
    loaders = _checkpoints(fn, checkpoints, load, learning_rates)
    train = _check_data(fn, "train", train, batch_size)
    if test is not None:
        test = _check_data(fn, "test", test, batch_size)

    def train_side(ckpt: _Checkpoint) -> Callable[[Any, Tensor], Tuple[Tensor, Tensor]]:
        return lambda x, y: _fast_factors(fn, model_fn, name, ckpt.params, loss_fn, x, y)

    def test_side(ckpt: _Checkpoint) -> Tuple[Tensor, Tensor]:
        factors = [_fast_factors(fn, model_fn, name, ckpt.params, test_loss_fn or loss_fn, x, y)
                   for x, y in _chunks(fn, "test", test, batch_size, _device(ckpt.params))]
        return torch.cat([f[0] for f in factors]) * ckpt.lr, torch.cat([f[1] for f in factors])

    def self_score(factors: Tuple[Tensor, Tensor]) -> Tensor:
        g, a = factors
        return g.pow(2).sum(1) * a.pow(2).sum(1)

    def pair_score(test_factors: Tuple[Tensor, Tensor], factors: Tuple[Tensor, Tensor]) -> Tensor:
        (g_t, a_t), (g, a) = test_factors, factors
        return (g_t @ g.T) * (a_t @ a.T)

    return _over_checkpoints(fn, loaders, train, test, batch_size, progress, k, proponents, train_side,
                             self_score, test_side, pair_score)


def _projections(fn: str, out_dim: int, in_dim: int, projection_dim: Optional[int],
                 generator: Optional[torch.Generator]) -> Optional[Tuple[Tensor, Tensor]]:
    """captum's rule: no projection when ``out_dim * in_dim <= projection_dim``; else ``[out, p]`` and ``[in, q]``
    Gaussian matrices with standard deviation ``1/sqrt(width)``, ``p, q = min(int(sqrt(projection_dim)), dim)``,
    drawn in that order (on the CPU without a generator, as captum does)."""
    if projection_dim is None or out_dim * in_dim <= projection_dim:
        return None
    p = min(int(projection_dim ** 0.5), out_dim)
    q = min(int(projection_dim ** 0.5), in_dim)
    device = generator.device if generator is not None else torch.device("cpu")
    first = torch.normal(torch.zeros(out_dim, p, device=device), 1.0 / p ** 0.5, generator=generator)
    second = torch.normal(torch.zeros(in_dim, q, device=device), 1.0 / q ** 0.5, generator=generator)
    return first, second


def tracin_cp_fast_rand_proj(model_fn: Any, checkpoints: Sequence[Any], train: Any, test: Any = None, *,
                             layer: Any, loss_fn: LossFn, projection_dim: Optional[int] = None,
                             generator: Optional[torch.Generator] = None, k: Optional[int] = None,
                             proponents: bool = True, learning_rates: Any = None,
                             load: Optional[Callable[[Any], Any]] = None, test_loss_fn: Optional[LossFn] = None,
                             batch_size: int = 64, progress: bool = False) -> Union[Tensor, TopK]:
    """:func:`tracin_cp_fast` through random projections (captum's ``TracInCPFastRandProj``; TracIn, appendix F).

    Each example becomes one vector, the concatenation over checkpoints of
    ``sqrt(lr_c) * flatten(outer(g @ P, a @ Q))``; its dot product with another example's vector is the
    score. ``P`` (``[out, p]``) and ``Q`` (``[in, q]``) are Gaussian with standard deviation ``1/sqrt(width)``
    and ``p = min(int(sqrt(projection_dim)), out)``, ``q`` likewise, drawn once (``P`` first) from
    ``generator`` (captum draws the same from the global generator after ``torch.manual_seed(seed)``); without
    projection (``projection_dim=None``, or ``out * in <= projection_dim``) the scores are
    :func:`tracin_cp_fast`'s. Top-k is exact over the projected scores (captum asks a nearest-neighbour index).

    Args:
      model_fn: From ``functionalize(net)`` (the layer's input is read by a forward hook for one call).
      checkpoints: A list of params dicts (or entries for ``load``), as for :func:`tracin_cp`.
      train: The training data: ``(x, y)`` tensors, a map-style Dataset of ``(x, y)`` items, or a DataLoader.
      test: The test examples, ``(x, y)`` (or a Dataset / DataLoader); None: the self-influence of ``train``.
      layer: The last linear layer (dotted name or submodule).
      loss_fn: ``(out, y) -> [B]`` per-example losses.
      projection_dim: The projected size of one checkpoint's vector (at most); None: no projection.
      generator: The source of the projections (its device is theirs); None: torch's global generator.
      k: None: every score. An int: the ``k`` proponents / opponents of each test example.
      proponents: With ``k``: the highest scores (True) or the lowest (False). Default: True.
      learning_rates: A float, or one float per checkpoint; None: what ``load`` returns, else 1.
      load: ``entry -> params`` or ``entry -> (params, learning_rate)`` for each checkpoint entry.
      test_loss_fn: The loss of the test examples (default: ``loss_fn``).
      batch_size: Examples per chunk (not used for a DataLoader). Default: 64.
      progress: Show a tqdm bar over the chunks. Default: False.

    Returns:
      ``[N_test, N_train]`` scores, a :class:`TopK`, or ``[N_train]`` self-influence scores (the squared norms
      of the vectors), as :func:`tracin_cp`.

    Example:
      >>> gen = torch.Generator().manual_seed(0)
      >>> tx.influence.tracin_cp_fast_rand_proj(fn, ckpts, train, test, layer="fc", loss_fn=ce,
      ...                                       projection_dim=64, generator=gen, k=3)
    """
    fn = "influence.tracin_cp_fast_rand_proj"
    _check_common(fn, model_fn, loss_fn, batch_size, progress)
    _check_k(fn, k, proponents)
    _checks.check_positive_int(fn, "projection_dim", projection_dim, allow_none=True)
    _checks.check_generator(fn, generator)
    name = _layer_name(fn, model_fn, layer)
    loaders = _checkpoints(fn, checkpoints, load, learning_rates)
    train = _check_data(fn, "train", train, batch_size)
    if test is not None:
        test = _check_data(fn, "test", test, batch_size)
    n = _n_chunks(train, batch_size)
    bar = _bar(progress, None if n is None else n * len(loaders), fn)
    projections: List[Optional[Tuple[Tensor, Tensor]]] = []

    def vectors(data: Any, loss: LossFn, ticking: bool) -> Tensor:
        per_ckpt = []
        for get in loaders:
            ckpt = get()
            rows = []
            for x, y in _chunks(fn, "data", data, batch_size, _device(ckpt.params)):
                g, a = _fast_factors(fn, model_fn, name, ckpt.params, loss, x, y)
                if not projections:
                    projections.append(_projections(fn, g.shape[1], a.shape[1], projection_dim, generator))
                if projections[0] is not None:
                    g, a = g @ projections[0][0].to(g), a @ projections[0][1].to(a)
                rows.append((g.unsqueeze(2) * a.unsqueeze(1)).flatten(1) * ckpt.lr ** 0.5)
                if ticking:
                    _tick(bar)
            per_ckpt.append(torch.cat(rows))
        return torch.cat(per_ckpt, dim=1)

    try:
        train_vectors = vectors(train, loss_fn, True)
        if test is None:
            return train_vectors.pow(2).sum(1)
        test_vectors = vectors(test, test_loss_fn or loss_fn, False)
        step = batch_size
        return _answer(fn, (test_vectors @ train_vectors[i:i + step].T
                            for i in range(0, train_vectors.shape[0], step)), k, proponents)
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------------------------
# Similarity of activations.

def _inputs_of(fn: str, data: Any, batch_size: int) -> Any:
    if isinstance(data, Tensor):
        if data.ndim == 0 or data.shape[0] == 0:
            raise _checks.value_error(fn, "train with at least one example along dimension 0",
                                      f"shape {tuple(data.shape)}")
        return data
    if isinstance(data, (tuple, list)):
        return _check_data(fn, "train", data, batch_size)[0]
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    raise _checks.type_error(fn, "train as a tensor x, a pair (x, y), a map-style Dataset or a DataLoader",
                             _checks.describe(data))


def _input_chunks(data: Any, batch_size: int, device: torch.device) -> Iterator[Tensor]:
    if isinstance(data, DataLoader):
        for batch in data:
            yield (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)
        return
    for start in range(0, data.shape[0], batch_size):
        yield data[start:start + batch_size].to(device)


def _cosine(test: Tensor, train: Tensor) -> Tensor:
    def unit(v: Tensor) -> Tensor:
        v = v.reshape(v.shape[0], -1)
        norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        return torch.where(norm != 0, v / torch.where(norm != 0, norm, torch.ones_like(norm)), torch.zeros_like(v))
    return unit(test) @ unit(train).T


def _euclidean(test: Tensor, train: Tensor) -> Tensor:
    return torch.cdist(test.reshape(1, test.shape[0], -1), train.reshape(1, train.shape[0], -1)).squeeze(0)


_SIMILARITIES: Dict[str, Callable[[Tensor, Tensor], Tensor]] = {"cosine": _cosine, "euclidean": _euclidean}


def similarity_influence(model_fn: Any, params: Any, x: Tensor, train: Any, *, layer: Any,
                         similarity: Union[str, Callable[[Tensor, Tensor], Tensor]] = "cosine",
                         k: Optional[int] = 1, largest: Optional[bool] = None, batch_size: int = 64,
                         progress: bool = False) -> Any:
    """The training examples whose activations at a layer are most similar to the test examples'
    (captum's ``SimilarityInfluence``, without its activation files on disk).

    ``"cosine"`` is the cosine similarity of the flattened activations (0 where one of them is all zeros,
    captum's ``replace_nan=0``), ``"euclidean"`` their euclidean distance (``torch.cdist``); a callable
    ``(test_acts, train_acts) -> [N_test, n_chunk]`` is used as given.

    Args:
      model_fn: Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.
      params: Name -> tensor mapping accepted by ``torch.func.functional_call``.
      x: The test examples ``[N_test, ...]``.
      train: The training inputs: a tensor ``[N_train, ...]``, a pair ``(x, y)`` (``y`` unused), a map-style
        Dataset or a DataLoader (of inputs, or of tuples whose first item is the input).
      layer: One layer (dotted name or submodule), or a list / dict of layers.
      similarity: ``"cosine"``, ``"euclidean"`` or a callable. Default: ``"cosine"``.
      k: The number of most similar training examples per test example; None: every score
        ``[N_test, N_train]``. Default: 1.
      largest: Rank by the largest values (True) or the smallest (False). None: True for ``"cosine"`` and
        callables, False for ``"euclidean"`` (a distance; captum's default ``similarity_direction="max"``
        is the same for every metric).
      batch_size: Training examples per chunk (not used for a DataLoader). Default: 64.
      progress: Show a tqdm bar over the chunks. Default: False.

    Returns:
      For one layer a :class:`TopK` (``k`` an int) or the ``[N_test, N_train]`` scores; for a list of layers
      a list of them, for a dict a dict with the same keys.

    Example:
      >>> tx.influence.similarity_influence(fn, params, x_test, x_train, layer="fc1", k=3).indices  # [N_test, 3]
    """
    fn = "influence.similarity_influence"
    _checks.check_model_fn(fn, model_fn)
    _checks.check_input(fn, x)
    _checks.check_positive_int(fn, "k", k, allow_none=True)
    _checks.check_positive_int(fn, "batch_size", batch_size)
    _checks.check_bool(fn, "progress", progress)
    if largest is not None:
        _checks.check_bool(fn, "largest", largest)
    if isinstance(similarity, str):
        if similarity not in _SIMILARITIES:
            raise _checks.unknown_name(fn, "similarity", similarity, _SIMILARITIES)
        metric = _SIMILARITIES[similarity]
    elif callable(similarity):
        metric = similarity
    else:
        raise _checks.type_error(fn, "similarity, 'cosine', 'euclidean' or a callable", _checks.describe(similarity))
    top = largest if largest is not None else similarity != "euclidean"
    names, rebuild = resolve_layers(fn, model_fn, layer)
    data = _inputs_of(fn, train, batch_size)
    _checks.check_eval_mode(fn, model_fn)
    device = x.device
    with torch.no_grad():
        _, test_acts = capture(model_fn, params, x, list(names))
        blocks: Dict[str, List[Tensor]] = {name: [] for name in names}
        n = None if isinstance(data, DataLoader) else -(-data.shape[0] // batch_size)
        bar = _bar(progress, n, fn)
        try:
            for chunk in _input_chunks(data, batch_size, device):
                _, acts = capture(model_fn, params, chunk, list(names))
                for name, test_act, act in zip(names, test_acts, acts):
                    block = metric(test_act, act)
                    if not isinstance(block, Tensor) or block.shape != (x.shape[0], chunk.shape[0]):
                        raise _checks.value_error(fn, f"similarity -> [N_test, n_chunk] = "
                                                  f"[{x.shape[0]}, {chunk.shape[0]}]", _checks.describe(block))
                    blocks[name].append(block)
                _tick(bar)
        finally:
            if bar is not None:
                bar.close()
    found = {name: _answer(fn, iter(blocks[name]), k, top) for name in names}
    return rebuild(found)


# --------------------------------------------------------------------------------------------
# The influence function with the exact Hessian.

def _batch_loss(fn: str, loss_fn: LossFn, out: Any, y: Tensor) -> Tensor:
    loss = loss_fn(out, y)
    if not isinstance(loss, Tensor) or loss.shape != (y.shape[0],):
        raise _checks.value_error(fn, f"loss_fn(out, y) -> one loss per example ([{y.shape[0]}])",
                                  _checks.describe(loss),
                                  "Use a per-example loss, e.g. torch.nn.CrossEntropyLoss(reduction='none').")
    return loss.sum()


def naive_influence_function(model_fn: Any, params: Any, train: Any, test: Any = None, *, loss_fn: LossFn,
                             layers: Optional[Sequence[str]] = None, hessian_data: Any = None,
                             damping: float = 1e-6, tol: float = 1e-5, rank: Optional[int] = None,
                             k: Optional[int] = None, proponents: bool = True,
                             test_loss_fn: Optional[LossFn] = None, batch_size: int = 64,
                             progress: bool = False) -> Union[Tensor, TopK]:
    """Influence functions with the exact Hessian (captum's ``NaiveInfluenceFunction``; Koh & Liang 2017).

    ``H`` is the Hessian of the summed per-example loss over ``hessian_data`` (default: ``train``) w.r.t. the
    chosen parameters, flattened (``torch.func.hessian``, one chunk at a time, summed), plus ``damping * I``.
    With its eigenpairs ``(l_i, v_i)`` whose ``l_i > tol`` (the ``rank`` largest of them when given), the score
    of a training example ``z`` on a test example ``z'`` is ``grad L(z')^T (sum_i v_i v_i^T / l_i) grad L(z)``,
    which is ``grad L(z')^T H^-1 grad L(z)`` when every eigenvalue is kept. The sign is captum's: positive
    scores are proponents (Koh & Liang's up-weighting influence on the test loss is its negative).
    ``H`` has ``P^2`` entries for ``P`` chosen parameters: restrict them with ``layers=``.

    Args:
      model_fn: Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.
      params: Name -> tensor mapping accepted by ``torch.func.functional_call`` (the trained model).
      train: The training data: ``(x, y)`` tensors, a map-style Dataset of ``(x, y)`` items, or a DataLoader.
      test: The test examples, ``(x, y)`` (or a Dataset / DataLoader); None: the self-influence of ``train``.
      loss_fn: ``(out, y) -> [B]`` per-example losses.
      layers: Restrict to these parameters (a parameter's name or a module's dotted name); None: every
        parameter (not the buffers), as for :func:`tracin_cp`. Default: None.
      hessian_data: The data of the Hessian, as ``train``; None: ``train``.
      damping: Added to the Hessian's diagonal (captum's ``hessian_reg``). Default: 1e-6.
      tol: Eigenvalues at or below it are dropped (captum's ``hessian_inverse_tol``). Default: 1e-5.
      rank: Keep only the ``rank`` largest eigenvalues (captum's ``projection_dim``); None: all above ``tol``.
      k: None: every score. An int: the ``k`` proponents / opponents of each test example.
      proponents: With ``k``: the highest scores (True) or the lowest (False). Default: True.
      test_loss_fn: The loss of the test examples (default: ``loss_fn``).
      batch_size: Examples per chunk (not used for a DataLoader). Default: 64.
      progress: Show a tqdm bar over the chunks of the Hessian. Default: False.

    Returns:
      ``[N_test, N_train]`` scores, a :class:`TopK`, or ``[N_train]`` self-influence scores, as :func:`tracin_cp`.

    Example:
      >>> tx.influence.naive_influence_function(fn, params, (x_train, y_train), (x_test, y_test), loss_fn=ce,
      ...                                       layers=["fc2"])
    """
    fn = "influence.naive_influence_function"
    _check_common(fn, model_fn, loss_fn, batch_size, progress)
    _check_k(fn, k, proponents)
    _checks.check_positive_int(fn, "rank", rank, allow_none=True)
    for key, value in (("damping", damping), ("tol", tol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise _checks.value_error(fn, f"{key}, a float >= 0", _checks.describe(value))
    if not isinstance(params, dict):
        raise _checks.type_error(fn, "params, a dict name -> tensor", _checks.describe(params))
    names = _selected(fn, params, layers, model_fn)
    train = _check_data(fn, "train", train, batch_size)
    hessian_data = train if hessian_data is None else _check_data(fn, "hessian_data", hessian_data, batch_size)
    if test is not None:
        test = _check_data(fn, "test", test, batch_size)
    device = _device(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    rest = {k: v.detach() if isinstance(v, Tensor) else v for k, v in params.items() if k not in names}
    flat = torch.cat([params[k].detach().reshape(-1) for k in names])

    def total_loss(theta: Tensor, x: Any, y: Tensor) -> Tensor:
        chosen = {k: t.reshape(s) for k, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return _batch_loss(fn, loss_fn, model_fn({**rest, **chosen}, x), y)

    hessian = torch.func.hessian(total_loss)
    n = _n_chunks(hessian_data, batch_size)
    bar = _bar(progress, n, fn)
    H = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype, device=device)
    try:
        for x, y in _chunks(fn, "hessian_data", hessian_data, batch_size, device):
            H += hessian(flat, x, y)
            _tick(bar)
    finally:
        if bar is not None:
            bar.close()
    H = H + damping * torch.eye(H.shape[0], dtype=H.dtype, device=device)
    values, vectors = torch.linalg.eigh((H + H.T) / 2)
    keep = values > tol
    values, vectors = values[keep], vectors[:, keep]
    if rank is not None:
        values, vectors = values[-rank:], vectors[:, -rank:]
    if values.numel() == 0:
        raise _checks.value_error(fn, "a Hessian with eigenvalues above tol", f"none above {tol}",
                                  "Raise damping, or lower tol.")
    root = vectors / values.sqrt()                   # H^-1 ~ root @ root.T

    train_grads = _grad_fn(fn, model_fn, loss_fn)
    test_grads = _grad_fn(fn, model_fn, test_loss_fn or loss_fn)

    def embed(grad_fn: Callable[..., Dict[str, Tensor]], data: Any, what: str) -> Iterator[Tensor]:
        for x, y in _chunks(fn, what, data, batch_size, device):
            yield _flat_grads(grad_fn, params, names, x, y) @ root

    if test is None:
        return torch.cat([e.pow(2).sum(1) for e in embed(train_grads, train, "train")])
    test_embedded = torch.cat(list(embed(test_grads, test, "test")))
    return _answer(fn, (test_embedded @ e.T for e in embed(train_grads, train, "train")), k, proponents)
