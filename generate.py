"""Relay Diffusion sampling: a first-stage EDM model at low resolution, its output upsampled
(nearest) and relayed to a second-stage blurring-diffusion model at high resolution.

With the same weights, seeds and options the images equal the reference implementation's
(THUDM/RelayDiffusion generate.py, generate_imagenet.py, generate_celebahq.py): same schedules,
same float64 arithmetic, and the same per-seed random numbers drawn in the same order, including
draws that end up multiplied by zero. `generate_imagenet.py` and `generate_celebahq.py` are the
same command with the paper's settings as defaults (see PRESETS).

Differences from the reference, all deliberate:
- `--sampler_stages=second` works (the reference crashes): by default the per-seed generators are
  advanced past the first stage's draws, so the relay uses the noise a `both` run would use.
- any resolution: first resolution x up_scale must equal the second network's (the reference
  hard-codes 256 px); any number of processes, CPU or CUDA, no process group needed.
- resumable (seeds whose PNG exists are skipped), atomic PNG writes, progress bar, optional grid.
"""

import concurrent.futures
import inspect
import math
import os

import click
import numpy as np
import PIL.Image
import PIL.ImageEnhance
import torch
import torch.nn.functional as F
import tqdm

from dnnlib.util import parse_int_list  # noqa: F401 (part of this module's interface, as in the reference)
from torch_utils import distributed as dist
from torch_utils import misc
from training import blurring

#----------------------------------------------------------------------------
# Per-seed random numbers.

_rng_pool = None

def _thread_pool():
    global _rng_pool
    if _rng_pool is None:
        _rng_pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    return _rng_pool


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
# Samplers.

def _time_steps(num_steps, sigma_min, sigma_max, rho, device):
    # EDM's rho-spaced noise levels, float64, sigma_max -> sigma_min.
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    return (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _denoise(net, x, sigma, class_labels, cfg_scale):
    # Classifier-free guidance only when cfg_scale > 1 (the conditional call comes first).
    if cfg_scale > 1:
        cond = net(x, sigma, class_labels).to(torch.float64)
        uncond = net(x, sigma, None).to(torch.float64)
        return cfg_scale * cond - (cfg_scale - 1) * uncond
    return net(x, sigma, class_labels).to(torch.float64)


def edm_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=256, sigma_min=0.002, sigma_max=80, rho=7,
    S_churn=40, S_min=0.05, S_max=50, S_noise=1.003, cfg_scale=0, sde_scale=None,
):
    """First stage: EDM's 2nd-order Heun sampler with churn and classifier-free guidance.

    sde_scale=None is the sampler of the reference's generate.py / generate_imagenet.py. A number
    selects the stochastic variant of the reference's generate_celebahq.py: each step moves to
    sqrt(t_next^2 - g^2) with g = sde_scale * t_next and adds fresh noise of std g.
    One noise draw per step for the churn (even when the churn is zero), plus two per step
    (one in the last) for the stochastic variant.
    """
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = _time_steps(num_steps, sigma_min, sigma_max, rho, latents.device)
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])]) # t_N = 0

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])): # 0, ..., N-1
        x_cur = x_next

        # Increase noise temporarily.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step.
        denoised = _denoise(net, x_hat, t_hat, class_labels, cfg_scale)
        d_cur = (x_hat - denoised) / t_hat
        if sde_scale is None:
            x_next = x_hat + (t_next - t_hat) * d_cur
        else:
            g_t = sde_scale * t_next
            a_t = ((t_next ** 2 - g_t ** 2) / t_hat ** 2) ** 0.5
            x_next = x_hat + (a_t - 1) * t_hat * d_cur + g_t * randn_like(x_next)

        # Apply 2nd order correction.
        if i < num_steps - 1:
            denoised = _denoise(net, x_next, t_next, class_labels, cfg_scale)
            d_prime = (x_next - denoised) / t_next
            if sde_scale is None:
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
            else:
                x_next = x_hat + (a_t - 1) * t_hat * (0.5 * d_cur + 0.5 * d_prime) + g_t * randn_like(x_next)
    return x_next


def edm_sampler_draws(num_steps, sde_scale=None):
    """How many full-size float64 noise draws `edm_sampler` makes per image (after the latents)."""
    return num_steps if sde_scale is None else 3 * num_steps - 1


