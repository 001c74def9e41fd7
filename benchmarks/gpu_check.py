"""Checks and times the CUDA paths of the project, in parts that fit the minutes of a lent GPU.

    python benchmarks/gpu_check.py --list                               # parts, rows, estimated times
    python benchmarks/gpu_check.py --part 1 --out=gpu_check              # one part: ~3 min on an H200
    python benchmarks/gpu_check.py --part all --out=gpu_check            # every part (~11 min)
    python benchmarks/gpu_check.py --device=cpu --smoke --part all       # tiny sizes on a CPU (tests/test_gpu_check.py)

Random weights, nothing downloaded. Each row runs in processes of its own, with a time limit: the
project's command lines as users type them (train.py, generate.py, evaluate.py, under torchrun
where users run them so), or a child of this script for what needs a look inside. As soon as a row
is done it prints one line (with the part's clock) and is merged into PREFIX.json and PREFIX.md,
so a part that is cut off keeps its finished rows, and a part run again replaces its rows.
Exit status 1 when a row failed. --smoke (tiny sizes, for the test suite) leaves out the rows whose
code another row runs, and gives torchrun's one process its environment without the launcher.

  part 1  the paths users run, on tiny networks: exact relay images CUDA vs CPU (SongUNet and
          DhariwalUNet; TF32 as the project sets it: off in exact mode, on in fast mode);
          train.py under torchrun with DistributedDataParallel forced on (one process posing as
          rank 0 of 2), gradient accumulation (--batch > --batch-gpu), two spawned data-loader
          workers with pinned memory, --fp16; a --resume of that run; a second stage under
          --precision=bf16 (augmentation, blur, noise and preconditioning float32, only the U-Net
          under bf16 autocast); generate.py under torchrun (CUDA generators) with the same PNGs
          at --batch=1 and --batch=8; evaluate.py activations under torchrun; evaluate.py calc
          (FID, sFID, IS, precision/recall) on CUDA vs on the CPU.
  part 2  train.py at the paper's sizes (ImageNet commands: adm, 64 px --batch-gpu=32 in fp32,
          --fp16 --ls=25 and bf16; 256 px blur --batch-gpu=8 in --fp16 --ls=1 and bf16, the
          precisions the paper's 256 px runs use), DDP forced, --grid=0: img/s per GPU, peak memory.
  part 3  sampling at the ImageNet preset's sizes and settings (fewer steps; img/s also
          extrapolated to the preset's steps): exact, fast fp16, fast bf16, fast + channels-last,
          each against exact (mean uint8 difference); evaluate activations throughput;
          fast + torch.compile of the 64 px network, in a child with its own time limit.
  part 4  fast + torch.compile of the 256 px network (a child with its own time limit).

Estimated times (seconds on one H200, printed by --list): a process start (python, torch, the
project, a CUDA context) counts START, torchrun TORCHRUN more, spawned loader workers WORKERS; the
work counts its FLOPs at a sustained rate per precision. FLOPs per image of one forward pass were
counted with torch.utils.flop_counter.FlopCounterMode on the meta device (ADM 64 px: 219 GFLOP,
ADM 256 px: 2,239 GFLOP; training = 3x a forward); the rates assume about half of the H200's
67 TFLOP/s in fp32 without TF32 and 30 % of its 989 TFLOP/s in fp16/bf16. Fixed costs (building
the networks on the CPU, cuDNN autotuning, the snapshots and states train.py writes at the end,
torch.compile) are guesses, named where they are used. The first GPU run will tell: replace
the guesses with its 'seconds' column.
"""

import argparse
import collections
import contextlib
import json
import math
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SCRIPT = os.path.abspath(__file__)

#----------------------------------------------------------------------------
# The time model of the estimates (see the docstring).

START, TORCHRUN, WORKERS = 10, 5, 5
TFLOPS = {'fp32': 35, 'fp16': 300, 'bf16': 300}
GFLOP = {64: 219, 256: 2239}


def work_seconds(images, res, precision, passes=1):
    return images * passes * GFLOP[res] / (TFLOPS[precision] * 1000)

#----------------------------------------------------------------------------
# Sizes and pass lines.

# The paper's networks as train.py --arch=adm builds them for the ImageNet commands
# (ADM's 64 px and 256 px settings, --cond=1, --dropout=0.1, augmentation on, --eff-attn=True).
PAPER_NETS = {
    'first': dict(img_resolution=64, model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3),
    'second': dict(img_resolution=256, model_channels=256, channel_mult=[1, 1, 2, 2, 4, 4], num_blocks=2),
}
PAPER_COMMON = dict(img_channels=3, label_dim=1000, model_type='DhariwalUNet', augment_dim=9, dropout=0.1, eff_attn=True,
                    use_fp16=True)
SMOKE_NETS = {'first': dict(img_resolution=8, model_channels=64, channel_mult=[1], num_blocks=1),
              'second': dict(img_resolution=32, model_channels=64, channel_mult=[1], num_blocks=1)}
SMOKE_COMMON = dict(PAPER_COMMON, label_dim=10)

# Tiny networks of part 1, by train.py options: 64 channels = one attention head (SDPA) per level.
TINY_ARCH = ['--arch=adm', '--cbase=64', '--blocks=1', '--eff-attn=True']
TINY_RES = {False: (16, 64), True: (8, 32)}       # (first, second) stage resolution; by smoke.
TINY_CRES = {False: '--cres=1,1', True: '--cres=1'}
TINY_CLASSES = 10

# Paper-size train rows: stage -> (resolution, --batch-gpu, precond options, --ls of the ImageNet command).
PAPER_TRAIN = {'first': (64, 32, ['--precond=edm'], 25),
               'second': (256, 8, ['--precond=blur', '--up-scale=4', '--block-scale=0.15', '--prob-length=0.93',
                                   '--blur-sigma-max=3.0'], 1)}
SMOKE_TRAIN = {'first': (8, 4, ['--precond=edm'], 25), 'second': (32, 2, PAPER_TRAIN['second'][2], 1)}
TRAIN_STEPS = 5  # Tick 0 = the first step (cuDNN autotuning); tick 1 = the other four, timed.

CONSISTENCY_TOL = 1e-3    # max |CUDA - CPU| in [-1, 1] units, exact relay, float32 networks.
FAST_MEAN_LEVELS = 3.0    # mean |fast - exact| in uint8 levels: precision noise is ~0.1-1, a broken path tens.
METRIC_RTOL = 1e-5        # FID / sFID / IS on CUDA vs CPU (float64 statistics); precision/recall must be equal.
SAMPLE_BATCH = 16

