"""Shared fixtures: seeds, threads, tiny models. Warnings are errors (pyproject)."""
import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(2)

# Hypothesis profiles (tests/test_properties.py): "ci" is the default (few draws, no deadline since
# the shared CI machine's timings vary, derandomized so that every run draws the same cases);
# "dev" draws many more: `pytest tests/test_properties.py --hypothesis-profile=dev`.
settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after it: for tiny models a second thread buys
    nothing, and on a shared 2-core machine its spin-waiting made some files 5-20x slower.
    A file opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
