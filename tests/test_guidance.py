"""Autoguidance (a guide network) and the guidance interval, in both samplers and every entry point.

The first stage with a guide must give NVlabs/edm2's edm_sampler (restated in
reference_restatement.ref_edm2, checked once against edm2's own code): bit for bit where the
weight makes both formulas exact, within float64 rounding otherwise (edm2 mixes with
guide.lerp(main, w), we with the reference's w * main - (w - 1) * guide). The interval must
guide exactly at the levels in (LO, HI], and without the options nothing changes.
"""

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import generate
from dnnlib import UserError
from reference_restatement import RefGenerators, ref_edm2
from test_generate import FAST, TinyNet, _read_pngs
from test_pipeline import TINY, _net, _save
from training import fast_mode, loss, networks, pipeline, sampling
from training.pipeline import RelayPipeline

SEEDS = [3, 11, 12]


class Recorder(torch.nn.Module):
    """`net` with every call noted as (noise level, whether it had no labels); label_dim=0 makes
    it the unconditional pass of `net`."""

    def __init__(self, net, label_dim=None):
        super().__init__()
        self.net, self.calls = net, []
        self.img_resolution, self.img_channels, self.sigma_min, self.sigma_max = net.img_resolution, net.img_channels, net.sigma_min, net.sigma_max
        self.label_dim = net.label_dim if label_dim is None else label_dim

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def forward(self, x, sigma, class_labels=None, **kwargs):
        self.calls.append((float(sigma), class_labels is None))
        return self.net(x, sigma, class_labels if self.label_dim else None)


def _labels(label_dim):
    return torch.eye(label_dim)[torch.tensor(SEEDS) % label_dim] if label_dim else None


def _first(net, **kwargs):
    rnd = sampling.StackedRandomGenerator('cpu', SEEDS)
    return sampling.edm_sampler(net, rnd.randn([len(SEEDS), 3, 8, 8]), _labels(net.label_dim), rnd.randn_like, **kwargs)


