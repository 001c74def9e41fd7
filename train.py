"""Train a diffusion model: the first (EDM) stage of Relay Diffusion, or the second (blurring
diffusion) stage with --precond=blur.

One process:     python train.py --outdir=runs --data=datasets/cifar10-32x32.zip --arch=ddpmpp
N processes:     torchrun --standalone --nproc_per_node=N train.py ...   (NCCL on GPUs, gloo on CPU)
The paper:       torchrun ... train.py --preset=imagenet64 --outdir=training-runs --data=datasets/imagenet-64x64.zip

Click checks every value against its option's type and range (a preset fills the defaults of the
options not given); resolve_options adds the rules between options, setup_training_config makes
the training loop's keyword arguments from the options and the dataset, launch_training the run.
"""

import contextlib
import json
import os
import re
import warnings
import zipfile

import click
import numpy as np
import psutil
import torch
from click.core import ParameterSource

import dnnlib
from dnnlib.util import Number
from metrics import compute, detector, refs, sweep
from torch_utils import distributed as dist
from torch_utils import misc
from training import loggers, phema, training_loop

warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides')  # Harmless DDP warning.

#----------------------------------------------------------------------------
# The paper's four training runs as data: option values (Python names) that stand for the
# README's commands. They become click's defaults, so options on the command line override them.

TRAIN_PRESETS = {
    # ImageNet 256, first stage: class-conditional EDM at 64x64.
    'imagenet64':  dict(cond=True, arch='adm', precond='edm', batch=4096, batch_gpu=32, lr=1e-4, ema=50, dropout=0.1,
                        fp16=True, ls=25, eff_attn=True),
    # ImageNet 256, second stage: blurring diffusion at 256x256.
    'imagenet256': dict(cond=True, arch='adm', precond='blur', batch=4096, batch_gpu=8, lr=1e-4, dropout=0.1,
                        fp16=True, ls=1, eff_attn=True, up_scale=4, block_scale=0.15, prob_length=0.93, blur_sigma_max=3.0),
    # CelebA-HQ 256, first stage: unconditional EDM at 64x64.
    'celebahq64':  dict(cond=False, arch='adm', precond='edm', batch=1024, batch_gpu=32, lr=1e-4, dropout=0.15, augment=0.2,
                        ls=1, eff_attn=True),
    # CelebA-HQ 256, second stage: blurring diffusion at 256x256.
    'celebahq256': dict(cond=False, arch='adm', precond='blur', batch=1024, batch_gpu=8, lr=1e-4, dropout=0.2, augment=0.2,
                        fp16=True, ls=1, eff_attn=True, up_scale=4, block_scale=0.15, prob_length=0.89, blur_sigma_max=2.0),
}

# Network per --arch; network and loss classes per --precond.
ARCH_PRESETS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'adm':    dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
    'adm256': dict(model_type='DhariwalUNet', model_channels=256, channel_mult=[1, 1, 2, 2, 4, 4], num_blocks=2),  # ADM's 256x256 setting.
}
PRECOND_PRESETS = {
    'vp':   ('training.networks.VPPrecond', 'training.loss.VPLoss'),
    've':   ('training.networks.VEPrecond', 'training.loss.VELoss'),
    'edm':  ('training.networks.EDMPrecond', 'training.loss.EDMLoss'),
    'blur': ('training.networks.EDMPrecond', 'training.loss.BlurLoss'),
}
MAX_LEVELS = 10         # --cres entries: a network halves the resolution at every level.
MAX_GRID_IMAGES = 256   # --grid: a preview, not an evaluation.
MAX_BATCH = (1 << 31) - 1


def network_kwargs_for(arch, resolution, precond='edm', cbase=None, cres=None, blocks=None, dropout=0.13, fp16=False,
                       eff_attn=False, augment=True, label_dropout=0):
    """Network constructor options for train.py's --arch/--precond/--cbase/--cres choices."""
    kwargs = dnnlib.EasyDict(ARCH_PRESETS['adm256' if arch == 'adm' and resolution == 256 else arch])
    kwargs.update(eff_attn=eff_attn, class_name=PRECOND_PRESETS[precond][0])
    given = dict(model_channels=cbase, channel_mult=cres, num_blocks=blocks)
    kwargs.update({name: value for name, value in given.items() if value is not None})  # Else the architecture's.
    if augment:
        kwargs.augment_dim = 9
    kwargs.update(dropout=dropout, label_dropout=label_dropout, use_fp16=fp16)
    return kwargs


