"""evaluate.py gen: the in-memory route gives the PNG route's images and activations for the
same seeds (preset post-processing included), and the same result on 1 or 2 processes."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import evaluate
from conftest import perturbed_net as _net
import generate_celebahq
from metrics.inception import InceptionV3
from torch_utils import checkpoint
from torch_utils import distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--num_steps_first=3', '--num_steps_second=4']
SEEDS = '3,5,1001,8,9'


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp('gen')
    first, second = str(d / 'first.pkl'), str(d / 'second.pkl')
    checkpoint.save_snapshot(first, dict(ema=_net(8, 1)))
    checkpoint.save_snapshot(second, dict(ema=_net(32, 2)))
    torch.manual_seed(1)
    inception = InceptionV3(resolution=75)
    for m in inception.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
    torch.save(dict(inception.state_dict(), resolution=torch.tensor(75)), d / 'inception.pth')
    rng = np.random.default_rng(0)
    np.savez(d / 'ref.npz', feat=rng.standard_normal([6, 2048]).astype(np.float32))
    return dict(d=d, first=first, second=second, det=str(d / 'inception.pth'), ref=str(d / 'ref.npz'))


def _gen_args(s, *extra):
    return ['gen', '--preset=celebahq', f'--network_first={s["first"]}', f'--network_second={s["second"]}', f'--seeds={SEEDS}',
            '--batch=2', '-m', 'is', '--ref', s['ref'], '--detector', s['det'], *FAST, *extra]


def test_gen_equals_png_route(setup):
    s, d = setup, setup['d']
    # PNG route: the preset's script, then activations of its PNGs.
    res = CliRunner().invoke(generate_celebahq.main, [f'--outdir={d / "pngs"}', f'--seeds={SEEDS}', '--batch=3',
                                                      f'--network_first={s["first"]}', f'--network_second={s["second"]}', *FAST])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(evaluate.main, ['activations', '--data', str(d / 'pngs'), '--dest', str(d / 'png.npz'),
                                             '--detector', s['det'], '--workers', '0'])
    assert res.exit_code == 0, res.output
    # In memory, keeping PNGs and activations.
    res = CliRunner().invoke(evaluate.main, _gen_args(s, '--outdir', str(d / 'kept'), '--dest', str(d / 'gen.npz')))
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert res.stdout.splitlines()[-1].startswith('Inception Score: ')
    for seed in [3, 5, 1001, 8, 9]:
        rel = os.path.join(f'{seed - seed % 1000:06d}', f'{seed:06d}.png')
        assert np.array_equal(np.array(PIL.Image.open(d / 'kept' / rel)), np.array(PIL.Image.open(d / 'pngs' / rel)))
    with np.load(d / 'png.npz') as a, np.load(d / 'gen.npz') as b:
        # Folder datasets read files in sorted path order; gen keeps seed order: 3,5,1001,8,9.
        order = [0, 1, 4, 2, 3]  # Sorted paths: 000000/000003, 000005, 000008, 000009, 001000/001001.
        assert sorted(a.files) == sorted(b.files) == ['feat', 'logits', 's_feat']
        for key in a.files:
            np.testing.assert_allclose(b[key], a[key][order], rtol=1e-4, atol=1e-5, err_msg=key)  # Batch round-off only.

    # Bad input: one line, before any sampling.
    res = CliRunner().invoke(evaluate.main, _gen_args(s, '--num_steps_first=1'))
    assert res.exit_code != 0 and 'Traceback' not in res.output
    res = CliRunner().invoke(evaluate.main, _gen_args(s, '--dest', str(d / 'gen.npz')))
    assert res.exit_code != 0 and 'already exists' in res.output
    res = CliRunner().invoke(evaluate.main, _gen_args(s, f'--gnet_second={s["first"]}'))  # The guide options reach the pipeline.
    assert res.exit_code != 0 and '--gnet_second is 8 px' in res.output and 'Traceback' not in res.output


def test_gen_independent_of_process_count(setup):
    s, d = setup, setup['d']
    one = CliRunner().invoke(evaluate.main, _gen_args(s, '--dest', str(d / 'one.npz'), '--batch=1'))
    assert one.exit_code == 0, one.output
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', os.path.join(ROOT, 'evaluate.py'),
           *_gen_args(s, '--dest', str(d / 'two.npz'))]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(d / 'one.npz') as a, np.load(d / 'two.npz') as b:
        for key in a.files:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)  # Batch round-off only.
    line = lambda out: [l for l in out.splitlines() if l.startswith('Inception Score: ')][0]
    assert float(line(proc.stdout).split(': ')[1]) == pytest.approx(float(line(one.stdout).split(': ')[1]), rel=1e-5)


def test_loads_go_through_rank0_first(setup, tmp_path, monkeypatch):
    # Under torchrun a network, detector or reference is loaded by rank 0 first (a download lands in
    # the cache once) while the others wait on the group without the NCCL deadline. Before, generate.py
    # waited in a barrier of the main group (30 minutes) and evaluate.py gen loaded on every rank at once.
    s, calls = setup, []
    real = dist.rank0_first
    monkeypatch.setattr(dist, 'rank0_first', lambda fn: calls.append(fn) or real(fn))
    res = CliRunner().invoke(generate_celebahq.main, [f'--outdir={tmp_path / "out"}', '--seeds=0', f'--network_first={s["first"]}',
                                                      f'--network_second={s["second"]}', *FAST])
    assert res.exit_code == 0 and len(calls) == 1, res.output
    res = CliRunner().invoke(evaluate.main, _gen_args(s, '--seeds=0-1'))
    assert res.exit_code == 0 and len(calls) == 1 + 4, res.output  # The reference, the networks, the detector; the results.
    res = CliRunner().invoke(evaluate.main, ['activations', '--data', str(tmp_path / 'out'), '--dest', str(tmp_path / 'a.npz'),
                                             '--detector', s['det'], '--workers', '0'])
    assert res.exit_code == 1 and 'need at least 2' in res.output and len(calls) == 5  # Refused before loading.
