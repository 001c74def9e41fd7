"""Evaluate generated images: Inception activations, then FID / sFID / IS / precision / recall
with the ADM evaluator's definitions (the protocol of the RDM paper).

    # 1. Activations of samples and of the reference set (any number of GPUs / processes).
    torchrun --standalone --nproc_per_node=8 evaluate.py activations --data=samples --dest=samples.npz
    torchrun --standalone --nproc_per_node=8 evaluate.py activations --data=VIRTUAL_imagenet256_labeled.npz --dest=ref.npz

    # 2. Metrics.
    python evaluate.py calc -m fid -m sfid -m is -m pr --activations_sample=samples.npz --activations_ref=ref.npz

File formats are described in metrics/activations.py. In short: activation files hold `feat`
(2048), `s_feat` (2023) and `logits` (1008, for IS); the reference's own activation files
(feat/s_feat only) work as they are, IS then computes the logits from `feat` with the detector.
Statistics files and ADM reference batches (`mu`, `sigma`, `mu_s`, `sigma_s`) serve FID/sFID.
"""

import json
import os
import re

import click
import numpy as np
import torch

from metrics import activations as acts
from metrics.detector import DEFAULT_DETECTOR_URL, DetectorError, load_detector
from metrics.frechet import MetricInputError, compute_statistics, frechet_distance
from metrics.inception_score import inception_score
from metrics.precision_recall import precision_recall
from torch_utils import distributed as dist
from torch_utils.misc import atomic_write

METRIC_ORDER = ['fid', 'sfid', 'is', 'pr']
_ERRORS = (MetricInputError, DetectorError, acts.ImageSourceError, acts.MetricFileError)

#----------------------------------------------------------------------------

def _all_ranks_ok(ok):
    return acts.all_ranks_ok(ok, dist.get_device())


