"""Relay Diffusion sampling: a first-stage EDM model at low resolution, its output upsampled
(nearest) and relayed to a second-stage blurring-diffusion model at high resolution.

With the same weights, seeds and options the images equal the reference implementation's
(THUDM/RelayDiffusion generate.py, generate_imagenet.py, generate_celebahq.py). The samplers live
in `training/sampling.py`, the in-memory relay (`RelayPipeline`), its loop over seeds and the
presets in `training/pipeline.py`; this script adds the command line and PNG input/output.
`generate_imagenet.py` and `generate_celebahq.py` are the same command with the paper's settings
as defaults (see `training.pipeline.PRESETS`).

Differences from the reference, all deliberate:
- `--sampler_stages=second` works (the reference crashes): by default the per-seed generators are
  advanced past the first stage's draws, so the relay uses the noise a `both` run would use.
- any resolution: first resolution x up_scale must equal the second network's (the reference
  hard-codes 256 px); any number of processes, CPU or CUDA, no process group needed.
- the relay settings recorded by training (--up-scale, --blur-sigma-max, --block-scale,
  --prob-length) are the defaults of the matching *_second options; a contradicting option warns.
- resumable (seeds whose PNG exists are skipped), atomic PNG writes, progress bar, optional grid.
"""

import functools
import os

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training import data_files, fast_mode, pipeline, sample_grid
from training.pipeline import POSTPROCESS, PRESETS, RelayPipeline, image_path

#----------------------------------------------------------------------------
# PNG input.

def load_image(path):
    """Image file -> (C, H, W) uint8 numpy, through the project's one image reader (16-bit
    greyscale keeps its top 8 bits, palettes become RGB). UserError (a DatasetError) names the file."""
    try:
        with open(path, 'rb') as f:
            arr = data_files.read_image(f, path)
    except OSError as err:
        raise data_files.DatasetError(f'{path}: cannot read it ({err.strerror or err})') from None
    return arr[np.newaxis] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def indir_reader(indir, todo, pipe):
    """The reader of first-stage images for the pipeline (positions in `todo` -> uint8 N, C, h, w)
    from --indir, where every seed's image is found and checked to be readable and of the size the
    relay needs before starting."""
    need, paths = pipe.first_shape, {}
    for seed in todo:
        paths[seed] = next((p for p in (image_path(indir, seed), image_path(indir, seed, False)) if os.path.isfile(p)), None)
        if paths[seed] is None:
            raise dnnlib.UserError(f'--indir "{indir}" lacks the first-stage image of seed {seed} ({image_path(indir, seed)}); '
                                   f'run the first stage for every seed, or leave that seed out')
        try:
            with open(paths[seed], 'rb') as f:
                width, height, channels = data_files.read_header(f, paths[seed])
        except (OSError, data_files.DatasetError) as e:
            raise dnnlib.UserError(f'--indir file {paths[seed]} is not a readable image ({getattr(e, "reason", e)}); '
                                   f'replace or remove it') from None
        if (channels, height, width) != need:
            raise dnnlib.UserError(f'--indir image {paths[seed]} is {width}x{height} with {channels} channels, but the second '
                                   f'stage needs {need[2]}x{need[1]} with {need[0]} ({pipe.net_second.img_resolution} px / '
                                   f'--up_scale_second={pipe.second_kwargs["up_scale"]})')
    return lambda indices: np.stack([load_image(paths[todo[i]]) for i in indices])


def is_done(path, shape):
    """Whether `path` holds a finished output: a complete PNG of `shape` (C, H, W). Anything else
    there is refused rather than replaced: it is not known to be ours."""
    if not os.path.lexists(path):
        return False
    try:
        with PIL.Image.open(path) as img:
            found = f'{img.format} {img.size[0]}x{img.size[1]} {img.mode}'
            img.verify()  # Every chunk to the end, with its checksum: a cut file fails.
    except (OSError, SyntaxError, ValueError) as err:
        found = f'not a complete image ({err})'
    if found == f'PNG {shape[2]}x{shape[1]} {"L" if shape[0] == 1 else "RGB"}':
        return True
    raise dnnlib.UserError(f'--outdir holds {path}, which is {found}, not a {shape[2]}x{shape[1]} output of this run; '
                           f'remove it, or choose another --outdir')


