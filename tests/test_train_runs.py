"""Run-folder behaviour of the training loop: snapshot names that never collide, resuming a
finished run, resuming the wrong stage, and one run per folder."""

import json
import os
import re

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import training
import dnnlib
import train
from torch_utils import checkpoint
from training import training_loop
from dnnlib import UserError

NETWORK = dnnlib.EasyDict(class_name='training.networks.EDMPrecond', model_type='SongUNet', model_channels=8,
                          channel_mult=[1, 1], num_blocks=1, attn_resolutions=[], dropout=0.1)
EDM_LOSS = dict(class_name='training.loss.EDMLoss')
BLUR_LOSS = dict(class_name='training.loss.BlurLoss', up_scale=4, block_scale=0.15, prob_length=0.93, blur_sigma_max=3)
TINY_CLI = ['--arch=ddpmpp', '--cbase=8', '--cres=1,1', '--blocks=1', '--workers=0', '--seed=1', '--augment=0',
            '--batch=4']


def _dataset(folder, n=8):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    for idx in range(n):
        img = PIL.Image.fromarray(rng.randint(0, 256, size=[4, 4, 3]).astype(np.uint8)).resize([16, 16])
        img.save(os.path.join(folder, f'{idx}.png'))
    return str(folder)


def _train(run_dir, data, total_kimg, **kwargs):
    os.makedirs(run_dir, exist_ok=True)
    kwargs = dict(dict(loss_kwargs=EDM_LOSS, kimg_per_tick=0.004, snapshot_ticks=1, state_dump_ticks=1), **kwargs)
    return training_loop.training_loop(
        run_dir=run_dir, seed=1, batch_size=4, total_kimg=total_kimg, progress_bar=False, device='cpu',
        lr_rampup_kimg=0, dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data),
        data_loader_kwargs=dict(num_workers=0), network_kwargs=NETWORK,
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3), **kwargs)


@pytest.fixture(scope='module')
def first_stage(tmp_path_factory):
    """Two steps of 4 images, a snapshot and a state at 8 images."""
    root = tmp_path_factory.mktemp('runs')
    data = _dataset(root / 'data')
    run_dir = str(root / 'first')
    _train(run_dir, data, total_kimg=0.008)
    return dict(root=root, data=data, run_dir=run_dir, state=os.path.join(run_dir, 'training-state-000000_008.pt'))


def _fresh(loss_kwargs=EDM_LOSS, network=NETWORK):
    net = dnnlib.util.construct_class_by_name(**network, img_resolution=16, img_channels=3, label_dim=0)
    ema = dnnlib.util.construct_class_by_name(**network, img_resolution=16, img_channels=3, label_dim=0)
    return net, ema, torch.optim.Adam(net.parameters(), lr=1e-3)


def _error_line(result):
    # These are found once the run has started (after the options are printed): the run ends
    # with one error line and no traceback.
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert result.exit_code != 0 and len(errors) == 1 and errors[0].startswith('Error: '), result.output
    assert 'Traceback' not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return errors[0]


#----------------------------------------------------------------------------
# Names.

def test_names_keep_reference_form_and_sort_by_images():
    assert training_loop.nimg_suffix(123000) == '000123'  # The reference's name for whole kimg.
    assert training_loop.nimg_suffix(123456) == '000123_456'
    assert training_loop.nimg_suffix(8) == '000000_008'
    counts = [0, 8, 16, 999, 1000, 1001, 1500, 2000, 12345, 123000, 123456]
    names = [f'training-state-{training_loop.nimg_suffix(n)}.pt' for n in counts]
    assert sorted(names) == names
    assert [training_loop.training_state_nimg(name) for name in names] == counts
    assert training_loop.training_state_nimg('training-state-12.pt') == 12000
    for bad in ('training-state-000001_5.pt', 'training-state-.pt', 'network-snapshot-000001.pkl', 'x.pt'):
        assert training_loop.training_state_nimg(bad) is None


def test_latest_state_understands_both_forms(tmp_path):
    for name in ('training-state-000001.pt', 'training-state-000001_500.pt', 'training-state-000000_999.pt',
                 'training-state-000002_001.pt', 'training-state-000002.pt', 'notes.txt'):
        (tmp_path / name).write_bytes(b'')
    assert training_loop.find_latest_training_state(str(tmp_path)) == str(tmp_path / 'training-state-000002_001.pt')


def test_fractional_ticks_keep_every_snapshot(first_stage):
    names = sorted(n for n in os.listdir(first_stage['run_dir']) if n.endswith(('.pkl', '.pt')))
    assert names == ['network-snapshot-000000_004.pkl', 'network-snapshot-000000_008.pkl',
                     'training-state-000000_008.pt']


