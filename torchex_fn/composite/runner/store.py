"""The store of :func:`attribute_dataset`: its manifest (what produced it, with fingerprints of the arguments),
the lock that keeps a second run out, the writer of shards and their checksum records, the index written
last, and :class:`Attributions`, the lazy reader that checks every file against its checksum before use."""
from __future__ import annotations

import datetime
import errno
import functools
import hashlib
import json
import os
import queue
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor

from ...core import checks as _checks
from ...core import targets as _targets
from ...core.types import layer_name_of
from . import codec

try:
    import fcntl
except ImportError:  # not on Windows: the lock falls back to its holder's pid
    fcntl = None  # type: ignore[assignment]

__all__ = ["Attributions", "open_attributions", "FN", "FORMAT", "FORMAT_1", "LOCK", "Lock", "Writer", "manifest",
           "check_store", "stored", "write_index", "fingerprint", "params_digest"]

FN = "attribute_dataset"
FORMAT = "torchex_fn.attributions/2"  # format 1 and checksums: docs/dataset_storage.md
FORMAT_1 = "torchex_fn.attributions/1"
LOCK = "lock"


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
    """A thread that commits shards from a bounded queue, beside the computation: the batch's checksum record
    (sizes and SHA-256 of both files, computed from memory), the meta file, then the maps file."""

    def __init__(self, root: Path, depth: int = 4):
        self.root = root
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: Optional[BaseException] = None
        self.stored = 0
        self.thread = threading.Thread(target=self._run, name="torchex_fn-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            path = self.root
            try:
                b, maps, meta, ready = item
                if ready is not None:
                    ready.synchronize()  # the device -> pinned host copy of the maps has landed
                maps_name, meta_name = codec.shard_names(b)
                record: Dict[str, Any] = {"batch": b, "rows": int(maps.shape[0])}
                for key, name, t in (("meta", meta_name, meta), ("maps", maps_name, maps)):
                    digest, size = codec.npy_digest(t)  # from memory, before the bytes meet the disk
                    record[key] = {"file": name, "bytes": size, "sha256": digest}
                # the record first, then meta, then maps: the maps file, renamed into place last, commits the batch
                path = self.root / codec.check_name(b)
                codec.write_json_atomic(path, record, checked=True)
                path = self.root / meta_name
                codec.write_atomic(path, meta)
                path = self.root / maps_name
                codec.write_atomic(path, maps)
                self.stored += 1
            except OSError as err:  # handed to the computing thread, which raises it
                self.error = write_error(err, path, self.stored)
            except BaseException as err:
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


def write_error(err: OSError, path: Path, stored: int = 0) -> OSError:
    """The error of a failed write, with the file, the cause and what to do; same errno, so callers can test it."""
    full = err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    cause = "the disk is full" if full else (err.strerror or str(err))
    hint = ("Free space (or choose an out folder on a larger disk), then run the same call again: "
            if full else "Fix the cause, then run the same call again: ")
    kept = f"the {stored} batches this run stored are kept" if stored else "the batches stored before are kept"
    text = (f"{FN}: could not write {str(path)!r} ({cause}). Nothing of that file is visible: it was being written "
            f"under a temporary name, now removed. {hint}{kept} and only the others are computed.")
    out = OSError(err.errno, text)
    out.__cause__ = err
    return out




# -------------------------------------------------------------------------------------- the store
def manifest(method: Callable, model_fn: Any, params: Mapping, dataset: Any, n: int, batch_size: int,
             dtype: Optional[torch.dtype], options: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
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
        # how the first run computed; not compared: a resumed run on CPU computes with the same thread count
        "compute": {"threads": torch.get_num_threads(), "device": device.type, "torch": torch.__version__},
    }


_NOT_COMPARED = ("compute", "sha256")


def differences(old: Mapping, new: Mapping) -> List[str]:
    out = []
    for key in sorted((set(old) | set(new)) - set(_NOT_COMPARED)):
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


def _own(name: str) -> bool:
    """A name the store itself puts in its folder (other names in a folder without manifest: refused)."""
    return name in ("shards", "checks", LOCK) or (name.startswith(".manifest.json.tmp"))


def check_store(root: Path, manifest: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The folder's manifest if it holds a resumable store of the same arguments, None for a new store;
    raises if ``root`` holds something else: another run's store, another format's, a damaged manifest."""
    path = root / "manifest.json"
    if path.is_file():
        try:
            old = codec.read_json(path, checked=False)
        except ValueError as err:
            raise _checks.value_error(FN, f"a readable manifest.json in out={str(root)!r}", str(err),
                                      "Results are never mixed with an unreadable store: choose another out "
                                      "folder, or delete this one to start over.") from None
        found = old.get("format")
        if found != FORMAT:
            older = found == FORMAT_1
            what = "an older torchex_fn, without checksums" if older else "not a format this version knows"
            raise _checks.value_error(
                FN, f"a store of format {FORMAT!r} in out={str(root)!r} to resume", f"format {found!r} ({what})",
                ("open_attributions reads it as it is (a finished one); to compute it with this version, "
                 "choose another out folder." if older else
                 "Read it with the torchex_fn version that wrote it, or choose another out folder."))
        if old.get("sha256") != codec.json_digest(old):
            raise _checks.value_error(FN, f"manifest.json of out={str(root)!r} as it was written",
                                      "a file that does not match its SHA-256 (damaged or edited)",
                                      "Results are never mixed with a store whose arguments are unknown: choose "
                                      "another out folder, or delete this one to start over.")
        diff = differences(old, manifest)
        if diff:
            raise _checks.value_error(
                FN, f"the same arguments as the run that created out={str(root)!r}", f"different {', '.join(diff)}",
                "Results of different runs are never mixed: choose another out folder, or delete this one to "
                "start over.")
        return old
    if root.exists() and (not root.is_dir() or any(not _own(p.name) for p in root.iterdir())):
        raise _checks.value_error(FN, "out, a new or empty folder, or one written by attribute_dataset",
                                  f"{str(root)!r}, which holds other files and no manifest.json",
                                  "Choose another out folder.")
    return None


def stored(root: Path, b: int, rows: int) -> bool:
    """Whether batch ``b`` (``rows`` examples) is stored: its maps file exists (written last), its checksum
    record is whole, and both its files have the size and SHA-256 the record gives (each file read once)."""
    path = root / codec.check_name(b)
    if not path.is_file() or not (root / codec.shard_names(b)[0]).is_file():
        return False
    try:
        record = codec.read_json(path, checked=True)
    except (OSError, ValueError):
        return False
    if record.get("rows") != rows or record.get("batch") != b:
        return False
    for key, name in zip(("maps", "meta"), codec.shard_names(b)):
        entry = record.get(key)
        if not isinstance(entry, dict) or entry.get("file") != name:
            return False
        try:
            if (root / name).stat().st_size != entry.get("bytes") or \
                    codec.file_digest(root / name) != (entry.get("sha256"), entry.get("bytes")):
                return False
        except OSError:
            return False
    return True


# ------------------------------------------------------------------------------------------ lock
def _process_start(pid: int) -> Optional[str]:
    """When process ``pid`` started (clock ticks since boot, Linux); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: Mapping) -> bool:
    """Whether the process a lock file names still runs (on another host: assumed so)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname():
        return True
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    start = holder.get("process_start")
    return start is None or start == _process_start(pid)  # a reused pid is another process


class Lock:
    """One run at a time in an out folder: ``out/lock``, held with ``flock`` (released by the kernel when its
    process ends, however it ends: a killed run leaves a file that the next run takes over), and naming its
    holder (pid, host, start) for the message of a refused run. Where ``flock`` is unavailable the holder's
    pid is checked instead (alive on this host, or on another host: refused; dead: taken over)."""

    def __init__(self, path: Path, fd: Optional[int]):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, root: Path) -> Lock:
        if root.exists() and not root.is_dir():
            raise _checks.value_error(FN, "out, a folder (new, empty, or written by attribute_dataset)",
                                      f"{str(root)!r}, a file", "Choose another out folder.")
        root.mkdir(parents=True, exist_ok=True)
        path = root / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
              "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is None:
                    raise OSError(errno.ENOLCK, "no fcntl")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = cls._holder(fd)
                os.close(fd)
                raise cls._refusal(path, holder) from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                holder = cls._holder(fd)  # no flock here (some network file systems): the holder's pid decides
                if holder and holder.get("pid") != os.getpid() and _alive(holder):
                    os.close(fd)
                    raise cls._refusal(path, holder) from None
                cls._write(fd, me)
                return cls(path, fd)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released and removed it between our open and our flock: try again
                os.close(fd)
                continue
            cls._write(fd, me)
            return cls(path, fd)

    @staticmethod
    def _holder(fd: int) -> Dict[str, Any]:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 4096).decode("utf-8")
            holder = json.loads(text) if text.strip() else {}
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _write(fd: int, holder: Mapping) -> None:
        data = json.dumps(holder, sort_keys=True).encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.fsync(fd)

    @staticmethod
    def _refusal(path: Path, holder: Mapping) -> ValueError:
        who = (f"pid {holder.get('pid')} on host {holder.get('host')!r}, since {holder.get('since')}"
               if holder else "a process that has not yet written its name")
        return _checks.value_error(
            FN, f"out={str(path.parent)!r} free for this run",
            f"it in use by another run ({who}; lock file {str(path)!r})",
            "Two runs writing one store would overwrite each other's files: wait for that run to end, or choose "
            "another out folder. Several processes of one job: start them with torchrun, whose ranks share the "
            "lock. A lock whose process has ended is taken over by the next run by itself.")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still held, so that no one locks the file being removed
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None




def write_index(root: Path, n: int, batch_size: int) -> None:
    shards: List[Dict[str, Any]] = []
    shape: Any = None
    dtype: Any = None
    for b, rows in enumerate(batches(n, batch_size)):
        maps_name, meta_name = codec.shard_names(b)
        try:
            record = codec.read_json(root / codec.check_name(b), checked=True)
            whole = record.get("rows") == len(rows) and all(
                (root / record[key]["file"]).stat().st_size == record[key]["bytes"] for key in ("maps", "meta"))
        except (OSError, ValueError, KeyError, TypeError):
            whole = False
        if not whole:
            raise RuntimeError(f"{FN}: expected every batch stored after all ranks finished, got batch {b} "
                               f"({maps_name}) missing. Run the same call again to compute it.")
        _, d, s = codec.read_header(root / maps_name)
        if shape is None:
            shape, dtype = s[1:], d
        elif (s[1:], d) != (shape, dtype):
            raise RuntimeError(f"{FN}: expected maps of one shape and dtype in every shard, got {s[1:]} {d} "
                               f"in {maps_name}, {shape} {dtype} in the first")
        shards.append({"maps": maps_name, "meta": meta_name, "start": rows.start, "stop": rows.stop,
                       "maps_sha256": record["maps"]["sha256"], "maps_bytes": record["maps"]["bytes"],
                       "meta_sha256": record["meta"]["sha256"], "meta_bytes": record["meta"]["bytes"]})
    codec.write_json_atomic(root / "index.json", {
        "format": FORMAT, "count": n, "batch_size": batch_size, "map_shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""), "meta_columns": ["index", "target", "prediction"],
        "shards": shards}, checked=True)




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
        self.format = index["format"]
        self.checksums = self.format != FORMAT_1  # format 1 stores have none: read as they are
        self.maps = _Maps(self)
        self._meta: Optional[Tensor] = None
        self._offsets: Dict[int, int] = {}
        self._verified: Set[Tuple[int, str]] = set()

    def _verify(self, b: int, key: str) -> None:
        """Raise unless file ``key`` ("maps" or "meta") of shard ``b`` has the size and SHA-256 of the index;
        each file is read whole once per opened store, before any of its bytes is returned."""
        if not self.checksums or (b, key) in self._verified:
            return
        shard = self._index["shards"][b]
        path = self.root / shard[key]
        try:
            found = codec.file_digest(path)
        except OSError as err:
            raise _checks.value_error("open_attributions", f"shard file {str(path)!r}, listed in index.json",
                                      f"an unreadable file ({err.strerror or err})") from err
        if found != (shard[f"{key}_sha256"], shard[f"{key}_bytes"]):
            raise _checks.value_error(
                "open_attributions", f"shard file {str(path)!r} as it was written ({shard[f'{key}_bytes']} bytes, "
                f"SHA-256 {shard[f'{key}_sha256'][:16]}...)", f"{found[1]} bytes, SHA-256 {found[0][:16]}...",
                "The file was damaged or changed after it was written; none of its data is returned. Run "
                "attribute_dataset with the same arguments into the same out folder: it checks every shard and "
                "computes the damaged ones again.")
        self._verified.add((b, key))

    def verify(self) -> None:
        """Check every file of the store against its checksum now (reads the whole store once); raises
        ``ValueError`` naming the first damaged file. Reading checks each file on first use anyway."""
        for b in range(len(self._index["shards"])):
            self._verify(b, "maps")
            self._verify(b, "meta")

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
            self._verify(b, "maps")
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
            for b, shard in enumerate(self._index["shards"]):
                self._verify(b, "meta")
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
      ``store.predictions`` (``[N]`` int64, loaded on first access), ``store.manifest``,
      ``store.format`` (``"torchex_fn.attributions/2"``, or ``/1`` for an older store),
      ``store.checksums`` (False for format 1) and ``store.verify()``.

    Raises:
      ValueError: ``out`` is not a finished store (no ``index.json``: an interrupted run, which the
        same ``attribute_dataset`` call resumes); a store of an unknown format; a damaged
        ``index.json`` or ``manifest.json``. Reading a shard file whose size or SHA-256 differs
        from the one recorded when it was written raises too, naming the file, and returns none of
        its data (each file is checked once, on first use; ``store.verify()`` checks all now).
        Stores of format 1 (written before checksums) are read as they are.

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
    try:
        index = codec.read_json(index_path, checked=False)
        found = index.get("format")
        if found not in (FORMAT, FORMAT_1):
            raise _checks.value_error("open_attributions", f"a store of format {FORMAT!r} (or the older {FORMAT_1!r})",
                                      f"format {found!r} in {str(index_path)!r}",
                                      "It was written by another version of torchex_fn (or is not a store): read "
                                      "it with that version.")
        checked = found == FORMAT
        if checked:
            index = codec.read_json(index_path, checked=True)
        manifest = codec.read_json(manifest_path, checked=checked)
    except ValueError as err:
        if str(err).startswith("open_attributions:"):
            raise
        raise _checks.value_error("open_attributions", "index.json and manifest.json as they were written",
                                  str(err), "Run attribute_dataset with the same arguments into the same out "
                                  "folder to write the index again.") from None
    return Attributions(root, index, manifest)


def batches(n: int, batch_size: int) -> List[range]:
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
