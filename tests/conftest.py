"""Shared test setup: CPU only, few threads, deterministic."""


import pytest
import torch

# Two-core CI machines, and tests that start several processes: one thread each avoids contention.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Downloads and caches from tests never touch the user's real cache folder.
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path_factory.mktemp('dnnlib-cache')))