#----------------------------------------------------------------------------
# Resume.

def test_resuming_a_finished_run_trains_nothing(first_stage, tmp_path):
    run_dir = str(tmp_path / 'again')
    result = _train(run_dir, first_stage['data'], total_kimg=0.008, resume_state_dump=first_stage['state'])
    assert result['cur_nimg'] == 8
    assert result['optimizer'].state_dict()['state'][0]['step'] == 2  # The two steps of the original run.
    saved = training.load_checkpoint(first_stage['state'])
    for a, b in zip(result['net'].parameters(), saved['net'].parameters()):
        assert torch.equal(a, b)
    assert os.listdir(run_dir) == []  # No snapshot, state or stats of a step that did not happen.


def test_resume_continues_a_run(first_stage, tmp_path):
    result = _train(str(tmp_path / 'more'), first_stage['data'], total_kimg=0.012,
                    resume_state_dump=first_stage['state'])
    assert result['cur_nimg'] == 12 and result['optimizer'].state_dict()['state'][0]['step'] == 3


def test_resume_refuses_the_other_stage(first_stage, tmp_path):
    net, ema, opt = _fresh()
    with pytest.raises(UserError, match=r'is a first \(EDMLoss\) stage training state .* trains the '
                                            r'second \(relay, --precond=blur\) stage'):
        training_loop.load_training_state(first_stage['state'], net, ema, opt, loss_kwargs=BLUR_LOSS)
    # A second-stage state resumed as a first-stage run.
    saved = training.load_checkpoint(first_stage['state'])
    training_loop.save_training_state(str(tmp_path), 8, net=saved['net'], ema=saved['ema'], optimizer=opt,
                                      loss_kwargs=BLUR_LOSS)
    second = str(tmp_path / 'training-state-000000_008.pt')
    net, ema, opt = _fresh()
    with pytest.raises(UserError, match=r'is a second \(relay, --precond=blur\) stage training state'):
        training_loop.load_training_state(second, net, ema, opt, loss_kwargs=EDM_LOSS)
    assert training_loop.load_training_state(second, net, ema, opt, loss_kwargs=BLUR_LOSS) == 8


def test_resume_reads_the_stage_of_older_states_from_the_run_options(first_stage, tmp_path):
    # States written before the loss was recorded in them: training_options.json beside them says.
    saved = training.load_checkpoint(first_stage['state'])
    old = dict(net=saved['net'], ema=saved['ema'], optimizer_state=saved['optimizer_state'], step=8)
    path = str(tmp_path / 'training-state-000000_008.pt')
    checkpoint.save_training_state(path, old)
    net, ema, opt = _fresh()
    assert training_loop.load_training_state(path, net, ema, opt, loss_kwargs=BLUR_LOSS) == 8  # Nothing says.
    with open(tmp_path / 'training_options.json', 'w') as f:
        json.dump(dict(loss_kwargs=EDM_LOSS), f)
    with pytest.raises(UserError, match='first'):
        training_loop.load_training_state(path, net, ema, opt, loss_kwargs=BLUR_LOSS)


def test_resume_refuses_another_preconditioner(first_stage):
    net, ema, opt = _fresh(network=dict(NETWORK, class_name='training.networks.VPPrecond'))
    with pytest.raises(UserError, match='holds a EDMPrecond network and this run builds VPPrecond'):
        training_loop.load_training_state(first_stage['state'], net, ema, opt, loss_kwargs=dict(class_name='training.loss.VPLoss'))


def test_cli_resume_as_blur_is_one_line(first_stage, tmp_path):
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--data', first_stage['data'],
                                             '--precond=blur', '--resume', first_stage['state']] + TINY_CLI)
    line = _error_line(result)
    assert 'first (EDMLoss) stage training state' in line and '--precond' in line


#----------------------------------------------------------------------------
# One run per folder.

def test_run_folder_lock_is_exclusive(tmp_path):
    with training_loop.lock_run_dir(str(tmp_path)):
        with pytest.raises(UserError, match=f'{tmp_path} is in use by another training run'):
            training_loop.lock_run_dir(str(tmp_path))
    with training_loop.lock_run_dir(str(tmp_path)):  # Free again.
        pass


