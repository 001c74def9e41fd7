"""train.py end to end on a tiny 16x16 dataset: run folder, snapshots that load back, resume,
transfer, and one-line errors for bad input."""

import hashlib
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

import training
import dnnlib
from click.testing import CliRunner

import train
from torch_utils import checkpoint
from training import training_loop

# Tiny network: DDPM++ with 8 channels at both resolutions (~20k parameters).
TINY = ['--arch=ddpmpp', '--cbase=8', '--cres=1,1', '--workers=0', '--seed=1', '--lr-rampup=0', '--grid=0']
NUM_IMAGES = 200


def _make_dataset(folder, n=NUM_IMAGES, size=16, labels=True, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    names = []
    for idx in range(n):
        # Smooth colour blobs rather than white noise, so the loss has something to learn.
        base = rng.randint(0, 256, size=[2, 2, 3]).astype(np.uint8)
        img = np.asarray(PIL.Image.fromarray(base).resize([size, size], PIL.Image.BILINEAR))
        name = f'img{idx:05d}.png'
        PIL.Image.fromarray(img).save(os.path.join(folder, name))
        names.append(name)
    if labels:
        with open(os.path.join(folder, 'dataset.json'), 'w') as f:
            json.dump({'labels': [[n_, i % 4] for i, n_ in enumerate(names)]}, f)
    return str(folder)




def _run(args):
    result = CliRunner().invoke(train.main, args, catch_exceptions=False)
    return result


def _folder_digest(folder):
    h = hashlib.sha256()
    for root, _dirs, files in sorted(os.walk(folder)):
        for fname in sorted(files):
            path = os.path.join(root, fname)
            h.update(path.encode())
            with open(path, 'rb') as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
    """32 images in batches of 8: ticks after 8, 24 and 32 images; a snapshot and a training
    state every tick (all named 000000 since fewer than 1000 images are seen)."""
    root = tmp_path_factory.mktemp('train')
    data = _make_dataset(root / 'tiny16')
    outdir = str(root / 'runs')
    result = _run(['--outdir', outdir, '--data', data, '--cond=1', '--batch=8', '--duration=0.000032',
                   '--tick=0.016', '--snap=1', '--dump=1', '--augment=0.12'] + TINY)
    assert result.exit_code == 0, result.output
    run_dir = os.path.join(outdir, '00000-tiny16-cond-ddpmpp-edm-gpus1-batch8-fp32')
    return dict(root=root, data=data, outdir=outdir, run_dir=run_dir, output=result.output)


def test_run_folder_contents(first_run):
    run_dir = first_run['run_dir']
    assert sorted(os.listdir(first_run['outdir'])) == [os.path.basename(run_dir)]
    # Snapshot names carry the image count (000000_008 = 8 images): no tick overwrites another.
    assert sorted(os.listdir(run_dir)) == ['.train.lock', 'log.txt', 'network-snapshot-000000_008.pkl', 'network-snapshot-000000_024.pkl',
                                           'network-snapshot-000000_032.pkl', 'stats.jsonl', 'training-state-000000_024.pt',
                                           'training-state-000000_032.pt', 'training_options.json']
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        opts = json.load(f)
    assert opts['batch_size'] == 8 and opts['network_kwargs']['class_name'] == 'training.networks.EDMPrecond'
    assert opts['network_kwargs']['model_channels'] == 8 and opts['network_kwargs']['augment_dim'] == 9
    assert opts['loss_kwargs']['class_name'] == 'training.loss.EDMLoss'
    assert opts['dataset_kwargs']['resolution'] == 16 and opts['dataset_kwargs']['use_labels'] is True
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        lines = [json.loads(line) for line in f]
    assert [line['Progress/kimg']['mean'] for line in lines] == pytest.approx([0.008, 0.024, 0.032])
    assert all(np.isfinite(line['Loss/loss']['mean']) for line in lines)
    log = open(os.path.join(run_dir, 'log.txt')).read()
    assert 'tick 2' in log and 'Exiting...' in log


def test_snapshots_load_back(first_run):
    run_dir = first_run['run_dir']
    snap = training.load_checkpoint(os.path.join(run_dir, 'network-snapshot-000000_032.pkl'))
    assert set(snap) >= {'ema', 'loss_kwargs', 'augment_pipe', 'dataset_kwargs'} and 'loss_fn' not in snap
    assert snap['loss_kwargs'] == dict(class_name='training.loss.EDMLoss')
    assert type(snap['augment_pipe']).__name__ == 'AugmentPipe'
    assert snap['dataset_kwargs']['path'] == first_run['data']
    ema = snap['ema']
    assert type(ema).__name__ == 'EDMPrecond' and ema.img_resolution == 16 and ema.label_dim == 4
    with torch.no_grad():
        out = ema(torch.randn([2, 3, 16, 16]), torch.ones([2]), torch.eye(4)[:2])
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()

    state = training.load_checkpoint(os.path.join(run_dir, 'training-state-000000_032.pt'))
    assert set(state) >= {'net', 'ema', 'optimizer_state', 'step'}
    assert state['step'] == 32
    assert state['optimizer_state']['state'][0]['step'] == 4  # Four Adam steps.
    # The snapshot's EMA (final tick) is the training state's EMA.
    for (name, a), (_, b) in zip(ema.named_parameters(), state['ema'].named_parameters()):
        assert torch.equal(a, b), name


def test_load_training_state_restores_weights_and_optimizer(first_run):
    path = os.path.join(first_run['run_dir'], 'training-state-000000_032.pt')
    with open(os.path.join(first_run['run_dir'], 'training_options.json')) as f:
        opts = json.load(f)
    import dnnlib
    net = dnnlib.util.construct_class_by_name(**opts['network_kwargs'], img_resolution=16, img_channels=3, label_dim=4)
    ema = dnnlib.util.construct_class_by_name(**opts['network_kwargs'], img_resolution=16, img_channels=3, label_dim=4)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    assert training_loop.find_latest_training_state(first_run['run_dir']) == path
    assert training_loop.load_training_state(path, net, ema, optimizer) == 32
    saved = training.load_checkpoint(path)
    for mine, theirs in [(net, saved['net']), (ema, saved['ema'])]:
        for (name, a), (_, b) in zip(mine.named_parameters(), theirs.named_parameters()):
            assert torch.equal(a, b), name
    assert optimizer.state_dict()['state'][0]['step'] == 4


def test_resume_from_run_folder_continues(first_run):
    before = _folder_digest(first_run['run_dir'])
    result = _run(['--outdir', first_run['outdir'], '--data', first_run['data'], '--cond=1', '--batch=8',
                   '--duration=0.000040', '--tick=0.016', '--snap=1', '--dump=1', '--augment=0.12',
                   '--resume', first_run['run_dir']] + TINY)
    assert result.exit_code == 0, result.output
    assert _folder_digest(first_run['run_dir']) == before  # The old run is untouched.
    new_dir = os.path.join(first_run['outdir'], '00001-tiny16-cond-ddpmpp-edm-gpus1-batch8-fp32')
    with open(os.path.join(new_dir, 'stats.jsonl')) as f:
        lines = [json.loads(line) for line in f]
    # Continues from 32 images (tick 32 // 16 = 2): one more step, then done.
    assert [line['Progress/kimg']['mean'] for line in lines] == pytest.approx([0.040])
    assert [line['Progress/tick']['mean'] for line in lines] == [2]
    old = training.load_checkpoint(os.path.join(first_run['run_dir'], 'training-state-000000_032.pt'))
    new = training.load_checkpoint(os.path.join(new_dir, 'training-state-000000_040.pt'))
    assert new['step'] == 40
    assert new['optimizer_state']['state'][0]['step'] == 5  # Adam state carried over (4 + 1).
    # One Adam step of lr 1e-4 moves each weight by about 1e-4 at most: the run went on from the
    # saved weights, not from a fresh initialisation.
    for (name, a), (_, b) in zip(old['net'].named_parameters(), new['net'].named_parameters()):
        assert (a - b).abs().max() < 1e-3, name
    assert any(not torch.equal(a, b) for a, b in zip(old['net'].parameters(), new['net'].parameters()))


def test_transfer_starts_from_ema(first_run, tmp_path):
    snap = os.path.join(first_run['run_dir'], 'network-snapshot-000000_032.pkl')
    result = _run(['--outdir', str(tmp_path), '--data', first_run['data'], '--cond=1', '--batch=8',
                   '--duration=0.000008', '--augment=0.12', '--transfer', snap] + TINY)
    assert result.exit_code == 0, result.output
    (run_name,) = os.listdir(tmp_path)
    new = training.load_checkpoint(os.path.join(tmp_path, run_name, 'network-snapshot-000000_008.pkl'))
    source = training.load_checkpoint(snap)['ema']
    # No EMA ramp-up with --transfer: a half-life of 500k images leaves the EMA where it started.
    for (name, a), (_, b) in zip(source.named_parameters(), new['ema'].named_parameters()):
        assert (a - b).abs().max() < 1e-6, name


def test_dry_run_writes_nothing(first_run, tmp_path):
    result = _run(['--outdir', str(tmp_path / 'runs'), '--data', first_run['data'], '--dry-run',
                   '--precond=blur', '--up-scale=4'] + TINY)
    assert result.exit_code == 0, result.output
    assert 'Dry run; exiting.' in result.output and 'training.loss.BlurLoss' in result.output
    assert '"blur_sigma_max": 3' in result.output and '"block_scale": 0.15' in result.output
    assert not os.path.exists(tmp_path / 'runs')


def test_adm_preset_at_256():
    kw = train.network_kwargs_for('adm', 256)
    assert (kw.model_type, kw.model_channels, kw.channel_mult, kw.num_blocks) == ('DhariwalUNet', 256, [1, 1, 2, 2, 4, 4], 2)
    kw = train.network_kwargs_for('adm', 64)
    assert (kw.model_channels, kw.channel_mult) == (192, [1, 2, 3, 4]) and 'num_blocks' not in kw
    assert dnnlib.util.IntList().convert('1,2,5-7', None, None) == [1, 2, 5, 6, 7]


@pytest.mark.parametrize('case', ['missing', 'mixed', 'cond_without_labels', 'batch_gpu', 'resume_missing',
                                  'resume_not_state', 'resume_empty_dir', 'resume_and_transfer'])
def test_bad_input_one_line_error(first_run, tmp_path, case):
    data = first_run['data']
    extra = []
    if case == 'missing':
        data = str(tmp_path / 'does-not-exist')
    elif case == 'mixed':
        data = _make_dataset(tmp_path / 'mixed', n=4, labels=False)
        PIL.Image.new('RGB', (32, 32)).save(tmp_path / 'mixed' / 'zz.png')
    elif case == 'cond_without_labels':
        data = _make_dataset(tmp_path / 'nolabels', n=4, labels=False)
        extra = ['--cond=1']
    elif case == 'batch_gpu':
        extra = ['--batch=32', '--batch-gpu=5']
    elif case == 'resume_missing':
        extra = ['--resume', str(tmp_path / 'training-state-000001.pt')]
    elif case == 'resume_not_state':
        bogus = tmp_path / 'training-state-000001.pt'
        bogus.write_text('not a checkpoint')
        extra = ['--resume', str(bogus)]
    elif case == 'resume_empty_dir':
        extra = ['--resume', str(tmp_path)]
    elif case == 'resume_and_transfer':
        extra = ['--resume', first_run['run_dir'], '--transfer', os.path.join(first_run['run_dir'], 'network-snapshot-000000_032.pkl')]
    before = _folder_digest(first_run['outdir'])
    result = CliRunner().invoke(train.main, ['--outdir', first_run['outdir'], '--data', data] + TINY + extra)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('Error: '), result.output
    assert 'Traceback' not in result.output
    assert _folder_digest(first_run['outdir']) == before


def test_blur_precond_trains_relay_stage(first_run, tmp_path):
    result = _run(['--outdir', str(tmp_path), '--data', first_run['data'], '--batch=8', '--duration=0.000008',
                   '--augment=0', '--precond=blur', '--up-scale=4', '--block-scale=0.15', '--prob-length=0.93',
                   '--blur-sigma-max=3'] + TINY)
    assert result.exit_code == 0, result.output
    (run_name,) = os.listdir(tmp_path)
    assert run_name == '00000-tiny16-uncond-ddpmpp-blur-gpus1-batch8-fp32'
    snap = training.load_checkpoint(os.path.join(tmp_path, run_name, 'network-snapshot-000000_008.pkl'))
    assert type(snap['ema']).__name__ == 'EDMPrecond'
    assert snap['loss_kwargs'] == dict(class_name='training.loss.BlurLoss', up_scale=4, block_scale=0.15,
                                       prob_length=0.93, blur_sigma_max=3)
    assert snap['augment_pipe'] is None


def test_blur_up_scale_must_divide_resolution(first_run, tmp_path):
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--data', first_run['data'],
                                             '--precond=blur', '--up-scale=3'] + TINY)
    assert result.exit_code != 0 and 'Error: --up-scale=3 must divide the image resolution 16' in result.output
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(__import__('importlib.util').util.find_spec('tensorboard') is not None,
                    reason='tensorboard is installed, so --logger=tensorboard works')
