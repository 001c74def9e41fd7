"""Training features beyond the reference: label dropout for classifier-free guidance, sample
grids while training (without touching the training's random draws), the Weights & Biases
tracker, and bf16 autocast (with fp32 unchanged)."""

import importlib.util
import json
import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import training
import dnnlib
import train
from torch_utils import checkpoint
from training import networks, sample_grid, sampling, training_loop
from test_train import _make_dataset

TINY = ['--arch=ddpmpp', '--cbase=8', '--cres=1,1', '--workers=0', '--seed=1', '--lr-rampup=0', '--augment=0']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return _make_dataset(tmp_path_factory.mktemp('feat') / 'tiny16', n=32)


def _train(outdir, data, *args):
    result = CliRunner().invoke(train.main, ['--outdir', str(outdir), '--data', data, '--batch=8', '--tick=0.008',
                                             '--snap=1', '--dump=1000'] + TINY + list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = os.listdir(outdir)
    return os.path.join(outdir, run)


def _latest(run_dir, prefix):
    return os.path.join(run_dir, sorted(name for name in os.listdir(run_dir) if name.startswith(prefix))[-1])


def _weights(run_dir):
    snap = training.load_checkpoint(_latest(run_dir, 'network-snapshot-'))
    return {name: p.detach().clone() for name, p in snap['ema'].named_parameters()}


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

#----------------------------------------------------------------------------
# Label dropout.

@pytest.mark.parametrize('p', [0, 0.5])
def test_label_dropout_rate(data, tmp_path, monkeypatch, p):
    # Count the label rows that reach the label embedding in training forwards (one-hot labels:
    # a dropped label is an all-zero row).
    seen = []
    original = networks.Linear.forward

    def counting_forward(self, x):
        if self.in_features == 4 and torch.is_grad_enabled() and x.device.type != 'meta':  # map_label, 4 classes; not train.py's memory estimate.
            seen.append((x.abs().sum(dim=1) == 0).cpu())
        return original(self, x)

    monkeypatch.setattr(networks.Linear, 'forward', counting_forward)
    run_dir = _train(tmp_path, data, '--cond=1', f'--label-dropout={p}', '--duration=0.000192', '--snap=100', '--grid=0')
    dropped = torch.cat(seen)
    assert len(dropped) == 192  # 24 steps of 8 images.
    rate = dropped.float().mean().item()
    if p == 0:
        assert rate == 0
    else:
        assert 0.35 < rate < 0.65, rate  # 192 draws of p = 0.5: std 0.036.
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        assert json.load(f)['network_kwargs']['label_dropout'] == p
    ema = training.load_checkpoint(_latest(run_dir, 'network-snapshot-'))['ema']
    assert ema.model.label_dropout == p and ema.init_kwargs['label_dropout'] == p

    if p > 0:
        # Guidance then changes the sample: cfg_scale > 1 mixes in the empty-label prediction.
        latents = torch.randn([2, 3, 16, 16], generator=torch.Generator().manual_seed(0))
        labels = torch.eye(4)[:2]
        with torch.no_grad():
            plain = sampling.edm_sampler(ema, latents, labels, num_steps=4, S_churn=0)
            guided = sampling.edm_sampler(ema, latents, labels, num_steps=4, S_churn=0, cfg_scale=3)
        assert torch.isfinite(guided).all() and (plain - guided).abs().max() > 1e-4

#----------------------------------------------------------------------------
# Sample grids.

def test_grids_do_not_change_training(data, tmp_path):
    off = _train(tmp_path / 'off', data, '--cond=1', '--duration=0.000024', '--grid=0')
    on = _train(tmp_path / 'on', data, '--cond=1', '--duration=0.000024', '--grid=4', '--grid-steps=3')
    _assert_identical(_weights(off), _weights(on))
    assert not any(name.startswith('samples-') for name in os.listdir(off))
    grids = sorted(name for name in os.listdir(on) if name.startswith('samples-'))
    assert grids == ['samples-000000_008.png', 'samples-000000_016.png', 'samples-000000_024.png']
    with PIL.Image.open(os.path.join(on, grids[-1])) as img:
        assert img.size == (32, 32) and img.mode == 'RGB'  # 4 images of 16 px, 2 x 2.
    # Same seeds each time: the grid of the final EMA is what SampleGrid draws from it again.
    ema = training.load_checkpoint(_latest(on, 'network-snapshot-'))['ema']
    grid = sample_grid.SampleGrid(dnnlib.util.construct_class_by_name(class_name='training.dataset.ImageFolderDataset',
                                                                      path=data, use_labels=True),
                                  dict(class_name='training.loss.EDMLoss'), num_images=4, num_steps=3)
    assert np.array_equal(grid.sample(ema), np.asarray(PIL.Image.open(os.path.join(on, grids[-1]))))


def test_relay_grid_from_real_images_keeps_random_state(data):
    dataset = dnnlib.util.construct_class_by_name(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True)
    net = networks.EDMPrecond(img_resolution=16, img_channels=3, label_dim=4, model_type='SongUNet',
                              model_channels=8, channel_mult=[1, 1]).eval()
    loss_kwargs = dict(class_name='training.loss.BlurLoss', up_scale=4, prob_length=0.93, blur_sigma_max=3, block_scale=0.15)
    grid = sample_grid.SampleGrid(dataset, loss_kwargs, num_images=4, num_steps=8)
    torch.manual_seed(123)
    np.random.seed(7)
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    first, second = grid.sample(net), grid.sample(net)
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert first.shape == (64, 32, 3) and np.array_equal(first, second)
    # Top half: the dataset images (evenly spaced indices), 4x4 block means upsampled back.
    real = torch.as_tensor(np.stack([dataset[int(i)][0] for i in np.linspace(0, len(dataset) - 1, 4).round()]))
    low = torch.nn.functional.avg_pool2d(real.float() / 127.5 - 1, 4)
    expected = sample_grid.tile(sample_grid.to_uint8(torch.nn.functional.interpolate(low, scale_factor=4, mode='nearest')))
    assert np.array_equal(first[:32], expected)
    assert not np.array_equal(first[32:], first[:32])


#----------------------------------------------------------------------------
# Weights & Biases, through a stand-in module that records its calls.

FAKE_WANDB = '''
calls = []

class Image:
    def __init__(self, data, caption=None):
        import numpy
        self.data = numpy.asarray(data)

class _Run:
    def log(self, values, step=None):
        calls.append(('log', values, step))
    def finish(self):
        calls.append(('finish',))

def init(**kwargs):
    calls.append(('init', kwargs))
    return _Run()
'''


def test_wandb_logger_records_scalars_options_and_grids(data, tmp_path, monkeypatch):
    fake_dir = tmp_path / 'fake'
    fake_dir.mkdir()
    (fake_dir / 'wandb.py').write_text(FAKE_WANDB)
    monkeypatch.syspath_prepend(str(fake_dir))
    assert 'wandb' not in sys.modules
    try:
        run_dir = _train(tmp_path / 'runs', data, '--duration=0.000016', '--grid=4', '--grid-steps=2', '--logger=wandb',
                         '--wandb-project=rdm-test', '--exp-name=tiny', '--exp-tag=ci')
        calls = sys.modules['wandb'].calls
    finally:
        sys.modules.pop('wandb', None)  # The stand-in must not outlive this test.
    assert calls[0][0] == 'init' and calls[-1] == ('finish',)
    init = calls[0][1]
    assert (init['project'], init['name'], init['tags'], init['dir']) == ('rdm-test', 'tiny', ['ci'], run_dir)
    assert init['config']['batch_size'] == 8 and init['config']['network_kwargs']['model_channels'] == 8
    assert init['config']['sample_grid_kwargs'] == dict(num_images=4, num_steps=2, seed=0)
    logs = [c for c in calls if c[0] == 'log']
    scalars = [values for _, values, _ in logs if 'Loss/loss' in values]
    images = [(values['samples'], step) for _, values, step in logs if 'samples' in values]
    assert len(scalars) == 2 and all(np.isfinite(v['Loss/loss']) for v in scalars)
    assert [step for _, step in images] == [8, 16]
    with PIL.Image.open(os.path.join(run_dir, 'samples-000000_016.png')) as img:
        assert np.array_equal(images[-1][0].data, np.asarray(img))


def test_missing_wandb_is_one_line(data, tmp_path):
    if importlib.util.find_spec('wandb') is not None:
        pytest.skip('wandb is installed')
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'runs'), '--data', data, '--logger=wandb',
                                             '--duration=0.000008'] + TINY)
    assert result.exit_code != 0
    assert result.output == 'Error: --logger=wandb needs the wandb package: pip install wandb\n'
    assert os.listdir(tmp_path) == []

