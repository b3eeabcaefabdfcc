"""Issue 16: moving the package into layers changed no map, bit for bit (tests/references/layout_record.py)."""
import importlib.util
import os

import pytest
import torch

_PATH = os.path.join(os.path.dirname(__file__), "references", "layout_record.py")
_spec = importlib.util.spec_from_file_location("layout_record", _PATH)
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)

_SAVED = torch.load(record.RECORD, weights_only=True)
_CASES = record.cases()


def test_every_case_was_recorded():
    assert sorted(_SAVED["maps"]) == sorted(_CASES)


@pytest.mark.skipif(_SAVED["torch"] != str(torch.__version__),
                    reason=f"recorded with torch {_SAVED['torch']}: other builds may round differently")
@pytest.mark.parametrize("name", sorted(_CASES))
def test_map_is_bit_identical_to_the_record(name):
    value = _CASES[name]()
    got = torch.cat([t.detach().flatten() for t in record._flat(value)])
    want = _SAVED["maps"][name]
    assert got.dtype == want.dtype and torch.equal(got, want)
