"""Relay Diffusion sampling: a first-stage EDM model at low resolution, its output upsampled
(nearest) and relayed to a second-stage blurring-diffusion model at high resolution.

With the same weights, seeds and options the images equal the reference implementation's
(THUDM/RelayDiffusion generate.py, generate_imagenet.py, generate_celebahq.py). The samplers live
in `training/sampling.py`, the in-memory relay (`RelayPipeline`) and the presets in
`training/pipeline.py`; this script adds the command line, the seed loop over processes and PNG
input/output. `generate_imagenet.py` and `generate_celebahq.py` are the same command with the
paper's settings as defaults (see `training.pipeline.PRESETS`).

Differences from the reference, all deliberate:
- `--sampler_stages=second` works (the reference crashes): by default the per-seed generators are
  advanced past the first stage's draws, so the relay uses the noise a `both` run would use.
- any resolution: first resolution x up_scale must equal the second network's (the reference
  hard-codes 256 px); any number of processes, CPU or CUDA, no process group needed.
- the relay settings recorded by training (--up-scale, --blur-sigma-max, --block-scale,
  --prob-length) are the defaults of the matching *_second options; a contradicting option warns.
- resumable (seeds whose PNG exists are skipped), atomic PNG writes, progress bar, optional grid.
"""

import math
import os

import click
import numpy as np
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training import data_files, fast_mode, pipeline
from training.pipeline import POSTPROCESS, PRESETS, RelayError, RelayPipeline

# More seeds than this in one run is almost surely a typo (e.g. 0-99999999999).
MAX_SEEDS = 10_000_000

# Each seed's generator is seeded with seed % 2**32 (as in the reference): a larger seed would
# silently repeat the image of a smaller one, so it is refused.
MAX_SEED = pipeline.MAX_SEED

#----------------------------------------------------------------------------
# PNG input/output.

def image_path(outdir, seed, subdirs=True):
    return os.path.join(outdir, f'{seed - seed % 1000:06d}', f'{seed:06d}.png') if subdirs else os.path.join(outdir, f'{seed:06d}.png')


def save_png(img, path):
    with dnnlib.util.atomic_write(path, 'wb') as f:
        img.save(f, format='PNG')


def save_image(image_np, path, postprocess='none'):
    """(H, W, C) uint8 numpy -> PNG, with the reference's post-processing."""
    save_png(pipeline.postprocess_pil(pipeline.uint8_to_pil(image_np.transpose(2, 0, 1)), postprocess), path)


def load_image(path):
    """Image file -> (C, H, W) uint8 numpy, through the project's one image reader (16-bit
    greyscale keeps its top 8 bits, palettes become RGB). DatasetError names the file."""
    with open(path, 'rb') as f:
        arr = data_files.read_image(f, path)
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
# Steps of generate_images.

def _fail(msg):
    raise click.ClickException(msg)


def parse_seeds(text, limit=MAX_SEEDS):
    """'1,2,5-10' -> [1, 2, 5, ..., 10], counted before the list is built (at most `limit`)."""
    try:
        return dnnlib.util.parse_int_list(text, limit=limit, max_value=MAX_SEED, what='seeds')
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def check_request(outdir, seeds, stages, network_first, network_second, indir, max_batch_size, preset, sampler_kwargs):
    """Checks that need no network (numbers, paths); returns the seeds without repeats."""
    try:
        pipeline.resolve_options(preset, sampler_kwargs)
    except RelayError as e:
        _fail(str(e))
    if stages not in ('first', 'second', 'both'):
        _fail(f'--sampler_stages must be first, second or both, not "{stages}"')
    if stages in ('first', 'both') and network_first is None:
        _fail(f'--sampler_stages={stages} needs --network_first')
    if stages in ('second', 'both') and network_second is None:
        _fail(f'--sampler_stages={stages} needs --network_second')
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        _fail(f'--batch={max_batch_size} must be a whole number >= 1')
    if stages == 'second' and indir is None:
        _fail('--sampler_stages=second needs --indir, the folder of first-stage images')
    if stages == 'second' and not os.path.isdir(indir):
        _fail(f'--indir "{indir}" is not a folder')
    if stages == 'second' and os.path.abspath(indir) == os.path.abspath(outdir):
        _fail('--outdir must differ from --indir (the relay would replace the first-stage images)')
    if hasattr(seeds, '__len__') and len(seeds) > MAX_SEEDS:
        _fail(f'--seeds lists {len(seeds):,} seeds, more than {MAX_SEEDS:,}; split the run into smaller ranges')
    try:
        seeds = list(dict.fromkeys(pipeline.check_seeds(seeds))) # drop repeats, keep order
    except (RelayError, TypeError, ValueError) as e:
        _fail(f'--seeds: {e}')
    if not seeds:
        _fail('--seeds is empty')
    check_outdir(outdir)
    return seeds


