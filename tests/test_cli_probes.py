"""Regressions from probing every CLI as a hostile user: each bad input ends in one clear line
before any work (no traceback, nothing written), and odd but valid inputs give correct output."""

import os

import click
import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dnnlib
import evaluate
import generate
import quickstart
from training import data_files, pipeline
from training.pipeline import RelayPipeline
from dnnlib import UserError



@pytest.fixture(scope='module')
def nets(tiny_relay_checkpoints):
    return tiny_relay_checkpoints


def _clear_error(command, args, text):
    result = CliRunner().invoke(command, args)
    assert result.exit_code != 0, (args, result.output)
    assert isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert 'Traceback' not in result.output
    assert text in result.output, (args, result.output)
    return result

#----------------------------------------------------------------------------
# Seed lists: one parser for generate, evaluate gen and quickstart.

def test_seed_list_type_bounds():
    parse = lambda value, limit=100: dnnlib.util.seeds(limit).convert(value, None, None)  # noqa: E731
    assert parse('1,2, 5-7') == [1, 2, 5, 6, 7]
    assert parse('3-3') == [3] and parse(range(2, 4)) == [2, 3] and parse([5, 1]) == [5, 1]
    for value, message in [('5-3', 'empty range'), (',,', 'is not a number'), ('', 'is not a number'), ('1e3', 'is not a number'),
                           ('0-99999999999', 'more than 100 seeds'), ('4294967296', 'largest allowed value'),
                           ([-1], 'negative'), ([2.5], 'not a whole number'), ([1 << 32], 'largest allowed value')]:
        with pytest.raises(click.BadParameter, match=message):
            parse(value)
    # Counted before the list is built: a 10^20-entry range fails at once, from text or from Python.
    for value in ('0-99999999999999999999', range(10 ** 20)):
        with pytest.raises(click.BadParameter, match='more than 10 seeds'):
            parse(value, limit=10)


@pytest.mark.parametrize('seeds,text', [
    ('4294967296', 'largest allowed value 4,294,967,295'),            # would repeat seed 0's image
    ('99999999999999999999999999', 'largest allowed value'),          # was an int64 overflow traceback
    ('0-99999999999', 'more than 10,000,000 seeds'),
])
def test_generate_seed_bounds(tmp_path, seeds, text):
    _clear_error(generate.main, ['--outdir', str(tmp_path / 'out'), f'--seeds={seeds}', '--network_first=missing.pkl',
                                 '--network_second=missing.pkl'], text)
    assert not (tmp_path / 'out').exists()


def test_pipeline_refuses_seeds_that_wrap(nets):
    pipe = RelayPipeline(nets[0], None, device='cpu', num_steps_first=2)
    assert pipe([0]).shape == (1, 3, 8, 8)
    for seed in [1 << 32, -1, 2.5]:
        with pytest.raises(UserError, match='seed'):
            pipe([seed])


def test_evaluate_gen_and_quickstart_seed_bounds(tmp_path):
    common = ['gen', '--network_first=missing.pkl', '--network_second=missing.pkl', '-m', 'is']
    _clear_error(evaluate.main, [*common, '--seeds=9-3'], 'empty range')
    _clear_error(evaluate.main, [*common, '--seeds=4294967296'], 'largest allowed value')
    out = tmp_path / 'qs'
    for args, text in [(['--seeds=0-99999999999'], 'more than 1,000,000 seeds'), (['--seeds=5-3'], 'empty range'),
                       (['--relay-seeds=0-99'], 'more than 64 seeds'), (['--kimg-first=nan'], 'must be a finite number'),
                       (['--kimg-second=1e309'], 'must be a finite number'), (['--images=99999999999'], 'not in the range')]:
        _clear_error(quickstart.main, ['--outdir', str(out), *args], text)
    assert not out.exists()

#----------------------------------------------------------------------------
# Sampler options whose schedule cannot be computed, and other refusals before any work.