def _rank0_first(fn):
    """Run fn on rank 0 first (downloads land in the cache once), then on the others."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except _ERRORS as err:
            error = err
    if not _all_ranks_ok(error is None):
        raise click.ClickException(str(error) if error is not None else 'rank 0 failed; see its message')
    if dist.get_rank() != 0:
        result = fn()
    return result


def _refuse_existing(path, option):
    if os.path.exists(path):
        raise click.ClickException(f'{path} already exists; choose another {option} or remove it first')

#----------------------------------------------------------------------------

@click.group()
def main():
    """Inception activations and metrics (FID, sFID, Inception Score, precision, recall).

    \b
    torchrun --standalone --nproc_per_node=1 evaluate.py activations --data=DIR|ZIP|NPZ --dest=OUT.npz
    python evaluate.py calc -m fid -m sfid -m is -m pr --activations_sample=A.npz --activations_ref=B.npz
    """

#----------------------------------------------------------------------------

@main.command()
@click.option('--data', 'data_path', help='Images: folder (recursive), dataset .zip, or ADM-style .npz (arr_0, uint8 NHWC)', metavar='PATH', type=str, required=True)
@click.option('--dest', 'dest_path',  help='Output .npz (must not exist)', metavar='NPZ', type=str, required=True)
@click.option('--detector',           help='Detector: NVIDIA Inception .pkl or pytorch-fid .pth, path or URL', metavar='PATH|URL', type=str, default=DEFAULT_DETECTOR_URL, show_default=True)
@click.option('--batch',              help='Images per batch per process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers',            help='Data loader worker processes per process', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True)
@click.option('--trust-detector', 'trust_detector', help='Allow a .pkl detector to run the code stored in it (needed for NVIDIA\'s Inception pickle, the default)', is_flag=True)
@click.option('--stats-only', 'stats_only', help='Write only mu/sigma/mu_s/sigma_s (streamed; for huge reference sets)', is_flag=True)
def activations(data_path, dest_path, detector, trust_detector, batch, workers, stats_only):
    """Compute Inception activations (or only their statistics) of a set of images.

    Sharded across torchrun processes in dataset order; the output holds feat [N, 2048],
    s_feat [N, 2023] and logits [N, 1008] (float32), or with --stats-only mu, sigma, mu_s,
    sigma_s (float64, ADM reference-batch keys).
    """
    dist.init()
    if not dest_path.lower().endswith('.npz'):
        raise click.ClickException(f'--dest {dest_path}: must end in .npz')
    _refuse_existing(dest_path, '--dest')
    try:
        source = acts.open_images(data_path)
    except acts.ImageSourceError as err:
        raise click.ClickException(str(err)) from None
    if len(source) < 2:
        raise click.ClickException(f'{data_path}: found {len(source)} image(s); need at least 2 for statistics')

    dist.print0(f'Loading detector {detector} ...')
    device = dist.get_device()
    det = _rank0_first(lambda: load_detector(detector, device=device, verbose=(dist.get_rank() == 0), trust_pickle=trust_detector))

    dist.print0(f'Computing activations of {len(source)} images from {data_path} ...')
    try:
        workers = min(workers, os.cpu_count() or 1)  # More loader processes than cores only thrash.
        result = acts.compute_activations(source, det, batch_size=batch, num_workers=workers, stats_only=stats_only)
    except (OSError, MetricInputError, DetectorError, RuntimeError) as err:
        # DataLoader workers re-raise reader errors (e.g. an unreadable image) with the worker's
        # traceback in the text: keep its last line, without the exception's type name.
        message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise click.ClickException(re.sub(r'^[\w.]+(Error|Exception): ', '', message)) from None

    error = None
    if dist.get_rank() == 0:
        try:
            for key, value in result.items():
                if not np.isfinite(value).all():
                    raise click.ClickException(f'{key} contains NaN or inf; check the images and the detector')
            with atomic_write(dest_path, 'wb') as f:
                np.savez(f, **result)
            print(f'Saved {", ".join(f"{k} {list(v.shape)}" for k, v in result.items())} to {dest_path}')
        except (click.ClickException, OSError) as err:
            error = err if isinstance(err, click.ClickException) else click.ClickException(f'cannot write {dest_path}: {err}')
    if not _all_ranks_ok(error is None):
        raise error if error is not None else click.ClickException('rank 0 could not write the output; see its message')

#----------------------------------------------------------------------------

def _statistics(mf, spatial, batch):
    """(mu, sigma) of `feat` (spatial=False) or of `s_feat` in ADM's (H, W, C) order."""
    mu_key, sigma_key, feat_key = ('mu_s', 'sigma_s', 's_feat') if spatial else ('mu', 'sigma', 'feat')
    if mf.has(mu_key, sigma_key):
        return mf.get(mu_key), mf.get(sigma_key)
    if mf.has(feat_key):
        mu, sigma = compute_statistics(_features(mf, feat_key), batch_size=batch)
        return acts.spatial_stats_to_hwc(mu, sigma) if spatial else (mu, sigma)
    return None


def _features(mf, key):
    x = mf.get(key)
    if x.ndim != 2:
        raise MetricInputError(f'{mf.path}: {key} has shape {list(x.shape)}; expected [N, D]')
    if not np.isfinite(x).all():
        raise MetricInputError(f'{mf.path}: {key} contains NaN or inf')
    return x


def _lacks(mf, metric, needs):
    hint = ''
    if mf.has('arr_0'):
        hint = f'; it holds images (arr_0): run `evaluate.py activations --data {mf.path} --dest ACTS.npz` and pass ACTS.npz'
    return click.ClickException(f'{metric} needs {needs} in {mf.path}, which has {mf.describe()}{hint}')