def write_grid(outdir, seeds, subdirs):
    """OUTDIR-grid.png beside the sample folder (which stays a clean input for evaluate.py), read
    back from disk so that it covers resumed runs too."""
    dest = os.path.normpath(outdir) + '-grid.png'
    if os.path.exists(dest):
        dist.print0(f'Not writing the grid: "{dest}" already exists')
        return
    try:
        images = [load_image(image_path(outdir, s, subdirs)) for s in seeds if os.path.isfile(image_path(outdir, s, subdirs))]
    except data_files.DatasetError as e:
        raise dnnlib.UserError(f'the images are written, but not the grid {dest}: {e.message}') from None
    pipeline.save_png(sample_grid.tile(np.stack(images).transpose(0, 2, 3, 1)).transpose(2, 0, 1), dest)

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
    Raises dnnlib.UserError with one line for bad input, before anything is written.
    """
    stages = pipeline.choose_stages(sampler_stages, network_first is not None, network_second is not None, indir is not None)
    seeds = list(dict.fromkeys(pipeline.check_seeds(seeds)))  # Repeats dropped, order kept.
    if not seeds:
        raise dnnlib.UserError('--seeds is empty')
    max_batch_size = pipeline.convert(dnnlib.util.Number(1, integer=True), max_batch_size, '--batch')
    pipeline.check_outdir(outdir)
    if stages == 'second' and not os.path.isdir(indir):
        raise dnnlib.UserError(f'--indir "{indir}" is not a folder')
    if stages == 'second' and os.path.realpath(indir) == os.path.realpath(outdir):  # Symbolic links resolved.
        raise dnnlib.UserError('--outdir must differ from --indir (the relay would replace the first-stage images)')
    dist.init()
    device = torch.device(device) if device is not None else dist.get_device()

    # Rank 0 loads first (a download lands in the cache once); the others wait without a deadline.
    for name, net in (('first', network_first), ('second', network_second)):
        if stages in (name, 'both') and isinstance(net, (str, os.PathLike)):
            dist.print0(f'Loading {name} stage network from "{net}"...')
    pipe = dist.rank0_first(lambda: RelayPipeline(
        network_first if stages != 'second' else None, network_second if stages != 'first' else None,
        preset=preset, device=device, postprocess=postprocess, warn=False, fast=fast, **sampler_kwargs))
    for note in pipe.warnings if dist.get_rank() == 0 else ():
        click.echo(f'Warning: {note}', err=True)
    pipe.check_class(class_idx)

    # Resume: seeds whose image exists are done. Every rank scans before anyone writes.
    res = pipe.net_second.img_resolution if stages != 'first' else pipe.first_shape[1]
    todo = [s for s in seeds if not is_done(image_path(outdir, s, subdirs), (pipe.first_shape[0], res, res))]
    dist.barrier()
    read_first = indir_reader(indir, todo, pipe) if stages == 'second' else None
    if verbose:
        dist.print0(f'Generating {len(todo)} images to "{outdir}" ({len(seeds) - len(todo)} of {len(seeds)} already there)...')
        first, second = pipeline.stage_kwargs(pipe.options)  # Guides by their names, not as loaded networks.
        dist.print0('first stage config:', first if stages != 'second' else None)
        dist.print0('second stage config:', second if stages != 'first' else None)
        dist.print0('sampling mode:', pipe.fast.describe())

    generated = []
    with tqdm.tqdm(total=len(todo), unit='img', disable=(dist.get_rank() != 0 or not verbose), dynamic_ncols=True) as bar:
        for batch in pipe.batches(todo, max_batch_size, class_idx, stages, read_first, second_noise, distributed=True):
            for seed, image in zip(batch.seeds, batch.images):
                pipeline.save_png(image, image_path(outdir, seed, subdirs))
            generated += batch.seeds
            bar.update(batch.done - bar.n)
        bar.update(len(todo) - bar.n)
    dist.barrier()
    if grid and dist.get_rank() == 0:
        write_grid(outdir, seeds[:grid], subdirs)
    if verbose:
        dist.print0('Done.')
    return generated

#----------------------------------------------------------------------------
# Command line. The preset scripts make the same command with their preset's defaults (make_command).

@click.command()
@click.option('--outdir',           help='Where to save the output images', metavar='DIR', required=True)
@click.option('--seeds',            help=f'Random seeds (e.g. 1,2,5-10; at most {pipeline.MAX_SEEDS:,})', metavar='LIST', type=dnnlib.util.seeds(pipeline.MAX_SEEDS), default=PRESETS['generate']['seeds'], show_default=True)
@click.option('--subdirs/--no-subdirs', help='Put images in a subfolder per 1000 seeds (always on in the reference)', default=True, show_default=True)
@click.option('--class', 'class_idx', help='Class label  [default: seed % classes]', metavar='INT', type=click.IntRange(min=0))
@click.option('--batch', 'max_batch_size', help='Maximum batch size per process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--sampler_stages',   help='Which stages to run', metavar='first|second|both', type=click.Choice(pipeline.STAGES), default='both', show_default=True)
@click.option('--indir',            help='First-stage images for --sampler_stages=second (SSS000/SSSSSS.png or SSSSSS.png; write them with --postprocess=none)', metavar='DIR')
@click.option('--postprocess',      help='Enhancement of saved images as in the reference scripts; none turns it off', metavar='none|imagenet|celebahq', type=click.Choice(list(POSTPROCESS)), default=PRESETS['generate']['postprocess'], show_default=True)
@click.option('--grid',             help='Also write OUTDIR-grid.png (beside OUTDIR) of the first N seeds (0 = none)', metavar='N', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--second_noise',     help='For --sampler_stages=second: continue each seed\'s generator after the first stage\'s draws (the noise of a "both" run, given the same *_first options) or start it fresh', metavar='continue|fresh', type=click.Choice(['continue', 'fresh']), default='continue', show_default=True)
@click.option('--network_first',    help='First stage network (.pkl, .pt, .safetensors)', metavar='PATH|URL')
@click.option('--network_second',   help='Second stage network (.pkl, .pt, .safetensors)', metavar='PATH|URL')
@pipeline.sampler_click_options()
# Speed. Exact mode (default) gives the reference's images bit for bit; --fast does not.
@click.option('--fast/--exact',     help='Fast mode for GPUs: both guidance passes in one batch, the networks under --precision autocast, TF32 on; images differ slightly from exact mode (see README)', default=False, show_default=True)
@click.option('--precision',        help='Network autocast precision with --fast  [default: fp16]', metavar='fp16|bf16|fp32', type=click.Choice(list(fast_mode.PRECISIONS)))
@click.option('--tf32/--no-tf32',   help='TF32 matmuls and convolutions with --fast  [default: on]', default=None)
@click.option('--channels-last/--no-channels-last', help='Channels-last memory layout for the networks (with --fast)', default=False, show_default=True)
@click.option('--compile/--no-compile', help='torch.compile the networks (with --fast; runs uncompiled, with a warning, where compilation fails)', default=False, show_default=True)
def main(preset='generate', **kwargs):
    """Generate images with a Relay Diffusion model pair (defaults of the reference generate.py).

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
    """
    # Sampler options left at their defaults (the samplers' or the preset's) are not passed: the
    # checkpoint's relay settings may replace them, and a given option that contradicts those warns.
    source = click.get_current_context().get_parameter_source
    defaults = {name for name in pipeline.SAMPLER_OPTIONS if source(name).name in ('DEFAULT', 'DEFAULT_MAP')}
    kwargs = {k: v for k, v in kwargs.items() if k not in defaults}
    fast = fast_mode.settings_from_options(**{name: kwargs.pop(name) for name in ('fast', 'precision', 'tf32', 'channels_last', 'compile')})
    generate_images(preset=preset, fast=fast, **kwargs)


def make_command(preset, help):
    """generate.py's command with the defaults of PRESETS[preset] (through click's default_map)."""
    names = {param.name for param in main.params}
    return click.Command('main', params=main.params, callback=functools.partial(main.callback, preset=preset), help=help,
                         context_settings=dict(default_map={k: v for k, v in PRESETS[preset].items() if k in names}))

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
