"""The store of :func:`attribute_dataset`: its manifest (what produced it, with fingerprints of the arguments),
the writer of shards, the index written last, and :class:`Attributions`, the lazy reader."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import queue
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ...core import checks as _checks
from ...core import targets as _targets
from ...core.types import layer_name_of
from . import codec

__all__ = ["Attributions", "open_attributions", "FN", "FORMAT", "Writer", "manifest", "check_store", "write_index",
           "fingerprint", "params_digest"]

FN = "attribute_dataset"
FORMAT = "torchex_fn.attributions/1"


# ------------------------------------------------------------------------------------ fingerprints
def fingerprint(value: Any, model_fn: Any = None) -> Any:
    """A JSON-able description of an argument that changes whenever the argument's meaning does."""
    if isinstance(value, Tensor):
        data, owner = codec.raw(value)
        digest = hashlib.sha256(data).hexdigest()
        del owner
        return {"tensor": digest, "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, torch.Generator):
        return {"generator": generator_digest(value).hex(), "device": str(value.device)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [fingerprint(v, model_fn) for v in value]
    if isinstance(value, Mapping):
        return {str(k): fingerprint(v, model_fn) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.nn.Module):
        return {"module": type(value).__qualname__, "name": layer_name_of(model_fn, value)}
    if isinstance(value, functools.partial):
        return {"partial": fingerprint(value.func, model_fn), "args": fingerprint(value.args, model_fn),
                "keywords": fingerprint(value.keywords, model_fn)}
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
    return type(value).__qualname__


def generator_digest(generator: torch.Generator) -> bytes:
    data, owner = codec.raw(generator.get_state())
    digest = hashlib.sha256(data).digest()
    del owner  # the bytes belong to it: alive until hashed
    return digest


def params_digest(params: Mapping) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        data, owner = codec.raw(t)
        h.update(data)
        del owner
    return h.hexdigest()




# ----------------------------------------------------------------------------------------- writer
class Writer:
    """A thread that commits shards from a bounded queue, beside the computation."""

    def __init__(self, root: Path, depth: int = 4):
        self.root = root
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="torchex_fn-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                b, maps, meta, ready = item
                if ready is not None:
                    ready.synchronize()  # the device -> pinned host copy of the maps has landed
                maps_name, meta_name = codec.shard_names(b)
                codec.write_atomic(self.root / meta_name, meta)  # meta first: a shard counts once its maps exist
                codec.write_atomic(self.root / maps_name, maps)
            except BaseException as err:  # handed to the computing thread, which raises it
                self.error = err

    def put(self, item: Any) -> None:
        while True:
            self._check()
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self, *, check: bool = True) -> None:
        while self.thread.is_alive():
            try:
                self.queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self.thread.join()
        if check:
            self._check()




# -------------------------------------------------------------------------------------- the store
def manifest(method: Callable, model_fn: Any, params: Mapping, dataset: Any, n: int, batch_size: int,
              dtype: Optional[torch.dtype], options: Dict[str, Any]) -> Dict[str, Any]:
    first = dataset[0]
    return {
        "format": FORMAT,
        "method": fingerprint(method, model_fn),
        "options": fingerprint(options, model_fn),
        "batch_size": batch_size,
        "dtype": None if dtype is None else str(dtype),
        "params": params_digest(params),
        "model_output": fingerprint(_targets.selector(model_fn), model_fn),
        "data": {"type": type(dataset).__qualname__, "length": n,
                 "first_example": hashlib.sha256(json.dumps(fingerprint(first), sort_keys=True).encode()).hexdigest()},
    }


def differences(old: Mapping, new: Mapping) -> List[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "data" and isinstance(a, Mapping) and isinstance(b, Mapping):
            out += [f"data {k} ({a.get(k)!r} then, {b.get(k)!r} now)" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        elif key in ("batch_size", "dtype", "method"):
            out.append(f"{key} ({a!r} then, {b!r} now)")
        else:
            out.append(key)
    return out


def check_store(root: Path, manifest: Dict[str, Any]) -> bool:
    """Raises if ``root`` holds something else; returns whether a manifest must be written."""
    path = root / "manifest.json"
    if path.is_file():
        with open(path) as f:
            old = json.load(f)
        diff = differences(old, manifest)
        if diff:
            raise _checks.value_error(
                FN, f"the same arguments as the run that created out={str(root)!r}", f"different {', '.join(diff)}",
                "Results of different runs are never mixed: choose another out folder, or delete this one to "
                "start over.")
        return False
    if root.exists() and (not root.is_dir() or any(p.name != "shards" and not p.name.startswith(".manifest.json.tmp")
                                                   for p in root.iterdir())):
        raise _checks.value_error(FN, "out, a new or empty folder, or one written by attribute_dataset",
                                  f"{str(root)!r}, which holds other files and no manifest.json",
                                  "Choose another out folder.")
    return True




def write_index(root: Path, n: int, batch_size: int) -> None:
    shards: List[Dict[str, Any]] = []
    shape: Any = None
    dtype: Any = None
    for b, rows in enumerate(batches(n, batch_size)):
        maps_name, meta_name = codec.shard_names(b)
        if not codec.stored(root, b, len(rows)):
            raise RuntimeError(f"{FN}: expected every batch stored after all ranks finished, got batch {b} "
                               f"({maps_name}) missing. Run the same call again to compute it.")
        _, d, s = codec.read_header(root / maps_name)
        if shape is None:
            shape, dtype = s[1:], d
        elif (s[1:], d) != (shape, dtype):
            raise RuntimeError(f"{FN}: expected maps of one shape and dtype in every shard, got {s[1:]} {d} "
                               f"in {maps_name}, {shape} {dtype} in the first")
        shards.append({"maps": maps_name, "meta": meta_name, "start": rows.start, "stop": rows.stop})
    codec.write_json_atomic(root / "index.json", {
        "format": FORMAT, "count": n, "batch_size": batch_size, "map_shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""), "meta_columns": ["index", "target", "prediction"],
        "shards": shards})




# ------------------------------------------------------------------------------------- the reader
class _Maps(Sequence):
    """``store.maps[i]`` / ``store.maps[a:b]``: read from the shard files on access, never all at once."""

    def __init__(self, store: Attributions):
        self._store = store

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, key: Any) -> Tensor:  # type: ignore[override]  # a slice reads a tensor too
        store = self._store
        if isinstance(key, slice):
            start, stop, step = key.indices(len(store))
            if step != 1:
                return torch.stack([self[i] for i in range(start, stop, step)]) if start != stop else \
                    torch.empty((0, *store.map_shape), dtype=store.dtype)
            return store._read(start, max(start, stop))
        if isinstance(key, Tensor) and key.ndim == 0:
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int):
            raise _checks.type_error("Attributions.maps", "an int index or a slice", _checks.describe(key))
        if not -len(store) <= key < len(store):
            raise IndexError(f"Attributions.maps: expected an index in [-{len(store)}, {len(store)}), got {key}")
        key %= len(store)
        return store._read(key, key + 1)[0]

    def __iter__(self) -> Iterator[Tensor]:
        for shard in self._store._index["shards"]:
            yield from self._store._read(shard["start"], shard["stop"])


class Attributions:
    """A finished attribution store, read lazily (see :func:`open_attributions`)."""

    def __init__(self, root: Path, index: Dict[str, Any], manifest: Dict[str, Any]):
        self.root, self._index, self.manifest = root, index, manifest
        self.batch_size = index["batch_size"]
        self.map_shape = tuple(index["map_shape"])
        self.dtype = getattr(torch, index["dtype"])
        self.maps = _Maps(self)
        self._meta: Optional[Tensor] = None
        self._offsets: Dict[int, int] = {}

    def __len__(self) -> int:
        return self._index["count"]

    def __repr__(self) -> str:
        return (f"Attributions({str(self.root)!r}, {len(self)} maps of shape {list(self.map_shape)}, "
                f"{str(self.dtype).replace('torch.', '')})")

    def _read(self, start: int, stop: int) -> Tensor:
        row = self.dtype.itemsize
        for s in self.map_shape:
            row *= s
        parts = []
        shards = self._index["shards"]
        b = start // self.batch_size
        while start < stop:
            shard = shards[b]
            take = min(stop, shard["stop"]) - start
            path = self.root / shard["maps"]
            if b not in self._offsets:
                self._offsets[b] = codec.read_header(path)[0]
            buf = bytearray(take * row)
            with open(path, "rb") as f:
                f.seek(self._offsets[b] + (start - shard["start"]) * row)
                if f.readinto(buf) != len(buf):
                    raise RuntimeError(f"open_attributions: {str(path)!r} is shorter than its header says")
            parts.append(torch.frombuffer(buf, dtype=self.dtype).view(take, *self.map_shape) if buf else
                         torch.empty((take, *self.map_shape), dtype=self.dtype))
            start += take
            b += 1
        if not parts:
            return torch.empty((0, *self.map_shape), dtype=self.dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _columns(self) -> Tensor:
        if self._meta is None:
            parts = []
            for shard in self._index["shards"]:
                path = self.root / shard["meta"]
                offset, _, shape = codec.read_header(path)
                with open(path, "rb") as f:
                    f.seek(offset)
                    parts.append(torch.frombuffer(bytearray(f.read()), dtype=torch.long).view(*shape))
            self._meta = torch.cat(parts)
        return self._meta

    @property
    def indices(self) -> Tensor:
        """Example index of each map, ``[N]`` int64 (``0 .. N-1``, in order)."""
        return self._columns()[:, 0]

    @property
    def targets(self) -> Tensor:
        """The class each map explains, ``[N]`` int64 (the data's target, or the prediction where it was -1)."""
        return self._columns()[:, 1]

    @property
    def predictions(self) -> Tensor:
        """The model's predicted class, ``[N]`` int64 (-1 where the output is not ``[B, classes]``)."""
        return self._columns()[:, 2]


def open_attributions(out: Union[str, os.PathLike]) -> Attributions:
    """Reopen a store written by :func:`attribute_dataset`, read-only and lazily.

    Args:
      out: The folder passed as ``attribute_dataset(..., out=...)``.

    Returns:
      An :class:`Attributions`: ``len(store)``, ``store.maps[i]`` (``[*map_shape]``, read from disk on
      access; slices read ``[k, *map_shape]``), ``store.indices``, ``store.targets``,
      ``store.predictions`` (``[N]`` int64, loaded on first access), ``store.manifest``.

    Raises:
      ValueError: ``out`` is not a finished store (no ``index.json``: an interrupted run, which the
        same ``attribute_dataset`` call resumes).

    Example:
      >>> store = open_attributions("maps/")
      >>> store.maps[0:8].shape, store.predictions[:8]   # [8, 1, 224, 224]
    """
    root = Path(out)
    index_path, manifest_path = root / "index.json", root / "manifest.json"
    if not index_path.is_file():
        hint = ("It holds a manifest but no index: an interrupted run; call attribute_dataset again with the "
                "same arguments to finish it." if manifest_path.is_file() else
                "Pass the out folder of attribute_dataset.")
        raise _checks.value_error("open_attributions", "a folder written by attribute_dataset, with index.json",
                                  repr(str(root)), hint)
    with open(index_path) as f:
        index = json.load(f)
    with open(manifest_path) as f:
        manifest = json.load(f)
    if index.get("format") != FORMAT:
        raise _checks.value_error("open_attributions", f"format {FORMAT!r}", repr(index.get("format")))
    return Attributions(root, index, manifest)


def batches(n: int, batch_size: int) -> List[range]:
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
