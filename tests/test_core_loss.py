"""Losses against hand computation, the augmentation pipe, training_stats, misc helpers."""

import numpy as np
import pytest
import torch

from torch_utils import misc, training_stats
from training.augment import AugmentPipe
from training.loss import EDMLoss, VELoss, VPLoss


class StandIn(torch.nn.Module):
    """Deterministic 'denoiser' D(x, sigma) = x / (1 + sigma^2) + 0.01 * label sum; records its inputs."""

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        self.seen = dict(x=x.clone(), sigma=sigma.clone(), augment_labels=augment_labels)
        out = x / (1 + sigma ** 2)
        if class_labels is not None:
            out = out + 0.01 * class_labels.sum(dim=1).reshape(-1, 1, 1, 1)
        return out


def _images(n=3, c=2, h=4, w=4):
    g = torch.Generator().manual_seed(123)
    return torch.rand([n, c, h, w], generator=g) * 2 - 1


def _hand(images, sigma, noise, labels=None):
    """Reference computation in float64 numpy, given the noise level and unit noise."""
    y = images.double().numpy()
    s = sigma.double().numpy().reshape(-1, 1, 1, 1)
    x = y + noise.double().numpy() * s
    d = x / (1 + s ** 2)
    if labels is not None:
        d = d + 0.01 * labels.double().numpy().sum(axis=1).reshape(-1, 1, 1, 1)
    return s, (d - y) ** 2


def test_edm_loss_matches_hand_computation():
    images = _images()
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    loss_fn = EDMLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    torch.manual_seed(7)
    loss = loss_fn(net=StandIn(), images=images, labels=labels)
    # Replay the draws in the documented order: ln(sigma) normal [N,1,1,1], then the noise.
    torch.manual_seed(7)
    rnd = torch.randn([3, 1, 1, 1])
    noise = torch.randn(images.shape)
    sigma = np.exp(rnd.double().numpy() * 1.2 - 1.2)
    s, sq = _hand(images, torch.from_numpy(sigma), noise, labels)
    weight = (s ** 2 + 0.25) / (s * 0.5) ** 2
    assert loss.shape == images.shape
    np.testing.assert_allclose(loss.double().numpy(), weight * sq, rtol=1e-5, atol=1e-7)


