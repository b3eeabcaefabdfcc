"""Environment probes: is torch.compile tracing, can a value be read on the host, is it concrete."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["concrete_any", "compiling", "reads_values"]


def concrete_any(mask: Tensor) -> Optional[bool]:
    """``bool(mask.any())`` when the values are concrete, ``None`` under ``vmap``.

    Values are not available inside ``torch.func.vmap`` (data-dependent control flow is refused),
    so checks that need them are done only where they can be; under ``vmap`` the kernels
    themselves still raise on out-of-range indices.
    """
    try:
        return bool(mask.any())
    except RuntimeError as err:  # vmap: data-dependent control flow
        if "vmap" in str(err) or "data-dependent" in str(err):
            return None
        raise


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing the current code (a value read there would break the graph)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # torch >= 2.3
    if is_compiling is None:  # torch 2.1-2.2
        is_compiling = getattr(getattr(torch, "_dynamo", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def reads_values(t: Tensor) -> bool:
    """Whether a value check on ``t`` reads the answer on the host: a CPU tensor, run eagerly.

    A CPU tensor already lives in host memory, so reading one boolean costs microseconds and buys
    a ``ValueError`` with the offending values. On an accelerator the same read would wait for every
    queued kernel (a host-device synchronisation), and under ``torch.compile`` it would break the
    graph: there, :func:`check_values` enqueues ``torch._assert_async`` instead.
    """
    return t.device.type == "cpu" and not compiling()
