"""Relay sampler benchmark.

1. The blur sampler's own work per step outside the network (block DCTs, blur schedule, noise),
   ours vs the reference's way of doing it, side by side in one run: 256 px, batch 8, float64,
   with a network stand-in that costs nothing. The reference's way (re-stated below): FFT-based
   DCTs on rearranged blocks, get_alpha_t through scipy on the host twice a step, the 16-roll
   block noise, and per-seed draws stacked with torch.stack.
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
import scipy.stats
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import sampling  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))
from reference_restatement import RefGenerators, ref_alpha, ref_block_noise  # noqa: E402
from training import blurring  # noqa: E402

#----------------------------------------------------------------------------
# The reference's per-step machinery, re-stated (same operations, same costs).

def ref_dct_1d(x):
    # Orthonormal DCT-II along the last axis through an FFT of the even/odd-reordered signal.
    shape, n = x.shape, x.shape[-1]
    x = x.contiguous().view(-1, n)
    v = torch.cat([x[:, ::2], x[:, 1::2].flip([1])], dim=1)
    spec = torch.view_as_real(torch.fft.fft(v, dim=1))
    k = -torch.arange(n, dtype=x.dtype, device=x.device)[None, :] * np.pi / (2 * n)
    out = spec[:, :, 0] * torch.cos(k) - spec[:, :, 1] * torch.sin(k)
    out[:, 0] /= np.sqrt(n) * 2
    out[:, 1:] /= np.sqrt(n / 2) * 2
    return 2 * out.view(*shape)


def ref_idct_1d(X):
    shape, n = X.shape, X.shape[-1]
    Xv = X.contiguous().view(-1, n) / 2
    Xv[:, 0] *= np.sqrt(n) * 2
    Xv[:, 1:] *= np.sqrt(n / 2) * 2
    k = torch.arange(n, dtype=X.dtype, device=X.device)[None, :] * np.pi / (2 * n)
    wr, wi = torch.cos(k), torch.sin(k)
    vi = torch.cat([Xv[:, :1] * 0, -Xv.flip([1])[:, :-1]], dim=1)
    spec = torch.cat([(Xv * wr - vi * wi).unsqueeze(2), (Xv * wi + vi * wr).unsqueeze(2)], dim=2)
    v = torch.fft.irfft(torch.view_as_complex(spec), n=n, dim=1)
    x = v.new_zeros(v.shape)
    x[:, ::2] += v[:, :n - n // 2]
    x[:, 1::2] += v.flip([1])[:, :n // 2]
    return x.view(*shape)


def _to_blocks(x, k):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, k, k)


def _from_blocks(x, size):
    _, c, _, k = x.shape
    return x.reshape(-1, size // k, size // k, c, k, k).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, size, size)


def ref_dct_2d(x, k):
    size = x.shape[-1]
    y = ref_dct_1d(ref_dct_1d(_to_blocks(x, k)).transpose(-1, -2)).transpose(-1, -2)
    return _from_blocks(y, size)


def ref_idct_2d(X, k):
    size = X.shape[-1]
    y = ref_idct_1d(ref_idct_1d(_to_blocks(X, k)).transpose(-1, -2)).transpose(-1, -2)
    return _from_blocks(y, size)


def ref_blur_sampler(net, latents, randn_like, num_steps, truncation_sigma=0.9, truncation_t=0.93, up_scale=4,
                     s_block=0.15, s_noise=0.2, blur_sigma_max=3, sigma_min=0.008, sigma_max=80, rho=7):
    k, size, dev = up_scale, latents.shape[-1], latents.device
    t = sampling.time_steps(num_steps, sigma_min, sigma_max, rho, dev)
    t = t[int((t < truncation_sigma).nonzero()[0]):]
    n = len(t)
    t = torch.cat([t, torch.zeros_like(t[:1])])
    x = latents.to(torch.float64)
    x = x + randn_like(x) * t[0] + s_block * ref_block_noise(latents, randn_like, k) * t[0]
    for i in range(n):
        t_cur, t_next = t[i], t[i + 1]
        den = net(x, t_cur).to(torch.float64)
        if i == n - 1:
            return den
        a_next = ref_alpha(t_next, k, size, truncation_t, blur_sigma_max, device=dev)
        a_cur = ref_alpha(t_cur, k, size, truncation_t, blur_sigma_max, device=dev)
        u_cur = ref_dct_2d(x, k)
        d_cur = (u_cur - ref_dct_2d(den, k)) / t_cur
        gamma = (1 - s_noise ** 2) ** 0.5 * t_next / t_cur
        x_e = ref_idct_2d((a_next + gamma - gamma * a_cur) * u_cur + t_cur * (gamma * a_cur - a_next) * d_cur, k) \
            + s_noise * t_next * (randn_like(x) + s_block * ref_block_noise(latents, randn_like, k))
        den = net(x_e, t_next).to(torch.float64)
        d_prime = (ref_dct_2d(x_e, k) - ref_dct_2d(den, k)) / t_next
        x = ref_idct_2d((a_next + gamma - gamma * a_cur) * u_cur + t_cur * (gamma * a_cur - a_next) * (d_cur + d_prime) / 2, k) \
            + s_noise * t_next * (randn_like(x_e) + s_block * ref_block_noise(latents, randn_like, k))
    return x

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
    x_ref = ref_blur_sampler(net, latents, RefGenerators(seeds, device).randn_like, num_steps)
    x_ours = sampling.blur_sampler(net, latents, None, sampling.StackedRandomGenerator(device, seeds).randn_like, num_steps=num_steps)
    max_diff = (x_ref - x_ours).abs().max().item()

    t_ours, t_ref = _time_pair(
        lambda: sampling.blur_sampler(net, latents, None, sampling.StackedRandomGenerator(device, seeds).randn_like, num_steps=num_steps),
        lambda: ref_blur_sampler(net, latents, RefGenerators(seeds, device).randn_like, num_steps), device, repeats)
    per_ref, per_ours = t_ref / (n_eff - 1), t_ours / (n_eff - 1)

    # Where the time goes (one step's worth of each piece, ours vs reference).
    x = latents.clone()
    t0 = torch.tensor(0.5, dtype=torch.float64, device=device)
    rnd = sampling.StackedRandomGenerator(device, seeds)
    ref_rnd = RefGenerators(seeds, device)
    pieces = [
        ('4 DCT + 2 IDCT', lambda: [blurring.block_dct(x, k) for _ in range(4)] + [blurring.block_idct(x, k) for _ in range(2)],
                           lambda: [ref_dct_2d(x, k) for _ in range(4)] + [ref_idct_2d(x, k) for _ in range(2)]),
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
