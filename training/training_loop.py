"""The training loop: EDM's loop (Adam, learning-rate warm-up, EMA with ramp-up, ticks,
snapshots, stats.jsonl) on one process or under torchrun with DistributedDataParallel.

Outputs in run_dir:
  network-snapshot-<N>.pkl  dict(ema, loss_kwargs, augment_pipe, dataset_kwargs)   every `snapshot_ticks`
  training-state-<N>.pt     dict(net, ema, optimizer_state, step, loss_kwargs)     every `state_dump_ticks`
                            (and phema: {std: network} with `ema_std`)
  phema-<N>-<std>.pkl       a snapshot of the power-function EMA of each `ema_std`  with every snapshot
  samples-<N>.png           fixed-seed sample grid of the EMA (rank 0)            with every snapshot
  stats.jsonl               one line of averaged statistics per tick
<N> = images seen so far: KKKKKK (whole thousands, the reference's names) or KKKKKK_III when
the count is not a whole thousand (K thousands and I images), so that snapshots of fractional
ticks never overwrite each other; both forms sort in training order. Files are written
atomically (temp file + rename).

The snapshot holds only objects that unpickle inside the reference's and EDM's own source trees:
the EMA network and augmentation pipe (persistent objects whose module source imports only
names those trees have) and plain dicts. The loss is stored as its constructor options
(`loss_kwargs`, a dict with class_name) rather than as an object; older snapshots and the
reference's files hold a `loss_fn` object instead (training/pipeline.py reads both).
"""

import contextlib
import copy
import errno
import inspect
import json
import os
import re
import sys
import time

import numpy as np
import psutil
import torch
import tqdm

import dnnlib
import training
from metrics import sweep as metrics_sweep
from torch_utils import checkpoint, misc, training_stats
from torch_utils import distributed as dist
from training import fast_mode, loggers, phema, sample_grid
from training import loss as training_loss

#----------------------------------------------------------------------------
# File names carrying the number of images seen.

NIMG = r'(\d+)(?:_(\d{3}))?'  # nimg_suffix's two forms: groups 1 and 2.
TRAINING_STATE = rf'training-state-{NIMG}\.pt'


def nimg_suffix(cur_nimg):
    """'000123' for 123000 images (the reference's form), '000123_456' for 123456."""
    kimg, rest = divmod(int(cur_nimg), 1000)
    return f'{kimg:06d}' if rest == 0 else f'{kimg:06d}_{rest:03d}'


def training_state_nimg(path):
    """Images seen according to a training-state file name, or None if the name is not one."""
    m = re.fullmatch(TRAINING_STATE, os.path.basename(path))
    return None if m is None else int(m[1]) * 1000 + int(m[2] or 0)


def run_files(folder, pattern):
    """(nimg, path, match) of the files in folder whose names match `pattern` (NIMG first), in training order."""
    found = [(m, os.path.join(folder, name)) for name in os.listdir(folder) if (m := re.fullmatch(pattern, name))]
    return sorted((int(m[1]) * 1000 + int(m[2] or 0), path, m) for m, path in found if os.path.isfile(path))


def find_latest_training_state(run_dir):
    """Path of the training-state-*.pt with the most images seen in a run folder, or None."""
    states = run_files(run_dir, TRAINING_STATE)
    return states[-1][1] if states else None

#----------------------------------------------------------------------------
# One training run per folder: an exclusive lock on a file in it, held for the run.

RUN_LOCK_NAME = '.train.lock'


def lock_run_dir(run_dir):
    """Take the run folder's lock or raise UserError naming the folder. Returns a context manager
    (the lock file) whose exit, like the process's, releases the lock. The empty lock file
    stays in the folder, as other lock libraries leave theirs: removing it on release would let
    a run that opened it just before lock a file that the next run no longer sees."""
    try:
        import fcntl
    except ImportError:  # No flock on this platform: run unlocked.
        return contextlib.nullcontext()
    f = open(os.path.join(run_dir, RUN_LOCK_NAME), 'a')
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise dnnlib.UserError(f'{run_dir} is in use by another training run (it holds {f.name}); '
                               f'wait for it to finish or choose another --outdir') from None
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        # Network filesystems without lock support (NFS without lockd, some Lustre mounts): the
        # file stays open, unlocked, for the run.
        print(f'Warning: {run_dir} is on a filesystem without file locks ({err.strerror}); training without '
              f'the lock that keeps a second run out of this folder', file=sys.stderr)
    return f

