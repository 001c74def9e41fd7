"""Timings of the metric computations against the reference-style computation, same run.

    python benchmarks/bench_metrics.py                      # 50k samples x 10k refs x 2048-d (slow on CPU)
    python benchmarks/bench_metrics.py --samples 10000 --refs 5000   # quicker

Frechet distance: our eigenvalue form vs scipy.linalg.sqrtm of the product (ADM / reference),
on covariances of synthetic Inception-like features (non-negative, correlated).
Precision/recall: metrics.precision_recall (torch, float32 with exact float64 settlement; CUDA
when present) vs tests/reference_restatement.ref_precision_recall (numpy float64 distance blocks
and per-chunk np.partition, as the reference). Both must give identical numbers.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click
import numpy as np
import torch

from metrics.frechet import compute_statistics, frechet_distance
from metrics.precision_recall import precision_recall

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests'))
from reference_restatement import ref_frechet_distance, ref_precision_recall  # noqa: E402


def fake_inception_features(n, dim, seed, rank=64):
    # Low-rank structure + noise through a ReLU: clustered, non-negative, like pool3 features.
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(1234).standard_normal([rank, dim]).astype(np.float32) / np.sqrt(rank)
    z = rng.standard_normal([n, rank]).astype(np.float32)
    x = z @ basis + 0.5 * rng.standard_normal([n, dim]).astype(np.float32) + 0.3
    return np.maximum(x, 0)


def timed(fn, repeat=1):
    # Best of `repeat`: on a shared machine the minimum is the least disturbed measurement.
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, min(times)


@click.command()
@click.option('--samples', help='Sample count', type=int, default=50000, show_default=True)
@click.option('--refs', help='Reference count', type=int, default=10000, show_default=True)
@click.option('--dim', help='Feature dimension', type=int, default=2048, show_default=True)
@click.option('--fid-dim', help='Dimension for the Frechet distance timing', type=int, default=2048, show_default=True)
@click.option('--skip-pr', help='Time only the Frechet distance', is_flag=True)
@click.option('--skip-fid', help='Time only precision/recall', is_flag=True)
@click.option('--skip-reference-pr', help='Do not time the (slow) numpy precision/recall', is_flag=True)
@click.option('--device', help='Device for our precision/recall', type=str, default=None)
@click.option('--repeat', help='Repetitions (best time is reported) for the Frechet distance', type=int, default=3, show_default=True)
@click.option('--pr-repeat', help='Repetitions for precision/recall', type=int, default=1, show_default=True)
def main(samples, refs, dim, fid_dim, skip_pr, skip_fid, skip_reference_pr, device, repeat, pr_repeat):
    print(f'torch {torch.__version__}, numpy {np.__version__}, threads {torch.get_num_threads()}, '
          f'cuda {torch.cuda.is_available()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')

    if not skip_fid:
        bench_fid(fid_dim, repeat)
    if not skip_pr:
        bench_pr(samples, refs, dim, device, pr_repeat, skip_reference_pr)


def bench_fid(fid_dim, repeat):
    # Frechet distance at fid_dim.
    a = fake_inception_features(max(2 * fid_dim, 4096), fid_dim, seed=1)
    b = fake_inception_features(max(2 * fid_dim, 4096), fid_dim, seed=2) * 1.05
    (mu1, s1), (mu2, s2) = compute_statistics(a), compute_statistics(b)
    ours, t_ours = timed(lambda: frechet_distance(mu1, s1, mu2, s2), repeat)
    ref, t_ref = timed(lambda: ref_frechet_distance(mu1, s1, mu2, s2), repeat)
    print(f'Frechet distance {fid_dim}-d: eigen {t_ours:.2f} s, sqrtm {t_ref:.2f} s, speed-up {t_ref / t_ours:.1f}x, '
          f'values {ours:.10g} vs {ref:.10g}, rel diff {abs(ours - ref) / abs(ref):.2e}')


def bench_pr(samples, refs, dim, device, pr_repeat, skip_reference_pr):
    ref_feats = fake_inception_features(refs, dim, seed=3)
    smp_feats = fake_inception_features(samples, dim, seed=4) * 1.02
    (p, r, info), t_ours = timed(lambda: precision_recall(ref_feats, smp_feats, device=device, return_info=True), pr_repeat)
    print(f'Precision/recall {samples} x {refs} x {dim}: ours {t_ours:.1f} s -> P {p:.6f} R {r:.6f} ({info})')
    if not skip_reference_pr:
        (p2, r2), t_ref = timed(lambda: ref_precision_recall(ref_feats, smp_feats), pr_repeat)
        print(f'Precision/recall reference-style numpy float64: {t_ref:.1f} s -> P {p2:.6f} R {r2:.6f}; '
              f'speed-up {t_ref / t_ours:.1f}x, identical: {(p, r) == (p2, r2)}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
