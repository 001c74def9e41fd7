"""The Python API (training/pipeline.py): same pixels as generate.py, checkpoint relay settings,
stage checks, option validation."""

import os
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
import generate_celebahq
import training
from torch_utils import checkpoint
from torch_utils import distributed as dist
from training import loss, networks, pipeline
from training.pipeline import RelayPipeline
from dnnlib import UserError

TINY = dict(model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)


def _net(res, label_dim=0, seed=0):
    torch.manual_seed(seed)
    net = networks.EDMPrecond(img_resolution=res, img_channels=3, label_dim=label_dim, **TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def _save(path, net, **extra):
    checkpoint.save_snapshot(path, dict(ema=net, **extra))
    return str(path)


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp('ckpts')
    return dict(
        first=_save(d / 'first.pkl', _net(8, label_dim=2, seed=1), loss_fn=loss.EDMLoss()),
        second=_save(d / 'second.pkl', _net(32, label_dim=2, seed=2)),
        second_new=_save(d / 'second-new.pkl', _net(32, label_dim=2, seed=2), loss_kwargs=dict(
            class_name='training.loss.BlurLoss', P_mean=-1.2, P_std=1.2, sigma_data=0.5, up_scale=4, prob_length=0.8,
            blur_sigma_max=2.5, min_scale=0.001, block_scale=0.1)),
        second_old=_save(d / 'second-old.pkl', _net(32, label_dim=2, seed=2),
                         loss_fn=loss.BlurLoss(up_scale=4, prob_length=0.8, blur_sigma_max=2.5, block_scale=0.1)),
    )


def _pngs(folder):
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            out[int(name[:-4])] = np.array(PIL.Image.open(os.path.join(root, name)))
    return out


FAST = dict(num_steps_first=4, num_steps_second=8)


def test_pipeline_images_equal_generate_pngs_with_preset_postprocessing(tmp_path, ckpts):
    seeds = [3, 1001, 7]
    result = CliRunner().invoke(generate_celebahq.main, ['--outdir', str(tmp_path / 'out'), '--seeds=3,1001,7', '--batch=2',
                                f'--network_first={ckpts["first"]}', f'--network_second={ckpts["second"]}', '--num_steps_first=4', '--num_steps_second=8'])
    assert result.exit_code == 0, result.output
    pngs = _pngs(tmp_path / 'out')
    pipe = RelayPipeline(ckpts['first'], ckpts['second'], preset='celebahq', device='cpu', **FAST)
    images = pipe(seeds, batch_size=3)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 32, 32)
    for seed, img, pil in zip(seeds, images, pipe.to_pil(images)):
        assert np.array_equal(img.permute(1, 2, 0).numpy(), pngs[seed])
        assert np.array_equal(np.array(pil), pngs[seed])
    # The post-processing is there: without it the pixels differ.
    plain = RelayPipeline(ckpts['first'], ckpts['second'], preset='celebahq', device='cpu', postprocess='none', **FAST)(seeds)
    assert not torch.equal(plain, images)


def test_first_only_and_second_from_images_equal_generate(tmp_path, ckpts):
    seeds = [0, 5]
    generate.generate_images(tmp_path / 'low', seeds=seeds, sampler_stages='first', network_first=ckpts['first'], verbose=False, **FAST)
    generate.generate_images(tmp_path / 'high', seeds=seeds, sampler_stages='second', indir=tmp_path / 'low',
                             network_second=ckpts['second'], verbose=False, class_idx=1, **FAST)
    low, high = _pngs(tmp_path / 'low'), _pngs(tmp_path / 'high')
    first = RelayPipeline(ckpts['first'], None, device='cpu', **FAST)
    low_images = first(seeds)
    assert [np.array_equal(img.permute(1, 2, 0).numpy(), low[s]) for s, img in zip(seeds, low_images)] == [True, True]
    second = RelayPipeline(None, ckpts['second'], device='cpu', **FAST)
    high_images = second(seeds, class_idx=1, first_images=low_images)
    assert [np.array_equal(img.permute(1, 2, 0).numpy(), high[s]) for s, img in zip(seeds, high_images)] == [True, True]


def test_split_batches_shards_like_generate():
    batches = dist.split_batches(10, 3, world_size=2)
    assert len(batches) == 4 and [len(b) for b in batches] == [3, 3, 2, 2]  # Near-equal, as the reference's tensor_split.
    assert torch.equal(torch.cat(batches), torch.arange(10))  # Contiguous, in order.
    assert [len(b) for b in dist.split_batches(0, 3, world_size=2)] == [0, 0]

#----------------------------------------------------------------------------
# Relay settings recorded by the training.

