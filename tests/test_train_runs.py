"""Run-folder behaviour of the training loop: snapshot names that never collide, resuming a
finished run, resuming the wrong stage, and one run per folder."""

import json
import os

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
    lock = training_loop.lock_run_dir(str(tmp_path))
    try:
        with pytest.raises(UserError, match=f'{tmp_path} is in use by another training run'):
            training_loop.lock_run_dir(str(tmp_path))
    finally:
        lock.release()
    assert os.listdir(tmp_path) == []  # The lock file goes with the run.
    training_loop.lock_run_dir(str(tmp_path)).release()  # Free again.


def test_second_nosubdir_run_into_a_busy_folder_is_refused(first_stage, tmp_path):
    folder = tmp_path / 'shared'
    folder.mkdir()
    lock = training_loop.lock_run_dir(str(folder))  # A run in progress that has not written its options yet.
    try:
        result = CliRunner().invoke(train.main, ['--outdir', str(folder), '--nosubdir', '--data', first_stage['data'],
                                                 '--duration=0.000004'] + TINY_CLI)
        line = _error_line(result)
        assert f'{folder} is in use by another training run' in line
        assert os.listdir(folder) == [training_loop.RUN_LOCK_NAME]  # Nothing written beside the holder's lock.
    finally:
        lock.release()
    result = CliRunner().invoke(train.main, ['--outdir', str(folder), '--nosubdir', '--data', first_stage['data'],
                                             '--duration=0.000004'] + TINY_CLI)
    assert result.exit_code == 0, result.output
    assert training_loop.RUN_LOCK_NAME not in os.listdir(folder)


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
    assert 'network-snapshot-000000_004.pkl' in os.listdir(tmp_path) and training_loop.RUN_LOCK_NAME not in os.listdir(tmp_path)


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
