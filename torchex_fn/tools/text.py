"""Text: per-token summaries of attributions and rendering of tokens with their scores.

Pure tensor code for the summaries; the renderers return strings (HTML or ANSI), with no IPython
or matplotlib needed.
"""
from __future__ import annotations

import html
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor

from ..core import checks as _checks

__all__ = ["token_scores", "to_html", "to_terminal"]

REDUCTIONS = ("sum", "norm")


def token_scores(attr: Tensor, reduce: str = "sum", *, attention_mask: Optional[Tensor] = None) -> Tensor:
    """One score per token: ``[B, T, D]`` attributions summed (or their L2 norm) over ``D``.

    ``"sum"`` keeps the sign (what the token adds to the score, as in captum's tutorials:
    ``attr.sum(-1)``); ``"norm"`` is the magnitude ``||attr[b, t]||_2`` (never negative). Positions
    where ``attention_mask`` is 0 (padding) get 0.

    Args:
      attr: Attributions ``[B, T, D]`` (e.g. integrated gradients at the embedding layer), or
        ``[B, T]`` already (returned masked, unchanged otherwise).
      reduce: ``"sum"`` (default) or ``"norm"``.
      attention_mask: Optional ``[B, T]`` (0 for padding, nonzero for tokens; any dtype).

    Returns:
      ``[B, T]`` scores of ``attr``'s dtype.

    Raises:
      TypeError: ``attr`` not a floating-point tensor; ``attention_mask`` not a tensor.
      ValueError: ``token_scores: expected attr of shape [B, T, D] ...``; an unknown ``reduce``; a mask
        whose shape is not ``[B, T]``.

    Example:
      >>> attr = tx.integrated_gradients(fn, params, tokens, 1, layer="bert.embeddings")  # [2, 7, 32]
      >>> tx.text.token_scores(attr, attention_mask=tokens["attention_mask"]).shape      # [2, 7]

    Cost: one reduction over ``D``.
    """
    fn = "token_scores"
    if not isinstance(attr, Tensor) or not attr.is_floating_point():
        raise _checks.type_error(fn, "attr, a floating-point tensor [B, T, D]", _checks.describe(attr))
    if attr.ndim not in (2, 3):
        raise _checks.value_error(fn, "attr of shape [B, T, D] (or [B, T])", _checks.describe(attr),
                                  "Layer attributions of a transformer's embeddings are [B, T, hidden].")
    if not isinstance(reduce, str) or reduce not in REDUCTIONS:
        raise _checks.unknown_name(fn, "reduce", str(reduce), REDUCTIONS)
    if attr.ndim == 3:
        scores = attr.sum(-1) if reduce == "sum" else torch.linalg.vector_norm(attr, dim=-1)
    else:
        scores = attr if reduce == "sum" else attr.abs()
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise _checks.type_error(fn, "attention_mask, a tensor [B, T]", _checks.describe(attention_mask))
        if attention_mask.shape != scores.shape:
            raise _checks.value_error(fn, f"attention_mask of shape {list(scores.shape)}",
                                      _checks.describe(attention_mask))
        scores = torch.where(attention_mask.to(scores.device) != 0, scores, torch.zeros_like(scores))
    return scores


def _rows(fn: str, tokens: Any, scores: Any) -> List[tuple]:
    """``[(tokens_b, scores_b as floats)]``: one row per example, checked against each other."""
    if isinstance(scores, Tensor):
        if scores.ndim == 1:
            scores = scores[None]
        if scores.ndim != 2:
            raise _checks.value_error(fn, "scores of shape [B, T] (or [T])", _checks.describe(scores))
        table = scores.detach().cpu().double().tolist()
    elif isinstance(scores, Sequence) and scores and not isinstance(scores[0], (Sequence, Tensor)):
        table = [[float(s) for s in scores]]
    else:
        table = [[float(s) for s in row] for row in scores]
    if isinstance(tokens, Sequence) and tokens and isinstance(tokens[0], str):
        tokens = [tokens]
    if not isinstance(tokens, Sequence) or not all(
            isinstance(row, Sequence) and all(isinstance(t, str) for t in row) for row in tokens):
        raise _checks.type_error(fn, "tokens, a list of strings (one example) or a list of such lists",
                                 _checks.describe(tokens))
    if len(tokens) != len(table) or any(len(t) != len(s) for t, s in zip(tokens, table)):
        raise _checks.value_error(fn, "one score per token in every row",
                                  f"token rows of lengths {[len(t) for t in tokens]} and score rows of lengths "
                                  f"{[len(s) for s in table]}")
    return list(zip(tokens, table))


