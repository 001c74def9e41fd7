"""Python API of the relay: load both stages, get images in memory.

    from training.pipeline import RelayPipeline
    pipe = RelayPipeline('first.pkl', 'second.pt', preset='imagenet')
    images = pipe([0, 1, 2, 3])        # uint8 (N, C, H, W), the pixels generate_imagenet.py writes
    pils = pipe.to_pil(images)         # PIL images

The images equal generate.py's PNGs for the same networks, seeds, class and options (every image
depends on its seed only, so any batching gives the same pixels). The generate scripts, the
quickstart and its relay figure all sample through this class.

Options use the generate scripts' parameter names (`num_steps_first`, `S_churn_first` for
`--S_churn`, `cfg_scale_second`, ...). Their values come from, in this order: what the caller
gives, the preset (`PRESETS`), the relay settings recorded in the second-stage checkpoint
(`training.loss.training_record`), and the samplers' defaults (`training.sampling.EDM_DEFAULTS`,
`BLUR_DEFAULTS`).
"""

import math
import os
import warnings

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import torch
import torch.nn.functional as F

import training
from torch_utils import checkpoint
from training import fast_mode, loss, sampling

#----------------------------------------------------------------------------
# Presets: the reference scripts' settings, as changes to the samplers' defaults.

PRESETS = {
    # The reference generate.py (its defaults are the samplers' defaults).
    'generate': dict(seeds='0-63', postprocess='none'),
    # The reference generate_imagenet.py: ImageNet 256 (FID 1.87).
    'imagenet': dict(
        seeds='10000-59999', postprocess='imagenet',
        num_steps_first=256, S_churn_first=40, S_min_first=0.05, S_max_first=50, S_noise_first=1.003,
        num_steps_second=200, rho_second=100, cfg_scale_second=3.5,
    ),
    # The reference generate_celebahq.py: CelebA-HQ 256 (FID 3.15); stochastic first stage,
    # churn step (of zero) in the second. The reference trains this relay with --prob-length=0.89
    # and samples it with truncation_t=1.05: a sampling choice, kept over the checkpoint's value.
    'celebahq': dict(
        seeds='80000-109999', postprocess='celebahq',
        num_steps_first=120, sde_scale_first=0.05,
        num_steps_second=150, blur_sigma_max_second=2.0, truncation_sigma_second=0.95, truncation_t_second=1.05,
        S_churn_second=0,
        independent_of_checkpoint=('truncation_t_second',),
    ),
}

# The reference's post-processing of saved images (PIL ImageEnhance factors, in this order).
POSTPROCESS = {
    'none':     [],
    'imagenet': [('Brightness', 1.06)],
    'celebahq': [('Contrast', 0.9), ('Brightness', 1.05), ('Color', 0.99)],
}

# Every sampler option as the generate scripts name it: <sampler keyword>_first / _second.
FIRST_OPTIONS = {f'{name}_first': name for name in sampling.EDM_DEFAULTS}
SECOND_OPTIONS = {f'{name}_second': name for name in sampling.BLUR_DEFAULTS}
SAMPLER_OPTIONS = {**FIRST_OPTIONS, **SECOND_OPTIONS}

# The command-line flag of each option where it differs from --<name> (the reference's names).
FLAGS = {'S_churn_first': '--S_churn', 'S_min_first': '--S_min', 'S_max_first': '--S_max', 'S_noise_first': '--S_noise'}

# Relay settings recorded by the training (training.loss.RELAY_SETTINGS = train.py's --up-scale,
# --blur-sigma-max, --block-scale, --prob-length) and the blur sampler option of the same meaning.
RELAY_SETTINGS = {
    'up_scale':       'up_scale_second',       # DCT block size = upsampling factor
    'blur_sigma_max': 'blur_sigma_max_second', # maximum blur of the schedule
    'block_scale':    's_block_second',        # strength of block noise
    'prob_length':    'truncation_t_second',   # the blur schedule's time scaling (get_alpha_t's prob_length)
}


class RelayError(ValueError):
    """Bad input to the relay (options, networks, images); the message is one line."""


def flag(name):
    return FLAGS.get(name, f'--{name}')

#----------------------------------------------------------------------------
# Options: range checks and resolution.

