"""Relay sampler benchmark.

1. The blur sampler's own work per step outside the network (block DCTs, blur schedule, noise),
   ours vs the reference's way of doing it, side by side in one run: 256 px, batch 8, float64,
   with a network stand-in that costs nothing. The reference's way is the one restatement of
   tests/reference_restatement.py: DCTs block by block (scipy; the reference uses an FFT-based
   torch DCT, of a similar cost), get_alpha_t through scipy on the host twice a step, the
   16-roll block noise, and per-seed draws stacked with torch.stack.
2. Images/s and peak memory of each stage with a small EDMPrecond network.

    python benchmarks/bench_sampler.py                    # CPU (or CUDA when present)
    python benchmarks/bench_sampler.py --device=cpu --steps=10 --threads=2
"""

import json
import os
import subprocess
import sys
import threading
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import sampling  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))
from reference_restatement import RefGenerators, ref_alpha, ref_block_noise, ref_blur, ref_dct  # noqa: E402
from training import blurring  # noqa: E402

#----------------------------------------------------------------------------

class FreeNet(torch.nn.Module):
    """A 'network' that costs (almost) nothing: the overhead is all that is left to time."""
    sigma_min, sigma_max, label_dim = 0, float('inf'), 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        return x


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _time_pair(fn_a, fn_b, device, repeats):
    # Best of `repeats`, alternating a and b so that load drift on a shared machine hits both.
    best = [float('inf'), float('inf')]
    for _ in range(repeats):
        for idx, fn in enumerate((fn_a, fn_b)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[idx] = min(best[idx], time.perf_counter() - start)
    return best


def bench_overhead(device, batch, resolution, num_steps, repeats):
    k = 4
    seeds = list(range(batch))
    low = torch.rand(batch, 3, resolution // k, resolution // k, dtype=torch.float64, device=device) * 2 - 1
    latents = torch.nn.functional.interpolate(low, size=(resolution, resolution), mode='nearest')
    net = FreeNet()
    n_eff = int((sampling.time_steps(num_steps, 0.008, 80, 7, 'cpu') < 0.9).sum()) # steps after truncation

    # Correctness first: both ways give the same samples.
    x_ref = ref_blur(net, latents, None, RefGenerators(seeds, device).randn_like, num_steps=num_steps)
    x_ours = sampling.blur_sampler(net, latents, None, sampling.StackedRandomGenerator(device, seeds).randn_like, num_steps=num_steps)
    max_diff = (x_ref - x_ours).abs().max().item()

    t_ours, t_ref = _time_pair(
        lambda: sampling.blur_sampler(net, latents, None, sampling.StackedRandomGenerator(device, seeds).randn_like, num_steps=num_steps),
        lambda: ref_blur(net, latents, None, RefGenerators(seeds, device).randn_like, num_steps=num_steps), device, repeats)
    per_ref, per_ours = t_ref / (n_eff - 1), t_ours / (n_eff - 1)

    # Where the time goes (one step's worth of each piece, ours vs reference).
    x = latents.clone()
    t0 = torch.tensor(0.5, dtype=torch.float64, device=device)
    rnd = sampling.StackedRandomGenerator(device, seeds)
    ref_rnd = RefGenerators(seeds, device)
    pieces = [
        ('4 DCT + 2 IDCT', lambda: [blurring.block_dct(x, k) for _ in range(4)] + [blurring.block_idct(x, k) for _ in range(2)],
                           lambda: [ref_dct(x, k) for _ in range(4)] + [ref_dct(x, k, inverse=True) for _ in range(2)]),
        ('schedule (2 alphas)', lambda: blurring.alpha_schedule(torch.stack([t0, t0]), k),
                                lambda: [ref_alpha(t0, k, resolution, device=device) for _ in range(2)]),
        ('noise (2 plain + 2 block)', lambda: [rnd.randn_like(x) for _ in range(2)] + [blurring.block_noise(x, rnd.randn_like, k) for _ in range(2)],
                                      lambda: [ref_rnd.randn_like(x) for _ in range(2)] + [ref_block_noise(x, ref_rnd.randn_like, k) for _ in range(2)]),
    ]
    rows = [(name, *_time_pair(ours, ref, device, repeats)) for name, ours, ref in pieces]
    return dict(per_ref=per_ref, per_ours=per_ours, max_diff=max_diff, n_eff=n_eff, rows=rows)


class PeakMemory:
    """Peak device memory (CUDA) or peak process RSS above the starting level (CPU, sampled)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.running = True
        def sample():
            while self.running:
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.005)
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.bytes = self.peak - self.base


def bench_stage(device, stage, batch, first_res, up_scale, steps, channels):
    """Images/s and peak memory of one stage, on random inputs, with a small EDMPrecond."""
    from training import networks
    res = first_res if stage == 'first' else first_res * up_scale
    levels = max(1, int(np.log2(res // 8)) + 1) # lowest level (always with attention) at 8 px
    kw = dict(model_type='SongUNet', model_channels=channels, channel_mult=[1] * levels, num_blocks=1, attn_resolutions=[], dropout=0)
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=res, img_channels=3, **kw).eval().requires_grad_(False).to(device)
    rnd = sampling.StackedRandomGenerator(device, list(range(batch)))
    with torch.no_grad():
        if stage == 'first':
            latents = rnd.randn([batch, 3, res, res], device=device)
            run = lambda: sampling.edm_sampler(net, latents, None, rnd.randn_like, num_steps=steps, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1)
        else:
            low = torch.rand(batch, 3, first_res, first_res, dtype=torch.float64, device=device) * 2 - 1
            latents = torch.nn.functional.interpolate(low, size=(res, res), mode='nearest')
            run = lambda: sampling.blur_sampler(net, latents, None, rnd.randn_like, num_steps=steps, up_scale=up_scale)
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            run()
            _sync(device)
            elapsed = time.perf_counter() - start
    return dict(name=f'{stage:6s} {res}px, {steps} steps', ips=batch / elapsed, mem=mem.bytes)


def bench_stages(device, batch, first_res, up_scale, steps_first, steps_second, channels, threads):
    # On CPU each stage runs in a fresh process whose large allocations go straight to mmap, so
    # that the sampled RSS follows live memory (no reuse of what an earlier stage freed).
    results = []
    for stage, steps in [('first', steps_first), ('second', steps_second)]:
        if device.type == 'cuda':
            results.append(bench_stage(device, stage, batch, first_res, up_scale, steps, channels))
            continue
        cmd = [sys.executable, os.path.abspath(__file__), f'--stage-child={stage}', '--device=cpu', f'--batch={batch}',
               f'--first_res={first_res}', f'--steps_first={steps_first}', f'--steps_second={steps_second}', f'--channels={channels}']
        if threads:
            cmd.append(f'--threads={threads}')
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536')
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results

#----------------------------------------------------------------------------

@click.command()
@click.option('--device', help='cpu or cuda  [default: cuda if present]', type=str, default=None)
@click.option('--batch', help='Batch size', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--resolution', help='Second stage resolution for the overhead test', type=click.IntRange(min=8), default=256, show_default=True)
@click.option('--steps', help='Blur sampler steps before truncation (overhead test)', type=click.IntRange(min=4), default=40, show_default=True)
@click.option('--repeats', help='Timing repeats (best of)', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--threads', help='torch CPU threads  [default: torch\'s]', type=click.IntRange(min=1), default=None)
@click.option('--stages/--no-stages', help='Also time both stages with a small network', default=True, show_default=True)
@click.option('--first_res', help='Stage test: first stage resolution (x4 for the second)', type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--steps_first', help='Stage test: first stage steps', type=click.IntRange(min=2), default=8, show_default=True)
@click.option('--steps_second', help='Stage test: second stage steps before truncation', type=click.IntRange(min=4), default=20, show_default=True)
@click.option('--channels', help='Stage test: SongUNet model_channels', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--stage-child', 'stage_child', type=click.Choice(['first', 'second']), default=None, hidden=True)
def main(device, batch, resolution, steps, repeats, threads, stages, first_res, steps_first, steps_second, channels, stage_child):
    """Benchmark the relay sampler: per-step overhead vs the reference's way, and per-stage speed."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if stage_child is not None:
        steps = steps_first if stage_child == 'first' else steps_second
        print(json.dumps(bench_stage(device, stage_child, batch, first_res, 4, steps, channels)))
        return
    print(f'device: {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}')

    r = bench_overhead(device, batch, resolution, steps, repeats)
    print(f'\nBlur sampler overhead outside the network, {resolution} px, batch {batch}, float64, {r["n_eff"]} steps after truncation:')
    print(f'  reference way: {r["per_ref"] * 1000:8.1f} ms/step')
    print(f'  ours:          {r["per_ours"] * 1000:8.1f} ms/step   ratio {r["per_ours"] / r["per_ref"]:.2f} (target <= 0.50)')
    print(f'  max |ours - reference| over the samples: {r["max_diff"]:.2e}')
    print('  pieces, one step\'s worth (ours / reference, ms):')
    for name, ours, ref in r['rows']:
        print(f'    {name:28s} {ours * 1000:8.1f} / {ref * 1000:8.1f}')

    if stages:
        print(f'\nStages with a small EDMPrecond (SongUNet, {channels} channels, 1 block per level), batch {batch}:')
        for r in bench_stages(device, batch, first_res, 4, steps_first, steps_second, channels, threads):
            print(f'  {r["name"]:28s} {r["ips"]:8.3f} img/s   peak memory {r["mem"] / 2**20:8.1f} MiB')


if __name__ == '__main__':
    main()
