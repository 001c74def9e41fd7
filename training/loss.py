"""Training losses. Each is called as `loss_fn(net=, images=, labels=, augment_pipe=)` on a batch
of images in [-1, 1] and returns the weighted squared error per pixel, shape [N, C, H, W]; the
training loop sums it and normalises it (training/training_loop.py, LOSS_NORMS).

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


def _denoise(net, images, labels, augment_pipe, sigma, weight):
    """Shared tail of the losses: augment, add noise of std sigma, weight the squared error."""
    y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
    n = torch.randn_like(y) * sigma
    D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
    return weight * ((D_yn - y) ** 2)


#----------------------------------------------------------------------------
# Variance preserving: t ~ U(epsilon_t, 1), sigma(t) from the linear beta schedule, weight
# 1 / sigma^2 (the epsilon-prediction loss written in terms of the denoiser).

@persistence.persistent_class
class VPLoss:
    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma ** 2
        return _denoise(net, images, labels, augment_pipe, sigma, weight)

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()


#----------------------------------------------------------------------------
# Variance exploding: sigma log-uniform in [sigma_min, sigma_max], weight 1 / sigma^2.

@persistence.persistent_class
class VELoss:
    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        weight = 1 / sigma ** 2
        return _denoise(net, images, labels, augment_pipe, sigma, weight)


#----------------------------------------------------------------------------
# EDM: ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2,
# which makes the effective training target unit-variance at every noise level.

@persistence.persistent_class
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return _denoise(net, images, labels, augment_pipe, sigma, weight)


#----------------------------------------------------------------------------
# Relay stage (BlurLoss) follows.

# Relay stage: blurring diffusion (RDM). The maths lives in training/blurring.py (shared with
# the sampler). Draw order as the reference: u ~ U(0, 1) on the CPU generator [N, 1, 1, 1], the
# augmentation pipe's draws, one Gaussian draw that is discarded when block_scale > 0 (the
# reference draws it and then draws again), the Gaussian noise, the block noise's own draw.

from training import blurring # noqa: E402 (kept with the class it serves)

@persistence.persistent_class
class BlurLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, up_scale=4, prob_length=0.93,
                 blur_sigma_max=3, min_scale=0.001, block_scale=0):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.up_scale = up_scale
        self.prob_length = prob_length
        self.blur_sigma_max = blur_sigma_max
        self.min_scale = min_scale
        self.block_scale = block_scale

    def __call__(self, net, images, labels=None, augment_pipe=None, truncate_sigma=7.5e-3):
        # u: the blur time. The clamp keeps sigma away from ~0 for stable training; its level
        # Phi((ln truncate_sigma - P_mean) / P_std) * prob_length is the reference's formula
        # (it multiplies where the inverse of sigma(u) would divide, so the effective floor is
        # slightly below truncate_sigma; kept for faithfulness).
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1])
        truncate_p = float(torch.special.ndtr((torch.tensor(truncate_sigma, dtype=torch.float64).log() - self.P_mean) / self.P_std)) * self.prob_length
        rnd_uniform = torch.clamp(rnd_uniform, min=truncate_p)
        blur_sigma = blurring.blur_sigma_from_u(rnd_uniform, self.blur_sigma_max).to(images.device)

        # sigma = exp(Phi^-1(u * prob_length) * P_std + P_mean) in float64, with the quantile
        # rounded to float32 as the reference's scipy call on float32 input does.
        normal = torch.special.ndtri((rnd_uniform * self.prob_length).to(torch.float64)).to(torch.float32)
        sigma = (normal.to(torch.float64).to(images.device) * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        weight = torch.clamp(weight, max=100000)

        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        y_blurred = blurring.blur(y, blur_sigma.reshape(-1), self.up_scale, self.min_scale)
        n = torch.randn_like(y_blurred) * sigma
        if self.block_scale > 0:
            n = torch.randn_like(y_blurred) * sigma \
                + blurring.block_noise(y_blurred, torch.randn_like, self.up_scale) * sigma * self.block_scale
        D_yn = net(y_blurred + n, sigma, labels, augment_labels=augment_labels)
        return weight * ((D_yn - y) ** 2)



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
