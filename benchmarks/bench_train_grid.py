"""Cost of the sample grids written while training, as a fraction of the training time.

Trains a small network on a synthetic dataset with training.training_loop, timing every
SampleGrid.write (one per snapshot) against the whole loop, and keeps the last grid PNG.

    python benchmarks/bench_train_grid.py --steps=40 --tick-steps=10 --keep=grid.png
    python benchmarks/bench_train_grid.py --precond=blur --keep=relay-grid.png

The fraction scales with how often snapshots come: here one per `--tick-steps` optimizer steps;
with train.py's defaults (--tick=50 kimg, --snap=50) one comes every 2.5 million images.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import sample_grid, training_loop


def make_dataset(folder, n, res):
    os.makedirs(folder)
    rng = np.random.RandomState(0)
    for i in range(n):
        base = rng.randint(0, 256, size=[4, 4, 3]).astype(np.uint8)
        PIL.Image.fromarray(base).resize([res, res], PIL.Image.BILINEAR).save(os.path.join(folder, f'{i:05d}.png'))
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--res', type=int, default=32)
    parser.add_argument('--cbase', type=int, default=32)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--steps', type=int, default=40, help='optimizer steps')
    parser.add_argument('--tick-steps', type=int, default=10, help='optimizer steps per tick (a snapshot + grid every tick)')
    parser.add_argument('--grid', type=int, default=16)
    parser.add_argument('--grid-steps', type=int, default=32)
    parser.add_argument('--precond', choices=['edm', 'blur'], default='edm')
    parser.add_argument('--keep', help='copy the last grid PNG here')
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

    grid_seconds = []
    original = sample_grid.SampleGrid.write

    def timed_write(self, *a, **kw):
        t0 = time.perf_counter()
        out = original(self, *a, **kw)
        grid_seconds.append(time.perf_counter() - t0)
        return out

    sample_grid.SampleGrid.write = timed_write
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(os.path.join(tmp, 'data'), n=4 * args.batch, res=args.res)
        loss = dict(class_name='training.loss.EDMLoss')
        if args.precond == 'blur':
            loss = dict(class_name='training.loss.BlurLoss', up_scale=4, block_scale=0.15, prob_length=0.93, blur_sigma_max=3)
        run_dir = os.path.join(tmp, 'run')
        os.makedirs(run_dir)
        t0 = time.perf_counter()
        training_loop.training_loop(
            run_dir=run_dir, dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data),
            data_loader_kwargs=dict(num_workers=0),
            network_kwargs=dict(class_name='training.networks.EDMPrecond', model_type='SongUNet', model_channels=args.cbase,
                                channel_mult=[1, 2, 2], dropout=0),
            loss_kwargs=loss, optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-4, betas=[0.9, 0.999], eps=1e-8),
            seed=0, batch_size=args.batch, total_kimg=args.steps * args.batch / 1000,
            kimg_per_tick=args.tick_steps * args.batch / 1000, snapshot_ticks=1, state_dump_ticks=None,
            sample_grid_kwargs=dict(num_images=args.grid, num_steps=args.grid_steps, seed=0),
            progress_bar=False, device='cpu')
        total = time.perf_counter() - t0
        grids = sorted(name for name in os.listdir(run_dir) if name.startswith('samples-'))
        if args.keep and grids:
            shutil.copyfile(os.path.join(run_dir, grids[-1]), args.keep)
    result = dict(device='cpu', threads=torch.get_num_threads(), precond=args.precond, res=args.res, batch=args.batch,
                  steps=args.steps, snapshot_every_steps=args.tick_steps, grid_images=args.grid, grid_steps=args.grid_steps,
                  grids=len(grid_seconds), grid_sec_each=round(float(np.mean(grid_seconds)), 3),
                  train_sec_total=round(total, 2), grid_sec_total=round(sum(grid_seconds), 2),
                  grid_fraction=round(sum(grid_seconds) / total, 4),
                  step_sec=round((total - sum(grid_seconds)) / args.steps, 4))
    result['grid_cost_in_steps'] = round(result['grid_sec_each'] / result['step_sec'], 1)
    print(json.dumps(result, indent=2))


if __name__ == '__main__':
    main()