def _number(name, value, low=None, high=None, low_open=False, allow_inf=False, integer=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RelayError(f'{flag(name)}={value!r} is not a number')
    if integer and int(value) != value:
        raise RelayError(f'{flag(name)}={value} must be a whole number')
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise RelayError(f'{flag(name)}={value} must be a finite number')
    if low is not None and (value <= low if low_open else value < low):
        raise RelayError(f'{flag(name)}={value} must be {">" if low_open else ">="} {low}')
    if high is not None and value > high:
        raise RelayError(f'{flag(name)}={value} must be <= {high}')


def _ordered(options, low_name, high_name, strict=True):
    low, high = options[low_name], options[high_name]
    if low > high or (strict and low == high):
        raise RelayError(f'{flag(low_name)}={low} must be {"below" if strict else "at most"} {flag(high_name)}={high}')


# More sampling steps than this is a typo (the papers use at most 256); the schedule alone would
# take 8 bytes per step.
MAX_STEPS = 1_000_000


def _schedule_computable(o, s):
    # The rho-spaced schedule goes through sigma ** (1 / rho): a tiny rho overflows it, a huge
    # one rounds every level to 1. Its ends decide (the levels between are interpolated): they
    # must come back as sigma_max and sigma_min.
    want = torch.tensor([float(o['sigma_max' + s]), float(o['sigma_min' + s])], dtype=torch.float64)
    try:
        ends = sampling.time_steps(2, float(want[1]), float(want[0]), float(o['rho' + s]))
        ok = bool(torch.isfinite(ends).all() and torch.allclose(ends, want, rtol=1e-6, atol=0))
    except (OverflowError, ZeroDivisionError):
        ok = False
    if not ok:
        raise RelayError(f'{flag("rho" + s)}={o["rho" + s]} with {flag("sigma_min" + s)}={o["sigma_min" + s]} and '
                         f'{flag("sigma_max" + s)}={o["sigma_max" + s]} gives a noise schedule that overflows or '
                         f'rounds away; use a rho around 7')


def check_options(options):
    """Range checks of every sampler option (RelayError with one line for the first bad one)."""
    for stage in ('first', 'second'):
        o = {name: options[name] for name in options if name.endswith('_' + stage)}
        s = '_' + stage
        _number('num_steps' + s, o['num_steps' + s], low=2, high=MAX_STEPS, integer=True)
        for name in ('sigma_min', 'sigma_max', 'rho'):
            _number(name + s, o[name + s], low=0, low_open=True)
        _ordered(o, 'sigma_min' + s, 'sigma_max' + s)
        _schedule_computable(o, s)
        _number('cfg_scale' + s, o['cfg_scale' + s], low=0)
        for name in ('S_min', 'S_noise'):
            _number(name + s, o[name + s], low=0)
        _number('S_max' + s, o['S_max' + s], low=0, allow_inf=True)
        _ordered(o, 'S_min' + s, 'S_max' + s, strict=False)
    _number('S_churn_first', options['S_churn_first'], low=0)
    if options['sde_scale_first'] is not None:
        _number('sde_scale_first', options['sde_scale_first'], low=0, high=1)
    if options['S_churn_second'] is not None:
        _number('S_churn_second', options['S_churn_second'], low=0)
    _number('truncation_sigma_second', options['truncation_sigma_second'], low=0, low_open=True)
    _number('truncation_t_second', options['truncation_t_second'], low=0, low_open=True)
    _number('up_scale_second', options['up_scale_second'], low=1, integer=True)
    _number('s_block_second', options['s_block_second'], low=0)
    _number('s_noise_second', options['s_noise_second'], low=0, high=1)
    _number('blur_sigma_max_second', options['blur_sigma_max_second'], low=0)


def resolve_options(preset='generate', options=None, relay_settings=None):
    """All sampler options (generate-script names -> values) and notes about the checkpoint.

    options: the caller's options (None values count as not given); relay_settings: what
    `training.loss.training_record` found in the second-stage checkpoint. Returns (options, warnings):
    warnings name a given option that contradicts the checkpoint, with both values.
    """
    if preset not in PRESETS:
        raise RelayError(f'unknown preset "{preset}"; choose one of {", ".join(PRESETS)}')
    given = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(given) - set(SAMPLER_OPTIONS))
    if unknown:
        raise RelayError(f'unknown sampler option {unknown[0]}; the options are {", ".join(SAMPLER_OPTIONS)}')
    preset_values = {k: v for k, v in PRESETS[preset].items() if k in SAMPLER_OPTIONS}
    independent = PRESETS[preset].get('independent_of_checkpoint', ())

    resolved = {name: sampling.EDM_DEFAULTS[key] for name, key in FIRST_OPTIONS.items()}
    resolved.update({name: sampling.BLUR_DEFAULTS[key] for name, key in SECOND_OPTIONS.items()})
    recorded = {RELAY_SETTINGS[key]: (key, value) for key, value in (relay_settings or {}).items()}
    resolved.update({name: value for name, (_key, value) in recorded.items()})
    resolved.update(preset_values)
    resolved.update(given)

    notes = []
    for name, (key, value) in recorded.items():
        if resolved[name] != value and name not in (set(independent) - set(given)):
            source = 'given' if name in given else f'set by the {preset} preset'
            notes.append(f'{flag(name)}={resolved[name]} ({source}) differs from the second-stage checkpoint\'s '
                         f'training setting {key}={value} (train.py --{key.replace("_", "-")}); using {resolved[name]}')
    check_options(resolved)
    return resolved, notes


