"""Post-hoc EMA end to end: train.py --ema-std stores power-function snapshots and resumes them
exactly; reconstruct_phema.py makes ordinary snapshots of any std that the loaders, generate.py
and foreign source trees read; bad requests are one Error line."""

import copy
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
import generate
import reconstruct_phema
import train
import training
from conftest import run_cli
from reference_restatement import ref_solve_posthoc_coefficients
from test_snapshot_compat import build_tree
from torch_utils import checkpoint
from training import phema, training_loop

TINY = ['--arch=ddpmpp', '--cbase=8', '--cres=1,1', '--blocks=1', '--workers=0', '--seed=1', '--augment=0', '--batch=4',
        '--grid=0', '--lr-rampup=0', '--tick=0.008', '--snap=1', '--dump=1', '--ema-std=0.050,0.100']


def _dataset(folder, n=8):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    for idx in range(n):
        PIL.Image.fromarray(rng.randint(0, 256, size=[4, 4, 3]).astype(np.uint8)).resize([16, 16]).save(os.path.join(folder, f'{idx}.png'))
    return str(folder)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """A first-stage and a relay-stage run of 24 images: snapshots at 4, 12, 20 and 24 images."""
    root = tmp_path_factory.mktemp('phema')
    data = _dataset(root / 'data')
    out = dict(root=root)
    for stage, extra in (('first', []), ('second', ['--precond=blur', '--up-scale=4', '--blur-sigma-max=2'])):
        result = run_cli(train.main, f'--outdir={root / stage}', f'--data={data}', '--nosubdir', '--duration=0.000024', *TINY, *extra)
        assert result.exit_code == 0, result.output
        out[stage] = str(root / stage)
    return out


def _error(result):
    lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert result.exit_code == 1 and len(lines) == 1 and 'Traceback' not in result.output, result.output
    return lines[0]


def test_training_stores_ordinary_snapshots_per_std(runs):
    names = sorted(name for name in os.listdir(runs['second']) if name.startswith('phema-'))
    assert names == [f'phema-000000_{n:03d}-{std}.pkl' for n in (4, 12, 20, 24) for std in ('0.050', '0.100')]
    snap = training.load_checkpoint(os.path.join(runs['second'], 'phema-000000_024-0.100.pkl'))
    classic = training.load_checkpoint(os.path.join(runs['second'], 'network-snapshot-000000_024.pkl'))
    assert set(snap) == set(classic) and snap['loss_kwargs'] == classic['loss_kwargs']
    state = training.load_checkpoint(os.path.join(runs['second'], 'training-state-000000_024.pt'))
    assert sorted(state['phema']) == [0.05, 0.1]
    for a, b in zip(snap['ema'].parameters(), state['phema'][0.1].parameters()):
        assert torch.equal(a, b)
    # The first step copies the network: the profiles differ from each other and the classic EMA after it.
    p = [torch.cat([t.flatten() for t in x.parameters()]) for x in (snap['ema'], state['phema'][0.05], classic['ema'], state['net'])]
    assert not torch.equal(p[0], p[1]) and not torch.equal(p[0], p[2]) and not torch.equal(p[0], p[3])


def test_list_shows_times_stds_and_reach(runs):
    result = run_cli(reconstruct_phema.main, f'--indir={runs["first"]}', '--list')
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split() for line in lines[1:5]] == [[kimg, '0.050', '0.100'] for kimg in ('0.004', '0.012', '0.02', '0.024')]
    assert lines[5].startswith('--outstd reconstructable at 0.024 kimg (--outkimg) within --max-error=0.05: from 0.0')


