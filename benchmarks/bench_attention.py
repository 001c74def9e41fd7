"""Attention benchmark: plain (reference) path vs scaled_dot_product_attention (--eff-attn).

Times forward+backward of one attention UNetBlock and reports its peak memory (CUDA: peak
allocated; CPU: growth of the peak resident set, measured in a fresh process per setting). The
plain path materializes a [tokens x tokens] weight matrix per head; the fused SDPA kernels do
not, so their memory grows linearly with the token count.

    python benchmarks/bench_attention.py --res 16,32,64 --channels 256 --batch 8
"""

import multiprocessing
import os
import resource
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.networks import UNetBlock  # noqa: E402


def _measure(block, x, emb, iters):
    device = x.device
    for _ in range(2):  # warm-up
        block(x, emb).square().mean().backward()
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        block(x, emb).square().mean().backward()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == 'cuda' else float('nan')
    return seconds, peak


def _peak_rss_mib():
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak across exec.
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_peak_growth(r, channels, batch, eff):
    # Runs in a fresh process: peak RSS growth (MiB) of one forward+backward over the baseline.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    block = UNetBlock(channels, channels, 4 * channels, attention=True, eff_attn=eff, init_zero=dict(init_weight=1))
    x = torch.randn(batch, channels, r, r)
    emb = torch.randn(batch, 4 * channels)
    before = _peak_rss_mib()
    block(x, emb).square().mean().backward()
    return _peak_rss_mib() - before


@click.command()
@click.option('--res', help='Feature-map resolutions to test (tokens = res^2)', metavar='LIST', default='16,32', show_default=True)
@click.option('--channels', help='Block channels (heads = channels/64)', metavar='INT', type=click.IntRange(min=64), default=256, show_default=True)
@click.option('--batch', help='Batch size', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--iters', help='Timed iterations per setting', metavar='INT', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--fp16', help='Run in FP16 (CUDA only)', is_flag=True)
@click.option('--device', help='cpu or cuda  [default: cuda if available]', metavar='STR', type=str, default=None)
def main(res, channels, batch, iters, fp16, device):
    """Compare the plain attention path with SDPA for one UNetBlock."""
    try:
        resolutions = [int(r) for r in res.split(',')]
    except ValueError:
        raise click.BadParameter(f'expected a comma-separated list of integers, got "{res}"', param_hint='--res') from None
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    dtype = torch.float16 if fp16 and device.type == 'cuda' else torch.float32
    print(f'device={device} dtype={dtype} channels={channels} heads={channels // 64} batch={batch}')
    print(f'{"res":>5} {"tokens":>7} {"plain ms":>9} {"sdpa ms":>9} {"plain MiB":>10} {"sdpa MiB":>10} {"max |diff|":>11}')
    for r in resolutions:
        row = {}
        outputs = {}
        torch.manual_seed(0)
        x = torch.randn(batch, channels, r, r, device=device, dtype=dtype)
        emb = torch.randn(batch, 4 * channels, device=device, dtype=dtype)
        for eff in (False, True):
            torch.manual_seed(0)
            block = UNetBlock(channels, channels, 4 * channels, attention=True, eff_attn=eff, init_zero=dict(init_weight=1)).to(device)
            seconds, peak = _measure(block, x, emb, iters)
            with torch.no_grad():
                outputs[eff] = block(x, emb).float()
            if device.type == 'cpu':
                with multiprocessing.get_context('spawn').Pool(1) as pool:
                    peak = pool.apply(_cpu_peak_growth, (r, channels, batch, eff))
            row[eff] = (seconds * 1e3, peak)
            del block
        diff = (outputs[True] - outputs[False]).abs().max().item()
        print(f'{r:>5} {r*r:>7} {row[False][0]:>9.2f} {row[True][0]:>9.2f} {row[False][1]:>10.1f} {row[True][1]:>10.1f} {diff:>11.2e}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