@pytest.mark.parametrize('option,text', [
    ('--rho_first=1e-300', 'overflows or rounds away'),      # was an OverflowError traceback
    ('--rho_second=0.001', 'overflows or rounds away'),
    ('--rho_first=1e300', 'overflows or rounds away'),       # every level rounded to 1: sigma_max ignored
    ('--num_steps_first=2000000000', 'not in the range 2<=x<=1000000'),  # the schedule alone would take 16 GB
])
def test_generate_schedule_checks(tmp_path, option, text):
    _clear_error(generate.main, ['--outdir', str(tmp_path / 'out'), '--seeds=0', option, '--network_first=missing.pkl',
                                 '--network_second=missing.pkl'], text)
    assert not (tmp_path / 'out').exists()


def test_schedule_check_accepts_published_settings():
    for preset in pipeline.PRESETS:
        pipeline.resolve_options(preset)
    pipeline.resolve_options('generate', dict(rho_second=100, rho_first=1000))


def test_empty_or_uncreatable_outdirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _clear_error(generate.main, ['--outdir=', '--seeds=0', '--network_first=missing.pkl', '--network_second=missing.pkl'],
                 '--outdir is empty')
    assert os.listdir(tmp_path) == []
    common = ['gen', '--network_first=missing.pkl', '--network_second=missing.pkl', '-m', 'is', '--seeds=0-1']
    _clear_error(evaluate.main, [*common, '--outdir=/proc/no-such-dir'], 'cannot write in /proc')
    _clear_error(evaluate.main, [*common, '--outdir='], '--outdir is empty')

#----------------------------------------------------------------------------
# generate.py reads images through the one image reader.

def test_generate_load_image_uses_the_data_reader(tmp_path):
    gray16 = np.random.default_rng(0).integers(0, 65536, [6, 5]).astype(np.uint16)
    PIL.Image.fromarray(gray16).save(tmp_path / 'g16.png')
    rgb = np.random.default_rng(1).integers(0, 256, [6, 5, 3], dtype=np.uint8)
    PIL.Image.fromarray(rgb).convert('P').save(tmp_path / 'pal.png')
    # 16-bit greyscale: the top 8 bits (a plain np.array() gave uint16 values up to 65535).
    got = generate.load_image(str(tmp_path / 'g16.png'))
    assert got.dtype == np.uint8 and np.array_equal(got[0], (gray16 >> 8).astype(np.uint8))
    # Palette: its RGB colours (a plain np.array() gave one channel of palette indices).
    pal = PIL.Image.open(tmp_path / 'pal.png')
    assert np.array_equal(generate.load_image(str(tmp_path / 'pal.png')), np.asarray(pal.convert('RGB')).transpose(2, 0, 1))
    (tmp_path / 'junk.png').write_text('not an image')
    with pytest.raises(data_files.DatasetError, match='junk.png'):
        generate.load_image(str(tmp_path / 'junk.png'))


def test_relay_from_palette_and_16bit_first_stage_images(tmp_path, nets):
    rng = np.random.default_rng(2)
    pal, g16 = tmp_path / 'pal', tmp_path / 'g16'
    pal.mkdir(), g16.mkdir()
    for s in range(2):
        PIL.Image.fromarray(rng.integers(0, 256, [8, 8, 3], dtype=np.uint8)).convert('P').save(pal / f'{s:06d}.png')
        PIL.Image.fromarray(rng.integers(0, 65536, [8, 8]).astype(np.uint16)).save(g16 / f'{s:06d}.png')
    args = ['--seeds=0-1', '--sampler_stages=second', f'--network_second={nets[1]}', '--num_steps_second=2']
    result = CliRunner().invoke(generate.main, [*args, f'--indir={pal}', '--outdir', str(tmp_path / 'out')])
    assert result.exit_code == 0, result.output
    assert np.asarray(PIL.Image.open(tmp_path / 'out' / '000000' / '000001.png')).shape == (32, 32, 3)
    # A 16-bit greyscale image has one channel: refused by name, not read as 3 channels of garbage.
    _clear_error(generate.main, [*args, f'--indir={g16}', '--outdir', str(tmp_path / 'out2')], 'with 1 channels')


def test_damaged_existing_png_is_refused_not_counted(tmp_path, nets):
    out = tmp_path / 'out'
    (out / '000000').mkdir(parents=True)
    (out / '000000' / '000000.png').write_text('junk')  # Was counted as done; then the grid could not read it.
    args = ['--outdir', str(out), '--seeds=0-1', '--grid=2', f'--network_first={nets[0]}', '--sampler_stages=first', '--num_steps_first=2']
    _clear_error(generate.main, args, 'which is not a complete image')
    assert (out / '000000' / '000000.png').read_text() == 'junk'
    assert not (out / '000000' / '000001.png').exists() and not os.path.exists(f'{out}-grid.png')

