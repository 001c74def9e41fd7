"""`torchrun --nproc_per_node=2 train.py` on CPU (gloo): trains, writes one consistent snapshot,
resumes; also with PyTorch < 2.13's DistributedDataParallel signature (faked).
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


def _torchrun(args, tmp_path, script=os.path.join(REPO, 'train.py'), **env):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', script] + args
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES='', **env)
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
    # Resume that state under torchrun (rank 0 reads first, the other waits), one step more.
    proc = _torchrun(['--outdir', str(tmp_path / 'more'), '--data', data, '--batch=8', '--duration=0.000024', '--tick=0.008',
                      '--snap=10', '--dump=10', '--augment=0.12', '--grid=0', '--resume', str(run_dir)] + TINY, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_name,) = os.listdir(tmp_path / 'more')
    resumed = training.load_checkpoint(str(tmp_path / 'more' / run_name / 'training-state-000000_024.pt'))
    assert resumed['step'] == 24 and resumed['optimizer_state']['state'][0]['step'] == 3


# train.py with DistributedDataParallel as PyTorch < 2.13 declares it: no forward_sync_buffers, so
# the loop passes broadcast_buffers=False, which there also skips DDP's initial buffer broadcast.
OLD_DDP = f'''
import os, runpy, sys, torch
class OldDDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, device_ids=None, broadcast_buffers=True, **kwargs):
        with open(os.environ['DDP_CALLS'], 'a') as f:
            f.write(f'broadcast_buffers={{broadcast_buffers}}\\n')
        super().__init__(module, device_ids=device_ids, broadcast_buffers=broadcast_buffers, **kwargs)
torch.nn.parallel.DistributedDataParallel = OldDDP
sys.argv[0] = {os.path.join(REPO, 'train.py')!r}
runpy.run_path(sys.argv[0], run_name='__main__')
'''


@pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed unavailable')
def test_old_ddp_signature_keeps_random_buffers_equal(tmp_path):
    # ncsnpp's FourierEmbedding draws its frequencies (a buffer) at random on every rank; the
    # snapshot after the first step checks that every rank holds rank 0's.
    script, calls = tmp_path / 'old_ddp_train.py', tmp_path / 'ddp_calls.txt'
    script.write_text(OLD_DDP)
    data = _make_dataset(tmp_path / 'tiny16', n=16)
    proc = _torchrun(['--outdir', str(tmp_path / 'runs'), '--data', data, '--batch=4', '--duration=0.000004', '--snap=1',
                      '--augment=0', '--grid=0', '--arch=ncsnpp', '--cbase=8', '--cres=1,1', '--workers=0', '--seed=1'],
                     tmp_path, str(script), DDP_CALLS=str(calls))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert calls.read_text() == 'broadcast_buffers=False\n' * 2  # The old code path, on both ranks.
    (run_name,) = os.listdir(tmp_path / 'runs')
    snap = training.load_checkpoint(str(tmp_path / 'runs' / run_name / 'network-snapshot-000000_004.pkl'))
    assert snap['ema'].model.map_noise.freqs.abs().sum() > 0
