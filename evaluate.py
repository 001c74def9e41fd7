"""Evaluate generated images: Inception activations, then FID / sFID / IS / precision / recall
with the ADM evaluator's definitions (the protocol of the RDM paper).

    # 1. Activations of samples and of the reference set (any number of GPUs / processes).
    torchrun --standalone --nproc_per_node=8 evaluate.py activations --data=samples --dest=samples.npz
    torchrun --standalone --nproc_per_node=8 evaluate.py activations --data=VIRTUAL_imagenet256_labeled.npz --dest=ref.npz

    # 2. Metrics (--ref: a path, a URL or a published set by name; `evaluate.py refs` lists them).
    python evaluate.py calc -m fid -m sfid -m is -m pr --activations_sample=samples.npz --ref=adm-imagenet-256

File formats are described in metrics/activations.py. In short: activation files hold `feat`
(2048), `s_feat` (2023) and `logits` (1008, for IS); the reference's own activation files
(feat/s_feat only) work as they are, IS then computes the logits from `feat` with the detector.
Statistics files and ADM reference batches (`mu`, `sigma`, `mu_s`, `sigma_s`) serve FID/sFID.
With `--features dinov2` the files also hold `dinov2` (1024, DINOv2 ViT-L/14) for FD-DINOv2.
"""

import json
import os
import re
import tempfile

import click
import numpy as np
import torch
import tqdm

import dnnlib

from metrics import activations as acts
from metrics import refs
from metrics.detector import DEFAULT_DETECTOR_URL, DetectorError, load_detector
from metrics.dinov2 import DINOV2_VITL14_URL, DINOv2Error, load_dinov2
from metrics.frechet import MetricInputError, compute_statistics, frechet_distance
from metrics.inception_score import inception_score
from metrics.kid import KID_MAX_SUBSETS, KID_SUBSET_SIZE, KID_SUBSETS, kernel_inception_distance
from metrics.precision_recall import precision_recall
from torch_utils import distributed as dist
from dnnlib.util import atomic_write
from training import pipeline

METRIC_ORDER = ['fid', 'sfid', 'is', 'pr', 'kid', 'fd_dinov2']
FEATURES = ['inception', 'dinov2']
_ERRORS = (MetricInputError, DetectorError, DINOv2Error, acts.ImageSourceError, acts.MetricFileError)

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


def check_writable(path, option):
    """Refuse an output that exists or cannot be written, before any work starts."""
    _refuse_existing(path, option)
    problem = dnnlib.util.file_write_problem(path)
    if problem:
        raise click.ClickException(f'{option} {path}: {problem}; choose a path in an existing, writable folder')


def _load_detectors(features, detector, dinov2, trust_detector=False):
    """One Detectors object for the requested feature kinds (rank 0 downloads first)."""
    device = dist.get_device()
    verbose = dist.get_rank() == 0
    dets, keys = [], []
    if 'inception' in features:
        dist.print0(f'Loading detector {detector} ...')
        dets.append(_rank0_first(lambda: load_detector(detector, device=device, verbose=verbose, trust_pickle=trust_detector)))
        keys += acts.INCEPTION_KEYS
    if 'dinov2' in features:
        dist.print0(f'Loading DINOv2 weights {dinov2} ...')
        dets.append(_rank0_first(lambda: load_dinov2(dinov2, device=device, verbose=verbose)))
        keys += ['dinov2']
    return (dets[0] if len(dets) == 1 else acts.Detectors(dets)), tuple(keys)

#----------------------------------------------------------------------------

