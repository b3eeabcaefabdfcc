"""A Griffe extension for the docs site (mkdocs.yml): docstrings that the package fills in at import.

``torchex_fn.cam`` writes one Args block into four docstrings when it is imported (``_ARGS_DOC``
replaces ``{args}``). Griffe reads docstrings from the source, where the placeholder still stands; this
extension gives those functions the docstring that the imported module holds (what ``help()`` shows).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

import griffe


class ImportedDocstrings(griffe.Extension):
    def on_function(self, *, func: griffe.Function, **kwargs: Any) -> None:
        if func.docstring is None or "{args}" not in func.docstring.value:
            return
        module = importlib.import_module(func.parent.path)
        doc = inspect.getdoc(getattr(module, func.name))
        if doc and "{args}" not in doc:
            func.docstring.value = doc