def max_levels(resolution):
    """How many resolution levels a network can have: the image halves at every level below the
    first, so one more than the times 2 divides the resolution (its lowest set bit's position)."""
    return min((resolution & -resolution).bit_length(), MAX_LEVELS)

#----------------------------------------------------------------------------
# Options: the rules between them (click has checked each value).

def _use_preset(ctx, _param, name):
    if name is not None:
        ctx.default_map = dict(TRAIN_PRESETS[name], **(ctx.default_map or {}))
    return name


def _parse_cres(_ctx, _param, text):
    """--cres: 1 to MAX_LEVELS comma-separated channel multipliers (ranges are not multipliers)."""
    if text is None:
        return None
    parts = text.split(',')
    if not (1 <= len(parts) <= MAX_LEVELS and all(re.fullmatch(r'\s*\d{1,4}\s*', p) for p in parts) and min(map(int, parts)) >= 1):
        raise click.BadParameter(f'{text}: give 1 to {MAX_LEVELS} comma-separated channel multipliers, each at least 1, '
                                 f'such as 1,2,2,2')
    return [int(part) for part in parts]


def _parse_metrics(_ctx, _param, text):
    """--metrics: comma-separated <metric><count>, the count in images or thousands (10k), one count for all."""
    found = [re.fullmatch(rf'({"|".join(compute.METRICS)})_?(\d+k?)', part.strip()) for part in text.split(',')] if text else []
    if text and (not all(found) or len({m[2] for m in found}) != 1 or int(found[0][2].replace('k', '000')) < 2):
        raise click.BadParameter(f'{text}: give metrics of one sample count (at least 2), such as fid10k or fid10k,fd_dinov2_10k')
    return text and dnnlib.EasyDict(metrics=[m[1] for m in found], num=int(found[0][2].replace('k', '000')))


def resolve_options(ctx):
    """The option set of a parsed command line (click context), with --precision reconciled with
    the reference's --fp16 and the rules between options checked."""
    opts = dnnlib.EasyDict(ctx.params)
    # --fp16=1 is the reference's spelling of --precision=fp16. An explicit --precision wins over a
    # preset's fp16; the two given on the command line must agree.
    if opts.precision is None:
        opts.precision = 'fp16' if opts.fp16 else 'fp32'
    elif opts.fp16 and opts.precision != 'fp16' and ctx.get_parameter_source('fp16') != ParameterSource.DEFAULT_MAP:
        raise dnnlib.UserError(f'--fp16=1 and --precision={opts.precision} disagree; give only --precision={opts.precision}')
    opts.fp16 = opts.precision == 'fp16'
    if opts.label_dropout > 0 and not opts.cond:
        raise dnnlib.UserError(f'--label-dropout={opts.label_dropout:g} drops class labels: it needs --cond=1')
    if opts.transfer is not None and opts.resume is not None:
        raise dnnlib.UserError('--transfer and --resume cannot be specified at the same time')
    if opts.logger != 'wandb' and opts.wandb_project:
        raise dnnlib.UserError(f'--wandb-project is for --logger=wandb (got --logger={opts.logger})')
    if opts.desc is not None and not re.fullmatch(r'[\w.+=-]+', opts.desc):
        raise dnnlib.UserError(f'--desc={opts.desc!r}: use letters, digits and . _ + = - only (it becomes part of a folder name)')
    if os.path.isdir(opts.data) and os.path.commonpath([os.path.realpath(opts.outdir), os.path.realpath(opts.data)]) == os.path.realpath(opts.data):
        raise dnnlib.UserError(f'--outdir={opts.outdir} is --data or inside it: run folders and sample grids would become part '
                               f'of the dataset; choose an --outdir outside {opts.data}')
    if opts.metrics and opts.metrics_ref is None and opts.precond != 'blur' and set(opts.metrics.metrics) - {'is'}:
        raise dnnlib.UserError('--metrics needs --metrics-ref (a path, URL or name of `evaluate.py refs`); only is, or a --precond=blur run, needs none')
    if opts.metrics_ref is not None and not opts.metrics:
        raise dnnlib.UserError('--metrics-ref is the reference of --metrics; give --metrics too, such as --metrics=fid10k')
    if opts.metrics_ref is not None and not dnnlib.util.is_url(opts.metrics_ref) and opts.metrics_ref not in refs.REFERENCES:
        sweep.open_reference(opts.metrics_ref, opts.metrics.metrics, '--metrics-ref')  # A local file: read its keys now.
    loggers.check_installed(opts.logger)  # Now rather than after creating the run folder.
    if opts.precision == 'bf16' and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise dnnlib.UserError('--precision=bf16: this GPU has no bfloat16 support; use --precision=fp16 --ls=... or fp32')
    return opts


