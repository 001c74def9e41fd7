"""One command that checks and times every CUDA path of the project, with random weights.

    python benchmarks/gpu_check.py                            # on a CUDA machine: about 8 minutes
    python benchmarks/gpu_check.py --out=gpu_check            # also gpu_check.json, gpu_check.md
    python benchmarks/gpu_check.py --device=cpu --smoke       # tiny sizes: does the script work?

Rows (each in its own process, with a timeout; one failing row does not stop the others):
  train     train.py, first stage (adm, 64 px, --batch-gpu=32) and second stage (adm, blur, 256 px,
            --batch-gpu=8) for a few steps each: fp32, --fp16 + --ls (the README's), bf16
            (--precision=bf16): loss finite, img/s (steps after the first), peak GPU memory;
            plus train.py under torchrun (NCCL on CUDA; one process per GPU, at most 2) and a
            DistributedDataParallel step over an NCCL process group of one.
  sample    the ImageNet-256 preset's networks at paper size (first stage DhariwalUNet 192 ch,
            64 px; second stage DhariwalUNet 256 ch, 256 px; both use_fp16 as trained) and the
            preset's sampler settings with fewer steps: exact vs fast modes, img/s (measured, and
            extrapolated to the preset's step count), peak memory, max pixel difference to exact.
  evaluate  activations img/s with a random-weight Inception-v3 (299 px) over random PNGs.
  consist.  exact-mode images on CUDA vs on the CPU (same noise, drawn on the CPU) for tiny
            networks, TF32 off: max |difference| in [-1, 1] units must stay below 1e-3.

Exit status 1 when any row fails (a CUDA error, a non-finite loss, a timeout, a missing option).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Train row sizes: (resolution, --batch-gpu of the README, precond, README's --ls with --fp16).
TRAIN_STAGES = {'first': (64, 32, 'edm', 25), 'second': (256, 8, 'blur', 1)}
SMOKE_TRAIN_STAGES = {'first': (8, 4, 'edm', 25), 'second': (16, 2, 'blur', 1)}
SMOKE_ARCH = ['--cbase=32', '--cres=1', '--blocks=1']
CONSISTENCY_TOL = 1e-3  # max |CUDA - CPU| in [-1, 1] image units, exact mode, TF32 off.

#----------------------------------------------------------------------------
# Helpers shared by the rows.

def _sync(device):
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _reset_peak(device):
    import torch
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device):
    import torch
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None


def _randomize(net, seed, scale=0.02):
    # Freshly built networks have zero-initialised output layers (EDM), so the denoiser would be
    # the identity; a small perturbation of every parameter makes every layer count.
    import torch
    gen = torch.Generator(next(net.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) * scale)
    return net


def _to_uint8(images):
    import torch
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def _samplers():
    from training import sampling
    return sampling


def _make_png_folder(folder, count, res, label_dim=None, seed=0):
    """`count` smooth random RGB images (upsampled 4x4 noise), with dataset.json class labels
    when label_dim is given (image 0 has the last class, so the dataset has label_dim classes)."""
    import numpy as np
    import PIL.Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    names = []
    for idx in range(count):
        base = rng.randint(0, 256, size=[4, 4, 3]).astype(np.uint8)
        name = f'img{idx:05d}.png'
        PIL.Image.fromarray(base).resize([res, res], PIL.Image.BILINEAR).save(os.path.join(folder, name))
        names.append(name)
    if label_dim is not None:
        with open(os.path.join(folder, 'dataset.json'), 'w') as f:
            json.dump({'labels': [[n, (label_dim - 1 - i) % label_dim] for i, n in enumerate(names)]}, f)
    return folder

#----------------------------------------------------------------------------
# Train rows: train.py itself, as a user runs it.

def _train_has_precision():
    out = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), '--help'], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    return '--precision' in out.stdout


def _train_command(stage, precision, data, outdir, smoke, steps, torchrun_procs=None):
    res, batch, precond, ls = (SMOKE_TRAIN_STAGES if smoke else TRAIN_STAGES)[stage]
    # Tick 0 = the first step (warm-up); tick 1 = the other steps (timed). Half an image of
    # slack keeps float round-off in kimg from adding a step.
    args = [f'--outdir={outdir}', f'--data={data}', '--nosubdir', '--cond=1', '--arch=adm', f'--precond={precond}',
            f'--batch={batch * (torchrun_procs or 1)}', f'--batch-gpu={batch}', '--eff-attn=True', '--dropout=0.1',
            f'--duration={(batch * (torchrun_procs or 1) * steps - 0.5) / 1e6!r}',
            f'--tick={(batch * (torchrun_procs or 1) * (steps - 1) - 0.5) / 1e3!r}',
            '--snap=1000', '--dump=1000', '--seed=0', '--workers=0']
    if precond == 'blur':
        args += ['--up-scale=4', '--block-scale=0.15', '--prob-length=0.93', '--blur-sigma-max=3.0']
    if precision == 'fp16':
        args += ['--fp16=1', f'--ls={ls}']
    elif precision == 'bf16':
        args += ['--precision=bf16']
    if smoke:
        args += SMOKE_ARCH
    script = os.path.join(REPO, 'train.py')
    if torchrun_procs:
        return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun_procs}', script] + args
    return [sys.executable, script] + args


def _read_train_stats(run_dir, batch):
    path = os.path.join(run_dir, 'stats.jsonl')
    if not os.path.isfile(path):
        raise RuntimeError('train.py wrote no stats.jsonl')
    with open(path) as f:
        ticks = [json.loads(line) for line in f if line.strip()]
    losses = [t['Loss/loss']['mean'] for t in ticks if 'Loss/loss' in t]
    if not losses or not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f'loss not finite: {losses}')
    sec_per_kimg = ticks[-1]['Timing/sec_per_kimg']['mean']
    peak = max(t.get('Resources/peak_gpu_mem_gb', {}).get('mean', 0) for t in ticks)
    return dict(img_s=1000 / sec_per_kimg, peak_gib=peak or None, check=f'loss {losses[-1]:.4g} (finite)')

#----------------------------------------------------------------------------
# Child rows: run in a fresh process (`--child=NAME`), write a list of row dicts as JSON.

def child_sample(device, smoke, stage, batch, compile_second, tiny=False):
    import torch
    import train
    import dnnlib
    from training import fast_mode
    sampling = _samplers()

    from training import pipeline
    first_kw, second_kw = pipeline.stage_kwargs(pipeline.resolve_options('imagenet')[0])
    kw = first_kw if stage == 'first' else second_kw
    full_steps = kw['num_steps']
    tiny = tiny or smoke
    res = (8 if stage == 'first' else 16) if tiny else (64 if stage == 'first' else 256)
    label_dim = 10 if tiny else 1000
    if tiny:
        net_kwargs = dnnlib.EasyDict(class_name='training.networks.EDMPrecond', model_type='DhariwalUNet', model_channels=32,
                                     channel_mult=[1], num_blocks=1, use_fp16=True, eff_attn=True)
    else:
        # The paper's networks as train.py builds them (ImageNet commands: --arch=adm --fp16=1 --eff-attn=True).
        net_kwargs = train.network_kwargs_for('adm', res, precond=('edm' if stage == 'first' else 'blur'), dropout=0.1,
                                              fp16=True, eff_attn=True, augment=True)
    torch.manual_seed(0)
    net = dnnlib.util.construct_class_by_name(**net_kwargs, img_resolution=res, img_channels=3, label_dim=label_dim)
    net = _randomize(net.eval().requires_grad_(False).to(device), seed=1)
    params = sum(p.numel() for p in net.parameters())

    seeds = list(range(batch))
    labels = torch.eye(label_dim, device=device)[torch.tensor(seeds, device=device) % label_dim]
    if stage == 'first':
        steps = 2 if smoke else 6
        evals = lambda n: 2 * n - 1  # noqa: E731  Heun: the last step has no correction.
        def run(net_, steps_):
            rnd = sampling.StackedRandomGenerator(device, seeds)
            latents = rnd.randn([batch, 3, res, res], device=device)
            return sampling.edm_sampler(net_, latents, labels, rnd.randn_like, **dict(kw, num_steps=steps_))
    else:
        def effective(n):  # Steps left after the truncation of the noise schedule.
            return len(sampling.blur_time_steps(net, n, kw['sigma_min'], kw['sigma_max'], kw['rho'], kw['truncation_sigma']))
        steps = next(n for n in range(2, full_steps + 1) if effective(n) >= (1 if smoke else 4))
        evals = lambda n: 2 * effective(n) - 1  # noqa: E731
        gen = torch.Generator(device).manual_seed(2)
        low = torch.rand([batch, 3, res // 4, res // 4], generator=gen, device=device, dtype=torch.float64) * 2 - 1
        low = torch.nn.functional.interpolate(low, size=(res, res), mode='nearest')
        def run(net_, steps_):
            rnd = sampling.StackedRandomGenerator(device, seeds)
            return sampling.blur_sampler(net_, low, labels, rnd.randn_like, **dict(kw, num_steps=steps_))

    variants = [('exact', fast_mode.EXACT),
                ('fast (fp16)', fast_mode.settings_from_options(fast=True)),
                ('fast bf16', fast_mode.settings_from_options(fast=True, precision='bf16')),
                ('fast + channels-last', fast_mode.settings_from_options(fast=True, channels_last=True))]
    if smoke:
        variants = variants[:3]  # Fewer variants; no compilation (it alone outlasts a smoke run).
    elif (stage == 'first' or compile_second) and not tiny:
        variants.append(('fast + compile', fast_mode.settings_from_options(fast=True, compile=True)))

    rows, reference = [], None
    cfg = kw.get('cfg_scale', 0)
    for name, settings in variants:
        row = dict(group='sample', name=f'{stage} {res}px {name}', status='ok')
        try:
            fast_net = fast_mode.prepare(net, settings)
            with torch.no_grad():
                start = time.perf_counter()
                if not smoke:
                    run(fast_net, 2)  # Warm-up: cuDNN autotuning, compilation.
                _sync(device)
                warmup = time.perf_counter() - start
                _reset_peak(device)
                start = time.perf_counter()
                images = run(fast_net, steps)
                _sync(device)
                elapsed = time.perf_counter() - start
            if not torch.isfinite(images).all():
                raise RuntimeError('non-finite images')
            per_eval = elapsed / evals(steps)
            row.update(img_s=batch / elapsed, img_s_preset=batch / (per_eval * evals(full_steps)), peak_gib=_peak_gib(device),
                       seconds=elapsed, note=f'{steps} of {full_steps} steps, batch {batch}, cfg {cfg:g}, {params / 1e6:.1f}M params, warm-up {warmup:.1f} s')
            pixels = _to_uint8(images).to(torch.int16)
            if reference is None:
                reference = pixels
                row['check'] = 'reference'
            else:
                diff = (pixels - reference).abs()
                row['check'] = f'max {int(diff.max())} / mean {float(diff.float().mean()):.3f} levels vs exact'
                row['max_pixel_diff'] = int(diff.max())
        except Exception as err:  # pylint: disable=broad-exception-caught
            row.update(status='FAILED', error=f'{type(err).__name__}: {err}')
            if device.type == 'cuda' and 'CUDA' in str(err):
                rows.append(row)
                break  # The CUDA context may be unusable now.
        rows.append(row)
    return rows


def child_evaluate(device, smoke, workdir, batch):
    import torch
    from metrics.activations import compute_activations, open_images
    from metrics.detector import load_detector
    from metrics.inception import InceptionV3

    res = 75 if smoke else 299
    count = 8 if smoke else 1024
    torch.manual_seed(0)
    net = InceptionV3(resolution=res)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
    det_path = os.path.join(workdir, 'pt_inception-random.pth')
    torch.save(dict(net.state_dict(), resolution=torch.tensor(res)), det_path)
    folder = _make_png_folder(os.path.join(workdir, 'eval-images'), count, 32 if smoke else 256)

    det = load_detector(det_path, device=device, verbose=False)
    source = open_images(folder)
    det(torch.as_tensor(source[0][0])[None].repeat(min(batch, count), 1, 1, 1))  # Warm-up.
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    out = compute_activations(source, [det], batch_size=batch, num_workers=(0 if smoke else 3), progress=False)
    _sync(device)
    elapsed = time.perf_counter() - start
    if out['feat'].shape != (count, 2048) or not all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in out.values()):
        raise RuntimeError(f'bad activations: feat {out["feat"].shape}')
    return [dict(group='evaluate', name=f'activations {res}px Inception (random)', status='ok', img_s=count / elapsed,
                 peak_gib=_peak_gib(device), seconds=elapsed, check='feat/s_feat/logits finite',
                 note=f'{count} images of 256 px, batch {batch}, 3 loader workers' if not smoke else f'{count} images')]


def child_consistency(device, smoke):
    import torch
    from training import networks
    sampling = _samplers()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    kw = dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[8],
              dropout=0, eff_attn=True)
    res, steps = (16, (2, 4)) if smoke else (32, (5, 10))
    torch.manual_seed(0)
    first = _randomize(networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=3, **kw).eval().requires_grad_(False), 1, 0.05)
    second = _randomize(networks.EDMPrecond(img_resolution=res, img_channels=3, label_dim=3, **kw).eval().requires_grad_(False), 2, 0.05)
    seeds = [0, 1, 2]

    def relay(dev):
        rnd = sampling.StackedRandomGenerator('cpu', seeds)  # The same noise on both devices.
        randn_like = lambda x: rnd.randn(x.shape, dtype=x.dtype).to(x.device)  # noqa: E731
        labels = torch.eye(3, device=dev)[torch.tensor(seeds, device=dev)]
        with torch.no_grad():
            x = sampling.edm_sampler(first.to(dev), rnd.randn([3, 3, 8, 8]).to(dev), labels, randn_like, num_steps=steps[0], cfg_scale=2)
            x = torch.nn.functional.interpolate(x, size=(res, res), mode='nearest')
            return sampling.blur_sampler(second.to(dev), x, labels, randn_like, num_steps=steps[1], cfg_scale=3.5,
                                         up_scale=res // 8).cpu()

    cpu = relay(torch.device('cpu'))
    other = relay(device)
    diff = float((cpu - other).abs().max())
    levels = int((_to_uint8(cpu).to(torch.int16) - _to_uint8(other).to(torch.int16)).abs().max())
    ok = diff <= CONSISTENCY_TOL and math.isfinite(diff)
    return [dict(group='consist.', name=f'{device.type} vs cpu, exact relay (tiny nets)', status='ok' if ok else 'FAILED',
                 check=f'max |diff| {diff:.2e} (limit {CONSISTENCY_TOL:g}), {levels} levels',
                 error=None if ok else f'max |diff| {diff:.2e} above {CONSISTENCY_TOL:g}')]


def child_ddp(device, smoke, workdir):
    import torch
    import torch.distributed as tdist
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    tdist.init_process_group(backend, init_method='file://' + os.path.join(workdir, 'ddp-store'), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, 3, 3, padding=1)).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
        x = torch.randn([8, 3, 32, 32], device=device)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss = (ddp(x) - x).square().mean()
            loss.backward()
            opt.step()
        value = torch.tensor([float(loss)], device=device)
        tdist.all_reduce(value)
        _sync(device)
        if not math.isfinite(float(value)):
            raise RuntimeError('loss not finite')
    finally:
        tdist.destroy_process_group()
    return [dict(group='train', name=f'DDP step, {backend} process group of 1', status='ok', check=f'loss {float(value):.4g} (finite)')]

#----------------------------------------------------------------------------
# Parent: run every row, print and write the table.

def _run_child(args, name, extra, timeout):
    result_path = os.path.join(args.workdir, f'{name}.json')
    cmd = [sys.executable, os.path.abspath(__file__), f'--child={name}', f'--device={args.device}',
           f'--workdir={args.workdir}', f'--result={result_path}'] + (['--smoke'] if args.smoke else []) + extra
    proc, error = _run(cmd, timeout, cwd=args.workdir, hide_gpus=(args.device == 'cpu'))
    if os.path.isfile(result_path):
        with open(result_path) as f:
            rows = json.load(f)
        if error:
            rows.append(dict(group='?', name=name, status='FAILED', error=error))
        return rows
    return [dict(group=name.split('-')[0], name=name, status='FAILED', error=error or 'no result written')]


def _run(cmd, timeout, cwd, hide_gpus=False):
    """Run `cmd` in its own process group; returns (Popen or None, error text or None)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''), PYTHONUNBUFFERED='1')
    if hide_gpus:
        env['CUDA_VISIBLE_DEVICES'] = ''  # --device=cpu: scripts that prefer CUDA stay on the CPU.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        return None, f'timeout after {timeout} s; last output: {_tail(out)}'
    proc.output = out
    if proc.returncode != 0:
        return proc, f'exit status {proc.returncode}: {_tail(out)}'
    return proc, None


