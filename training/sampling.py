"""The relay's two samplers and their per-seed noise.

`edm_sampler` draws the first stage: Heun's method on EDM's probability-flow ODE over
rho-spaced noise levels, with optional churn, guidance and (sde_scale) the stochastic steps of
the CelebA-HQ script. `blur_sampler` draws the second stage from upsampled
first-stage images: the same Heun scheme, but each move is taken in the block-DCT domain, where
the blur of `training.blurring` is a per-frequency factor, and part of the noise is renewed at
every step.

Both equal the reference implementation (THUDM/RelayDiffusion generate*.py) bit for bit on the
same weights, seeds and options: the noise levels and the updates are computed in float64 in the
reference's order of operations, and every seed's generator makes the reference's draws in its
order, including draws that end up multiplied by zero. Beyond the reference, off by default and
without random draws: autoguidance (gnet; Karras et al. 2024, NVlabs/edm2) and a guidance
interval (Kynkäänniemi et al. 2024) in both stages.

Each sampler option is declared once, in the sampler's signature: its default (the reference
generate.py's) and, as the annotation, its range and help text. training.pipeline makes the
options of the generate scripts and of evaluate.py gen, and the checks of the Python API, from
these declarations: a new option is one new parameter.
"""

import concurrent.futures
import os

import click
import numpy as np
import torch

from dnnlib.util import Number
from training import blurring, fast_mode

#----------------------------------------------------------------------------
# The ranges of the sampler options (dnnlib.util.Number).

# More steps than this is a typo (the papers use at most 256); the schedule alone takes 8 bytes a step.
MAX_STEPS = 1_000_000
STEPS, POSITIVE, NONNEG, FRACTION = Number(2, MAX_STEPS, integer=True), Number(0, low_open=True), Number(0), Number(0, 1)
LEVEL = Number(0, allow_inf=True)
# Help of the guidance options of both stages.
CFG_HELP = ('Guidance weight w (> 1 enables it; one more network evaluation per guided step): w D(x | label) - (w - 1) D_guide(x), '
            'D_guide the unconditional pass (classifier-free) or the guide network')
GNET_HELP = ('Guide network for autoguidance, in place of the unconditional pass: a weaker network of the same task (e.g. an early '
             'snapshot), conditional or not, weighted by the stage\'s --cfg_scale (EDM2 ImageNet-512: FID 1.81 -> 1.25, Karras et al. 2024)')
INTERVAL_HELP = ('Guide only at noise levels in (LO, HI] (default: at every level); elsewhere one plain conditional evaluation per step '
                 '(EDM2 ImageNet-512: FID 1.81 -> 1.40, Kynkaanniemi et al. 2024)')


class Interval(click.ParamType):
    """Noise levels LO,HI with 0 <= LO < HI (HI may be inf), as text or a pair of numbers."""
    name, bounds = 'LO,HI', '0 <= LO < HI'

    def convert(self, value, param, ctx):
        parts = value.split(',') if isinstance(value, str) else value
        if not isinstance(parts, (tuple, list)) or len(parts) != 2:
            self.fail(f'{value!r} is not two noise levels LO,HI (e.g. 0.28,2.9)', param, ctx)
        lo, hi = (LEVEL.convert(part, param, ctx) for part in parts)
        if lo >= hi:
            self.fail(f'{value}: LO must be below HI', param, ctx)
        return lo, hi


class Network(click.ParamType):
    """A path or URL (training.pipeline loads it before sampling) or a loaded network."""
    name, bounds = 'PATH|URL', 'same stage, resolution and channels as the main network'

    def convert(self, value, param, ctx):
        if not isinstance(value, (str, os.PathLike, torch.nn.Module)):
            self.fail(f'{value!r} is not a path, URL or network', param, ctx)
        return value

#----------------------------------------------------------------------------
# Noise.

# Threads start on first use only, so importing this module starts none.
_FILL_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))


