"""`torchrun --nproc_per_node=2 train.py` on CPU (gloo): trains, writes one consistent snapshot.
(The batch-not-divisible error is tested in test_train.py with a faked world size.)"""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import training
from torch_utils import checkpoint

TINY = ['--arch=ddpmpp', '--cbase=8', '--cres=1,1', '--workers=0', '--seed=1', '--lr-rampup=0']

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_dataset(folder, n, size=16):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    for idx in range(n):
        base = rng.randint(0, 256, size=[2, 2, 3]).astype(np.uint8)
        PIL.Image.fromarray(base).resize([size, size], PIL.Image.BILINEAR).save(os.path.join(folder, f'img{idx:05d}.png'))
    return str(folder)


def _torchrun(args, tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(REPO, 'train.py')] + args
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES='')
    return subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed unavailable')
def test_torchrun_two_processes(tmp_path):
    data = _make_dataset(tmp_path / 'tiny16', n=32)
    outdir = tmp_path / 'runs'
    # 2 steps of 8 images = 4 per process; a snapshot every tick.
    proc = _torchrun(['--outdir', str(outdir), '--data', data, '--batch=8', '--duration=0.000016',
                      '--tick=0.008', '--snap=1', '--dump=1', '--augment=0.12', '--grid=4', '--grid-steps=2'] + TINY, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_name,) = os.listdir(outdir)  # Only rank 0 creates a folder.
    assert run_name == '00000-tiny16-uncond-ddpmpp-edm-gpus2-batch8-fp32'
    run_dir = outdir / run_name
    assert sorted(f for f in os.listdir(run_dir) if not f.startswith('.')) == [  # Sample grids from rank 0 only.
        'log.txt', 'network-snapshot-000000_008.pkl', 'network-snapshot-000000_016.pkl', 'samples-000000_008.png',
        'samples-000000_016.png', 'stats.jsonl', 'training-state-000000_016.pt', 'training_options.json']
    with open(run_dir / 'stats.jsonl') as f:
        lines = [json.loads(line) for line in f]
    assert lines[-1]['Progress/kimg']['mean'] == pytest.approx(0.016)
    # Loss statistics are summed over both processes: 8 images x 3 x 16 x 16 values per step.
    assert lines[0]['Loss/loss']['num'] == 8 * 3 * 16 * 16
    state = training.load_checkpoint(str(run_dir / 'training-state-000000_016.pt'))
    snap = training.load_checkpoint(str(run_dir / 'network-snapshot-000000_016.pkl'))
    assert state['step'] == 16 and state['optimizer_state']['state'][0]['step'] == 2
    for a, b in zip(snap['ema'].parameters(), state['ema'].parameters()):
        assert torch.equal(a, b)
    with torch.no_grad():
        out = snap['ema'](torch.randn([1, 3, 16, 16]), torch.ones([1]))
    assert torch.isfinite(out).all()
