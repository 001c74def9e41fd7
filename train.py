"""Train a diffusion model: the first (EDM) stage of Relay Diffusion, or the second (blurring
diffusion) stage with --precond=blur.

One process:     python train.py --outdir=runs --data=datasets/cifar10-32x32.zip --arch=ddpmpp
N processes:     torchrun --standalone --nproc_per_node=N train.py ...   (NCCL on GPUs, gloo on CPU)
"""

import json
import os
import re
import warnings
import zipfile

import click
import torch

import dnnlib
from torch_utils import distributed as dist

warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides')  # Harmless DDP warning.


#----------------------------------------------------------------------------
# Presets as data: network per --arch, network + loss class per --precond.

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


def network_kwargs_for(arch, resolution, precond='edm', cbase=None, cres=None, blocks=None, dropout=0.13, fp16=False,
                       eff_attn=False, augment=True):
    """Network constructor options for train.py's --arch/--precond/--cbase/--cres choices."""
    kwargs = dnnlib.EasyDict(ARCH_PRESETS['adm256' if arch == 'adm' and resolution == 256 else arch])
    kwargs.update(eff_attn=eff_attn)
    kwargs.class_name = PRECOND_PRESETS[precond][0]
    if cbase is not None:
        kwargs.model_channels = cbase
    if cres is not None:
        kwargs.channel_mult = cres
    if blocks is not None:
        kwargs.num_blocks = blocks
    if augment:
        kwargs.augment_dim = 9
    kwargs.update(dropout=dropout, use_fp16=fp16)
    return kwargs


#----------------------------------------------------------------------------

def _resolve_resume(path):
    """--resume: a training-state-*.pt file or a run folder (its latest state)."""
    from training.training_loop import find_latest_training_state, training_state_nimg
    if os.path.isdir(path):
        state = find_latest_training_state(path)
        if state is None:
            raise click.ClickException(f'--resume: no training-state-*.pt in folder {path}')
        path = state
    elif not os.path.isfile(path):
        raise click.ClickException(f'--resume: no such file or folder: {path}')
    # torch.save writes a zip archive; anything else is not a state this script wrote.
    if not zipfile.is_zipfile(path):
        raise click.ClickException(f'--resume: {path} is not a training state written by train.py (training-state-*.pt)')
    return path, (training_state_nimg(path) or 0) / 1000


def _next_run_dir(outdir, desc):
    prev_ids = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            m = re.match(r'^\d+', name)
            if m and os.path.isdir(os.path.join(outdir, name)):
                prev_ids.append(int(m.group()))
    return os.path.join(outdir, f'{max(prev_ids, default=-1) + 1:05d}-{desc}')


def _random_seed():
    """Rank 0 draws a seed and every rank uses it."""
    seed = torch.randint(1 << 31, size=[], dtype=torch.int64)
    if dist.get_world_size() > 1:
        backend_device = dist.get_device() if torch.cuda.is_available() else torch.device('cpu')
        seed = seed.to(backend_device)
        torch.distributed.broadcast(seed, src=0)
    return int(seed)