#----------------------------------------------------------------------------
# Resume and transfer.

def _stage(record):
    return 'second (relay, --precond=blur)' if record.stage == 'second' else f'first ({record.loss})'


def _bad_number(value, low, high):
    return isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high


def _state_problem(data, net, optimizer):
    """Why the values of a training state (dict with net, ema, optimizer_state, step) cannot be
    trained on, or None: every weight finite, an image count for step, and Adam's state as this
    network's optimizer has it (groups, hyperparameters in range, moments of the parameters'
    shapes, finite)."""
    step = data.get('step', 0)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 1 << 53:
        return f'its step ({str(step)[:20]}) is not a number of images'
    for key in ('net', 'ema'):
        bad = [name for name, t in misc.named_tensors(data[key]).items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            return f'its {key} holds non-finite values ({bad[0]}{", ..." if len(bad) > 1 else ""})'
    state, ours = data['optimizer_state'], optimizer.state_dict()['param_groups']
    groups = state.get('param_groups') if isinstance(state, dict) and isinstance(state.get('state'), dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return 'its optimizer_state is not an optimizer state (state, param_groups)'
    if [len(g.get('params', [])) for g in groups] != [len(g['params']) for g in ours]:
        return f'its optimizer holds {sum(len(g.get("params", [])) for g in groups)} parameters and this network has {len(ours[0]["params"])}'
    for group in groups:
        betas = group.get('betas', (0, 0))
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2 or any(_bad_number(b, 0, 1 - 1e-12) for b in betas)
                or _bad_number(group.get('eps', 1), 1e-30, 1) or _bad_number(group.get('lr', 0), 0, 1e3)
                or _bad_number(group.get('weight_decay', 0), 0, 1e3)):
            return f'its optimizer settings are out of range (betas {betas}, eps {group.get("eps")}, lr {group.get("lr")})'
    shapes = [p.shape for p in net.parameters()]
    for index, entry in state['state'].items():
        if not isinstance(index, int) or not 0 <= index < len(shapes) or not isinstance(entry, dict):
            return f'its optimizer state has an entry {str(index)[:20]} for no parameter of this network'
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor) or not value.isfinite().all() or (value.ndim == 0 and value < 0):
                return f'its optimizer state {key} of parameter {index} is not a finite tensor (or is negative)'
            if value.ndim > 0 and value.shape != shapes[index]:
                return f'its optimizer state {key} of parameter {index} is {list(value.shape)}, the parameter {list(shapes[index])}'
    return None


