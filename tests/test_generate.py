"""Samplers and the relay CLI (generate.py).

Faithfulness: a plain float64 re-statement of the reference's sampling loops (per-block scipy
DCT, the schedule through scipy.stats.norm one step at a time, the 16-roll block noise, the
stacked per-seed generators) must agree with the optimised samplers to ~1e-10, and the relay
pipeline must write the same PNGs. Then: batch size and process count do not change images,
second-only from first-only output, resume, bad input, presets.
"""

import os
import subprocess
import sys

import click
import numpy as np
import PIL.Image
import PIL.ImageEnhance
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import generate
import generate_celebahq
import generate_imagenet
from reference_restatement import RefGenerators, ref_blur, ref_edm
from training import pipeline
from training.pipeline import RelayPipeline
from training.sampling import StackedRandomGenerator, blur_sampler, edm_sampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# A tiny deterministic denoiser with EDMPrecond's interface.

class TinyNet(torch.nn.Module):
    def __init__(self, res, ch=3, label_dim=0, seed=0, bounded=False):
        super().__init__()
        self.bounded = bounded # output 0.8 * tanh(...) only: samples inside [-1, 1]
        self.img_resolution, self.img_channels, self.label_dim = res, ch, label_dim
        self.sigma_min, self.sigma_max, self.sigma_data = 0, float('inf'), 0.5
        gen = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(ch, ch, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.3)
            self.conv.bias.copy_(torch.randn(ch, generator=gen) * 0.1)
        self.emb = torch.nn.Parameter(torch.randn(max(label_dim, 1), ch, generator=gen) * 0.5)
        self.requires_grad_(False)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        h = self.conv(c_in * x) + 0.1 * sigma.log()
        if self.label_dim and class_labels is not None:
            h = h + (class_labels.to(torch.float32) @ self.emb)[:, :, None, None]
        if self.bounded:
            return 0.8 * torch.tanh(h + x)
        return c_skip * x + c_out * torch.tanh(h)

def _labels(seeds, label_dim):
    return torch.eye(label_dim)[torch.as_tensor(seeds) % label_dim] if label_dim else None

#----------------------------------------------------------------------------
# Sampler faithfulness.

def test_stacked_generator_matches_stacked_randn():
    seeds = [0, 7, 2 ** 32 + 7]
    ours, ref = StackedRandomGenerator('cpu', seeds), RefGenerators(seeds)
    for shape, dtype in [((3, 3, 64, 64), torch.float32), ((3, 3, 128, 128), torch.float64), ((3, 5), torch.float64)]:
        assert torch.equal(ours.randn(shape, dtype=dtype), ref.randn(shape, dtype=dtype))
    # Seeds are taken modulo 2^32, as the reference does. The CPU generator would fold 2^32 + 7
    # onto 7 by itself, so look at the seed each generator was given (CUDA's keeps 64 bits), and
    # at a seed that torch cannot take unreduced.
    assert [g.initial_seed() for g in ours.generators] == [0, 7, 7]
    assert torch.equal(StackedRandomGenerator('cpu', [2 ** 64 + 7]).randn([1, 4]), RefGenerators([7]).randn([1, 4]))


@pytest.mark.parametrize('opts,label_dim', [
    (dict(), 0),
    (dict(num_steps=12, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003, cfg_scale=2.0), 5),  # ImageNet style
    (dict(num_steps=10, sde_scale=0.05), 0),                                                   # CelebA-HQ variant
])
def test_edm_sampler_matches_reference(opts, label_dim):
    net = TinyNet(8, label_dim=label_dim)
    seeds = [3, 11]
    labels = _labels(seeds, label_dim)
    rnd, ref = StackedRandomGenerator('cpu', seeds), RefGenerators(seeds)
    ours = edm_sampler(net, rnd.randn([2, 3, 8, 8]), labels, randn_like=rnd.randn_like, **{'num_steps': 18, 'S_churn': 0, 'S_min': 0, 'S_max': float('inf'), 'S_noise': 1, **opts})
    theirs = ref_edm(net, ref.randn([2, 3, 8, 8]), labels, ref.randn_like, **opts)
    assert ours.dtype == torch.float64
    assert (ours - theirs).abs().max() < 1e-10
    # Both consumed the same number of draws: the generators are in the same state.
    assert torch.equal(rnd.randn([2, 4]), ref.randn([2, 4]))