def _scale(row: List[float], scale: Optional[float]) -> float:
    top = max((abs(s) for s in row), default=0.0) if scale is None else float(scale)
    return top if top > 0 else 1.0


def _html_colour(score: float, top: float) -> str:
    """Green for positive, red for negative, white at 0; lightness from |score| / top (as captum)."""
    level = min(1.0, abs(score) / top)
    hue = 120 if score >= 0 else 0
    lightness = 100 - int(50 * level)
    return f"hsl({hue}, 75%, {lightness}%)"


def to_html(tokens: Any, scores: Any, *, labels: Optional[Sequence[str]] = None,
            scale: Optional[float] = None) -> str:
    """An HTML table: one row per example, each token on a background coloured by its score.

    Positive scores are green, negative red, 0 white; the colour's strength is ``|score| / scale``
    (``scale``: the row's largest ``|score|`` by default), as captum's ``visualize_text`` shows, but
    returned as a string (``IPython.display.HTML(s)`` shows it in a notebook). Token text and labels
    are HTML-escaped; each token carries its score in a ``title`` (hover) attribute.

    Args:
      tokens: One example's tokens (a list of strings) or one list per example.
      scores: ``[B, T]`` (or ``[T]``) scores, a tensor or nested lists, one per token
        (e.g. :func:`token_scores`).
      labels: Optional text per example, shown in a first column (e.g. ``"pred: positive"``).
      scale: The ``|score|`` of full colour, shared by all rows; default: each row's own maximum.

    Returns:
      A string ``<table class="torchex-text">...</table>``.

    Raises:
      TypeError: tokens that are not strings. ValueError: rows of tokens and scores of different lengths.

    Example:
      >>> tx.text.to_html(["good", "film"], torch.tensor([0.5, -0.25]))
      '<table class="torchex-text"><tr><td><mark style="background-color: hsl(120, 75%, 50%)" ...'

    Cost: linear in the number of tokens.
    """
    fn = "to_html"
    rows = _rows(fn, tokens, scores)
    if labels is not None and len(labels) != len(rows):
        raise _checks.value_error(fn, f"one label per example ({len(rows)})", f"{len(labels)} labels")
    out = ['<table class="torchex-text">']
    for i, (words, values) in enumerate(rows):
        top = _scale(values, scale)
        cells = "".join(
            f'<mark style="background-color: {_html_colour(s, top)}" title="{s:.4g}">{html.escape(w)}</mark> '
            for w, s in zip(words, values)).rstrip(" ")
        label = "" if labels is None else f"<td>{html.escape(str(labels[i]))}</td>"
        out.append(f"<tr>{label}<td>{cells}</td></tr>")
    out.append("</table>")
    return "".join(out)


def to_terminal(tokens: Any, scores: Any, *, scale: Optional[float] = None) -> str:
    """Tokens on ANSI 256-colour backgrounds: green for positive, red for negative, one line per example.

    Five shades per sign by ``|score| / scale`` (``scale``: the row's largest ``|score|`` by default);
    a score of 0 has no colour. Print the string in a terminal that shows ANSI colours.

    Args:
      tokens: One example's tokens (a list of strings) or one list per example.
      scores: ``[B, T]`` (or ``[T]``) scores, a tensor or nested lists.
      scale: The ``|score|`` of full colour; default: each row's own maximum.

    Returns:
      A string, lines joined by ``\\n``, each token as ``ESC[48;5;<colour>m<token>ESC[0m``.

    Raises:
      TypeError / ValueError: as :func:`to_html`.

    Example:
      >>> print(tx.text.to_terminal(["good", "film"], torch.tensor([0.5, -0.25])))

    Cost: linear in the number of tokens.
    """
    rows = _rows("to_terminal", tokens, scores)
    lines = []
    for words, values in rows:
        top = _scale(values, scale)
        parts = []
        for w, s in zip(words, values):
            shade = min(4, int(5 * min(1.0, abs(s) / top)))   # 0 .. 4
            if s == 0:
                parts.append(w)
                continue
            colour = _GREENS[shade] if s > 0 else _REDS[shade]
            parts.append(f"\x1b[48;5;{colour}m{w}\x1b[0m")
        lines.append(" ".join(parts))
    return "\n".join(lines)


# xterm 256-colour backgrounds from light to strong.
_GREENS = (194, 157, 120, 77, 34)
_REDS = (224, 217, 210, 203, 196)
