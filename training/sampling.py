"""Relay Diffusion samplers: the first stage's EDM Heun sampler and the second stage's blurring
diffusion sampler, with per-seed random numbers.

With the same weights, seeds and options the results equal the reference implementation's
(THUDM/RelayDiffusion generate*.py): same schedules, same float64 arithmetic, and the same
per-seed random numbers drawn in the same order, including draws that end up multiplied by zero.
The blurring maths (block DCT, blur schedule, block noise) comes from `training.blurring`, the
module the training loss uses too.

The samplers' option defaults are data (`EDM_DEFAULTS`, `BLUR_DEFAULTS`, those of the reference
generate.py's command line); the presets of the generate scripts list only what they change.
"""

import concurrent.futures
import os

import numpy as np
import torch

from training import blurring, fast_mode

#----------------------------------------------------------------------------
# Option defaults: the reference generate.py's command line, one place for every caller.

EDM_DEFAULTS = dict(
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, cfg_scale=1,
    S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
    sde_scale=None, # None: the deterministic Heun sampler; a number: the stochastic CelebA-HQ variant.
)

BLUR_DEFAULTS = dict(
    num_steps=18, sigma_min=0.008, sigma_max=80, rho=7, cfg_scale=1,
    truncation_sigma=0.9, truncation_t=0.93, up_scale=4, s_block=0.15, s_noise=0.2, blur_sigma_max=3,
    S_churn=None, # None: no churn step; a number: the CelebA-HQ variant's churn step.
    S_min=0, S_max=float('inf'), S_noise=1,
)

#----------------------------------------------------------------------------
# Per-seed random numbers.

_rng_pool = None

def _thread_pool():
    global _rng_pool
    if _rng_pool is None:
        _rng_pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    return _rng_pool


# Seeds are taken modulo 2**32 (as in EDM and the reference): seeds above this repeat smaller ones.
MAX_SEED = (1 << 32) - 1


class StackedRandomGenerator:
    """One torch.Generator per seed, so that every image's random numbers depend on its seed
    only (not on the batch it lands in). Row i of each draw is exactly
    `torch.randn(size[1:], generator=Generator(device).manual_seed(seed_i % 2**32))`."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        out = torch.empty(size, **kwargs)
        # Filling each row in place draws the same numbers as a fresh randn of that shape; on
        # CPU the rows are filled in parallel threads (independent generators, GIL released).
        if out.device.type == 'cpu' and len(self.generators) > 1 and out[0].numel() >= 16384:
            list(_thread_pool().map(lambda i: out[i].normal_(generator=self.generators[i]), range(len(self.generators))))
        else:
            for row, gen in zip(out, self.generators):
                row.normal_(generator=gen)
        return out

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])

#----------------------------------------------------------------------------
# Shared pieces.

def time_steps(num_steps, sigma_min, sigma_max, rho, device=None):
    """EDM's rho-spaced noise levels, float64, sigma_max -> sigma_min."""
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    return (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def guided_denoise(net, x, sigma, class_labels, cfg_scale):
    """The denoiser D(x; sigma), float64, with classifier-free guidance when cfg_scale > 1
    (conditional call first, then the unconditional one). Networks prepared for the fast mode
    (training.fast_mode) make both passes in one batch."""
    if fast_mode.uses_batched_guidance(net):
        return fast_mode.batched_guided_denoise(net, x, sigma, class_labels, cfg_scale)
    if cfg_scale > 1:
        cond = net(x, sigma, class_labels).to(torch.float64)
        uncond = net(x, sigma, None).to(torch.float64)
        return cfg_scale * cond - (cfg_scale - 1) * uncond
    return net(x, sigma, class_labels).to(torch.float64)


def blur_time_steps(net, num_steps, sigma_min, sigma_max, rho, truncation_sigma, device=None):
    """The second stage's noise levels: the rho-spaced schedule (clamped to the network's range)
    cut to the levels below truncation_sigma. ValueError when none is left."""
    t_steps = time_steps(num_steps, max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max), rho, device)
    kept = (t_steps < truncation_sigma).nonzero()
    if len(kept) == 0:
        raise ValueError(f'truncation_sigma={truncation_sigma} leaves no step of the noise schedule '
                         f'(its lowest level is {float(t_steps[-1]):.4g}); raise it or lower sigma_min')
    return t_steps[int(kept[0]):]

