"""The test suite's own layout (tests/README.md), read with ``ast`` (nothing is imported).

* test folders mirror the package: every folder of tests/ but ``support`` and ``references`` is a
  subpackage of torchex_fn;
* a test file imports only ``support``, the package and third-party packages: never another test
  file, a folder of tests/ or a helper outside ``support`` (and ``support`` imports no test file).
"""
import ast
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent
PKG = TESTS.parent / "torchex_fn"
NOT_MIRRORS = {"support", "references"}


def _folders():
    return sorted(p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _local_names():
    """Top-level names that would resolve to something inside tests/ (pytest's pythonpath)."""
    return {p.stem for p in TESTS.glob("*.py")} | set(_folders())


def _imports(path):
    """``(line, module, level)`` for every import of the file."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, node.module or "", node.level


def test_the_folders_mirror_the_package():
    subpackages = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert {"core", "methods"} <= set(_folders())
    assert set(_folders()) - NOT_MIRRORS <= subpackages, sorted(set(_folders()) - NOT_MIRRORS - subpackages)
    assert (TESTS / "support" / "__init__.py").is_file()


def test_test_files_import_only_support_the_package_and_third_party_packages():
    local = _local_names()
    bad = []
    for path in sorted(TESTS.rglob("test_*.py")):
        for line, module, level in _imports(path):
            top = module.split(".")[0]
            if level or (top in local and top != "support"):
                bad.append(f"{path.relative_to(TESTS)}:{line}: {'.' * level}{module}")
    assert not bad, "test files import other test files or helpers outside tests/support:\n" + "\n".join(bad)


def test_support_imports_no_test_file():
    local = _local_names() - {"support"}
    bad = [f"{path.relative_to(TESTS)}:{line}: {module}" for path in sorted((TESTS / "support").glob("*.py"))
           for line, module, level in _imports(path)
           if module.split(".")[0] in local or module.split(".")[0].startswith("test_")]
    assert not bad, bad