def test_second_nosubdir_run_into_a_busy_folder_is_refused(first_stage, tmp_path):
    folder = tmp_path / 'shared'
    folder.mkdir()
    with training_loop.lock_run_dir(str(folder)):  # A run in progress that has not written its options yet.
        result = CliRunner().invoke(train.main, ['--outdir', str(folder), '--nosubdir', '--data', first_stage['data'],
                                                 '--duration=0.000004'] + TINY_CLI)
        line = _error_line(result)
        assert f'{folder} is in use by another training run' in line
        assert os.listdir(folder) == [training_loop.RUN_LOCK_NAME]  # Nothing written beside the holder's lock.
    result = CliRunner().invoke(train.main, ['--outdir', str(folder), '--nosubdir', '--data', first_stage['data'],
                                             '--duration=0.000004'] + TINY_CLI)
    assert result.exit_code == 0, result.output
    with training_loop.lock_run_dir(str(folder)):  # Released when the run ended.
        pass


@pytest.mark.parametrize('code', ['ENOLCK', 'ENOSYS'])
def test_filesystem_without_locks_trains_unlocked(first_stage, tmp_path, monkeypatch, code):
    import errno
    import fcntl

    def no_locks(_fd, _op):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, 'flock', no_locks)
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--nosubdir', '--data', first_stage['data'],
                                             '--duration=0.000004', '--grid=0'] + TINY_CLI)
    assert result.exit_code == 0, result.output
    assert f'Warning: {tmp_path} is on a filesystem without file locks' in result.output
    assert 'network-snapshot-000000_004.pkl' in os.listdir(tmp_path)


def test_resume_and_transfer_read_on_rank0_first(first_stage, tmp_path, monkeypatch):
    # Rank 0 reads (downloads) first; the others wait in rank0_first, without the main process
    # group's deadline (the two-process run is in test_train_ddp.py).
    calls = []
    real = training_loop.dist.rank0_first
    monkeypatch.setattr(training_loop.dist, 'rank0_first', lambda fn: calls.append(fn) or real(fn))
    result = _train(str(tmp_path / 'resumed'), first_stage['data'], total_kimg=0.012, resume_state_dump=first_stage['state'])
    assert result['cur_nimg'] == 12 and len(calls) == 1
    snapshot = os.path.join(first_stage['run_dir'], 'network-snapshot-000000_008.pkl')
    _train(str(tmp_path / 'transferred'), first_stage['data'], total_kimg=0.004, resume_pkl=snapshot)
    assert len(calls) == 2


@pytest.mark.parametrize('theirs', ['network-snapshot-000000_008.pkl', 'training-state-000010.pt', 'log.txt', 'stats.jsonl',
                                    'samples-000000.png', 'training_options.json'])
def test_nosubdir_into_another_runs_folder_is_refused(first_stage, tmp_path, theirs):
    (tmp_path / theirs).write_text('theirs')
    (tmp_path / 'notes.txt').write_text('mine')
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--nosubdir', '--data', first_stage['data'],
                                             '--duration=0.000004'] + TINY_CLI)
    line = _error_line(result)
    assert f'--nosubdir: {tmp_path} already holds files of a training run ({theirs})' in line
    assert sorted(os.listdir(tmp_path)) == sorted([theirs, 'notes.txt']) and (tmp_path / theirs).read_text() == 'theirs'


def _damaged_state(first_stage, tmp_path, edit):
    data = dict(training.load_checkpoint(first_stage['state']))
    edit(data)
    path = str(tmp_path / 'training-state-000000_008.pt')
    checkpoint.save_training_state(path, data)
    return path


def _fill_nan(module):
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float('nan'))


STATE_EDITS = {
    'nan ema':        (lambda d: _fill_nan(d['ema']), 'its ema holds non-finite values'),
    'nan net':        (lambda d: _fill_nan(d['net']), 'its net holds non-finite values'),
    'betas':          (lambda d: d['optimizer_state']['param_groups'][0].update(betas=(2.0, -1.0)), 'optimizer settings are out of range'),
    'eps':            (lambda d: d['optimizer_state']['param_groups'][0].update(eps=-1.0), 'optimizer settings are out of range'),
    'lr nan':         (lambda d: d['optimizer_state']['param_groups'][0].update(lr=float('nan')), 'optimizer settings are out of range'),
    'step abc':       (lambda d: d.update(step='abc'), "its step (abc) is not a number of images"),
    'step negative':  (lambda d: d.update(step=-5), 'its step (-5) is not a number of images'),
    'step float':     (lambda d: d.update(step=8.5), 'its step (8.5) is not a number of images'),
    'optimizer {}':   (lambda d: d.update(optimizer_state={}), 'its optimizer_state is not an optimizer state'),
    'no groups':      (lambda d: d['optimizer_state'].update(param_groups=[]), 'its optimizer holds 0 parameters'),
    'moment shape':   (lambda d: d['optimizer_state']['state'][0].update(exp_avg=torch.zeros([3, 3])), 'exp_avg of parameter 0 is [3, 3]'),
    'moment nan':     (lambda d: d['optimizer_state']['state'][0]['exp_avg_sq'].fill_(float('nan')), 'exp_avg_sq of parameter 0 is not a finite'),
    'adam step < 0':  (lambda d: d['optimizer_state']['state'][0].update(step=torch.tensor(-3.0)), 'step of parameter 0 is not a finite'),
    'unknown param':  (lambda d: d['optimizer_state']['state'].update({999: {}}), 'an entry 999 for no parameter'),
}