def check_outdir(outdir):
    """--outdir must be a folder we can write into (or creatable), before any work."""
    if not str(outdir).strip():
        _fail('--outdir is empty; name the folder for the images')
    problem = dnnlib.util.folder_write_problem(outdir)
    if problem:
        _fail(f'--outdir "{outdir}": {problem}; choose another folder')


def load_pipeline(network_first, network_second, stages, preset, postprocess, device, sampler_kwargs, fast=None):
    """The RelayPipeline; rank 0 loads first (it may download into the cache), the others
    follow, and a failure is reported by every rank after the barrier."""
    pipe, error = None, None
    if dist.get_rank() != 0:
        dist.barrier()
    try:
        for name, net in (('first', network_first), ('second', network_second)):
            if stages in (name, 'both') and isinstance(net, (str, os.PathLike)):
                dist.print0(f'Loading {name} stage network from "{net}"...')
        pipe = RelayPipeline(network_first if stages in ('first', 'both') else None,
                             network_second if stages in ('second', 'both') else None,
                             preset=preset, device=device, postprocess=postprocess, warn=False, fast=fast, **sampler_kwargs)
    except RelayError as e:
        error = click.ClickException(str(e))
    if dist.get_rank() == 0:
        dist.barrier()
    if error is not None:
        raise error
    for note in pipe.warnings:
        if dist.get_rank() == 0:
            click.echo(f'Warning: {note}', err=True)
    return pipe


def check_indir(indir, todo, pipe):
    """Every first-stage image of `todo` is in --indir, readable and of the size the relay
    needs, before starting."""
    missing = [s for s in todo if find_input_image(indir, s) is None]
    if missing:
        _fail(f'{len(missing)} of {len(todo)} first-stage images are missing in --indir "{indir}", '
              f'e.g. {image_path(indir, missing[0])}')
    in_shape = None
    for s in todo:
        path = find_input_image(indir, s)
        try:
            with open(path, 'rb') as f:
                width, height, channels = data_files.read_header(f, path)
        except (OSError, data_files.DatasetError) as e:
            _fail(f'--indir file {path} is not a readable image ({getattr(e, "reason", e)}); replace or remove it')
        shape = (channels, height, width)
        if in_shape is None:
            in_shape = shape
        if shape != in_shape or shape[1] != shape[2]:
            _fail(f'--indir image {path} is {shape[2]}x{shape[1]} with {shape[0]} channels, '
                  f'expected square {in_shape[2]}x{in_shape[1]} with {in_shape[0]} like the first one')
    need = pipe.first_shape
    if todo and in_shape != need:
        k = pipe.second_kwargs['up_scale']
        _fail(f'--indir images are {in_shape[1]}x{in_shape[2]} with {in_shape[0]} channels, but the second '
              f'stage needs {need[1]}x{need[2]} with {need[0]} channels ({pipe.net_second.img_resolution} px / --up_scale_second={k})')


def read_indir_batch(indir, seeds):
    try:
        return np.stack([load_image(find_input_image(indir, s)) for s in seeds])
    except (OSError, ValueError) as e:
        _fail(f'--indir: cannot read the first-stage images of seeds {seeds[0]}..{seeds[-1]} ({e}); replace or remove it')


def run_batches(pipe, todo, outdir, subdirs, class_idx, stages, indir, second_noise, max_batch_size, verbose):
    """Sample this rank's share of `todo` and write the PNGs; returns the seeds written."""
    rank, world = dist.get_rank(), dist.get_world_size()
    all_batches = pipeline.plan_batches(todo, max_batch_size, world)
    generated = []
    bar = tqdm.tqdm(total=len(todo), unit='img', disable=(rank != 0 or not verbose), dynamic_ncols=True)
    for i, batch_seeds in enumerate(all_batches[rank::world]):
        global_count = sum(len(b) for b in all_batches[i * world:(i + 1) * world])
        if batch_seeds:
            first_images = read_indir_batch(indir, batch_seeds) if stages == 'second' else None
            try:
                images = pipe(batch_seeds, class_idx, first_images=first_images, stages=stages,
                              second_noise=second_noise, batch_size=len(batch_seeds))
            except RelayError as e:
                _fail(str(e))
            for seed, image in zip(batch_seeds, images):
                save_png(pipeline.uint8_to_pil(image), image_path(outdir, seed, subdirs))
                generated.append(seed)
        bar.update(global_count)
    bar.close()
    return generated


