"""Training throughput and peak memory of one optimizer step, as train.py runs it.

A step = loss forward/backward over the batch (random images, EDM augmentation as train.py sets
it up) + NaN guard + Adam + EMA update; the network and loss come from train.py's presets.

    python benchmarks/bench_train.py --arch=ddpmpp --res=32 --batch=16
    python benchmarks/bench_train.py --arch=adm --res=64 --batch=32 --fp16=1 --eff-attn=1   # CUDA

Prints one line: images/s, ms/step, peak memory (CUDA: max allocated; CPU: peak process RSS).
"""

import os
import resource
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib  # noqa: E402
import train  # noqa: E402


@click.command()
@click.option('--arch', type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']), default='ddpmpp', show_default=True, help='Network architecture')
@click.option('--precond', type=click.Choice(['vp', 've', 'edm', 'blur']), default='edm', show_default=True, help='Preconditioning & loss')
@click.option('--res', type=click.IntRange(min=8), default=32, show_default=True, help='Image resolution')
@click.option('--batch', type=click.IntRange(min=1), default=16, show_default=True, help='Batch size')
@click.option('--cbase', type=click.IntRange(min=1), default=None, help='Channel multiplier  [default: preset]')
@click.option('--cres', type=dnnlib.util.IntList(), default=None, help='Channels per resolution  [default: preset]')
@click.option('--blocks', type=click.IntRange(min=1), default=None, help='Residual blocks per resolution  [default: preset]')
@click.option('--label-dim', type=click.IntRange(min=0), default=0, show_default=True, help='Class count (0 = unconditional)')
@click.option('--augment', type=click.FloatRange(min=0, max=1), default=0.12, show_default=True, help='Augment probability')
@click.option('--fp16', type=bool, default=False, show_default=True, help='Mixed precision (CUDA)')
@click.option('--eff-attn', type=bool, default=False, show_default=True, help='Efficient attention')
@click.option('--steps', type=click.IntRange(min=1), default=10, show_default=True, help='Timed steps')
@click.option('--warmup', type=click.IntRange(min=0), default=2, show_default=True, help='Untimed steps first')
@click.option('--device', type=str, default=None, help='cpu / cuda  [default: cuda if available]')
@click.option('--threads', type=click.IntRange(min=1), default=None, help='CPU threads  [default: torch default]')
def main(arch, precond, res, batch, cbase, cres, blocks, label_dim, augment, fp16, eff_attn, steps, warmup, device, threads):
    """Measure training images/s and peak memory for one configuration."""
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True

    net_kwargs = train.network_kwargs_for(arch, res, precond=precond, cbase=cbase, cres=cres, blocks=blocks, fp16=fp16,
                                          eff_attn=eff_attn, augment=bool(augment))
    net = dnnlib.util.construct_class_by_name(**net_kwargs, img_resolution=res, img_channels=3, label_dim=label_dim)
    net.train().requires_grad_(True).to(device)
    ema = dnnlib.util.construct_class_by_name(**net_kwargs, img_resolution=res, img_channels=3, label_dim=label_dim)
    ema.load_state_dict(net.state_dict())
    ema.eval().requires_grad_(False).to(device)
    loss_kwargs = dict(class_name=train.PRECOND_PRESETS[precond][1])
    if precond == 'blur':
        loss_kwargs.update(up_scale=4, block_scale=0.15, prob_length=0.93, blur_sigma_max=3)
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    augment_pipe = None
    if augment:
        augment_pipe = dnnlib.util.construct_class_by_name(class_name='training.augment.AugmentPipe', p=augment, xflip=1e8,
                                                           yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    params = sum(p.numel() for p in net.parameters())

    images = torch.rand([batch, 3, res, res], device=device) * 2 - 1
    labels = torch.eye(max(label_dim, 1), device=device)[torch.randint(max(label_dim, 1), [batch], device=device)][:, :label_dim]

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net=net, images=images, labels=labels, augment_pipe=augment_pipe)
        loss.sum().mul(1 / batch).backward()
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, 0.999))

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - start

    if device.type == 'cuda':
        peak = f'peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.3f} GiB'
        where = torch.cuda.get_device_name(device)
    else:
        peak = f'peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3f} GiB'
        where = f'CPU, {torch.get_num_threads()} threads'
    print(f'{arch}/{precond} {res}x{res} batch {batch} params {params / 1e6:.2f}M fp16={fp16} eff_attn={eff_attn} '
          f'[{where}]: {batch * steps / elapsed:.1f} images/s, {elapsed / steps * 1e3:.1f} ms/step, {peak}')


if __name__ == '__main__':
    main()
