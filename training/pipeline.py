"""Python API of the relay: load both stages, get images in memory.

    from training.pipeline import RelayPipeline
    pipe = RelayPipeline('first.pkl', 'second.pt', preset='imagenet')
    images = pipe([0, 1, 2, 3])        # uint8 (N, C, H, W), the pixels generate_imagenet.py writes
    pils = pipe.to_pil(images)         # PIL images

The images equal generate.py's PNGs for the same networks, seeds, class and options (every image
depends on its seed only, so any batching gives the same pixels). generate.py, evaluate.py gen,
the quickstart and its relay figure all sample through this class, and `batches` is the one loop
over seeds that the scripts share.

Options use the generate scripts' parameter names (`num_steps_first`, `S_churn_first` for
`--S_churn`, `cfg_scale_second`, ...): every option that edm_sampler and blur_sampler declare
(training.sampling), with `_first` or `_second` appended. Their values come from, in this order:
what the caller gives, the preset (`PRESETS`), the relay settings recorded in the second-stage
checkpoint (`training.loss.training_record`), and the samplers' defaults. Bad input raises
dnnlib.UserError with one line.
"""

import collections
import inspect
import os
import warnings

import click
import numpy as np
import PIL.Image
import PIL.ImageEnhance
import torch

import dnnlib
from torch_utils import distributed as dist
from training import fast_mode, load_checkpoint, loss, sampling

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

# Relay settings recorded by the training (training.loss.RELAY_SETTINGS = train.py's --up-scale,
# --blur-sigma-max, --block-scale, --prob-length) and the blur sampler option of the same meaning.
RELAY_SETTINGS = {
    'up_scale':       'up_scale_second',       # DCT block size = upsampling factor
    'blur_sigma_max': 'blur_sigma_max_second', # maximum blur of the schedule
    'block_scale':    's_block_second',        # strength of block noise
    'prob_length':    'truncation_t_second',   # the blur schedule's time scaling (get_alpha_t's prob_length)
}

STAGES = ('first', 'second', 'both')
MAX_SEEDS = 10_000_000  # More seeds in one run is almost surely a typo (e.g. 0-99999999999).

#----------------------------------------------------------------------------
# Sampler options, made from the samplers' declarations.

Option = collections.namedtuple('Option', 'stage key flag type help default')

# The reference's flags for the first stage's churn; every other option is --<key>_<stage>.
_REFERENCE_FLAGS = {'S_churn_first': '--S_churn', 'S_min_first': '--S_min', 'S_max_first': '--S_max', 'S_noise_first': '--S_noise'}


def _declared(stage, sampler):
    for key, param in inspect.signature(sampler).parameters.items():
        if param.annotation is not param.empty:
            name = f'{key}_{stage}'
            yield name, Option(stage, key, _REFERENCE_FLAGS.get(name, f'--{name}'), *param.annotation, param.default)


SAMPLER_OPTIONS = dict([*_declared('first', sampling.edm_sampler), *_declared('second', sampling.blur_sampler)])


def sampler_click_options(show_default=True):
    """Decorator adding every sampler option to a click command. show_default=True: the samplers'
    defaults (generate.py; the preset scripts replace them through click's default_map); a text:
    no defaults (None values, resolved later), the text shown in --help instead (evaluate.py gen)."""
    def decorate(fn):
        for name, o in reversed(SAMPLER_OPTIONS.items()):
            setting = [key for key, option in RELAY_SETTINGS.items() if option == name]
            text = o.help + (f'  [{o.type.bounds}]' if hasattr(o.type, 'bounds') else '') \
                + (f'  [checkpoint: --{setting[0].replace("_", "-")}]' if setting else '')  # click shows a Number's range.
            fn = click.option(o.flag, name, type=o.type, metavar=o.type.name, help=text,
                              default=o.default if show_default is True else None, show_default=show_default)(fn)
        return fn
    return decorate


def convert(type_, value, what):
    """`value` through a click type (command-line text or a Python value); UserError naming `what`."""
    try:
        return type_.convert(value, None, None)
    except click.BadParameter as err:
        raise dnnlib.UserError(f'{what}: {err.message}') from None