#----------------------------------------------------------------------------
# Running things.

class Failed(Exception):
    """A row's command or pass line failed; the message is the row's error."""


class Skipped(Exception):
    """A row that cannot run (what it needs failed earlier, or it is left out of --smoke)."""


def run(ctx, argv, timeout, torchrun=False, cpu=False):
    """Run a Python script with arguments (its own process group; killed at `timeout` or when this
    process is stopped); returns its output, raises Failed with the output's tail otherwise."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''), PYTHONUNBUFFERED='1')
    if torchrun and ctx.smoke and ctx.procs == 1:
        # --smoke: the variables torchrun gives its one process, without the launcher (a torch import less).
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        env.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', LOCAL_WORLD_SIZE='1', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    elif torchrun:
        argv = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={ctx.procs}'] + argv
    if cpu or ctx.device == 'cpu':
        env['CUDA_VISIBLE_DEVICES'] = ''  # Scripts that prefer CUDA stay on the CPU.
    proc = subprocess.Popen([sys.executable] + [str(a) for a in argv], cwd=ctx.work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise Failed(f'timeout after {timeout:.0f} s: {tail(proc.communicate()[0])}') from None
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # Stopped (Ctrl-C, `timeout`): no orphan keeps the GPU.
        raise
    if proc.returncode != 0:
        raise Failed(f'exit status {proc.returncode}: {tail(out)}')
    return out


def tail(text, lines=8):
    text = [line for line in (text or '').strip().splitlines() if line.strip()]
    return ' | '.join(text[-lines:])[-2000:]


def child(ctx, name, timeout, *extra):
    """This script's `--child=name` in a fresh process; returns what it wrote (a list of results)."""
    result = os.path.join(ctx.work, f'{name}-result.json')
    argv = [SCRIPT, f'--child={name}', f'--device={ctx.device}', f'--result={result}', *(['--smoke'] if ctx.smoke else []), *extra]
    run(ctx, argv, timeout)
    with open(result) as f:
        return json.load(f)


def row_timeout(ctx, est):
    # Three times the estimate, but never more than a part's 4 minutes: a hung row costs one part.
    return 240 if ctx.smoke else min(240, max(90, 3 * est))

#----------------------------------------------------------------------------
# train.py through a launcher that watches it: for every training forward (grad enabled, not on
# the meta device) of the preconditioner, the U-Net and DDP (global module hooks), and for the
# augmentation's output (AugmentPipe is not a module; its name is part of the snapshot format), it
# records the dtype, autocast and the TF32 flags; and DataLoader's options. With fake_world > 1 the
# project is told it has that many processes while its process group has one: train.py then wraps
# DDP and accumulates under no_sync as on a cluster (as rank 0 of 2, it trains on half of --batch).

WATCHED = ('EDMPrecond', 'DhariwalUNet', 'SongUNet', 'DistributedDataParallel')


def launch(record_path, fake_world, script, args):
    import torch
    from training import augment
    seen, loaders = collections.Counter(), []

    def note(name, x):
        kind = x.device.type
        autocast = str(torch.get_autocast_dtype(kind)).replace('torch.', '') if torch.is_autocast_enabled(kind) else None
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        seen[(name, str(x.dtype).replace('torch.', ''), autocast, tf32)] += 1

    def hook(module, inputs):
        x = next((t for t in inputs if torch.is_tensor(t)), None)
        if type(module).__name__ in WATCHED and torch.is_grad_enabled() and x is not None and x.device.type != 'meta':
            note(type(module).__name__, x)
    torch.nn.modules.module.register_module_forward_pre_hook(hook)

    augment_call = augment.AugmentPipe.__call__
    def watched_augment(self, images, *a, **kw):
        out = augment_call(self, images, *a, **kw)
        note('AugmentPipe', out[0])
        return out
    augment.AugmentPipe.__call__ = watched_augment

    loader_init = torch.utils.data.DataLoader.__init__
    def watched_init(self, *a, **kw):
        loaders.append(dict(num_workers=kw.get('num_workers', 0), pin_memory=kw.get('pin_memory', False)))
        loader_init(self, *a, **kw)
    torch.utils.data.DataLoader.__init__ = watched_init

    if fake_world > 1:
        from torch_utils import distributed
        distributed.get_world_size = lambda: fake_world
    sys.argv = [script] + args
    try:
        runpy.run_path(script, run_name='__main__')
    finally:
        if os.environ.get('RANK', '0') == '0':
            calls = [dict(module=m, dtype=d, autocast=a, tf32=list(t), calls=n) for (m, d, a, t), n in seen.items()]
            with open(record_path, 'w') as f:
                json.dump(dict(calls=calls, loaders=loaders), f)


def train(ctx, name, data, args, batch, steps, timeout, torchrun=True):
    """train.py `args` on `data` for `steps` steps of `batch` images under the launcher; tick 0 is
    the first step, tick 1 the others. Returns (run folder, stats.jsonl ticks, launcher record)."""
    outdir = os.path.join(ctx.work, name)
    record = outdir + '-record.json'
    fake = 2 if ctx.procs == 1 and torchrun else 0
    # Half an image of slack keeps float round-off in kimg from adding a step.
    timing = [f'--batch={batch}', f'--duration={(batch * steps - 0.5) / 1e6!r}', f'--tick={(batch * (steps - 1) - 0.5) / 1e3!r}']
    argv = [SCRIPT, '--launch', record, fake, os.path.join(REPO, 'train.py'), f'--outdir={outdir}', '--nosubdir', f'--data={data}',
            '--seed=0', '--snap=1', '--dump=1', '--grid=0', *timing, *args]
    run(ctx, argv, timeout, torchrun=torchrun)
    ticks = read_stats(outdir)
    with open(record) as f:
        return outdir, ticks, json.load(f)


def read_stats(run_dir):
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        ticks = [json.loads(line) for line in f if line.strip()]
    losses = [t['Loss/loss']['mean'] for t in ticks]
    if not ticks or not all(math.isfinite(v) for v in losses):
        raise Failed(f'loss not finite: {losses}')
    return ticks


