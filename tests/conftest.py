"""Shared test setup: CPU only, few threads, deterministic."""


import importlib
import json
import os
import pickle
import sys
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


def perturbed_net(res, seed):
    """A tiny first-stage network (SongUNet, 8 channels) at `res` px, its weights shifted by seeded
    noise so that networks of other seeds give other images."""
    torch.manual_seed(seed)
    net = networks.EDMPrecond(img_resolution=res, img_channels=3, label_dim=0, model_type='SongUNet', model_channels=8,
                              channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net

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


FAKE_NVIDIA_DETECTOR_SRC = '''
"""A tiny stand-in with the NVIDIA Inception pickle's interface (layers.mixed_6.conv, output)."""
import torch
from torch_utils import persistence

@persistence.persistent_class
class FakeInception(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.Module()
        self.layers.conv0 = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.layers.mixed_6 = torch.nn.Module()
        self.layers.mixed_6.conv = torch.nn.Conv2d(8, 9, 3, padding=1)
        self.proj = torch.nn.Linear(9 * 16, 32)
        self.output = torch.nn.Linear(32, 10)

    def forward(self, img, return_features=False):
        x = img.to(torch.float32) / 127.5 - 1
        x = torch.nn.functional.interpolate(x, size=(20, 20), mode='bilinear')
        x = torch.relu(self.layers.conv0(x))
        s = torch.relu(self.layers.mixed_6.conv(x))
        f = self.proj(torch.nn.functional.adaptive_avg_pool2d(s, 4).flatten(1))
        return f if return_features else self.output(f)
'''


def write_fake_nvidia_detector(folder, seed=3):
    """A pickle of FakeInception (feat 32, 10 classes; loads with trust_pickle=True) in `folder`; its path."""
    mod_dir = folder / 'fake_mod'
    mod_dir.mkdir(exist_ok=True)
    (mod_dir / 'h4_fake_nvidia_detector.py').write_text(FAKE_NVIDIA_DETECTOR_SRC)
    sys.path.insert(0, str(mod_dir))
    try:
        net = importlib.import_module('h4_fake_nvidia_detector').FakeInception(seed=seed)
    finally:
        sys.path.remove(str(mod_dir))
    path = folder / 'inception-test.pkl'
    with open(path, 'wb') as f:
        pickle.dump(net, f)
    return str(path)