def _check_schedule(o, stage):
    # Rules between the fields of one stage; the rho-spaced schedule goes through sigma ** (1 / rho):
    # a tiny rho overflows it, a huge one rounds every level to 1. Its ends must come back.
    show = lambda key: f'{SAMPLER_OPTIONS[f"{key}_{stage}"].flag}={o[key]}'
    if o['sigma_min'] >= o['sigma_max']:
        raise dnnlib.UserError(f'{show("sigma_min")} must be below {show("sigma_max")}')
    if o['S_min'] > o['S_max']:
        raise dnnlib.UserError(f'{show("S_min")} must be at most {show("S_max")}')
    value = lambda key: torch.tensor(float(o[key]), dtype=torch.float64)  # As tensors an overflow is inf, not an exception.
    ends = sampling.time_steps(2, value('sigma_min'), value('sigma_max'), value('rho'))
    want = torch.stack([value('sigma_max'), value('sigma_min')])
    if not (torch.isfinite(ends).all() and torch.allclose(ends, want, rtol=1e-6, atol=0)):
        raise dnnlib.UserError(f'{show("rho")} with {show("sigma_min")} and {show("sigma_max")} gives a noise schedule '
                               f'that overflows or rounds away; use a rho around 7')


def resolve_options(preset='generate', options=None, relay_settings=None):
    """All sampler options (generate-script names -> values), checked, and notes about the checkpoint.

    options: the caller's options (None values count as not given); relay_settings: what
    `training.loss.training_record` found in the second-stage checkpoint. Returns (options, notes):
    notes name a given option that contradicts the checkpoint, with both values.
    """
    preset = convert(click.Choice(list(PRESETS)), preset, 'preset')
    given = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(given) - set(SAMPLER_OPTIONS))
    if unknown:
        raise dnnlib.UserError(f'unknown sampler option {unknown[0]}; the options are {", ".join(SAMPLER_OPTIONS)}')
    recorded = {RELAY_SETTINGS[key]: (key, value) for key, value in (relay_settings or {}).items()}
    resolved = {name: o.default for name, o in SAMPLER_OPTIONS.items()} | {name: value for name, (_key, value) in recorded.items()} \
        | {k: v for k, v in PRESETS[preset].items() if k in SAMPLER_OPTIONS} | given
    resolved = {name: value if value is None else convert(SAMPLER_OPTIONS[name].type, value, SAMPLER_OPTIONS[name].flag)
                for name, value in resolved.items()}
    for stage in ('first', 'second'):
        _check_schedule(stage_kwargs(resolved)[stage == 'second'], stage)

    independent = set(PRESETS[preset].get('independent_of_checkpoint', ())) - set(given)
    notes = [f'{SAMPLER_OPTIONS[name].flag}={resolved[name]} ({"given" if name in given else f"set by the {preset} preset"}) '
             f'differs from the second-stage checkpoint\'s training setting {key}={value} (train.py --{key.replace("_", "-")}); '
             f'using {resolved[name]}' for name, (key, value) in recorded.items() if resolved[name] != value and name not in independent]
    return resolved, notes


def stage_kwargs(options):
    """Resolved options -> (edm_sampler keywords, blur_sampler keywords)."""
    return tuple({o.key: options[name] for name, o in SAMPLER_OPTIONS.items() if o.stage == stage} for stage in ('first', 'second'))


def check_seeds(seeds, limit=MAX_SEEDS):
    """Seeds as a list of ints in 0..dnnlib.util.MAX_SEED (generators use seed % 2**32, so a larger
    or negative seed would silently give the image of another seed)."""
    return convert(dnnlib.util.seeds(limit), seeds, 'seeds')


def check_outdir(outdir):
    """--outdir is named, and a folder this process can write in (or create), before any work."""
    if not str(outdir).strip():
        raise dnnlib.UserError('--outdir is empty; name the folder for the images')
    problem = dnnlib.util.folder_write_problem(outdir)
    if problem:
        raise dnnlib.UserError(f'--outdir "{outdir}": {problem}; choose another folder')


def choose_stages(stages, has_first, has_second, has_images):
    """The stages to run: `stages` (None: what the networks and first-stage images allow),
    checked against them."""
    if stages is None:
        stages = 'second' if has_images else 'both' if has_first and has_second else 'first' if has_first else 'second'
    stages = convert(click.Choice(STAGES), stages, '--sampler_stages')
    for name, has in (('first', has_first), ('second', has_second)):
        if stages in (name, 'both') and not has:
            raise dnnlib.UserError(f'--sampler_stages={stages} needs --network_{name}')
    if stages == 'second' and not has_images:
        raise dnnlib.UserError('--sampler_stages=second needs --indir, the folder of first-stage images (first_images= in Python)')
    return stages

#----------------------------------------------------------------------------
# Images.