class StackedRandomGenerator:
    """A torch.Generator per seed, seeded with seed % 2**32 as EDM and the reference do, so that
    an image's noise depends on its seed alone and not on the batch it is drawn in: row i of
    every draw holds the numbers of `torch.randn(size[1:])` from generator i."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        out = torch.empty(size, **kwargs)
        fill = lambda i: out[i].normal_(generator=self.generators[i])  # In place: the same numbers as a fresh draw.
        threads = out.device.type == 'cpu' and len(out) > 1 and out[0].numel() >= 16384  # Independent generators; the GIL is released.
        list((_FILL_POOL.map if threads else map)(fill, range(len(out))))
        return out

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)


def skip_first_stage_draws(rnd, shape, num_steps=18, sde_scale=None, device=None):
    """Move every generator of `rnd` past what the first stage draws for one image of `shape`
    (C, H, W): the float32 latents, then edm_sampler's float64 noise (one churn draw per step;
    with sde_scale two more per step, one in the last). A relay from saved first-stage images
    then renews the noise that a run of both stages would use."""
    draws = num_steps if sde_scale is None else 3 * num_steps - 1
    for gen in rnd.generators:
        torch.randn(shape, generator=gen, device=device)
        for _ in range(draws):
            torch.randn(shape, generator=gen, device=device, dtype=torch.float64)

#----------------------------------------------------------------------------
# Pieces shared by both stages.

def time_steps(num_steps, sigma_min, sigma_max, rho, device=None):
    """Noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho); float64."""
    ramp = torch.arange(num_steps, dtype=torch.float64, device=device) / (num_steps - 1)
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (top + ramp * (bottom - top)) ** rho


def blur_time_steps(net, num_steps, sigma_min, sigma_max, rho, truncation_sigma, device=None):
    """The second stage's levels: those of `time_steps` (within the network's range) that lie
    below truncation_sigma. ValueError when none does."""
    levels = time_steps(num_steps, max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max), rho, device)
    below = (levels < truncation_sigma).nonzero()
    if len(below) == 0:
        raise ValueError(f'truncation_sigma={truncation_sigma} leaves no step of the noise schedule '
                         f'(its lowest level is {float(levels[-1]):.4g}); raise it or lower sigma_min')
    return levels[int(below[0]):]


def _ending_at_zero(net, levels):
    return torch.cat([net.round_sigma(levels), torch.zeros_like(levels[:1])])


def guided_denoise(net, x, sigma, class_labels, cfg_scale, gnet=None, interval=None):
    """D(x; sigma) in float64; for cfg_scale w > 1 guidance w D(x | label) - (w - 1) D_guide(x),
    the main pass first. The guide is the unconditional pass of `net` (classifier-free) or `gnet`
    (autoguidance; labels only if it has classes). interval (LO, HI): guidance only for LO < sigma
    <= HI, one plain pass elsewhere. Networks prepared for the fast mode (training.fast_mode) make
    classifier-free guidance's two passes in one batch."""
    if cfg_scale <= 1 or (interval is not None and not interval[0] < float(sigma) <= interval[1]):
        return net(x, sigma, class_labels).to(torch.float64)
    if gnet is None and getattr(net, 'batch_guidance', False):
        main, guide = fast_mode.batched_passes(net, x, sigma, class_labels)
    else:
        main = net(x, sigma, class_labels)
        guide = net(x, sigma, None) if gnet is None else gnet(x, sigma, class_labels if gnet.label_dim else None)
    return cfg_scale * main.to(torch.float64) - (cfg_scale - 1) * guide.to(torch.float64)


def _churn(net, x, t, churn, S_min, S_max, S_noise, randn_like):
    """EDM's churn: raise the level t to t_hat = t + gamma t by adding fresh noise, where
    gamma = min(churn, sqrt(2) - 1) for t in [S_min, S_max] and 0 elsewhere. The noise is drawn
    even when gamma is 0. Returns (t_hat, x_hat, gamma)."""
    gamma = min(churn, np.sqrt(2) - 1) if S_min <= t <= S_max else 0
    t_hat = net.round_sigma(t + gamma * t)
    return t_hat, x + (t_hat ** 2 - t ** 2).sqrt() * S_noise * randn_like(x), gamma