def check_dtypes(ctx, record, precision, ddp_calls=None):
    """Problems with the training forwards the launcher saw: the preconditioner's input and the
    augmentation's output in full precision outside autocast, the U-Net as `precision` asks, TF32
    off, DDP called once per accumulation round."""
    cuda = ctx.device == 'cuda'
    unet = {'fp32': ('float32', None), 'fp16': ('float16' if cuda else 'float32', None), 'bf16': ('float32', 'bfloat16')}[precision]
    # The blur loss hands the preconditioner float64 (its sigma is float64, as in the reference).
    full = [('float32', None), ('float64', None)]
    expect = {'EDMPrecond': full, 'AugmentPipe': full[:1], 'DhariwalUNet': [unet], 'SongUNet': [unet]}
    problems = []
    for c in record['calls']:
        if c['module'] in expect and (c['dtype'], c['autocast']) not in expect[c['module']]:
            problems.append(f'{c["module"]} ran on {c["dtype"]} input, autocast {c["autocast"]}; expected {expect[c["module"]]}')
        if c['tf32'] != [False, False]:
            problems.append(f'{c["module"]} ran with TF32 matmul/cuDNN {c["tf32"]}; training turns both off')
    modules = {c['module'] for c in record['calls']}
    if 'EDMPrecond' not in modules or not modules & {'DhariwalUNet', 'SongUNet'}:
        problems.append(f'no training forward of the network was seen ({sorted(modules)})')
    if ddp_calls is not None:
        calls = sum(c['calls'] for c in record['calls'] if c['module'] == 'DistributedDataParallel')
        if calls != ddp_calls:
            problems.append(f'DistributedDataParallel ran {calls} forwards; expected {ddp_calls} (one per accumulation round)')
    if problems:
        raise Failed('; '.join(problems))
    return f'U-Net {unet[0]}{" under " + unet[1] + " autocast" if unet[1] else ""}, the rest full precision, TF32 off'


def latest(folder, prefix):
    names = sorted(n for n in os.listdir(folder) if n.startswith(prefix))
    if not names:
        raise Failed(f'no {prefix}* in {folder}')
    return os.path.join(folder, names[-1])


def make_pngs(folder, count, res, classes=None, seed=0):
    """`count` smooth random RGB images (upsampled 4x4 noise), with dataset.json labels when
    `classes` is given (image 0 has the last class, so that the dataset has `classes` classes)."""
    import numpy as np
    import PIL.Image
    if os.path.isdir(folder):
        return folder
    os.makedirs(folder + '.tmp', exist_ok=True)
    rng = np.random.RandomState(seed)
    names = [f'img{idx:05d}.png' for idx in range(count)]
    for name in names:
        base = PIL.Image.fromarray(rng.randint(0, 256, size=[4, 4, 3]).astype(np.uint8))
        base.resize([res, res], PIL.Image.BILINEAR).save(os.path.join(folder + '.tmp', name))
    if classes is not None:
        with open(os.path.join(folder + '.tmp', 'dataset.json'), 'w') as f:
            json.dump({'labels': [[n, (classes - 1 - i) % classes] for i, n in enumerate(names)]}, f)
    os.rename(folder + '.tmp', folder)
    return folder


def make_detector(path, resolution):
    """A pytorch-fid style Inception-v3 state dict with random weights (scaled so activations stay
    O(1)); `resolution` below 299 resizes to that size instead (faster, for smoke runs)."""
    import torch
    from metrics.inception import InceptionV3
    if not os.path.isfile(path):
        torch.manual_seed(1)
        net = InceptionV3(resolution=resolution)
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
        torch.save(dict(net.state_dict(), resolution=torch.tensor(resolution)), path)
    return path

#----------------------------------------------------------------------------
# Part 1: the paths users run, on tiny networks.

def row_consistency(ctx, est):
    return child(ctx, 'consistency', row_timeout(ctx, est))


def tiny_data(ctx, stage):
    res = TINY_RES[ctx.smoke][stage == 'second']
    return make_pngs(os.path.join(ctx.work, f'data-{res}'), 32, res, classes=TINY_CLASSES)


def tiny_train_args(ctx, workers):
    return TINY_ARCH + [TINY_CRES[ctx.smoke], '--cond=1', f'--workers={workers}', '--batch-gpu=4']


def row_train_ddp(ctx, est):
    workers = 1 if ctx.smoke else 2
    args = tiny_train_args(ctx, workers) + ['--precond=edm', '--fp16=1', '--ls=25']
    outdir, ticks, record = train(ctx, 'train-ddp', tiny_data(ctx, 'first'), args, batch=16, steps=3, timeout=row_timeout(ctx, est))
    rounds = 16 // max(ctx.procs, 2) // 4
    check = check_dtypes(ctx, record, 'fp16', ddp_calls=3 * rounds)
    wanted = dict(num_workers=workers, pin_memory=ctx.device == 'cuda')
    if record['loaders'] != [wanted]:
        raise Failed(f'data loaders {record["loaders"]}; expected [{wanted}]')
    ctx.ddp_run = outdir
    latest(outdir, 'training-state-')
    return dict(check=f'loss {ticks[-1]["Loss/loss"]["mean"]:.4g} finite; DDP {3 * rounds} forwards ({rounds} rounds x 3 steps); '
                      f'{workers} workers, pinned {wanted["pin_memory"]}; {check}',
                note=f'{ctx.procs} process(es)' + (', DDP forced (posing as rank 0 of 2)' if ctx.procs == 1 else ''))


def row_train_resume(ctx, est):
    if not getattr(ctx, 'ddp_run', None):
        raise Skipped('needs train-ddp')
    outdir = os.path.join(ctx.work, 'train-resume')
    args = tiny_train_args(ctx, 0 if ctx.smoke else 1) + ['--precond=edm', '--fp16=1', '--ls=25', f'--outdir={outdir}', '--nosubdir', '--seed=0',
                                      f'--data={tiny_data(ctx, "first")}', f'--resume={ctx.ddp_run}', '--batch=16', '--grid=0',
                                      f'--duration={(16 * 5 - 0.5) / 1e6!r}', f'--tick={(16 * 2 - 0.5) / 1e3!r}']
    run(ctx, [os.path.join(REPO, 'train.py')] + args, row_timeout(ctx, est))
    kimg = [t['Progress/kimg']['mean'] for t in read_stats(outdir)]
    if not (kimg[0] > 0.048 - 1e-6 and abs(kimg[-1] - 0.080) < 1e-6):
        raise Failed(f'resumed at 0.048 kimg for 2 more steps, but the ticks report kimg {kimg}')
    ctx.first_snapshot = latest(outdir, 'network-snapshot-')
    return dict(check=f'continued from 0.048 kimg to {kimg[-1]:.3f} (ticks {", ".join(f"{k:.3f}" for k in kimg)}), loss finite')