def to_uint8(images):
    """Sampler output (N, C, H, W) in [-1, 1] -> uint8 (N, C, H, W), rounded as the reference
    (x * 127.5 + 128, truncated). UserError for a non-finite sample."""
    bad = (~torch.isfinite(images)).flatten(1).any(dim=1)
    if bad.any():
        raise dnnlib.UserError(f'{int(bad.sum())} of {len(images)} samples hold non-finite values (NaN/inf); '
                               'no image written; check the sampler options and the networks')
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def uint8_to_pil(image):
    """(C, H, W) uint8 tensor or numpy -> PIL image (greyscale for one channel)."""
    arr = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image).transpose(1, 2, 0)
    return PIL.Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr))  # Mode L or RGB.


def apply_postprocess(images, postprocess):
    """The reference's PIL enhancement of uint8 (N, C, H, W) images, as uint8 (N, C, H, W)."""
    out = []
    for image in images if POSTPROCESS[postprocess] else ():
        pil = uint8_to_pil(image)
        for name, factor in POSTPROCESS[postprocess]:
            pil = getattr(PIL.ImageEnhance, name)(pil).enhance(factor)
        out.append(np.asarray(pil).reshape(pil.height, pil.width, -1))  # (H, W, C), also for greyscale.
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous() if out else images


def image_path(outdir, seed, subdirs=True):
    """Where generate.py keeps a seed's image: OUTDIR/SSS000/SSSSSS.png (a folder per 1000 seeds,
    as the reference), or OUTDIR/SSSSSS.png."""
    return os.path.join(outdir, *([f'{seed - seed % 1000:06d}'] if subdirs else []), f'{seed:06d}.png')


def save(path, write, mode='wb'):
    """write(f) into `path` atomically (folders made): a failure such as a full disk is one
    UserError naming the path, and leaves nothing behind."""
    try:
        with dnnlib.util.atomic_write(path, mode) as f:
            write(f)
    except OSError as err:
        raise dnnlib.UserError(f'cannot write {path} ({err.strerror or err}); nothing was written there') from None


def save_png(image, path):
    """uint8 (C, H, W) image -> PNG file, atomically."""
    save(path, lambda f: uint8_to_pil(image).save(f, format='PNG'))


def class_labels(label_dim, seeds, class_idx, device):
    """One-hot seed % label_dim (the reference's choice), or class_idx for every image; None
    for an unconditional network."""
    if not label_dim:
        return None
    index = torch.as_tensor(seeds if class_idx is None else [class_idx] * len(seeds), device=device)
    return torch.nn.functional.one_hot(index % label_dim, label_dim).to(torch.float32)  # Not eye(label_dim): N x label_dim only.

#----------------------------------------------------------------------------
# Loading.

def load_stage(network, stage, device, option='network', guided=None):
    """(network, its training record: training.loss.training_record) for a path, URL or
    nn.Module; UserError names the option (--network_STAGE or --gnet_STAGE) and the problem,
    including a checkpoint trained for the other stage. guided: the loaded network that this one
    guides (autoguidance), which it must serve: same resolution and channels, the same classes or none."""
    flag, data = f'--{option}_{stage}', {'ema': network}
    if not isinstance(network, torch.nn.Module):
        try:
            data = load_checkpoint(os.fspath(network) if isinstance(network, os.PathLike) else network)
        except (dnnlib.UserError, OSError) as err:
            raise dnnlib.UserError(f'Cannot load {flag} "{network}": {getattr(err, "message", err)}') from None
    net, record = data['ema'], loss.training_record(data)
    if not isinstance(net, torch.nn.Module):
        raise dnnlib.UserError(f'Cannot load {flag} "{network}": its "ema" entry is a {type(net).__name__}, not a network')
    if record.stage is not None and record.stage != stage:
        raise dnnlib.UserError(f'{flag} "{network}" is a {record.stage}-stage checkpoint (trained with '
                               f'{record.loss}); pass it as --{option}_{record.stage}')
    if guided is not None and ((net.img_resolution, net.img_channels) != (guided.img_resolution, guided.img_channels)
                               or net.label_dim not in (0, guided.label_dim)):
        raise dnnlib.UserError(f'{flag} is {net.img_resolution} px, {net.img_channels} channels, label_dim {net.label_dim}, '
                               f'but --network_{stage} is {guided.img_resolution} px, {guided.img_channels} channels, label_dim '
                               f'{guided.label_dim}; pass a guide of the same shape (unconditional or with the same classes)')
    return net.eval().requires_grad_(False).to(device), record

