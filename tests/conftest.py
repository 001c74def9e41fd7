"""Shared test setup: CPU only, few threads, deterministic."""


import pytest
import torch

from torch_utils import checkpoint
from training import loss, networks

# Two-core CI machines, and tests that start several processes: one thread each avoids contention.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Downloads and caches from tests never touch the user's real cache folder.
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path_factory.mktemp('dnnlib-cache')))


@pytest.fixture(scope='session')
def tiny_relay_checkpoints(tmp_path_factory):
    """A tiny first stage (8 px) and second stage (32 px, up_scale 4) saved as snapshots."""
    tiny = dict(model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)
    d = tmp_path_factory.mktemp('tiny-relay')
    torch.manual_seed(0)
    first, second = str(d / 'first.pkl'), str(d / 'second.pkl')
    checkpoint.save_snapshot(first, dict(ema=networks.EDMPrecond(img_resolution=8, img_channels=3, **tiny)))
    checkpoint.save_snapshot(second, dict(ema=networks.EDMPrecond(img_resolution=32, img_channels=3, **tiny),
                                          loss_fn=loss.BlurLoss(up_scale=4, block_scale=0.15)))
    return first, second