@click.group()
def main():
    """Inception activations and metrics (FID, sFID, Inception Score, precision, recall, KID, FD-DINOv2).

    \b
    torchrun --standalone --nproc_per_node=1 evaluate.py activations --data=DIR|ZIP|NPZ --dest=OUT.npz
    python evaluate.py calc -m fid -m sfid -m is -m pr --activations_sample=A.npz --ref=B.npz|URL|NAME
    python evaluate.py refs      # the published reference sets --ref takes by name
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
@click.option('--features', 'features', help='Features to compute (repeatable): Inception (FID/sFID/IS/PR/KID), DINOv2 (FD-DINOv2)', metavar='inception|dinov2', type=click.Choice(FEATURES), multiple=True, default=['inception'], show_default=True)
@click.option('--dinov2',             help='DINOv2 ViT-L/14 weights (plain state dict), path or URL', metavar='PATH|URL', type=str, default=DINOV2_VITL14_URL, show_default=True)
def activations(data_path, dest_path, detector, trust_detector, batch, workers, stats_only, features, dinov2):
    """Compute Inception (and/or DINOv2) activations, or only their statistics, of a set of images.

    Sharded across torchrun processes in dataset order; the output holds feat [N, 2048],
    s_feat [N, 2023] and logits [N, 1008] (float32), plus dinov2 [N, 1024] with --features dinov2;
    or with --stats-only mu, sigma, mu_s, sigma_s (float64, ADM reference-batch keys) and
    mu_dinov2, sigma_dinov2.
    """
    dist.init()
    if not dest_path.lower().endswith('.npz'):
        raise click.ClickException(f'--dest {dest_path}: must end in .npz')
    check_writable(dest_path, '--dest')
    try:
        source = acts.open_images(data_path)
    except acts.ImageSourceError as err:
        raise click.ClickException(str(err)) from None
    if len(source) < 2:
        raise click.ClickException(f'{data_path}: found {len(source)} image(s); need at least 2 for statistics')

    det, keys = _load_detectors(features, detector, dinov2, trust_detector)

    dist.print0(f'Computing activations of {len(source)} images from {data_path} ...')
    try:
        workers = min(workers, os.cpu_count() or 1)  # More loader processes than cores only thrash.
        result = acts.compute_activations(source, det, batch_size=batch, num_workers=workers, stats_only=stats_only, keys=keys)
    except (OSError, MetricInputError, DetectorError, DINOv2Error, RuntimeError, dnnlib.UserError) as err:
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

# Per-image key, statistics keys, and what the error message calls them, per Frechet metric.
_FRECHET = {
    'fid': ('FID', 'feat', 'mu', 'sigma'),
    'sfid': ('sFID', 's_feat', 'mu_s', 'sigma_s'),
    'fd_dinov2': ('FD_DINOv2', 'dinov2', 'mu_dinov2', 'sigma_dinov2'),
}


def _statistics(mf, metric, batch, counts):
    """(mu, sigma) of a file's features for a Frechet metric; s_feat in ADM's (H, W, C) order."""
    _name, feat_key, mu_key, sigma_key = _FRECHET[metric]
    if mf.has(mu_key, sigma_key):
        return mf.get(mu_key), mf.get(sigma_key)
    if mf.has(feat_key):
        feat = _features(mf, feat_key)
        counts[mf.path] = len(feat)
        mu, sigma = compute_statistics(feat, batch_size=batch)
        return acts.spatial_stats_to_hwc(mu, sigma) if metric == 'sfid' else (mu, sigma)
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
    elif metric == 'FD_DINOv2':
        hint = '; compute them with `evaluate.py activations --features inception --features dinov2`'
    return click.ClickException(f'{metric} needs {needs} in {mf.path}, which has {mf.describe()}{hint}')


def protocol_warnings(results, sample_count, ref_count, ref_info=None):
    """One-line warnings where a run departs from the paper's evaluation protocol (not errors)."""
    lines = []
    names = [n for n in ('FID', 'sFID', 'Inception Score', 'FD_DINOv2') if n in results]
    if names and sample_count is not None and sample_count < refs.PROTOCOL_SAMPLES:
        lines.append(f'warning: {"/".join(names)} on {sample_count:,} samples; the paper\'s protocol (ADM evaluator'
                     f'{", EDM2 for FD_DINOv2" if "FD_DINOv2" in names else ""}) uses {refs.PROTOCOL_SAMPLES:,}, '
                     f'and fewer samples bias the values upward')
    if 'Precision' in results and ref_count is not None:
        expected = {ref_info.num_images: ref_info.purpose} if ref_info is not None else refs.PR_PROTOCOL_SIZES
        if ref_count not in expected:
            protocol = '; '.join(f'{n:,} for {what}' for n, what in expected.items())
            lines.append(f'warning: precision/recall against {ref_count:,} reference images; the paper\'s protocol uses {protocol}')
    return lines