def _tail(text, lines=6):
    text = [line for line in (text or '').strip().splitlines() if line.strip()]
    return ' | '.join(text[-lines:])[-1500:]


def train_rows(args, have_precision, groups):
    rows = []
    stages = SMOKE_TRAIN_STAGES if args.smoke else TRAIN_STAGES
    steps = 2 if args.smoke else 5
    data = {}
    for stage, (res, batch, _precond, _ls) in stages.items():
        data[stage] = _make_png_folder(os.path.join(args.workdir, f'data-{stage}'), max(2 * batch, 16), res,
                                       label_dim=(10 if args.smoke else 1000))
    jobs = []
    if 'train' in groups:
        for stage in stages:
            for precision in ('fp32', 'fp16', 'bf16'):
                jobs.append((stage, precision, None))
    if 'ddp' in groups:
        procs = 1
        if args.device == 'cuda':
            import torch
            procs = max(1, min(2, torch.cuda.device_count()))
        jobs.append(('first', 'fp16', procs))
    for stage, precision, procs in jobs:
        res, batch, precond, ls = stages[stage]
        label = {'fp32': 'fp32', 'fp16': f'--fp16 --ls={ls}', 'bf16': '--precision=bf16'}[precision]
        name = f'{stage} {res}px {precond} {label}' + (f', torchrun {procs} proc ({"nccl" if args.device == "cuda" else "gloo"})' if procs else '')
        row = dict(group='train', name=name, status='ok')
        if args.smoke and not procs and (precision != 'fp32' or stage == 'first'):
            row.update(status='skipped', check='smoke: second stage fp32 and the torchrun row only')
            rows.append(row)
            print(_row_line(row), flush=True)
            continue
        if precision == 'bf16' and not have_precision:
            row.update(status='FAILED', error='train.py has no --precision option (bf16 training not available)')
            rows.append(row)
            print(_row_line(row), flush=True)
            continue
        outdir = os.path.join(args.workdir, 'run-' + name.replace(' ', '_').replace('/', '_').replace('=', '').replace(',', ''))
        cmd = _train_command(stage, precision, data[stage], outdir, args.smoke, steps, torchrun_procs=procs)
        start = time.perf_counter()
        _proc, error = _run(cmd, args.timeout, cwd=args.workdir, hide_gpus=(args.device == 'cpu'))
        row['seconds'] = time.perf_counter() - start
        if error:
            row.update(status='FAILED', error=error)
        else:
            try:
                row.update(_read_train_stats(outdir, batch * (procs or 1)))
                row['note'] = f'{steps} steps of {batch * (procs or 1)} images, timed after the first'
            except (RuntimeError, OSError, KeyError, ValueError) as err:
                row.update(status='FAILED', error=str(err))
        shutil.rmtree(outdir, ignore_errors=True)  # Snapshots of the paper's networks are large.
        rows.append(row)
        print(_row_line(row), flush=True)
    return rows