#----------------------------------------------------------------------------
# The pipeline.

class RelayPipeline:
    """Both relay stages, loaded once; call with seeds to get images.

    network_first / network_second: path or URL (loaded with torch_utils.checkpoint's safe
    loader) or an nn.Module; either may be None for a one-stage pipeline. preset: a key of
    PRESETS (its post-processing and sampler options). options: sampler options by the
    generate scripts' names; postprocess: override the preset's ('none' turns it off).
    warn: also issue the checkpoint notes (`self.warnings`) as Python warnings. Guide networks
    (gnet_first, gnet_second: path, URL or nn.Module) are loaded and checked like the stages.
    fast: a training.fast_mode.FastSettings (None = exact mode, the reference's images).
    """

    def __init__(self, network_first=None, network_second=None, preset='generate', device=None,
                 postprocess=None, warn=True, fast=None, **options):
        resolve_options(preset, options)  # The numbers, before any loading.
        postprocess = postprocess if postprocess is not None else PRESETS[preset]['postprocess']
        self.postprocess = convert(click.Choice(list(POSTPROCESS)), postprocess, '--postprocess')
        if network_first is None and network_second is None:
            raise dnnlib.UserError('give --network_first, --network_second or both')
        self.device = torch.device(device if device is not None else 'cuda' if torch.cuda.is_available() else 'cpu')
        self.net_first, _ = load_stage(network_first, 'first', self.device) if network_first is not None else (None, None)
        self.net_second, record = load_stage(network_second, 'second', self.device) if network_second is not None else (None, None)
        self.options, self.warnings = resolve_options(preset, options, record.relay if record else {})  # The checkpoint's relay settings.
        self.first_kwargs, self.second_kwargs = stage_kwargs(self.options)
        self._check_networks()
        # The classes, and (C, H, W) of the first stage's images (the second stage's input before upsampling).
        net = self.net_first if self.net_first is not None else self.net_second  # The stages agree on both.
        res = net.img_resolution if net is self.net_first else net.img_resolution // self.second_kwargs['up_scale']
        self.label_dim, self.first_shape = net.label_dim, (net.img_channels, res, res)
        self.fast = fast if fast is not None else fast_mode.EXACT
        for stage, net, kwargs in (('first', self.net_first, self.first_kwargs), ('second', self.net_second, self.second_kwargs)):
            if net is not None and kwargs['gnet'] is not None:  # A guide of a stage that is not run is not loaded.
                kwargs['gnet'] = fast_mode.prepare(load_stage(kwargs['gnet'], stage, self.device, 'gnet', net)[0], self.fast)
                if kwargs['cfg_scale'] <= 1:
                    self.warnings.append(f'--gnet_{stage} is not used with --cfg_scale_{stage}={kwargs["cfg_scale"]}; pass a weight > 1')
            if net is not None and not net.label_dim and kwargs['gnet'] is None and kwargs['cfg_scale'] > 1:
                self.warnings.append(f'--cfg_scale_{stage}={self.options[f"cfg_scale_{stage}"]} on an unconditional network: '
                                     f'guidance compares the network with itself, which doubles the cost and changes no '
                                     f'image; pass --cfg_scale_{stage}=1')
        for note in self.warnings if warn else ():
            warnings.warn(note, stacklevel=2)
        self.net_first, self.net_second = (fast_mode.prepare(n, self.fast) for n in (self.net_first, self.net_second))

    def _check_networks(self):
        first, second, k = self.net_first, self.net_second, self.second_kwargs['up_scale']
        if second is not None:
            if second.img_resolution % k != 0:
                raise dnnlib.UserError(f'The second stage resolution {second.img_resolution} is not divisible by --up_scale_second={k}')
            o = self.second_kwargs
            try:
                sampling.blur_time_steps(second, o['num_steps'], o['sigma_min'], o['sigma_max'], o['rho'], o['truncation_sigma'])
            except ValueError as err:
                raise dnnlib.UserError(f'--truncation_sigma_second: {err}') from None
        if first is not None and second is not None:
            if first.img_resolution * k != second.img_resolution:
                raise dnnlib.UserError(f'First stage resolution {first.img_resolution} x --up_scale_second={k} = '
                                       f'{first.img_resolution * k}, but the second stage network is {second.img_resolution} px')
            if (first.img_channels, first.label_dim) != (second.img_channels, second.label_dim):
                raise dnnlib.UserError(f'The stages differ in channels or classes (label_dim): first {first.img_channels} and '
                                       f'{first.label_dim}, second {second.img_channels} and {second.label_dim}')

    def check_class(self, class_idx):
        if class_idx is not None and not 0 <= class_idx < self.label_dim:
            has = f'has {self.label_dim} classes (0..{self.label_dim - 1})' if self.label_dim else 'is unconditional (no classes)'
            raise dnnlib.UserError(f'--class={class_idx} is out of range: the network {has}')

    @torch.no_grad()
    def sample(self, seeds, class_idx=None, first_images=None, stages=None, second_noise='continue', trace=None):
        """One batch: float64 (N, C, H, W) sampler output (about [-1, 1]) of the given stages.

        first_images: uint8 (N, C, h, w) first-stage images (as read from PNGs) for stages='second'.
        second_noise: 'continue' advances each seed's generator past the first stage's draws, so
        that the relay uses the noise of a run of both stages; 'fresh' starts it anew.
        trace: optional dict that receives 'first', 'upsampled', 'start' (for figures).
        """
        stages = choose_stages(stages, self.net_first is not None, self.net_second is not None, first_images is not None)
        self.check_class(class_idx)
        seeds = check_seeds(seeds)
        labels = class_labels(self.label_dim, seeds, class_idx, self.device)
        rnd = sampling.StackedRandomGenerator(self.device, seeds)
        trace = trace if trace is not None else {}
        if stages != 'second':
            latents = rnd.randn([len(seeds), *self.first_shape], device=self.device)
            images = sampling.edm_sampler(self.net_first, latents, labels, randn_like=rnd.randn_like, **self.first_kwargs)
        else:
            first_images = torch.as_tensor(first_images)
            if tuple(first_images.shape[1:]) != self.first_shape or len(first_images) != len(seeds):
                raise dnnlib.UserError(f'first-stage images are {tuple(first_images.shape)}, expected {(len(seeds), *self.first_shape)} '
                                       f'({self.net_second.img_resolution} px / --up_scale_second={self.second_kwargs["up_scale"]})')
            images = first_images.to(self.device, torch.float64) / 127.5 - 1
            if second_noise == 'continue':
                sampling.skip_first_stage_draws(rnd, list(images.shape[1:]), self.first_kwargs['num_steps'], self.first_kwargs['sde_scale'], self.device)
        trace['first'] = images
        if stages != 'first':
            res = self.net_second.img_resolution
            trace['upsampled'] = images = torch.nn.functional.interpolate(images, size=(res, res), mode='nearest')
            images = sampling.blur_sampler(self.net_second, images, labels, randn_like=rnd.randn_like, trace=trace, **self.second_kwargs)
        return images

    def batches(self, seeds, batch_size=64, class_idx=None, stages=None, read_first=None, second_noise='continue', distributed=False):
        """Sample `seeds` batch by batch; yields dnnlib.EasyDict(seeds, indices, images, done):
        a batch's seeds, their positions in `seeds`, their uint8 (N, C, H, W) images (the pixels
        generate.py writes, post-processing included) and how many images all processes have
        made once this step is over. distributed: only this process's share, split as the
        reference generate.py does (torch_utils.distributed.my_batches). read_first: for
        stages='second', a function from a batch's indices to their uint8 first-stage images."""
        seeds = check_seeds(seeds)
        for indices, done in dist.my_batches(len(seeds), batch_size, distributed):
            part = [seeds[i] for i in indices]
            first = read_first(indices) if read_first is not None else None
            images = self.sample(part, class_idx, first, stages, second_noise)
            images = apply_postprocess(to_uint8(images).cpu(), self.postprocess)
            yield dnnlib.EasyDict(seeds=part, indices=indices, images=images, done=done)

    def __call__(self, seeds, class_idx=None, first_images=None, stages=None, second_noise='continue', batch_size=64):
        """uint8 (N, C, H, W) images for `seeds` (the pixels generate.py writes), in batches of
        at most batch_size. first_images: for stages='second', uint8 (N, C, h, w)."""
        read = None if first_images is None else lambda indices: torch.as_tensor(first_images)[indices]
        out = [b.images for b in self.batches(seeds, batch_size, class_idx, stages, read, second_noise)]
        return torch.cat(out) if out else torch.zeros([0], dtype=torch.uint8)

    @staticmethod
    def to_pil(images):
        """uint8 (N, C, H, W) -> list of PIL images."""
        return [uint8_to_pil(img) for img in images]

#----------------------------------------------------------------------------