def stage_kwargs(options):
    """Split resolved options into (edm_sampler kwargs, blur_sampler kwargs)."""
    first = {key: options[name] for name, key in FIRST_OPTIONS.items()}
    second = {key: options[name] for name, key in SECOND_OPTIONS.items()}
    second['up_scale'] = int(second['up_scale'])
    first['num_steps'], second['num_steps'] = int(first['num_steps']), int(second['num_steps'])
    return first, second

#----------------------------------------------------------------------------
# Loading.

def load_stage(network, stage, device):
    """(network, checkpoint dict or None) for a path, URL or nn.Module; RelayError names the
    option and the problem, including a checkpoint trained for the other stage."""
    option = f'--network_{stage}'
    if isinstance(network, torch.nn.Module):
        return network.eval().requires_grad_(False).to(device), None
    try:
        data = training.load_checkpoint(os.fspath(network) if isinstance(network, os.PathLike) else network)
    except checkpoint.CheckpointError as e:
        raise RelayError(f'Cannot load {option} "{network}": {e}') from None
    net = data['ema']
    if not isinstance(net, torch.nn.Module):
        raise RelayError(f'Cannot load {option} "{network}": its "ema" entry is a {type(net).__name__}, not a network')
    record = loss.training_record(data)
    if record.stage is not None and record.stage != stage:
        other = 'first' if stage == 'second' else 'second'
        raise RelayError(f'{option} "{network}" is a {record.stage}-stage checkpoint (trained with '
                         f'{record.loss}); pass it as --network_{other}')
    return net.eval().requires_grad_(False).to(device), data

#----------------------------------------------------------------------------
# Images.

def to_uint8(images):
    """Sampler output (N, C, H, W) in [-1, 1] -> uint8 (N, C, H, W), rounded as the reference
    (x * 127.5 + 128, truncated). RelayError for a non-finite sample."""
    bad = (~torch.isfinite(images)).flatten(1).any(dim=1)
    if bad.any():
        raise RelayError(f'{int(bad.sum())} of {len(images)} samples hold non-finite values (NaN/inf); '
                         'no image written; check the sampler options and the networks')
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def uint8_to_pil(image):
    """(C, H, W) uint8 tensor or numpy -> PIL image (greyscale for one channel)."""
    arr = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image).transpose(1, 2, 0)
    return PIL.Image.fromarray(arr[:, :, 0], 'L') if arr.shape[2] == 1 else PIL.Image.fromarray(np.ascontiguousarray(arr), 'RGB')


def postprocess_pil(img, postprocess):
    for name, factor in POSTPROCESS[postprocess]:
        img = getattr(PIL.ImageEnhance, name)(img).enhance(factor)
    return img


def apply_postprocess(images, postprocess):
    """The reference's PIL enhancement of uint8 (N, C, H, W) images, as uint8 (N, C, H, W)."""
    if not POSTPROCESS[postprocess]:
        return images
    out = [np.asarray(postprocess_pil(uint8_to_pil(img), postprocess)) for img in images]
    out = [arr[:, :, np.newaxis] if arr.ndim == 2 else arr for arr in out]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()

#----------------------------------------------------------------------------
# Seeds.

MAX_SEED = sampling.MAX_SEED


def check_seeds(seeds):
    """Seeds as a list of ints in 0..MAX_SEED (a larger or negative seed would silently give the
    image of another seed, as the generators use seed % 2**32); RelayError otherwise."""
    out = []
    for seed in seeds:
        if isinstance(seed, bool) or int(seed) != seed or not 0 <= int(seed) <= MAX_SEED:
            raise RelayError(f'seed {seed!r} is not a whole number in 0..{MAX_SEED:,} (seeds are used modulo 2**32)')
        out.append(int(seed))
    return out

