"""Issue 16: the package's import graph, built with ``ast`` from the files (nothing is imported).

* no cycle between modules;
* layers: a module imports only from its own layer package or from layers below it, and ``core/`` imports
  nothing outside ``core/``;
* a method file never imports a sibling method file (what two families share lives in ``core/``);
* no import inside a function, except of the optional third-party packages named in ``OPTIONAL``.
"""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "torchex_fn"

# The layers, bottom first. A module may import from a lower rank, or from its own package.
RANK = {"core": 0, "methods": 1, "tools": 1, "data": 1, "evaluation": 2, "registry": 2, "composite": 3, "cli": 4,
        "__init__": 5, "__main__": 5}

# Imported inside the function that needs them: optional extras (pyproject's extras), and torch.nn.attention,
# absent from the torch 2.1-2.2 releases that pyproject admits.
OPTIONAL = ("captum", "PIL", "matplotlib", "tqdm", "transformers", "timm", "torchvision", "zennit",
            "torch.nn.attention")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, modules) -> list:
    """Absolute names a ``from ... import ...`` brings in: ``base.name`` where that is a module (a submodule
    imported by name), else ``base`` itself."""
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        if not is_package:
            parts = parts[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    return sorted({f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names})


def _graph():
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    edges, inner = {}, []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        targets = set()

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    found = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    found = _resolve(name, is_package, child, modules)
                else:
                    visit(child, nested)
                    continue
                if in_function:
                    inner.append((name, child.lineno, found[0]))
                for target in found:
                    if target.startswith("torchex_fn"):
                        # the longest prefix that is one of our modules
                        while target and target not in modules:
                            target = target.rpartition(".")[0]
                        if target and target != name:
                            targets.add(target)

        visit(tree, False)
        edges[name] = targets
    return modules, edges, inner


MODULES, EDGES, INNER = _graph()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_graph_sees_the_layers():
    assert {"torchex_fn.core.capture", "torchex_fn.methods.cam", "torchex_fn.cli.main"} <= set(MODULES)
    assert "torchex_fn.core.capture" in EDGES["torchex_fn.methods.cam"]
    assert {_layer(m) for m in MODULES} <= set(RANK), "a new top-level package needs its rank in RANK"


def test_no_import_cycle():
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(EDGES[node]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for module in sorted(EDGES):
        if module not in state:
            visit(module)


def test_imports_point_down():
    wrong = []
    for module, targets in EDGES.items():
        layer = _layer(module)
        for target in targets:
            other = _layer(target)
            if other == "__init__" and target == "torchex_fn" and layer in ("__init__", "__main__"):
                continue
            if other != layer and RANK[other] >= RANK[layer]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that do not point down:\n" + "\n".join(sorted(wrong))


def test_core_imports_nothing_outside_core():
    wrong = [f"{m} -> {t}" for m, ts in EDGES.items() if _layer(m) == "core" for t in ts if _layer(t) != "core"]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_method_file_imports_a_sibling():
    wrong = [f"{m} -> {t}" for m, ts in EDGES.items() if _layer(m) == "methods"
             for t in ts if _layer(t) == "methods"]
    assert not wrong, "what two method families share belongs in core/:\n" + "\n".join(sorted(wrong))


def test_no_import_inside_a_function_except_optional_packages():
    wrong = [f"{m}:{line} imports {what}" for m, line, what in INNER
             if not any(what == o or what.startswith(o + ".") for o in OPTIONAL)]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_public_name_shadows_a_module():
    """``tx.<name>`` is the module ``torchex_fn.<name>`` wherever such a module exists (``tx.capture`` and
    ``tx.cam`` are functions, and no module of that name sits at the package's top any more)."""
    import importlib

    import torchex_fn as tx
    top = {name.rsplit(".", 1)[-1] for name in MODULES if name.count(".") == 1}
    for name in tx.__all__:
        if name in top:
            assert getattr(tx, name) is importlib.import_module(f"torchex_fn.{name}"), name
    assert not {"capture", "cam"} & top


def test_the_registry_families_are_the_method_files():
    from torchex_fn.registry import FAMILIES, METHODS, OTHER_FILES
    files = {m.rsplit(".", 1)[-1] for m in MODULES if m.startswith("torchex_fn.methods.")}
    assert not set(FAMILIES) & set(OTHER_FILES)
    assert set(FAMILIES) | set(OTHER_FILES) == files
    assert {m.family for m in METHODS.values()} == set(FAMILIES)
    assert all(m.function.__module__ == f"torchex_fn.methods.{m.family}" for m in METHODS.values())
