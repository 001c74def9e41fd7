"""train.py's option handling: presets equal to the README's commands, --precision with the
reference's --fp16, and one-line errors for every bad number or output folder before any work."""

import os
import re
import shlex

import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--arch=ddpmpp', '--cbase=8', '--cres=1,1', '--workers=0', '--seed=1', '--grid=0']

# README dataset -> the preset that stands for its command.
README_PRESETS = {
    'datasets/imagenet-64x64.zip': ('imagenet64', 64),
    'datasets/imagenet-256x256.zip': ('imagenet256', 256),
    'datasets/celebahq-64x64.zip': ('celebahq64', 64),
    'datasets/celebahq-256x256.zip': ('celebahq256', 256),
}


def _readme_train_commands():
    """Every full `train.py` command in the README's code blocks (without --preset), as argv lists."""
    text = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
        for command in block.replace('\\\n', ' ').splitlines():
            words = shlex.split(command)
            if 'train.py' in words and not any(w.startswith('--preset') for w in words):
                args = words[words.index('train.py') + 1:]
                if any(a.startswith('--data=datasets/') for a in args):
                    commands.append(args)
    return commands


def _resolve(args):
    return train.resolve_options(train.main.make_context('train.py', list(args)))


def _fake_dataset(resolution, labels, size=1000):
    return dnnlib.EasyDict(name='fake', resolution=resolution, max_size=size, has_labels=labels, image_bytes=3 * resolution ** 2)


def test_readme_lists_the_four_paper_runs():
    datas = sorted(next(a for a in args if a.startswith('--data=')) for args in _readme_train_commands())
    assert datas == sorted(f'--data={d}' for d in README_PRESETS)


@pytest.mark.parametrize('readme_args', _readme_train_commands(), ids=lambda args: next(a for a in args if a.startswith('--data=')))
def test_preset_equals_readme_command(readme_args):
    data = next(a for a in readme_args if a.startswith('--data='))[len('--data='):]
    preset, resolution = README_PRESETS[data]
    from_readme = _resolve(readme_args + ['--seed=0'])
    from_preset = _resolve(['--preset', preset, '--outdir=training-runs', f'--data={data}', '--seed=0'])
    assert from_preset.pop('preset') == preset and from_readme.pop('preset') is None
    assert from_preset == from_readme
    # The training loop's arguments agree too (the preset sets every network and loss option).
    dataset = _fake_dataset(resolution, labels=from_readme.cond)
    assert train.setup_training_config(from_preset, dataset) == train.setup_training_config(from_readme, dataset)


def test_explicit_options_override_the_preset():
    opts = _resolve(['--preset=imagenet64', '--outdir=o', '--data=d', '--lr=2e-4', '--precision=bf16', '--batch-gpu=16'])
    assert (opts.lr, opts.precision, opts.fp16, opts.batch_gpu) == (2e-4, 'bf16', False, 16)
    assert (opts.batch, opts.ema, opts.ls, opts.cond, opts.arch) == (4096, 50, 25, True, 'adm')  # Kept from the preset.
    opts = _resolve(['--preset=imagenet256', '--outdir=o', '--data=d', '--fp16=0'])
    assert (opts.precision, opts.fp16, opts.precond, opts.prob_length) == ('fp32', False, 'blur', 0.93)


@pytest.mark.parametrize('args, precision, fp16', [
    ([], 'fp32', False), (['--fp16=1'], 'fp16', True), (['--precision=fp16'], 'fp16', True),
    (['--precision=bf16'], 'bf16', False), (['--fp16=1', '--precision=fp16'], 'fp16', True),
])
def test_precision_and_reference_fp16(args, precision, fp16):
    opts = _resolve(['--outdir=o', '--data=d'] + args)
    assert (opts.precision, opts.fp16) == (precision, fp16)
    c = train.setup_training_config(opts, _fake_dataset(16, labels=False))
    assert c.precision == precision and c.network_kwargs.use_fp16 == fp16


def test_label_dropout_in_network_kwargs():
    opts = _resolve(['--outdir=o', '--data=d', '--cond=1', '--label-dropout=0.1'])
    c = train.setup_training_config(opts, _fake_dataset(64, labels=True))
    assert c.network_kwargs.label_dropout == 0.1
    with torch.device('meta'):  # The ADM network: no memory, no weight initialisation.
        net = dnnlib.util.construct_class_by_name(**c.network_kwargs, img_resolution=64, img_channels=3, label_dim=10)
    assert net.model.label_dropout == 0.1


#----------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing created.

