"""``attribute_dataset``: explain a whole data set, resumably, on one process or under ``torchrun``.

The maps go to a folder of ``.npy`` shards (NumPy's documented array format, written here without
NumPy) plus two JSON files, so that NumPy, or any tool that reads ``.npy``, opens them without
torchex_fn; :func:`open_attributions` reads them back lazily. The layout is described in
``docs/dataset_storage.md``::

    out/lock                      held (flock) while a run writes; names its pid and host
    out/manifest.json             what produced the store (method, options, batch size, data, dtype,
                                  a hash of params, the thread count); a rerun with other arguments is refused
    out/checks/000012.json        batch 12's record: rows, size and SHA-256 of its two files
    out/shards/000012.meta.npy    int64 [n, 3]: example index, target class, predicted class
    out/shards/000012.maps.npy    the maps of batch 12, [n, *map_shape]
    out/index.json                written last, once every batch is stored: shards, checksums, shape, dtype

Batch ``b`` is always examples ``[b * batch_size, (b + 1) * batch_size)`` of the data, whatever the
number of processes, and a resumed run on CPU computes with the first run's thread count, so the store
(and every map in it, bit for bit) does not depend on how many processes wrote it, nor on where an
earlier run was interrupted.
"""
from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from ...core import checks as _checks
from ...core import targets as _targets
from ...core.model import Wrapped
from . import codec, store

__all__ = ["attribute_dataset"]

_FN = store.FN


# ----------------------------------------------------------------------------------- distributed
def _dist_setup(device: torch.device) -> Tuple[int, int, bool]:
    """``(rank, world size, created)``; joins ``torchrun``'s group when the caller has not."""
    if not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _barrier(world: int, device: torch.device) -> None:
    if world > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[device.index if device.index is not None else torch.cuda.current_device()])
        else:
            dist.barrier()




