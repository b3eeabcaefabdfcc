"""The store's file format: ``.npy`` arrays (NumPy's documented format, written without NumPy) and JSON,
each written atomically (a temporary file, flushed, renamed into place, the folder flushed; a failed write
removes its temporary file), SHA-256 checksums of files and of JSON records, and the file names of a batch."""
from __future__ import annotations

import ast
import ctypes
import hashlib
import json
import os
import struct
import sys
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Dict, Sequence, Tuple

import torch
from torch import Tensor


__all__ = ["NPY_DTYPES", "TORCH_DTYPES", "raw", "npy_header", "read_header", "write_atomic", "write_json_atomic",
           "read_json", "json_digest", "file_digest", "npy_digest", "shard_names", "check_name", "complete"]


NPY_DTYPES = {torch.float16: "f2", torch.float32: "f4", torch.float64: "f8", torch.int64: "i8"}
TORCH_DTYPES = {v: k for k, v in NPY_DTYPES.items()}
ORDER = "<" if sys.byteorder == "little" else ">"


# --------------------------------------------------------------------------------------- .npy I/O
def raw(t: Tensor) -> Tuple[memoryview, Tensor]:
    """A zero-copy byte view of a CPU tensor's data, and the contiguous tensor that owns it (keep it alive)."""
    t = t.detach().to("cpu").contiguous()
    size = t.numel() * t.element_size()
    if size == 0:
        return memoryview(b""), t
    return memoryview((ctypes.c_ubyte * size).from_address(t.data_ptr())).cast("B"), t


def npy_header(t: Tensor) -> bytes:
    """Version 1.0 header of NumPy's ``.npy`` format (data aligned to 64 bytes)."""
    shape = tuple(t.shape)
    text = f"{{'descr': '{ORDER}{NPY_DTYPES[t.dtype]}', 'fortran_order': False, 'shape': {shape!r}, }}"
    pad = -(10 + len(text) + 1) % 64
    text = text + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def read_header(path: Path) -> Tuple[int, torch.dtype, Tuple[int, ...]]:
    """``(data offset, dtype, shape)`` of a C-ordered ``.npy`` file."""
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:6] != b"\x93NUMPY":
            raise ValueError(f"open_attributions: expected a .npy file, got {str(path)!r} without the .npy magic")
        if head[6] == 1:
            length, start = struct.unpack("<H", head[8:10])[0], 10
        else:
            length, start = struct.unpack("<I", head[8:12])[0], 12
        f.seek(start)
        info = ast.literal_eval(f.read(length).decode("latin1"))
    descr = info["descr"]
    if descr[1:] not in TORCH_DTYPES or descr[0] not in "<>|=" or info["fortran_order"]:
        raise ValueError(f"open_attributions: expected a C-ordered float16/32/64 or int64 array in {str(path)!r}, "
                         f"got descr {descr!r}, fortran_order {info['fortran_order']}")
    if descr[0] in "<>" and descr[0] != ORDER:
        raise ValueError(f"open_attributions: expected {str(path)!r} in this machine's byte order, got {descr!r}")
    return start + length, TORCH_DTYPES[descr[1:]], tuple(info["shape"])


def _write_all(f: Any, parts: Sequence[Any]) -> None:
    """Every part to the open file ``f`` (the one place that writes bytes: a test makes it fail here)."""
    for part in parts:
        f.write(part)


def _commit(path: Path, parts: Sequence[Any]) -> None:
    """``parts`` as the file ``path``: written under a temporary name, flushed to disk, renamed into place, and
    the folder flushed so that the rename survives a power cut. On any error the temporary file is removed and
    nothing of it is visible under ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            _write_all(f, parts)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory descriptors: the rename is atomic, only less durable
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, t: Tensor) -> None:
    """``t`` as a ``.npy`` file, atomically (see :func:`_commit`)."""
    data, owner = raw(t)
    _commit(path, [npy_header(owner), data])
    del owner


def npy_digest(t: Tensor) -> Tuple[str, int]:
    """``(SHA-256, size in bytes)`` of the ``.npy`` file :func:`write_atomic` writes for ``t``, from memory."""
    data, owner = raw(t)
    head = npy_header(owner)
    digest = hashlib.sha256(head)
    digest.update(data)
    del owner
    return digest.hexdigest(), len(head) + len(data)


def file_digest(path: Path) -> Tuple[str, int]:
    """``(SHA-256, size in bytes)`` of a file, read in blocks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def json_digest(obj: Mapping) -> str:
    """SHA-256 of a JSON record's canonical text, its own ``"sha256"`` entry left out."""
    body = {k: v for k, v in obj.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_json_atomic(path: Path, obj: Any, *, checked: bool = False) -> None:
    """``obj`` as JSON, atomically; ``checked``: with a ``"sha256"`` entry of its canonical text
    (:func:`json_digest`), which :func:`read_json` verifies."""
    if checked:
        obj = {**obj, "sha256": json_digest(obj)}
    _commit(path, [json.dumps(obj, indent=1, sort_keys=True).encode()])


def read_json(path: Path, *, checked: bool) -> Dict[str, Any]:
    """A JSON object; raises ``ValueError`` naming the file if it does not parse, or if ``checked`` and its
    ``"sha256"`` entry is missing or does not match its text (a changed or damaged file)."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"expected {str(path)!r} to hold a JSON object, got a file that does not parse ({err}): "
                         "it was damaged or changed after it was written") from err
    if not isinstance(obj, dict):
        raise ValueError(f"expected {str(path)!r} to hold a JSON object, got {type(obj).__name__}")
    if checked and obj.get("sha256") != json_digest(obj):
        raise ValueError(f"expected {str(path)!r} to match the SHA-256 written into it, got "
                         f"{'no checksum' if 'sha256' not in obj else 'another content'}: it was damaged or changed "
                         "after it was written")
    return obj


def shard_names(b: int) -> Tuple[str, str]:
    return f"shards/{b:06d}.maps.npy", f"shards/{b:06d}.meta.npy"


def check_name(b: int) -> str:
    """The record of batch ``b`` (rows, size and SHA-256 of both files), written before them."""
    return f"checks/{b:06d}.json"


def complete(root: Path, b: int, rows: int) -> bool:
    """Whether batch ``b`` (``rows`` examples) has both files, whole, of the length their headers announce
    (the test of format 1, which has no checksums)."""
    for name in shard_names(b):
        path = root / name
        if not path.is_file():
            return False
        try:
            offset, dtype, shape = read_header(path)
        except (ValueError, SyntaxError, KeyError, struct.error, UnicodeDecodeError):
            return False
        numel = 1
        for s in shape:
            numel *= s
        if not shape or shape[0] != rows or path.stat().st_size != offset + numel * dtype.itemsize:
            return False
    return True
