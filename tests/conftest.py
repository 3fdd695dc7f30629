"""Shared fixtures."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a small CPU: one thread is as fast, spares the thread pool's spin-waits on a busy machine,
    and keeps runs that must match bit for bit on one summation order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