def calc_metrics(metrics, sample_path, ref_path=None, detector=DEFAULT_DETECTOR_URL, batch=8192, is_bias=False,
                 kid_subsets=KID_SUBSETS, kid_subset_size=KID_SUBSET_SIZE, ref_info=None, trust_detector=False,
                 log=lambda msg: click.echo(msg, err=True)):
    """Returns {'FID': v, 'sFID': v, 'Inception Score': v, 'Precision': v, 'Recall': v, 'KID': v,
    'KID std': v, 'FD_DINOv2': v} for the requested metrics; raises click.ClickException on
    unusable input; logs a warning where the sample or reference count departs from the paper's
    protocol. is_bias: IS from logits plus the detector's classifier bias, as the reference
    evaluate.py computes it (ADM: no bias). ref_info: the refs.Reference that ref_path came from."""
    metrics = [m for m in METRIC_ORDER if m in metrics]
    if ref_path is None and any(m != 'is' for m in metrics):
        raise click.UsageError('--activations_ref is required for fid, sfid, pr, kid and fd_dinov2 (a path, URL or name; see `evaluate.py refs`)')
    results = dict()
    counts = dict()
    sample, ref = None, None
    try:
        sample = acts.MetricFile(sample_path)
        ref = acts.MetricFile(ref_path) if ref_path is not None else None
        for metric in metrics:
            if metric in _FRECHET:
                name, feat_key, mu_key, sigma_key = _FRECHET[metric]
                stats = []
                for mf in [sample, ref]:
                    st = _statistics(mf, metric, batch, counts)
                    if st is None:
                        raise _lacks(mf, name, f'{feat_key} or {mu_key}/{sigma_key}')
                    stats.append(st)
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
                counts[sample.path] = len(logits)
                results['Inception Score'] = inception_score(logits)
            elif metric in ('pr', 'kid'):
                what = 'Precision/recall' if metric == 'pr' else 'KID'
                feats = []
                for mf in [ref, sample]:
                    if not mf.has('feat'):
                        raise _lacks(mf, what, 'per-image feat (statistics are not enough)')
                    feats.append(_features(mf, 'feat'))
                    counts[mf.path] = len(feats[-1])
                if metric == 'pr':
                    results['Precision'], results['Recall'] = precision_recall(feats[0], feats[1])
                else:
                    results['KID'], results['KID std'] = kernel_inception_distance(
                        feats[1], feats[0], num_subsets=kid_subsets, subset_size=kid_subset_size)
    except _ERRORS as err:
        raise click.ClickException(str(err)) from None
    finally:
        for mf in [sample, ref]:
            if mf is not None:
                mf.close()
    for line in protocol_warnings(results, counts.get(sample_path), counts.get(ref_path), ref_info):
        log(line)
    return results


def _resolve_ref(ref_path):
    """A reference name -> its cached download; paths and URLs unchanged."""
    try:
        return refs.resolve(ref_path, verbose=True) if ref_path is not None else (None, None)
    except (OSError, ValueError) as err:
        raise click.ClickException(f'--ref {ref_path}: {err}') from None