#----------------------------------------------------------------------------
# Precision.

def test_explicit_fp32_is_the_default_path(data, tmp_path):
    default = _train(tmp_path / 'default', data, '--cond=1', '--duration=0.000016', '--grid=0')
    for i, extra in enumerate([['--precision=fp32'], ['--fp16=0', '--precision=fp32']]):
        explicit = _train(tmp_path / f'explicit{i}', data, '--cond=1', '--duration=0.000016', '--grid=0', *extra)
        _assert_identical(_weights(default), _weights(explicit))
    with open(os.path.join(default, 'training_options.json')) as f:
        assert json.load(f)['precision'] == 'fp32'


def _fixed_batch_loss(net, images):
    # EDM loss of `net` on fixed images with fixed noise, evaluated in fp32.
    from training.loss import EDMLoss
    torch.manual_seed(0)
    with torch.no_grad():
        return EDMLoss()(net=net.eval(), images=images).mean().item()


def test_bf16_trains(data, tmp_path, monkeypatch):
    dtypes = set()
    original = networks.Conv2d.forward

    def recording_forward(self, x):
        out = original(self, x)
        if torch.is_grad_enabled():
            dtypes.add(out.dtype)
        return out

    monkeypatch.setattr(networks.Conv2d, 'forward', recording_forward)
    dataset_kwargs = dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=False)
    common = dict(dataset_kwargs=dataset_kwargs, data_loader_kwargs=dict(num_workers=0),
                  network_kwargs=dict(class_name='training.networks.EDMPrecond', model_type='SongUNet',
                                      model_channels=8, channel_mult=[1, 1], dropout=0),
                  loss_kwargs=dict(class_name='training.loss.EDMLoss'),
                  optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=3e-3, betas=[0.9, 0.999], eps=1e-8),
                  seed=1, batch_size=8, lr_rampup_kimg=0, kimg_per_tick=1, snapshot_ticks=None,
                  state_dump_ticks=None, precision='bf16', progress_bar=False, device='cpu')
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    start = training_loop.training_loop(run_dir=str(tmp_path / 'a'), total_kimg=0.008, **common)
    end = training_loop.training_loop(run_dir=str(tmp_path / 'b'), total_kimg=0.008 * 30, **common)
    assert dtypes == {torch.bfloat16}  # The convolutions ran under bf16 autocast.
    assert all(p.dtype == torch.float32 for p in end['net'].parameters())  # Weights stay fp32.
    dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    images = torch.as_tensor(np.stack([dataset[i][0] for i in range(32)])).float() / 127.5 - 1
    before, after = _fixed_batch_loss(start['net'], images), _fixed_batch_loss(end['net'], images)
    assert np.isfinite(before) and np.isfinite(after) and after < 0.9 * before, (before, after)
    with open(tmp_path / 'b' / 'stats.jsonl') as f:
        assert all(np.isfinite(json.loads(line)['Loss/loss']['mean']) for line in f)


