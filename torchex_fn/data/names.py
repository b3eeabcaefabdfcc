"""A synthetic name task in the style of indirect-object identification, for activation patching.

A prompt of ``length`` tokens reads ``A B f ... f X``: two distinct names ``A`` and ``B``, filler tokens,
and ``X``, one of the two names again; the answer (the next token) is the OTHER name (``X = A -> B``,
``X = B -> A``), as in "When Mary and John went to the store, John gave a drink to -> Mary". The corrupt
prompt renames ``B`` to a third name ``C`` wherever it occurs, so that the answer of ``A B .. A`` moves
from ``B`` to ``C``: patching the corrupt run's activations into the clean one shows where the model
reads the second name and which layer carries it to the last position.

Token ids: names are ``0 .. names - 1``, fillers ``names .. names + fillers - 1``.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import checks as _checks

__all__ = ["NameTask", "name_task", "train_name_model"]


class NameTask(NamedTuple):
    """Prompts ``[n, length]`` of :func:`name_task`, their corrupt version, answers ``[n]``, the vocabulary size."""

    clean: Tensor
    corrupt: Tensor
    answer: Tensor            # the clean prompt's next token
    corrupt_answer: Tensor    # the corrupt prompt's next token
    vocab_size: int


def name_task(n: int, *, length: int = 8, names: int = 16, fillers: int = 16, repeat: Optional[str] = None,
              seed: int = 0) -> NameTask:
    """``n`` prompts ``A B f .. f X`` whose answer is the name that ``X`` does not repeat, and their corruption.

    Args:
      n: The number of prompts.
      length: Tokens per prompt, >= 3 (two names, ``length - 3`` fillers, the repeated name).
      names: How many name tokens, >= 3.
      fillers: How many filler tokens, >= 1.
      repeat: Which name ``X`` repeats: ``"first"`` (``X = A``, answer ``B``; the corrupt answer is then ``C``),
        ``"second"`` (``X = B``, answer ``A``, in both prompts) or ``None`` (default: either, at random).
      seed: The seed; the same seed gives the same prompts.

    Returns:
      :class:`NameTask`: ``clean`` and ``corrupt`` ``[n, length]`` int64 ids, ``answer`` and ``corrupt_answer``
      ``[n]``, and ``vocab_size = names + fillers``.

    Example:
      >>> task = name_task(4, length=6, repeat="first")
      >>> task.clean[0], task.answer[0]      # e.g. [3, 9, 20, 17, 25, 3] -> 9
    """
    fn = "name_task"
    for name, value, low in (("n", n, 1), ("length", length, 3), ("names", names, 3), ("fillers", fillers, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _checks.type_error(fn, f"{name}, an int", _checks.describe(value))
        if value < low:
            raise _checks.value_error(fn, f"{name} >= {low}", _checks.describe(value))
    if repeat not in (None, "first", "second"):
        raise _checks.value_error(fn, "repeat in (None, 'first', 'second')", _checks.describe(repeat))
    g = torch.Generator().manual_seed(seed)
    trio = torch.rand(n, names, generator=g).argsort(dim=1)[:, :3]      # A, B, C: three distinct names
    a, b, c = trio.unbind(1)
    fill = names + torch.randint(0, fillers, (n, length - 3), generator=g)
    if repeat is None:
        second = torch.rand(n, generator=g) < 0.5
    else:
        second = torch.full((n,), repeat == "second")
    x = torch.where(second, b, a)
    clean = torch.cat([a[:, None], b[:, None], fill, x[:, None]], dim=1)
    corrupt = torch.where(clean == b[:, None], c[:, None], clean)
    answer = torch.where(second, a, b)
    corrupt_answer = torch.where(second, a, c)
    return NameTask(clean, corrupt, answer, corrupt_answer, names + fillers)


def train_name_model(*, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, length: int = 8, names: int = 16,
                     fillers: int = 16, steps: int = 300, batch: int = 64, lr: float = 3e-3, seed: int = 0) -> Any:
    """A small GPT-2 (HuggingFace ``GPT2LMHeadModel``) trained on :func:`name_task`, returned in eval mode.

    The loss is the cross-entropy of the next token at the last position, on prompts of both kinds
    (:func:`name_task` with ``repeat=None``, clean and corrupt prompts alike). Deterministic on the CPU:
    the initialisation and the data come from ``seed`` (the global random state is restored afterwards),
    and training runs on one intra-op thread (restored afterwards), the fastest for a model this small:
    the defaults (300 Adam steps of 64 prompts) took 5-15 s on a shared 2-core CPU and reach full accuracy.

    Args:
      n_layer: Transformer blocks.
      n_embd: The width.
      n_head: Attention heads.
      length: The prompt length (see :func:`name_task`).
      names: Name tokens.
      fillers: Filler tokens.
      steps: Optimiser steps.
      batch: Prompts a step.
      lr: AdamW's learning rate.
      seed: The seed of the initialisation and of the data.

    Returns:
      The trained ``transformers.GPT2LMHeadModel`` in eval mode (eager attention, no dropout).
    """
    import transformers   # optional dependency

    pool = name_task(8192, length=length, names=names, fillers=fillers, seed=seed)
    ids = torch.cat([pool.clean, pool.corrupt])
    answers = torch.cat([pool.answer, pool.corrupt_answer])
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            config = transformers.GPT2Config(vocab_size=pool.vocab_size, n_positions=length, n_embd=n_embd,
                                             n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                             attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                             attn_implementation="eager")   # type: ignore[call-arg]
            model = transformers.GPT2LMHeadModel(config)
            optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
            order = torch.Generator().manual_seed(seed + 1)
            for _ in range(steps):
                rows = torch.randint(0, ids.shape[0], (batch,), generator=order)
                loss = F.cross_entropy(model(ids[rows], use_cache=False).logits[:, -1], answers[rows])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        finally:
            torch.set_num_threads(threads)
    return model.eval()