@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    from test_train import _make_dataset
    return _make_dataset(tmp_path_factory.mktemp('opts') / 'tiny16', n=8)


BAD = {
    'lr_nan':              (['--lr=nan'], "'--lr': nan must be a finite number"),
    'lr_inf':              (['--lr=inf'], "'--lr': inf must be a finite number"),
    'lr_negative':         (['--lr=-1'], "'--lr': -1.0 is not in the range 0<x<=1"),
    'lr_text':             (['--lr=fast'], "'--lr': 'fast' is not a number"),
    'duration_zero':       (['--duration=0'], "'--duration': 0.0 is not in the range x>0"),
    'tick_nan':            (['--tick=nan'], "'--tick': nan must be a finite number"),
    'ema_negative':        (['--ema=-1'], "'--ema': -1.0 is not in the range x>=0"),
    'lr_rampup_inf':       (['--lr-rampup=inf'], "'--lr-rampup': inf must be a finite number"),
    'dropout_above_1':     (['--dropout=1.5'], "'--dropout': 1.5 is not in the range 0<=x<=1"),
    'augment_nan':         (['--augment=nan'], "'--augment': nan must be a finite number"),
    'ls_zero':             (['--ls=0'], "'--ls': 0.0 is not in the range x>0"),
    'prob_length_zero':    (['--prob-length=0'], "'--prob-length': 0.0 is not in the range 0.001<=x<=1"),
    'prob_length_above_1': (['--prob-length=1.5'], "'--prob-length': 1.5 is not in the range 0.001<=x<=1"),
    'block_scale_nan':     (['--block-scale=nan'], "'--block-scale': nan must be a finite number"),
    'blur_sigma_inf':      (['--blur-sigma-max=inf'], "'--blur-sigma-max': inf must be a finite number"),
    'seed_negative':       (['--seed=-5'], "'--seed': -5 is not in the range 0<=x<=2147483647"),
    'seed_too_big':        (['--seed=2147483648'], "'--seed': 2147483648 is not in the range 0<=x<=2147483647"),
    'batch_zero':          (['--batch=0'], "'--batch': 0 is not in the range 1<=x<=2147483647"),
    'batch_gpu_zero':      (['--batch-gpu=0'], "'--batch-gpu': 0 is not in the range 1<=x<=2147483647"),
    'cbase_zero':          (['--cbase=0'], "'--cbase': 0 is not in the range 1<=x<=65536"),
    'blocks_zero':         (['--blocks=0'], "'--blocks': 0 is not in the range 1<=x<=100"),
    'snap_zero':           (['--snap=0'], "'--snap': 0 is not in the range x>=1"),
    'dump_negative':       (['--dump=-1'], "'--dump': -1 is not in the range x>=1"),
    'workers_negative':    (['--workers=-1'], "'--workers': -1 is not in the range x>=0"),
    'up_scale_zero':       (['--up-scale=0'], "'--up-scale': 0 is not in the range x>=1"),
    'grid_huge':           (['--grid=100000'], "'--grid': 100000 is not in the range 0<=x<=256"),
    'grid_steps_one':      (['--grid-steps=1'], "'--grid-steps': 1 is not in the range 2<=x<=1000"),
    'cres_zero':           (['--cres=0'], "'--cres': 0: give 1 to 10 comma-separated channel multipliers"),
    'cres_range_bomb':     (['--cres=1-1000000000'], "'--cres': 1-1000000000: give 1 to 10 comma-separated channel multipliers"),
    'cres_too_many':       (['--cres=1,1,1,1,1,1,1,1,1,1,1'], "'--cres': 1,1,1,1,1,1,1,1,1,1,1: give 1 to 10 comma-separated channel multipliers"),
    'levels_for_res':      (['--cres=1,1,1,1,1,1'], '6 resolution levels (--cres / --arch=ddpmpp) are too many for 16 px images: at most 5, as the image halves at every level; give a shorter --cres'),
    'label_dropout_uncond': (['--label-dropout=0.1'], '--label-dropout=0.1 drops class labels: it needs --cond=1'),
    'label_dropout_nan':   (['--label-dropout=nan', '--cond=1'], "'--label-dropout': nan must be a finite number"),
    'fp16_vs_bf16':        (['--fp16=1', '--precision=bf16'], '--fp16=1 and --precision=bf16 disagree; give only --precision=bf16'),
    'wandb_project_alone': (['--wandb-project=p'], '--wandb-project is for --logger=wandb (got --logger=none)'),
    # Finite but beyond what trains: every loss non-finite (probed: --lr=100, 1e6, 1e30; --blur-sigma-max=1e30, 1e300;
    # --prob-length=1e-300), or a batch no machine holds.
    'lr_huge':             (['--lr=100'], "'--lr': 100.0 is not in the range 0<x<=1"),
    'lr_overflow':         (['--lr=1e300'], "'--lr': 1e+300 is not in the range 0<x<=1"),
    'blur_sigma_huge':     (['--blur-sigma-max=1e30'], "'--blur-sigma-max': 1e+30 is not in the range 0<=x<=1000"),
    'prob_length_tiny':    (['--prob-length=1e-300'], "'--prob-length': 1e-300 is not in the range 0.001<=x<=1"),
    'batch_above_int64':   (['--batch=99999999999999999999999'], "'--batch': 99999999999999999999999 is not in the range"),
    'batch_float':         (['--batch=1e12'], "'--batch': '1e12' is not a valid integer"),
    'blocks_huge':         (['--blocks=100000'], "'--blocks': 100000 is not in the range 1<=x<=100"),
    'desc_path':           (['--desc=../../escaped'], "--desc='../../escaped': use letters, digits and . _ + = - only"),
    'desc_slash':          (['--desc=a/b'], "--desc='a/b': use letters"),
    'batch_trillion':      (['--batch=1000000000000'], "'--batch': 1000000000000 is not in the range 1<=x<=2147483647"),
    'batch_two_billion':   (['--batch=2000000000'], '2000000000 images per accumulation round need about'),
    'batch_4096_adm_cpu':  (['--batch=4096', '--arch=adm', '--cbase=192', '--cres=1,2,3,4'], 'set --batch-gpu='),
    'cbase_huge':          (['--cbase=60000'], 'choose a smaller network (--cbase, --cres, --blocks)'),
    'cres_unsplittable':   (['--cres=9999,9999'], 'this network (--arch/--cbase/--cres/--blocks) cannot run: '),
}


