"""Training losses. Each is called as `loss_fn(net=, images=, labels=, augment_pipe=)` on a batch
of images in [-1, 1] and returns the weighted squared error per pixel, shape [N, C, H, W]; the
training loop sums it and normalises it (training/training_loop.py, its loss_norm option).

Order of random draws (kept from the reference so a given seed trains the same way): the noise
level first ([N, 1, 1, 1]), then the augmentation pipe's draws, then the Gaussian noise.

VPLoss, VELoss: "Score-Based Generative Modeling through Stochastic Differential Equations".
EDMLoss: "Elucidating the Design Space of Diffusion-Based Generative Models".
BlurLoss: the relay (second) stage's blurring-diffusion loss, built on training/blurring.py.
"""

import inspect
import math

import torch

import dnnlib
from torch_utils import persistence
from training import blurring, networks


def edm_weight(sigma, sigma_data):
    """EDM's loss weight, (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2: it makes the
    network's effective training target unit-variance at every noise level."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


class _DenoisingLoss:
    """What the first-stage losses share. `levels` draws the noise levels [N, 1, 1, 1] and their
    weights; then the images are augmented, noised and denoised."""

    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigma, weight = self.levels([images.shape[0], 1, 1, 1], images.device)
        clean, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        noisy = clean + torch.randn_like(clean) * sigma
        return weight * (net(noisy, sigma, labels, augment_labels=augment_labels) - clean) ** 2


@persistence.persistent_class
class VPLoss(_DenoisingLoss):
    """Variance preserving: t ~ U(epsilon_t, 1) mapped through the linear beta schedule, weight
    1 / sigma^2 (epsilon prediction written for a denoiser)."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t

    sigma = networks.VPPrecond.sigma  # The schedule of the VP preconditioning, from the same three settings.

    def levels(self, shape, device):
        sigma = self.sigma(1 + torch.rand(shape, device=device) * (self.epsilon_t - 1))
        return sigma, 1 / sigma ** 2


@persistence.persistent_class
class VELoss(_DenoisingLoss):
    """Variance exploding: sigma log-uniform in [sigma_min, sigma_max], weight 1 / sigma^2."""

    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def levels(self, shape, device):
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** torch.rand(shape, device=device))
        return sigma, 1 / sigma ** 2


@persistence.persistent_class
class EDMLoss(_DenoisingLoss):
    """EDM: ln(sigma) ~ N(P_mean, P_std^2), weight edm_weight."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def levels(self, shape, device):
        sigma = (torch.randn(shape, device=device) * self.P_std + self.P_mean).exp()
        return sigma, edm_weight(sigma, self.sigma_data)


#----------------------------------------------------------------------------
# Relay stage: blurring diffusion (RDM). The maths lives in training/blurring.py (shared with
# the sampler). Draw order as the reference: u ~ U(0, 1) on the CPU generator [N, 1, 1, 1], the
# augmentation pipe's draws, one Gaussian draw that is discarded when block_scale > 0 (the
# reference draws it and then draws again), the Gaussian noise, the block noise's own draw.

@persistence.persistent_class
class BlurLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, up_scale=4, prob_length=0.93,
                 blur_sigma_max=3, min_scale=0.001, block_scale=0):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.up_scale, self.min_scale, self.block_scale = up_scale, min_scale, block_scale
        self.prob_length, self.blur_sigma_max = prob_length, blur_sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None, truncate_sigma=7.5e-3):
        # u: the blur time, drawn on the CPU. Its floor keeps sigma away from ~0 for stable
        # training: Phi((ln truncate_sigma - P_mean) / P_std) * prob_length is the reference's
        # level (it multiplies where the inverse of sigma(u) would divide, so the effective floor
        # is slightly below truncate_sigma; kept for faithfulness).
        u = torch.rand([images.shape[0], 1, 1, 1])
        log_floor = torch.tensor(truncate_sigma, dtype=torch.float64).log()
        u = u.clamp(min=float(torch.special.ndtr((log_floor - self.P_mean) / self.P_std)) * self.prob_length)
        blur_sigma = blurring.blur_sigma_from_u(u, self.blur_sigma_max).to(images.device)
        # sigma = exp(Phi^-1(u * prob_length) * P_std + P_mean) in float64, the quantile rounded
        # to float32 as the reference's scipy call on float32 input returns it.
        quantile = torch.special.ndtri((u * self.prob_length).to(torch.float64)).to(torch.float32)
        sigma = (quantile.to(torch.float64).to(images.device) * self.P_std + self.P_mean).exp()
        weight = edm_weight(sigma, self.sigma_data).clamp(max=100000)

        clean, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        blurred = blurring.blur(clean, blur_sigma.reshape(-1), self.up_scale, self.min_scale)
        noise = torch.randn_like(blurred) * sigma  # With block noise the reference discards this draw.
        if self.block_scale > 0:
            noise = torch.randn_like(blurred) * sigma  # Then the block noise's own draw.
            noise = noise + blurring.block_noise(blurred, torch.randn_like, self.up_scale) * sigma * self.block_scale
        return weight * (net(blurred + noise, sigma, labels, augment_labels=augment_labels) - clean) ** 2


#----------------------------------------------------------------------------
# What a checkpoint records about its training (one reader for the pipeline, the training
# loop's resume check and the sample grid).

RELAY_SETTINGS = ('up_scale', 'blur_sigma_max', 'block_scale', 'prob_length')  # BlurLoss arguments = train.py's relay options
STAGES = {'BlurLoss': 'second', 'EDMLoss': 'first', 'VPLoss': 'first', 'VELoss': 'first'}


def training_record(data):
    """The loss class name, the stage ('first', 'second', or None when not recorded) and, for the
    relay stage, its settings (RELAY_SETTINGS, BlurLoss's defaults where a value is missing or
    not a finite number) of a checkpoint dict or of a loss_kwargs dict. New snapshots hold
    `loss_kwargs`; older ones and the reference's files a `loss_fn` object."""
    data = data if isinstance(data, dict) else {}
    loss = data if 'class_name' in data else data.get('loss_kwargs', data.get('loss_fn'))
    if isinstance(loss, dict):
        name, values = str(loss.get('class_name', '')).rsplit('.', 1)[-1], loss
    else:
        name, values = (type(loss).__name__, vars(loss)) if loss is not None else (None, {})
    stage = STAGES.get(name)
    relay = {}
    if stage == 'second':
        defaults = inspect.signature(BlurLoss).parameters
        for key in RELAY_SETTINGS:
            value = values.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                value = defaults[key].default
            relay[key] = int(value) if key == 'up_scale' else value
    return dnnlib.EasyDict(loss=name, stage=stage, relay=relay)
