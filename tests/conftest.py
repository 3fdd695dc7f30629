"""Shared fixtures."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare_data as pd  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a small CPU: one thread is as fast, spares the thread pool's spin-waits on a busy machine,
    and keeps runs that must match bit for bit on one summation order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """200k byte tokens of the embedded corpus: one train shard (~189k tokens) and one val shard (~11k); tests
    that need to damage it copy it first."""
    out = str(tmp_path_factory.mktemp("data") / "embedded-byte")
    pd.prepare(["embedded"], "byte", out, max_tokens=200_000)
    meta = pd.read_meta(out)
    assert len(meta["splits"]["train"]) == 1 and meta["tokens"]["train"] > 100_000
    return out