@pytest.mark.parametrize('opts,label_dim', [
    (dict(), 0),                                                                     # generate.py
    (dict(s_block=0), 0),                                                            # no block noise branch
    (dict(num_steps=30, rho=100, cfg_scale=3.5), 4),                                 # ImageNet settings
    (dict(truncation_sigma=0.95, truncation_t=1.05, blur_sigma_max=2.0, S_churn=0), 0),  # CelebA-HQ variant
    (dict(S_churn=10, S_min=0.05, S_max=0.5, S_noise=1.003), 0),                     # churn that moves t_hat
])
def test_blur_sampler_matches_reference(opts, label_dim):
    net = TinyNet(16, label_dim=label_dim, seed=1)
    seeds = [5, 1000]
    labels = _labels(seeds, label_dim)
    low = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    latents = F.interpolate(low, size=(16, 16), mode='nearest')
    rnd, ref = StackedRandomGenerator('cpu', seeds), RefGenerators(seeds)
    kwargs = dict(num_steps=18, truncation_sigma=0.9, truncation_t=0.93, up_scale=4, cfg_scale=1, s_block=0.15, s_noise=0.2, blur_sigma_max=3)
    kwargs.update(opts)
    ours = blur_sampler(net, latents, labels, randn_like=rnd.randn_like, **kwargs)
    theirs = ref_blur(net, latents, labels, ref.randn_like, **kwargs)
    assert (ours - theirs).abs().max() < 1e-10
    assert torch.equal(rnd.randn([2, 4]), ref.randn([2, 4]))


def test_blur_sampler_any_block_size_and_resolution():
    net = TinyNet(12, seed=2)
    latents = torch.zeros(1, 3, 12, 12, dtype=torch.float64)
    rnd, ref = StackedRandomGenerator('cpu', [1]), RefGenerators([1])
    ours = blur_sampler(net, latents, None, randn_like=rnd.randn_like, num_steps=10, up_scale=3)
    theirs = ref_blur(net, latents, None, ref.randn_like, num_steps=10, up_scale=3)
    assert (ours - theirs).abs().max() < 1e-10
    with pytest.raises(ValueError, match='leaves no step'):
        blur_sampler(net, latents, None, num_steps=10, truncation_sigma=1e-6)

#----------------------------------------------------------------------------
# The relay CLI.

def _read_pngs(folder):
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if name.endswith('.png') and name != 'grid.png':
                out[os.path.relpath(os.path.join(root, name), folder)] = np.array(PIL.Image.open(os.path.join(root, name)))
    return out


def _nets(label_dim=0):
    return TinyNet(8, label_dim=label_dim), TinyNet(32, label_dim=label_dim, seed=1)

FAST = dict(num_steps_first=8, num_steps_second=12, verbose=False)


def test_relay_pipeline_writes_the_reference_images(tmp_path):
    net1, net2 = _nets(label_dim=3)
    seeds = [998, 999, 1000, 1001, 1002]
    generate.generate_images(tmp_path, seeds=seeds, network_first=net1, network_second=net2, max_batch_size=2, **FAST)
    images = _read_pngs(tmp_path)
    assert sorted(images) == ['000000/000998.png', '000000/000999.png', '001000/001000.png', '001000/001001.png', '001000/001002.png']
    # The reference main loop for one batch of all five seeds.
    ref = RefGenerators(seeds)
    labels = _labels(seeds, 3)
    x = ref_edm(net1, ref.randn([5, 3, 8, 8]), labels, ref.randn_like, num_steps=8)
    x = ref_blur(net2, F.interpolate(x, 32), labels, ref.randn_like, num_steps=12)
    expect = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for seed, img in zip(seeds, expect):
        assert np.array_equal(images[f'{seed - seed % 1000:06d}/{seed:06d}.png'], img)


def test_relay_trace_matches_generate(tmp_path):
    net1, net2 = _nets(label_dim=3)
    pipe = RelayPipeline(net1, net2, device='cpu', num_steps_first=8, num_steps_second=12)
    trace = {}
    final = pipe.sample([4, 9], trace=trace)
    assert trace['first'].shape == (2, 3, 8, 8) and trace['upsampled'].shape == trace['start'].shape == final.shape == (2, 3, 32, 32)
    assert torch.equal(trace['upsampled'][:, :, ::4, ::4], trace['first'])
    generate.generate_images(tmp_path, seeds=[4, 9], network_first=net1, network_second=net2, **FAST)
    images = _read_pngs(tmp_path)
    pixels = pipe([4, 9]).permute(0, 2, 3, 1).numpy()
    for i, seed in enumerate([4, 9]):
        assert np.array_equal(pixels[i], images[f'000000/{seed:06d}.png'])


