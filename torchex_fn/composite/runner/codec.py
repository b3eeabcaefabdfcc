"""The store's file format: ``.npy`` arrays (NumPy's documented format, written without NumPy) and JSON,
each written atomically (a temporary file renamed into place), and the shard names of a batch."""
from __future__ import annotations

import ast
import ctypes
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any, Tuple

import torch
from torch import Tensor


__all__ = ["NPY_DTYPES", "TORCH_DTYPES", "raw", "npy_header", "read_header", "write_atomic", "write_json_atomic",
           "shard_names", "stored"]


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


def write_atomic(path: Path, t: Tensor) -> None:
    """``t`` as a ``.npy`` file: written under a temporary name, flushed to disk, then renamed into place."""
    data, owner = raw(t)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(npy_header(owner))
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    del owner


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_names(b: int) -> Tuple[str, str]:
    return f"shards/{b:06d}.maps.npy", f"shards/{b:06d}.meta.npy"


def stored(root: Path, b: int, rows: int) -> bool:
    """Whether batch ``b`` (``rows`` examples) is fully on disk: both files, whole, of the right length."""
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
