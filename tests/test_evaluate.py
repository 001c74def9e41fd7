"""evaluate.py end to end on CPU: activations from every image source and both detector
formats (random weights the test writes), sharded runs under torchrun (gloo, 2 processes),
calc on every input file kind, and bad input."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import evaluate
from conftest import write_fake_nvidia_detector
from metrics import activations as acts
from metrics.detector import load_detector
from metrics.frechet import compute_statistics
from reference_restatement import ref_frechet_distance
from metrics.inception import InceptionV3
from metrics.inception_score import inception_score
from metrics.precision_recall import precision_recall

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _run(args):
    result = CliRunner().invoke(evaluate.main, args, catch_exceptions=True)
    return result


def _ok(args):
    result = _run(args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _fails(args, match):
    result = _run(args)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no traceback
    assert 'Traceback' not in result.output
    assert match in result.output, result.output
    return result

#----------------------------------------------------------------------------
# Fixtures: detectors and images.

@pytest.fixture(scope='module')
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('evaluate')


@pytest.fixture(scope='module')
def pth_detector(tmp_dir):
    # Full architecture, random weights scaled to keep activations O(1); resized to 75 px
    # instead of 299 for speed (the optional 'resolution' entry; the real file has none).
    torch.manual_seed(1)
    net = InceptionV3(resolution=75)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
    state = dict(net.state_dict(), resolution=torch.tensor(75))
    path = tmp_dir / 'pt_inception-test.pth'
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope='module')
def pkl_detector(tmp_dir):
    return write_fake_nvidia_detector(tmp_dir)


@pytest.fixture(scope='module')
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, [11, 24, 24, 3], dtype=np.uint8)  # NHWC


@pytest.fixture(scope='module')
def sources(tmp_dir, images):
    """The same images as a nested folder, a zip, and stored / compressed ADM-style .npz."""
    folder = tmp_dir / 'folder'
    names = [f'{"ab"[i % 2]}/img{i:03d}.png' for i in range(len(images))]
    order = np.argsort(names)  # Datasets read files in sorted name order.
    for name, img in zip(names, images):
        (folder / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(img).save(folder / name)
    zip_path = tmp_dir / 'images.zip'
    with zipfile.ZipFile(zip_path, 'w') as z:
        for name, img in zip(names, images):
            z.write(folder / name, arcname=name)
    stored, compressed = tmp_dir / 'stored.npz', tmp_dir / 'compressed.npz'
    np.savez(stored, arr_0=images[order])
    np.savez_compressed(compressed, arr_0=images[order])
    return dict(folder=str(folder), zip=str(zip_path), stored=str(stored), compressed=str(compressed),
                ordered=images[order])

#----------------------------------------------------------------------------
# Activations.

def test_activations_every_source_and_detector(tmp_dir, sources, pth_detector, pkl_detector):
    # Every source with the small pickle detector; the Inception state dict on one source.
    runs = [('pkl', pkl_detector, kind) for kind in ['folder', 'zip', 'stored', 'compressed']]
    runs.append(('pth', pth_detector, 'stored'))
    for det_name, det_path, kind in runs:
        det = load_detector(det_path, trust_pickle=True)
        direct = det(torch.from_numpy(sources['ordered']).permute(0, 3, 1, 2))
        dest = tmp_dir / f'acts-{det_name}-{kind}.npz'
        _ok(['activations', '--data', sources[kind], '--dest', str(dest), '--trust-detector', '--detector', det_path,
             '--batch', '4', '--workers', '2' if kind == 'zip' else '0'])
        with np.load(dest) as data:
            assert set(data.files) == {'feat', 's_feat', 'logits'}
            for key in ['feat', 's_feat', 'logits']:
                assert data[key].dtype == np.float32 and data[key].shape[0] == len(sources['ordered'])
                np.testing.assert_allclose(data[key], direct[key].numpy(), rtol=1e-4, atol=1e-5)
        assert direct['s_feat'].shape[1] % 7 == 0


def test_stats_only_equals_statistics_of_activations(tmp_dir, sources, pkl_detector):
    full, stats = tmp_dir / 'full.npz', tmp_dir / 'stats.npz'
    common = ['--data', sources['stored'], '--trust-detector', '--detector', pkl_detector, '--workers', '0', '--batch', '3']
    _ok(['activations', '--dest', str(full), *common])
    _ok(['activations', '--dest', str(stats), *common, '--stats-only'])
    with np.load(full) as a, np.load(stats) as s:
        assert set(s.files) == {'mu', 'sigma', 'mu_s', 'sigma_s'}
        mu, sigma = compute_statistics(a['feat'])
        mu_s, sigma_s = acts.spatial_stats_to_hwc(*compute_statistics(a['s_feat']))
        for got, exp in [(s['mu'], mu), (s['sigma'], sigma), (s['mu_s'], mu_s), (s['sigma_s'], sigma_s)]:
            np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-6)


SHARDED_DRIVER = """
import sys
import evaluate
# One torchrun launch runs several evaluate.py commands (saves process start-up in tests).
for args in [a.split('|') for a in sys.argv[1:]]:
    evaluate.main(args, standalone_mode=False)