def write_sample_grid(outdir, seeds, subdirs, grid):
    # Beside the sample folder, not in it: the folder stays a clean input for evaluate.py. Read
    # back from disk, so that it also covers resumed runs.
    dest = grid_path(outdir)
    paths = [image_path(outdir, s, subdirs) for s in seeds[:grid]]
    if os.path.exists(dest):
        dist.print0(f'Not writing the grid: "{dest}" already exists')
        return
    try:
        write_grid([p for p in paths if os.path.isfile(p)], dest)
    except (OSError, ValueError, data_files.DatasetError) as e:
        _fail(f'the images are written, but not the grid {dest}: {getattr(e, "message", e)}')

#----------------------------------------------------------------------------
# The generation loop.

@torch.no_grad()
def generate_images(
    outdir, seeds=range(64), subdirs=True, class_idx=None, max_batch_size=64, sampler_stages='both',
    network_first=None, network_second=None, indir=None, postprocess=None, grid=0,
    second_noise='continue', device=None, verbose=True, preset='generate', fast=None, **sampler_kwargs,
):
    """Generate `seeds` into `outdir`/SSS000/SSSSSS.png; returns the seeds generated by this rank.

    network_first / network_second: path or URL (loaded with torch_utils.checkpoint's safe
    loader) or an nn.Module. sampler_kwargs: the CLI's *_first / *_second options; those not
    given (or None) come from PRESETS[preset], the second-stage checkpoint's relay settings and
    the samplers' defaults, in this order. postprocess: None = the preset's. fast: a
    training.fast_mode.FastSettings (None = exact mode: the reference's images bit for bit).
    Raises click.ClickException with one line for bad input, before anything is written.
    """
    stages = sampler_stages
    seeds = check_request(outdir, seeds, stages, network_first, network_second, indir, max_batch_size, preset, sampler_kwargs)
    dist.init()
    device = torch.device(device) if device is not None else dist.get_device()

    # Resume: seeds whose image exists are done. Every rank scans before anyone writes.
    todo = [s for s in seeds if not os.path.isfile(image_path(outdir, s, subdirs))]
    dist.barrier()

    pipe = load_pipeline(network_first, network_second, stages, preset, postprocess, device, sampler_kwargs, fast)
    try:
        pipe.check_class(class_idx)
    except RelayError as e:
        _fail(str(e))
    if stages == 'second':
        check_indir(indir, todo, pipe)
    if verbose:
        dist.print0(f'Generating {len(todo)} images to "{outdir}" ({len(seeds) - len(todo)} of {len(seeds)} already there)...')
        dist.print0('first stage config:', pipe.first_kwargs if stages != 'second' else None)
        dist.print0('second stage config:', pipe.second_kwargs if stages != 'first' else None)
        dist.print0('sampling mode:', pipe.fast.describe())

    generated = run_batches(pipe, todo, outdir, subdirs, class_idx, stages, indir, second_noise, max_batch_size, verbose)
    dist.barrier()
    if grid and dist.get_rank() == 0:
        write_sample_grid(outdir, seeds, subdirs, grid)
    if verbose:
        dist.print0('Done.')
    return generated

#----------------------------------------------------------------------------
# Command line: one option table; defaults come from the preset over the samplers' defaults.

_pos = click.FloatRange(min=0, min_open=True)
_nonneg = click.FloatRange(min=0)