@pytest.mark.parametrize('case', list(STATE_EDITS))
def test_damaged_training_state_values_are_refused(first_stage, tmp_path, case):
    edit, message = STATE_EDITS[case]
    path = _damaged_state(first_stage, tmp_path, edit)
    net, ema, opt = _fresh()
    with pytest.raises(UserError, match=re.escape(message)):
        training_loop.load_training_state(path, net, ema, opt, loss_kwargs=EDM_LOSS)


@pytest.fixture(scope='module')
def cli_run(first_stage):
    """train.py's own run of TINY_CLI: 2 steps, snapshots at 4 and 8 images, a state at 8."""
    outdir = first_stage['root'] / 'cli'
    result = CliRunner().invoke(train.main, ['--outdir', str(outdir), '--data', first_stage['data'], '--duration=0.000008',
                                             '--tick=0.004', '--snap=1', '--dump=1'] + TINY_CLI)
    assert result.exit_code == 0, result.output
    (run_dir,) = os.listdir(outdir)
    return dict(first_stage, run_dir=str(outdir / run_dir), state=str(outdir / run_dir / 'training-state-000000_008.pt'))


def test_damaged_training_state_is_one_line_before_training(cli_run, tmp_path):
    path = _damaged_state(cli_run, tmp_path, STATE_EDITS['betas'][0])
    first_stage = cli_run
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'runs'), '--data', first_stage['data'],
                                             '--resume', path, '--duration=0.000012'] + TINY_CLI)
    line = _error_line(result)
    assert 'optimizer settings are out of range' in line and 'resume from an earlier one' in line
    (run_dir,) = os.listdir(tmp_path / 'runs')
    assert not any(name.endswith(('.pkl', '.pt')) for name in os.listdir(tmp_path / 'runs' / run_dir))


def test_transfer_reports_and_refuses_a_small_share(cli_run, tmp_path):
    first_stage = cli_run
    snapshot = os.path.join(first_stage['run_dir'], 'network-snapshot-000000_008.pkl')
    # Same network: everything copied, and said so.
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'same'), '--data', first_stage['data'],
                                             '--transfer', snapshot, '--duration=0.000004'] + TINY_CLI)
    assert result.exit_code == 0, result.output
    assert re.search(r"Transferred \d+ weight tensors \(100\.0% of this network's weights, 100\.0% of the source's\) from "
                     + re.escape(snapshot), result.output), result.output
    # Four levels from a two-level network: the first level only.
    deeper = TINY_CLI + ['--cres=1,1,1,1']
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'deep'), '--data', first_stage['data'],
                                             '--transfer', snapshot, '--duration=0.000004'] + deeper)
    line = _error_line(result)
    assert re.search(r"shares only \d+ weight tensors \((\d|[1-4]\d)\.\d% of this network's weights, \d+\.\d% of the source's\)", line), line
    assert '--transfer-partial' in line
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'deep'), '--data', first_stage['data'],
                                             '--transfer', snapshot, '--transfer-partial', '--duration=0.000004'] + deeper)
    assert result.exit_code == 0 and 'Transferred ' in result.output, result.output
    # The reverse, a two-level network from that four-level run's snapshot: little of the source.
    (deep_snapshot,) = [str(run / 'network-snapshot-000000_004.pkl') for run in (tmp_path / 'deep').iterdir()
                        if (run / 'network-snapshot-000000_004.pkl').exists()]  # The refused try left its options and log.
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'shallow'), '--data', first_stage['data'],
                                             '--transfer', deep_snapshot, '--duration=0.000004'] + TINY_CLI)
    line = _error_line(result)
    assert re.search(r"shares only \d+ weight tensors \(\d+\.\d% of this network's weights, (\d|[1-4]\d)\.\d% of the source's\)", line), line