def test_same_images_for_any_batch_size(tmp_path):
    net1, net2 = _nets(label_dim=3)
    generate.generate_images(tmp_path / 'a', seeds=range(5), network_first=net1, network_second=net2, max_batch_size=1, **FAST)
    generate.generate_images(tmp_path / 'b', seeds=range(5), network_first=net1, network_second=net2, max_batch_size=4, class_idx=None, **FAST)
    a, b = _read_pngs(tmp_path / 'a'), _read_pngs(tmp_path / 'b')
    assert len(a) == 5 and a.keys() == b.keys()
    assert all(np.array_equal(a[key], b[key]) for key in a)


_TORCHRUN_SCRIPT = '''
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import torch
torch.set_num_threads(1)
import generate
from test_generate import TinyNet
generate.generate_images(sys.argv[1], seeds=range(7), network_first=TinyNet(8, label_dim=3),
    network_second=TinyNet(32, label_dim=3, seed=1), max_batch_size=2, num_steps_first=8, num_steps_second=12, verbose=False)
'''


def test_same_images_for_one_and_two_processes(tmp_path):
    script = tmp_path / 'run.py'
    script.write_text(_TORCHRUN_SCRIPT.format(repo=REPO, tests=os.path.join(REPO, 'tests')))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('CUDA_VISIBLE_DEVICES', None)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script), str(tmp_path / 'two')],
                   check=True, env=env, cwd=REPO, capture_output=True, timeout=120)
    net1, net2 = _nets(label_dim=3)
    generate.generate_images(tmp_path / 'one', seeds=range(7), network_first=net1, network_second=net2, max_batch_size=7, **FAST)
    one, two = _read_pngs(tmp_path / 'one'), _read_pngs(tmp_path / 'two')
    assert len(one) == 7 and one.keys() == two.keys()
    assert all(np.array_equal(one[key], two[key]) for key in one)


def test_second_stage_only_from_first_stage_output(tmp_path):
    net1, net2 = TinyNet(8, bounded=True), TinyNet(32, seed=1, bounded=True)
    seeds = range(4)
    generate.generate_images(tmp_path / 'low', seeds=seeds, sampler_stages='first', network_first=net1, **FAST)
    low = _read_pngs(tmp_path / 'low')
    assert len(low) == 4 and all(img.shape == (8, 8, 3) for img in low.values())
    generate.generate_images(tmp_path / 'high', seeds=seeds, sampler_stages='second', indir=tmp_path / 'low', network_second=net2, **FAST)
    generate.generate_images(tmp_path / 'fresh', seeds=seeds, sampler_stages='second', indir=tmp_path / 'low', network_second=net2, second_noise='fresh', **FAST)
    generate.generate_images(tmp_path / 'both', seeds=seeds, network_first=net1, network_second=net2, **FAST)
    high, fresh, both = _read_pngs(tmp_path / 'high'), _read_pngs(tmp_path / 'fresh'), _read_pngs(tmp_path / 'both')
    assert high.keys() == both.keys() == low.keys()
    assert all(img.shape == (32, 32, 3) for img in high.values())
    # Continuing the generators reproduces the relay of a `both` run up to the 8-bit rounding of
    # the first stage; fresh noise gives different images.
    diff = np.mean([np.abs(high[k].astype(int) - both[k]).mean() for k in high])
    diff_fresh = np.mean([np.abs(fresh[k].astype(int) - both[k]).mean() for k in high])
    assert diff < 2 and diff_fresh > 4 * diff


