"""The training loop trains exactly as the reference RDM loop does.

`ref_training` (tests/reference_restatement.py) restates the reference's training step on its own (read from
THUDM/RelayDiffusion training/training_loop.py): per-rank seeding, the data iterator created
before the network, the module-summary forward pass (its dropout draws from the same stream),
the EMA copy, then per step: gradient accumulation with the summed per-pixel loss multiplied by
`loss_scaling / t` (t = 32 when the batch's images are 64 pixels wide, 256 otherwise), the
learning-rate warm-up, the NaN/Inf guard, Adam, and the EMA with its half-life ramp-up. The
project's `training_loop` must land on the same weights to float32 round-off, for the first
stage at 64 px and at another resolution, and for the second (blurring) stage.

Run as a script to print the distances:  python tests/test_train_faithful.py
"""

import json
import os
import sys
import tempfile

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import training_loop  # noqa: E402
from reference_restatement import ref_training  # noqa: E402

#----------------------------------------------------------------------------
# Tiny setups: DDPM++ with 8 channels and one block per level, three Adam steps of 4 images
# in 2 accumulation rounds, warm-up and EMA ramp-up both active.

def _tiny_network(precond_augment_dim):
    return dict(class_name='training.networks.EDMPrecond', model_type='SongUNet', embedding_type='positional',
                encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                model_channels=8, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[], dropout=0.13,
                augment_dim=precond_augment_dim, use_fp16=False)


EDM_LOSS = dict(class_name='training.loss.EDMLoss')
BLUR_LOSS = dict(class_name='training.loss.BlurLoss', up_scale=4, block_scale=0.15, prob_length=0.93, blur_sigma_max=3)
AUGMENT = dict(class_name='training.augment.AugmentPipe', p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1,
               aniso=1, translate_frac=1)

CASES = {
    # name: (resolution, loss_kwargs, augment_kwargs)
    'first-64px': (64, EDM_LOSS, AUGMENT),
    'first-16px': (16, EDM_LOSS, AUGMENT),
    'second-16px': (16, BLUR_LOSS, None),
    'second-64px': (64, BLUR_LOSS, AUGMENT),
}

SCHEDULE = dict(seed=7, batch_size=4, batch_gpu=2, ema_halflife_kimg=0.5, ema_rampup_ratio=0.5,
                lr_rampup_kimg=0.008, loss_scaling=1)
NUM_STEPS = 3
OPTIMIZER = dict(class_name='torch.optim.Adam', lr=2e-3, betas=[0.9, 0.999], eps=1e-8)


def _make_dataset(folder, resolution, n=12):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(resolution)
    labels = []
    for idx in range(n):
        base = rng.randint(0, 256, size=[4, 4, 3]).astype(np.uint8)
        img = PIL.Image.fromarray(base).resize([resolution, resolution], PIL.Image.BILINEAR)
        img.save(os.path.join(folder, f'{idx:03d}.png'))
        labels.append([f'{idx:03d}.png', idx % 3])
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump(dict(labels=labels), f)
    return dict(class_name='training.dataset.ImageFolderDataset', path=folder, use_labels=True, xflip=False,
                cache=True)


def project_training(run_dir, dataset_kwargs, network_kwargs, loss_kwargs, augment_kwargs, optimizer_kwargs,
                     num_steps, loss_norm='reference', **schedule):
    result = training_loop.training_loop(loss_norm=loss_norm,
        run_dir=run_dir, dataset_kwargs=dataset_kwargs, data_loader_kwargs=dict(num_workers=0),
        network_kwargs=network_kwargs, loss_kwargs=loss_kwargs, optimizer_kwargs=optimizer_kwargs,
        augment_kwargs=augment_kwargs, total_kimg=num_steps * schedule['batch_size'] / 1000,
        kimg_per_tick=1000, snapshot_ticks=None, state_dump_ticks=None, progress_bar=False, device='cpu',
        **schedule)
    return result['net'], result['ema']


def _flat(module):
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in module.parameters()])


def relative_distances(case, root, loss_norm='reference', divisor=None):
    """(net, ema) distance between the project's and the restated reference's weights, relative
    to how far the reference's weights moved from their initial values."""
    resolution, loss_kwargs, augment_kwargs = CASES[case]
    dataset_kwargs = _make_dataset(os.path.join(root, f'data{resolution}'), resolution)
    network_kwargs = _tiny_network(9 if augment_kwargs else 0)
    common = dict(dataset_kwargs=dataset_kwargs, network_kwargs=network_kwargs, loss_kwargs=loss_kwargs,
                  augment_kwargs=augment_kwargs, optimizer_kwargs=OPTIMIZER, num_steps=NUM_STEPS, **SCHEDULE)
    initial, ref_net, ref_ema = ref_training(**common, divisor=divisor)
    run_dir = os.path.join(root, f'run-{case}-{loss_norm}')
    os.makedirs(run_dir)
    net, ema = project_training(run_dir, **common, loss_norm=loss_norm)
    out = []
    for mine, theirs in [(net, ref_net), (ema, ref_ema)]:
        moved = (_flat(theirs) - _flat(initial)).norm()
        assert moved > 0
        out.append(float((_flat(mine) - _flat(theirs)).norm() / moved))
    return tuple(out)


@pytest.mark.parametrize('case', list(CASES))
def test_training_matches_reference_restatement(case, tmp_path):
    net_dist, ema_dist = relative_distances(case, str(tmp_path))
    # Float32 round-off: a wrong loss normalisation (x8 or x64 here) moves this to ~0.1-1.
    assert net_dist < 1e-5 and ema_dist < 1e-5, (net_dist, ema_dist)


def test_edm_normalisation_is_images_per_process(tmp_path):
    # The option: the same loop with EDM's divisor, 4 images per process here.
    net_dist, ema_dist = relative_distances('first-16px', str(tmp_path), loss_norm='edm', divisor=4)
    assert net_dist < 1e-5 and ema_dist < 1e-5, (net_dist, ema_dist)


def test_unknown_loss_norm_is_refused(tmp_path):
    with pytest.raises(dnnlib.UserError, match='loss normalisation "mean"'):
        training_loop.training_loop(run_dir=str(tmp_path), loss_norm='mean', device='cpu')


def test_reference_resolution_rule():
    # The divisor follows the width of the batch as loaded, nothing else.
    assert training_loop.reference_loss_divisor(torch.zeros([2, 3, 64, 64])) == 32
    for res in (16, 32, 128, 256, 512):
        assert training_loop.reference_loss_divisor(torch.zeros([2, 3, res, res])) == 256


if __name__ == '__main__':
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            net_dist, ema_dist = relative_distances(name, tmp)
            print(f'{name:12s} net {net_dist:.3g}  ema {ema_dist:.3g}')