@click.command()
# Main options.
@click.option('--outdir',         help='Where to save the results', metavar='DIR',                   type=str, required=True)
@click.option('--data',           help='Path to the dataset', metavar='ZIP|DIR',                     type=str, required=True)
@click.option('--cond',           help='Train class-conditional model', metavar='BOOL',              type=bool, default=False, show_default=True)
@click.option('--arch',           help='Network architecture (adm uses ADM\'s 256x256 setting at 256 px)', type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']), default='adm', show_default=True)
@click.option('--precond',        help='Preconditioning & loss function (blur = relay second stage)', type=click.Choice(['vp', 've', 'edm', 'blur']), default='edm', show_default=True)
# Hyperparameters.
@click.option('--duration',       help='Training duration', metavar='MIMG',                          type=click.FloatRange(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch',          help='Total batch size', metavar='INT',                            type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--batch-gpu',      help='Limit batch size per process (gradient accumulation)', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase',          help='Channel multiplier  [default: varies]', metavar='INT',       type=click.IntRange(min=1))
@click.option('--cres',           help='Channels per resolution  [default: varies]', metavar='LIST', type=dnnlib.util.parse_int_list)
@click.option('--blocks',         help='Residual blocks per resolution  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--lr',             help='Learning rate', metavar='FLOAT',                             type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option('--lr-rampup',      help='Learning rate warm-up duration', metavar='KIMG',             type=click.FloatRange(min=0), default=10000, show_default=True)
@click.option('--ema',            help='EMA half-life', metavar='MIMG',                              type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--dropout',        help='Dropout probability', metavar='FLOAT',                       type=click.FloatRange(min=0, max=1), default=0.13, show_default=True)
@click.option('--augment',        help='Augment probability', metavar='FLOAT',                       type=click.FloatRange(min=0, max=1), default=0.12, show_default=True)
@click.option('--loss-norm',      help='Divisor of the summed loss: reference = RDM\'s (32 at 64 px, else 256), edm = images per process', type=click.Choice(['reference', 'edm']), default='reference', show_default=True)
@click.option('--xflip',          help='Enable dataset x-flips', metavar='BOOL',                     type=bool, default=False, show_default=True)
# Performance.
@click.option('--fp16',           help='Enable mixed-precision training (CUDA)', metavar='BOOL',     type=bool, default=False, show_default=True)
@click.option('--ls',             help='Loss scaling', metavar='FLOAT',                              type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option('--bench',          help='Enable cuDNN benchmarking', metavar='BOOL',                  type=bool, default=True, show_default=True)
@click.option('--cache',          help='Cache dataset in CPU memory', metavar='BOOL',                type=bool, default=True, show_default=True)
@click.option('--workers',        help='DataLoader worker processes (0 = load in the main process)', metavar='INT', type=click.IntRange(min=0), default=1, show_default=True)
# I/O.
@click.option('--desc',           help='String to include in result dir name', metavar='STR',        type=str)
@click.option('--nosubdir',       help='Do not create a subdirectory for results',                   is_flag=True)
@click.option('--tick',           help='How often to print progress', metavar='KIMG',                type=click.FloatRange(min=0, min_open=True), default=50, show_default=True)
@click.option('--snap',           help='How often to save network snapshots', metavar='TICKS',       type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--dump',           help='How often to dump training state', metavar='TICKS',          type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--seed',           help='Random seed  [default: random]', metavar='INT',              type=int)
@click.option('--transfer',       help='Transfer learning from network pickle', metavar='PKL|PT|URL', type=str)
@click.option('--resume',         help='Resume from a training-state-*.pt or a run folder (its latest state)', metavar='PT|DIR', type=str)
@click.option('-n', '--dry-run',  help='Print training options and exit',                            is_flag=True)
# Extensions.
@click.option('--eff-attn',       help='Efficient attention (scaled_dot_product_attention)', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--logger',         help='Experiment logger (tensorboard/aim must be installed)',      type=click.Choice(['none', 'tensorboard', 'aim']), default='none', show_default=True)
@click.option('--aim-repo',       help='aim repository (with --logger=aim)', metavar='STR',          type=str, default='')
@click.option('--exp-name',       help='Experiment name (with --logger=aim)', metavar='STR',         type=str, default='')
@click.option('--exp-tag',        help='Experiment tag (with --logger=aim)', metavar='STR',          type=str, default='')
@click.option('--no-aim',         help='Accepted for compatibility; aim is off unless --logger=aim', is_flag=True)
# Relay (blurring diffusion) stage, --precond=blur.
@click.option('--up-scale',       help='Upsampling scale = DCT block size', metavar='INT',           type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--block-scale',    help='Scale of block noise addition', metavar='FLOAT',             type=click.FloatRange(min=0, max=1), default=0.15, show_default=True)
@click.option('--prob-length',    help='Truncation probability length', metavar='FLOAT',             type=click.FloatRange(min=0), default=0.93, show_default=True)
@click.option('--blur-sigma-max', help='Maximum sigma of blurring schedule', metavar='FLOAT',        type=click.FloatRange(min=0), default=3, show_default=True)
def main(**kwargs):
    """Train a diffusion model (EDM first stage, or the relay stage with --precond=blur).

    Examples:

    \b
    # Class-conditional DDPM++ on CIFAR-10 with 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp

    \b
    # Relay second stage at 256x256 (blurring diffusion, 4x4 DCT blocks)
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/celebahq-256x256.zip --arch=adm --precond=blur --up-scale=4

    \b
    # Continue the latest training state of a run
    python train.py --outdir=training-runs --data=... --resume=training-runs/00003-...
    """
    opts = dnnlib.EasyDict(kwargs)
    dist.init()
    world = dist.get_world_size()

    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data,
                                       use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=True, num_workers=opts.workers)
    if opts.workers > 0:
        # Spawned workers: safe with CUDA in the parent (fork is not).
        c.data_loader_kwargs.update(prefetch_factor=2, multiprocessing_context='spawn', persistent_workers=True)
    c.loss_kwargs = dnnlib.EasyDict()
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8)

    # Dataset: open it once to validate it and to record its resolution and size.
    try:
        from training.dataset import ImageFolderDataset
        dataset_obj = ImageFolderDataset(**{k: v for k, v in c.dataset_kwargs.items() if k != 'class_name'})
        dataset_name = dataset_obj.name
        c.dataset_kwargs.resolution = dataset_obj.resolution
        c.dataset_kwargs.max_size = len(dataset_obj) // (2 if opts.xflip else 1)
        if opts.cond and not dataset_obj.has_labels:
            raise click.ClickException(f'--cond=True requires labels in dataset.json, and {opts.data} has none')
        del dataset_obj
    except OSError as err:
        raise click.ClickException(f'--data: {err}')
    except AssertionError:
        raise click.ClickException(f'--data: images in {opts.data} must be square')

    # Network, preconditioning and loss.
    c.network_kwargs = network_kwargs_for(opts.arch, c.dataset_kwargs.resolution, precond=opts.precond,
                                          cbase=opts.cbase, cres=opts.cres, blocks=opts.blocks, dropout=opts.dropout, fp16=opts.fp16,
                                          eff_attn=opts.eff_attn, augment=bool(opts.augment))
    c.loss_kwargs.class_name = PRECOND_PRESETS[opts.precond][1]
    if opts.precond == 'blur':
        if c.dataset_kwargs.resolution % opts.up_scale != 0:
            raise click.ClickException(f'--up-scale={opts.up_scale} must divide the image resolution {c.dataset_kwargs.resolution}')
        c.loss_kwargs.update(block_scale=opts.block_scale, up_scale=opts.up_scale,
                             prob_length=opts.prob_length, blur_sigma_max=opts.blur_sigma_max)
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment)
        c.augment_kwargs.update(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

    # Training schedule. Durations may be fractional kimg (handy for small tests).
    c.total_kimg = opts.duration * 1000
    c.ema_halflife_kimg = opts.ema * 1000
    c.lr_rampup_kimg = opts.lr_rampup
    c.update(batch_size=opts.batch, batch_gpu=opts.batch_gpu)
    c.update(loss_scaling=opts.ls, loss_norm=opts.loss_norm, cudnn_benchmark=opts.bench)
    c.update(kimg_per_tick=opts.tick, snapshot_ticks=opts.snap, state_dump_ticks=opts.dump)
    c.logger = opts.logger
    if opts.logger != 'none':  # Optional packages: fail now rather than after creating the run folder.
        import importlib.util
        package = 'tensorboard' if opts.logger == 'tensorboard' else 'aim'
        if importlib.util.find_spec(package) is None:
            raise click.ClickException(f'--logger={opts.logger} needs the {package} package: pip install {package}')
    c.logger_kwargs = dnnlib.EasyDict(repo=opts.aim_repo, experiment=opts.exp_name, tag=opts.exp_tag)

    # Batch split across processes and accumulation rounds.
    if opts.batch % world != 0:
        raise click.ClickException(f'--batch={opts.batch} is not divisible by the number of processes ({world})')
    per_process = opts.batch // world
    if opts.batch_gpu is not None and opts.batch_gpu < per_process and per_process % opts.batch_gpu != 0:
        raise click.ClickException(f'--batch-gpu={opts.batch_gpu} must divide the per-process batch {per_process} '
                                   f'(--batch={opts.batch} over {world} processes)')

    c.seed = opts.seed if opts.seed is not None else _random_seed()

    # Transfer learning or resume.
    if opts.transfer is not None:
        if opts.resume is not None:
            raise click.ClickException('--transfer and --resume cannot be specified at the same time')
        if not dnnlib.util.is_url(opts.transfer) and not os.path.isfile(opts.transfer):
            raise click.ClickException(f'--transfer: no such file: {opts.transfer}')
        c.resume_pkl = opts.transfer
        c.ema_rampup_ratio = None
    elif opts.resume is not None:
        c.resume_state_dump, c.resume_kimg = _resolve_resume(opts.resume)

    # Run folder name: <id>-<dataset>-<cond>-<arch>-<precond>-gpus<N>-batch<B>-<dtype>[-desc].
    cond_str = 'cond' if c.dataset_kwargs.use_labels else 'uncond'
    dtype_str = 'fp16' if c.network_kwargs.use_fp16 else 'fp32'
    desc = f'{dataset_name:s}-{cond_str:s}-{opts.arch:s}-{opts.precond:s}-gpus{world:d}-batch{c.batch_size:d}-{dtype_str:s}'
    if opts.desc is not None:
        desc += f'-{opts.desc}'
    if dist.get_rank() != 0:
        c.run_dir = None
    elif opts.nosubdir:
        c.run_dir = opts.outdir
        if os.path.isfile(os.path.join(opts.outdir, 'training_options.json')):
            raise click.ClickException(f'--nosubdir: {opts.outdir} already holds a training run; '
                                       f'choose another --outdir or drop --nosubdir')
    else:
        c.run_dir = _next_run_dir(opts.outdir, desc)

    dist.print0()
    dist.print0('Training options:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    dist.print0(f'Output directory:        {c.run_dir}')
    dist.print0(f'Dataset path:            {c.dataset_kwargs.path}')
    dist.print0(f'Class-conditional:       {c.dataset_kwargs.use_labels}')
    dist.print0(f'Network architecture:    {opts.arch}')
    dist.print0(f'Preconditioning & loss:  {opts.precond}')
    dist.print0(f'Number of processes:     {world}')
    dist.print0(f'Device:                  {dist.get_device()}')
    dist.print0(f'Batch size:              {c.batch_size}')
    dist.print0(f'Mixed-precision:         {c.network_kwargs.use_fp16}')
    dist.print0()
    if opts.dry_run:
        dist.print0('Dry run; exiting.')
        return

    # Create the run folder and tee the console into log.txt.
    dist.print0('Creating output directory...')
    logger = run_lock = None
    if dist.get_rank() == 0:
        if opts.nosubdir:
            os.makedirs(c.run_dir, exist_ok=True)
        else:
            while True:  # Another run may grab the same id between listing and creating.
                try:
                    os.makedirs(c.run_dir, exist_ok=False)
                    break
                except FileExistsError:
                    c.run_dir = _next_run_dir(opts.outdir, desc)
        from training.training_loop import lock_run_dir, TrainingError
        try:
            run_lock = lock_run_dir(c.run_dir)  # One run per folder (two --nosubdir runs would mix their files).
        except TrainingError as err:
            raise click.ClickException(str(err))
        from torch_utils.misc import atomic_write
        with atomic_write(os.path.join(c.run_dir, 'training_options.json'), 'wt') as f:
            json.dump(c, f, indent=2)
        logger = dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)

    from training import training_loop
    try:
        training_loop.training_loop(**c)
    except (training_loop.TrainingError, OSError) as err:
        if logger is not None and logger.file is not None:
            logger.file.write(f'Error: {err}\n')  # Keep the reason in log.txt too.
        raise click.ClickException(str(err))
    finally:
        if logger is not None:
            logger.close()
        if run_lock is not None:
            run_lock.release()


if __name__ == '__main__':
    main()