def test_reconstruction_is_the_weighted_sum_and_loads_everywhere(runs, tmp_path):
    outdir = tmp_path / 'out'
    result = run_cli(reconstruct_phema.main, f'--indir={runs["second"]}', '--outstd=0.070,0.050', f'--outdir={outdir}', '--outkimg=0.02',
                     '--max-error=0.1')
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(outdir)) == ['reconstructed-000000_020-0.050.pkl', 'reconstructed-000000_020-0.070.pkl']
    # Independently: the restated EDM2 coefficients times the stored weights, up to 20 images.
    inputs = [(n, std) for n in (4, 12, 20) for std in (0.05, 0.1)]
    coefs = ref_solve_posthoc_coefficients([n for n, _ in inputs], [s for _, s in inputs], [20], [0.07])[:, 0]
    nets = [training.load_network(os.path.join(runs['second'], f'phema-000000_{n:03d}-{std:.3f}.pkl')) for n, std in inputs]
    made = training.load_checkpoint(str(outdir / 'reconstructed-000000_020-0.070.pkl'))
    for name, param in made['ema'].named_parameters():
        expected = sum(c * dict(net.named_parameters())[name].double() for c, net in zip(coefs, nets))
        torch.testing.assert_close(param.double(), expected, rtol=1e-5, atol=1e-6)
    # A tracked std at a stored time is that snapshot.
    tracked = training.load_network(str(outdir / 'reconstructed-000000_020-0.050.pkl'))
    for a, b in zip(tracked.parameters(), nets[4].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Relay settings and the rest carried over from the input snapshot of that time.
    source = training.load_checkpoint(os.path.join(runs['second'], 'phema-000000_020-0.100.pkl'))
    assert made['loss_kwargs'] == source['loss_kwargs'] and made['loss_kwargs']['blur_sigma_max'] == 2
    assert made['dataset_kwargs'] == source['dataset_kwargs'] and made['augment_pipe'] is None
    # generate.py runs the relay stage on it (first-stage images from --indir).
    low = tmp_path / 'low'
    os.makedirs(low)
    for seed in (0, 1):
        PIL.Image.new('RGB', (4, 4), (seed * 90, 40, 200)).save(low / f'{seed:06d}.png')
    images = tmp_path / 'images'
    result = run_cli(generate.main, f'--outdir={images}', '--seeds=0-1', '--sampler_stages=second', f'--indir={low}',
                     f'--network_second={outdir / "reconstructed-000000_020-0.070.pkl"}', '--num_steps_second=2', '--no-subdirs')
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(images)) == ['000000.png', '000001.png']
    # Plain pickle.load in the reference's own tree (EDM's reads the same: tests/test_snapshot_compat.py).
    for kind in ('rdm',):
        tree = build_tree(str(tmp_path / kind), kind)
        code = (f'import pickle; d = pickle.load(open({str(outdir / "reconstructed-000000_020-0.070.pkl")!r}, "rb")); '
                f'print(type(d["ema"]).__name__, sorted(d))')
        proc = subprocess.run([sys.executable, '-c', code], cwd=tree, capture_output=True, text=True, timeout=300,
                              env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})
        assert proc.stdout.strip() == "EDMPrecond ['augment_pipe', 'dataset_kwargs', 'ema', 'loss_kwargs']", proc.stderr[-2000:]


def test_first_stage_reconstruction_samples(runs, tmp_path):
    result = run_cli(reconstruct_phema.main, f'--indir={runs["first"]}', '--outstd=0.080', f'--outdir={tmp_path / "out"}')
    assert result.exit_code == 0, result.output
    assert 'std 0.080 at 0.024 kimg from 8 snapshots (profile error' in result.output
    path = tmp_path / 'out' / 'reconstructed-000000_024-0.080.pkl'
    result = run_cli(generate.main, f'--outdir={tmp_path / "images"}', '--seeds=0', '--sampler_stages=first',
                     f'--network_first={path}', '--num_steps_first=2', '--no-subdirs')
    assert result.exit_code == 0, result.output
    assert os.listdir(tmp_path / 'images') == ['000000.png']


def test_bad_requests_are_one_line(runs, tmp_path):
    run = lambda *args: _error(run_cli(reconstruct_phema.main, *args))  # noqa: E731
    out = f'--outdir={tmp_path / "out"}'
    assert 'holds no phema-*.pkl snapshots; train with --ema-std' in run(f'--indir={tmp_path}', '--outstd=0.07', out)
    for missing in (tmp_path / 'missing', os.path.join(runs['first'], 'phema-000000_024-0.100.pkl')):  # No such folder; a file.
        result = run_cli(reconstruct_phema.main, f'--indir={missing}', '--list')
        assert result.exit_code == 2 and "Invalid value for '--indir'" in result.output, result.output
    assert 'no snapshot of that time; choose one of 0.004, 0.012, 0.02, 0.024' in run(f'--indir={runs["first"]}', '--outstd=0.07', out, '--outkimg=0.016')
    for bad in ('0', '-0.1', '0.3', 'nan', '0.0705', 'x'):
        assert f'--outstd={bad}: give relative standard deviations' in run(f'--indir={runs["first"]}', f'--outstd={bad}', out)
    assert 'give --outstd and --outdir' in run(f'--indir={runs["first"]}', '--outstd=0.07')
    # Too few snapshots for a std far from the tracked ones: refused unless --max-error allows it.
    line = run(f'--indir={runs["first"]}', '--outstd=0.250', out)
    assert '--outstd=0.250: the 8 snapshots up to 0.024 kimg make its profile only within' in line and '--max-error' in line
    assert not os.path.exists(tmp_path / 'out')
    # Snapshots of two runs (stages) mixed.
    mixed = tmp_path / 'mixed'
    shutil.copytree(runs['first'], mixed)
    shutil.copy(os.path.join(runs['second'], 'phema-000000_024-0.100.pkl'), mixed / 'phema-000000_024-0.200.pkl')
    assert 'not a network of the kind and stage of' in run(f'--indir={mixed}', '--outstd=0.07', out)
    os.remove(mixed / 'phema-000000_024-0.200.pkl')
    checkpoint.save_snapshot(str(mixed / 'phema-000000_024-0.200.pkl'), dict(ema=123))
    assert 'phema-000000_024-0.200.pkl: not a network of the kind' in run(f'--indir={mixed}', '--outstd=0.07', out)
    assert not os.path.exists(tmp_path / 'out')
    # An existing output is never replaced.
    os.makedirs(tmp_path / 'out')
    (tmp_path / 'out' / 'reconstructed-000000_024-0.070.pkl').write_bytes(b'mine')
    assert 'exists; choose another --outdir or remove it' in run(f'--indir={runs["first"]}', '--outstd=0.07', out)
    assert (tmp_path / 'out' / 'reconstructed-000000_024-0.070.pkl').read_bytes() == b'mine'
    assert '--ema-std=0.0505: give relative standard deviations' in _error(run_cli(train.main, f'--outdir={tmp_path}', f'--data={tmp_path}', '--ema-std=0.0505'))