def plan_batches(seeds, max_batch_size, world_size=1):
    """The seeds split into batches as the reference's generate.py does: a multiple of
    world_size batches of at most max_batch_size; rank r takes batches[r::world_size]."""
    num_batches = max((len(seeds) - 1) // (max_batch_size * world_size) + 1, 1) * world_size
    return [b.tolist() for b in torch.as_tensor(list(seeds), dtype=torch.int64).tensor_split(num_batches)]


def class_labels(label_dim, seeds, class_idx, device):
    """One-hot seed % label_dim (the reference's choice), or class_idx for every image; None
    for an unconditional network."""
    if not label_dim:
        return None
    labels = torch.eye(label_dim, device=device)[torch.as_tensor(seeds, device=device) % label_dim]
    if class_idx is not None:
        labels[:, :] = 0
        labels[:, class_idx] = 1
    return labels

#----------------------------------------------------------------------------
# The pipeline.

class RelayPipeline:
    """Both relay stages, loaded once; call with seeds to get images.

    network_first / network_second: path or URL (loaded with torch_utils.checkpoint's safe
    loader) or an nn.Module; either may be None for a one-stage pipeline. preset: a key of
    PRESETS (its post-processing and sampler options). options: sampler options by the
    generate scripts' names; postprocess: override the preset's ('none' turns it off).
    warn: also issue the checkpoint-mismatch notes (`self.warnings`) as Python warnings.
    fast: a training.fast_mode.FastSettings (None = exact mode, the reference's images).
    Raises RelayError (one line) for bad options or networks.
    """

    def __init__(self, network_first=None, network_second=None, preset='generate', device=None,
                 postprocess=None, warn=True, fast=None, **options):
        self.options, _ = resolve_options(preset, options) # Checks the numbers before any loading.
        self.postprocess = postprocess if postprocess is not None else PRESETS[preset]['postprocess']
        if self.postprocess not in POSTPROCESS:
            raise RelayError(f'--postprocess must be one of {", ".join(POSTPROCESS)}, not "{self.postprocess}"')
        if network_first is None and network_second is None:
            raise RelayError('give --network_first, --network_second or both')
        self.device = torch.device(device) if device is not None else torch.device('cuda' if torch.cuda.is_available() else 'cpu')

        self.net_first = self.net_second = None
        self.relay_settings = {}
        if network_first is not None:
            self.net_first, _ = load_stage(network_first, 'first', self.device)
        if network_second is not None:
            self.net_second, data = load_stage(network_second, 'second', self.device)
            self.relay_settings = loss.training_record(data).relay
        self.options, self.warnings = resolve_options(preset, options, self.relay_settings)
        for note in self.warnings if warn else ():
            warnings.warn(note, stacklevel=2)
        self.first_kwargs, self.second_kwargs = stage_kwargs(self.options)
        self._check_networks()
        self.fast = fast if fast is not None else fast_mode.EXACT
        self.net_first, self.net_second = (fast_mode.prepare(n, self.fast) if n is not None else None
                                           for n in (self.net_first, self.net_second))

    def _check_networks(self):
        first, second, k = self.net_first, self.net_second, self.second_kwargs['up_scale']
        if second is not None:
            if second.img_resolution % k != 0:
                raise RelayError(f'The second stage resolution {second.img_resolution} is not divisible by --up_scale_second={k}')
            try:
                o = self.second_kwargs
                sampling.blur_time_steps(second, o['num_steps'], o['sigma_min'], o['sigma_max'], o['rho'], o['truncation_sigma'])
            except ValueError as e:
                raise RelayError(f'--truncation_sigma_second: {e}') from None
        if first is not None and second is not None:
            if first.img_resolution * k != second.img_resolution:
                raise RelayError(f'First stage resolution {first.img_resolution} x --up_scale_second={k} = '
                                 f'{first.img_resolution * k}, but the second stage network is {second.img_resolution} px')
            if first.img_channels != second.img_channels:
                raise RelayError(f'The stages disagree on channels: {first.img_channels} vs {second.img_channels}')
            if first.label_dim != second.label_dim:
                raise RelayError(f'The stages disagree on classes: label_dim {first.label_dim} vs {second.label_dim}')

    @property
    def label_dim(self):
        return (self.net_first if self.net_first is not None else self.net_second).label_dim

    @property
    def first_shape(self):
        """(C, H, W) of the first stage's images (the second stage's input before upsampling)."""
        if self.net_first is not None:
            return (self.net_first.img_channels, self.net_first.img_resolution, self.net_first.img_resolution)
        res = self.net_second.img_resolution // self.second_kwargs['up_scale']
        return (self.net_second.img_channels, res, res)

    def check_class(self, class_idx):
        if class_idx is not None and not self.label_dim:
            raise RelayError('--class was given but the network is unconditional')
        if class_idx is not None and not 0 <= class_idx < self.label_dim:
            raise RelayError(f'--class={class_idx} is out of range: the network has {self.label_dim} classes (0..{self.label_dim - 1})')

    def _stages(self, stages, first_images):
        if stages is None:
            stages = 'second' if first_images is not None else ('both' if self.net_first is not None and self.net_second is not None else
                                                                  'first' if self.net_first is not None else 'second')
        if stages not in ('first', 'second', 'both'):
            raise RelayError(f'stages must be first, second or both, not "{stages}"')
        if stages in ('first', 'both') and self.net_first is None:
            raise RelayError(f'--sampler_stages={stages} needs --network_first')
        if stages in ('second', 'both') and self.net_second is None:
            raise RelayError(f'--sampler_stages={stages} needs --network_second')
        if stages == 'second' and first_images is None:
            raise RelayError('--sampler_stages=second needs first-stage images')
        return stages

    @torch.no_grad()
    def sample(self, seeds, class_idx=None, first_images=None, stages=None, second_noise='continue', trace=None):
        """One batch: float64 (N, C, H, W) sampler output (about [-1, 1]) of the given stages.

        first_images: uint8 (N, C, h, w) first-stage images (as read from PNGs) for stages='second'.
        second_noise: 'continue' advances each seed's generator past the first stage's draws, so
        that the relay uses the noise of a run of both stages; 'fresh' starts it anew.
        trace: optional dict that receives 'first', 'upsampled', 'start' (for figures).
        """
        stages = self._stages(stages, first_images)
        self.check_class(class_idx)
        seeds = check_seeds(seeds)
        labels = class_labels(self.label_dim, seeds, class_idx, self.device)
        rnd = sampling.StackedRandomGenerator(self.device, seeds)
        if stages in ('first', 'both'):
            c, h, w = self.first_shape
            latents = rnd.randn([len(seeds), c, h, w], device=self.device)
            images = sampling.edm_sampler(self.net_first, latents, labels, randn_like=rnd.randn_like, **self.first_kwargs)
        else:
            first_images = torch.as_tensor(first_images)
            if tuple(first_images.shape[1:]) != self.first_shape or len(first_images) != len(seeds):
                raise RelayError(f'first-stage images are {tuple(first_images.shape)}, expected {(len(seeds), *self.first_shape)} '
                                 f'({self.net_second.img_resolution} px / --up_scale_second={self.second_kwargs["up_scale"]})')
            images = first_images.to(self.device, torch.float64) / 127.5 - 1
            if second_noise == 'continue':
                sampling.skip_first_stage_draws(rnd, list(images.shape[1:]), self.first_kwargs['num_steps'], self.first_kwargs['sde_scale'], self.device)
        if trace is not None:
            trace['first'] = images
        if stages in ('second', 'both'):
            res = self.net_second.img_resolution
            images = F.interpolate(images, size=(res, res), mode='nearest')
            if trace is not None:
                trace['upsampled'] = images
            images = sampling.blur_sampler(self.net_second, images, labels, randn_like=rnd.randn_like, trace=trace, **self.second_kwargs)
        return images

    def __call__(self, seeds, class_idx=None, first_images=None, stages=None, second_noise='continue', batch_size=64):
        """uint8 (N, C, H, W) images for `seeds`, post-processed as the preset says: the pixels
        generate.py writes. Runs batches of at most batch_size."""
        seeds = check_seeds(seeds)
        out = []
        for start in range(0, len(seeds), batch_size):
            part = None if first_images is None else first_images[start:start + batch_size]
            images = self.sample(seeds[start:start + batch_size], class_idx, part, stages, second_noise)
            out.append(apply_postprocess(to_uint8(images).cpu(), self.postprocess))
        return torch.cat(out) if out else torch.zeros([0], dtype=torch.uint8)

    @staticmethod
    def to_pil(images):
        """uint8 (N, C, H, W) -> list of PIL images."""
        return [uint8_to_pil(img) for img in images]

#----------------------------------------------------------------------------