def blur_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=250, sigma_min=0.008, sigma_max=80, rho=7,
    truncation_sigma=0.9, truncation_t=0.93, up_scale=4, cfg_scale=0,
    s_block=0.15, s_noise=0.2, blur_sigma_max=3,
    S_churn=None, S_min=0, S_max=float('inf'), S_noise=1, trace=None,
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
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = _time_steps(num_steps, sigma_min, sigma_max, rho, latents.device)
    kept = (t_steps < truncation_sigma).nonzero()
    if len(kept) == 0:
        raise ValueError(f'truncation_sigma={truncation_sigma} leaves no step of the noise schedule')
    t_steps = t_steps[int(kept[0]):]
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
        denoised = _denoise(net, x_hat, t_hat, class_labels, cfg_scale)
        if i == num_steps - 1:
            return denoised
        alpha_next = alphas[i + 1]
        u_cur = blurring.block_dct(x_cur, k)
        d_cur = blurring.block_dct(x_cur - denoised, k) / t_hat # = (DCT x - DCT D(x)) / t
        x_next = relay_step(u_cur, d_cur, alpha_cur, alpha_next, t_hat, t_next, x_next)

        # Apply 2nd order correction.
        denoised = _denoise(net, x_next, t_next, class_labels, cfg_scale)
        d_prime = blurring.block_dct(x_next - denoised, k) / t_next
        x_next = relay_step(u_cur, (d_cur + d_prime) / 2, alpha_cur, alpha_next, t_hat, t_next, x_next)
    return x_next

#----------------------------------------------------------------------------
# Saving. The reference's post-processing (PIL ImageEnhance factors, applied in this order).

POSTPROCESS = {
    'none':     [],
    'imagenet': [('Brightness', 1.06)],
    'celebahq': [('Contrast', 0.9), ('Brightness', 1.05), ('Color', 0.99)],
}


def image_path(outdir, seed, subdirs=True):
    return os.path.join(outdir, f'{seed - seed % 1000:06d}', f'{seed:06d}.png') if subdirs else os.path.join(outdir, f'{seed:06d}.png')


def to_uint8(images):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 numpy, rounded as the reference (x*127.5+128, truncated)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_image(image_np, path, postprocess='none'):
    img = PIL.Image.fromarray(image_np[:, :, 0], 'L') if image_np.shape[2] == 1 else PIL.Image.fromarray(image_np, 'RGB')
    for name, factor in POSTPROCESS[postprocess]:
        img = getattr(PIL.ImageEnhance, name)(img).enhance(factor)
    with misc.atomic_write(path, 'wb') as f:
        img.save(f, format='PNG')


def load_image(path):
    """PNG -> (C, H, W) uint8 numpy."""
    with PIL.Image.open(path) as img:
        arr = np.array(img)
    return arr[np.newaxis] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def find_input_image(indir, seed):
    for path in (image_path(indir, seed, True), image_path(indir, seed, False)):
        if os.path.isfile(path):
            return path
    return None


def grid_path(outdir):
    return os.path.normpath(outdir) + '-grid.png'


def write_grid(paths, dest):
    images = [load_image(p) for p in paths]
    c, h, w = images[0].shape
    gw = int(math.ceil(math.sqrt(len(images))))
    gh = int(math.ceil(len(images) / gw))
    grid = np.zeros([gh * h, gw * w, c], dtype=np.uint8)
    for idx, img in enumerate(images):
        y, x = divmod(idx, gw)
        grid[y * h:(y + 1) * h, x * w:(x + 1) * w] = img.transpose(1, 2, 0)
    save_image(grid, dest)

#----------------------------------------------------------------------------
# The generation loop.

def _fail(msg):
    raise click.ClickException(msg)


def _load_network(network, what, device):
    if isinstance(network, torch.nn.Module):
        return network.eval().requires_grad_(False).to(device)
    from torch_utils import checkpoint # H2's loader: safe unpickling of .pkl/.pt/.safetensors
    try:
        net = checkpoint.load_network(network)
    except Exception as e: # CheckpointError already names the file and the problem
        _fail(f'Cannot load {what} "{network}": {e}')
    return net.eval().requires_grad_(False).to(device)


