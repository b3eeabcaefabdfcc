"""A Griffe extension for the docs site (mkdocs.yml): docstrings that the package fills in at import.

Shared docstring text is written once, in ``torchex_fn/core/docs.py``, and a docstring names it by a
placeholder (``{model_fn}``, ``{args.grad_cam}``) that the ``@_docs.fill`` decorator replaces when the
module is imported. Griffe reads docstrings from the source, where the placeholders still stand; this
extension gives those functions the docstring that the imported module holds (what ``help()`` shows).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

import griffe

from torchex_fn.core.docs import unfilled


class ImportedDocstrings(griffe.Extension):
    def on_function(self, *, func: griffe.Function, **kwargs: Any) -> None:
        if func.docstring is None or not unfilled(func.docstring.value):
            return
        module = importlib.import_module(func.parent.path)
        doc = inspect.getdoc(getattr(module, func.name))
        if doc and not unfilled(doc):
            func.docstring.value = doc
