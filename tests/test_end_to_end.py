"""The whole pipeline as a user runs it, one CLI after another on tiny data:

dataset_tool -> train (first stage, EDM) -> train (second stage, blur) -> generate (both stages)
-> evaluate activations (small random detector) -> evaluate calc.

Each step's files must exist, load, and have the expected shapes.
"""

import glob
import json
import os
import subprocess
import sys
import zipfile

import click.testing
import numpy as np
import PIL.Image
import torch

import dataset_tool
import evaluate
import quickstart
import train
from metrics.inception import InceptionV3
import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOW, HIGH, UP = 8, 32, 4  # First-stage resolution, second-stage resolution, up_scale.
TINY_NET = ['--arch=ddpmpp', '--cbase=8', '--blocks=1', '--batch=16', '--lr=1e-3', '--lr-rampup=0',
            '--augment=0', '--dropout=0', '--duration=0.000064', '--tick=0.032', '--snap=1', '--dump=1',
            '--seed=0', '--workers=0', '--nosubdir']


def run(*args):
    """One CLI run: generate.py as a subprocess (as a user starts it), the others in this
    process through click (the same command; it saves an interpreter start of torch each)."""
    if args[0] == 'generate.py':
        env = dict(os.environ, OMP_NUM_THREADS='1')
        result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f'{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
        return result.stdout
    command = {'dataset_tool.py': dataset_tool.main, 'train.py': train.main, 'evaluate.py': evaluate.main}[args[0]]
    result = click.testing.CliRunner().invoke(command, list(args[1:]), catch_exceptions=False)
    assert result.exit_code == 0, f'{args[0]} failed:\n{result.output[-3000:]}'
    return result.output


def single(pattern):
    paths = sorted(glob.glob(pattern))
    assert paths, f'nothing matches {pattern}'
    return paths[-1]


def test_dataset_train_generate_evaluate(tmp_path):
    # 1. Raw images -> two dataset zips.
    raw = tmp_path / 'raw'
    quickstart.write_shapes_folder(str(raw), num_images=48, resolution=HIGH)
    data = {}
    for res in (LOW, HIGH):
        data[res] = tmp_path / f'shapes-{res}.zip'
        run('dataset_tool.py', f'--source={raw}', f'--dest={data[res]}', f'--resolution={res}x{res}', '--workers=1')
        with zipfile.ZipFile(data[res]) as z:
            names = [n for n in z.namelist() if n.endswith('.png')]
            assert len(names) == 48
            with z.open(names[0]) as f:
                assert PIL.Image.open(f).size == (res, res)

    # 2. Both stages, a couple of optimiser steps each.
    first_dir, second_dir = tmp_path / 'first', tmp_path / 'second'
    run('train.py', f'--outdir={first_dir}', f'--data={data[LOW]}', '--precond=edm', '--cres=1,2', *TINY_NET)
    run('train.py', f'--outdir={second_dir}', f'--data={data[HIGH]}', '--precond=blur', f'--up-scale={UP}',
        '--cres=1,1,2', *TINY_NET)
    nets = {}
    for name, run_dir, res in (('first', first_dir, LOW), ('second', second_dir, HIGH)):
        options = json.loads((run_dir / 'training_options.json').read_text())
        assert options['loss_kwargs']['class_name'] == ('training.loss.BlurLoss' if name == 'second' else 'training.loss.EDMLoss')
        assert (run_dir / 'log.txt').stat().st_size > 0
        stats = [json.loads(line) for line in (run_dir / 'stats.jsonl').read_text().splitlines()]
        assert stats and all(np.isfinite(s['Loss/loss']['mean']) for s in stats)
        snapshot = single(str(run_dir / 'network-snapshot-*.pkl'))
        state = training.load_checkpoint(single(str(run_dir / 'training-state-*.pt')))
        assert {'net', 'ema', 'optimizer_state', 'step'} <= set(state)
        net = training.load_network(snapshot)
        assert (net.img_resolution, net.img_channels, net.label_dim) == (res, 3, 0)
        nets[name] = snapshot

    # 3. Relay samples from both stages.
    out = tmp_path / 'samples'
    run('generate.py', '--sampler_stages=both', f'--network_first={nets["first"]}', f'--network_second={nets["second"]}',
        f'--outdir={out}', '--seeds=0-5', '--batch=4', '--num_steps_first=4', '--num_steps_second=8',
        f'--up_scale_second={UP}', '--grid=4')
    pngs = sorted(glob.glob(str(out / '*' / '*.png')))
    assert [os.path.basename(p) for p in pngs] == [f'{s:06d}.png' for s in range(6)]
    for p in pngs:
        image = np.asarray(PIL.Image.open(p))
        assert image.shape == (HIGH, HIGH, 3) and image.dtype == np.uint8
        assert image.std() > 0  # Not a blank image.
    assert (tmp_path / 'samples-grid.png').is_file()

    # 4. Activations of samples and dataset with a small random detector (pytorch-fid state dict format).
    torch.manual_seed(0)
    detector = tmp_path / 'pt_inception-test.pth'
    net = InceptionV3()  # Full size: s_feat is 17x17x7 only at 299 px.
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):  # Larger random weights keep features far from constant.
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
    torch.save(net.state_dict(), detector)
    acts = {}
    for name, source in (('sample', out), ('ref', data[HIGH])):
        acts[name] = tmp_path / f'act_{name}.npz'
        run('evaluate.py', 'activations', f'--data={source}', f'--dest={acts[name]}', f'--detector={detector}',
            '--batch=16', '--workers=0')
        with np.load(acts[name]) as z:
            n = 6 if name == 'sample' else 48
            assert z['feat'].shape == (n, 2048) and z['s_feat'].shape == (n, 2023)
            assert np.isfinite(z['feat']).all()

    # 5. Metrics.
    result_json = tmp_path / 'metrics.json'
    text = run('evaluate.py', 'calc', '-m', 'fid', '-m', 'sfid', '-m', 'is', '-m', 'pr',
               f'--activations_sample={acts["sample"]}', f'--activations_ref={acts["ref"]}', f'--json={result_json}')
    for label in ('FID', 'sFID', 'Inception Score', 'Precision', 'Recall'):
        assert any(line.startswith(f'{label}: ') for line in text.splitlines()), text
    results = json.loads(result_json.read_text())
    for key in ('FID', 'sFID', 'Inception Score', 'Precision', 'Recall'):
        assert np.isfinite(results[key])
    assert results['FID'] > 0 and results['Inception Score'] >= 1

    # 6. The quickstart's relay picture from the same two networks: rows of 4 tiles.
    relay_png = tmp_path / 'relay.png'
    quickstart.relay_figure(nets['first'], nets['second'], [0, 1], str(relay_png), num_steps_first=4, num_steps_second=8)
    width, height = PIL.Image.open(relay_png).size
    assert (width, height) == (2 * (4 * (HIGH + 2) + 2), 2 * (2 * (HIGH + 2) + 2))


