"""Issue 16: docstring text shared by several functions is written once (torchex_fn/core/docs.py) and filled in
at import, so the docstrings read as if it were written out.

* no public function or class shows a placeholder (``{model_fn}``, ``{args.grad_cam}``, the old ``{args}``);
* every method of the registry documents each of its parameters, and only those, in its Args section;
* each placeholder of the source is filled with its text in the imported docstring (and in ``help()``),
  and every fragment is used;
* the filling itself: indentation, wrapping outside ````code```` spans, continuation lines, unknown names.
"""
import ast
import importlib
import inspect
import pathlib
import pkgutil
import pydoc
import re

import pytest

import torchex_fn as tx
from torchex_fn.core import docs
from torchex_fn.registry import METHODS

PKG = pathlib.Path(tx.__file__).resolve().parent


def _modules():
    return [importlib.import_module(m.name) for m in pkgutil.walk_packages([str(PKG)], "torchex_fn.")
            if m.name != "torchex_fn.__main__"]


def _public():
    """(name, object) of every public function and class of the package and the public methods of its classes."""
    seen, found = set(), []
    for module in [tx, *_modules()]:
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or id(obj) in seen:
                continue
            seen.add(id(obj))
            found.append((f"{module.__name__}.{name}", obj))
            if inspect.isclass(obj):
                found += [(f"{module.__name__}.{name}.{k}", v) for k, v in vars(obj).items()
                          if inspect.isfunction(v) and not k.startswith("_")]
    return found


def _args_section(doc):
    """The names of the entries of a Google-style ``Args:`` section (``*args``, ``**options`` with their stars)."""
    lines = inspect.cleandoc(doc).splitlines()
    if "Args:" not in lines:
        return []
    start = lines.index("Args:") + 1
    names = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("  "):
            break                                                  # the next section
        match = re.match(r"  (\*{0,2}\w+)(?: \([^)]*\))?:(?: |$)", line)
        if match:
            names.append(match.group(1))
    return names


def _norm(text):
    return " ".join(text.split())


def _source_placeholders():
    """(module, qualified name, key) of every placeholder in a docstring of the package's source."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "docs.py" and path.parent.name == "core":
            continue                                               # its own docstring shows an example
        module = ".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node, clean=False) or ""
                found += [(module, node.name, key) for key in re.findall(r"^[ \t]*\{([\w.]+)\}[ \t]*$", doc, re.M)]
    return found


def test_no_public_docstring_shows_a_placeholder():
    public = _public()
    assert len(public) > 100
    left = {name: docs.unfilled(obj.__doc__) for name, obj in public if obj.__doc__ and docs.unfilled(obj.__doc__)}
    assert not left
    assert not [name for name, obj in public if obj.__doc__ and "{args}" in obj.__doc__]


@pytest.mark.parametrize("name", list(METHODS))
def test_registry_method_documents_every_parameter(name):
    function = METHODS[name].function
    star = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    params = [star.get(p.kind, "") + p.name for p in inspect.signature(function).parameters.values()]
    documented = _args_section(function.__doc__)
    assert documented == params


def test_placeholders_are_filled_with_their_text():
    used = _source_placeholders()
    assert len(used) > 80
    for module, name, key in used:
        doc = getattr(importlib.import_module(module), name).__doc__
        assert doc is not None
        if key in docs.GROUPS:
            texts = [docs.entry(one) for one in docs.GROUPS[key]]
        elif key in docs.ARGS:
            texts = [docs.entry(key)]
        else:
            texts = [docs.TEXT[key]]
        for text in texts:
            assert _norm(text) in _norm(doc), (module, name, key)
    # every fragment is used, directly or through a group
    keys = {key for _, _, key in used}
    through_groups = {one for key in keys & set(docs.GROUPS) for one in docs.GROUPS[key]}
    assert set(docs.ARGS) <= keys | through_groups
    assert set(docs.GROUPS) | set(docs.TEXT) <= keys


def test_filled_docstrings_read_as_written_out():
    doc = tx.grad_cam.__doc__
    lines = doc.splitlines()
    args = lines.index("    Args:")
    # one entry per parameter, at the Args section's indentation, continued two columns deeper
    assert lines[args + 1] == "      " + docs.entry("model_fn")
    assert lines[args + 2] == "      " + docs.entry("params")
    assert lines[args + 3].startswith("      x: A batch ``[B, C, *spatial]``")
    assert lines[args + 4].startswith("        (docs/input_ranks.md)")
    assert _args_section(doc) == ["model_fn", "params", "x", "target", "layer", "relu", "upsample", "reshape"]
    assert docs.entry("model_fn") in pydoc.render_doc(tx.grad_cam, renderer=pydoc.plaintext)
    assert docs.entry("model_fn") in pydoc.render_doc(tx.saliency, renderer=pydoc.plaintext)
    # a function's own sentence continues the shared entry
    assert "      model_fn: Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.\n        Examples must" \
        in tx.deeplift.__doc__
    # whole sections, indented as the placeholder
    assert "\n    Returns:\n      Maps ``[B, 1, H, W]``" in tx.layer_cam.__doc__
    assert "\n    Raises:\n      ValueError: an unknown layer" in tx.hires_cam.__doc__
    # entries that differ in substance stay the method's own
    assert "target: ``None`` (predicted class), int, or ``[B]`` ints (a class index is needed)." in tx.cam.__doc__
    assert "applied to the activation and to its gradient alike" in tx.grad_cam.__doc__
    assert "applied to the activation and to its gradient alike" not in tx.eigen_cam.__doc__


def test_wrapping_keeps_code_spans_whole():
    for key in docs.ARGS:
        for line in docs.render("  {" + key + "}").splitlines():
            assert line.count("``") % 2 == 0, (key, line)           # no code span broken over two lines
            assert len(line) <= docs.WIDTH or " " not in line.strip(), (key, line)


def test_render_and_fill():
    text = "Head.\n\n    Args:\n      {params}\n      {x.float}\n        More about x.\n      own: Own.\n"
    assert docs.render(text) == ("Head.\n\n    Args:\n      params: Name -> tensor mapping accepted by "
                                 "``torch.func.functional_call``.\n      x: A batch ``[B, *input]``, floating point.\n"
                                 "        More about x.\n      own: Own.\n")
    assert docs.render("no placeholder {here}, and {\"dict\": 1}") == "no placeholder {here}, and {\"dict\": 1}"
    with pytest.raises(ValueError, match=r"docs.fill: expected a placeholder .*\{nothing\} in the docstring of f"):
        docs.render("  {nothing}", "f")

    def no_doc():
        pass
    assert docs.fill(no_doc) is no_doc and no_doc.__doc__ is None  # python -OO strips docstrings

    def documented():
        """Doc.

        Args:
          {model_fn}
        """
    assert docs.fill(documented) is documented
    assert documented.__doc__ == "Doc.\n\n        Args:\n          " + docs.entry("model_fn") + "\n        "
    assert docs.unfilled("<p>{model_fn}</p>") == ["model_fn"] and docs.unfilled("\n  {other}\n") == ["other"]
    assert docs.unfilled(documented.__doc__) == []