@pytest.mark.parametrize('case', list(BAD))
def test_bad_number_is_one_line_before_any_work(tiny_data, tmp_path, case):
    args, message = BAD[case]
    outdir = tmp_path / 'runs'
    result = CliRunner().invoke(train.main, ['--outdir', str(outdir), '--data', tiny_data] + TINY + args)
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('Error: '), result.output
    assert message in lines[0], lines[0]
    assert not outdir.exists() and os.listdir(tmp_path) == []


def test_outdir_is_a_file(tiny_data, tmp_path):
    target = tmp_path / 'runs'
    target.write_text('keep me')
    for outdir, message in [(target, 'is a file, not a folder'), (target / 'sub', 'cannot be created')]:
        result = CliRunner().invoke(train.main, ['--outdir', str(outdir), '--data', tiny_data] + TINY)
        assert result.exit_code != 0 and result.output.count('\n') == 1, result.output
        assert result.output.startswith('Error: --outdir=') and message in result.output
    assert target.read_text() == 'keep me' and os.listdir(tmp_path) == ['runs']


def test_outdir_unwritable(tiny_data, tmp_path):
    if os.geteuid() != 0:
        folder = tmp_path / 'readonly'
        folder.mkdir()
        folder.chmod(0o500)
        outdir = str(folder / 'runs')
    elif os.path.isdir('/proc/self'):
        outdir = '/proc/self/train-runs'  # Not writable even for root.
    else:
        pytest.skip('no folder here is read-only for this user')
    result = CliRunner().invoke(train.main, ['--outdir', outdir, '--data', tiny_data] + TINY)
    assert result.exit_code != 0 and result.output.count('\n') == 1, result.output
    assert result.output.startswith(f'Error: --outdir={outdir}: cannot write in') and 'choose a writable folder' in result.output


def test_max_levels():
    assert [train.max_levels(r) for r in (16, 64, 256, 48, 7)] == [5, 7, 9, 5, 1]


