"""Fast sampling mode (training/fast_mode.py) on tiny networks, CPU.

Exact mode is the network itself (two guidance passes, cond first); fast mode batches the
passes, runs the U-Net under bf16/fp16 autocast, optionally channels-last and compiled. Fast
images must stay within FAST_TOL_LEVELS uint8 levels of exact ones; every option combination runs.
"""

import itertools
import warnings

import pytest
import torch

from dnnlib import UserError
from training import fast_mode, networks
from training.fast_mode import FastSettings

from training import sampling

# Stated bounds, relay images of the tiny networks below (4 + 8 steps, guidance 2 and 3.5),
# fast vs exact in uint8 levels: (max over pixels, mean). Measured: fp16 2 / 0.11,
# bf16 15 / 0.90, batched guidance alone (fp32) 0 / 0.
TOL_LEVELS = {'fp16': (4, 0.25), 'bf16': (24, 1.5), 'fp32': (1, 0.01)}

#----------------------------------------------------------------------------

def _tiny(res, seed, label_dim=3, attn=True, levels=2):
    torch.manual_seed(seed)
    net = networks.EDMPrecond(img_resolution=res, img_channels=3, label_dim=label_dim, model_type='SongUNet',
                              model_channels=16, channel_mult=[1] * levels, num_blocks=1,
                              attn_resolutions=[res // 2] if attn else [], dropout=0, eff_attn=True)
    with torch.no_grad():  # Zero-initialised output layers would make the denoiser trivial.
        gen = torch.Generator().manual_seed(seed + 100)
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope='module')
def nets():
    return _tiny(8, 1), _tiny(16, 2)


SEEDS = [0, 1, 2]


def _labels(label_dim=3):
    return torch.eye(label_dim)[torch.tensor(SEEDS) % label_dim]


def _relay(first, second, settings, cfg=(2.0, 3.5)):
    f, s = fast_mode.prepare(first, settings), fast_mode.prepare(second, settings)
    rnd = sampling.StackedRandomGenerator('cpu', SEEDS)
    labels = _labels()
    with torch.no_grad():
        x = sampling.edm_sampler(f, rnd.randn([3, 3, 8, 8]), labels, rnd.randn_like, num_steps=4, cfg_scale=cfg[0],
                                 S_churn=0, S_min=0, S_max=float('inf'), S_noise=1)
        x = torch.nn.functional.interpolate(x, size=(16, 16), mode='nearest')
        y = sampling.blur_sampler(s, x, labels, rnd.randn_like, num_steps=8, cfg_scale=cfg[1])
    return y


def _levels(images):
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).to(torch.int16)


@pytest.fixture(scope='module')
def exact_images(nets):
    return _relay(*nets, fast_mode.EXACT)

#----------------------------------------------------------------------------
# Options.

def test_exact_is_default_and_fast_defaults():
    assert fast_mode.settings_from_options() == fast_mode.EXACT and fast_mode.EXACT.exact
    s = fast_mode.settings_from_options(fast=True)
    assert (s.batch_guidance, s.precision, s.tf32, s.channels_last, s.compile) == (True, 'fp16', True, False, False)
    s = fast_mode.settings_from_options(fast=True, precision='bf16', tf32=False, channels_last=True, compile=True)
    assert (s.precision, s.tf32, s.channels_last, s.compile) == ('bf16', False, True, True)
    assert not s.exact and s.describe().startswith('fast (bf16')


@pytest.mark.parametrize('option,kwargs', [('--precision', dict(precision='bf16')), ('--tf32', dict(tf32=True)),
                                           ('--channels-last', dict(channels_last=True)), ('--compile', dict(compile=True))])
def test_fast_options_need_fast(option, kwargs):
    with pytest.raises(UserError, match=f'{option} needs --fast'):
        fast_mode.settings_from_options(fast=False, **kwargs)


def test_bad_precision_is_refused():
    with pytest.raises(UserError, match='--precision must be one of fp32, bf16, fp16'):
        fast_mode.settings_from_options(fast=True, precision='fp8')
    with pytest.raises(UserError, match='precision must be one of'):
        FastSettings(precision='half')

#----------------------------------------------------------------------------
# Exact mode unchanged.