def _load_networks(stages, network_first, network_second, device):
    # Rank 0 loads first (it may download into the cache), the others follow; a failure is
    # reported by every rank after the barrier instead of leaving the others waiting.
    nets, error = {}, None
    if dist.get_rank() != 0:
        dist.barrier()
    try:
        if stages in ('first', 'both'):
            dist.print0(f'Loading first stage network from "{network_first}"...' if isinstance(network_first, str) else 'Using first stage network...')
            nets['first'] = _load_network(network_first, '--network_first', device)
        if stages in ('second', 'both'):
            dist.print0(f'Loading second stage network from "{network_second}"...' if isinstance(network_second, str) else 'Using second stage network...')
            nets['second'] = _load_network(network_second, '--network_second', device)
    except click.ClickException as e:
        error = e
    if dist.get_rank() == 0:
        dist.barrier()
    if error is not None:
        raise error
    return nets.get('first'), nets.get('second')


# edm_sampler's own default, for callers that leave num_steps_first unset (one source of truth).
EDM_SAMPLER_DEFAULT_STEPS = inspect.signature(edm_sampler).parameters['num_steps'].default


def _skip_first_stage_draws(rnd, shape, num_steps, sde_scale, device):
    # Advance each seed's generator past what edm_sampler would have drawn for it: the float32
    # latents, then its float64 per-step noise.
    for gen in rnd.generators:
        torch.randn(shape, generator=gen, device=device)
        for _ in range(edm_sampler_draws(num_steps, sde_scale)):
            torch.randn(shape, generator=gen, device=device, dtype=torch.float64)


def _stage_kwargs(preset, sampler_kwargs):
    # CLI-style *_first / *_second options over the preset's; None = the sampler's default.
    merged = {**{k: v for k, v in PRESETS[preset].items() if k.endswith(('_first', '_second'))}, **sampler_kwargs}
    unknown = [k for k in merged if not k.endswith(('_first', '_second'))]
    if unknown:
        raise TypeError(f'Unknown sampler options: {unknown}')
    first = {k[:-len('_first')]: v for k, v in merged.items() if k.endswith('_first') and v is not None}
    second = {k[:-len('_second')]: v for k, v in merged.items() if k.endswith('_second') and v is not None}
    return merged, first, second


def _class_labels(label_dim, seeds, class_idx, device):
    # One-hot seed % label_dim (the reference's choice), or --class for every image.
    if not label_dim:
        return None
    labels = torch.eye(label_dim, device=device)[torch.as_tensor(seeds, device=device) % label_dim]
    if class_idx is not None:
        labels[:, :] = 0
        labels[:, class_idx] = 1
    return labels


@torch.no_grad()
def relay_trace(net_first, net_second, seeds, class_idx=None, device=None, preset='generate', **sampler_kwargs):
    """Run both stages for `seeds` (one batch) and keep the intermediate images, for figures:
    a dict of float64 (N, C, H, W) tensors 'first' (first-stage output), 'upsampled', 'start'
    (the relay's noisy starting point) and 'final'. Same numbers as `generate_images`."""
    device = torch.device(device) if device is not None else next(net_first.parameters(), torch.empty(0)).device
    _merged, first_kwargs, second_kwargs = _stage_kwargs(preset, sampler_kwargs)
    seeds = [int(s) for s in seeds]
    labels = _class_labels(net_first.label_dim, seeds, class_idx, device)
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net_first.img_channels, net_first.img_resolution, net_first.img_resolution], device=device)
    out = dict(first=edm_sampler(net_first, latents, labels, randn_like=rnd.randn_like, **first_kwargs))
    res = net_second.img_resolution
    out['upsampled'] = F.interpolate(out['first'], size=(res, res), mode='nearest')
    out['final'] = blur_sampler(net_second, out['upsampled'], labels, randn_like=rnd.randn_like, trace=out, **second_kwargs)
    return out