class _Prefetch:
    """Iterates ``loader`` in a thread, a bounded queue ahead: loading beside the computation without workers."""

    _END = object()

    def __init__(self, loader: Any, depth: int = 2):
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(loader,), name="torchex_fn-loader", daemon=True)
        self.thread.start()

    def _offer(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, loader: Any) -> None:
        try:
            for item in loader:
                if not self._offer((True, item)):
                    return
        except BaseException as err:  # raised again in the computing thread
            self._offer((False, err))
        self._offer(self._END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            ok, value = item
            if not ok:
                raise value
            yield value

    def close(self) -> None:
        self.stop.set()
        self.thread.join()




# ------------------------------------------------------------------------- predictions, for free
class _Seen:
    """Predicted classes taken from a forward pass the method makes on the batch itself, if it makes one."""

    def __init__(self, output: Any):
        self.x, self.output = None, output
        self.pred: Optional[Tensor] = None

    def reset(self, x: Any) -> None:
        self.x, self.pred = x, None

    def see(self, xx: Any, out: Any) -> None:
        x = self.x
        if self.pred is not None or not isinstance(x, Tensor) or not isinstance(xx, Tensor):
            return
        plain = torch.func.debug_unwrap(xx, recurse=True)  # inspected only: is this the batch itself?
        if plain is not x and not (plain.shape == x.shape and plain.dtype == x.dtype
                                   and plain.device == x.device and torch.equal(plain, x)):
            return
        self.pred = _predictions(torch.func.debug_unwrap(_select(out, self.output), recurse=True), x.shape[0])


def _select(out: Any, output: Any) -> Optional[Tensor]:
    try:
        return _targets.select_output(out, output, fn=_FN)
    except ValueError:  # not a classifier's [B, classes]: predictions are stored as -1
        return None


def _predictions(logits: Optional[Tensor], batch: int) -> Tensor:
    if logits is None or logits.ndim != 2 or logits.shape[0] != batch:
        return torch.full((batch,), -1, dtype=torch.long)
    return logits.detach().argmax(1).to("cpu", torch.long)


def _seeing(model_fn: Callable, seen: _Seen) -> Callable:
    """The caller's ``model_fn`` that also reports its calls to ``seen``. It keeps the model's view (module,
    output choice, lock, layer-shape memo), and around a ``FunctionalModel`` it is one (see :class:`Wrapped`),
    as ``deeplift(backend="captum")`` requires."""

    def report(x, out):
        seen.see(x, out)
        return out
    return Wrapped(model_fn, after=report)


# ------------------------------------------------------------------------------------------- data
def _data(data: Any) -> Tuple[Any, Optional[Callable]]:
    """``(map-style dataset, collate_fn)`` from a Dataset or a DataLoader."""
    collate = None
    if isinstance(data, DataLoader):
        collate, data = data.collate_fn, data.dataset
    if isinstance(data, IterableDataset) or not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise _checks.type_error(_FN, "data, a map-style Dataset of (input, target) pairs (with __len__ and "
                                      "__getitem__) or a DataLoader over one", _checks.describe(data),
                                 "Examples must be addressable by index so that a run can resume and ranks "
                                 "can split the data.")
    return data, collate


def _to(value: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, Mapping):
        return {k: _to(v, device, non_blocking) for k, v in value.items()}
    return value


def _check_targets(t: Any, batch: int) -> Tensor:
    if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool or tuple(t.shape) != (batch,):
        raise _checks.type_error(_FN, f"integer class targets, collated to a tensor of shape [{batch}]",
                                 _checks.describe(t), "Each example is (input, target) with an int target; "
                                 "use -1 to explain the predicted class.")
    return t.to(torch.long)


def _check_dtype(dtype: Any) -> None:
    if dtype is not None and dtype not in (torch.float16, torch.float32, torch.float64):
        raise _checks.value_error(_FN, "dtype: None, torch.float16, torch.float32 or torch.float64",
                                  _checks.describe(dtype), "The .npy format has no bfloat16; use torch.float16.")




def attribute_dataset(method: Callable, model_fn: Callable, params: Mapping, data: Any, *,
                      out: Union[str, os.PathLike], batch_size: int, progress: bool = True,
                      dtype: Optional[torch.dtype] = None, num_workers: int = 0, **options: Any) -> store.Attributions:
    """Explain every example of a data set with ``method``; store the maps on disk, resumably.

    The data is cut into fixed batches (batch ``b`` is examples ``[b * batch_size, (b + 1) * batch_size)``),
    and each batch is passed to ``method(model_fn, params, x, target, **options)``, the same public
    function a caller would use on one batch. Each batch's maps, example indices, targets and
    predicted classes are written as one shard (two ``.npy`` files, each written under a temporary
    name and renamed into place, after a record of their sizes and SHA-256), so a run killed at any
    point, or stopped by a full disk, loses at most the batches in flight and leaves nothing
    half-written: the same call again checks the stored batches against their checksums, computes
    only the others (and any damaged one), and the finished store is bit for bit the one an
    uninterrupted run writes (on CPU a resumed run computes with the first run's thread count, which
    some kernels' sums depend on). A ``manifest.json`` records the arguments (method, options, batch
    size, dtype, a SHA-256 of ``params``, the data's length, type and first example); a call with
    other arguments into the same ``out`` raises instead of mixing results. A second run on the same
    ``out`` while one is writing raises, naming the lock file ``out/lock`` and its holder (a lock
    left by a killed run is taken over). See ``docs/dataset_storage.md``.

    Under ``torchrun --nproc_per_node=N`` every process calls this function with the same arguments.
    The process group is created if the caller has not (``gloo`` for CPU params, ``nccl`` for CUDA
    params; put each rank's params on ``cuda:LOCAL_RANK``) and destroyed again on return. Rank ``r``
    computes batches ``b`` with ``b % N == r`` (disjoint, no padding, no duplicates); every rank writes
    its own shards; after a barrier rank 0 checks that every batch is stored and writes
    ``index.json``, and every rank returns the finished store. Because batches do not depend on
    ``N``, a run may be resumed with another number of processes.

    Loading, computing and writing overlap: a ``DataLoader`` with ``num_workers`` workers (or, with
    none, a loading thread; pinned memory and ``non_blocking`` copies when params are on CUDA) feeds
    the method, and a writer thread with a bounded queue commits shards. Memory stays flat in the
    size of the data.

    Args:
      method: A public attribution function, e.g. ``torchex_fn.grad_cam`` (or a ``functools.partial`` of one).
      model_fn: Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.
      params: Name -> tensor mapping; its device decides where batches are computed.
      data: A map-style ``Dataset`` whose items are ``(input, target)`` pairs, ``target`` an int class
        (``-1``: explain the predicted class), or ``(input,)`` alone (``TensorDataset(X)``: the predicted
        class of every example). A ``DataLoader`` is accepted for its ``dataset`` and
        ``collate_fn``; its batch size, sampler and shuffling are ignored, because batches must be
        fixed for a run to resume (``batch_size`` here decides).
      out: The store's folder (created; an interrupted run's folder is resumed).
      batch_size: Examples per call of ``method`` and per shard.
      progress: A tqdm bar (examples/s, ETA) on rank 0, counting rank 0's share of the data. Default: True.
      dtype: ``torch.float16`` / ``float32`` / ``float64`` for the stored maps; ``None`` keeps the
        method's output dtype.
      num_workers: ``DataLoader`` worker processes for loading (0: a thread of this process loads the
        next batches while the current one is explained; the data must then allow reads from a thread).
      **options: Passed to ``method`` unchanged, except that a ``torch.Generator`` is replaced, for each
        batch, by a generator seeded from its state and the batch number, so that every batch draws
        the same numbers whichever rank computes it and wherever a run resumed.

    Returns:
      The finished store, as :func:`open_attributions` returns it: ``len()``, ``.maps[i]``
      (example ``i``'s map, read from disk on access), ``.indices``, ``.targets`` (the class each map
      explains), ``.predictions`` (``-1`` where the output is not ``[B, classes]``).

    Raises:
      TypeError: ``method``, ``model_fn``, ``params`` or ``data`` of the wrong kind; non-integer targets;
        a method that does not return one tensor ``[B, ...]``.
      ValueError: a bad ``batch_size``, ``num_workers`` or ``dtype``; an ``out`` folder written with other
        arguments, holding other files, of another store format, or in use by another run (the lock).
      OSError: a file could not be written (e.g. ``errno.ENOSPC``, a full disk), with the file and what
        to do; the batches stored before are kept and the same call resumes.

    Example:
      >>> fn, params = functionalize(resnet.eval())
      >>> store = attribute_dataset(grad_cam, fn, params, val_set, out="maps/", batch_size=64, layer="layer4")
      >>> store.maps[17].shape    # [1, 224, 224]; torchrun --nproc_per_node=8 script.py splits the work

    Cost: that of ``method`` on every batch once (resumed runs: the missing batches only); predicted
      classes come from the method's own forward pass on the batch when it makes one, else one extra
      forward pass per batch without gradients. Disk: ``len(data) * prod(map_shape) * itemsize``.
    """
    if not callable(method):
        raise _checks.type_error(_FN, "method, an attribution function such as torchex_fn.grad_cam",
                                 _checks.describe(method))
    _checks.check_model_fn(_FN, model_fn)
    _checks.check_params(_FN, params, model_fn)
    _checks.check_positive_int(_FN, "batch_size", batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise _checks.value_error(_FN, "num_workers, an int >= 0", _checks.describe(num_workers))
    _check_dtype(dtype)
    if not isinstance(out, (str, os.PathLike)):
        raise _checks.type_error(_FN, "out, a folder path (str or os.PathLike)", _checks.describe(out))
    if "target" in options:
        raise _checks.type_error(_FN, "targets from the data's (input, target) pairs", "a target= option",
                                 "Put the class in each example (-1: the predicted class).")
    dataset, collate = _data(data)
    n = len(dataset)
    if n < 1:
        raise _checks.value_error(_FN, "data with at least one example", "an empty data set")

    root = Path(out)
    device = next((t.device for t in params.values() if isinstance(t, Tensor)), torch.device("cpu"))
    rank, world, created = _dist_setup(device)
    lock = None
    try:
        manifest = store.manifest(method, model_fn, params, dataset, n, batch_size, dtype, options, device)
        _barrier(world, device)  # everyone has read the folder's state before rank 0 changes it
        refusal = None
        if rank == 0:  # one lock per job: torchrun's ranks share rank 0's
            try:
                lock = store.Lock.acquire(root)
            except (ValueError, OSError) as err:
                if world == 1:
                    raise
                refusal = str(err)  # raised on every rank, not only here (the others would wait forever)
        refusal = _from_rank_0(refusal, world, device)
        if refusal is not None:
            raise ValueError(refusal)
        old = store.check_store(root, manifest)
        _barrier(world, device)
        if rank == 0:
            if old is None:
                try:
                    codec.write_json_atomic(root / "manifest.json", manifest, checked=True)
                except OSError as err:
                    raise store.write_error(err, root / "manifest.json") from err
            for folder in ("shards", "checks"):
                (root / folder).mkdir(exist_ok=True)
            for stale in [*root.glob(".*.tmp*"), *(root / "shards").glob(".*.tmp*"),
                          *(root / "checks").glob(".*.tmp*")]:
                stale.unlink()  # partial writes of a killed run (no other run writes here: the lock)
        _barrier(world, device)
        # every rank computes with the thread count of the manifest rank 0 wrote (or the first run's)
        threads = codec.read_json(root / "manifest.json", checked=True)["compute"]["threads"]
        _run(method, model_fn, params, dataset, collate, root, n, batch_size, dtype, num_workers, options,
             rank, world, device, progress, threads)
        _barrier(world, device)
        if rank == 0 and not (root / "index.json").is_file():
            try:
                store.write_index(root, n, batch_size)
            except OSError as err:
                raise store.write_error(err, root / "index.json") from err
        _barrier(world, device)
    finally:
        if lock is not None:
            lock.release()
        if created:
            dist.destroy_process_group()
    return store.open_attributions(root)


def _from_rank_0(value: Optional[str], world: int, device: torch.device) -> Optional[str]:
    """Rank 0's ``value`` on every rank (a refusal every rank raises)."""
    if world <= 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device if dist.get_backend() == "nccl" else None)
    return box[0]




def _generator_seeds(options: Dict[str, Any]) -> Dict[str, Tuple[int, torch.device]]:
    seeds = {}
    for key, value in options.items():
        if isinstance(value, torch.Generator):
            digest = store.generator_digest(value)
            seeds[key] = (int.from_bytes(digest[:8], "little") >> 1, value.device)
    return seeds


def _batch_options(options: Dict[str, Any], seeds: Dict[str, Tuple[int, torch.device]], b: int) -> Dict[str, Any]:
    if not seeds:
        return options
    per_batch = dict(options)
    for key, (seed, device) in seeds.items():
        mixed = int.from_bytes(hashlib.sha256(f"{seed}:{b}".encode()).digest()[:8], "little") >> 1
        per_batch[key] = torch.Generator(device=device).manual_seed(mixed)
    return per_batch


def _run(method, model_fn, params, dataset, collate, root, n, batch_size, dtype, num_workers, options,
         rank, world, device, progress, threads) -> None:
    batches = store.batches(n, batch_size)
    mine = [b for b in range(len(batches)) if b % world == rank]
    todo = [b for b in mine if not store.stored(root, b, len(batches[b]))]  # checks every stored file's SHA-256
    if not todo:
        return
    (root / "index.json").unlink(missing_ok=True)  # damaged shards are recomputed: unfinished until then
    # CPU kernels split their sums by thread count: the same count as the first run, so the same bits
    before = torch.get_num_threads()
    if device.type == "cpu" and threads != before:
        torch.set_num_threads(threads)
    try:
        _compute(method, model_fn, params, dataset, collate, root, batch_size, dtype, num_workers, options,
                 rank, device, progress, batches, mine, todo)
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _compute(method, model_fn, params, dataset, collate, root, batch_size, dtype, num_workers, options,
             rank, device, progress, batches, mine, todo) -> None:
    from tqdm.auto import tqdm

    total = sum(len(batches[b]) for b in mine)
    done = total - sum(len(batches[b]) for b in todo)
    cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_sampler=[list(batches[b]) for b in todo], num_workers=num_workers,
                        pin_memory=cuda, **({"collate_fn": collate} if collate is not None else {}))
    if num_workers == 0:  # no worker processes: a thread loads the next batches meanwhile
        loader = _Prefetch(loader)  # type: ignore[assignment]  # iterates like the loader
    seeds = _generator_seeds(options)
    output = _targets.selector(model_fn)
    seen = _Seen(output)
    fn = _seeing(model_fn, seen)  # one wrapper per call; memos stay keyed by the caller's model or function
    writer = store.Writer(root)
    # no bar object at all without a bar: tqdm's class lock is a multiprocessing semaphore, leaked by a killed run
    bar = tqdm(total=total, initial=done, unit="ex", desc=_FN, smoothing=0.1) if progress and rank == 0 else _NoBar()
    shape = None
    try:
        for b, item in zip(todo, loader):
            if not isinstance(item, (tuple, list)) or len(item) not in (1, 2):
                raise _checks.type_error(_FN, "data items that are (input, target) pairs, or (input,) alone",
                                         f"a batch of {_checks.describe(item)}",
                                         "Items of a Dataset of inputs only, e.g. `TensorDataset(X)`, explain "
                                         "the predicted class; for your own classes, `TensorDataset(X, labels)`.")
            rows = len(batches[b])
            if len(item) == 1:   # inputs only (TensorDataset(X)): the predicted class, as target -1 would
                x, t = item[0], torch.full((rows,), -1, dtype=torch.long)
            else:
                x, t = item
            t = _check_targets(t, rows)
            x = _to(x, device, cuda)
            seen.reset(x)
            unknown = t < 0
            if bool(unknown.all()):
                target = None  # the method picks the predicted class from its own forward pass
            elif bool(unknown.any()):
                with torch.no_grad():
                    seen.pred = _predictions(_select(model_fn(params, x), output), rows)
                target = torch.where(unknown, seen.pred, t).to(device)
            else:
                target = t.to(device, non_blocking=cuda)
            maps = method(fn, params, x, target, **_batch_options(options, seeds, b))
            if not isinstance(maps, Tensor) or maps.ndim < 1 or maps.shape[0] != rows:
                raise _checks.type_error(_FN, f"method to return one tensor of shape [{rows}, ...] per batch",
                                         _checks.describe(maps), "Methods given a list or dict of layers return "
                                         "several maps: store one layer per run.")
            if shape is None:
                shape = maps.shape[1:]
            elif maps.shape[1:] != shape:
                raise _checks.value_error(_FN, f"maps of one shape [B, {', '.join(map(str, shape))}] for every batch",
                                          f"{tuple(maps.shape)} for batch {b}", "Resize inputs to one size.")
            maps = maps.detach()
            if dtype is not None:
                maps = maps.to(dtype)
            if maps.dtype not in codec.NPY_DTYPES or maps.dtype == torch.int64:
                raise _checks.type_error(_FN, "maps of dtype float16, float32 or float64", _checks.describe(maps),
                                         "Pass dtype=torch.float32 (or float16) to convert them for storage.")
            if seen.pred is None:
                with torch.no_grad():
                    seen.pred = _predictions(_select(model_fn(params, x), output), rows)
            ready = None
            if cuda:
                host = torch.empty(maps.shape, dtype=maps.dtype, pin_memory=True)
                host.copy_(maps, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
                maps = host
            index = torch.arange(batches[b].start, batches[b].stop, dtype=torch.long)
            resolved = torch.where(unknown, seen.pred, t)
            meta = torch.stack([index, resolved, seen.pred], dim=1)
            writer.put((b, maps, meta, ready))
            bar.update(rows)
    except BaseException:
        writer.close(check=False)
        bar.close()
        raise
    finally:
        if isinstance(loader, _Prefetch):
            loader.close()
    writer.close()
    bar.close()
