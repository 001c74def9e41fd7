"""evaluate.py's FD-DINOv2, KID, named references, protocol warnings and early output checks, on
CPU with random-weight detectors the tests write."""

import os

import numpy as np
import pytest
import torch

import evaluate
from metrics import refs
import dnnlib.util as files_module
from metrics.dinov2 import DINOv2ViT, load_dinov2
from metrics.frechet import compute_statistics
from reference_restatement import ref_frechet_distance
from metrics.inception import InceptionV3
from metrics.kid import kernel_inception_distance
from test_evaluate import _fails, _ok  # The evaluate CLI helpers: one copy.


def _values(stdout):
    return {k: float(v) for k, v in (line.rsplit(': ', 1) for line in stdout.strip().splitlines())}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('fdkid')
    torch.manual_seed(1)
    inception = InceptionV3(resolution=75)
    for m in inception.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
    torch.save(dict(inception.state_dict(), resolution=torch.tensor(75)), tmp / 'inception.pth')
    vit = DINOv2ViT(dim=64, depth=1, num_heads=1, patch_size=14, img_size=56)
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    torch.save(vit.state_dict(), tmp / 'dinov2.pth')
    rng = np.random.default_rng(0)
    np.savez(tmp / 'a.npz', arr_0=rng.integers(0, 256, [9, 20, 20, 3], dtype=np.uint8))
    np.savez(tmp / 'b.npz', arr_0=rng.integers(0, 128, [8, 20, 20, 3], dtype=np.uint8))
    return dict(tmp=tmp, inception=str(tmp / 'inception.pth'), dinov2=str(tmp / 'dinov2.pth'),
                a=str(tmp / 'a.npz'), b=str(tmp / 'b.npz'))