def _second(net, **kwargs):
    rnd = sampling.StackedRandomGenerator('cpu', SEEDS)
    low = torch.rand(len(SEEDS), 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    return sampling.blur_sampler(net, F.interpolate(low, size=(16, 16)), _labels(net.label_dim), rnd.randn_like, num_steps=18, **kwargs)

#----------------------------------------------------------------------------
# The first stage equals EDM2's sampler.

@pytest.mark.parametrize('main_dim,guide_dim,w,churn,interval', [
    (3, 0, 2.0, 0, None),          # unconditional guide of a conditional network
    (3, 3, 2.5, 40, None),         # conditional guide, churn at every level (edm2 draws its noise there too)
    (0, 0, 3.0, 0, None),
    (3, 0, 2.0, 0, (0.3, 5.0)),    # the interval, as Kynkaanniemi et al. define it
    (3, 3, 1.7, 0, None),          # a weight whose products round: lerp and w*a-(w-1)*b differ by an ulp
])
def test_first_stage_with_guide_equals_edm2(main_dim, guide_dim, w, churn, interval):
    net, gnet = TinyNet(8, label_dim=main_dim), TinyNet(8, label_dim=guide_dim, seed=7)
    ours = _first(net, num_steps=18, cfg_scale=w, gnet=gnet, guidance_interval=interval, S_churn=churn)
    ref = RefGenerators(SEEDS)
    theirs = ref_edm2(net, ref.randn([len(SEEDS), 3, 8, 8]), _labels(main_dim), gnet, num_steps=18, guidance=w, S_churn=churn,
                      randn_like=ref.randn_like, interval=interval)
    # Network outputs are float32: for w = 2, 2.5, 3 both mixes are exact in float64. Otherwise
    # they differ in the last bit (measured: 4.4e-16 at |x| ~ 3, w = 1.7 and 1.2).
    assert torch.equal(ours, theirs) if w != 1.7 else (ours - theirs).abs().max() <= 1e-12
    assert not torch.equal(ours, _first(net, num_steps=18, cfg_scale=w, S_churn=churn))  # The guide is not ignored.

#----------------------------------------------------------------------------
# Both stages: the guide replaces the unconditional pass; the interval's ends.

@pytest.mark.parametrize('stage', ['first', 'second'])
def test_guide_takes_the_place_of_the_unconditional_pass(stage):
    sample, net = (_first, TinyNet(8, label_dim=3)) if stage == 'first' else (_second, TinyNet(16, label_dim=3, seed=1))
    cfg = sample(net, cfg_scale=2.3)
    assert torch.equal(sample(net, cfg_scale=2.3, gnet=Recorder(net, label_dim=0)), cfg)
    assert not torch.equal(sample(net, cfg_scale=2.3, gnet=TinyNet(net.img_resolution, seed=5)), cfg)


@pytest.mark.parametrize('stage', ['first', 'second'])
@pytest.mark.parametrize('guided', ['cfg', 'gnet'])
def test_guidance_interval(stage, guided):
    sample, res = (_first, 8) if stage == 'first' else (_second, 16)
    net, guide = Recorder(TinyNet(res, label_dim=3)), Recorder(TinyNet(res, seed=5))
    options = dict(cfg_scale=2.0, gnet=guide if guided == 'gnet' else None)
    full = sample(net, **options)
    assert torch.equal(sample(net, guidance_interval=(0, float('inf')), **options), full)
    assert torch.equal(sample(net, guidance_interval=(100, 200), **options), sample(net))  # No level inside: no guidance.
    # Both ends at levels of the schedule: LO itself is not guided, HI is.
    levels = sorted({s for s, _ in net.calls})
    lo, hi = levels[2], levels[-4]
    net.calls, guide.calls = [], []
    part = sample(net, guidance_interval=(lo, hi), **options)
    evaluations = [s for s, unconditional in net.calls if not unconditional]
    guide_calls = [s for s, unconditional in (guide.calls if guided == 'gnet' else net.calls) if unconditional]
    assert lo in evaluations and hi in evaluations and min(evaluations) < lo and max(evaluations) > hi
    assert guide_calls == [s for s in evaluations if lo < s <= hi]  # One guide evaluation per guided step, none outside.
    assert not torch.equal(part, full) and not torch.equal(part, sample(net))

#----------------------------------------------------------------------------
# Entry points: generate.py, RelayPipeline, fast mode, presets; bad input.

@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp('guides')
    return dict(first=_save(d / 'first.pkl', _net(8, label_dim=2, seed=1), loss_fn=loss.EDMLoss()),
                second=_save(d / 'second.pkl', _net(32, label_dim=2, seed=2)),
                gfirst=_save(d / 'gfirst.pkl', _net(8, seed=3), loss_fn=loss.EDMLoss()),   # unconditional guides
                gsecond=_save(d / 'gsecond.pkl', _net(32, seed=4), loss_fn=loss.BlurLoss()))


GUIDED = dict(cfg_scale_first=2.0, cfg_scale_second=1.5, guidance_interval_second=(0.05, 0.5), num_steps_first=6, num_steps_second=10)


def test_generate_cli_with_guides_equals_pipeline(tmp_path, ckpts):
    args = ['--outdir', tmp_path / 'o', '--seeds=0-2', '--batch=2', f'--network_first={ckpts["first"]}', f'--network_second={ckpts["second"]}',
            f'--gnet_first={ckpts["gfirst"]}', f'--gnet_second={ckpts["gsecond"]}', '--guidance_interval_second=0.05,0.5',
            '--cfg_scale_first=2', '--cfg_scale_second=1.5', '--num_steps_first=6', '--num_steps_second=10']
    result = CliRunner().invoke(generate.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert f"'gnet': '{ckpts['gfirst']}'" in result.output  # The config names the guide.
    pngs = _read_pngs(tmp_path / 'o')
    guided = RelayPipeline(ckpts['first'], ckpts['second'], device='cpu', gnet_first=ckpts['gfirst'], gnet_second=ckpts['gsecond'], **GUIDED)
    images = guided([0, 1, 2])
    assert all((pngs[f'000000/00000{i}.png'] == images[i].permute(1, 2, 0).numpy()).all() for i in range(3))
    assert not torch.equal(images, RelayPipeline(ckpts['first'], ckpts['second'], device='cpu', **GUIDED)([0, 1, 2]))
    # --fast batches classifier-free guidance; with a guide it runs the two networks (fp32 here: the same pixels).
    fast = fast_mode.FastSettings(batch_guidance=True)
    assert torch.equal(RelayPipeline(ckpts['first'], ckpts['second'], device='cpu', fast=fast, gnet_first=ckpts['gfirst'],
                                     gnet_second=ckpts['gsecond'], **GUIDED)([0, 1, 2]), images)
    plain = dict(device='cpu', **GUIDED, guidance_interval_first=(0.5, 5))  # Classifier-free, in one batch, within the intervals.
    assert torch.equal(RelayPipeline(ckpts['first'], ckpts['second'], fast=fast, **plain)([0, 1]), RelayPipeline(ckpts['first'], ckpts['second'], **plain)([0, 1]))


def test_presets_leave_guidance_off():
    for preset in pipeline.PRESETS:
        options, _ = pipeline.resolve_options(preset)
        assert all(options[f'{key}_{stage}'] is None for key in ('gnet', 'guidance_interval') for stage in ('first', 'second'))


def test_bad_guides_are_refused(tmp_path, ckpts):
    make = lambda **kw: RelayPipeline(ckpts['first'], ckpts['second'], device='cpu', cfg_scale_first=2, cfg_scale_second=2, **kw)
    with pytest.raises(UserError, match='--gnet_first "[^"]*gsecond.pkl" is a second-stage checkpoint.*--gnet_second'):
        make(gnet_first=ckpts['gsecond'])
    with pytest.raises(UserError, match='--gnet_second is 8 px.*--network_second is 32 px'):
        make(gnet_second=_net(8))
    with pytest.raises(UserError, match='--gnet_first is 8 px, 1 channels'):
        make(gnet_first=_save(tmp_path / 'grey.pkl', networks.EDMPrecond(img_resolution=8, img_channels=1, **TINY)))
    with pytest.raises(UserError, match='label_dim 5.*label_dim 2'):
        make(gnet_first=_net(8, label_dim=5))
    with pytest.raises(UserError, match='Cannot load --gnet_second'):
        make(gnet_second=tmp_path / 'missing.pkl')
    with pytest.warns(UserWarning, match='--gnet_first is not used with --cfg_scale_first=1'):
        RelayPipeline(ckpts['first'], None, device='cpu', gnet_first=ckpts['gfirst'])
    for interval, message in [('2,1', 'LO must be below HI'), ('1,1', 'LO must be below HI'), ('1', 'not two noise levels'),
                              ('1,2,3', 'not two noise levels'), ('-1,2', 'not in the range x>=0'), ('a,2', "'a' is not a number"),
                              ('nan,1', 'finite'), ((0.5,), 'not two noise levels'), (3, 'not two noise levels')]:
        with pytest.raises(UserError, match=f'--guidance_interval_first: .*{message}'):
            make(guidance_interval_first=interval)
        if isinstance(interval, str):
            result = CliRunner().invoke(generate.main, ['--outdir', str(tmp_path / 'o'), f'--guidance_interval_second={interval}'])
            assert result.exit_code == 2 and message in result.output and 'Traceback' not in result.output, result.output
    with pytest.raises(UserError, match='--gnet_first: 3 is not a path'):
        make(gnet_first=3)