def inspect_dataset(opts):
    """Open the dataset once: its name, resolution and size, and whether it has labels."""
    from training.dataset import ImageFolderDataset  # Its DatasetError lines name the path and the problem.
    dataset = ImageFolderDataset(path=opts.data, use_labels=opts.cond, xflip=opts.xflip, cache=False)
    if opts.cond and not dataset.has_labels:
        raise dnnlib.UserError(f'--cond=True requires labels in dataset.json, and {opts.data} has none')
    return dnnlib.EasyDict(name=dataset.name, resolution=dataset.resolution, has_labels=dataset.has_labels,
                           max_size=len(dataset) // (2 if opts.xflip else 1), image_bytes=int(np.prod(dataset.image_shape)),
                           channels=dataset.num_channels, label_dim=dataset.label_dim)


def _parse_cache(_ctx, _param, text):
    """--cache: a boolean, or auto (None)."""
    return None if text is None or str(text).lower() == 'auto' else click.BOOL.convert(text, _param, _ctx)

#----------------------------------------------------------------------------
# The training loop's keyword arguments.

def _resolve_resume(path):
    """--resume: a training-state-*.pt file or a run folder (its latest state)."""
    state = training_loop.find_latest_training_state(path) if os.path.isdir(path) else path
    if state is None:
        raise dnnlib.UserError(f'--resume: no training-state-*.pt in folder {path}')
    if not os.path.isfile(state) or not zipfile.is_zipfile(state):  # torch.save writes a zip archive; anything else is not ours.
        raise dnnlib.UserError(f'--resume: {state} is not a training state written by train.py (training-state-*.pt)')
    return state, (training_loop.training_state_nimg(state) or 0) / 1000


