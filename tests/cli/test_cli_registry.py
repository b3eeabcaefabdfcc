"""The command line and the docs read the one registry of methods (torchex_fn.registry.METHODS)."""
import importlib.util
import pathlib
import re

import pytest

from torchex_fn.__main__ import main
from torchex_fn.cli import explain
from torchex_fn.cli.main import _parser
from torchex_fn.registry import METHODS

HOOKS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "hooks.py"


def _runnable_from_the_command_line():
    """From the registry: methods (no transforms) on images, without an option that takes a tensor."""
    return [m.name for m in METHODS.values()
            if not m.transform and "image" in m.ranks and "baselines" not in m.required and m.output != "layer"]


def _method_action():
    explain_parser = next(a for a in _parser()._actions if a.dest == "command").choices["explain"]
    return next(a for a in explain_parser._actions if a.dest == "method")


def test_method_choices_are_the_registry_methods_the_command_line_can_run():
    choices = list(_method_action().choices)
    assert choices == _runnable_from_the_command_line()  # the registry's order
    assert choices == list(explain.METHODS)
    assert all(explain.METHODS[name] is METHODS[name] for name in choices)
    left_out = set(METHODS) - set(choices)
    assert "smooth" in left_out  # a transform of a method (the registry marks it)
    assert all(explain.unavailable(METHODS[name]) for name in left_out)
    assert _method_action().default == "grad_cam" and "grad_cam" in choices


@pytest.mark.parametrize("typed, close", [("gradcam", "grad_cam"), ("salency", "saliency"),
                                          ("integrated_gradient", "integrated_gradients")])
def test_an_unknown_method_names_close_matches(typed, close, capsys):
    with pytest.raises(SystemExit) as err:
        main(["explain", "--model", "torchvision:resnet18", "--image", "x.png", "--method", typed])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert f"unknown method {typed!r}; choose one of saliency, " in message
    hint = re.search(r"did you mean (.*)\?", message)
    assert hint and close in hint.group(1).split(" or ")


def test_a_method_the_command_line_cannot_run_says_why(capsys):
    for name, why in [("smooth", "a transform of a method"), ("gradient_shap", "needs baselines, a tensor")]:
        with pytest.raises(SystemExit):
            main(["explain", "--model", "torchvision:resnet18", "--image", "x.png", "--method", name])
        assert f"{name} cannot run from the command line ({why}" in capsys.readouterr().err


def test_the_docs_methods_page_has_one_row_per_registry_method():
    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("docs_hooks", HOOKS)
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = hooks.methods_page()
    header = "| method | family | output | layer | token ids | ranks | required options | summary |"
    lines = page.splitlines()
    start = lines.index(header) + 2
    rows = [line for line in lines[start:] if line.startswith("| ")]
    assert len(rows) == len(METHODS)
    names = [re.match(r"\| \[`(\w+)`\]\[([\w.]+)\]", row).group(1) for row in rows]
    assert names == list(METHODS)
    for row, method in zip(rows, METHODS.values()):
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        assert len(cells) == 8, row
        assert cells[1:5] == [method.family, method.output, method.layer, "yes" if method.token_ids else "no"]
        assert f"[{method.function.__module__}.{method.function.__name__}]" in cells[0]
    assert "- `smooth`: a transform of a method" in page  # what the command line leaves out, and why