def test_dinov2_features_fd_and_kid(files):
    tmp = files['tmp']
    for name in ['a', 'b']:
        _ok(['activations', '--data', files[name], '--dest', str(tmp / f'acts_{name}.npz'), '--detector', files['inception'],
             '--features', 'inception', '--features', 'dinov2', '--dinov2', files['dinov2'], '--workers', '0'])
    a, b = np.load(tmp / 'acts_a.npz'), np.load(tmp / 'acts_b.npz')
    assert sorted(a.files) == ['dinov2', 'feat', 'logits', 's_feat'] and a['dinov2'].shape == (9, 64)
    images = torch.from_numpy(np.load(files['a'])['arr_0']).permute(0, 3, 1, 2)
    np.testing.assert_allclose(a['dinov2'], load_dinov2(files['dinov2'], verbose=False)(images)['dinov2'].numpy(), rtol=1e-5, atol=1e-5)

    # Stats-only: DINOv2 statistics under their own keys, equal to those of the features.
    _ok(['activations', '--data', files['b'], '--dest', str(tmp / 'stats_b.npz'), '--detector', files['inception'],
         '--features', 'dinov2', '--features', 'inception', '--dinov2', files['dinov2'], '--workers', '0', '--stats-only'])
    st = np.load(tmp / 'stats_b.npz')
    assert sorted(st.files) == ['mu', 'mu_dinov2', 'mu_s', 'sigma', 'sigma_dinov2', 'sigma_s']
    mu, sigma = compute_statistics(b['dinov2'])
    np.testing.assert_allclose(st['mu_dinov2'], mu, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(st['sigma_dinov2'], sigma, rtol=1e-6, atol=1e-8)

    # FD_DINOv2 against ADM's sqrtm formula on the features; KID sample-vs-reference order.
    res = _ok(['calc', '-m', 'kid', '-m', 'fd_dinov2', '--activations_sample', str(tmp / 'acts_a.npz'),
               '--ref', str(tmp / 'acts_b.npz'), '--kid-subsets', '4', '--kid-subset-size', '5'])
    got = _values(res.stdout)
    assert list(got) == ['KID', 'KID std', 'FD_DINOv2']
    exp = ref_frechet_distance(*compute_statistics(a['dinov2']), *compute_statistics(b['dinov2']))
    assert got['FD_DINOv2'] == pytest.approx(exp, rel=1e-5)
    kid = kernel_inception_distance(a['feat'], b['feat'], num_subsets=4, subset_size=5)
    assert (got['KID'], got['KID std']) == pytest.approx(kid, rel=1e-5)
    assert 'FD_DINOv2 on 9 samples' in res.stderr
    got_stats = _values(_ok(['calc', '-m', 'fd_dinov2', '--activations_sample', str(tmp / 'acts_a.npz'), '--ref', str(tmp / 'stats_b.npz')]).stdout)
    assert got_stats['FD_DINOv2'] == pytest.approx(exp, rel=1e-5)

    # What is missing is named, with the fix.
    _fails(['calc', '-m', 'fd_dinov2', '--activations_sample', str(tmp / 'acts_a.npz'), '--ref', files['b']],
           'FD_DINOv2 needs dinov2 or mu_dinov2/sigma_dinov2')
    _fails(['calc', '-m', 'kid', '--activations_sample', str(tmp / 'acts_a.npz'), '--ref', str(tmp / 'acts_b.npz')],
           'KID subset size 1000 exceeds')
    _fails(['calc', '-m', 'kid', '--activations_sample', str(tmp / 'acts_a.npz'), '--ref', str(tmp / 'acts_b.npz'), '--kid-subset-size', '1'],
           'Invalid value for \'--kid-subset-size\'')
    _fails(['activations', '--data', files['a'], '--dest', str(tmp / 'x.npz'), '--features', 'dinov2', '--dinov2', files['inception']],
           'not a DINOv2 ViT state dict')
    assert not os.path.exists(tmp / 'x.npz')


def test_calc_refuses_non_psd_covariance(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal([50, 6])
    mu, sigma = compute_statistics(x)
    np.savez(tmp_path / 'good.npz', mu=mu, sigma=sigma)
    w, v = np.linalg.eigh(sigma)
    np.savez(tmp_path / 'neg.npz', mu=mu, sigma=(v * np.where(np.arange(6) == 0, -w.max(), w)) @ v.T)
    bad_sym = sigma.copy()
    bad_sym[0, 1] += 1
    np.savez(tmp_path / 'asym.npz', mu=mu, sigma=bad_sym)
    np.savez(tmp_path / 'zero.npz', mu=mu, sigma=-np.eye(6))
    for name, match in [('neg', 'not positive semi-definite'), ('asym', 'not symmetric'), ('zero', 'not positive semi-definite')]:
        result = _fails(['calc', '-m', 'fid', '--activations_sample', str(tmp_path / 'good.npz'), '--ref', str(tmp_path / f'{name}.npz')], match)
        assert 'FID:' not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_outputs_checked_before_work(tmp_path, monkeypatch):
    np.savez(tmp_path / 's.npz', mu=np.zeros(3), sigma=np.eye(3))
    (tmp_path / 'afile').write_text('x')
    calc = ['calc', '-m', 'fid', '--activations_sample', str(tmp_path / 's.npz'), '--ref', str(tmp_path / 's.npz')]
    _fails(calc + ['--json', str(tmp_path / 'afile' / 'out.json')], 'is a file')
    _fails(calc + ['--json', str(tmp_path / 'nodir' / 'out.json')], 'does not exist')
    _fails(['activations', '--data', str(tmp_path / 'missing'), '--dest', str(tmp_path / 'afile' / 'o.npz')], 'is a file')
    # An unwritable folder (read-only file system, or permissions for a non-root user): refused
    # before the missing --data is even looked at, i.e. before any work.
    real_temporary_file = files_module.tempfile.TemporaryFile
    def read_only(*args, **kwargs):
        if kwargs.get('dir') == str(tmp_path / 'ro'):
            raise OSError(30, 'Read-only file system')
        return real_temporary_file(*args, **kwargs)
    (tmp_path / 'ro').mkdir()
    monkeypatch.setattr(files_module.tempfile, 'TemporaryFile', read_only)
    _fails(['activations', '--data', str(tmp_path / 'missing'), '--dest', str(tmp_path / 'ro' / 'o.npz')], 'Read-only file system')
    _fails(calc + ['--json', str(tmp_path / 'ro' / 'r.json')], 'cannot write in')
    assert os.listdir(tmp_path / 'ro') == []


def test_named_references_and_protocol_warnings(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / 'ref.npz', feat=rng.standard_normal([12, 4]).astype(np.float32))
    np.savez(tmp_path / 'smp.npz', feat=rng.standard_normal([12, 4]).astype(np.float32))
    named = refs.Reference(url=(tmp_path / 'ref.npz').as_uri(), holds='test set', purpose='a test protocol',
                           approx_bytes=1000, num_images=12)
    monkeypatch.setitem(refs.REFERENCES, 'test-ref', named)
    listing = _ok(['refs']).stdout
    for name in ['celebahq-256', 'imagenet-256-stats', 'imagenet-256-pr10k', 'adm-imagenet-256', 'test-ref']:
        assert name in listing
    assert 'VIRTUAL_imagenet256_labeled.npz' in listing and 'none published' in listing
    by_name = _ok(['calc', '-m', 'pr', '-m', 'fid', '--activations_sample', str(tmp_path / 'smp.npz'), '--ref', 'test-ref'])
    by_path = _ok(['calc', '-m', 'pr', '-m', 'fid', '--activations_sample', str(tmp_path / 'smp.npz'), '--ref', str(tmp_path / 'ref.npz')])
    assert by_name.stdout == by_path.stdout
    assert 'precision/recall against' not in by_name.stderr      # 12 = the named set's own size.
    assert 'uses 10,000 for ImageNet' in by_path.stderr          # An unnamed 12-image reference.
    _fails(['calc', '-m', 'fid', '--activations_sample', str(tmp_path / 'smp.npz'), '--ref', 'no-such-ref'], 'no-such-ref')

    # The protocol's sizes give no warning; a truncated sample count does.
    assert evaluate.protocol_warnings({'FID': 1, 'Precision': 1}, 50000, 10000) == []
    assert evaluate.protocol_warnings({'FID': 1, 'Precision': 1}, 50000, 30000) == []
    assert len(evaluate.protocol_warnings({'sFID': 1}, 49999, None)) == 1
    assert evaluate.protocol_warnings({'Precision': 1}, 100, None) == []