@pytest.mark.parametrize('size, resolution, workers, procs, args, cached', [
    (50_000, 32, 1, 1, [], True),                   # CIFAR-10: 150 MB.
    (1_281_167, 64, 1, 8, [], False),                # ImageNet 64 on 8 GPUs: 8 copies of 15.7 GB.
    (1_281_167, 64, 1, 1, [], True),                 # ... one process, one worker: 15.7 GB of 64.
    (1_281_167, 64, 2, 1, [], False),                # ... two workers: 31.5 GB.
    (1_281_167, 256, 1, 1, [], False),               # ImageNet 256: 252 GB.
    (1_281_167, 256, 1, 1, ['--cache=1'], True),     # Asked for.
    (50_000, 32, 1, 1, ['--cache=false'], False),
])
def test_cache_default_fits_the_node(monkeypatch, size, resolution, workers, procs, args, cached):
    monkeypatch.setattr(train.psutil, 'virtual_memory', lambda: dnnlib.EasyDict(total=64 * 2**30))
    monkeypatch.setenv('LOCAL_WORLD_SIZE', str(procs))
    opts = _resolve(['--outdir=o', '--data=d', f'--workers={workers}', f'--batch={8 * procs}'] + args)
    c = train.setup_training_config(opts, _fake_dataset(resolution, labels=False, size=size), world=procs)
    assert c.dataset_kwargs.cache is cached


def test_cache_option_values():
    assert _resolve(['--outdir=o', '--data=d']).cache is None
    assert _resolve(['--outdir=o', '--data=d', '--cache=AUTO']).cache is None
    with pytest.raises(Exception, match="'maybe' is not a valid boolean"):
        _resolve(['--outdir=o', '--data=d', '--cache=maybe'])


@pytest.mark.parametrize('where', ['equal', 'inside', 'dotdot', 'symlink'])
def test_outdir_in_data_is_refused(tiny_data, tmp_path, where):
    import shutil
    data = shutil.copytree(tiny_data, tmp_path / 'data')
    os.symlink(data, tmp_path / 'link')
    outdir = {'equal': data, 'inside': data / 'runs', 'dotdot': data / 'x' / '..', 'symlink': tmp_path / 'link' / 'runs'}[where]
    before = sorted(os.listdir(data))
    for extra in ([], ['--nosubdir']):
        result = CliRunner().invoke(train.main, ['--outdir', str(outdir), '--data', str(data)] + TINY + extra)
        assert result.exit_code != 0 and result.output.count('\n') == 1, result.output
        assert result.output.startswith(f'Error: --outdir={outdir} is --data or inside it')
    assert sorted(os.listdir(data)) == before
    # Beside or above the dataset is fine.
    for outdir in (tmp_path / 'runs', tmp_path):
        result = CliRunner().invoke(train.main, ['--outdir', str(outdir), '--data', str(data), '--dry-run'] + TINY)
        assert result.exit_code == 0, result.output


def test_workers_capped_by_cores(monkeypatch):
    monkeypatch.setattr(os, 'cpu_count', lambda: 4)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    for asked, expected in [(0, 0), (1, 1), (2, 2), (64, 2)]:
        opts = _resolve(['--outdir=o', '--data=d', f'--workers={asked}', '--batch=8'])
        c = train.setup_training_config(opts, _fake_dataset(16, labels=False), world=2)
        assert c.data_loader_kwargs.num_workers == expected


def test_activation_bytes_counts_what_backward_keeps():
    # conv -> SiLU -> conv keeps conv1's input, SiLU's input and conv2's input: 3 + 8 + 8 channels
    # of float32 per pixel; the weights are not counted. The same on the meta device.
    import torch
    from torch_utils import misc
    torch.manual_seed(0)
    for device in ('cpu', 'meta'):
        with torch.device(device):
            net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 3, padding=1))
            assert misc.activation_bytes(net, torch.zeros([5, 3, 6, 7])) == 4 * 5 * 6 * 7 * (3 + 8 + 8)


def test_dry_run_notes_a_batch_that_does_not_fit(tiny_data, tmp_path):
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'runs'), '--data', tiny_data, '--dry-run'] + TINY
                                + ['--batch=2000000000'])
    assert result.exit_code == 0, result.output
    assert 'Note: 2000000000 images per accumulation round need about' in result.output and 'Dry run; exiting.' in result.output
    assert not (tmp_path / 'runs').exists()


def test_float_options_are_floats_in_the_config():
    # training_options.json (and a snapshot's network arguments) hold float options as floats,
    # 0.0 rather than 0, whether they come from a default, a preset's integer or the command line.
    for args in (['--precond=blur'], ['--preset=imagenet64'], ['--ls=3', '--label-dropout=0', '--cond=1']):
        c = train.setup_training_config(_resolve(['--outdir=o', '--data=d', *args]), _fake_dataset(16, labels=True), world=1)
        floats = [c.loss_scaling, c.lr_rampup_kimg, c.total_kimg, c.network_kwargs.label_dropout, c.network_kwargs.dropout,
                  *[v for k, v in c.loss_kwargs.items() if k != 'class_name' and k != 'up_scale']]
        assert all(type(v) is float for v in floats), (args, floats)