def load_training_state(path, net, ema, optimizer, loss_kwargs=None, power_emas=None):
    """Copy net/ema weights and the optimizer state from a training-state file; return the
    number of images it had seen ('step'; from the file name if absent). Refuses a state of
    another preconditioner or, where the state's loss is known, of the other relay stage, and
    values that cannot be trained on."""
    data = training.load_checkpoint(path)
    missing = [key for key in ('net', 'ema', 'optimizer_state') if key not in data]
    if missing:
        raise dnnlib.UserError(f'{path}: not a training state (no {", ".join(missing)}); '
                               f'use --transfer to start from network weights only')
    if type(data['net']).__name__ != type(net).__name__:
        raise dnnlib.UserError(f'{path}: holds a {type(data["net"]).__name__} network and this run builds {type(net).__name__}; '
                               f'resume with the --precond of the original run')
    theirs, ours = training_loss.training_record(data), training_loss.training_record(loss_kwargs or {})
    if theirs.loss is None:  # Not recorded in the state: what the training_options.json beside it says.
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with open(os.path.join(os.path.dirname(os.path.abspath(path)), 'training_options.json')) as f:
                theirs = training_loss.training_record(json.load(f)['loss_kwargs'])
    if None not in (theirs.stage, ours.stage) and theirs.stage != ours.stage:
        raise dnnlib.UserError(f'{path}: is a {_stage(theirs)} stage training state and this run trains the '
                               f'{_stage(ours)} stage; resume with the --precond of the original run, '
                               f'or start from its weights with --transfer')
    saved = data.get('phema') if isinstance(data.get('phema'), dict) else {}
    missing = [std for std in (power_emas.emas if power_emas else []) if not isinstance(saved.get(std), torch.nn.Module)]
    if missing:
        raise dnnlib.UserError(f'{path}: holds no power-function EMA of std {missing[0]:.3f} (it has: '
                               f'{", ".join(map(str, saved)) or "none"}); resume with the --ema-std of the original run')
    try:
        misc.copy_params_and_buffers(data['net'], net, require_all=True)
        misc.copy_params_and_buffers(data['ema'], ema, require_all=True)
        for std, power_ema in power_emas.emas.items() if power_emas else []:
            misc.copy_params_and_buffers(saved[std], power_ema, require_all=True)
    except ValueError as err:
        raise dnnlib.UserError(f'{path}: does not match this network ({err}); '
                               f'use the same --arch/--cbase/--cres/--precond as the original run') from None
    problem = _state_problem(data, net, optimizer)
    if problem:
        raise dnnlib.UserError(f'{path}: {problem}; the training state is damaged, resume from an earlier one')
    optimizer.load_state_dict(data['optimizer_state'])
    return data['step'] if 'step' in data else training_state_nimg(path) or 0


def load_transfer_weights(path, net, ema, partial=False):
    """Initialise net and ema from another network's EMA weights: the tensors with this network's
    names (and shapes). Says how much that is of each network; under half of either's weights is
    refused unless partial."""
    data = training.load_checkpoint(path)
    if not isinstance(data.get('ema'), torch.nn.Module):
        raise dnnlib.UserError(f'{path}: has no "ema" network to transfer from')
    try:
        copied = set(misc.copy_params_and_buffers(data['ema'], net))
        misc.copy_params_and_buffers(data['ema'], ema)
    except ValueError as err:
        raise dnnlib.UserError(f'{path}: does not match this network ({err})') from None
    params = dict(net.named_parameters())
    count = sum(p.numel() for name, p in params.items() if name in copied)
    ours, theirs = count / sum(p.numel() for p in params.values()), count / sum(p.numel() for p in data['ema'].parameters())
    report = f'{sum(name in copied for name in params)} weight tensors ({ours:.1%} of this network\'s weights, {theirs:.1%} of the source\'s)'
    if min(ours, theirs) < 0.5 and not partial:
        raise dnnlib.UserError(f'{path}: shares only {report}; check --arch/--cbase/--cres/--cond, '
                               f'or pass --transfer-partial to start from it anyway')
    dist.print0(f'Transferred {report} from {path}')


#----------------------------------------------------------------------------
# Loss normalisation: the summed per-pixel loss of each accumulation round is multiplied by
# loss_scaling / divisor before backward. Under Adam a constant divisor c acts like dividing
# eps by c, so the choice changes the trained weights (slightly) and must match the reference
# to reproduce its runs.
#   reference  RDM's rule: 32 when the batch's images are 64 pixels wide, 256 otherwise.
#   edm        EDM's rule: the images per process (batch_size / processes), i.e. the per-image
#              mean of the summed loss over the whole batch once DDP averages the gradients;
#              independent of resolution and batch size.

def reference_loss_divisor(images):
    return 32 if images.shape[-1] == 64 else 256

#----------------------------------------------------------------------------