@torch.no_grad()
def generate_images(
    outdir, seeds=range(64), subdirs=True, class_idx=None, max_batch_size=64, sampler_stages='both',
    network_first=None, network_second=None, indir=None, postprocess='none', grid=0,
    second_noise='continue', device=None, verbose=True, preset='generate', **sampler_kwargs,
):
    """Generate `seeds` into `outdir`/SSS000/SSSSSS.png; returns the seeds generated by this rank.

    network_first / network_second: path or URL (loaded with torch_utils.checkpoint.load_network)
    or an nn.Module. sampler_kwargs: the CLI's *_first / *_second options; those not given come
    from PRESETS[preset] (None = the sampler function's default).
    Raises click.ClickException with one line for bad input, before anything is written.
    """
    sampler_kwargs, first_kwargs, second_kwargs = _stage_kwargs(preset, sampler_kwargs)
    dist.init()
    device = torch.device(device) if device is not None else dist.get_device()
    rank, world = dist.get_rank(), dist.get_world_size()
    stages = sampler_stages
    if postprocess not in POSTPROCESS:
        _fail(f'--postprocess must be one of {", ".join(POSTPROCESS)}, not "{postprocess}"')

    # Options that need no network.
    if stages not in ('first', 'second', 'both'):
        _fail(f'--sampler_stages must be first, second or both, not "{stages}"')
    if stages in ('first', 'both') and network_first is None:
        _fail(f'--sampler_stages={stages} needs --network_first')
    if stages in ('second', 'both') and network_second is None:
        _fail(f'--sampler_stages={stages} needs --network_second')
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        _fail(f'--outdir "{outdir}" exists and is not a folder')
    if stages == 'second' and indir is None:
        _fail('--sampler_stages=second needs --indir, the folder of first-stage images')
    if stages == 'second' and not os.path.isdir(indir):
        _fail(f'--indir "{indir}" is not a folder')
    if stages == 'second' and os.path.abspath(indir) == os.path.abspath(outdir):
        _fail('--outdir must differ from --indir (the relay would replace the first-stage images)')
    for name in ('num_steps_first', 'num_steps_second'):
        if sampler_kwargs.get(name) is not None and sampler_kwargs[name] < 2:
            _fail(f'--{name} must be at least 2')
    seeds = list(dict.fromkeys(int(s) for s in seeds)) # drop repeats, keep order
    if not seeds:
        _fail('--seeds is empty')

    # Resume: seeds whose image exists are done. Every rank scans before anyone writes.
    todo = [s for s in seeds if not os.path.isfile(image_path(outdir, s, subdirs))]
    done = len(seeds) - len(todo)
    dist.barrier()

    net_first, net_second = _load_networks(stages, network_first, network_second, device)
    up_scale = int(second_kwargs.get('up_scale', 4))
    second_res = net_second.img_resolution if net_second is not None else None

    # First-stage images from --indir: all present, all the right size, before starting.
    in_shape = None
    if stages == 'second':
        missing = [s for s in todo if find_input_image(indir, s) is None]
        if missing:
            _fail(f'{len(missing)} of {len(todo)} first-stage images are missing in --indir "{indir}", '
                  f'e.g. {image_path(indir, missing[0])}')
        for s in todo:
            path = find_input_image(indir, s)
            with PIL.Image.open(path) as img:
                shape = (len(img.getbands()), img.height, img.width)
            if in_shape is None:
                in_shape = shape
            if shape != in_shape or shape[1] != shape[2]:
                _fail(f'--indir image {path} is {shape[2]}x{shape[1]} with {shape[0]} channels, '
                      f'expected square {in_shape[2]}x{in_shape[1]} with {in_shape[0]} like the first one')
        if todo and (in_shape[1] * up_scale != second_res or in_shape[0] != net_second.img_channels):
            _fail(f'--indir images are {in_shape[1]}x{in_shape[2]} with {in_shape[0]} channels, but the second '
                  f'stage needs {second_res // up_scale}x{second_res // up_scale} with {net_second.img_channels} '
                  f'channels ({second_res} px / --up_scale_second={up_scale})')

    # Stage compatibility.
    if stages == 'both':
        if net_first.img_resolution * up_scale != second_res:
            _fail(f'First stage resolution {net_first.img_resolution} x --up_scale_second={up_scale} = '
                  f'{net_first.img_resolution * up_scale}, but the second stage network is {second_res} px')
        if net_first.img_channels != net_second.img_channels:
            _fail(f'The stages disagree on channels: {net_first.img_channels} vs {net_second.img_channels}')
        if net_first.label_dim != net_second.label_dim:
            _fail(f'The stages disagree on classes: label_dim {net_first.label_dim} vs {net_second.label_dim}')
    if second_res is not None and second_res % up_scale != 0:
        _fail(f'The second stage resolution {second_res} is not divisible by --up_scale_second={up_scale}')
    label_dim = (net_first if net_first is not None else net_second).label_dim
    if class_idx is not None and not label_dim:
        _fail('--class was given but the network is unconditional')
    if class_idx is not None and not 0 <= class_idx < label_dim:
        _fail(f'--class={class_idx} is out of range: the network has {label_dim} classes (0..{label_dim - 1})')

    # Shard the remaining seeds as the reference does; every image depends on its seed only.
    num_batches = max((len(todo) - 1) // (max_batch_size * world) + 1, 1) * world
    all_batches = torch.as_tensor(todo, dtype=torch.int64).tensor_split(num_batches)
    rank_batches = all_batches[rank::world]
    if verbose:
        dist.print0(f'Generating {len(todo)} images to "{outdir}" ({done} of {len(seeds)} already there)...')
        dist.print0('first stage config:', first_kwargs if net_first is not None else None)
        dist.print0('second stage config:', second_kwargs if net_second is not None else None)

    generated = []
    bar = tqdm.tqdm(total=len(todo), unit='img', disable=(rank != 0 or not verbose), dynamic_ncols=True)
    for i, batch_seeds in enumerate(rank_batches):
        global_count = sum(len(b) for b in all_batches[i * world:(i + 1) * world])
        batch_size = len(batch_seeds)
        if batch_size == 0:
            bar.update(global_count)
            continue

        class_labels = _class_labels(label_dim, batch_seeds, class_idx, device)
        rnd = StackedRandomGenerator(device, batch_seeds)
        if stages in ('first', 'both'):
            latents = rnd.randn([batch_size, net_first.img_channels, net_first.img_resolution, net_first.img_resolution], device=device)
            images = edm_sampler(net_first, latents, class_labels, randn_like=rnd.randn_like, **first_kwargs)
        else:
            pixels = np.stack([load_image(find_input_image(indir, int(s))) for s in batch_seeds])
            images = torch.tensor(pixels, device=device, dtype=torch.float64) / 127.5 - 1
            if second_noise == 'continue':
                _skip_first_stage_draws(rnd, list(pixels.shape[1:]), first_kwargs.get('num_steps', EDM_SAMPLER_DEFAULT_STEPS), first_kwargs.get('sde_scale'), device)

        if stages in ('second', 'both'):
            images = F.interpolate(images, size=(second_res, second_res), mode='nearest')
            images = blur_sampler(net_second, images, class_labels, randn_like=rnd.randn_like, **second_kwargs)

        for seed, image_np in zip(batch_seeds.tolist(), to_uint8(images)):
            save_image(image_np, image_path(outdir, seed, subdirs), postprocess)
            generated.append(seed)
        bar.update(global_count)
    bar.close()
    dist.barrier()

    # Optional grid of the first samples, read back from disk (so it also covers resumed runs).
    if grid and rank == 0:
        # Beside the sample folder, not in it: the folder stays a clean input for evaluate.py.
        dest = grid_path(outdir)
        paths = [image_path(outdir, s, subdirs) for s in seeds[:grid]]
        if os.path.exists(dest):
            dist.print0(f'Not writing the grid: "{dest}" already exists')
        else:
            write_grid([p for p in paths if os.path.isfile(p)], dest)
    if verbose:
        dist.print0('Done.')
    return generated

#----------------------------------------------------------------------------
# Command line: one option table, one default set per script (presets are data).

PRESETS = {
    # The reference generate.py.
    'generate': dict(
        seeds='0-63', postprocess='none',
        num_steps_first=18, rho_first=7, cfg_scale_first=1, S_churn_first=0, S_min_first=0, S_max_first=float('inf'), S_noise_first=1, sde_scale_first=None,
        num_steps_second=18, rho_second=7, cfg_scale_second=1, blur_sigma_max_second=3, up_scale_second=4,
        truncation_sigma_second=0.9, truncation_t_second=0.93, s_block_second=0.15, s_noise_second=0.2, S_churn_second=None,
    ),
    # The reference generate_imagenet.py: ImageNet 256 (FID 1.87).
    'imagenet': dict(
        seeds='10000-59999', postprocess='imagenet',
        num_steps_first=256, rho_first=7, cfg_scale_first=1, S_churn_first=40, S_min_first=0.05, S_max_first=50, S_noise_first=1.003, sde_scale_first=None,
        num_steps_second=200, rho_second=100, cfg_scale_second=3.5, blur_sigma_max_second=3, up_scale_second=4,
        truncation_sigma_second=0.9, truncation_t_second=0.93, s_block_second=0.15, s_noise_second=0.2, S_churn_second=None,
    ),
    # The reference generate_celebahq.py: CelebA-HQ 256 (FID 3.15); stochastic first stage,
    # churn step (of zero) in the second.
    'celebahq': dict(
        seeds='80000-109999', postprocess='celebahq',
        num_steps_first=120, rho_first=7, cfg_scale_first=1, S_churn_first=0, S_min_first=0, S_max_first=float('inf'), S_noise_first=1, sde_scale_first=0.05,
        num_steps_second=150, rho_second=7, cfg_scale_second=1, blur_sigma_max_second=2.0, up_scale_second=4,
        truncation_sigma_second=0.95, truncation_t_second=1.05, s_block_second=0.15, s_noise_second=0.2,
        S_churn_second=0, S_min_second=0, S_max_second=float('inf'), S_noise_second=1,
    ),
}

_pos = click.FloatRange(min=0, min_open=True)
_nonneg = click.FloatRange(min=0)

# (flags, parameter name, help, metavar, type). Defaults come from the preset.
OPTIONS = [
    (['--outdir'],          'outdir',           'Where to save the output images', 'DIR', str),
    (['--seeds'],           'seeds',            'Random seeds (e.g. 1,2,5-10)', 'LIST', parse_int_list),
    (['--subdirs/--no-subdirs'], 'subdirs',     'Put images in a subfolder per 1000 seeds (always on in the reference)', None, None),
    (['--class'],           'class_idx',        'Class label  [default: seed % classes]', 'INT', click.IntRange(min=0)),
    (['--batch'],           'max_batch_size',   'Maximum batch size per process', 'INT', click.IntRange(min=1)),
    (['--sampler_stages'],  'sampler_stages',   'Which stages to run', 'first|second|both', click.Choice(['first', 'second', 'both'])),
    (['--indir'],           'indir',            'First-stage images for --sampler_stages=second (SSS000/SSSSSS.png or SSSSSS.png; write them with --postprocess=none)', 'DIR', str),
    (['--postprocess'],     'postprocess',      'Enhancement of saved images as in the reference scripts; none turns it off', 'none|imagenet|celebahq', click.Choice(list(POSTPROCESS))),
    (['--grid'],            'grid',             'Also write OUTDIR-grid.png (beside OUTDIR) of the first N seeds (0 = none)', 'N', click.IntRange(min=0)),
    (['--second_noise'],    'second_noise',     'For --sampler_stages=second: continue each seed\'s generator after the first stage\'s draws (the noise of a "both" run, given the same *_first options) or start it fresh', 'continue|fresh', click.Choice(['continue', 'fresh'])),
    # First stage.
    (['--network_first'],   'network_first',    'First stage network (.pkl, .pt, .safetensors)', 'PATH|URL', str),
    (['--num_steps_first'], 'num_steps_first',  'Number of sampling steps for first stage', 'INT', click.IntRange(min=2)),
    (['--sigma_min_first'], 'sigma_min_first',  'Lowest noise level  [default: 0.002]', 'FLOAT', _pos),
    (['--sigma_max_first'], 'sigma_max_first',  'Highest noise level  [default: 80]', 'FLOAT', _pos),
    (['--rho_first'],       'rho_first',        'Time step exponent', 'FLOAT', _pos),
    (['--cfg_scale_first'], 'cfg_scale_first',  'Scale of classifier-free guidance (> 1 enables it)', 'FLOAT', _nonneg),
    (['--S_churn'],         'S_churn_first',    'Stochasticity strength', 'FLOAT', _nonneg),
    (['--S_min'],           'S_min_first',      'Stoch. min noise level', 'FLOAT', _nonneg),
    (['--S_max'],           'S_max_first',      'Stoch. max noise level', 'FLOAT', _nonneg),
    (['--S_noise'],         'S_noise_first',    'Stoch. noise inflation', 'FLOAT', float),
    (['--sde_scale_first'], 'sde_scale_first',  'Stochastic Heun variant of the CelebA-HQ script: fresh noise of std sde_scale*t per step  [default: off]', 'FLOAT', float),
    # Second stage.
    (['--network_second'],  'network_second',   'Second stage network (.pkl, .pt, .safetensors)', 'PATH|URL', str),
    (['--num_steps_second'], 'num_steps_second', 'Number of sampling steps for second stage (before truncation)', 'INT', click.IntRange(min=2)),
    (['--sigma_min_second'], 'sigma_min_second', 'Lowest noise level  [default: 0.008]', 'FLOAT', _pos),
    (['--sigma_max_second'], 'sigma_max_second', 'Highest noise level  [default: 80]', 'FLOAT', _pos),
    (['--blur_sigma_max_second'], 'blur_sigma_max_second', 'Maximum sigma of blurring schedule', 'FLOAT', _nonneg),
    (['--rho_second'],      'rho_second',       'Time step exponent', 'FLOAT', _pos),
    (['--cfg_scale_second'], 'cfg_scale_second', 'Scale of classifier-free guidance (> 1 enables it)', 'FLOAT', _nonneg),
    (['--up_scale_second'], 'up_scale_second',  'Scale of upsampling = DCT block size (second res / first res)', 'INT', click.IntRange(min=2)),
    (['--truncation_sigma_second'], 'truncation_sigma_second', 'Truncation point of noise schedule', 'FLOAT', _pos),
    (['--truncation_t_second'], 'truncation_t_second', 'Truncation point of time schedule (prob_length)', 'FLOAT', _pos),
    (['--s_block_second'],  's_block_second',   'Strength of block noise addition', 'FLOAT', _nonneg),
    (['--s_noise_second'],  's_noise_second',   'Strength of stochasticity', 'FLOAT', click.FloatRange(min=0, max=1)),
    (['--S_churn_second'],  'S_churn_second',   'Churn step of the CelebA-HQ script\'s blur sampler (a number enables it)  [default: off]', 'FLOAT', _nonneg),
    (['--S_min_second'],    'S_min_second',     'Churn min noise level (with --S_churn_second)', 'FLOAT', _nonneg),
    (['--S_max_second'],    'S_max_second',     'Churn max noise level (with --S_churn_second)', 'FLOAT', _nonneg),
    (['--S_noise_second'],  'S_noise_second',   'Churn noise inflation (with --S_churn_second)', 'FLOAT', float),
]


def make_command(preset='generate', help=None):
    """Build the click command with the defaults of PRESETS[preset]."""
    defaults = dict(subdirs=True, class_idx=None, max_batch_size=64, sampler_stages='both', grid=0, second_noise='continue')
    defaults.update(PRESETS[preset])

    def main(**kwargs):
        kwargs['seeds'] = parse_int_list(kwargs['seeds'])
        generate_images(preset=preset, **kwargs)

    for flags, name, text, metavar, type_ in reversed(OPTIONS):
        extra = dict(help=text, default=defaults.get(name))
        if name == 'outdir':
            extra.update(required=True, default=None)
        if type_ is None:
            main = click.option(*flags, name, **extra, show_default=True)(main)
        else:
            main = click.option(*flags, name, metavar=metavar, type=type_, show_default=defaults.get(name) is not None, **extra)(main)
    return click.command(help=help)(main)


main = make_command('generate', help="""Generate images with a Relay Diffusion model pair (defaults of the reference generate.py).

\b
Examples:
  # Both stages, 64 seeds, one process:
  python generate.py --outdir=out --seeds=0-63 --network_first=first.pkl --network_second=second.pt
  # 8 GPUs; re-running continues where a preempted run stopped:
  torchrun --standalone --nproc_per_node=8 generate.py --outdir=out --seeds=0-49999 \\
      --network_first=first.pkl --network_second=second.pt
  # First stage only, then the relay from those images:
  python generate.py --sampler_stages=first --outdir=low --network_first=first.pkl
  python generate.py --sampler_stages=second --indir=low --outdir=out --network_second=second.pt
""")

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