@pytest.mark.parametrize('which', ['second_new', 'second_old'])
def test_checkpoint_relay_settings_become_defaults(ckpts, which):
    data = training.load_checkpoint(ckpts[which])
    assert loss.training_record(data).relay == dict(up_scale=4, prob_length=0.8, blur_sigma_max=2.5, block_scale=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        pipe = RelayPipeline(None, ckpts[which], device='cpu', **FAST)
    assert (pipe.second_kwargs['blur_sigma_max'], pipe.second_kwargs['truncation_t'], pipe.second_kwargs['s_block']) == (2.5, 0.8, 0.1)
    assert pipe.warnings == []
    # An explicit option wins, with a warning naming both values.
    with pytest.warns(UserWarning, match=r'--blur_sigma_max_second=3.0 \(given\).*blur_sigma_max=2.5'):
        pipe = RelayPipeline(None, ckpts[which], device='cpu', blur_sigma_max_second=3.0, **FAST)
    assert pipe.second_kwargs['blur_sigma_max'] == 3.0
    # A checkpoint without a record keeps the samplers' defaults.
    assert RelayPipeline(None, ckpts['second'], device='cpu').second_kwargs['blur_sigma_max'] == 3


def test_celebahq_preset_keeps_its_truncation_t(ckpts):
    pipe = RelayPipeline(None, ckpts['second_new'], preset='celebahq', device='cpu', warn=False, **FAST)
    assert pipe.second_kwargs['truncation_t'] == 1.05 # the reference samples with 1.05 (trained 0.89)
    assert len(pipe.warnings) == 1 and 'blur_sigma_max_second=2.0 (set by the celebahq preset)' in pipe.warnings[0]


def test_cli_warns_on_contradicting_option(tmp_path, ckpts):
    result = CliRunner().invoke(generate.main, ['--outdir', str(tmp_path / 'o'), '--seeds=0', '--sampler_stages=both',
        f'--network_first={ckpts["first"]}', f'--network_second={ckpts["second_old"]}', '--num_steps_first=2',
        '--num_steps_second=4', '--s_block_second=0.15'])
    assert result.exit_code == 0, result.output
    assert 'Warning: --s_block_second=0.15 (given)' in result.output and "block_scale=0.1" in result.output


def test_cli_keeps_the_checkpoint_relay_settings(tmp_path, ckpts):
    # Sampler options left at their defaults (the samplers' or a preset's) do not override the
    # settings the checkpoint records: no warning, and the pipeline's images (which use them).
    result = CliRunner().invoke(generate.main, ['--outdir', str(tmp_path / 'o'), '--seeds=0', f'--network_first={ckpts["first"]}',
                                                f'--network_second={ckpts["second_old"]}', '--num_steps_first=4', '--num_steps_second=8'])
    assert result.exit_code == 0 and 'Warning' not in result.output, result.output
    images = RelayPipeline(ckpts['first'], ckpts['second_old'], device='cpu', **FAST)([0])
    assert np.array_equal(_pngs(tmp_path / 'o')[0], images[0].permute(1, 2, 0).numpy())


def test_stage_mismatch_is_refused(ckpts):
    with pytest.raises(UserError, match='second-stage checkpoint.*--network_second'):
        RelayPipeline(ckpts['second_new'], None, device='cpu')
    with pytest.raises(UserError, match='first-stage checkpoint.*--network_first'):
        RelayPipeline(None, ckpts['first'], device='cpu')

#----------------------------------------------------------------------------
# The README's example runs as written.

def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md'), encoding='utf-8').read()
    section = readme[readme.index('## Python API'):]
    code = section[section.index('```python\n') + len('```python\n'):section.index('\n```', section.index('```python'))]
    first, second = _save(tmp_path / 'f.pkl', _net(8, label_dim=1000, seed=3)), _save(tmp_path / 's.pkl', _net(32, label_dim=1000, seed=4))
    monkeypatch.chdir(tmp_path)
    scope = dict(first_stage=first, second_stage=second)
    exec(compile(code, 'README.md', 'exec'), scope)
    assert scope['images'].shape == (4, 3, 32, 32) and scope['images'].dtype == torch.uint8
    assert np.array_equal(np.array(PIL.Image.open(tmp_path / 'seed0.png')), scope['images'][0].permute(1, 2, 0).numpy())
    assert scope['low'].shape == (2, 3, 8, 8) and scope['high'].shape == (2, 3, 32, 32)


def test_class_labels_allocate_per_image_not_label_dim_squared():
    # A network's label_dim comes from its file; eye(label_dim) would ask 4 TB here.
    labels = pipeline.class_labels(10**6, [3, 10**6 + 7], None, 'cpu')
    assert labels.shape == (2, 10**6) and labels.dtype == torch.float32
    assert labels.sum().item() == 2 and labels[0, 3] == 1 and labels[1, 7] == 1
    assert torch.equal(pipeline.class_labels(5, [0, 1, 2], 4, 'cpu'), torch.eye(5)[[4, 4, 4]])