def calc_metrics(metrics, sample_path, ref_path=None, detector=DEFAULT_DETECTOR_URL, batch=8192, is_bias=False,
                 trust_detector=False, log=lambda msg: click.echo(msg, err=True)):
    """Returns {'FID': v, 'sFID': v, 'Inception Score': v, 'Precision': v, 'Recall': v} for the
    requested metrics; raises click.ClickException on unusable input. is_bias: IS from logits plus
    the detector's classifier bias, as the reference evaluate.py computes it (ADM: no bias)."""
    metrics = [m for m in METRIC_ORDER if m in metrics]
    if ref_path is None and any(m != 'is' for m in metrics):
        raise click.UsageError('--activations_ref is required for fid, sfid and pr')
    results = dict()
    sample, ref = None, None
    try:
        sample = acts.MetricFile(sample_path)
        ref = acts.MetricFile(ref_path) if ref_path is not None else None
        for metric in metrics:
            if metric in ('fid', 'sfid'):
                spatial = metric == 'sfid'
                need = 's_feat or mu_s/sigma_s' if spatial else 'feat or mu/sigma'
                name = 'sFID' if spatial else 'FID'
                stats = []
                for mf in [sample, ref]:
                    s = _statistics(mf, spatial, batch)
                    if s is None:
                        raise _lacks(mf, name, need)
                    stats.append(s)
                results[name] = frechet_distance(*stats[0], *stats[1], what=(sample.path, ref.path))
            elif metric == 'is':
                if sample.has('logits'):
                    logits = _features(sample, 'logits')  # Stored without bias (ADM).
                    if is_bias:
                        log(f'Adding the classifier bias of {detector} to the logits ...')
                        det = load_detector(detector, device=dist.get_device(), include_bias=True, trust_pickle=trust_detector)
                        logits = logits + det.out_bias.detach().cpu().numpy().astype(logits.dtype)
                elif sample.has('feat'):
                    feat = _features(sample, 'feat')
                    log(f'No logits in {sample.path}: computing them from feat with {detector} ...')
                    det = load_detector(detector, device=dist.get_device(), include_bias=is_bias, trust_pickle=trust_detector)
                    logits = np.concatenate([det.logits(torch.from_numpy(np.asarray(feat[i:i + batch], dtype=np.float32))).cpu().numpy()
                                             for i in range(0, len(feat), batch)])
                else:
                    raise _lacks(sample, 'Inception Score', 'logits or feat')
                results['Inception Score'] = inception_score(logits)
            elif metric == 'pr':
                feats = []
                for mf in [ref, sample]:
                    if not mf.has('feat'):
                        raise _lacks(mf, 'Precision/recall', 'per-image feat (statistics are not enough)')
                    feats.append(_features(mf, 'feat'))
                results['Precision'], results['Recall'] = precision_recall(feats[0], feats[1])
    except _ERRORS as err:
        raise click.ClickException(str(err)) from None
    finally:
        for mf in [sample, ref]:
            if mf is not None:
                mf.close()
    return results


@main.command()
@click.option('-m', 'metrics',        help='Metric to compute (repeatable)', metavar='fid|sfid|is|pr', type=click.Choice(METRIC_ORDER), multiple=True, required=True)
@click.option('--activations_sample', '--activations-sample', 'sample_path', help='Sample activations .npz (path or URL)', metavar='NPZ', type=str, required=True)
@click.option('--activations_ref', '--activations-ref', 'ref_path', help='Reference activations, statistics or ADM reference batch .npz', metavar='NPZ', type=str, default=None)
@click.option('--detector',           help='Detector for IS when the sample file has feat but no logits', metavar='PATH|URL', type=str, default=DEFAULT_DETECTOR_URL, show_default=True)
@click.option('--trust-detector', 'trust_detector', help='Allow a .pkl detector to run the code stored in it (needed for NVIDIA\'s Inception pickle, the default)', is_flag=True)
@click.option('--batch',              help='Rows per batch for statistics', metavar='INT', type=click.IntRange(min=1), default=8192, show_default=True)
@click.option('--is-bias',            help='IS with the classifier bias added to the logits, as the reference evaluate.py (default: ADM, no bias)', is_flag=True)
@click.option('--json', 'json_path',  help='Also write the results to this JSON file (must not exist)', metavar='FILE', type=str, default=None)
def calc(metrics, sample_path, ref_path, detector, trust_detector, batch, is_bias, json_path):
    """Compute metrics from activation / statistics files; prints `FID: v` etc.

    FID/sFID: Frechet distance of feat / s_feat statistics. IS: from the sample's logits.
    Precision/recall: ADM's k=3 manifold estimator on per-image feat of both files.
    """
    if dist.get_rank() != 0:  # Under torchrun only rank 0 works; nothing here needs more.
        return
    if json_path is not None:
        _refuse_existing(json_path, '--json')
    results = calc_metrics(metrics, sample_path, ref_path, detector=detector, batch=batch, is_bias=is_bias, trust_detector=trust_detector)
    for name, value in results.items():
        print(f'{name}: {value:g}')
    if json_path is not None:
        payload = dict(results, activations_sample=sample_path, activations_ref=ref_path)
        with atomic_write(json_path, 'w') as f:
            json.dump(payload, f, indent=2)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
