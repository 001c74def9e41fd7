"""The metrics of `evaluate.py calc` and `evaluate.py gen` from two feature sets.

A feature set is an activations.FeatureSet: an .npz (activations, statistics or an ADM reference
batch) or the arrays evaluate.py gen computed in memory. Which keys each metric reads:

    FID / sFID / FD_DINOv2   feat / s_feat / dinov2 of both sets, or their statistics (mu, sigma /
                             mu_s, sigma_s / mu_dinov2, sigma_dinov2); s_feat statistics are
                             permuted to ADM's (H, W, C) order first.
    Inception Score          the sample's logits (the caller may compute them from feat).
    Precision / recall, KID  feat of both sets (statistics are not enough).
"""

import dnnlib

from . import activations
from .frechet import compute_statistics, frechet_distance
from .inception_score import inception_score
from .kid import KID_SUBSET_SIZE, KID_SUBSETS, kernel_inception_distance
from .precision_recall import precision_recall

# The results of each metric (printed names), in the order they are computed and printed.
RESULTS = {'fid': ['FID'], 'sfid': ['sFID'], 'is': ['Inception Score'], 'pr': ['Precision', 'Recall'], 'kid': ['KID', 'KID std'],
           'fd_dinov2': ['FD_DINOv2']}
METRICS = list(RESULTS)

# Per-image key and statistics keys of each Frechet metric.
FRECHET = {'fid': ('feat', 'mu', 'sigma'), 'sfid': ('s_feat', 'mu_s', 'sigma_s'), 'fd_dinov2': ('dinov2', 'mu_dinov2', 'sigma_dinov2')}


def _lacks(fs, what, needs):
    hint = ''
    if fs.has('arr_0'):
        hint = f'; it holds images (arr_0): run `evaluate.py activations --data {fs.path} --dest ACTS.npz` and pass ACTS.npz'
    elif what == 'FD_DINOv2':
        hint = '; compute them with `evaluate.py activations --features inception --features dinov2`'
    return dnnlib.UserError(f'{what} needs {needs} in {fs.path}, which has {", ".join(sorted(fs.keys)) or "nothing"}{hint}')


def check_inputs(metrics, sample, ref):
    """Refuse, before any work, a set (None: not known yet) that lacks what a metric reads."""
    for metric in metrics:
        for fs in [fs for fs in (sample, ref) if fs is not None]:
            if metric in FRECHET:
                key, mu, sigma = FRECHET[metric]
                if not (fs.has(key) or fs.has(mu, sigma)):
                    raise _lacks(fs, RESULTS[metric][0], f'{key} or {mu}/{sigma}')
            elif metric in ('pr', 'kid') and not fs.has('feat'):
                raise _lacks(fs, 'Precision/recall' if metric == 'pr' else 'KID', 'per-image feat (statistics are not enough)')
        if metric == 'is' and sample is not None and not sample.has('logits') and not sample.has('feat'):
            raise _lacks(sample, 'Inception Score', 'logits or feat')


def _statistics(fs, metric, batch):
    key, mu, sigma = FRECHET[metric]
    if fs.has(mu, sigma):
        return fs.get(mu), fs.get(sigma), None
    blocks = fs.features(key, chunk=batch)  # Checked [N, D]; read in blocks, the file is never held whole.
    if metric == 'sfid' and fs.shape(key)[1] % activations.SPATIAL_CHANNELS:
        raise dnnlib.UserError(f'{fs.path}: s_feat has {fs.shape(key)[1]} values per image, not a multiple of the '
                               f'{activations.SPATIAL_CHANNELS} channels of mixed_6/conv; was it made by another detector?')
    stats = compute_statistics(blocks)
    return *(activations.spatial_stats_to_hwc(*stats) if metric == 'sfid' else stats), fs.shape(key)[0]


def compute_metrics(metrics, sample, ref=None, is_logits=None, batch=8192, kid_subsets=KID_SUBSETS, kid_subset_size=KID_SUBSET_SIZE):
    """Returns ({'FID': v, 'sFID': v, 'Inception Score': v, 'Precision': v, 'Recall': v, 'KID': v,
    'KID std': v, 'FD_DINOv2': v} for the requested metrics, {set: number of images read}).
    is_logits(sample): the logits for the Inception Score (default: the sample's own)."""
    metrics = [m for m in METRICS if m in metrics]
    check_inputs(metrics, sample, ref)
    results, counts = {}, {}
    for metric in metrics:
        if metric in FRECHET:
            (mu1, sigma1, n1), (mu2, sigma2, n2) = (_statistics(fs, metric, batch) for fs in (sample, ref))
            counts.update({fs.path: n for fs, n in ((sample, n1), (ref, n2)) if n is not None})
            values = [frechet_distance(mu1, sigma1, mu2, sigma2, what=(sample.path, ref.path))]
        elif metric == 'is':
            values = [inception_score(is_logits(sample) if is_logits else sample.features('logits', chunk=5000))]
            counts[sample.path] = sample.shape('logits' if sample.has('logits') else 'feat')[0]  # Checked [N, D] by now.
        else:
            smp, rf = sample.features('feat'), ref.features('feat')
            if smp.shape[1] != rf.shape[1]:
                raise dnnlib.UserError(f'feature dimensions differ: {smp.shape[1]} in {sample.path}, {rf.shape[1]} in {ref.path}')
            counts.update({sample.path: len(smp), ref.path: len(rf)})
            values = (precision_recall(rf, smp) if metric == 'pr'
                      else kernel_inception_distance(smp, rf, num_subsets=kid_subsets, subset_size=kid_subset_size))
        results.update(zip(RESULTS[metric], values))
    return results, counts