def _heun(d, slope, move, t_next, correct, mean=lambda a, b: (a + b) / 2):
    """Heun's method: `move` along the slope d to level t_next; with `correct`, move again from
    the same start along the mean of d and the slope found where the first move arrived."""
    x_next = move(d)
    return move(mean(d, slope(x_next, t_next))) if correct else x_next

#----------------------------------------------------------------------------
# The two stages.

def edm_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps:  (STEPS, 'Number of sampling steps for first stage') = 18,
    sigma_min:  (POSITIVE, 'Lowest noise level') = 0.002,
    sigma_max:  (POSITIVE, 'Highest noise level') = 80,
    rho:        (POSITIVE, 'Time step exponent') = 7,
    cfg_scale:  (NONNEG, CFG_HELP) = 1,
    gnet:       (Network(), GNET_HELP) = None,
    guidance_interval: (Interval(), INTERVAL_HELP) = None,
    S_churn:    (NONNEG, 'Stochasticity strength') = 0,
    S_min:      (NONNEG, 'Stoch. min noise level') = 0,
    S_max:      (LEVEL, 'Stoch. max noise level') = float('inf'),
    S_noise:    (NONNEG, 'Stoch. noise inflation') = 1,
    sde_scale:  (FRACTION, 'Stochastic Heun of the CelebA-HQ script: fresh noise of std sde_scale*t per step (a number enables it)') = None,
):
    """First stage: images (float64, about [-1, 1]) from standard normal `latents` (N, C, H, W).

    sde_scale=None: the deterministic steps of the reference's generate.py and
    generate_imagenet.py. A number: the steps of its generate_celebahq.py, which move to the
    noise level sqrt(t_next^2 - g^2), g = sde_scale * t_next, and add noise of std g.
    gnet (a loaded network) and guidance_interval: see guided_denoise. With gnet (and no churn,
    or churn at every level) the images are NVlabs/edm2's edm_sampler's in float64, guidance =
    cfg_scale, up to the last bit of the mix (edm2 takes guide.lerp(main, w)).
    """
    levels = time_steps(num_steps, max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max), rho, latents.device)
    t = _ending_at_zero(net, levels)
    slope = lambda x, sigma: (x - guided_denoise(net, x, sigma, class_labels, cfg_scale, gnet, guidance_interval)) / sigma
    x = latents.to(torch.float64) * t[0]
    for i in range(num_steps):
        t_hat, x_hat, _ = _churn(net, x, t[i], S_churn / num_steps, S_min, S_max, S_noise, randn_like)
        t_next = t[i + 1]
        if sde_scale is None:
            move = lambda d: x_hat + (t_next - t_hat) * d
        else:
            g = sde_scale * t_next
            shrink = ((t_next ** 2 - g ** 2) / t_hat ** 2) ** 0.5
            move = lambda d: x_hat + (shrink - 1) * t_hat * d + g * randn_like(x_hat)
        x = _heun(slope(x_hat, t_hat), slope, move, t_next, correct=(i < num_steps - 1), mean=lambda a, b: 0.5 * a + 0.5 * b)
    return x


