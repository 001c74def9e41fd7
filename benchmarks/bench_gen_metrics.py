"""In-memory metrics (`evaluate.py gen`) vs the PNG route (`generate.py` then `evaluate.py
activations`) on the same images: tiny random networks, a random-weight Inception detector, CPU.

    python benchmarks/bench_gen_metrics.py [--seeds 0-63] [--threads 2]

Both routes run as the user would run them (one process each command, startup included) and
produce the same activations; the ratio printed is PNG route time / in-memory time.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from metrics.inception import InceptionV3  # pylint: disable=wrong-import-position
from torch_utils import checkpoint  # pylint: disable=wrong-import-position
from training import networks  # pylint: disable=wrong-import-position

TINY = dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0)


def _run(args, env):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--seeds', default='0-63')
    parser.add_argument('--threads', type=int, default=2)
    opts = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), PYTHONPATH=ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        checkpoint.save_snapshot(os.path.join(tmp, 'first.pkl'), dict(ema=networks.EDMPrecond(img_resolution=16, img_channels=3, label_dim=0, **TINY)))
        checkpoint.save_snapshot(os.path.join(tmp, 'second.pkl'), dict(ema=networks.EDMPrecond(img_resolution=64, img_channels=3, label_dim=0, **TINY)))
        det = os.path.join(tmp, 'inception.pth')
        torch.save(InceptionV3().state_dict(), det)  # Random weights, full 299 px resize.
        np.savez(os.path.join(tmp, 'ref.npz'), mu=np.zeros(2048), sigma=np.eye(2048))
        common = [f'--network_first={tmp}/first.pkl', f'--network_second={tmp}/second.pkl', f'--seeds={opts.seeds}',
                  '--num_steps_first=8', '--num_steps_second=8', '--batch=16']
        t_png = _run(['generate_celebahq.py', f'--outdir={tmp}/png', *common], env)
        t_png += _run(['evaluate.py', 'activations', f'--data={tmp}/png', f'--dest={tmp}/png.npz', f'--detector={det}', '--batch=16', '--workers=0'], env)
        t_mem = _run(['evaluate.py', 'gen', '--preset=celebahq', *common, '-m', 'is', f'--detector={det}', f'--dest={tmp}/mem.npz'], env)
        with np.load(f'{tmp}/png.npz') as a, np.load(f'{tmp}/mem.npz') as b:
            same = all(np.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a.files)  # Seeds 0-999: same order both ways.
    n = len(range(*[int(x) + i for i, x in enumerate(opts.seeds.split('-'))])) if '-' in opts.seeds else None
    print(f'images: {n}, threads: {opts.threads}, same activations: {same}')
    print(f'PNG route (generate + activations): {t_png:.1f} s')
    print(f'in memory (evaluate.py gen):        {t_mem:.1f} s')
    print(f'ratio PNG / in-memory:              {t_png / t_mem:.2f}')


if __name__ == '__main__':
    main()