@main.command()
@click.option('-m', 'metrics',        help='Metric to compute (repeatable)', metavar='fid|sfid|is|pr|kid|fd_dinov2', type=click.Choice(METRIC_ORDER), multiple=True, required=True)
@click.option('--activations_sample', '--activations-sample', 'sample_path', help='Sample activations .npz (path or URL)', metavar='NPZ', type=str, required=True)
@click.option('--ref', '--activations_ref', '--activations-ref', 'ref_path', help='Reference activations, statistics or ADM reference batch .npz: path, URL, or a name from `evaluate.py refs`', metavar='NPZ|URL|NAME', type=str, default=None)
@click.option('--detector',           help='Detector for IS when the sample file has feat but no logits', metavar='PATH|URL', type=str, default=DEFAULT_DETECTOR_URL, show_default=True)
@click.option('--trust-detector', 'trust_detector', help='Allow a .pkl detector to run the code stored in it (needed for NVIDIA\'s Inception pickle, the default)', is_flag=True)
@click.option('--batch',              help='Rows per batch for statistics', metavar='INT', type=click.IntRange(min=1), default=8192, show_default=True)
@click.option('--is-bias',            help='IS with the classifier bias added to the logits, as the reference evaluate.py (default: ADM, no bias)', is_flag=True)
@click.option('--kid-subsets',        help='KID: number of random subsets (torch-fidelity default)', metavar='INT', type=click.IntRange(min=1, max=KID_MAX_SUBSETS), default=KID_SUBSETS, show_default=True)
@click.option('--kid-subset-size',    help='KID: rows per subset, drawn from each set (torch-fidelity default)', metavar='INT', type=click.IntRange(min=2), default=KID_SUBSET_SIZE, show_default=True)
@click.option('--json', 'json_path',  help='Also write the results to this JSON file (must not exist)', metavar='FILE', type=str, default=None)
def calc(metrics, sample_path, ref_path, detector, trust_detector, batch, is_bias, kid_subsets, kid_subset_size, json_path):
    """Compute metrics from activation / statistics files; prints `FID: v` etc.

    FID/sFID: Frechet distance of feat / s_feat statistics. IS: from the sample's logits.
    Precision/recall: ADM's k=3 manifold estimator on per-image feat of both files.
    KID: unbiased polynomial-kernel MMD on feat, mean and std over random subsets, as
    torch-fidelity computes it (seed 2020). FD_DINOv2: Frechet distance of the DINOv2 features
    (`activations --features dinov2`). Fewer than 50,000 samples, or a precision/recall
    reference of another size than the paper's, prints a warning (not an error).
    """
    if dist.get_rank() != 0:  # Under torchrun only rank 0 works; nothing here needs more.
        return
    if json_path is not None:
        check_writable(json_path, '--json')
    local_ref, ref_info = _resolve_ref(ref_path)
    results = calc_metrics(metrics, sample_path, local_ref, detector=detector, batch=batch, is_bias=is_bias,
                           kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, ref_info=ref_info, trust_detector=trust_detector)
    for name, value in results.items():
        print(f'{name}: {value:g}')
    if json_path is not None:
        payload = dict(results, activations_sample=sample_path, activations_ref=ref_path)
        with atomic_write(json_path, 'w') as f:
            json.dump(payload, f, indent=2)

#----------------------------------------------------------------------------
# gen: metrics straight from the networks.

MAX_GEN_SEEDS = 10_000_000


def _parse_seeds(text):
    """'1,2,5-10' -> list, counted before it is built (at most MAX_GEN_SEEDS)."""
    try:
        return dnnlib.util.parse_int_list(text, limit=MAX_GEN_SEEDS, max_value=pipeline.MAX_SEED, what='seeds')
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--seeds'") from None


def _sampler_options(fn):
    """Every sampler option of the generate scripts, under the same flags (None = preset,
    checkpoint, then sampler default, resolved and range-checked by training.pipeline)."""
    for name in reversed(list(pipeline.SAMPLER_OPTIONS)):
        integer = name.startswith(('num_steps', 'up_scale'))
        fn = click.option(pipeline.flag(name), name, metavar='INT' if integer else 'FLOAT', type=int if integer else float, default=None,
                          help=f'Sampler option {pipeline.flag(name)} as in generate.py  [default: preset / checkpoint]')(fn)
    return fn


