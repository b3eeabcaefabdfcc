"""MkDocs hooks for the site (see mkdocs.yml): pages generated from the repository's own files, and links.

- The home page is README.md, and benchmarks/README.md and CHANGELOG.md become pages, without copies;
  their links to repository paths (``docs/x.md``, from benchmarks/ ``../docs/x.md``, ``benchmarks/README.md``)
  become the pages' paths.
- methods.md is a table of every method of ``torchex_fn.registry.METHODS`` (:func:`methods_page`), written
  at build time, so it cannot fall behind the registry.
- Docstrings name objects with Sphinx roles (``:func:`grad_cam```); in the rendered HTML such a role
  becomes an optional cross-reference to the object's page (plain code when it has none, e.g. a
  private helper), so a role never breaks ``mkdocs build --strict``.
"""
from __future__ import annotations

import html
import importlib
import inspect
import logging
import pathlib
import re
import sys

from mkdocs.structure.files import File, Files

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package of the checkout being built, not another installed copy
    sys.path.insert(0, str(ROOT))

import torchex_fn  # noqa: E402
from torchex_fn import registry  # noqa: E402
from torchex_fn.cli import explain as cli_explain  # noqa: E402

PAGES = {"index.md": "README.md", "benchmarks.md": "benchmarks/README.md", "changelog.md": "CHANGELOG.md"}
LINKS = {"docs/": "", "../docs/": "", "benchmarks/README.md": "benchmarks.md", "CHANGELOG.md": "changelog.md"}
ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):<code>~?([\w.]+)</code>")


def _relink(text: str) -> str:
    def one(match: re.Match) -> str:
        target = match.group(2)
        for prefix, replacement in LINKS.items():
            if target.startswith(prefix):
                target = replacement + target[len(prefix):]
                break
        return f"{match.group(1)}({target})"
    return re.sub(r"(\])\(([^)\s]+)\)", one, text)


def on_config(config):
    if str(ROOT) not in sys.path:  # the site documents this checkout's package, whichever torchex_fn is installed
        sys.path.insert(0, str(ROOT))
    return config


def on_files(files: Files, config) -> Files:
    for page, source in PAGES.items():
        text = (ROOT / source).read_text(encoding="utf-8")
        files.append(File.generated(config, page, content=_relink(text)))
    files.append(File.generated(config, "methods.md", content=methods_page()))
    return files


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def methods_page() -> str:
    """The Methods page: one table row per method of ``torchex_fn.registry.METHODS``, in its order."""
    not_cli = [m for m in registry.METHODS.values() if m.name not in cli_explain.METHODS]
    lines = [
        "# Methods",
        "",
        "Every attribution method of the package, one row each, generated from `torchex_fn/registry.py`",
        "when the site is built. Each is `tx.<name>(model_fn, params, x, target, *, ...)`; the name links",
        "to its reference.",
        "",
        "- **output**: `input`, a map of `x`'s shape (of the layer output's shape with `layer=`); `map`,",
        "  `[B, 1, *grid]` on `x`'s grid; `layer`, a map of the layer output's shape.",
        "- **layer**: `required` (a layer method), `optional` (attributes at a layer's output with `layer=`,",
        "  else at `x`) or `none`.",
        "- **token ids**: takes integer token ids `[B, T]` as `x`, with `layer=` at the embeddings.",
        "- **ranks**: the input ranks it runs on (tabular `[B, F]`, sequence `[B, C, T]`, image",
        "  `[B, C, H, W]`, volume `[B, C, D, H, W]`; [Input ranks and dtypes](input_ranks.md) has the details).",
        "- **required options**: keyword options without a default.",
        "",
        "`torchex-fn explain --method NAME` (the command line) offers every method here except",
        "",
        *(f"- `{m.name}`: {cli_explain.unavailable(m)}" for m in not_cli),
        "",
        "| method | family | output | layer | token ids | ranks | required options | summary |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in registry.METHODS.values():
        identifier = f"{m.function.__module__}.{m.function.__qualname__}"
        ranks = "all" if set(m.ranks) == set(registry.RANKS) else ", ".join(r for r in registry.RANKS if r in m.ranks)
        required = ", ".join(f"`{o}`" for o in m.required) or "-"
        summary = (inspect.getdoc(m.function) or "").strip().splitlines()[0]
        cells = [f"[`{m.name}`][{identifier}]", m.family, m.output, m.layer, "yes" if m.token_ids else "no", ranks,
                 required, summary]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _identifier(name: str, module: str) -> str | None:
    """The full dotted path of the object a role names, looked up from the page's module, then the package."""
    if name.startswith("tx."):
        name = "torchex_fn." + name[3:]
    head, *rest = name.split(".")
    for scope in (importlib.import_module(module) if module else None, torchex_fn):
        if scope is None:
            continue
        if head == "torchex_fn":
            obj, parts = torchex_fn, rest
        elif hasattr(scope, head):
            obj, parts = getattr(scope, head), rest
        else:
            continue
        try:
            for part in parts:
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, type(torchex_fn)):
            return obj.__name__
        owner, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        return f"{owner}.{qualname}" if owner and qualname else None
    return None


def on_page_content(text: str, page, config, files) -> str:
    from torchex_fn.core.docs import unfilled
    left = unfilled(text)  # shared docstring text left unfilled (see docs/griffe_templates.py): fails --strict
    if left:
        logging.getLogger("mkdocs").warning("%s: a docstring shows its placeholders %s", page.file.src_uri, left)
    modules = re.findall(r'id="(torchex_fn[\w.]*)"', text)
    module = min(modules, key=len) if modules else ""  # the page's module, e.g. torchex_fn.cam

    def one(match: re.Match) -> str:
        name = html.unescape(match.group(1))
        found = _identifier(name, module if module in _modules() else "")
        code = f"<code>{match.group(1)}</code>"
        return f'<autoref identifier="{found}" optional>{code}</autoref>' if found else code
    return ROLE.sub(one, text)


def _modules() -> set:
    return {name for name in sys.modules if name.startswith("torchex_fn")}