def setup_training_config(opts, dataset, world=1):
    """training_loop keyword arguments for the resolved options and the dataset's facts."""
    res = dataset.resolution
    c = dnnlib.EasyDict()
    # Data-loader workers: spawned (safe with CUDA in the parent, fork is not), each a process
    # that imports torch and, with --cache, holds its own copy of the images; more than this
    # machine's cores per process only cost memory.
    processes_per_node = int(os.environ.get('LOCAL_WORLD_SIZE', world))
    workers = min(opts.workers, max((os.cpu_count() or 1) // processes_per_node, 1))
    if workers < opts.workers:
        dist.print0(f'Note: --workers={opts.workers} capped at {workers}, the CPU cores per process on this machine')
    # --cache=auto: cache only when every decoded copy of the dataset (one per worker, or the process
    # itself, of every process on this machine) fits in a quarter of its memory: ImageNet at 256 px
    # is ~250 GB per copy, never cached by default.
    copies = max(workers, 1) * processes_per_node
    cache = opts.cache if opts.cache is not None else (
        dataset.max_size * dataset.image_bytes * copies <= psutil.virtual_memory().total / 4)
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data, use_labels=opts.cond,
                                       xflip=opts.xflip, cache=cache, resolution=res, max_size=dataset.max_size)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=True, num_workers=workers)
    if workers > 0:
        c.data_loader_kwargs.update(prefetch_factor=2, multiprocessing_context='spawn', persistent_workers=True)
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8)
    c.network_kwargs = network_kwargs_for(opts.arch, res, precond=opts.precond, cbase=opts.cbase, cres=opts.cres,
                                          blocks=opts.blocks, dropout=opts.dropout, fp16=opts.fp16, eff_attn=opts.eff_attn,
                                          augment=bool(opts.augment), label_dropout=opts.label_dropout)
    levels = len(c.network_kwargs.channel_mult)
    if levels > max_levels(res):
        raise dnnlib.UserError(f'{levels} resolution levels (--cres / --arch={opts.arch}) are too many for {res} px images: '
                               f'at most {max_levels(res)}, as the image halves at every level; give a shorter --cres')
    c.loss_kwargs = dnnlib.EasyDict(class_name=PRECOND_PRESETS[opts.precond][1])
    if opts.precond == 'blur':
        if res % opts.up_scale != 0:
            raise dnnlib.UserError(f'--up-scale={opts.up_scale} must divide the image resolution {res}')
        c.loss_kwargs.update(block_scale=opts.block_scale, up_scale=opts.up_scale, prob_length=opts.prob_length,
                             blur_sigma_max=opts.blur_sigma_max)
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment, xflip=1e8, yflip=1,
                                           scale=1, rotate_frac=1, aniso=1, translate_frac=1)

    # Schedule (durations may be fractional kimg: handy for small tests) and batch split.
    c.update(total_kimg=opts.duration * 1000, ema_halflife_kimg=opts.ema * 1000, lr_rampup_kimg=opts.lr_rampup,
             batch_size=opts.batch, batch_gpu=opts.batch_gpu, loss_scaling=opts.ls, loss_norm=opts.loss_norm,
             cudnn_benchmark=opts.bench, precision=opts.precision, kimg_per_tick=opts.tick, snapshot_ticks=opts.snap,
             state_dump_ticks=opts.dump)
    if opts.ema_std:  # Only when given: runs without it keep their options file as before.
        c.ema_std = opts.ema_std
    c.sample_grid_kwargs = dnnlib.EasyDict(num_images=opts.grid, num_steps=opts.grid_steps, seed=0) if opts.grid > 0 else None
    c.logger = opts.logger
    if opts.metrics:
        c.metrics_kwargs = dnnlib.EasyDict(opts.metrics, ref=opts.metrics_ref, detector=opts.metrics_detector, trust_detector=opts.trust_detector)
    c.logger_kwargs = dnnlib.EasyDict(repo=opts.aim_repo, experiment=opts.exp_name, tag=opts.exp_tag)
    if opts.logger == 'wandb':
        c.logger_kwargs.project = opts.wandb_project
    training_loop.batch_split(opts.batch, opts.batch_gpu, world)  # Refused now rather than after creating the run folder.

    # Transfer learning or resume.
    if opts.transfer is not None:
        if not dnnlib.util.is_url(opts.transfer) and not os.path.isfile(opts.transfer):
            raise dnnlib.UserError(f'--transfer: no such file: {opts.transfer}')
        c.update(resume_pkl=opts.transfer, transfer_partial=opts.transfer_partial, ema_rampup_ratio=None)
    elif opts.resume is not None:
        c.resume_state_dump, c.resume_kimg = _resolve_resume(opts.resume)
    return c

#----------------------------------------------------------------------------
# The run folder and the run.

def effective_precision(precision, device):
    """fp16 is the network's use_fp16, which runs in half precision on CUDA only (as the reference's)."""
    return 'fp32' if precision == 'fp16' and device.type != 'cuda' else precision