"""


def test_sharded_equals_single_process(tmp_dir, sources, pth_detector, pkl_detector):
    # 2 processes (gloo), both detector formats, full activations and streamed statistics.
    runs = [('pth', pth_detector, ()), ('pkl', pkl_detector, ()), ('pkl', pkl_detector, ('--stats-only',))]
    jobs = []
    for i, (fmt, det, extra) in enumerate(runs):
        common = ['activations', '--data', sources['folder'], '--trust-detector', '--detector', det, '--batch', '2', '--workers', '0', *extra]
        single, sharded = tmp_dir / f'single-{i}.npz', tmp_dir / f'sharded-{i}.npz'
        _ok([*common, '--dest', str(single)])
        jobs.append('|'.join([*common, '--dest', str(sharded)]))
    # calc under torchrun, first (before any command joins the process group): rank 0 alone computes,
    # prints and writes --json; the others wait. Every rank ran it before.
    jobs.insert(0, '|'.join(['calc', '-m', 'fid', '--activations_sample', str(tmp_dir / 'single-1.npz'), '--ref', str(tmp_dir / 'single-2.npz'),
                          '--json', str(tmp_dir / 'sharded-calc.json')]))
    driver = tmp_dir / 'sharded_driver.py'
    driver.write_text(SHARDED_DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(driver), *jobs]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('FID: ') == 1 and abs(json.loads((tmp_dir / 'sharded-calc.json').read_text())['FID']) < 1e-6
    for i, (fmt, _det, extra) in enumerate(runs):
        with np.load(tmp_dir / f'single-{i}.npz') as a, np.load(tmp_dir / f'sharded-{i}.npz') as b:
            assert set(a.files) == set(b.files)
            for key in a.files:
                np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=f'{fmt} {extra} {key}')

#----------------------------------------------------------------------------
# calc on every input kind.

@pytest.fixture(scope='module')
def metric_files(tmp_dir, pkl_detector):
    # Synthetic activations with the small pickle detector's sizes (feat 32, 10 classes): the
    # numbers are checked against independent computations, not against a real Inception.
    rng = np.random.default_rng(5)
    w = load_detector(pkl_detector, trust_pickle=True).fc.weight.numpy()

    def fake(n, scale):
        feat = (np.abs(rng.standard_normal([n, 32])) * scale).astype(np.float32)
        s_feat = np.abs(rng.standard_normal([n, 63])).astype(np.float32) * scale
        return feat, s_feat, (feat @ w.T).astype(np.float32)

    smp, ref = fake(90, 1.1), fake(120, 1.0)
    files = dict()
    files['sample'] = tmp_dir / 'calc-sample.npz'
    np.savez(files['sample'], feat=smp[0], s_feat=smp[1], logits=smp[2])
    files['ref'] = tmp_dir / 'calc-ref.npz'
    np.savez(files['ref'], feat=ref[0], s_feat=ref[1], logits=ref[2])
    # The reference's own format: float64 feat/s_feat, no logits.
    files['sample_refstyle'] = tmp_dir / 'calc-sample-refstyle.npz'
    np.savez(files['sample_refstyle'], feat=smp[0].astype(np.float64), s_feat=smp[1].astype(np.float64))
    mu, sigma = compute_statistics(ref[0])
    mu_s, sigma_s = acts.spatial_stats_to_hwc(*compute_statistics(ref[1]))
    files['ref_stats'] = tmp_dir / 'calc-ref-stats.npz'
    np.savez(files['ref_stats'], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    files['ref_adm'] = tmp_dir / 'calc-ref-adm.npz'
    np.savez(files['ref_adm'], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s,
             arr_0=np.zeros([2, 8, 8, 3], dtype=np.uint8))
    files = {k: str(v) for k, v in files.items()}
    files.update(smp_arr=smp, ref_arr=ref)
    return files


def _parse(output):
    values = dict()
    for line in output.strip().splitlines():
        if ': ' in line and not line.startswith(('No logits', 'warning:')):
            name, value = line.rsplit(': ', 1)
            values[name] = float(value)
    return values


def test_calc_values_and_input_kinds(tmp_dir, metric_files, pkl_detector):
    f = metric_files
    smp, ref = f['smp_arr'], f['ref_arr']
    json_path = tmp_dir / 'calc.json'
    out = _ok(['calc', '-m', 'fid', '-m', 'sfid', '-m', 'is', '-m', 'pr', '--activations_sample', f['sample'],
               '--activations_ref', f['ref'], '--json', str(json_path)])
    lines = [l for l in out.stdout.strip().splitlines()]
    assert [l.split(':')[0] for l in lines] == ['FID', 'sFID', 'Inception Score', 'Precision', 'Recall']
    # Small runs are legitimate but off the paper's protocol: one warning line each, on stderr.
    assert 'warning: FID/sFID/Inception Score on' in out.stderr and 'uses 50,000' in out.stderr
    assert 'warning: precision/recall against' in out.stderr
    out = out.stdout
    with open(json_path) as fp:
        res = json.load(fp)

    # Independent values: ADM's sqrtm Frechet distance, sFID on (C,H,W) stats (permutation
    # invariant), IS of the stored logits, precision/recall of the features.
    exp_fid = ref_frechet_distance(*compute_statistics(smp[0]), *compute_statistics(ref[0]))
    exp_sfid = ref_frechet_distance(*compute_statistics(smp[1]), *compute_statistics(ref[1]))
    assert res['FID'] == pytest.approx(exp_fid, rel=1e-6)
    assert res['sFID'] == pytest.approx(exp_sfid, rel=1e-6)
    assert res['Inception Score'] == pytest.approx(inception_score(smp[2]), rel=1e-12)
    assert (res['Precision'], res['Recall']) == precision_recall(ref[0], smp[0])
    assert _parse(out)['FID'] == pytest.approx(res['FID'], rel=1e-5)

    # Statistics file, ADM reference batch: same FID/sFID.
    for kind in ['ref_stats', 'ref_adm']:
        got = _parse(_ok(['calc', '-m', 'fid', '-m', 'sfid', '--activations_sample', f['sample'],
                          '--activations_ref', f[kind]]).output)
        assert got['FID'] == pytest.approx(res['FID'], rel=1e-5)
        assert got['sFID'] == pytest.approx(res['sFID'], rel=1e-5)

    # Reference-style activations (no logits): IS from feat through the detector's classifier.
    got = _parse(_ok(['calc', '-m', 'is', '-m', 'fid', '--activations_sample', f['sample_refstyle'],
                      '--activations_ref', f['ref'], '--trust-detector', '--detector', pkl_detector]).output)
    assert got['Inception Score'] == pytest.approx(res['Inception Score'], rel=1e-5)
    assert got['FID'] == pytest.approx(res['FID'], rel=1e-5)

    # --is-bias: the reference evaluate.py's IS (classifier bias added), from stored logits or from feat.
    from metrics.detector import load_detector
    bias = load_detector(pkl_detector, verbose=False, trust_pickle=True).fc.bias.detach().numpy()
    expected = inception_score(smp[2] + bias)
    assert expected != pytest.approx(res['Inception Score'], rel=1e-6)
    for source in ['sample', 'sample_refstyle']:
        got = _parse(_ok(['calc', '-m', 'is', '--is-bias', '--activations_sample', f[source], '--trust-detector', '--detector', pkl_detector]).output)
        assert got['Inception Score'] == pytest.approx(expected, rel=1e-5)

#----------------------------------------------------------------------------
# Bad input.

def test_calc_bad_input(tmp_dir, metric_files):
    f = metric_files
    feat = f['smp_arr'][0]
    bad = dict(
        dims=dict(feat=feat[:, :16]),
        one=dict(feat=feat[:1], s_feat=f['smp_arr'][1][:1]),
        nan=dict(feat=np.where(np.arange(32) == 5, np.nan, feat).astype(np.float32)),
        scalar=dict(s_feat=np.float32(3), logits=np.float32(2)),
        empty=dict(logits=np.zeros([0, 1008], np.float32)),
    )
    for name, arrays in bad.items():
        np.savez(tmp_dir / f'bad-{name}.npz', **arrays)
    ref = f['ref']
    _fails(['calc', '-m', 'fid', '--activations_sample', str(tmp_dir / 'bad-dims.npz'), '--activations_ref', ref], 'dimensions differ')
    _fails(['calc', '-m', 'pr', '--activations_sample', str(tmp_dir / 'bad-dims.npz'), '--activations_ref', ref], 'dimensions differ')
    _fails(['calc', '-m', 'fid', '--activations_sample', str(tmp_dir / 'bad-one.npz'), '--activations_ref', ref], 'at least 2')
    _fails(['calc', '-m', 'fid', '--activations_sample', str(tmp_dir / 'bad-nan.npz'), '--activations_ref', ref], 'NaN or inf')
    for metric, key in [('sfid', 's_feat'), ('is', 'logits')]:  # Shapes are checked before any is read (was an IndexError).
        _fails(['calc', '-m', metric, '--activations_sample', str(tmp_dir / 'bad-scalar.npz'), '--activations_ref', ref], f'{key} has shape []')
    _fails(['calc', '-m', 'is', '--activations_sample', str(tmp_dir / 'bad-empty.npz')], 'expected [N, D] with N, D >= 1')  # Was nan.
    _fails(['calc', '-m', 'pr', '--activations_sample', f['sample'], '--activations_ref', f['ref_stats']], 'per-image feat')
    _fails(['calc', '-m', 'pr', '--activations_sample', f['sample'], '--activations_ref', f['ref_adm']], 'evaluate.py activations --data')
    _fails(['calc', '-m', 'is', '--activations_sample', f['ref_stats']], 'logits or feat')
    _fails(['calc', '-m', 'sfid', '--activations_sample', str(tmp_dir / 'bad-dims.npz'), '--activations_ref', ref], 's_feat or mu_s/sigma_s')
    _fails(['calc', '-m', 'fid', '--activations_sample', f['sample']], '--activations_ref is required')
    (tmp_dir / 'not-npz.npz').write_text('hello')
    _fails(['calc', '-m', 'fid', '--activations_sample', str(tmp_dir / 'not-npz.npz'), '--activations_ref', ref], 'cannot read as .npz')
    _fails(['calc', '-m', 'fid', '--activations_sample', str(tmp_dir / 'missing.npz'), '--activations_ref', ref], 'missing.npz')


def test_activations_bad_input(tmp_dir, sources, pkl_detector, images):
    def run(data, dest, match, extra=()):
        _fails(['activations', '--data', str(data), '--dest', str(tmp_dir / dest), '--trust-detector', '--detector', pkl_detector,
                '--workers', '0', *extra], match)
        assert not (tmp_dir / dest).exists()

    # Unreadable image: a PNG whose header is fine and whose data is cut off.
    broken = tmp_dir / 'broken'
    broken.mkdir()
    for i in range(3):
        PIL.Image.fromarray(images[i]).save(broken / f'{i}.png')
    data = (broken / '1.png').read_bytes()
    (broken / '1.png').write_bytes(data[:len(data) // 2])
    run(broken, 'x1.npz', '1.png')
    run(broken, 'x1b.npz', '1.png', extra=('--workers', '1'))
    single = tmp_dir / 'single'
    single.mkdir()
    PIL.Image.fromarray(images[0]).save(single / '0.png')
    run(single, 'x2.npz', 'need at least 2')
    np.savez(tmp_dir / 'float-images.npz', arr_0=images.astype(np.float32))
    run(tmp_dir / 'float-images.npz', 'x3.npz', 'expected uint8')
    np.savez(tmp_dir / 'no-arr0.npz', feat=np.zeros([3, 4]))
    run(tmp_dir / 'no-arr0.npz', 'x4.npz', 'no arr_0')
    run(tmp_dir / 'nowhere', 'x5.npz', 'no such file')
    data = open(sources['stored'], 'rb').read()
    (tmp_dir / 'cut.npz').write_bytes(data[:len(data) // 2])
    run(tmp_dir / 'cut.npz', 'x7.npz', 'cannot read')
    (tmp_dir / 'junk.pth').write_bytes(b'not a torch file')
    _fails(['activations', '--data', sources['stored'], '--dest', str(tmp_dir / 'x6.npz'), '--trust-detector', '--detector', str(tmp_dir / 'junk.pth')],
           'cannot load detector')
    # Never overwrite an existing output.
    existing = tmp_dir / 'existing.npz'
    existing.write_bytes(b'keep me')
    _fails(['activations', '--data', sources['stored'], '--dest', str(existing), '--trust-detector', '--detector', pkl_detector], 'already exists')
    assert existing.read_bytes() == b'keep me'