# (flags, parameter name, help, metavar, type).
OPTIONS = [
    (['--outdir'],          'outdir',           'Where to save the output images', 'DIR', str),
    (['--seeds'],           'seeds',            f'Random seeds (e.g. 1,2,5-10; at most {MAX_SEEDS:,})', 'LIST', str),
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
    (['--sigma_min_first'], 'sigma_min_first',  'Lowest noise level', 'FLOAT', _pos),
    (['--sigma_max_first'], 'sigma_max_first',  'Highest noise level', 'FLOAT', _pos),
    (['--rho_first'],       'rho_first',        'Time step exponent', 'FLOAT', _pos),
    (['--cfg_scale_first'], 'cfg_scale_first',  'Scale of classifier-free guidance (> 1 enables it)', 'FLOAT', _nonneg),
    (['--S_churn'],         'S_churn_first',    'Stochasticity strength', 'FLOAT', _nonneg),
    (['--S_min'],           'S_min_first',      'Stoch. min noise level', 'FLOAT', _nonneg),
    (['--S_max'],           'S_max_first',      'Stoch. max noise level', 'FLOAT', _nonneg),
    (['--S_noise'],         'S_noise_first',    'Stoch. noise inflation', 'FLOAT', _nonneg),
    (['--sde_scale_first'], 'sde_scale_first',  'Stochastic Heun variant of the CelebA-HQ script: fresh noise of std sde_scale*t per step  [default: off]', 'FLOAT', click.FloatRange(min=0, max=1)),
    # Second stage.
    (['--network_second'],  'network_second',   'Second stage network (.pkl, .pt, .safetensors)', 'PATH|URL', str),
    (['--num_steps_second'], 'num_steps_second', 'Number of sampling steps for second stage (before truncation)', 'INT', click.IntRange(min=2)),
    (['--sigma_min_second'], 'sigma_min_second', 'Lowest noise level', 'FLOAT', _pos),
    (['--sigma_max_second'], 'sigma_max_second', 'Highest noise level', 'FLOAT', _pos),
    (['--blur_sigma_max_second'], 'blur_sigma_max_second', 'Maximum sigma of blurring schedule  [checkpoint: --blur-sigma-max]', 'FLOAT', _nonneg),
    (['--rho_second'],      'rho_second',       'Time step exponent', 'FLOAT', _pos),
    (['--cfg_scale_second'], 'cfg_scale_second', 'Scale of classifier-free guidance (> 1 enables it)', 'FLOAT', _nonneg),
    (['--up_scale_second'], 'up_scale_second',  'Scale of upsampling = DCT block size (second res / first res)  [checkpoint: --up-scale]', 'INT', click.IntRange(min=2)),
    (['--truncation_sigma_second'], 'truncation_sigma_second', 'Truncation point of noise schedule', 'FLOAT', _pos),
    (['--truncation_t_second'], 'truncation_t_second', 'Truncation point of time schedule (prob_length)  [checkpoint: --prob-length]', 'FLOAT', _pos),
    (['--s_block_second'],  's_block_second',   'Strength of block noise addition  [checkpoint: --block-scale]', 'FLOAT', _nonneg),
    (['--s_noise_second'],  's_noise_second',   'Strength of stochasticity', 'FLOAT', click.FloatRange(min=0, max=1)),
    (['--S_churn_second'],  'S_churn_second',   'Churn step of the CelebA-HQ script\'s blur sampler (a number enables it)  [default: off]', 'FLOAT', _nonneg),
    (['--S_min_second'],    'S_min_second',     'Churn min noise level (with --S_churn_second)', 'FLOAT', _nonneg),
    (['--S_max_second'],    'S_max_second',     'Churn max noise level (with --S_churn_second)', 'FLOAT', _nonneg),
    (['--S_noise_second'],  'S_noise_second',   'Churn noise inflation (with --S_churn_second)', 'FLOAT', _nonneg),
    # Speed. Exact mode (default) gives the reference's images bit for bit; --fast does not.
    (['--fast/--exact'],    'fast',             'Fast mode for GPUs: both guidance passes in one batch, the networks under --precision autocast, TF32 on; images differ slightly from exact mode (see README)', None, None),
    (['--precision'],       'precision',        'Network autocast precision with --fast  [default: fp16]', 'fp16|bf16|fp32', click.Choice(list(fast_mode.PRECISIONS))),
    (['--tf32/--no-tf32'],  'tf32',             'TF32 matmuls and convolutions with --fast  [default: on]', None, None),
    (['--channels-last/--no-channels-last'], 'channels_last', 'Channels-last memory layout for the networks (with --fast)', None, None),
    (['--compile/--no-compile'], 'compile',     'torch.compile the networks (with --fast; runs uncompiled, with a warning, where compilation fails)', None, None),
]

FAST_OPTIONS = ('fast', 'precision', 'tf32', 'channels_last', 'compile')

CLI_DEFAULTS = dict(subdirs=True, class_idx=None, max_batch_size=64, sampler_stages='both', grid=0, second_noise='continue',
                    fast=False, precision=None, tf32=None, channels_last=False, compile=False)


def make_command(preset='generate', help=None):
    """Build the click command with the defaults of PRESETS[preset] over the samplers' defaults."""
    sampler_defaults, _ = pipeline.resolve_options(preset)
    defaults = {**CLI_DEFAULTS, **sampler_defaults, 'seeds': PRESETS[preset]['seeds'], 'postprocess': PRESETS[preset]['postprocess']}

    def main(**kwargs):
        try:
            kwargs['seeds'] = parse_seeds(kwargs['seeds'])
        except click.BadParameter as e:
            raise click.BadParameter(e.message, param_hint="'--seeds'") from None
        # Sampler options left at their defaults are not passed: the checkpoint's relay
        # settings may replace them, and an explicit option that contradicts those warns.
        ctx = click.get_current_context()
        for name in pipeline.SAMPLER_OPTIONS:
            if ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT:
                kwargs.pop(name)
        try:
            fast = fast_mode.settings_from_options(**{name: kwargs.pop(name) for name in FAST_OPTIONS})
        except ValueError as e:
            _fail(str(e))
        generate_images(preset=preset, fast=fast, **kwargs)

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