#----------------------------------------------------------------------------
# Resume: with the weights on a path fixed by the step count, a resumed run writes the same files.

class StepOptimizer(torch.optim.Optimizer):
    """Moves every weight along a fixed path of its step count, whatever the data and noise drawn
    (a resumed run restarts those): the weights, and so every EMA, of a resumed run must equal
    an uninterrupted one's exactly."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group['params']:
                state = self.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), start=p.clone())
                state['step'] += 1
                wave = torch.sin(state['step'] + torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape))
                p.copy_(state['start'] + wave * group['lr'])


NETWORK = dnnlib.EasyDict(class_name='training.networks.EDMPrecond', model_type='SongUNet', model_channels=8, channel_mult=[1, 1],
                          num_blocks=1, attn_resolutions=[], dropout=0.1)


def _train(run_dir, data, total_kimg, **kwargs):
    os.makedirs(run_dir)
    training_loop.training_loop(
        run_dir=run_dir, seed=1, batch_size=4, total_kimg=total_kimg, progress_bar=False, device='cpu', lr_rampup_kimg=0,
        kimg_per_tick=0.004, snapshot_ticks=1, state_dump_ticks=1, ema_std=[0.05, 0.1],
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data), data_loader_kwargs=dict(num_workers=0),
        network_kwargs=NETWORK,
        loss_kwargs=dict(class_name='training.loss.EDMLoss'), optimizer_kwargs=dict(class_name=f'{__name__}.StepOptimizer', lr=1e-3), **kwargs)
    return run_dir


def _assert_same(a, b, where):
    assert type(a) is type(b), where
    if isinstance(a, torch.nn.Module):
        a, b = a.state_dict(), b.state_dict()
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_same(a[key], b[key], f'{where}[{key}]')
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def test_resume_writes_the_files_of_an_uninterrupted_run(tmp_path):
    data = _dataset(tmp_path / 'data')
    whole = _train(str(tmp_path / 'whole'), data, 0.016)
    half = _train(str(tmp_path / 'half'), data, 0.008)
    resumed = _train(str(tmp_path / 'resumed'), data, 0.016, resume_state_dump=os.path.join(half, 'training-state-000000_008.pt'))
    names = sorted(n for n in os.listdir(resumed) if n.endswith(('.pkl', '.pt')))
    assert len(names) == 4 * 2 and 'phema-000000_016-0.050.pkl' in names and 'training-state-000000_016.pt' in names
    # The final files hold equal contents (their bytes differ: pickled storages carry their memory address as a key).
    for name in [n for n in names if '000000_016' in n]:
        _assert_same(training.load_checkpoint(os.path.join(whole, name)), training.load_checkpoint(os.path.join(resumed, name)), name)
    # Without the profiles' state the resume would be wrong: refused.
    state = training.load_checkpoint(os.path.join(half, 'training-state-000000_008.pt'))
    del state['phema'][0.1]
    torch.save(state, tmp_path / 'partial.pt')
    net = dnnlib.util.construct_class_by_name(**NETWORK, img_resolution=16, img_channels=3, label_dim=0)
    with pytest.raises(dnnlib.UserError, match=r'holds no power-function EMA of std 0.100 \(it has: 0.05\); resume with the --ema-std'):
        training_loop.load_training_state(str(tmp_path / 'partial.pt'), net, copy.deepcopy(net), StepOptimizer(net.parameters()),
                                          power_emas=phema.PowerFunctionEMA(net, [0.05, 0.1]))