def _fmt(value, spec):
    return '-' if value is None else format(value, spec)


COLUMNS = ['group', 'row', 'status', 'img/s', 'img/s preset', 'peak GiB', 'check', 'seconds']


def _cells(row):
    status = row['status'] if row['status'] != 'FAILED' else 'FAILED'
    return [row.get('group', ''), row['name'], status, _fmt(row.get('img_s'), '.2f'), _fmt(row.get('img_s_preset'), '.3f'),
            _fmt(row.get('peak_gib'), '.2f'), row.get('check') or '', _fmt(row.get('seconds'), '.1f')]


def _row_line(row):
    line = '  '.join(_cells(row))
    if row.get('error'):
        line += f'\n    error: {row["error"]}'
    return line


def format_table(rows, header):
    cells = [COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = [header, '']
    for idx, c in enumerate(cells):
        lines.append('  '.join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
        if idx == 0:
            lines.append('  '.join('-' * w for w in widths))
    errors = [r for r in rows if r.get('error')]
    if errors:
        lines += ['', 'Errors:'] + [f'  {r["name"]}: {r["error"]}' for r in errors]
    notes = [r for r in rows if r.get('note')]
    if notes:
        lines += ['', 'Notes:'] + [f'  {r["name"]}: {r["note"]}' for r in notes]
    return '\n'.join(lines)


def format_markdown(rows, header):
    lines = [header, '', '| ' + ' | '.join(COLUMNS) + ' |', '|' + ' --- |' * len(COLUMNS)]
    for r in rows:
        lines.append('| ' + ' | '.join(c.replace('|', '/') for c in _cells(r)) + ' |')
    for r in rows:
        if r.get('error'):
            lines.append(f'\n- **{r["name"]}** failed: `{r["error"]}`')
    return '\n'.join(lines) + '\n'


def _write_atomic(path, text):
    import dnnlib.util  # pylint: disable=import-outside-toplevel
    with dnnlib.util.atomic_write(path, 'w') as f:
        f.write(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Check and time every CUDA path (train, DDP, sample, evaluate) with random weights; '
                                            'prints one table, exit status 1 if any row fails.')
    p.add_argument('--device', choices=['cuda', 'cpu'], default='cuda', help='Device to check (default: cuda)')
    p.add_argument('--smoke', action='store_true', help='Tiny networks and sizes: checks that the script runs (seconds on a CPU)')
    p.add_argument('--rows', default='train,ddp,sample,evaluate,consistency',
                   help='Comma-separated groups to run: train, ddp, sample, evaluate, consistency (default: all)')
    p.add_argument('--out', default=None, metavar='PREFIX', help='Also write PREFIX.json and PREFIX.md')
    p.add_argument('--timeout', type=int, default=None, metavar='SEC', help='Time limit per row (default: 300; smoke: 180)')
    p.add_argument('--sample-batch', type=int, default=None, metavar='N', help='Images per sampling batch (default: 16; smoke: 2)')
    p.add_argument('--eval-batch', type=int, default=64, metavar='N', help='Images per activations batch (default: 64)')
    p.add_argument('--sample-size', choices=['paper', 'tiny'], default='paper',
                   help='Networks of the sample rows: the paper\'s (default) or tiny ones (a CPU comparison of the modes)')
    p.add_argument('--compile-second', action='store_true', help='Also time torch.compile on the 256 px network (minutes of compilation)')
    p.add_argument('--workdir', default=None, metavar='DIR', help='Scratch folder (default: a new temporary folder, removed at the end)')
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--result', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    groups = [g.strip() for g in args.rows.split(',') if g.strip()]
    unknown = [g for g in groups if g not in ('train', 'ddp', 'sample', 'evaluate', 'consistency')]
    if unknown:
        p.error(f'--rows: unknown group "{unknown[0]}"; choose from train, ddp, sample, evaluate, consistency')
    for name in ('timeout', 'sample_batch', 'eval_batch'):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f'--{name.replace("_", "-")} must be at least 1')
    args.groups = groups
    if args.timeout is None:
        args.timeout = 180 if args.smoke else 300
    if args.sample_batch is None:
        args.sample_batch = 2 if args.smoke else 16
    return args


def run_child(args):
    import torch
    device = torch.device(args.device)
    name = args.child
    try:
        if name.startswith('sample-'):
            rows = child_sample(device, args.smoke, name.split('-', 1)[1], args.sample_batch, args.compile_second,
                                tiny=(args.sample_size == 'tiny'))
        elif name == 'evaluate':
            rows = child_evaluate(device, args.smoke, args.workdir, args.eval_batch)
        elif name == 'consistency':
            rows = child_consistency(device, args.smoke)
        elif name == 'ddp':
            rows = child_ddp(device, args.smoke, args.workdir)
        else:
            raise ValueError(f'unknown child row {name}')
    except Exception as err:  # pylint: disable=broad-exception-caught
        traceback.print_exc()
        rows = [dict(group=name.split('-')[0], name=name, status='FAILED', error=f'{type(err).__name__}: {err}')]
    with open(args.result, 'w') as f:
        json.dump(rows, f)
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return run_child(args)

    import torch
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); use --device=cpu --smoke for a CPU run',
              file=sys.stderr)
        return 1
    if args.out:
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.access(out_dir, os.W_OK):
            print(f'gpu_check: --out: cannot write to {out_dir}', file=sys.stderr)
            return 1
    where = torch.cuda.get_device_name(0) if args.device == 'cuda' else f'CPU ({os.cpu_count()} cores)'
    header = (f'gpu_check on {where}, torch {torch.__version__}, CUDA {torch.version.cuda or "-"}, '
              f'{time.strftime("%Y-%m-%d %H:%M")}{", smoke sizes" if args.smoke else ""}')
    print(header, flush=True)

    own_workdir = args.workdir is None
    if own_workdir:
        # Training rows write snapshots of the paper's networks (GBs): memory-backed scratch
        # when there is room, else the temporary folder.
        base = '/dev/shm' if (os.path.isdir('/dev/shm') and shutil.disk_usage('/dev/shm').free > 48 * 2**30) else None
        args.workdir = tempfile.mkdtemp(prefix='gpu_check-', dir=base)
    os.makedirs(args.workdir, exist_ok=True)
    rows = []
    wall = time.perf_counter()
    try:
        if 'train' in args.groups or 'ddp' in args.groups:
            rows += train_rows(args, _train_has_precision(), args.groups)
        children = []
        if 'ddp' in args.groups:
            children.append(('ddp', []))
        if 'sample' in args.groups:
            children += [('sample-first', []), ('sample-second', [])]
        if 'evaluate' in args.groups:
            children.append(('evaluate', []))
        if 'consistency' in args.groups:
            children.append(('consistency', []))
        for name, extra in children:
            if args.compile_second:
                extra = extra + ['--compile-second']
            extra = extra + [f'--sample-batch={args.sample_batch}', f'--eval-batch={args.eval_batch}', f'--sample-size={args.sample_size}']
            start = time.perf_counter()
            new = _run_child(args, name, extra, args.timeout)
            for row in new:
                row.setdefault('seconds', time.perf_counter() - start)
                print(_row_line(row), flush=True)
            rows += new
    finally:
        if own_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)

    failed = [r for r in rows if r['status'] == 'FAILED']
    header += f'; {len(rows)} rows, {len(failed)} failed, {time.perf_counter() - wall:.0f} s'
    print()
    print(format_table(rows, header))
    if args.out:
        _write_atomic(args.out + '.json', json.dumps(dict(header=header, rows=rows), indent=2) + '\n')
        _write_atomic(args.out + '.md', format_markdown(rows, header))
        print(f'\nWrote {args.out}.json and {args.out}.md')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
