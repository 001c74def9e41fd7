"""Bad input to the relay CLI and API: one clear line, non-zero exit, nothing written."""

import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import generate
from training.pipeline import RelayPipeline
from dnnlib import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def ckpts(tiny_relay_checkpoints):
    return tiny_relay_checkpoints


def _fails(args, text, outdir):
    result = CliRunner().invoke(generate.main, ['--outdir', str(outdir), *args])
    assert result.exit_code != 0, (args, result.output)
    assert text in result.output, (args, result.output)
    assert 'Traceback' not in result.output and isinstance(result.exception, (SystemExit, type(None)))
    assert not os.path.isdir(outdir) or not any(name.endswith('.png') for _r, _d, files in os.walk(outdir) for name in files)


@pytest.mark.parametrize('option,text', [
    ('--rho_first=nan', "'--rho_first': nan must be a finite number"),
    ('--sigma_max_first=inf', "'--sigma_max_first': inf must be a finite number"),
    ('--sigma_min_first=100', '--sigma_min_first=100.0 must be below --sigma_max_first=80'),
    ('--sigma_min_second=80', '--sigma_min_second=80.0 must be below --sigma_max_second=80'),
    ('--cfg_scale_second=nan', "'--cfg_scale_second': nan must be a finite number"),
    ('--S_noise=nan', "'--S_noise': nan must be a finite number"),
    ('--S_max=nan', "'--S_max': nan must be a finite number"),
    ('--S_min=10', '--S_min=10.0 must be at most --S_max=5.0'),
    ('--truncation_t_second=nan', "'--truncation_t_second': nan must be"),
    ('--S_churn_second=inf', "'--S_churn_second': inf must be a finite number"),
    ('--num_steps_first=1', "'--num_steps_first': 1 is not in the range 2<=x<=1000000."),  # Whole numbers stay whole.
    ('--num_steps_second=True', "'--num_steps_second': 'True' is not a number"),
    ('--seeds=0-99999999999', 'more than 10,000,000 seeds'),
    ('--seeds=9-3', 'empty range'),
])
def test_numeric_options_are_checked_before_any_work(tmp_path, option, text):
    # The networks do not exist: the options are refused before anything is loaded.
    args = [option, '--network_first=missing1.pkl', '--network_second=missing2.pkl']
    if option.startswith('--S_min='):
        args.append('--S_max=5')
    _fails(args, text, tmp_path / 'out')


def test_truncation_that_leaves_no_step(tmp_path, ckpts):
    _fails(['--seeds=0', f'--network_first={ckpts[0]}', f'--network_second={ckpts[1]}', '--truncation_sigma_second=0.0001'],
           'leaves no step of the noise schedule', tmp_path / 'out')


def test_networks_of_the_wrong_stage_are_refused(tmp_path, ckpts):
    _fails(['--seeds=0', f'--network_first={ckpts[1]}', f'--network_second={ckpts[1]}'],
           'is a second-stage checkpoint (trained with BlurLoss); pass it as --network_second', tmp_path / 'out')


def test_outdir_that_is_a_file_or_below_a_file(tmp_path, ckpts):
    (tmp_path / 'file').write_text('keep')
    args = ['--seeds=0', f'--network_first={ckpts[0]}', f'--network_second={ckpts[1]}']
    _fails(args, 'is a file, not a folder', tmp_path / 'file')
    _fails(args, 'cannot be created', tmp_path / 'file' / 'sub')
    assert (tmp_path / 'file').read_text() == 'keep'


@pytest.mark.skipif(os.name != 'posix' or os.geteuid() == 0, reason='root writes into read-only folders')
def test_read_only_outdir(tmp_path, ckpts):
    ro = tmp_path / 'ro'
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _fails(['--seeds=0', f'--network_first={ckpts[0]}', f'--network_second={ckpts[1]}'], 'is not writable', ro / 'out')
    finally:
        ro.chmod(0o755)


def test_text_file_named_png_in_indir(tmp_path, ckpts):
    (tmp_path / 'low').mkdir()
    (tmp_path / 'low' / '000000.png').write_text('not an image')
    _fails(['--seeds=0', '--sampler_stages=second', f'--indir={tmp_path / "low"}', f'--network_second={ckpts[1]}'],
           'is not a readable image', tmp_path / 'out')


class NanNet(torch.nn.Module):
    img_resolution, img_channels, label_dim, sigma_min, sigma_max = 8, 3, 0, 0, float('inf')

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        return x * float('nan')


def test_non_finite_samples_are_not_written(tmp_path):
    with pytest.raises(UserError, match='non-finite'):
        RelayPipeline(NanNet(), None, device='cpu', num_steps_first=2)([0, 1])
    with pytest.raises(Exception, match='non-finite') as info:
        generate.generate_images(tmp_path / 'out', seeds=[0], sampler_stages='first', network_first=NanNet(),
                                 num_steps_first=2, verbose=False)
    assert '\n' not in str(info.value)
    assert not any(name.endswith('.png') for _r, _d, files in os.walk(tmp_path / 'out') for name in files)


def test_api_rejects_bad_options_before_loading():
    with pytest.raises(UserError, match='--num_steps_second: 1.5 must be a whole number'):
        RelayPipeline('missing.pkl', None, num_steps_second=1.5)
    with pytest.raises(UserError, match='unknown sampler option'):
        RelayPipeline('missing.pkl', None, num_step_first=4)
    with pytest.raises(UserError, match='Cannot load --network_first "missing.pkl"'):
        RelayPipeline('missing.pkl', None)


def test_quickstart_outdir_that_is_a_file(tmp_path):
    (tmp_path / 'file').write_text('keep')
    result = subprocess.run([sys.executable, 'quickstart.py', f'--outdir={tmp_path / "file"}'], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and 'is a file, not a folder' in result.stderr and 'Traceback' not in result.stderr
    assert (tmp_path / 'file').read_text() == 'keep'