def test_bf16_autocasts_only_the_unet(data, tmp_path, monkeypatch):
    # Augmentation, blur and noise stay float32 (the noisy input float64, as BlurLoss's sigma is
    # float64 in the reference); the U-Net's convolutions run in bf16.
    from training import blurring
    seen = dict(inputs=set(), blurred=set(), noise=set(), convs=set())
    precond_forward, conv_forward, randn_like, blur = networks.EDMPrecond.forward, networks.Conv2d.forward, torch.randn_like, blurring.blur

    def recording_precond(self, x, sigma, *args, **kwargs):
        if torch.is_grad_enabled():
            seen['inputs'] |= {x.dtype, sigma.dtype}
        return precond_forward(self, x, sigma, *args, **kwargs)

    def recording_conv(self, x):
        out = conv_forward(self, x)
        if torch.is_grad_enabled():
            seen['convs'].add(out.dtype)
        return out

    def recording(name, fn):
        def record(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen[name].add(out.dtype)
            return out
        return record

    monkeypatch.setattr(networks.EDMPrecond, 'forward', recording_precond)
    monkeypatch.setattr(networks.Conv2d, 'forward', recording_conv)
    monkeypatch.setattr(torch, 'randn_like', recording('noise', randn_like))
    monkeypatch.setattr(blurring, 'blur', recording('blurred', blur))
    training_loop.training_loop(
        run_dir=str(tmp_path), dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data),
        data_loader_kwargs=dict(num_workers=0), network_kwargs=dict(class_name='training.networks.EDMPrecond',
        model_type='SongUNet', model_channels=8, channel_mult=[1, 1], augment_dim=9),
        loss_kwargs=dict(class_name='training.loss.BlurLoss', up_scale=4, block_scale=0.15),
        augment_kwargs=dict(class_name='training.augment.AugmentPipe', p=1, xflip=1e8, yflip=1, scale=1, rotate_frac=1,
                            aniso=1, translate_frac=1),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3), batch_size=4, total_kimg=0.004, kimg_per_tick=1,
        snapshot_ticks=None, state_dump_ticks=None, precision='bf16', progress_bar=False, device='cpu')
    assert seen == dict(inputs={torch.float64}, blurred={torch.float32}, noise={torch.float32}, convs={torch.bfloat16}), seen