def generate_activations(pipe, seeds, det, keys, batch, class_idx=None, outdir=None, progress=True):
    """Sample `seeds` sharded across processes as generate.py does, run the detector on the
    uint8 images (the PNGs' pixels), and return on rank 0 the activations in seed order."""
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = pipeline.plan_batches(seeds, batch, world)
    positions, start = [], 0
    for b in batches:
        positions.append(torch.arange(start, start + len(b)))
        start += len(b)
    per_rank = [[p for p in positions[r::world] if len(p)] for r in range(world)]
    outputs = {k: [] for k in keys}
    bar = tqdm.tqdm(total=len(seeds), unit='img', disable=(not progress or rank != 0), dynamic_ncols=True)
    error = None
    try:
        for b in batches[rank::world]:
            if len(b):
                images = pipe(b, class_idx=class_idx, batch_size=len(b))
                if outdir is not None:
                    for seed, img in zip(b, pipe.to_pil(images)):
                        path = os.path.join(outdir, f'{seed - seed % 1000:06d}', f'{seed:06d}.png')
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        with atomic_write(path, 'wb') as f:
                            img.save(f, format='PNG')
                out = det(images)
                for k in keys:
                    outputs[k].append(out[k].cpu())
            bar.update(len(b) * world)
    except Exception as err:  # pylint: disable=broad-exception-caught
        error = err  # Re-raised below, after telling the other processes not to wait for us.
    finally:
        bar.close()
    if not _all_ranks_ok(error is None):
        raise error if error is not None else RuntimeError('another process failed; see its message')
    return acts.gather_rows(outputs, per_rank, len(seeds), det.device)