#----------------------------------------------------------------------------
# evaluate calc: a file cannot make us allocate what its contents do not hold.

def test_npz_member_claiming_more_than_it_holds(tmp_path):
    import zipfile
    forged = tmp_path / 'forged.npz'
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (100000000, 2048), }".ljust(117) + b'\n'
    with zipfile.ZipFile(forged, 'w') as z:
        z.writestr('feat.npy', b'\x93NUMPY\x01\x00' + len(header).to_bytes(2, 'little') + header)
    ref = tmp_path / 'ref.npz'
    np.savez(ref, feat=np.zeros([4, 2048], np.float32))
    # Was a MemoryError traceback (numpy allocates the claimed 819 GB before reading).
    _clear_error(evaluate.main, ['calc', '-m', 'fid', f'--activations_sample={forged}', f'--ref={ref}'], 'truncated or forged')
    # Honest files, stored and compressed, still read.
    from metrics.activations import FeatureSet
    rows = np.random.default_rng(0).standard_normal([5, 7]).astype(np.float32)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / 'ok.npz', feat=rows)
        assert np.array_equal(FeatureSet(str(tmp_path / 'ok.npz')).get('feat'), rows)


def test_kid_subsets_bounded(tmp_path):
    a = tmp_path / 'a.npz'
    np.savez(a, feat=np.zeros([4, 8], np.float32))
    _clear_error(evaluate.main, ['calc', '-m', 'kid', f'--activations_sample={a}', f'--ref={a}', '--kid-subsets=100000000000',
                                 '--kid-subset-size=2'], 'not in the range')

#----------------------------------------------------------------------------
# checkpoint export: outputs that cannot be written are refused before loading.

def test_export_unwritable_outputs(tmp_path, nets):
    from torch_utils.checkpoint import main as checkpoint_cli
    (tmp_path / 'dir.safetensors').mkdir()
    (tmp_path / 'file').write_text('keep')
    for dst, text in [(tmp_path / 'dir.safetensors', 'is a folder'), ('/proc/o.safetensors', 'cannot write in /proc'),
                      (tmp_path / 'file' / 'o.safetensors', 'is a file')]:
        for extra in ([], ['--overwrite']):
            _clear_error(checkpoint_cli, ['export', nets[1], str(dst), *extra], text)
    assert (tmp_path / 'file').read_text() == 'keep' and os.listdir(tmp_path / 'dir.safetensors') == []

#----------------------------------------------------------------------------
# Second campaign: outputs trusted on resume, aliases, full disks, guidance that cannot guide,
# activation files, deflated members, detector sizes, late errors. Each failed before.

def _pngs_of(folder):
    return {name: open(os.path.join(root, name), 'rb').read() for root, _d, files in os.walk(folder) for name in files}


@pytest.mark.parametrize('plant', ['8px', 'truncated', 'grey', 'text'])
def test_resume_refuses_what_is_not_this_runs_output(tmp_path, nets, plant):
    out = tmp_path / 'out'
    (out / '000000').mkdir(parents=True)
    path = out / '000000' / '000001.png'
    pixels = np.random.default_rng(0).integers(0, 256, [32, 32, 3], dtype=np.uint8)
    if plant == '8px':  # First-stage output in the folder of a run of both stages: was counted as done.
        PIL.Image.fromarray(pixels[:8, :8]).save(path)
    elif plant == 'truncated':
        PIL.Image.fromarray(pixels).save(path)
        path.write_bytes(path.read_bytes()[:300])
    elif plant == 'grey':
        PIL.Image.fromarray(pixels[:, :, 0]).save(path)
    else:
        path.write_text('not an image')
    before = _pngs_of(out)
    _clear_error(generate.main, ['--outdir', str(out), '--seeds=0-2', f'--network_first={nets[0]}', f'--network_second={nets[1]}',
                                 '--num_steps_first=2', '--num_steps_second=2'], 'not a 32x32 output of this run')
    assert _pngs_of(out) == before  # Refused before any work, the file left as it was.