class Recorder(torch.nn.Module):
    """Wraps a network and records (batch size, labels given) per call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []
        self.sigma_min, self.sigma_max, self.round_sigma = net.sigma_min, net.sigma_max, net.round_sigma

    def forward(self, x, sigma, class_labels=None):
        self.calls.append((x.shape[0], None if class_labels is None else class_labels.shape[0]))
        return self.net(x, sigma, class_labels)


def test_exact_mode_is_the_network_itself(nets):
    assert fast_mode.prepare(nets[0], fast_mode.EXACT) is nets[0]
    assert fast_mode.prepare(nets[0], None) is nets[0]


def test_exact_guidance_two_passes_cond_first(nets):
    net = _tiny(8, 5)
    rec = Recorder(net)
    x = torch.randn([3, 3, 8, 8], dtype=torch.float64)
    sigma = torch.tensor(1.5, dtype=torch.float64)
    with torch.no_grad():
        out = sampling.guided_denoise(rec, x, sigma, _labels(), 2.5)
        cond = net(x, sigma, _labels()).to(torch.float64)
        uncond = net(x, sigma, None).to(torch.float64)
    assert rec.calls == [(3, 3), (3, None)]
    assert torch.equal(out, 2.5 * cond - 1.5 * uncond)  # Bit for bit, the reference's formula.


def test_batched_guidance_is_one_pass_of_2n(nets):
    net = _tiny(8, 5)
    fast = fast_mode.prepare(net, FastSettings(batch_guidance=True))
    rec = Recorder(fast)
    rec.batch_guidance = True
    x = torch.randn([3, 3, 8, 8], dtype=torch.float64)
    sigma = torch.tensor(1.5, dtype=torch.float64)
    with torch.no_grad():
        out = sampling.guided_denoise(rec, x, sigma, _labels(), 2.5)  # The samplers' denoiser dispatches.
        assert rec.calls == [(6, 6)]
        ref = 2.5 * net(x, sigma, _labels()).to(torch.float64) - 1.5 * net(x, sigma, None).to(torch.float64)
        rec.calls.clear()
        sampling.guided_denoise(rec, x, sigma, None, 2.5)  # No labels: both passes are one call.
        assert rec.calls == [(3, None)]
        rec.calls.clear()
        sampling.guided_denoise(rec, x, sigma, _labels(), 1.0)  # No guidance: one plain pass.
        assert rec.calls == [(3, 3)]
    assert out.dtype == torch.float64
    assert (out - ref).abs().max() < 1e-5


def test_per_image_sigma_is_batched_too():
    net = _tiny(8, 6)
    fast = fast_mode.prepare(net, FastSettings(batch_guidance=True))
    x = torch.randn([3, 3, 8, 8], dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    with torch.no_grad():
        out = sampling.guided_denoise(fast, x, sigma, _labels(), 2.0)
        ref = 2.0 * net(x, sigma, _labels()).to(torch.float64) - net(x, sigma, None).to(torch.float64)
    assert (out - ref).abs().max() < 1e-5


def test_network_is_not_modified(nets):
    net = _tiny(8, 7)
    net.use_fp16 = True  # As the published checkpoints; on CPU the network stays fp32 anyway.
    model, state = net.model, {k: v.clone() for k, v in net.state_dict().items()}
    fast = fast_mode.prepare(net, fast_mode.settings_from_options(fast=True, channels_last=True))
    with torch.no_grad():
        fast(torch.randn([2, 3, 8, 8]), torch.tensor(1.0), _labels()[:2])
    assert net.model is model and net.use_fp16 is True
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert not any(isinstance(m, fast_mode._Autocast) for m in net.modules())
    # The wrapper answers for the network's attributes.
    assert (fast.img_resolution, fast.label_dim, fast.sigma_min, fast.use_fp16) == (8, 3, 0, True)
    assert torch.equal(fast.round_sigma(torch.tensor(0.3)), torch.tensor(0.3))
    # Parameters are shared, not copied.
    assert {p.data_ptr() for p in fast.parameters()} == {p.data_ptr() for p in net.parameters()}


def test_autocast_reaches_the_unet_but_not_the_preconditioning():
    net = _tiny(8, 8)
    seen = []
    net.model.register_forward_hook(lambda _m, inp, out: seen.append((inp[0].dtype, out.dtype, torch.is_autocast_enabled('cpu'))))
    fast = fast_mode.prepare(net, FastSettings(precision='bf16'))
    with torch.no_grad():
        out = fast(torch.randn([2, 3, 8, 8], dtype=torch.float64), torch.tensor(1.0), _labels()[:2])
    assert seen == [(torch.float32, torch.bfloat16, True)]
    assert out.dtype == torch.float32 and not torch.is_autocast_enabled('cpu')


def test_tf32_flags_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    seen = []
    with fast_mode.tf32_enabled(True):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
    assert seen == [(True, True)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before

@pytest.mark.parametrize('settings, expected', [(fast_mode.EXACT, (False, False)),
                                                (FastSettings(precision='bf16', tf32=False), (False, False)),
                                                (FastSettings(precision='bf16', tf32=True), (True, True))])
def test_tf32_set_explicitly_in_both_modes(nets, settings, expected):
    # From PyTorch's defaults (TF32 matmuls off, convolutions on): exact mode and --no-tf32 turn
    # both off inside the network, --tf32 both on.
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    seen = []
    hook = nets[0].model.register_forward_hook(lambda *_: seen.append((matmul.allow_tf32, cudnn.allow_tf32)))
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = False, True
        fast_mode.prepare(nets[0], settings)(torch.zeros([1, 3, 8, 8]), torch.ones([1]), _labels()[:1])
    finally:
        hook.remove()
        matmul.allow_tf32, cudnn.allow_tf32 = saved
    assert seen == [expected]

#----------------------------------------------------------------------------
# Fast images stay close to exact ones.

@pytest.mark.parametrize('precision', ['fp16', 'bf16', 'fp32'])
def test_fast_relay_within_tolerance(nets, exact_images, precision):
    images = _relay(*nets, fast_mode.settings_from_options(fast=True, precision=precision, channels_last=(precision == 'bf16')))
    diff = (_levels(images) - _levels(exact_images)).abs()
    assert images.dtype == torch.float64 and torch.isfinite(images).all()
    max_levels, mean_levels = TOL_LEVELS[precision]
    assert int(diff.max()) <= max_levels and float(diff.float().mean()) <= mean_levels
    if precision == 'fp32':
        assert (images - exact_images).abs().max() < 1e-4  # Batching alone: float32 round-off.
    else:
        assert (images - exact_images).abs().max() > 1e-4  # Autocast really ran in low precision.


def test_fp16_overflow_is_reported():
    net = _tiny(8, 11)
    with torch.no_grad():
        for p in net.model.parameters():
            p.mul_(1e3)  # Activations far beyond fp16's 65504.
    fast = fast_mode.prepare(net, fast_mode.settings_from_options(fast=True))
    with torch.no_grad(), pytest.raises(FloatingPointError, match='--precision=bf16'):
        fast(torch.randn([2, 3, 8, 8]), torch.tensor(1.0), _labels()[:2])


def test_every_option_combination_runs(nets, monkeypatch):
    # torch.compile is replaced by the identity here (tracing every combination would take
    # minutes); real compilation is tested below.
    monkeypatch.setattr(torch, 'compile', lambda module, backend=None: module)
    net = nets[0]
    x = torch.randn([3, 3, 8, 8], dtype=torch.float64)
    sigma = torch.tensor(0.8, dtype=torch.float64)
    with torch.no_grad():
        ref = sampling.guided_denoise(net, x, sigma, _labels(), 2.0)
        for precision, batch, tf32, channels_last, compile in itertools.product(
                fast_mode.PRECISIONS, [False, True], [False, True], [False, True], [False, True]):
            settings = FastSettings(batch_guidance=batch, precision=precision, tf32=tf32, channels_last=channels_last, compile=compile)
            fast = fast_mode.prepare(net, settings)
            with warnings.catch_warnings():
                warnings.simplefilter('error')  # No compile fallback.
                out = sampling.guided_denoise(fast, x, sigma, _labels(), 2.0)
            assert out.shape == x.shape and out.dtype == torch.float64, settings
            assert (out - ref).abs().max() < 0.05, settings


def test_compiled_network_gives_the_eager_result():
    # Dynamo tracing (backend 'eager': no C++ compiler needed) of the autocast, channels-last U-Net.
    net = _tiny(8, 12, attn=False, levels=1)
    settings = fast_mode.settings_from_options(fast=True, channels_last=True)
    x, sigma, labels = torch.randn([2, 3, 8, 8]), torch.tensor(1.0), _labels()[:2]
    with torch.no_grad():
        eager = fast_mode.prepare(net, settings)(x, sigma, labels)
        compiled = fast_mode.prepare(net, FastSettings(**{**settings.__dict__, 'compile': True, 'compile_backend': 'eager'}))
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            out = compiled(x, sigma, labels)
    assert not compiled.runner.model.failed
    assert (out - eager).abs().max() < 1e-3


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def unavailable(module, backend=None):
        def run(*args, **kwargs):
            raise RuntimeError('no compiler on this machine')
        return run
    monkeypatch.setattr(torch, 'compile', unavailable)
    net = _tiny(8, 9)
    eager = fast_mode.prepare(net, FastSettings(precision='bf16'))
    fast = fast_mode.prepare(net, FastSettings(precision='bf16', compile=True))
    x, sigma = torch.randn([2, 3, 8, 8]), torch.tensor(1.0)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match='torch.compile failed .RuntimeError: no compiler on this machine'):
            out = fast(x, sigma, _labels()[:2])
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            again = fast(x, sigma, _labels()[:2])
        assert torch.equal(out, eager(x, sigma, _labels()[:2])) and torch.equal(again, out)


def test_network_errors_are_not_swallowed_by_the_fallback():
    net = _tiny(8, 10)
    fast = fast_mode.prepare(net, FastSettings(compile=True, compile_backend='eager'))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(RuntimeError):
            fast(torch.randn([2, 5, 8, 8]), torch.tensor(1.0), _labels()[:2])  # Wrong channel count.

#----------------------------------------------------------------------------
# generate.py --fast.

@pytest.fixture(scope='module')
def snapshots(tmp_path_factory, nets):
    from torch_utils import checkpoint
    root = tmp_path_factory.mktemp('fast-cli')
    paths = []
    for name, net in zip(['first.pkl', 'second.pkl'], nets):
        checkpoint.save_snapshot(str(root / name), dict(ema=net))
        paths.append(str(root / name))
    return root, paths


def _generate(root, paths, name, *extra):
    from click.testing import CliRunner
    import generate
    outdir = root / name
    args = ['--outdir', str(outdir), '--seeds=0-2', '--batch=3', f'--network_first={paths[0]}', f'--network_second={paths[1]}',
            '--num_steps_first=4', '--num_steps_second=8', '--cfg_scale_first=2', '--cfg_scale_second=3.5', '--up_scale_second=2',
            '--no-subdirs', *extra]
    result = CliRunner().invoke(generate.main, args)
    return result, outdir


def test_generate_fast_within_tolerance_of_exact(snapshots):
    import numpy as np
    import PIL.Image
    root, paths = snapshots
    exact, exact_dir = _generate(root, paths, 'exact')
    fast, fast_dir = _generate(root, paths, 'fast', '--fast', '--precision=fp16', '--channels-last')
    assert exact.exit_code == 0 and fast.exit_code == 0, exact.output + fast.output
    assert 'sampling mode: exact' in exact.output and 'sampling mode: fast (fp16, batched-guidance, tf32, channels-last)' in fast.output
    for seed in range(3):
        a = np.asarray(PIL.Image.open(exact_dir / f'{seed:06d}.png'), dtype=np.int16)
        b = np.asarray(PIL.Image.open(fast_dir / f'{seed:06d}.png'), dtype=np.int16)
        assert np.abs(a - b).max() <= TOL_LEVELS['fp16'][0]


@pytest.mark.parametrize('args,message', [(['--compile'], '--compile needs --fast'),
                                          (['--precision=bf16'], '--precision needs --fast'),
                                          (['--fast', '--precision=fp8'], "'fp8' is not one of")])
def test_generate_fast_options_are_checked_first(snapshots, args, message):
    root, paths = snapshots
    result, outdir = _generate(root, paths, 'bad', *args)
    assert result.exit_code != 0 and message in result.output
    assert 'Traceback' not in result.output and not outdir.exists()