def blur_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps:  (STEPS, 'Number of sampling steps for second stage (before truncation)') = 18,
    sigma_min:  (POSITIVE, 'Lowest noise level') = 0.008,
    sigma_max:  (POSITIVE, 'Highest noise level') = 80,
    rho:        (POSITIVE, 'Time step exponent') = 7,
    cfg_scale:  (NONNEG, CFG_HELP) = 1,
    gnet:       (Network(), GNET_HELP) = None,
    guidance_interval: (Interval(), INTERVAL_HELP) = None,
    truncation_sigma: (POSITIVE, 'Truncation point of noise schedule') = 0.9,
    truncation_t:     (POSITIVE, 'Truncation point of time schedule (prob_length)') = 0.93,
    up_scale:   (Number(1, integer=True), 'Scale of upsampling = DCT block size (second res / first res)') = 4,
    s_block:    (NONNEG, 'Strength of block noise addition') = 0.15,
    s_noise:    (FRACTION, 'Strength of stochasticity') = 0.2,
    blur_sigma_max: (NONNEG, 'Maximum sigma of blurring schedule') = 3,
    S_churn:    (NONNEG, 'Churn step of the CelebA-HQ script\'s blur sampler (a number enables it)') = None,
    S_min:      (NONNEG, 'Churn min noise level (with --S_churn_second)') = 0,
    S_max:      (LEVEL, 'Churn max noise level (with --S_churn_second)') = float('inf'),
    S_noise:    (NONNEG, 'Churn noise inflation (with --S_churn_second)') = 1,
    trace=None,
):
    """Second stage: images (float64) from upsampled first-stage images `latents` (N, C, H, W).

    Only the levels below truncation_sigma are visited; the start is the latents plus noise of
    the first of them, of which s_block is block noise (blocks of up_scale pixels, the DCT block
    size too). At each level the blur is that of the training schedule (blur_sigma_max, and
    truncation_t as its time scaling); a step keeps sqrt(1 - s_noise^2) of the noise, renews the
    rest, and the last one returns the denoiser's output. S_churn=None: the reference's
    generate.py and generate_imagenet.py; a number: the churn of its generate_celebahq.py, which
    only the denoiser sees (one more draw per step, even for no churn). gnet and
    guidance_interval: see guided_denoise. trace: a dict that receives 'start', the noisy
    starting point.
    """
    k = int(up_scale)
    levels = blur_time_steps(net, num_steps, sigma_min, sigma_max, rho, truncation_sigma, latents.device)
    t = _ending_at_zero(net, levels)
    blur_at = lambda sigmas: blurring.alpha_schedule(sigmas, k, truncation_t, blur_sigma_max, device=latents.device)
    alphas = blur_at(t[:-1])  # Every level's blur at once (the reference: through scipy, twice a step).
    denoise = lambda x, sigma: guided_denoise(net, x, sigma, class_labels, cfg_scale, gnet, guidance_interval)
    slope = lambda x, sigma: blurring.block_dct(x - denoise(x, sigma), k) / sigma
    block_noise = lambda: s_block * blurring.block_noise(latents, randn_like, k)

    x = latents.to(torch.float64)
    x = x + randn_like(x) * t[0] + block_noise() * t[0] if s_block > 0 else x + randn_like(x) * t[0]
    if trace is not None:
        trace['start'] = x
    for i in range(len(levels)):
        t_hat, x_hat, alpha_hat = t[i], x, alphas[i]
        if S_churn is not None:
            t_hat, x_hat, gamma = _churn(net, x, t[i], S_churn / len(levels), S_min, S_max, S_noise, randn_like)
            alpha_hat = blur_at(t_hat.reshape(1))[0] if gamma != 0 else alpha_hat
        denoised = denoise(x_hat, t_hat)
        if i == len(levels) - 1:
            return denoised
        # Per frequency, the next point is P u + Q d (u = DCT x, d its slope) plus fresh noise;
        # P and Q stay float32 like the alphas, as in the reference.
        t_next, alpha_next = t[i + 1], alphas[i + 1]
        kept = (1 - s_noise ** 2) ** 0.5 * t_next / t_hat
        P, Q = alpha_next + kept - kept * alpha_hat, t_hat * (kept * alpha_hat - alpha_next)
        u = blurring.block_dct(x, k)
        renewed = lambda: s_noise * t_next * (randn_like(x) + block_noise() if s_block > 0 else randn_like(x))
        move = lambda d: blurring.block_idct(blurring.scale_frequencies(u, P, k) + blurring.scale_frequencies(d, Q, k), k) + renewed()
        x = _heun(blurring.block_dct(x - denoised, k) / t_hat, slope, move, t_next, correct=True)
    return x


#----------------------------------------------------------------------------