def test_resume_skips_existing_images(tmp_path):
    net1, net2 = _nets()
    assert generate.generate_images(tmp_path, seeds=range(3), network_first=net1, network_second=net2, **FAST) == [0, 1, 2]
    first = _read_pngs(tmp_path)
    kept = tmp_path / '000000' / '000001.png'
    mtime = os.stat(kept).st_mtime_ns
    os.remove(tmp_path / '000000' / '000002.png')
    done = generate.generate_images(tmp_path, seeds=range(5), network_first=net1, network_second=net2, grid=4, **FAST)
    assert done == [2, 3, 4]
    assert os.stat(kept).st_mtime_ns == mtime
    again = _read_pngs(tmp_path)
    assert len(again) == 5 and np.array_equal(again['000000/000002.png'], first['000000/000002.png'])
    grid = np.array(PIL.Image.open(str(tmp_path) + '-grid.png'))
    assert grid.shape == (64, 64, 3) and np.array_equal(grid[:32, 32:], again['000000/000001.png'])
    assert not [name for name in os.listdir(tmp_path / '000000') if name.endswith('.tmp')]
    assert generate.generate_images(tmp_path, seeds=range(5), network_first=net1, network_second=net2, **FAST) == []

#----------------------------------------------------------------------------
# Bad input: one clear line, nothing written.

def _error(tmp_path, **kwargs):
    import click
    with pytest.raises(click.ClickException) as info:
        generate.generate_images(tmp_path / 'out', **{**FAST, **kwargs})
    assert '\n' not in info.value.message
    assert not (tmp_path / 'out').exists() or not _read_pngs(tmp_path / 'out')
    return info.value.message


def test_bad_input_errors(tmp_path):
    net1, net2 = _nets(label_dim=3)
    assert '--network_second' in _error(tmp_path, network_first=net1)
    assert '--network_first' in _error(tmp_path, network_second=net2)
    assert '--indir' in _error(tmp_path, sampler_stages='second', network_second=net2)
    assert 'out of range' in _error(tmp_path, network_first=net1, network_second=net2, class_idx=3)
    assert 'unconditional' in _error(tmp_path, network_first=TinyNet(8), network_second=TinyNet(32), class_idx=0)
    assert 'x --up_scale_second=4' in _error(tmp_path, network_first=TinyNet(8, label_dim=3), network_second=TinyNet(16, label_dim=3))
    assert 'classes' in _error(tmp_path, network_first=TinyNet(8), network_second=TinyNet(32, label_dim=3))
    (tmp_path / 'file').write_text('keep me')
    with pytest.raises(Exception, match='not a folder'):
        generate.generate_images(tmp_path / 'file', network_first=net1, network_second=net2, **FAST)
    assert (tmp_path / 'file').read_text() == 'keep me'
    # --indir problems.
    indir = tmp_path / 'low'
    generate.generate_images(indir, seeds=[0, 1], sampler_stages='first', network_first=TinyNet(16), **FAST)
    assert 'lacks the first-stage image of seed 2' in _error(tmp_path, seeds=[2], sampler_stages='second', indir=indir, network_second=net2)
    assert 'is 16x16 with 3 channels, but the second stage needs 8x8' in _error(tmp_path, seeds=[0, 1], sampler_stages='second', indir=indir, network_second=net2)
    PIL.Image.new('RGB', (8, 8)).save(indir / '000000' / '000000.png')
    PIL.Image.new('RGB', (8, 6)).save(indir / '000000' / '000001.png')
    assert '000001.png is 8x6 with 3 channels' in _error(tmp_path, seeds=[0, 1], sampler_stages='second', indir=indir, network_second=net2)
    with pytest.raises(Exception, match='must differ'):
        generate.generate_images(indir, seeds=[0], sampler_stages='second', indir=indir, network_second=net2, **FAST)


def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    cases = [
        (['--outdir', str(tmp_path / 'o'), '--sampler_stages=first'], 'needs --network_first'),
        (['--outdir', str(tmp_path / 'o'), '--sampler_stages=second', '--network_second=x.pkl'], 'needs --indir'),
        (['--outdir', str(tmp_path / 'o'), '--seeds=1,x', '--network_first=a.pkl'], 'not a number'),
        (['--outdir', str(tmp_path / 'o'), '--num_steps_first=1'], '--num_steps_first'),
        (['--outdir', str(tmp_path / 'o'), '--sampler_stages=first', f'--network_first={tmp_path / "missing.pkl"}'], 'Cannot load --network_first'),
    ]
    for args, text in cases:
        result = runner.invoke(generate.main, args)
        assert result.exit_code != 0, args
        assert text in result.output, (args, result.output)
        assert 'Traceback' not in result.output
    assert not (tmp_path / 'o').exists() or not _read_pngs(tmp_path / 'o')


