"""Shared test setup: CPU only, few threads, deterministic."""


import json
import os
import zipfile

import PIL.Image
import pytest
import torch
from click.testing import CliRunner

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

#----------------------------------------------------------------------------
# Shared builders: image datasets and command-line runs.

def write_images(folder, images, labels=None, ext='png'):
    """uint8 HWC (or HW) arrays as image files in `folder`, nested as dataset_tool writes them
    (00000/img00000000.png, four per subfolder here), plus dataset.json when `labels` are given.
    Returns the file names."""
    names = [f'{idx // 4:05d}/img{idx:08d}.{ext}' for idx in range(len(images))]
    for name, img in zip(names, images):
        os.makedirs(os.path.join(folder, os.path.dirname(name)), exist_ok=True)
        PIL.Image.fromarray(img).save(os.path.join(folder, name))
    if labels is not None:
        with open(os.path.join(folder, 'dataset.json'), 'w', encoding='utf-8') as f:
            json.dump({'labels': [[n, lab] for n, lab in zip(names, labels)]}, f)
    return names


def zip_folder(folder, zip_path):
    """Every file under `folder` into a zip, by relative name."""
    with zipfile.ZipFile(zip_path, 'w') as zf:
        for root, _dirs, files in os.walk(folder):
            for name in files:
                zf.write(os.path.join(root, name), os.path.relpath(os.path.join(root, name), folder).replace(os.sep, '/'))


def run_cli(command, *args, **kwargs):
    """A click command run in this process (CliRunner) with its arguments as strings."""
    return CliRunner().invoke(command, [str(a) for a in args], **kwargs)