def memory_problem(c, dataset, world, device):
    """Why a batch per accumulation round cannot fit, or None: its activations, with the weights,
    gradients, Adam's moments and the EMAs (float32), exceed the device's free memory. The activations are measured by one forward pass on the meta device (no memory, no
    compute) of one image; they are what autograd keeps, so the estimate is a lower bound."""
    batch_gpu, _rounds = training_loop.batch_split(c.batch_size, c.batch_gpu, world)
    try:
        with torch.device('meta'):
            net = dnnlib.util.construct_class_by_name(**c.network_kwargs, img_resolution=dataset.resolution,
                                                      img_channels=dataset.channels, label_dim=dataset.label_dim)
            image = [1, dataset.channels, dataset.resolution, dataset.resolution]
            augment_labels = torch.zeros([1, net.model.augment_dim]) if getattr(net.model, 'augment_dim', 0) else None
            per_image = misc.activation_bytes(net.train(), torch.zeros(image), torch.ones([1]), torch.zeros([1, dataset.label_dim]),
                                              augment_labels=augment_labels)
    except (RuntimeError, ValueError) as err:  # E.g. channel counts that group normalisation cannot split.
        raise dnnlib.UserError(f'this network (--arch/--cbase/--cres/--blocks) cannot run: {str(err).splitlines()[0][:200]}') from None
    per_image //= 1 if c.precision == 'fp32' else 2  # Half-precision activations (the meta pass runs in float32).
    fixed = sum(p.numel() for p in net.parameters()) * 4 * (5 + len(c.get('ema_std', [])))
    free = torch.cuda.mem_get_info(device)[0] if device.type == 'cuda' else psutil.virtual_memory().available
    if fixed + batch_gpu * per_image > free:
        fits, gib = max(int((free - fixed) // per_image), 0), lambda n: f'{n / 2**30:.3g} GB'
        advice = f'set --batch-gpu={fits} or less' if fits else 'choose a smaller network (--cbase, --cres, --blocks)'
        where = 'this machine' if device.type == 'cpu' else device
        return (f'{batch_gpu} images per accumulation round need about {gib(fixed + batch_gpu * per_image)} ({gib(fixed)} of '
                f'weights and optimizer state, {gib(per_image)} per image) and {where} has {gib(free)} free; {advice}')
    return None


def run_description(c, opts, dataset, world):
    """<dataset>-<cond>-<arch>-<precond>-gpus<N>-batch<B>-<precision that runs>[-desc]"""
    desc = (f'{dataset.name}-{"cond" if c.dataset_kwargs.use_labels else "uncond"}-{opts.arch}-{opts.precond}'
            f'-gpus{world}-batch{c.batch_size}-{effective_precision(opts.precision, dist.get_device())}')
    return desc if opts.desc is None else f'{desc}-{opts.desc}'


def _next_run_dir(outdir, desc):
    ids = [int(m.group()) for name in (os.listdir(outdir) if os.path.isdir(outdir) else [])
           if (m := re.match(r'^\d+', name)) and os.path.isdir(os.path.join(outdir, name))]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


RUN_FILES = re.compile(r'training_options\.json|log\.txt|stats\.jsonl|(network-snapshot-|training-state-|samples-|phema-)\d.*')


def choose_run_dir(opts, desc):
    """The run folder (rank 0; None elsewhere): outdir itself with --nosubdir, else the next id.
    --nosubdir into a folder with another run's files is refused: they would be overwritten or
    mixed with this run's."""
    if opts.nosubdir and os.path.isdir(opts.outdir):
        theirs = sorted(name for name in os.listdir(opts.outdir) if RUN_FILES.fullmatch(name))
        if theirs:
            raise dnnlib.UserError(f'--nosubdir: {opts.outdir} already holds files of a training run ({", ".join(theirs[:3])}'
                                   f'{", ..." if len(theirs) > 3 else ""}); choose an empty or new --outdir, or drop --nosubdir')
    if dist.get_rank() != 0:
        return None
    return opts.outdir if opts.nosubdir else _next_run_dir(opts.outdir, desc)


def _random_seed():
    """Rank 0 draws a seed and every rank uses it."""
    seed = torch.randint(1 << 31, size=[], dtype=torch.int64)
    if dist.get_world_size() > 1:
        seed = seed.to(dist.get_device() if torch.cuda.is_available() else torch.device('cpu'))
        torch.distributed.broadcast(seed, src=0)
    return int(seed)


def launch_training(c, opts, desc):
    """Run folder (rank 0), training_options.json, log.txt, then the training loop."""
    dist.print0('Creating output directory...')
    with contextlib.ExitStack() as stack:
        log = None
        if dist.get_rank() == 0:
            while True:  # Another run may take the same id between listing and creating.
                try:
                    os.makedirs(c.run_dir, exist_ok=opts.nosubdir)
                    break
                except FileExistsError:
                    c.run_dir = _next_run_dir(opts.outdir, desc)
            stack.enter_context(training_loop.lock_run_dir(c.run_dir))  # Two --nosubdir runs would mix their files.
            with dnnlib.util.atomic_write(os.path.join(c.run_dir, 'training_options.json'), 'wt') as f:
                json.dump(c, f, indent=2)
            log = stack.enter_context(dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a'))
        try:
            training_loop.training_loop(**c)
        except (dnnlib.UserError, OSError) as err:
            if log is not None:
                log.file.write(f'Error: {err}\n')  # The reason in log.txt too.
            raise dnnlib.UserError(str(err)) from None

#----------------------------------------------------------------------------

class _OneLineCommand(click.Command):
    """Bad option values end in one 'Error: ...' line, like every other check of this script."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as err:
            raise dnnlib.UserError(err.format_message()) from None


POSITIVE, NONNEGATIVE, FRACTION = Number(0, low_open=True), Number(0), Number(0, 1)


@click.command(cls=_OneLineCommand)
# Main options.
@click.option('--outdir',         help='Where to save the results', metavar='DIR',                   type=str, required=True)
@click.option('--data',           help='Path to the dataset', metavar='ZIP|DIR',                     type=str, required=True)
@click.option('--preset',         help='The paper\'s settings (explicit options override them)',     type=click.Choice(list(TRAIN_PRESETS)), is_eager=True, callback=_use_preset)
@click.option('--cond',           help='Train class-conditional model', metavar='BOOL',              type=bool, default=False, show_default=True)
@click.option('--arch',           help='Network architecture (adm uses ADM\'s 256x256 setting at 256 px)', type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']), default='adm', show_default=True)
@click.option('--precond',        help='Preconditioning & loss function (blur = relay second stage)', type=click.Choice(['vp', 've', 'edm', 'blur']), default='edm', show_default=True)
# Hyperparameters.
@click.option('--duration',       help='Training duration', metavar='MIMG',                          type=POSITIVE, default=200, show_default=True)
@click.option('--batch',          help='Total batch size', metavar='INT',                            type=click.IntRange(1, MAX_BATCH), default=512, show_default=True)
@click.option('--batch-gpu',      help='Limit batch size per process (gradient accumulation)', metavar='INT', type=click.IntRange(1, MAX_BATCH))
@click.option('--cbase',          help='Channel multiplier  [default: varies]', metavar='INT',       type=click.IntRange(1, 1 << 16))
@click.option('--cres',           help='Channels per resolution, e.g. 1,2,2,2  [default: varies]', metavar='LIST', type=str, callback=_parse_cres)
@click.option('--blocks',         help='Residual blocks per resolution  [default: varies]', metavar='INT', type=click.IntRange(1, 100))
@click.option('--lr',             help='Learning rate (Adam moves each weight by about this much per step)', metavar='FLOAT', type=Number(0, 1, low_open=True), default=1e-4, show_default=True)
@click.option('--lr-rampup',      help='Learning rate warm-up duration', metavar='KIMG',             type=NONNEGATIVE, default=10000, show_default=True)
@click.option('--ema',            help='EMA half-life', metavar='MIMG',                              type=NONNEGATIVE, default=0.5, show_default=True)
@click.option('--ema-std',        help='Post-hoc EMA: also keep power-function EMAs of these relative stds (e.g. 0.050,0.100), saved as phema-*.pkl with every snapshot for reconstruct_phema.py; one more copy of the weights per std on every GPU', metavar='LIST', type=str, callback=phema.parse_stds)
@click.option('--dropout',        help='Dropout probability', metavar='FLOAT',                       type=FRACTION, default=0.13, show_default=True)
@click.option('--label-dropout',  help='Probability of training on an empty class label (for classifier-free guidance; needs --cond=1)', metavar='FLOAT', type=FRACTION, default=0, show_default=True)
@click.option('--augment',        help='Augment probability', metavar='FLOAT',                       type=FRACTION, default=0.12, show_default=True)
@click.option('--loss-norm',      help='Divisor of the summed loss: reference = RDM\'s (32 at 64 px, else 256), edm = images per process', type=click.Choice(['reference', 'edm']), default='reference', show_default=True)
@click.option('--xflip',          help='Enable dataset x-flips', metavar='BOOL',                     type=bool, default=False, show_default=True)
# Performance.
@click.option('--precision',      help='fp32, fp16 (the network in half precision, as --fp16=1) or bf16 (autocast)  [default: fp32; fp16 with --fp16=1]', type=click.Choice(['fp32', 'fp16', 'bf16']))
@click.option('--fp16',           help='Enable mixed-precision training (CUDA); same as --precision=fp16', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--ls',             help='Loss scaling', metavar='FLOAT',                              type=POSITIVE, default=1, show_default=True)
@click.option('--bench',          help='Enable cuDNN benchmarking', metavar='BOOL',                  type=bool, default=True, show_default=True)
@click.option('--cache',          help='Keep decoded images in CPU memory, one copy per data-loader worker of every process; auto = only if all copies fit in a quarter of this machine\'s memory', metavar='BOOL|auto', type=str, default='auto', show_default=True, callback=_parse_cache)
@click.option('--workers',        help='DataLoader worker processes (0 = load in the main process)', metavar='INT', type=click.IntRange(min=0), default=1, show_default=True)
# I/O.
@click.option('--desc',           help='String to include in result dir name', metavar='STR',        type=str)
@click.option('--nosubdir',       help='Do not create a subdirectory for results',                   is_flag=True)
@click.option('--tick',           help='How often to print progress', metavar='KIMG',                type=POSITIVE, default=50, show_default=True)
@click.option('--snap',           help='How often to save network snapshots (and sample grids)', metavar='TICKS', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--dump',           help='How often to dump training state', metavar='TICKS',          type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--grid',           help='Images in the sample grid written with every snapshot (0 = none)', metavar='INT', type=click.IntRange(0, MAX_GRID_IMAGES), default=16, show_default=True)
@click.option('--grid-steps',     help='Sampler steps of the sample grid', metavar='INT',            type=click.IntRange(2, 1000), default=32, show_default=True)
@click.option('--seed',           help='Random seed  [default: random]', metavar='INT',              type=click.IntRange(0, (1 << 31) - 1))
@click.option('--transfer',       help='Transfer learning from network pickle', metavar='PKL|PT|URL', type=str)
@click.option('--transfer-partial', help='Allow --transfer from a network that shares under half of the weights', is_flag=True)
@click.option('--resume',         help='Resume from a training-state-*.pt or a run folder (its latest state)', metavar='PT|DIR', type=click.Path(exists=True))
@click.option('-n', '--dry-run',  help='Print training options and exit',                            is_flag=True)
# Extensions.
@click.option('--eff-attn',       help='Efficient attention (scaled_dot_product_attention)', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--logger',         help='Experiment tracker (its package must be installed)',         type=click.Choice(['none', *loggers.LOGGERS]), default='none', show_default=True)
@click.option('--aim-repo',       help='aim repository (with --logger=aim)', metavar='STR',          type=str, default='')
@click.option('--wandb-project',  help='Weights & Biases project (with --logger=wandb)  [default: relay-diffusion]', metavar='STR', type=str, default='')
@click.option('--exp-name',       help='Experiment / run name (with --logger=aim or wandb)', metavar='STR', type=str, default='')
@click.option('--exp-tag',        help='Experiment tag (with --logger=aim or wandb)', metavar='STR', type=str, default='')
@click.option('--no-aim',         help='Accepted for compatibility; aim is off unless --logger=aim', is_flag=True)
# Metrics of every snapshot (evaluate.py sweep's, into the same metrics-*.jsonl).
@click.option('--metrics',        help='Metrics of every snapshot, with their sample count: fid10k, fd_dinov2_10k, is50, ...  [default: none]', metavar='LIST', type=str, callback=_parse_metrics)
@click.option('--metrics-ref',    help='Reference of --metrics: path, URL or a name from `evaluate.py refs`  [default with --precond=blur: the dataset images]', metavar='NPZ|URL|NAME', type=str)
@click.option('--metrics-detector', help='Inception detector of --metrics (NVIDIA .pkl, needs --trust-detector, or pytorch-fid .pth)', metavar='PATH|URL', type=str, default=detector.DEFAULT_DETECTOR_URL, show_default=True)
@click.option('--trust-detector', help='Allow a .pkl detector to run the code stored in it (NVIDIA\'s Inception pickle, the default)', is_flag=True)
# Relay (blurring diffusion) stage, --precond=blur.
@click.option('--up-scale',       help='Upsampling scale = DCT block size', metavar='INT',           type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--block-scale',    help='Scale of block noise addition', metavar='FLOAT',             type=FRACTION, default=0.15, show_default=True)
@click.option('--prob-length',    help='Truncation probability length (below 0.001 every noise level is under the loss\'s floor)', metavar='FLOAT', type=Number(0.001, 1), default=0.93, show_default=True)
@click.option('--blur-sigma-max', help='Maximum sigma of blurring schedule (from about 10 on, every block blurs to its mean)', metavar='FLOAT', type=Number(0, 1000), default=3, show_default=True)
def main(**_kwargs):
    """Train a diffusion model (EDM first stage, or the relay stage with --precond=blur).

    Examples:

    \b
    # The paper's ImageNet runs (first stage at 64x64, then the relay stage at 256x256)
    torchrun --standalone --nproc_per_node=8 train.py --preset=imagenet64 \\
        --outdir=training-runs --data=datasets/imagenet-64x64.zip
    torchrun --standalone --nproc_per_node=8 train.py --preset=imagenet256 \\
        --outdir=training-runs --data=datasets/imagenet-256x256.zip

    \b
    # Class-conditional DDPM++ on CIFAR-10 with 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp

    \b
    # Continue the latest training state of a run
    python train.py --outdir=training-runs --data=... --resume=training-runs/00003-...
    """
    opts = resolve_options(click.get_current_context())
    problem = dnnlib.util.folder_write_problem(opts.outdir)
    if problem:
        raise dnnlib.UserError(f'--outdir={opts.outdir}: {problem}; choose a writable folder')
    dist.init()
    world = dist.get_world_size()
    if effective_precision(opts.precision, dist.get_device()) != opts.precision:
        dist.print0(f'Note: --precision={opts.precision} runs the network in float16 on CUDA only, as the reference; '
                    f'on {dist.get_device()} it trains in float32 (the run is named so)')
    dataset = inspect_dataset(opts)
    c = setup_training_config(opts, dataset, world)
    problem = memory_problem(c, dataset, world, dist.get_device())
    if problem and not opts.dry_run:  # Refused before the run folder exists; a dry run only notes it.
        raise dnnlib.UserError(problem)
    c.seed = opts.seed if opts.seed is not None else _random_seed()
    desc = run_description(c, opts, dataset, world)
    c.run_dir = choose_run_dir(opts, desc)
    dist.print0(f'\nTraining options:\n{json.dumps(c, indent=2)}\n')
    summary = [('Output directory', c.run_dir), ('Dataset path', c.dataset_kwargs.path), ('Class-conditional', opts.cond),
               ('Network architecture', opts.arch), ('Preconditioning & loss', opts.precond), ('Number of processes', world),
               ('Device', dist.get_device()), ('Batch size', c.batch_size), ('Precision', c.precision)]
    dist.print0('\n'.join(f'{name + ":":24} {value}' for name, value in summary) + '\n')
    if opts.dry_run:
        if problem:
            dist.print0(f'Note: {problem}')
        dist.print0('Dry run; exiting.')
        return
    launch_training(c, opts, desc)


if __name__ == '__main__':
    main()