def test_quickstart_rejects_bad_seeds(tmp_path):
    result = subprocess.run([sys.executable, 'quickstart.py', f'--outdir={tmp_path / "q"}', '--seeds=a-b'],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr and 'seeds' in result.stderr
    assert not (tmp_path / 'q').exists()  # Nothing created before the options are checked.


def test_shapes_are_deterministic_and_have_fine_texture():
    a = quickstart.make_shapes_image(np.random.default_rng(3), 64)
    b = quickstart.make_shapes_image(np.random.default_rng(3), 64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    # The stripes are high-frequency detail: a 4x4 box average removes much of the pixel variation.
    x = a.astype(np.float64)
    low = x.reshape(16, 4, 16, 4, 3).mean(axis=(1, 3)).repeat(4, 0).repeat(4, 1)
    assert np.abs(x - low).mean() > 5


def _quickstart_until_training(tmp_path, plant):
    """quickstart.py with the user's files planted in its --outdir; first-stage/ holding a file of
    theirs stops it, with one Error line, right after the datasets are made."""
    out = tmp_path / 'q'
    (out / 'first-stage').mkdir(parents=True)
    (out / 'first-stage' / 'keep.txt').write_text('theirs')
    theirs = plant(out)
    before = {p: p.read_bytes() for p in theirs}
    result = subprocess.run([sys.executable, 'quickstart.py', f'--outdir={out}', '--images=16'], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith('Error:')]
    assert result.returncode == 1 and len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert {p: p.read_bytes() for p in theirs} == before
    return out, errors[0]


def test_quickstart_leaves_the_users_tmp_folders_alone(tmp_path):
    # OUT/shapes-raw.tmp and OUT/<stage>.tmp are the user's: the quickstart's temporaries have
    # names of their own (dnnlib.util.atomic_write), so nothing there is removed or followed.
    photos = tmp_path / 'photos'
    photos.mkdir()
    (photos / 'holiday.jpg').write_bytes(b'mine')

    def plant(out):
        (out / 'shapes-raw.tmp').mkdir()
        (out / 'shapes-raw.tmp' / 'notes.txt').write_bytes(b'mine')
        (out / 'second-stage.tmp').symlink_to(photos)
        return [out / 'shapes-raw.tmp' / 'notes.txt', photos / 'holiday.jpg']
    out, error = _quickstart_until_training(tmp_path, plant)
    assert 'first-stage exists but holds no network-final.pkl' in error
    assert len(os.listdir(out / 'shapes-raw')) == 16 and (out / 'shapes-16x16.zip').is_file()
    assert (out / 'second-stage.tmp').is_symlink() and sorted(os.listdir(photos)) == ['holiday.jpg']


def test_quickstart_raw_folder_that_is_a_file(tmp_path):
    def plant(out):
        (out / 'shapes-raw').write_bytes(b'my file')
        return [out / 'shapes-raw']
    _, error = _quickstart_until_training(tmp_path, plant)
    assert 'shapes-raw exists and is not a folder of images' in error