@main.command()
@click.option('--network_first',      help='First stage network (.pkl, .pt, .safetensors)', metavar='PATH|URL', type=str, required=True)
@click.option('--network_second',     help='Second stage network (.pkl, .pt, .safetensors)', metavar='PATH|URL', type=str, required=True)
@click.option('--preset',             help='Sampler settings and post-processing of a generate script', type=click.Choice(list(pipeline.PRESETS)), default='generate', show_default=True)
@click.option('--seeds',              help='Random seeds (e.g. 1,2,5-10)  [default: the preset\'s, 50,000 for imagenet, 30,000 for celebahq]', metavar='LIST', type=str, default=None)
@click.option('--class', 'class_idx', help='Class label  [default: seed % classes]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--postprocess',        help='Override the preset\'s post-processing of the images', type=click.Choice(list(pipeline.POSTPROCESS)), default=None)
@click.option('--batch',              help='Images per batch per process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('-m', 'metrics',        help='Metric to compute (repeatable)', metavar='fid|sfid|is|pr|kid|fd_dinov2', type=click.Choice(METRIC_ORDER), multiple=True, required=True)
@click.option('--ref',                'ref_path', help='Reference: path, URL, or a name from `evaluate.py refs`', metavar='NPZ|URL|NAME', type=str, default=None)
@click.option('--detector',           help='Inception detector, path or URL', metavar='PATH|URL', type=str, default=DEFAULT_DETECTOR_URL, show_default=True)
@click.option('--trust-detector', 'trust_detector', help='Allow a .pkl detector to run the code stored in it (needed for NVIDIA\'s Inception pickle, the default)', is_flag=True)
@click.option('--dinov2',             help='DINOv2 ViT-L/14 weights for fd_dinov2, path or URL', metavar='PATH|URL', type=str, default=DINOV2_VITL14_URL, show_default=True)
@click.option('--dest', 'dest_path',  help='Also keep the sample activations in this .npz (must not exist)', metavar='NPZ', type=str, default=None)
@click.option('--outdir',             help='Also keep the images as PNGs here (generate.py\'s layout)', metavar='DIR', type=str, default=None)
@click.option('--json', 'json_path',  help='Also write the results to this JSON file (must not exist)', metavar='FILE', type=str, default=None)
@_sampler_options
def gen(network_first, network_second, preset, seeds, class_idx, postprocess, batch, metrics, ref_path, detector, trust_detector, dinov2,
        dest_path, outdir, json_path, **sampler_options):
    """Sample the relay in memory and print its metrics (one command, under torchrun).

    The images are exactly those generate.py (or the preset's script) would write as PNGs,
    post-processing included; the detectors see them as uint8, as they would read the PNGs.

    \b
    torchrun --standalone --nproc_per_node=8 evaluate.py gen --preset=imagenet \
        --network_first=first.pkl --network_second=second.pt -m fid -m sfid -m is --ref=adm-imagenet-256
    """
    dist.init()
    seeds = _parse_seeds(seeds if seeds is not None else pipeline.PRESETS[preset]['seeds'])
    if ref_path is None and any(m != 'is' for m in metrics):
        raise click.UsageError('--ref is required for fid, sfid, pr, kid and fd_dinov2 (a path, URL or name; see `evaluate.py refs`)')
    if dest_path is not None:
        if not dest_path.lower().endswith('.npz'):
            raise click.ClickException(f'--dest {dest_path}: must end in .npz')
        check_writable(dest_path, '--dest')
    if json_path is not None:
        check_writable(json_path, '--json')
    if outdir is not None:
        if not outdir.strip():
            raise click.ClickException('--outdir is empty; name a folder')
        if os.path.exists(outdir) and not os.path.isdir(outdir):
            raise click.ClickException(f'--outdir {outdir} is a file; choose a folder')
        try:
            os.makedirs(outdir, exist_ok=True)
        except OSError as err:
            raise click.ClickException(f'--outdir {outdir} cannot be created ({err.strerror or err}); choose a writable folder') from None
        check_writable(os.path.join(outdir, '.probe'), '--outdir')
    try:
        pipe = pipeline.RelayPipeline(network_first, network_second, preset=preset, device=dist.get_device(), postprocess=postprocess,
                                      warn=False, **sampler_options)
        pipe.check_class(class_idx)
    except (pipeline.RelayError, OSError) as err:
        raise click.ClickException(str(err)) from None
    for note in pipe.warnings:
        dist.print0(f'warning: {note}')
    features = ['inception'] if any(m != 'fd_dinov2' for m in metrics) else []
    features += ['dinov2'] if 'fd_dinov2' in metrics else []
    det, keys = _load_detectors(features, detector, dinov2, trust_detector)
    (local_ref, ref_info), error = (None, None), None
    if dist.get_rank() == 0:  # Download (once) and check the reference before the long work.
        try:
            local_ref, ref_info = _resolve_ref(ref_path)
        except click.ClickException as err:
            error = err
    if not _all_ranks_ok(error is None):
        raise error if error is not None else click.ClickException('rank 0 could not get the reference; see its message')

    dist.print0(f'Sampling {len(seeds)} images and computing their activations ...')
    try:
        result = generate_activations(pipe, seeds, det, keys, batch, class_idx=class_idx, outdir=outdir)
    except (pipeline.RelayError, MetricInputError, DetectorError, DINOv2Error, OSError, RuntimeError) as err:
        message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise click.ClickException(message) from None
    if dist.get_rank() != 0:
        return
    for key, value in result.items():
        if not np.isfinite(value).all():
            raise click.ClickException(f'{key} contains NaN or inf; check the networks and the detector')
    with tempfile.TemporaryDirectory() as tmp:
        sample_path = dest_path if dest_path is not None else os.path.join(tmp, 'activations.npz')
        with atomic_write(sample_path, 'wb') as f:
            np.savez(f, **result)
        results = calc_metrics(metrics, sample_path, local_ref, detector=detector, ref_info=ref_info, trust_detector=trust_detector)
    for name, value in results.items():
        print(f'{name}: {value:g}')
    if json_path is not None:
        with atomic_write(json_path, 'w') as f:
            json.dump(dict(results, network_first=network_first, network_second=network_second, preset=preset,
                           num_samples=len(seeds), activations_ref=ref_path), f, indent=2)

#----------------------------------------------------------------------------

@main.command(name='refs')
def refs_command():
    """List the published reference sets that `calc --ref NAME` downloads (once, into the cache)."""
    for line in refs.describe():
        print(line)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