#----------------------------------------------------------------------------
# First stage.

def edm_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=EDM_DEFAULTS['num_steps'], sigma_min=EDM_DEFAULTS['sigma_min'], sigma_max=EDM_DEFAULTS['sigma_max'],
    rho=EDM_DEFAULTS['rho'], S_churn=EDM_DEFAULTS['S_churn'], S_min=EDM_DEFAULTS['S_min'], S_max=EDM_DEFAULTS['S_max'],
    S_noise=EDM_DEFAULTS['S_noise'], cfg_scale=EDM_DEFAULTS['cfg_scale'], sde_scale=EDM_DEFAULTS['sde_scale'],
):
    """First stage: EDM's 2nd-order Heun sampler with churn and classifier-free guidance.

    sde_scale=None is the sampler of the reference's generate.py / generate_imagenet.py. A number
    selects the stochastic variant of the reference's generate_celebahq.py: each step moves to
    sqrt(t_next^2 - g^2) with g = sde_scale * t_next and adds fresh noise of std g.
    One noise draw per step for the churn (even when the churn is zero), plus two per step
    (one in the last) for the stochastic variant; `edm_sampler_draws` counts them.
    """
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = time_steps(num_steps, sigma_min, sigma_max, rho, latents.device)
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])]) # t_N = 0

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])): # 0, ..., N-1
        x_cur = x_next

        # Increase noise temporarily.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step.
        denoised = guided_denoise(net, x_hat, t_hat, class_labels, cfg_scale)
        d_cur = (x_hat - denoised) / t_hat
        if sde_scale is None:
            x_next = x_hat + (t_next - t_hat) * d_cur
        else:
            g_t = sde_scale * t_next
            a_t = ((t_next ** 2 - g_t ** 2) / t_hat ** 2) ** 0.5
            x_next = x_hat + (a_t - 1) * t_hat * d_cur + g_t * randn_like(x_next)

        # Apply 2nd order correction.
        if i < num_steps - 1:
            denoised = guided_denoise(net, x_next, t_next, class_labels, cfg_scale)
            d_prime = (x_next - denoised) / t_next
            if sde_scale is None:
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
            else:
                x_next = x_hat + (a_t - 1) * t_hat * (0.5 * d_cur + 0.5 * d_prime) + g_t * randn_like(x_next)
    return x_next


def edm_sampler_draws(num_steps, sde_scale=None):
    """How many full-size float64 noise draws `edm_sampler` makes per image (after the latents)."""
    return num_steps if sde_scale is None else 3 * num_steps - 1


def skip_first_stage_draws(rnd, shape, num_steps=EDM_DEFAULTS['num_steps'], sde_scale=EDM_DEFAULTS['sde_scale'], device=None):
    """Advance every generator of `rnd` past what a first stage of `shape` (C, H, W) would draw
    for its seed: the float32 latents, then edm_sampler's float64 per-step noise. The second stage
    then uses the noise it would get in a run of both stages."""
    for gen in rnd.generators:
        torch.randn(shape, generator=gen, device=device)
        for _ in range(edm_sampler_draws(num_steps, sde_scale)):
            torch.randn(shape, generator=gen, device=device, dtype=torch.float64)

#----------------------------------------------------------------------------
# Second stage.

