"""Blurring maths (training/blurring.py) and BlurLoss, checked against independent computations:
scipy's DCT per block, the reference's schedule formula through scipy.stats.norm, the reference's
16-roll block noise, and a re-statement of the reference's loss."""

import numpy as np
import pytest
import scipy.fft
import scipy.stats
import torch

from reference_restatement import ref_alpha, ref_block_dct_np, ref_blur_loss, ref_roll_sum
from training import blurring
from training.loss import BlurLoss

#----------------------------------------------------------------------------
# Block DCT.

@pytest.mark.parametrize('k', [2, 3, 4, 8])
def test_dct_matrix_is_orthonormal(k):
    mat = blurring.dct_matrix(k)
    assert torch.allclose(mat @ mat.T, torch.eye(k, dtype=torch.float64), atol=1e-14)
    # Matches scipy's orthonormal DCT-II of the unit vectors.
    ref = scipy.fft.dct(np.eye(k), axis=0, norm='ortho')
    assert np.abs(mat.numpy() - ref).max() < 1e-14


@pytest.mark.parametrize('k,shape', [(4, (2, 3, 12, 16)), (3, (1, 2, 9, 6)), (2, (1, 1, 2, 2))])
def test_block_dct_matches_scipy_per_block(k, shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    coefs = blurring.block_dct(x, k)
    assert np.abs(coefs.numpy() - ref_block_dct_np(x.numpy(), k)).max() < 1e-13
    back = blurring.block_idct(coefs, k)
    assert np.abs(back.numpy() - ref_block_dct_np(coefs.numpy(), k, inverse=True)).max() < 1e-13
    assert torch.allclose(back, x, atol=1e-13)
    # Orthonormal: energy is preserved.
    assert torch.allclose((coefs ** 2).sum(), (x ** 2).sum(), rtol=1e-12)


def test_block_dct_float32_and_bad_size():
    x = torch.randn(2, 3, 8, 8)
    assert blurring.block_dct(x, 4).dtype == torch.float32
    assert torch.allclose(blurring.block_idct(blurring.block_dct(x, 4), 4), x, atol=1e-5)
    with pytest.raises(ValueError, match='not divisible'):
        blurring.block_dct(torch.zeros(1, 1, 10, 8), 4)

#----------------------------------------------------------------------------
# Blur schedule.

@pytest.mark.parametrize('k,prob_length,blur_sigma_max', [(4, 0.93, 3.0), (4, 1.05, 2.0), (2, 0.89, 3.0)])
def test_alpha_schedule_equals_reference_formula(k, prob_length, blur_sigma_max):
    sigmas = torch.tensor(np.geomspace(0.008, 0.9, 37), dtype=torch.float64)
    alphas = blurring.alpha_schedule(sigmas, k, prob_length=prob_length, blur_sigma_max=blur_sigma_max)
    assert alphas.shape == (37, k, k) and alphas.dtype == torch.float32
    size = 8 * k
    for sigma, alpha in zip(sigmas, alphas):
        ref = ref_alpha(sigma.item(), k, size, prob_length, blur_sigma_max)
        assert ref.dtype == torch.float32
        # Same float32 values (tiled); allow one float32 ulp for exp implementation paths.
        assert (alpha.repeat(size // k, size // k) - ref).abs().max() <= 1.2e-7


def test_alpha_schedule_endpoints():
    k, prob_length, blur_sigma_max, min_scale = 4, 0.93, 3.0, 0.001
    # sigma -> 0: u = 0, no blur: every frequency kept.
    alpha0 = blurring.alpha_schedule(torch.tensor([1e-12]), k, prob_length, blur_sigma_max)[0]
    assert torch.allclose(alpha0, torch.ones(k, k), atol=1e-6)
    # u = 1 (sigma at the end of the blur time): blur sigma = blur_sigma_max.
    sigma_end = torch.tensor(np.exp(scipy.stats.norm.ppf(prob_length) * 1.2 - 1.2))  # u = Phi((ln sigma + 1.2) / 1.2) / prob_length = 1
    alpha1 = blurring.alpha_schedule(sigma_end.reshape(1), k, prob_length, blur_sigma_max)[0]
    f = np.pi * np.arange(k) / k
    expect = np.exp(-(f[:, None] ** 2 + f[None, :] ** 2) * blur_sigma_max ** 2 / 2) * (1 - min_scale) + min_scale
    assert np.abs(alpha1.numpy() - expect).max() < 1e-5
    assert alpha1[0, 0] == 1 # the block mean is never blurred
    # Monotone: more noise, more blur at every non-DC frequency.
    alphas = blurring.alpha_schedule(torch.tensor([0.01, 0.1, 0.5, 0.9]), k, prob_length, blur_sigma_max)
    assert (alphas[1:, 1:, 1:] <= alphas[:-1, 1:, 1:]).all() and (alphas[1:, 1, 1] < alphas[:-1, 1, 1]).all()
    assert alphas.min() >= min_scale * (1 - 1e-6)


def test_blur_sigma_of_noise_level_is_bit_exact():
    for sigma in [0.008, 0.0123, 0.31, 0.8999]:
        u = scipy.stats.norm.cdf((np.log(np.float64(sigma)) + 1.2) / 1.2) / 0.93
        ref = 3 * torch.sin(torch.tensor(u) * torch.pi / 2) ** 2
        assert blurring.blur_sigma_of_noise_level(sigma, 0.93, 3).item() == ref.item()


def test_blur_identity_and_dc():
    # Seeded: the variance order compares two different images (a few seeds in 2000 reverse it).
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(blurring.blur(x, 0.0, 4), x, atol=1e-12)
    y = blurring.blur(x, torch.tensor([1.0, 3.0]), 4)
    block_mean = lambda z: z.reshape(2, 3, 2, 4, 3, 4).mean(dim=(3, 5))
    assert torch.allclose(block_mean(y), block_mean(x), atol=1e-12)
    assert y[1].var() < y[0].var() < x.var()

#----------------------------------------------------------------------------
# Block noise.

def test_block_noise_equals_reference_roll_sum():
    g = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    k = 4
    ref = ref_roll_sum(g, k)
    ours = blurring.block_noise(g, randn_like=lambda ref_: g.clone(), k=k)
    assert (ours - ref).abs().max() < 1e-14
    assert torch.equal(blurring.block_noise(g, randn_like=lambda ref_: g.clone(), k=1), g)


def test_block_noise_variance_and_correlation():
    k = 4
    gen = torch.Generator().manual_seed(0)
    noise = blurring.block_noise(torch.zeros(2048, 1, 16, 16, dtype=torch.float64),
                                 randn_like=lambda r: torch.randn(r.shape, dtype=r.dtype, generator=gen), k=k)
    assert abs(noise.var().item() - 1) < 0.02
    for dy in range(k + 1):
        for dx in range(k + 1):
            corr = (noise * torch.roll(noise, shifts=(dy, dx), dims=(-2, -1))).mean().item()
            expect = max(k - dy, 0) * max(k - dx, 0) / k ** 2
            assert abs(corr - expect) < 0.03, (dy, dx, corr, expect)

#----------------------------------------------------------------------------
# BlurLoss.

class _RecordingNet:
    """Denoiser stand-in: remembers its inputs, returns half the noisy image."""
    last_sigma = []

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        self.x, self.sigma = x, sigma
        _RecordingNet.last_sigma = (_RecordingNet.last_sigma + [sigma])[-2:]
        return (x * 0.5).to(torch.float32)


@pytest.mark.parametrize('block_scale', [0, 0.15])
def test_blur_loss_equals_reference_restatement(block_scale):
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    torch.manual_seed(123)
    ours = BlurLoss(block_scale=block_scale)(net=_RecordingNet(), images=images)
    torch.manual_seed(123)
    ref = ref_blur_loss(_RecordingNet(), images, block_scale=block_scale)
    assert ours.shape == images.shape and ours.dtype == torch.float64
    # Same draws, same sigmas; only the DCT arithmetic differs (float32 matrix vs scipy float64).
    assert torch.equal(_RecordingNet.last_sigma[0], _RecordingNet.last_sigma[1])
    assert torch.allclose(ours, ref.to(ours.dtype), rtol=1e-5, atol=1e-6)


def test_blur_loss_defaults_and_statistics():
    loss = BlurLoss()
    assert (loss.P_mean, loss.P_std, loss.sigma_data, loss.up_scale, loss.prob_length,
            loss.blur_sigma_max, loss.min_scale, loss.block_scale) == (-1.2, 1.2, 0.5, 4, 0.93, 3, 0.001, 0)
    net = _RecordingNet()
    images = torch.zeros(4096, 1, 4, 4) # sharp image 0: the network input is pure noise
    torch.manual_seed(0)
    out = BlurLoss(block_scale=0)(net=net, images=images)
    sigma = net.sigma.reshape(-1)
    # ln sigma = Phi^-1(u * prob_length) * P_std + P_mean with u in [floor, 1).
    floor = scipy.stats.norm.cdf((np.log(7.5e-3) + 1.2) / 1.2) * 0.93
    assert sigma.min().item() >= np.exp(scipy.stats.norm.ppf(floor * 0.93) * 1.2 - 1.2) * (1 - 1e-6)
    assert sigma.max().item() < np.exp(scipy.stats.norm.ppf(0.93) * 1.2 - 1.2)
    # u is uniform: Phi((ln sigma - P_mean) / P_std) / prob_length ~ U(floor, 1).
    u = scipy.stats.norm.cdf((np.log(sigma.numpy()) + 1.2) / 1.2) / 0.93
    assert abs(u.mean() - 0.5) < 0.02 and scipy.stats.kstest(u, 'uniform').pvalue > 1e-3
    # The noise is N(0, sigma^2) per pixel.
    z = net.x / net.sigma
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    # Weight clamped at 1e5: loss = weight * (x / 2)^2.
    weight = out / (net.x * 0.5) ** 2
    assert weight.max().item() <= 100000 * (1 + 1e-9)
    # With block noise the per-pixel std grows to sigma * sqrt(1 + block_scale^2).
    torch.manual_seed(0)
    BlurLoss(block_scale=0.5)(net=net, images=images)
    assert abs((net.x / net.sigma).std().item() - np.sqrt(1.25)) < 0.03


def test_blur_loss_is_persistent():
    import pickle
    assert b'_reconstruct_persistent_obj' in pickle.dumps(BlurLoss(block_scale=0.15))

#----------------------------------------------------------------------------