def batch_split(batch_size, batch_gpu, world):
    """(images per process per accumulation round, rounds) of a batch over `world` processes,
    batch_gpu (None: no limit) capped at the per-process batch; UserError where they do not divide."""
    per_process = batch_size // world
    batch_gpu = min(batch_gpu or per_process, per_process)
    if batch_size % world != 0:
        raise dnnlib.UserError(f'--batch={batch_size} is not divisible by the number of processes ({world})')
    if per_process % batch_gpu != 0:
        raise dnnlib.UserError(f'--batch-gpu={batch_gpu} must divide the per-process batch {per_process} '
                               f'(--batch={batch_size} over {world} processes)')
    return batch_gpu, per_process // batch_gpu


def _distributed(net, train_net, device):
    """train_net (net, or a wrapper sharing its parameters) in DistributedDataParallel. DDP
    broadcasts rank 0's initial parameters, so all ranks (and their EMAs) start equal. The buffers
    (resampling filters, ncsnpp's random Fourier frequencies) never change, so they are broadcast
    once, here: before PyTorch 2.13 DDP's only switch against a broadcast every forward
    (broadcast_buffers=False) skipped the initial one too."""
    for buffer in net.buffers():
        torch.distributed.broadcast(buffer, src=0)
    ddp_params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    sync = dict(forward_sync_buffers=False) if 'forward_sync_buffers' in ddp_params else dict(broadcast_buffers=False)
    return torch.nn.parallel.DistributedDataParallel(train_net, device_ids=[device] if device.type == 'cuda' else None, **sync)


