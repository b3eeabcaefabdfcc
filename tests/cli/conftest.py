"""The CLI tests' shared fixture."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_threads():
    """``explain`` and the demo set the process's thread count: put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