def row_train_bf16(ctx, est):
    args = tiny_train_args(ctx, 0 if ctx.smoke else 1) + PAPER_TRAIN['second'][2] + ['--precision=bf16']
    outdir, ticks, record = train(ctx, 'train-bf16', tiny_data(ctx, 'second'), args, batch=8, steps=3,
                                  timeout=row_timeout(ctx, est), torchrun=False)
    check = check_dtypes(ctx, record, 'bf16')
    if not any(c['module'] == 'AugmentPipe' for c in record['calls']):
        raise Failed('the augmentation never ran')
    ctx.second_snapshot = latest(outdir, 'network-snapshot-')
    return dict(check=f'loss {ticks[-1]["Loss/loss"]["mean"]:.4g} finite; augmentation ran; {check}')


def generate(ctx, name, batch, est, torchrun):
    if not (getattr(ctx, 'first_snapshot', None) and getattr(ctx, 'second_snapshot', None)):
        raise Skipped('needs train-resume and train-bf16')
    outdir = os.path.join(ctx.work, name)
    steps = 4 if ctx.smoke else 12
    run(ctx, [os.path.join(REPO, 'generate.py'), f'--outdir={outdir}', '--seeds=0-7', f'--batch={batch}', '--cfg_scale_second=2',
              f'--network_first={ctx.first_snapshot}', f'--network_second={ctx.second_snapshot}', f'--num_steps_first={steps}',
              f'--num_steps_second={steps}'], row_timeout(ctx, est), torchrun=torchrun)
    return read_pngs(outdir)


def read_pngs(folder):
    import numpy as np
    import PIL.Image
    paths = sorted(os.path.join(root, n) for root, _dirs, names in os.walk(folder) for n in names if n.endswith('.png'))
    return {os.path.relpath(p, folder): np.asarray(PIL.Image.open(p), dtype=np.int16) for p in paths}


def row_generate_torchrun(ctx, est):
    images = generate(ctx, 'gen-batch8', 8, est, torchrun=True)
    res = TINY_RES[ctx.smoke][1]
    if len(images) != 8 or any(img.shape != (res, res, 3) for img in images.values()):
        raise Failed(f'expected 8 PNGs of {res}x{res}, found {[img.shape for img in images.values()]}')
    ctx.gen8 = images
    return dict(check=f'8 PNGs of {res} px (exact mode, guidance 2)')


def row_generate_batch1(ctx, est):
    if not getattr(ctx, 'gen8', None):
        raise Skipped('needs generate-torchrun')
    images = generate(ctx, 'gen-batch1', 1, est, torchrun=False)
    if images.keys() != ctx.gen8.keys():
        raise Failed(f'other files: {sorted(images)} vs {sorted(ctx.gen8)}')
    diff = max(int(abs(images[k] - ctx.gen8[k]).max()) for k in images)
    count = sum(int((images[k] != ctx.gen8[k]).sum()) for k in images)
    if count:
        raise Failed(f'{count} values differ between --batch=1 and --batch=8, by up to {diff} levels')
    return dict(check='the 8 PNGs of --batch=1 equal those of --batch=8 (torchrun) bit for bit')


def row_activations(ctx, est):
    if not getattr(ctx, 'gen8', None):
        raise Skipped('needs generate-torchrun')
    import numpy as np
    det = make_detector(os.path.join(ctx.work, 'inception-random.pth'), 75 if ctx.smoke else 299)
    workers = 0 if ctx.smoke else 2
    # The reference: the second stage's data and the samples themselves, so that every sample lies
    # in the reference's manifold (precision 1) and the recall is not trivially 0.
    ref = os.path.join(ctx.work, 'ref-images')
    shutil.copytree(tiny_data(ctx, 'second'), ref, dirs_exist_ok=True)
    shutil.copytree(os.path.join(ctx.work, 'gen-batch8'), os.path.join(ref, 'samples'), dirs_exist_ok=True)
    for data, dest, torchrun in [(os.path.join(ctx.work, 'gen-batch8'), 'sample.npz', True), (ref, 'ref.npz', False)]:
        run(ctx, [os.path.join(REPO, 'evaluate.py'), 'activations', f'--data={data}', f'--dest={os.path.join(ctx.work, dest)}',
                  f'--detector={det}', '--batch=4', f'--workers={workers}'], row_timeout(ctx, est) / 2, torchrun=torchrun)
    with np.load(os.path.join(ctx.work, 'sample.npz')) as f:
        shapes = {k: f[k].shape for k in f.files}
        finite = all(np.isfinite(f[k]).all() for k in f.files)
    if shapes.get('feat') != (8, 2048) or not finite:
        raise Failed(f'sample activations {shapes}, finite {finite}')
    ctx.activations = True
    return dict(check=f'sample (torchrun) {shapes["feat"]} feat, reference (1 process) of 40 images; finite')


def row_calc(ctx, est):
    if not getattr(ctx, 'activations', None):
        raise Skipped('needs activations')
    values = {}
    # --smoke leaves sFID out: the same code as FID, and seconds of 2023-d eigendecompositions on a CPU.
    names = ['FID'] + ['sFID'] * (not ctx.smoke) + ['Inception Score', 'Precision', 'Recall']
    metrics = ['-m', 'fid'] + ['-m', 'sfid'] * (not ctx.smoke) + ['-m', 'is', '-m', 'pr']
    for where, torchrun, cpu in [('device', True, False), ('cpu', False, True)]:
        if where == 'cpu' and ctx.device == 'cpu':
            values['cpu'] = values['device']  # Nothing to compare with; the comparison still runs.
            continue
        path = os.path.join(ctx.work, f'calc-{where}.json')
        run(ctx, [os.path.join(REPO, 'evaluate.py'), 'calc', *metrics,
                  f'--activations_sample={os.path.join(ctx.work, "sample.npz")}', f'--ref={os.path.join(ctx.work, "ref.npz")}',
                  f'--json={path}'], row_timeout(ctx, est) / 2, torchrun=torchrun, cpu=cpu)
        with open(path) as f:
            values[where] = json.load(f)
    dev, cpu = values['device'], values['cpu']
    bad = [n for n in names if not math.isfinite(dev[n]) or not (
        dev[n] == cpu[n] if n in ('Precision', 'Recall') else abs(dev[n] - cpu[n]) <= METRIC_RTOL * max(abs(cpu[n]), 1))]
    text = ', '.join(f'{n} {dev[n]:.6g}' + ('' if dev[n] == cpu[n] else f' vs {cpu[n]:.6g}') for n in names)
    if bad:
        raise Failed(f'{ctx.device} vs cpu differ in {", ".join(bad)}: {text}')
    if dev['Precision'] != 1 or not 0 < dev['Recall'] < 1:
        raise Failed(f'the samples are part of the reference, so precision must be 1 and recall in (0, 1): {text}')
    return dict(check=f'{ctx.device} (torchrun) = cpu: {text}')

