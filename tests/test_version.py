"""One version: the package, its installed metadata, pyproject.toml and the CHANGELOG agree."""
import importlib.metadata
import pathlib
import re

import torchex_fn

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_has_one_source():
    text = (ROOT / "pyproject.toml").read_text()
    project = re.search(r"^\[project\]\n(.*?)^\[", text, flags=re.M | re.S).group(1)
    assert re.search(r'^dynamic = \[[^\]]*"version"', project, flags=re.M)
    assert not re.search(r"^version\s*=", project, flags=re.M)  # not also written by hand
    assert re.search(r'^version = \{ attr = "torchex_fn.__version__" \}', text, flags=re.M)


def test_package_reports_its_metadata_version():
    installed = importlib.metadata.version("torchex-fn")
    assert torchex_fn.__version__ == installed, (
        f"torchex_fn.__version__ is {torchex_fn.__version__}, the installed metadata says {installed}: an editable "
        "install keeps the metadata of the day it was installed; run pip install -e . again")
    assert re.fullmatch(r"\d+\.\d+\.\d+", torchex_fn.__version__)


def test_changelog_names_the_version():
    releases = re.findall(r"^## (\d+\.\d+\.\d+)\b", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert releases and releases[0] == torchex_fn.__version__


def test_type_marker_ships():
    assert (ROOT / "torchex_fn" / "py.typed").is_file()
    assert re.search(r'^torchex_fn = \[[^\]]*"py.typed"', (ROOT / "pyproject.toml").read_text(), flags=re.M)