def test_bf16_sample_grid_runs_in_bf16(data, monkeypatch):
    convs = []
    original = networks.Conv2d.forward
    monkeypatch.setattr(networks.Conv2d, 'forward', lambda self, x: convs.append(original(self, x).dtype) or original(self, x))
    dataset = dnnlib.util.construct_class_by_name(class_name='training.dataset.ImageFolderDataset', path=data)
    net = networks.EDMPrecond(img_resolution=16, img_channels=3, model_type='SongUNet', model_channels=8, channel_mult=[1]).eval()
    for precision, dtype in [('bf16', torch.bfloat16), ('fp32', torch.float32)]:
        convs.clear()
        grid = sample_grid.SampleGrid(dataset, dict(class_name='training.loss.EDMLoss'), num_images=2, num_steps=2,
                                      precision=precision).sample(net)
        assert set(convs) == {dtype} and grid.shape == (16, 32, 3)  # 2 images side by side.


def test_grid_of_a_dataset_with_class_99999_builds_no_identity_matrix(tmp_path, monkeypatch):
    # label_dim 100000: the grid's labels are 16 one-hot rows, not rows of torch.eye(100000) (40 GB).
    data = _make_dataset(tmp_path / 'classes', n=4)
    with open(os.path.join(data, 'dataset.json')) as f:
        labels = json.load(f)
    labels['labels'][0][1] = 99999
    with open(os.path.join(data, 'dataset.json'), 'w') as f:
        json.dump(labels, f)
    eye = torch.eye
    monkeypatch.setattr(torch, 'eye', lambda n, *args, **kwargs: eye(n, *args, **kwargs) if n <= 1000 else pytest.fail(f'torch.eye({n})'))
    dataset = dnnlib.util.construct_class_by_name(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True)
    net = networks.EDMPrecond(img_resolution=16, img_channels=3, label_dim=dataset.label_dim, model_type='SongUNet',
                              model_channels=8, channel_mult=[1]).eval()
    seen = []
    original = net.model.map_label.forward
    monkeypatch.setattr(net.model.map_label, 'forward', lambda x: seen.append(x.clone()) or original(x))
    grid = sample_grid.SampleGrid(dataset, dict(class_name='training.loss.EDMLoss'), num_images=3, num_steps=2, seed=99998).sample(net)
    assert grid.shape == (32, 32, 3) and dataset.label_dim == 100000
    # One-hot seed % label_dim, as generate.py (the U-Net scales the rows by sqrt(label_dim)).
    assert seen and all(labels.nonzero().tolist() == [[0, 99998], [1, 99999], [2, 0]] for labels in seen)