def test_cli_end_to_end_with_saved_networks(tmp_path):
    networks = pytest.importorskip('training.networks')
    checkpoint = pytest.importorskip('torch_utils.checkpoint')
    kw = dict(model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)
    torch.manual_seed(0)
    checkpoint.save_snapshot(tmp_path / 'a.pkl', dict(ema=networks.EDMPrecond(img_resolution=8, img_channels=3, **kw)))
    checkpoint.save_snapshot(tmp_path / 'b.pkl', dict(ema=networks.EDMPrecond(img_resolution=16, img_channels=3, **kw)))
    args = ['--outdir', str(tmp_path / 'out'), '--seeds=0-2', '--batch=2', f'--network_first={tmp_path / "a.pkl"}',
            f'--network_second={tmp_path / "b.pkl"}', '--num_steps_first=4', '--num_steps_second=8', '--up_scale_second=2', '--grid=3']
    result = CliRunner().invoke(generate.main, args)
    assert result.exit_code == 0, result.output
    images = _read_pngs(tmp_path / 'out')
    assert len(images) == 3 and all(img.shape == (16, 16, 3) for img in images.values())
    assert (tmp_path / 'out-grid.png').is_file() and not (tmp_path / 'out' / 'grid.png').exists()

#----------------------------------------------------------------------------
# Presets and post-processing.

def _defaults(command):
    ctx = click.Context(command, **command.context_settings)  # A preset's defaults come through click's default_map.
    return {p.name: p.get_default(ctx) for p in command.params}


def test_presets_hold_the_reference_settings():
    base, imnet, celeba = _defaults(generate.main), _defaults(generate_imagenet.main), _defaults(generate_celebahq.main)
    assert (base['seeds'], base['num_steps_first'], base['num_steps_second'], base['postprocess']) == ('0-63', 18, 18, 'none')
    assert (imnet['seeds'], imnet['num_steps_first'], imnet['S_churn_first'], imnet['S_min_first'], imnet['S_max_first'], imnet['S_noise_first']) == ('10000-59999', 256, 40, 0.05, 50, 1.003)
    assert (imnet['num_steps_second'], imnet['rho_second'], imnet['cfg_scale_second'], imnet['blur_sigma_max_second'], imnet['postprocess']) == (200, 100, 3.5, 3, 'imagenet')
    assert (imnet['truncation_sigma_second'], imnet['truncation_t_second'], imnet['s_block_second'], imnet['s_noise_second'], imnet['sde_scale_first'], imnet['S_churn_second']) == (0.9, 0.93, 0.15, 0.2, None, None)
    assert (celeba['seeds'], celeba['num_steps_first'], celeba['sde_scale_first'], celeba['S_churn_first']) == ('80000-109999', 120, 0.05, 0)
    assert (celeba['num_steps_second'], celeba['blur_sigma_max_second'], celeba['truncation_sigma_second'], celeba['truncation_t_second'], celeba['S_churn_second'], celeba['postprocess']) == (150, 2.0, 0.95, 1.05, 0, 'celebahq')


def test_postprocess_matches_pil_enhance_chain(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    for name in ('celebahq', 'imagenet', 'none'):
        pipeline.save_png(pipeline.apply_postprocess(torch.from_numpy(rgb).permute(2, 0, 1)[None], name)[0], tmp_path / f'{name}.png')
    img = PIL.Image.fromarray(rgb)
    expect_c = PIL.ImageEnhance.Color(PIL.ImageEnhance.Brightness(PIL.ImageEnhance.Contrast(img).enhance(0.9)).enhance(1.05)).enhance(0.99)
    assert np.array_equal(np.array(PIL.Image.open(tmp_path / 'celebahq.png')), np.array(expect_c))
    assert np.array_equal(np.array(PIL.Image.open(tmp_path / 'imagenet.png')), np.array(PIL.ImageEnhance.Brightness(img).enhance(1.06)))
    assert np.array_equal(np.array(PIL.Image.open(tmp_path / 'none.png')), rgb)


def test_preset_cli_help_and_postprocess_off(tmp_path):
    result = CliRunner().invoke(generate_celebahq.main, ['--help'])
    assert result.exit_code == 0 and '--postprocess' in result.output and '80000-109999' in result.output
    result = CliRunner().invoke(generate_imagenet.main, ['--help'])
    assert result.exit_code == 0 and '--S_churn' in result.output and '--network_second' in result.output

#----------------------------------------------------------------------------