#----------------------------------------------------------------------------
# Part 2: train.py at the paper's sizes.

def row_train_paper(stage, precision):
    def row(ctx, est):
        res, batch_gpu, precond, ls = (SMOKE_TRAIN if ctx.smoke else PAPER_TRAIN)[stage]
        data = make_pngs(os.path.join(ctx.work, f'paper-data-{res}'), 4 * batch_gpu, res, classes=(TINY_CLASSES if ctx.smoke else 1000))
        flags = {'fp32': [], 'fp16': ['--fp16=1', f'--ls={ls}'], 'bf16': ['--precision=bf16']}[precision]
        arch = ['--arch=adm', '--eff-attn=True'] + (['--cbase=64', '--cres=1', '--blocks=1'] if ctx.smoke else [])
        args = arch + precond + flags + ['--cond=1', '--dropout=0.1', f'--batch-gpu={batch_gpu}', f'--workers={0 if ctx.smoke else 1}']
        # Two accumulation rounds per process; the batch counts both (posed) processes.
        per_process = 2 * batch_gpu
        try:
            outdir, ticks, record = train(ctx, f'train-{stage}-{precision}', data, args, batch=per_process * max(ctx.procs, 2),
                                          steps=TRAIN_STEPS, timeout=row_timeout(ctx, est))
            check = check_dtypes(ctx, record, precision, ddp_calls=TRAIN_STEPS * 2)
        finally:
            shutil.rmtree(os.path.join(ctx.work, f'train-{stage}-{precision}'), ignore_errors=True)  # GBs of snapshots.
        img_s = 1000 / ticks[-1]['Timing/sec_per_kimg']['mean'] / max(ctx.procs, 2)  # kimg counts every (posed) process.
        peak = max(t['Resources/peak_gpu_mem_gb']['mean'] for t in ticks)
        return dict(img_s=img_s, peak_gib=peak or None, check=f'loss {ticks[-1]["Loss/loss"]["mean"]:.4g} finite; {check}',
                    note=f'{TRAIN_STEPS} steps of {per_process} images per GPU (--batch-gpu={batch_gpu}, 2 rounds), '
                         f'timed after the first; DDP ({ctx.procs} process{"es" if ctx.procs > 1 else ", forced"})')
    return row

#----------------------------------------------------------------------------
# Parts 3 and 4: sampling, activations, compilation (children).

def row_sample(stage):
    def row(ctx, est):
        return child(ctx, 'sample', row_timeout(ctx, est), f'--stage={stage}')
    return row


def row_compile(stage):
    def row(ctx, est):
        return child(ctx, 'compile', row_timeout(ctx, est), f'--stage={stage}')
    return row


def row_evaluate_speed(ctx, est):
    return child(ctx, 'evaluate-speed', row_timeout(ctx, est))

#----------------------------------------------------------------------------
# The parts: (title, rows); a row is (id, function, estimated seconds, smoke: runs under --smoke).

Row = collections.namedtuple('Row', 'id run est smoke what')


def _train_est(stage, precision):
    res = PAPER_TRAIN[stage][0]
    fixed = 17 if res == 64 else 27  # Build + meta check 3/5 s, autotuning 8/10 s, 2 snapshots + 1 state 6/12 s.
    images = TRAIN_STEPS * 2 * PAPER_TRAIN[stage][1]
    return round(START + TORCHRUN + fixed + work_seconds(images, res, precision, passes=3))


def _sample_est(stage):
    # 4 modes, each run twice (warm-up, timed): first 6 Heun steps = 11 evaluations; second 4
    # levels = 7 evaluations, twice for guidance; 2 s of first-call overhead per mode.
    res, evals, passes = (64, 11, 1) if stage == 'first' else (256, 7, 2)
    return round(START + 3 + 4 * (2 + 2 * work_seconds(SAMPLE_BATCH * evals, res, 'fp16', passes)))


PARTS = {
    1: ('the paths users run, on tiny networks', [
        Row('consistency', row_consistency, START + 5, True, 'exact relay CUDA vs CPU, SongUNet + DhariwalUNet; TF32 flags'),
        Row('train-ddp', row_train_ddp, START + TORCHRUN + WORKERS + 3, True,
            'train.py, torchrun, DDP forced, --batch=16 --batch-gpu=4, 2 workers, pinned, --fp16'),
        Row('train-resume', row_train_resume, START + WORKERS + 3, True, 'train.py --resume of train-ddp for 2 more steps'),
        Row('train-bf16', row_train_bf16, START + WORKERS + 3, True, 'train.py second stage, --precision=bf16: dtypes seen'),
        Row('generate-torchrun', row_generate_torchrun, START + TORCHRUN + 3, True, 'generate.py under torchrun, --batch=8'),
        Row('generate-batch1', row_generate_batch1, START + 4, True, 'generate.py --batch=1: the same PNGs'),
        Row('activations', row_activations, 2 * START + TORCHRUN + 2 * WORKERS + 3, True,
            'evaluate.py activations: torchrun (samples), 1 process (reference)'),
        Row('calc', row_calc, 2 * START + TORCHRUN, True, 'evaluate.py calc on CUDA (torchrun) vs on the CPU'),
    ]),
    2: ('train.py at the paper\'s sizes', [
        Row('train-64-fp32', row_train_paper('first', 'fp32'), _train_est('first', 'fp32'), False, 'first stage 64 px fp32'),
        Row('train-64-fp16', row_train_paper('first', 'fp16'), _train_est('first', 'fp16'), False, 'first stage 64 px --fp16 --ls=25'),
        Row('train-64-bf16', row_train_paper('first', 'bf16'), _train_est('first', 'bf16'), False, 'first stage 64 px bf16'),
        Row('train-256-fp16', row_train_paper('second', 'fp16'), _train_est('second', 'fp16'), True, 'second stage 256 px --fp16 --ls=1'),
        Row('train-256-bf16', row_train_paper('second', 'bf16'), _train_est('second', 'bf16'), False, 'second stage 256 px bf16'),
    ]),
    3: ('sampling and activations at the paper\'s sizes; torch.compile at 64 px', [
        Row('sample-first', row_sample('first'), _sample_est('first'), True, '64 px: exact, fast fp16/bf16, channels-last'),
        Row('sample-second', row_sample('second'), _sample_est('second'), True, '256 px: exact, fast fp16/bf16, channels-last'),
        Row('evaluate-speed', row_evaluate_speed, START + WORKERS + 5, True, 'activations of 1024 PNGs, 3 workers'),
        Row('compile-first', row_compile('first'), START + 90, False, '64 px fast + torch.compile (compile ~90 s, a guess)'),
    ]),
    4: ('torch.compile at 256 px', [
        Row('compile-second', row_compile('second'), START + 140, True, '256 px fast + torch.compile (compile ~140 s, a guess)'),
    ]),
}
ORDER = {(part, row.id): idx for part, (_title, rows) in PARTS.items() for idx, row in enumerate(rows)}

