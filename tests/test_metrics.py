"""Numerics of metrics/: Frechet distance, statistics, precision/recall, Inception Score,
the Inception module's pieces. Independent computations in plain numpy/scipy."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from dnnlib import UserError
from metrics import activations as acts
from metrics.compute import compute_metrics
from metrics.frechet import StatsAccumulator, compute_statistics, frechet_distance
from metrics.inception import InceptionV3, load_inception_state_dict, tf_resize_bilinear
from metrics.inception_score import inception_score
from metrics.precision_recall import _FeatureSet, _Radii, precision_recall
from reference_restatement import ref_frechet_distance, ref_precision_recall

#----------------------------------------------------------------------------
# Frechet distance and statistics.

def _random_spd(rng, d, rank=None):
    a = rng.standard_normal([d, rank or 2 * d])
    return a @ a.T / a.shape[1]


def test_fid_closed_form_commuting_gaussians():
    # Shared eigenvectors: FD = |dmu|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    d = 48
    q, _ = np.linalg.qr(rng.standard_normal([d, d]))
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, (q * a) @ q.T, mu1, (q * a) @ q.T) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize('d,rank', [(64, None), (96, 40)])  # full rank, and singular S1 and S2
def test_fid_matches_scipy_sqrtm(d, rank):
    rng = np.random.default_rng(d)
    s1, s2 = _random_spd(rng, d, rank), _random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 0.1
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert ref_frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_statistics_match_numpy_and_merge():
    rng = np.random.default_rng(1)
    x = rng.standard_normal([1000, 12]) * 3 + 100  # Large offset: cancellation-prone.
    mu, sigma = compute_statistics(x, batch_size=128)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-10)
    # Two accumulators merged by hand with the same formula finalize() uses across ranks.
    parts = [StatsAccumulator(12), StatsAccumulator(12)]
    parts[0].update(torch.from_numpy(x[:300]))
    parts[1].update(torch.from_numpy(x[300:700]))
    parts[1].update(torch.from_numpy(x[700:]))
    n = np.array([p.n for p in parts], dtype=np.float64)
    means = [p.shift.numpy() + p.s1.numpy() / p.n for p in parts]
    m2 = [p.s2.numpy() - np.outer(p.s1.numpy(), p.s1.numpy()) / p.n for p in parts]
    mu_all = (n[0] * means[0] + n[1] * means[1]) / n.sum()
    total = sum(m2[i] + n[i] * np.outer(means[i] - mu_all, means[i] - mu_all) for i in range(2))
    np.testing.assert_allclose(total / (n.sum() - 1), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-10)


def test_fid_bad_input():
    rng = np.random.default_rng(2)
    s = _random_spd(rng, 8)
    with pytest.raises(UserError, match='dimensions differ'):
        frechet_distance(np.zeros(8), s, np.zeros(9), _random_spd(rng, 9))
    bad = s.copy()
    bad[0, 0] = np.nan
    with pytest.raises(UserError, match='NaN'):
        frechet_distance(np.zeros(8), bad, np.zeros(8), s)
    with pytest.raises(UserError, match='at least 2'):
        compute_statistics(np.zeros([1, 8]))

#----------------------------------------------------------------------------
# Precision / recall.

def _brute_force_pr(ref, smp, k=3):
    def d2(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)
    r_ref = np.sort(d2(ref, ref), axis=1)[:, k].astype(np.float32).astype(np.float64)
    r_smp = np.sort(d2(smp, smp), axis=1)[:, k].astype(np.float32).astype(np.float64)
    d = d2(ref, smp)
    precision = (d <= r_ref[:, None]).any(axis=0).mean()
    recall = (d <= r_smp[None, :]).any(axis=1).mean()
    return precision, recall, r_ref


def manifold_radii(feats, block):
    # The exact k=3 radii that precision_recall's float64 pass gives every row (float32-rounded).
    fs = _FeatureSet(feats, feats.mean(axis=0, dtype=np.float64), torch.device('cpu'))
    return _Radii(fs, 3, block).get(torch.arange(len(feats)))


def test_precision_recall_brute_force():
    rng = np.random.default_rng(3)
    ref = np.abs(rng.standard_normal([300, 10])).astype(np.float32)
    smp = (np.abs(rng.standard_normal([250, 10])) * 1.2 + 0.05).astype(np.float32)
    p_exp, r_exp, radii_exp = _brute_force_pr(ref, smp)
    assert 0.05 < p_exp < 0.95 and 0.05 < r_exp < 0.95  # A test that can fail.
    # Small blocks: many blocks, uneven edges, symmetric-block bookkeeping.
    p, r = precision_recall(ref, smp, block=64)
    assert (p, r) == (p_exp, r_exp)
    np.testing.assert_array_equal(manifold_radii(ref, block=37).numpy(), radii_exp)
    assert ref_precision_recall(ref, smp, batch=100) == (p_exp, r_exp)


def test_precision_recall_float64_settlement():
    # Far-apart clusters of close points: the float32 error bound (which scales with the norms)
    # dwarfs the neighbour distances, so most decisions and radii must be settled in float64,
    # and the result must equal the reference-style float64 computation exactly.
    rng = np.random.default_rng(4)
    centers = rng.standard_normal([12, 32]) * 30
    ref = centers[rng.integers(0, 12, 400)] + rng.standard_normal([400, 32]) * 0.01
    smp = centers[rng.integers(0, 12, 350)] + rng.standard_normal([350, 32]) * 0.012
    p, r, info = precision_recall(ref, smp, block=128, return_info=True)
    assert info['ambiguous_samples'] > 0 and info['ambiguous_refs'] > 0 and info['exact_radii'] > 0
    expected = ref_precision_recall(ref, smp, batch=128)
    assert 0.05 < expected[0] < 0.99 and 0.05 < expected[1] < 0.99
    assert (p, r) == expected
    _, _, radii_exp = _brute_force_pr(ref, smp)
    # Direct differences vs the reference's |u|^2 - 2u.v + |v|^2 can differ by an ulp here.
    np.testing.assert_allclose(manifold_radii(ref, block=100).numpy(), radii_exp, rtol=1e-6)


def test_precision_recall_bad_input():
    rng = np.random.default_rng(5)
    a = rng.standard_normal([20, 6]).astype(np.float32)
    with pytest.raises(UserError, match='dimensions differ: 7 in the samples, 6 in ref'):  # Checked where both are read.
        compute_metrics(['pr'], acts.FeatureSet({'feat': rng.standard_normal([20, 7])}), acts.FeatureSet({'feat': a}, name='ref'))
    with pytest.raises(UserError, match='at least 4'):
        precision_recall(a, a[:3])
    b = a.copy()
    b[3, 2] = np.inf
    with pytest.raises(UserError, match='the samples: feat contains NaN or inf'):  # Checked where features are read.
        compute_metrics(['pr'], acts.FeatureSet({'feat': b}), acts.FeatureSet({'feat': a}, name='ref'))

#----------------------------------------------------------------------------
# Inception score.

def test_inception_score_by_hand():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal([23, 5]) * 3
    expected = []
    for part in [logits[0:10], logits[10:20], logits[20:23]]:  # split_size=10, short last split
        p = np.exp(part) / np.exp(part).sum(1, keepdims=True)
        py = p.mean(0, keepdims=True)
        expected.append(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(py)), 1))))
    assert inception_score(logits, split_size=10) == pytest.approx(np.mean(expected), rel=1e-12)
    # Identical predictions everywhere: IS = 1; one-hot-like distinct classes: IS ~ classes.
    assert inception_score(np.zeros([8, 4]), split_size=5000) == pytest.approx(1.0)
    assert inception_score(np.eye(4) * 60, split_size=5000) == pytest.approx(4.0, rel=1e-6)
    with pytest.raises(UserError, match='logits contains NaN or inf'):  # Checked where logits are read.
        compute_metrics(['is'], acts.FeatureSet({'logits': np.full([3, 4], np.nan)}))

#----------------------------------------------------------------------------
# Inception module pieces and layouts.

def _tf_resize_loop(img, h, w):
    ih, iw = img.shape
    out = np.zeros([h, w], dtype=np.float32)
    sy, sx = np.float32(ih) / np.float32(h), np.float32(iw) / np.float32(w)
    for y in range(h):
        fy = np.float32(y) * sy
        y0 = int(np.floor(fy)); y1 = min(y0 + 1, ih - 1); ly = np.float32(fy - y0)
        for x in range(w):
            fx = np.float32(x) * sx
            x0 = int(np.floor(fx)); x1 = min(x0 + 1, iw - 1); lx = np.float32(fx - x0)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * lx
            bot = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * lx
            out[y, x] = top + (bot - top) * ly
    return out


def test_tf_resize_bilinear_semantics():
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, [13, 9]).astype(np.float32)
    got = tf_resize_bilinear(torch.from_numpy(img)[None, None], 20, 17)[0, 0].numpy()
    np.testing.assert_allclose(got, _tf_resize_loop(img, 20, 17), rtol=1e-6, atol=1e-4)
    assert got[0, 0] == img[0, 0]  # No half-pixel offset: corners align at the origin.


def test_inception_state_dict_and_outputs():
    torch.manual_seed(0)
    net = InceptionV3().eval()
    state = dict(net.state_dict())
    state['Conv2d_1a_3x3.bn.num_batches_tracked'] = torch.tensor(0)  # torchvision extras are ignored
    state['AuxLogits.fc.weight'] = torch.zeros([1008, 768])
    loaded = load_inception_state_dict(state)
    loaded_state = loaded.state_dict()
    for name, value in net.state_dict().items():
        assert torch.equal(loaded_state[name], value), name
    with torch.no_grad():  # One image at the real 299 size (slow-ish on CPU).
        out = loaded(torch.randint(0, 256, [1, 3, 24, 24], dtype=torch.uint8))
    assert out['feat'].shape == (1, 2048) and out['s_feat'].shape == (1, 2023) and out['logits'].shape == (1, 1008)
    torch.testing.assert_close(out['logits'], out['feat'] @ net.fc.weight.T)  # no bias (ADM)
    state.pop('Mixed_6d.branch1x1.conv.weight')
    with pytest.raises(ValueError, match='missing'):
        load_inception_state_dict(state)


def test_spatial_layout_permutation():
    # s_feat (C, H, W) rows -> ADM's (H, W, C) flattening of the same tensor.
    x = torch.randn([3, 7, 5, 5])
    chw = x.flatten(1).numpy()
    hwc = x.permute(0, 2, 3, 1).flatten(1).numpy()
    idx = acts.spatial_chw_to_hwc_index(chw.shape[1])
    np.testing.assert_array_equal(chw[:, idx], hwc)
    mu, sigma = chw.mean(0), np.cov(chw, rowvar=False)
    mu_h, sigma_h = acts.spatial_stats_to_hwc(mu, sigma)
    np.testing.assert_allclose(sigma_h, np.cov(hwc, rowvar=False), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mu_h, hwc.mean(0), rtol=1e-6)


def test_fid_refuses_covariances_that_are_not_symmetric_psd():
    rng = np.random.default_rng(3)
    s = _random_spd(rng, 6)
    mu = np.zeros(6)
    singular = _random_spd(rng, 6, rank=2)  # PSD with zero eigenvalues: accepted.
    assert np.isfinite(frechet_distance(mu, singular, mu, s))
    w, v = np.linalg.eigh(s)
    indefinite = (v * np.where(np.arange(6) == 0, -w.max(), w)) @ v.T  # One eigenvalue clearly negative.
    with pytest.raises(UserError, match='not positive semi-definite'):
        frechet_distance(mu, indefinite, mu, s)
    with pytest.raises(UserError, match='not positive semi-definite'):
        frechet_distance(mu, s, mu, -s)
    with pytest.raises(UserError, match='not positive semi-definite'):
        frechet_distance(mu, singular, mu, indefinite)  # Singular S1: S2 is checked on its own.
    asym = s.copy()
    asym[0, 1] += 0.1 * np.abs(s).max()
    with pytest.raises(UserError, match='not symmetric'):
        frechet_distance(mu, s, mu, asym)
    rounded = s.astype(np.float32).astype(np.float64)  # float32 rounding of a file: accepted.
    assert abs(frechet_distance(mu, rounded, mu, s)) < 1e-4

#----------------------------------------------------------------------------
# KID.

def _kid_by_hand(x, y, degree=3, coef0=1):
    """Unbiased MMD^2 from its definition, pair by pair."""
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + coef0) ** degree
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_against_pairwise_definition():
    from metrics.kid import kernel_inception_distance
    rng = np.random.default_rng(4)
    smp = rng.standard_normal([40, 5]).astype(np.float32) + 0.3
    ref = rng.standard_normal([50, 5]).astype(np.float32)
    mean, std = kernel_inception_distance(smp, ref, num_subsets=3, subset_size=12)
    draw = np.random.RandomState(2020)  # torch-fidelity's seed; sample rows first, then reference rows.
    mmds = []
    for _ in range(3):
        i = draw.choice(40, 12, replace=False)
        j = draw.choice(50, 12, replace=False)
        mmds.append(_kid_by_hand(smp[i].astype(np.float64), ref[j].astype(np.float64)))
    assert mean == pytest.approx(np.mean(mmds), rel=1e-10)
    assert std == pytest.approx(np.std(mmds), rel=1e-8)
    same, _ = kernel_inception_distance(ref, ref, num_subsets=5, subset_size=20)
    far, _ = kernel_inception_distance(ref + 2, ref, num_subsets=5, subset_size=20)
    assert abs(same) < far
    with pytest.raises(UserError, match='subset size 60 exceeds'):
        kernel_inception_distance(smp, ref, subset_size=60)
    with pytest.raises(UserError, match='dimensions differ'):  # Checked where both are read.
        compute_metrics(['kid'], acts.FeatureSet({'feat': smp}), acts.FeatureSet({'feat': ref[:, :4]}))


#----------------------------------------------------------------------------
# Inputs far from the usual range: constant features, huge and tiny magnitudes.

def test_fid_of_constant_features_is_defined():
    # A collapsed generator (every sample the same) has a zero covariance: valid, and FID is
    # |mu1 - mu2|^2 + tr(S2). It was refused as "not positive semi-definite".
    rng = np.random.default_rng(8)
    ref = rng.standard_normal([60, 12]).astype(np.float32)
    const = np.tile(rng.standard_normal([1, 12]).astype(np.float32), [50, 1])
    mu_c, sigma_c = compute_statistics(const)
    mu_r, sigma_r = compute_statistics(ref)
    expected = float(((mu_c - mu_r) ** 2).sum() + np.trace(sigma_r))
    assert frechet_distance(mu_c, sigma_c, mu_r, sigma_r) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu_r, sigma_r, mu_c, np.zeros([12, 12])) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu_c, np.zeros([12, 12]), mu_r * 0, np.zeros([12, 12])) == pytest.approx(float((mu_c ** 2).sum()), rel=1e-12)
    with pytest.raises(UserError, match='not positive semi-definite'):
        frechet_distance(mu_c, np.zeros([12, 12]), mu_r, -np.eye(12))


@pytest.mark.parametrize('scale', [2.0 ** 70, 2.0 ** -90, 1e20])
def test_precision_recall_of_huge_or_tiny_features(scale):
    # Squared distances of features x 1e20 overflow float32: P = R = 0 was printed.
    rng = np.random.default_rng(9)
    ref = np.abs(rng.standard_normal([80, 16])).astype(np.float32)
    smp = (np.abs(rng.standard_normal([70, 16])) * 1.2).astype(np.float32)
    expected = precision_recall(ref, smp)
    assert 0.1 < expected[0] < 0.9 and 0.1 < expected[1] < 0.99
    assert precision_recall(ref * scale, ref * scale) == (1.0, 1.0)
    got = precision_recall(ref * scale, smp * scale)
    if math.log2(scale).is_integer():  # A power of two: exactly the same decisions.
        assert got == expected
    else:
        assert got == pytest.approx(expected, abs=0.03)