def blur_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=BLUR_DEFAULTS['num_steps'], sigma_min=BLUR_DEFAULTS['sigma_min'], sigma_max=BLUR_DEFAULTS['sigma_max'],
    rho=BLUR_DEFAULTS['rho'], truncation_sigma=BLUR_DEFAULTS['truncation_sigma'], truncation_t=BLUR_DEFAULTS['truncation_t'],
    up_scale=BLUR_DEFAULTS['up_scale'], cfg_scale=BLUR_DEFAULTS['cfg_scale'], s_block=BLUR_DEFAULTS['s_block'],
    s_noise=BLUR_DEFAULTS['s_noise'], blur_sigma_max=BLUR_DEFAULTS['blur_sigma_max'], S_churn=BLUR_DEFAULTS['S_churn'],
    S_min=BLUR_DEFAULTS['S_min'], S_max=BLUR_DEFAULTS['S_max'], S_noise=BLUR_DEFAULTS['S_noise'], trace=None,
):
    """Second stage: blurring diffusion from upsampled first-stage images `latents` (N, C, H, W).

    The rho-spaced schedule is cut to the noise levels below truncation_sigma; the start is
    latents + t_0 * (eps + s_block * block noise). Each Heun step is taken in the block-DCT
    domain, where the blur is diagonal (alphas from `training.blurring.alpha_schedule` with
    prob_length = truncation_t), keeps sqrt(1 - s_noise^2) of the noise and adds
    s_noise * t_next * (eps + s_block * block noise) afresh. The last step returns the denoiser's
    output. truncation_sigma: truncation point of the noise schedule; truncation_t: of the blur
    time; up_scale: block size = upsampling factor; s_block: block noise strength; s_noise:
    stochasticity.

    S_churn=None is the sampler of the reference's generate.py / generate_imagenet.py; a number
    selects the reference generate_celebahq.py's variant with an EDM churn step (one extra noise
    draw per step, even when the churn is zero; the update still starts from the unchurned x).
    trace: optional dict that receives 'start', the noisy starting point (for figures).
    """
    k = int(up_scale)
    t_steps = blur_time_steps(net, num_steps, sigma_min, sigma_max, rho, truncation_sigma, latents.device)
    num_steps = len(t_steps)
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])]) # t_N = 0

    # Blur attenuation of every noise level, once per run (the reference: scipy twice a step).
    alphas = blurring.alpha_schedule(t_steps[:-1], k, prob_length=truncation_t, blur_sigma_max=blur_sigma_max, device=latents.device)

    def fresh_noise(like):
        # The reference's order: the plain draw, then the block noise's own draw.
        if s_block > 0:
            return randn_like(like) + s_block * blurring.block_noise(latents, randn_like, k)
        return randn_like(like)

    def relay_step(u_cur, du, alpha_cur, alpha_next, t_hat, t_next, like):
        # x_next = IDCT(P * u_cur + Q * du) + noise, with P, Q float32 per frequency as in the
        # reference (alphas are float32 and the 0-d scalars do not promote them).
        gamma = (1 - s_noise ** 2) ** 0.5 * t_next / t_hat
        P = alpha_next + gamma - gamma * alpha_cur
        Q = t_hat * (gamma * alpha_cur - alpha_next)
        mixed = blurring.scale_frequencies(u_cur, P, k) + blurring.scale_frequencies(du, Q, k)
        return blurring.block_idct(mixed, k) + s_noise * t_next * fresh_noise(like)

    x_next = latents.to(torch.float64)
    x_cur = None
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])): # 0, ..., N-1
        if x_cur is None:
            if s_block > 0:
                x_cur = x_next + randn_like(x_next) * t_cur + s_block * blurring.block_noise(latents, randn_like, k) * t_cur
            else:
                x_cur = x_next + randn_like(x_next) * t_cur
            if trace is not None:
                trace['start'] = x_cur
        else:
            x_cur = x_next

        # Optional churn (CelebA-HQ variant): only the denoiser sees the churned x.
        t_hat, x_hat, alpha_cur = t_cur, x_cur, alphas[i]
        if S_churn is not None:
            gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
            t_hat = net.round_sigma(t_cur + gamma * t_cur)
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
            if gamma != 0:
                alpha_cur = blurring.alpha_schedule(t_hat.reshape(1), k, prob_length=truncation_t, blur_sigma_max=blur_sigma_max, device=latents.device)[0]

        # Euler step.
        denoised = guided_denoise(net, x_hat, t_hat, class_labels, cfg_scale)
        if i == num_steps - 1:
            return denoised
        alpha_next = alphas[i + 1]
        u_cur = blurring.block_dct(x_cur, k)
        d_cur = blurring.block_dct(x_cur - denoised, k) / t_hat # = (DCT x - DCT D(x)) / t
        x_next = relay_step(u_cur, d_cur, alpha_cur, alpha_next, t_hat, t_next, x_next)

        # Apply 2nd order correction.
        denoised = guided_denoise(net, x_next, t_next, class_labels, cfg_scale)
        d_prime = blurring.block_dct(x_next - denoised, k) / t_next
        x_next = relay_step(u_cur, (d_cur + d_prime) / 2, alpha_cur, alpha_next, t_hat, t_next, x_next)
    return x_next

#----------------------------------------------------------------------------