def test_resume_keeps_complete_outputs(tmp_path, nets):
    args = ['--outdir', str(tmp_path / 'out'), f'--network_first={nets[0]}', '--sampler_stages=first', '--num_steps_first=2']
    assert CliRunner().invoke(generate.main, [*args, '--seeds=0']).exit_code == 0
    kept = tmp_path / 'out' / '000000' / '000000.png'
    stamp = os.stat(kept).st_mtime_ns
    result = CliRunner().invoke(generate.main, [*args, '--seeds=0-1'])
    assert result.exit_code == 0 and '1 of 2 already there' in result.output and os.stat(kept).st_mtime_ns == stamp


def test_outdir_that_aliases_indir(tmp_path, nets):
    low = tmp_path / 'low'
    assert CliRunner().invoke(generate.main, ['--outdir', str(low), '--seeds=0', f'--network_first={nets[0]}', '--sampler_stages=first',
                                              '--num_steps_first=2']).exit_code == 0
    before = _pngs_of(low)
    (tmp_path / 'link').symlink_to(low)  # Passed the outdir-differs-from-indir check before.
    for outdir, indir in [(tmp_path / 'link', low), (low, tmp_path / 'link')]:
        _clear_error(generate.main, ['--outdir', str(outdir), f'--indir={indir}', '--seeds=0', '--sampler_stages=second',
                                     f'--network_second={nets[1]}', '--num_steps_second=2'], '--outdir must differ from --indir')
    assert _pngs_of(low) == before


def _disk_full_after(monkeypatch, count):
    calls = []
    def fsync(fd):
        calls.append(fd)
        if len(calls) > count:
            raise OSError(28, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', fsync)


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, nets, monkeypatch):
    np.savez(tmp_path / 'a.npz', feat=np.random.default_rng(0).standard_normal([6, 4]).astype(np.float32))
    _disk_full_after(monkeypatch, 1)
    out = tmp_path / 'out'
    _clear_error(generate.main, ['--outdir', str(out), '--seeds=0-2', f'--network_first={nets[0]}', '--sampler_stages=first',
                                 '--num_steps_first=2'], 'No space left on device')
    assert sorted(_pngs_of(out)) == ['000000.png']  # The first image, whole; no temporary left.
    _disk_full_after(monkeypatch, 0)
    (tmp_path / 'j').mkdir()
    _clear_error(evaluate.main, ['calc', '-m', 'fid', f'--activations_sample={tmp_path / "a.npz"}', f'--ref={tmp_path / "a.npz"}',
                                 f'--json={tmp_path / "j" / "out.json"}'], f'cannot write {tmp_path / "j" / "out.json"} (No space left on device)')
    assert os.listdir(tmp_path / 'j') == []


def test_guidance_on_an_unconditional_network_warns_once(tmp_path, nets):
    with pytest.warns(UserWarning, match='unconditional network') as record:
        pipe = RelayPipeline(nets[0], nets[1], device='cpu', cfg_scale_second=2, num_steps_first=2, num_steps_second=2)
        pipe([0])
    assert len(record) == 1
    result = CliRunner().invoke(generate.main, ['--outdir', str(tmp_path / 'o'), '--seeds=0-1', '--batch=1', f'--network_first={nets[0]}',
                                                f'--network_second={nets[1]}', '--num_steps_first=2', '--num_steps_second=2', '--cfg_scale_first=3'])
    assert result.exit_code == 0 and result.output.count('--cfg_scale_first=3.0 on an unconditional network') == 1