def test_vp_loss_matches_hand_computation():
    images = _images()
    loss_fn = VPLoss(beta_d=19.9, beta_min=0.1, epsilon_t=1e-5)
    torch.manual_seed(3)
    net = StandIn()
    loss = loss_fn(net=net, images=images, labels=None)
    torch.manual_seed(3)
    u = torch.rand([3, 1, 1, 1]).double().numpy()
    noise = torch.randn(images.shape)
    t = 1 + u * (1e-5 - 1)
    sigma = np.sqrt(np.exp(0.5 * 19.9 * t ** 2 + 0.1 * t) - 1)
    s, sq = _hand(images, torch.from_numpy(sigma), noise)
    np.testing.assert_allclose(loss.double().numpy(), sq / s ** 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(net.seen['sigma'].double().numpy(), sigma, rtol=1e-6)
    # sigma(t) at the ends of the schedule.
    assert float(loss_fn.sigma(1.0)) == pytest.approx(np.sqrt(np.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-6)


def test_ve_loss_matches_hand_computation():
    images = _images()
    loss_fn = VELoss(sigma_min=0.02, sigma_max=100)
    torch.manual_seed(5)
    loss = loss_fn(net=StandIn(), images=images, labels=None)
    torch.manual_seed(5)
    u = torch.rand([3, 1, 1, 1]).double().numpy()
    noise = torch.randn(images.shape)
    sigma = 0.02 * (100 / 0.02) ** u
    s, sq = _hand(images, torch.from_numpy(sigma), noise)
    np.testing.assert_allclose(loss.double().numpy(), sq / s ** 2, rtol=1e-5, atol=1e-7)


def test_loss_uses_augmented_images_and_passes_augment_labels():
    images = _images()

    def flip_pipe(x):  # No random draws, so the replay below stays aligned.
        return x.flip(3), torch.full([x.shape[0], 9], 0.5)

    net = StandIn()
    torch.manual_seed(11)
    loss = EDMLoss()(net=net, images=images, labels=None, augment_pipe=flip_pipe)
    torch.manual_seed(11)
    rnd = torch.randn([3, 1, 1, 1])
    noise = torch.randn(images.shape)
    sigma = torch.exp(rnd.double() * 1.2 - 1.2)
    s, sq = _hand(images.flip(3), sigma, noise)
    weight = (s ** 2 + 0.25) / (s * 0.5) ** 2
    np.testing.assert_allclose(loss.double().numpy(), weight * sq, rtol=1e-5, atol=1e-7)
    assert torch.equal(net.seen['augment_labels'], torch.full([3, 9], 0.5))


#----------------------------------------------------------------------------
# Augmentation.

def test_augment_train_config_label_layout_and_identity_at_p0():
    x = _images(n=4, c=3, h=16, w=16)
    pipe = AugmentPipe(p=0, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    y, labels = pipe(x)
    assert labels.shape == (4, 9) and torch.all(labels == 0)
    # Nothing applied: only the up/down-sampling round trip of the wavelet filter remains.
    assert torch.allclose(y, x, atol=1e-3)


def test_augment_xflip_and_rotate_int_are_exact():
    x = _images(n=16, c=3, h=8, w=8)
    torch.manual_seed(0)
    y, labels = AugmentPipe(p=1, xflip=1)(x)
    assert labels.shape == (16, 1) and 0 < labels.sum() < 16
    for i in range(16):
        assert torch.equal(y[i], x[i].flip(2) if labels[i, 0] == 1 else x[i])

    torch.manual_seed(1)
    y, labels = AugmentPipe(p=1, rotate_int=1)(x)
    assert labels.shape == (16, 2)
    seen = set()
    for i in range(16):
        # Labels (a, b) encode w in {0,1,2,3} as (w in {1,2}, w in {2,3}); w = quarter turns.
        a, b = int(labels[i, 0]), int(labels[i, 1])
        w = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}[(a, b)]
        seen.add(w)
        candidates = [torch.rot90(x[i], k, dims=(1, 2)) for k in range(4)]
        assert any(torch.equal(y[i], c) for c in candidates)
        if w == 0:
            assert torch.equal(y[i], x[i])
        if w == 2:
            assert torch.equal(y[i], torch.rot90(x[i], 2, dims=(1, 2)))
    assert len(seen) >= 3


def test_augment_brightness_and_translation():
    x = _images(n=8, c=3, h=8, w=8)
    torch.manual_seed(2)
    y, labels = AugmentPipe(p=1, brightness=1, brightness_std=0.2)(x)
    diff = y - x
    for i in range(8):
        assert torch.allclose(diff[i], torch.full_like(diff[i], float(labels[i, 0]) * 0.2), atol=1e-5)

    # Integer translation with reflection: label * (W * max) pixels.
    torch.manual_seed(4)
    y, labels = AugmentPipe(p=1, translate_int=1, translate_int_max=0.25)(x)
    for i in range(8):
        tx = int(round(float(labels[i, 0]) * 8 * 0.25))
        ty = int(round(float(labels[i, 1]) * 8 * 0.25))
        xs = np.arange(8) - tx
        ys = np.arange(8) + ty
        reflect = lambda v: 7 - np.abs(7 - v % 14)
        expected = x[i][:, reflect(ys)][:, :, reflect(xs)]
        assert torch.equal(y[i], expected)


def test_augment_grayscale_colour_and_geometry_run():
    x = _images(n=2, c=1, h=16, w=16)
    pipe = AugmentPipe(p=1, xflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
                       brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
    y, labels = pipe(x)
    assert y.shape == x.shape and labels.shape == (2, 1 + 1 + 2 + 2 + 2 + 1 + 1 + 1 + 2 + 1)
    assert torch.isfinite(y).all()


#----------------------------------------------------------------------------
# training_stats and misc.

def test_training_stats_collect():
    training_stats.collect()  # Starts a new period.
    training_stats.report('TestCore/a', torch.tensor([1.0, 2.0, 3.0]))
    training_stats.report('TestCore/a', [5.0])
    training_stats.report0('TestCore/b', 7.0)
    training_stats.report('TestCore/empty', [])
    stats = training_stats.collect()
    assert stats['TestCore/a'].num == 4 and stats['TestCore/a'].mean == pytest.approx(2.75)
    assert stats['TestCore/a'].std == pytest.approx(np.std([1, 2, 3, 5]))
    assert stats['TestCore/b'] == dict(num=1, mean=7.0, std=0.0)
    assert stats['TestCore/empty'].num == 0 and np.isnan(stats['TestCore/empty'].mean)
    assert list(stats).index('TestCore/a') < list(stats).index('TestCore/b')  # In the order first reported.
    # Next period: only new values count; a statistic without new values keeps its last summary.
    training_stats.report('TestCore/a', [10.0])
    stats = training_stats.collect()
    assert stats['TestCore/a'] == dict(num=1, mean=10.0, std=0.0)
    assert stats['TestCore/b'].mean == 7.0
    training_stats.report('TestCore/inf', [1.0, float('inf')])
    assert np.isnan(training_stats.collect()['TestCore/inf'].std)


def test_infinite_sampler_partitions_one_stream():
    data = list(range(10))
    full = misc.InfiniteSampler(data, rank=0, num_replicas=1, seed=5)
    r0 = misc.InfiniteSampler(data, rank=0, num_replicas=2, seed=5)
    r1 = misc.InfiniteSampler(data, rank=1, num_replicas=2, seed=5)
    it, i0, i1 = iter(full), iter(r0), iter(r1)
    stream = [next(it) for _ in range(40)]
    assert stream[0::2] == [next(i0) for _ in range(20)]
    assert stream[1::2] == [next(i1) for _ in range(20)]


def test_copy_params_and_buffers():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    misc.copy_params_and_buffers(a, b, require_all=True)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    with pytest.raises(ValueError):
        misc.copy_params_and_buffers(torch.nn.Linear(3, 2, bias=False), b, require_all=True)
    with pytest.raises(ValueError):
        misc.copy_params_and_buffers(torch.nn.Linear(4, 2), b)