def _status_line(cur_tick, cur_nimg, start_time, tick_start_time, tick_start_nimg, maintenance_time, device):
    """The tick's progress line; every number is also reported to training_stats (rank 0's)."""
    now = time.time()
    cuda = device.type == 'cuda'
    fields = [  # (label, statistic, value, format)
        ('tick', 'Progress/tick', cur_tick, '<5d'),
        ('kimg', 'Progress/kimg', cur_nimg / 1e3, '<9.3f'),
        ('time', 'Timing/total_sec', now - start_time, None),
        ('sec/tick', 'Timing/sec_per_tick', now - tick_start_time, '<7.1f'),
        ('sec/kimg', 'Timing/sec_per_kimg', (now - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1e3, '<7.2f'),
        ('maintenance', 'Timing/maintenance_sec', maintenance_time, '<6.1f'),
        ('cpumem', 'Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30, '<6.2f'),
        ('gpumem', 'Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0, '<6.2f'),
        ('reserved', 'Resources/peak_gpu_mem_reserved_gb', torch.cuda.max_memory_reserved(device) / 2**30 if cuda else 0.0, '<6.2f'),
    ]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    text = []
    for label, name, value, fmt in fields:
        value = training_stats.report0(name, value)
        text.append(f'{label} {dnnlib.util.format_time(value):<12s}' if fmt is None else f'{label} {value:{fmt}}')
    return now, ' '.join(text)


def training_loop(
    run_dir             = '.',      # Output directory (rank 0 only; None on other ranks).
    dataset_kwargs      = {},       # training.dataset.ImageFolderDataset options.
    data_loader_kwargs  = {},       # torch.utils.data.DataLoader options.
    network_kwargs      = {},       # Network and preconditioning options.
    loss_kwargs         = {},       # Loss options.
    optimizer_kwargs    = {},       # Optimizer options.
    augment_kwargs      = None,     # Augmentation pipe options, None = no augmentation.
    seed                = 0,        # Global random seed.
    batch_size          = 512,      # Total batch size of one optimizer step.
    batch_gpu           = None,     # Per-process batch limit (gradient accumulation), None = no limit.
    total_kimg          = 200000,   # Training length in thousands of images.
    ema_halflife_kimg   = 500,      # EMA half-life in thousands of images.
    ema_rampup_ratio    = 0.05,     # EMA half-life ramp-up coefficient, None = no ramp-up.
    ema_std             = None,     # Post-hoc EMA: relative stds of power-function EMAs kept beside the classic one.
    lr_rampup_kimg      = 10000,    # Learning-rate warm-up length.
    loss_scaling        = 1,        # Loss scaling against fp16 under/overflow.
    kimg_per_tick       = 50,       # Progress line (and stats line) interval.
    snapshot_ticks      = 50,       # Network snapshot interval in ticks, None = never.
    state_dump_ticks    = 500,      # Training state interval in ticks, None = never.
    resume_pkl          = None,     # Initialise from this network's EMA weights (--transfer).
    transfer_partial    = False,    # Allow resume_pkl to share under half of the weights.
    resume_state_dump   = None,     # Continue from this training state (--resume).
    resume_kimg         = 0,        # Progress to start from when resume_state_dump has no 'step'.
    cudnn_benchmark     = True,     # torch.backends.cudnn.benchmark.
    precision           = 'fp32',   # 'fp32', 'fp16' (the network's use_fp16, as the reference) or 'bf16' (autocast).
    sample_grid_kwargs  = None,     # training.sample_grid.SampleGrid options (num_images, num_steps, seed); None = no grids.
    logger              = None,     # None / 'none' / 'tensorboard' / 'aim' / 'wandb'.
    logger_kwargs       = {},       # Extra options of the tracker (repo, project, experiment, tag).
    progress_bar        = None,     # tqdm bar over images; None = only when stderr is a terminal.
    loss_norm           = 'reference', # Divisor of the summed loss: 'reference' (RDM's) or 'edm'; see above.
    metrics_kwargs      = None,     # metrics.sweep.RunMetrics options (metrics, num, ref, detector, trust_detector), None = off.
    device              = None,     # None = torch_utils.distributed.get_device().
):
    # The arguments, for the tracker.
    config = json.loads(json.dumps({k: v for k, v in locals().items() if k not in ('progress_bar', 'device')}, default=str))
    start_time = time.time()
    device = torch.device(device) if device is not None else dist.get_device()
    world, rank = dist.get_world_size(), dist.get_rank()

    # Each rank's torch seed comes from numpy seeded with (seed, rank), EDM's derivation, so a
    # given --seed draws the same numbers. Full-precision matmuls and convolutions, as EDM trains.
    np.random.seed((seed * world + rank) % (1 << 31))
    torch.manual_seed(np.random.randint(1 << 31))
    cuda = torch.backends.cuda.matmul
    cuda.allow_tf32 = cuda.allow_fp16_reduced_precision_reduction = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = cudnn_benchmark

    batch_gpu, rounds = batch_split(batch_size, batch_gpu, world)
    divisors = dict(reference=reference_loss_divisor, edm=lambda _images: batch_size // world)
    if loss_norm not in divisors:
        raise dnnlib.UserError(f'Unknown loss normalisation "{loss_norm}"; choose one of {", ".join(divisors)}')

    # Dataset. The iterator is made before the network: it draws a seed from the global generator.
    dist.print0('Loading dataset...')
    dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    loader_kwargs = dict(data_loader_kwargs, pin_memory=data_loader_kwargs.get('pin_memory', False) and device.type == 'cuda')
    sampler = misc.InfiniteSampler(dataset=dataset, rank=rank, num_replicas=world, seed=seed)
    batches = iter(torch.utils.data.DataLoader(dataset=dataset, sampler=sampler, batch_size=batch_gpu, **loader_kwargs))

    # Network; its summary runs batch_gpu images through it, and that forward's dropout draws
    # from the training's stream as the reference's does.
    dist.print0('Constructing network...')
    net = dnnlib.util.construct_class_by_name(**network_kwargs, img_resolution=dataset.resolution,
                                              img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    net.train().requires_grad_(True).to(device)
    if rank == 0:
        with torch.no_grad():
            shape = [batch_gpu, net.img_channels, net.img_resolution, net.img_resolution]
            misc.print_module_summary(net, [torch.zeros(shape, device=device), torch.ones([batch_gpu], device=device),
                                            torch.zeros([batch_gpu, net.label_dim], device=device)])

    dist.print0('Setting up optimizer...')
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
    # bf16: autocast around the U-Net only (training.fast_mode's wrapper, sharing net's parameters);
    # augmentation, blur, noise, preconditioning and loss stay float32. fp16 is the network's
    # own use_fp16, the reference's way.
    train_net = fast_mode.prepare(net, fast_mode.FastSettings(precision='bf16')) if precision == 'bf16' else net
    ddp = _distributed(net, train_net, device) if world > 1 else train_net
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    power_emas = phema.PowerFunctionEMA(net, ema_std or [])  # No copies without ema_std.

    # Transfer learning or resume: rank 0 reads (and downloads) first, the others wait without
    # the process group's deadline, then read from the cache.
    cur_nimg = int(round(resume_kimg * 1000))
    if resume_pkl is not None:
        dist.print0(f'Loading network weights from "{resume_pkl}"...')
        dist.rank0_first(lambda: load_transfer_weights(resume_pkl, net, ema, partial=transfer_partial))
    if resume_state_dump:
        dist.print0(f'Loading training state from "{resume_state_dump}"...')
        cur_nimg = dist.rank0_first(lambda: load_training_state(resume_state_dump, net, ema, optimizer, loss_kwargs, power_emas))

    # What rank 0 writes besides snapshots: stats.jsonl, tracker, sample grids, progress bar.
    tracker = loggers.make_logger(logger if rank == 0 else None, run_dir, config=config, **logger_kwargs)
    grid = (sample_grid.SampleGrid(dataset, loss_kwargs, device=device, precision=precision, **sample_grid_kwargs)
            if rank == 0 and sample_grid_kwargs is not None and run_dir is not None else None)
    terminal = progress_bar or (progress_bar is None and sys.__stderr__ is not None and sys.__stderr__.isatty())
    pbar = tqdm.tqdm(total=int(total_kimg * 1000), initial=min(cur_nimg, int(total_kimg * 1000)), unit='img', unit_scale=True,
                     dynamic_ncols=True, leave=False, file=sys.__stderr__, disable=rank != 0 or not terminal)  # Not log.txt.

    # On every rank: the measurement is spread over them. The settings of a default evaluate.py sweep (--relay-from-data for a relay).
    run_metrics = metrics_sweep.RunMetrics(run_dir, **metrics_kwargs, dataset=dataset, loss_kwargs=loss_kwargs, device=device,
                                           ref_flag='--metrics-ref', stats=True) if metrics_kwargs else None

    dist.print0(f'Training for {total_kimg:g} kimg...\n')
    cur_tick = int(cur_nimg // (1000 * kimg_per_tick))
    tick_start_nimg, tick_start_time = cur_nimg, time.time()
    maintenance_time = tick_start_time - start_time
    if cur_nimg >= total_kimg * 1000:  # A finished run resumed: nothing to train, nothing to write.
        dist.print0(f'Already trained for {cur_nimg / 1000:g} kimg of {total_kimg:g}; nothing to do.')
    while cur_nimg < total_kimg * 1000:
        # Accumulate gradients over rounds; DDP all-reduces only in the last one.
        optimizer.zero_grad(set_to_none=True)
        for round_idx in range(rounds):
            with ddp.no_sync() if ddp is not train_net and round_idx < rounds - 1 else contextlib.nullcontext():
                images, labels = next(batches)
                images = images.to(device).to(torch.float32) / 127.5 - 1
                loss = loss_fn(net=ddp, images=images, labels=labels.to(device), augment_pipe=augment_pipe)
                training_stats.report('Loss/loss', loss)
                loss.sum().mul(loss_scaling / divisors[loss_norm](images)).backward()

        # Learning rate ramped up linearly over lr_rampup_kimg; non-finite gradients made finite.
        lr = optimizer_kwargs['lr'] * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
        for group in optimizer.param_groups:
            group['lr'] = lr
        for grad in (p.grad for p in net.parameters() if p.grad is not None):
            grad.nan_to_num_(nan=0, posinf=1e5, neginf=-1e5)
        optimizer.step()

        # EMA, its half-life ramping up over the first images (unless transferring).
        ema_halflife_nimg = ema_halflife_kimg * 1000
        if ema_rampup_ratio is not None:
            ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
        ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))

        # Once per tick (and at the end): status line, snapshots, stats.
        cur_nimg += batch_size
        power_emas.update(cur_nimg, batch_size)
        pbar.update(batch_size)
        done = cur_nimg >= total_kimg * 1000
        if not done and cur_tick != 0 and cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
            continue
        tick_end_time, line = _status_line(cur_tick, cur_nimg, start_time, tick_start_time, tick_start_nimg,
                                           maintenance_time, device)
        (dist.print0 if pbar.disable else pbar.write)(line)  # pbar.write keeps the bar intact; log.txt still gets the line.
        if snapshot_ticks is not None and (done or cur_tick % snapshot_ticks == 0):
            name = f'network-snapshot-{nimg_suffix(cur_nimg)}.pkl'
            power = {f'phema-{nimg_suffix(cur_nimg)}-{std:.3f}.pkl': power_ema for std, power_ema in power_emas.emas.items()}
            for file_name, snapshot_ema in {name: ema, **power}.items():
                save_network_snapshot(run_dir, file_name, snapshot_ema, loss_kwargs, augment_pipe, dataset_kwargs)
            if grid is not None:
                image = grid.write(ema, os.path.join(run_dir, f'samples-{nimg_suffix(cur_nimg)}.png'))
                tracker.log_image('samples', image, step=cur_nimg)
            if run_metrics is not None:
                run_metrics.measure(ema, loss_kwargs, name, cur_nimg / 1000)
        if state_dump_ticks is not None and (done or cur_tick % state_dump_ticks == 0) and cur_tick != 0:
            save_training_state(run_dir, cur_nimg, net, ema, optimizer, loss_kwargs, power_emas)
        stats = training_stats.collect()
        if rank == 0:
            with open(os.path.join(run_dir, 'stats.jsonl'), 'at') as f:
                f.write(json.dumps(dict(stats, timestamp=time.time())) + '\n')
            tracker.log(stats, step=cur_nimg)
        cur_tick += 1
        tick_start_nimg, tick_start_time = cur_nimg, time.time()
        maintenance_time = tick_start_time - tick_end_time

    pbar.close()
    tracker.close()
    dist.print0('\nExiting...')
    return dict(net=net, ema=ema, optimizer=optimizer, cur_nimg=cur_nimg, cur_tick=cur_tick)

#----------------------------------------------------------------------------
# Snapshot writers. Every rank takes part in the consistency check (it broadcasts); only
# rank 0 writes.

def _plain(value):
    """Options (EasyDicts of JSON values, as training_options.json holds them) as plain dicts and
    lists: data any EDM-family tree unpickles."""
    return json.loads(json.dumps(value))


def save_network_snapshot(run_dir, name, ema, loss_kwargs, augment_pipe, dataset_kwargs):
    misc.check_ddp_consistency(ema)
    if dist.get_rank() == 0:
        checkpoint.save_snapshot(os.path.join(run_dir, name), dict(ema=copy.deepcopy(ema).eval().requires_grad_(False).cpu(),
                                 loss_kwargs=_plain(loss_kwargs), augment_pipe=augment_pipe, dataset_kwargs=_plain(dataset_kwargs)))


def save_training_state(run_dir, cur_nimg, net, ema, optimizer, loss_kwargs, power_emas=None):
    # loss_kwargs records the stage, for --resume's check.
    if dist.get_rank() == 0:
        data = dict(net=net, ema=ema, optimizer_state=optimizer.state_dict(), step=cur_nimg, loss_kwargs=_plain(loss_kwargs))
        if power_emas is not None and power_emas.emas:
            data['phema'] = power_emas.emas
        checkpoint.save_training_state(os.path.join(run_dir, f'training-state-{nimg_suffix(cur_nimg)}.pt'), data)