def test_activation_files_odd_but_valid_or_refused(tmp_path):
    rng = np.random.default_rng(1)
    feat, ref = np.abs(rng.standard_normal([30, 16])).astype(np.float32), np.abs(rng.standard_normal([40, 16])).astype(np.float32)
    np.savez(tmp_path / 'le.npz', feat=feat)
    np.savez(tmp_path / 'ref.npz', feat=ref, s_feat=rng.standard_normal([40, 2024]).astype(np.float32))
    np.savez(tmp_path / 'be.npz', feat=feat.astype('>f4'))  # Valid big-endian: was a traceback.
    np.savez_compressed(tmp_path / 'be-deflated.npz', feat=feat.astype('>f4'))
    calc = lambda sample, *m: CliRunner().invoke(evaluate.main, ['calc', *m, f'--activations_sample={sample}', f'--ref={tmp_path / "ref.npz"}'])  # noqa: E731
    expect = calc(tmp_path / 'le.npz', '-m', 'fid', '-m', 'pr').stdout
    for name in ('be.npz', 'be-deflated.npz'):
        assert calc(tmp_path / name, '-m', 'fid', '-m', 'pr').stdout == expect
    np.savez(tmp_path / 'wide.npz', s_feat=rng.standard_normal([30, 2024]).astype(np.float32))
    _clear_error(evaluate.main, ['calc', '-m', 'sfid', f'--activations_sample={tmp_path / "wide.npz"}', f'--ref={tmp_path / "ref.npz"}'],
                 'not a multiple of the 7 channels')
    np.savez(tmp_path / 'empty.npz', feat=np.zeros([30, 0], np.float32))
    for metric in ('fid', 'pr', 'kid'):
        _clear_error(evaluate.main, ['calc', '-m', metric, f'--activations_sample={tmp_path / "empty.npz"}', f'--ref={tmp_path / "ref.npz"}'],
                     'feat has shape [30, 0]')


def test_deflated_members_are_read_in_pieces(tmp_path):
    # 64 MB of (mostly) zeros in a few hundred KB: the metrics and the image reader hold pieces, not the whole.
    import tracemalloc
    from metrics.activations import open_images
    feat = np.zeros([250_000, 64], np.float32)
    feat[::997, ::3] = 1  # Not constant, still compressible.
    np.savez_compressed(tmp_path / 'zeros.npz', feat=feat)
    np.savez(tmp_path / 'ref.npz', feat=np.random.default_rng(2).standard_normal([50, 64]).astype(np.float32))
    np.savez_compressed(tmp_path / 'images.npz', arr_0=np.zeros([16_000, 32, 32, 3], np.uint8))
    assert os.path.getsize(tmp_path / 'zeros.npz') < 1 << 20
    tracemalloc.start()
    try:
        result = CliRunner().invoke(evaluate.main, ['calc', '-m', 'fid', f'--activations_sample={tmp_path / "zeros.npz"}',
                                                    f'--ref={tmp_path / "ref.npz"}', '--batch=4096'])
        images = open_images(str(tmp_path / 'images.npz'))
        assert len(images) == 16_000 and images[7].shape == (3, 32, 32) and images[15_999].sum() == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.exit_code == 0 and 'FID: ' in result.stdout, result.output
    assert peak < 40 << 20, f"peak {peak >> 20} MB"  # Seeking in a deflated member reads 16 MB at a time.


def test_pth_detector_resolution_is_checked(tmp_path):
    import torch
    from metrics.detector import load_detector
    from metrics.inception import InceptionV3
    with torch.device('meta'):
        names = list(InceptionV3().state_dict())
    state = {name: torch.zeros([1]) for name in names}  # Shapes do not matter: the entry is refused first.
    for value in (float('nan'), 1e9, 20000, -5, 75.5, [75, 80]):
        torch.save(dict(state, resolution=torch.tensor(value)), tmp_path / 'det.pth')
        with pytest.raises(UserError, match='"resolution" entry .* is not a whole number of pixels in 75..299'):
            load_detector(str(tmp_path / 'det.pth'), verbose=False)


def test_evaluate_gen_checks_the_reference_before_sampling(tmp_path, nets, monkeypatch):
    monkeypatch.setattr(RelayPipeline, 'batches', lambda *args, **kwargs: pytest.fail('sampled before checking --ref'))
    np.savez(tmp_path / 'stats.npz', mu=np.zeros(4), sigma=np.eye(4))
    common = ['gen', f'--network_first={nets[0]}', f'--network_second={nets[1]}', '--seeds=0-1', '--detector=unused.pth']
    _clear_error(evaluate.main, [*common, '-m', 'fid', f'--ref={tmp_path / "missing.npz"}'], 'missing.npz: cannot read as .npz')
    _clear_error(evaluate.main, [*common, '-m', 'pr', f'--ref={tmp_path / "stats.npz"}'], 'Precision/recall needs per-image feat')