#----------------------------------------------------------------------------
# Children: what needs a look inside, each in a process of its own.

def _randomize(net, seed, scale=0.02):
    # Freshly built networks have zero-initialised output layers (EDM), so the denoiser would be
    # the identity; a small perturbation of every parameter makes every layer count.
    import torch
    gen = torch.Generator(next(net.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) * scale)
    return net.eval().requires_grad_(False)


def _sync(device):
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def child_consistency(args):
    """The exact relay (RelayPipeline, as generate.py runs it) on the device vs on the CPU, with
    the same noise (drawn on the CPU), for SongUNet and DhariwalUNet; and the TF32 flags exact and
    fast mode set (the project's own settings, nothing set here)."""
    import torch
    from training import fast_mode, networks, pipeline, sampling
    device = torch.device(args.device)

    class CpuNoise(sampling.StackedRandomGenerator):
        def __init__(self, _device, seeds):
            super().__init__(torch.device('cpu'), seeds)

        def randn(self, size, device=None, **kwargs):
            return super().randn(size, **kwargs).to(device)
    sampling.StackedRandomGenerator = CpuNoise

    unets = {'SongUNet': dict(model_channels=32), 'DhariwalUNet': dict(model_channels=64)}
    steps = dict(num_steps_first=3, num_steps_second=6) if args.smoke else dict(num_steps_first=8, num_steps_second=12)
    seeds, results, flags = [0, 1, 2, 3], [], {}
    for model_type, kw in unets.items():
        torch.manual_seed(0)
        nets = [_randomize(networks.EDMPrecond(img_resolution=res, img_channels=3, label_dim=3, model_type=model_type, channel_mult=[1, 1],
                                               num_blocks=1, attn_resolutions=[8, 16], dropout=0, eff_attn=True, **kw), seed, 0.05)
                for seed, res in ((1, 8), (2, 32))]
        images = []
        for dev in (torch.device('cpu'), device):
            pipe = pipeline.RelayPipeline(*nets, device=dev, warn=False, cfg_scale_second=2, **steps)
            flags['exact'] = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            images.append(pipe.sample(seeds).cpu())
        diff = float((images[0] - images[1]).abs().max())
        ok = math.isfinite(diff) and diff <= CONSISTENCY_TOL
        results.append(dict(sub=model_type, status='ok' if ok else 'FAILED', check=f'max |{device.type} - cpu| {diff:.2e} (limit {CONSISTENCY_TOL:g})'))

    # Fast mode: TF32 on inside the network call only.
    fast = pipeline.RelayPipeline(*nets, device=device, warn=False, fast=fast_mode.settings_from_options(fast=True), **steps)
    seen = []
    nets[0].model.register_forward_pre_hook(lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
    fast.sample(seeds, stages='first')
    flags['fast'], flags['after'] = seen[0], (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    ok = flags == dict(exact=(False, False), fast=(True, True), after=(False, False))
    text = ', '.join(f'{k} {"/".join("on" if f else "off" for f in v)}' for k, v in flags.items())
    results.append(dict(sub='tf32', status='ok' if ok else 'FAILED', check=f'TF32 matmul/cuDNN: {text} (expected off, on, off)'))
    return results


def _sampling_setup(args, stage):
    """(sampler(settings) -> a function that samples one batch with one pipeline, evaluations per
    run, per run of the preset's steps, note)."""
    import torch
    from training import networks, pipeline, sampling
    device = torch.device(args.device)
    spec = dict(**(SMOKE_COMMON if args.smoke else PAPER_COMMON), **(SMOKE_NETS if args.smoke else PAPER_NETS)[stage])
    torch.manual_seed(0)
    with torch.device(device):  # Initialised where it runs: seconds instead of a minute on the CPU.
        net = _randomize(networks.EDMPrecond(**spec), seed=1)
    batch = 2 if args.smoke else SAMPLE_BATCH
    seeds = list(range(batch))
    preset = pipeline.resolve_options('imagenet')[0]
    if stage == 'first':
        steps, full = (2 if args.smoke else 6), preset['num_steps_first']
        evals, full_evals = 2 * steps - 1, 2 * full - 1  # Heun: no correction in the last step.
        def sampler(fast):
            pipe = pipeline.RelayPipeline(net, None, preset='imagenet', device=device, warn=False, fast=fast, num_steps_first=steps)
            return lambda: pipe.sample(seeds, stages='first')
    else:
        kw = pipeline.stage_kwargs(preset)[1]
        levels = lambda n: len(sampling.blur_time_steps(net, n, kw['sigma_min'], kw['sigma_max'], kw['rho'], kw['truncation_sigma']))  # noqa: E731
        steps = next(n for n in range(2, kw['num_steps'] + 1) if levels(n) >= (1 if args.smoke else 4))
        evals, full_evals = 2 * levels(steps) - 1, 2 * levels(kw['num_steps']) - 1
        gen = torch.Generator().manual_seed(2)
        low = torch.randint(0, 256, [batch, 3, spec['img_resolution'] // 4, spec['img_resolution'] // 4], generator=gen, dtype=torch.uint8)
        def sampler(fast):
            pipe = pipeline.RelayPipeline(None, net, preset='imagenet', device=device, warn=False, fast=fast, num_steps_second=steps)
            return lambda: pipe.sample(seeds, first_images=low, stages='second', second_noise='fresh')
    params = sum(p.numel() for p in net.parameters()) / 1e6
    note = f'{evals} of the preset\'s {full_evals} evaluations, batch {batch}, {params:.0f}M parameters, random weights'
    return sampler, evals, full_evals, note


def _timed(args, sample, repeats=2):
    """Run `repeats` times (the first warms up); (images, seconds of the last, peak GiB)."""
    import torch
    device = torch.device(args.device)
    for i in range(repeats):
        if i == repeats - 1 and device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        images = sample()
        _sync(device)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None
    if not bool(torch.isfinite(images).all()):
        raise Failed('non-finite images')
    return images, seconds, peak


def _levels(images, reference):
    from training import pipeline
    diff = (pipeline.to_uint8(images).cpu().int() - pipeline.to_uint8(reference).cpu().int()).abs()
    return int(diff.max()), float(diff.float().mean())


def child_sample(args):
    from training import fast_mode
    sampler, evals, full_evals, note = _sampling_setup(args, args.stage)
    modes = [('exact', fast_mode.EXACT), ('fast fp16', fast_mode.settings_from_options(fast=True)),
             ('fast bf16', fast_mode.settings_from_options(fast=True, precision='bf16')),
             ('fast channels-last', fast_mode.settings_from_options(fast=True, channels_last=True))]
    results, reference = [], None
    batch = 2 if args.smoke else SAMPLE_BATCH
    for name, settings in modes:
        result = dict(sub=name, note=note)
        try:
            images, seconds, peak = _timed(args, sampler(settings))
            result.update(img_s=batch / seconds, img_s_preset=batch / (seconds * full_evals / evals), peak_gib=peak)
            if reference is None:
                reference, result['check'] = images, 'reference (the networks\' own precision: use_fp16 on CUDA)'
            else:
                top, mean = _levels(images, reference)
                result['check'] = f'vs exact: mean {mean:.3f} levels (limit {FAST_MEAN_LEVELS:g}), max {top}'
                result['status'] = 'ok' if mean <= FAST_MEAN_LEVELS else 'FAILED'
        except Exception as err:  # pylint: disable=broad-exception-caught
            result.update(status='FAILED', error=f'{type(err).__name__}: {err}')
        results.append(result)
    return results


def child_compile(args):
    """Fast fp16 vs fast fp16 + torch.compile (inductor; the eager backend in --smoke, which only
    traces): compile time, img/s, speed-up, pixel difference; a fallback to eager fails the row."""
    import dataclasses
    import warnings
    from training import fast_mode
    sampler, evals, full_evals, note = _sampling_setup(args, args.stage)
    batch = 2 if args.smoke else SAMPLE_BATCH
    plain = fast_mode.settings_from_options(fast=True)
    compiled = dataclasses.replace(fast_mode.settings_from_options(fast=True, compile=True),
                                   compile_backend='eager' if args.smoke else 'inductor')
    reference, plain_s, _ = _timed(args, sampler(plain))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        start = time.perf_counter()
        images, seconds, peak = _timed(args, sampler(compiled), repeats=3)  # Compiles in the first run.
        first = time.perf_counter() - start - 2 * seconds
    fallback = [str(w.message) for w in caught if 'torch.compile failed' in str(w.message)]
    top, mean = _levels(images, reference)
    ok = not fallback and mean <= FAST_MEAN_LEVELS
    return [dict(sub=f'{compiled.compile_backend}', status='ok' if ok else 'FAILED', img_s=batch / seconds, peak_gib=peak,
                 img_s_preset=batch / (seconds * full_evals / evals),
                 check=f'{plain_s / seconds:.2f}x uncompiled fast; vs uncompiled: mean {mean:.3f} levels, max {top}',
                 error=fallback[0] if fallback else None, note=f'first run (compilation) {first:.0f} s; {note}')]


def child_evaluate_speed(args):
    import torch
    from metrics.activations import compute_activations, open_images
    from metrics.detector import load_detector
    device = torch.device(args.device)
    count, res = (8, 32) if args.smoke else (1024, 256)
    workdir = os.path.dirname(args.result)
    det_path = make_detector(os.path.join(workdir, f'inception-random-{75 if args.smoke else 299}.pth'), 75 if args.smoke else 299)
    source = open_images(make_pngs(os.path.join(workdir, f'eval-{count}x{res}'), count, res))
    det = load_detector(det_path, device=device, verbose=False)
    det(torch.as_tensor(source[0][0])[None].repeat(64, 1, 1, 1))  # Warm-up.
    workers = 1 if args.smoke else 3
    _sync(device)
    start = time.perf_counter()
    out = compute_activations(source, [det], batch_size=64, num_workers=workers, progress=False)
    _sync(device)
    seconds = time.perf_counter() - start
    finite = all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in out.values())
    ok = tuple(out['feat'].shape) == (count, 2048) and finite
    return [dict(status='ok' if ok else 'FAILED', img_s=count / seconds,
                 check=f'feat {tuple(out["feat"].shape)}, finite {finite}',
                 note=f'{count} PNGs of {res} px, Inception at {75 if args.smoke else 299} px, batch 64, {workers} loader workers')]


CHILDREN = {'consistency': child_consistency, 'sample': child_sample, 'compile': child_compile, 'evaluate-speed': child_evaluate_speed}

#----------------------------------------------------------------------------
# Results: PREFIX.json holds every row measured so far (one per part and id, the newest); the
# markdown table is made from it. Both are rewritten, atomically, after every row.

COLUMNS = ['part', 'row', 'status', 'img/s', 'img/s preset', 'peak GiB', 'check', 's (est.)', 'device']


def _fmt(value, spec):
    return '-' if value is None else format(value, spec)


def _cells(r):
    return [str(r['part']), r['id'], r['status'], _fmt(r.get('img_s'), '.2f'), _fmt(r.get('img_s_preset'), '.3f'),
            _fmt(r.get('peak_gib'), '.2f'), r.get('check') or '', f'{_fmt(r.get("seconds"), ".1f")} ({r.get("est", "-")})',
            r.get('device', '')]


def markdown(rows):
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + ' --- |' * len(COLUMNS)]
    lines += ['| ' + ' | '.join(c.replace('|', '/') for c in _cells(r)) + ' |' for r in rows]
    lines += [f'\n- **{r["part"]} {r["id"]}** failed: `{r["error"]}`' for r in rows if r.get('error')]
    notes = [f'- {r["part"]} {r["id"]}: {r["note"]}' for r in rows if r.get('note')]
    return '\n'.join(lines + (['', 'Notes:'] + notes if notes else [])) + '\n'


def save(prefix, result):
    """Merge `result` into PREFIX.json (replacing the row of the same part and id) and rewrite
    PREFIX.md; returns every row."""
    import dnnlib.util
    rows = []
    if os.path.isfile(prefix + '.json'):
        with open(prefix + '.json') as f:
            rows = json.load(f)['rows']
    rows = [r for r in rows if (r['part'], r['id']) != (result['part'], result['id'])] + [result]
    rows.sort(key=lambda r: (r['part'], ORDER.get((r['part'], r['id'].split('/')[0]), 1e9), r.get('sub_index', 0)))
    with dnnlib.util.atomic_write(prefix + '.json', 'w') as f:
        json.dump(dict(rows=rows), f, indent=1)
    with dnnlib.util.atomic_write(prefix + '.md', 'w') as f:
        f.write(markdown(rows))
    return rows

#----------------------------------------------------------------------------
# Main.

def run_part(ctx, part):
    title, rows = PARTS[part]
    print(f'part {part}: {title}; estimated {sum(r.est for r in rows)} s on an H200', flush=True)
    started, failed = time.perf_counter(), 0
    for row in rows:
        start = time.perf_counter()
        try:
            if ctx.smoke and not row.smoke:
                raise Skipped('the same code as a row that --smoke runs')
            results = row.run(ctx, row.est)
            results = results if isinstance(results, list) else [results]
        except (Failed, Skipped) as err:
            results = [dict(status='FAILED' if isinstance(err, Failed) else 'skipped', error=str(err) if isinstance(err, Failed) else None,
                            check=None if isinstance(err, Failed) else str(err))]
        except Exception as err:  # pylint: disable=broad-exception-caught  # A defect of this script: one row, not the part.
            traceback.print_exc()
            results = [dict(status='FAILED', error=f'{type(err).__name__}: {err}')]
        seconds = time.perf_counter() - start
        for idx, res in enumerate(results):
            sub = res.pop('sub', None)
            res = dict(dict(status='ok', seconds=seconds), **{k: v for k, v in res.items() if v is not None})
            res.update(part=part, id=row.id + (f'/{sub}' if sub else ''), sub_index=idx, est=row.est, device=ctx.device_name,
                       torch=ctx.torch_version, when=time.strftime('%Y-%m-%d %H:%M'))
            failed += res['status'] == 'FAILED'
            print(f'[{time.perf_counter() - started:6.1f} s] {part} {res["id"]:<26} {res["status"]:<7} '
                  f'{res["seconds"]:6.1f} s (est. {row.est:3d})  {res.get("check", "")}', flush=True)
            if res.get('error'):
                print(f'    error: {res["error"]}', flush=True)
            if ctx.out:
                save(ctx.out, res)
    return failed


def list_parts():
    for part, (title, rows) in PARTS.items():
        print(f'part {part}  ~{sum(r.est for r in rows)} s  {title}')
        for row in rows:
            print(f'    {row.id:<18} {row.est:4d} s  {row.what}')
    print(f'all parts ~{sum(r.est for _t, rows in PARTS.values() for r in rows)} s (estimates for one H200; see the docstring)')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Check and time the CUDA paths of the project, part by part (see --list).')
    p.add_argument('--part', choices=[str(n) for n in PARTS] + ['all'], help='Which part to run (or all)')
    p.add_argument('--list', action='store_true', help='Print the parts, their rows and estimated times, and exit')
    p.add_argument('--device', choices=['cuda', 'cpu'], default='cuda', help='Device to check (default: cuda)')
    p.add_argument('--smoke', action='store_true', help='Tiny networks and sizes: checks that the script works (a CPU is enough)')
    p.add_argument('--out', metavar='PREFIX', help='Merge the rows into PREFIX.json and PREFIX.md as each finishes')
    p.add_argument('--workdir', metavar='DIR', help='Scratch folder (default: a new temporary folder, removed at the end)')
    p.add_argument('--child', help=argparse.SUPPRESS)
    p.add_argument('--result', help=argparse.SUPPRESS)
    p.add_argument('--stage', choices=['first', 'second'], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.list and not args.part and not args.child:
        p.error('give --part N (or all), or --list')
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--launch']:
        return launch(argv[1], int(argv[2]), argv[3], argv[4:])
    args = parse_args(argv)
    if args.list:
        return list_parts()
    if args.child:
        with open(args.result, 'w') as f:
            json.dump(CHILDREN[args.child](args), f)
        return 0

    import torch
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); use --device=cpu --smoke for a CPU run',
              file=sys.stderr)
        return 1
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        with contextlib.suppress(OSError):  # Made where it can be; refused below where not.
            os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            print(f'gpu_check: --out: cannot write to {folder}', file=sys.stderr)
            return 1
    name = torch.cuda.get_device_name(0) if args.device == 'cuda' else f'CPU ({os.cpu_count()} cores)'
    ctx = argparse.Namespace(device=args.device, smoke=args.smoke, out=args.out and os.path.abspath(args.out), device_name=name,
                             torch_version=torch.__version__, procs=min(2, torch.cuda.device_count()) if args.device == 'cuda' else 1)
    ctx.procs = max(ctx.procs, 1)
    print(f'gpu_check on {name}, torch {torch.__version__}, CUDA {torch.version.cuda or "-"}, {ctx.procs} process(es)'
          f'{", smoke sizes" if args.smoke else ""}', flush=True)
    own = args.workdir is None
    if own:  # Snapshots of the paper's networks take GBs: memory-backed scratch when there is room.
        shm = os.path.isdir('/dev/shm') and shutil.disk_usage('/dev/shm').free > 48 * 2**30
        args.workdir = tempfile.mkdtemp(prefix='gpu_check-', dir='/dev/shm' if shm else None)
    os.makedirs(args.workdir, exist_ok=True)
    ctx.work = os.path.abspath(args.workdir)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` stops us like Ctrl-C: children are killed.
    failed = 0
    try:
        for part in (PARTS if args.part == 'all' else [int(args.part)]):
            failed += run_part(ctx, part)
    finally:
        if own:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(f'{failed} row(s) failed' + (f'; rows in {args.out}.json and {args.out}.md' if args.out else ''), flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