def test_missing_optional_logger_is_one_line(first_run, tmp_path):
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--data', first_run['data'],
                                             '--logger=tensorboard'] + TINY)
    assert result.exit_code != 0 and 'Error: --logger=tensorboard needs the tensorboard package' in result.output
    assert os.listdir(tmp_path) == []


def test_batch_not_divisible_across_processes(first_run, tmp_path, monkeypatch):
    # The check runs before any collective call, so faking a world of 2 processes is enough.
    monkeypatch.setattr(train.dist, 'init', lambda: None)
    monkeypatch.setattr(train.dist, 'get_world_size', lambda: 2)
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--data', first_run['data'],
                                             '--batch=33'] + TINY)
    assert result.exit_code != 0
    assert result.output.strip() == 'Error: --batch=33 is not divisible by the number of processes (2)', (result.stdout, result.stderr, result.exception)
    assert os.listdir(tmp_path) == []


def test_resume_with_other_network_is_refused(first_run, tmp_path):
    before = _folder_digest(first_run['run_dir'])
    args = ['--outdir', str(tmp_path), '--data', first_run['data'], '--cond=1', '--batch=8', '--augment=0.12',
            '--resume', first_run['run_dir']] + TINY + ['--cbase=16']
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code != 0
    last = result.output.strip().splitlines()[-1]
    assert last.startswith('Error: ') and 'does not match this network' in last and '--cbase' in last
    assert 'Traceback' not in result.output
    assert _folder_digest(first_run['run_dir']) == before


def test_fp16_on_a_cpu_says_so_and_names_the_run_fp32(first_run, tmp_path):
    result = _run(['--outdir', str(tmp_path), '--data', first_run['data'], '--batch=8', '--duration=0.000008',
                   '--augment=0', '--fp16=1'] + TINY)
    assert result.exit_code == 0, result.output
    assert 'Note: --precision=fp16 runs the network in float16 on CUDA only' in result.output
    (run_name,) = os.listdir(tmp_path)
    assert run_name == '00000-tiny16-uncond-ddpmpp-edm-gpus1-batch8-fp32'
    with open(tmp_path / run_name / 'training_options.json') as f:  # The request is kept: fp16 where CUDA runs it.
        assert json.load(f)['network_kwargs']['use_fp16'] is True
