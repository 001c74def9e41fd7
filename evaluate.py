"""Evaluate generated images: Inception activations, then FID / sFID / IS / precision / recall
with the ADM evaluator's definitions (the protocol of the RDM paper).

    # 1. Activations of samples and of the reference set (any number of GPUs / processes).
    torchrun --standalone --nproc_per_node=8 evaluate.py activations --data=samples --dest=samples.npz
    torchrun --standalone --nproc_per_node=8 evaluate.py activations --data=VIRTUAL_imagenet256_labeled.npz --dest=ref.npz

    # 2. Metrics (--ref: a path, a URL or a published set by name; `evaluate.py refs` lists them).
    python evaluate.py calc -m fid -m sfid -m is -m pr --activations_sample=samples.npz --ref=adm-imagenet-256

    # Or straight from the networks: one relay (gen), every snapshot of a training run (sweep).
    torchrun --standalone --nproc_per_node=8 evaluate.py sweep --run-dir=training-runs/00000-... -m fid --ref=adm-imagenet-256 --num-images=10000

File formats are described in metrics/activations.py. In short: activation files hold `feat`
(2048), `s_feat` (2023) and `logits` (1008, for IS); the reference's own activation files
(feat/s_feat only) work as they are, IS then computes the logits from `feat` with the detector.
Statistics files and ADM reference batches (`mu`, `sigma`, `mu_s`, `sigma_s`) serve FID/sFID.
With `--features dinov2` the files also hold `dinov2` (1024, DINOv2 ViT-L/14) for FD-DINOv2.
"""

import json
import os
import re

import click
import numpy as np
import torch
import tqdm

import dnnlib
import training
from metrics import activations as acts
from metrics import refs
from metrics import sweep as run_metrics
from metrics.compute import METRICS, compute_metrics
from metrics.detector import DEFAULT_DETECTOR_URL, load_detector
from metrics.dinov2 import DINOV2_VITL14_URL
from metrics.kid import KID_MAX_SUBSETS, KID_SUBSET_SIZE, KID_SUBSETS
from metrics.sweep import load_detectors, open_reference
from torch_utils import distributed as dist
from training import loss, pipeline, training_loop
from training.dataset import ImageFolderDataset

#----------------------------------------------------------------------------
# The one error handler: what a library, a reader process or the disk raises becomes one line.

class _Commands(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (dnnlib.UserError, OSError, RuntimeError) as err:
            # --help exits through click.exceptions.Exit (a RuntimeError); a one-line ClickException is fine as it is.
            if isinstance(err, click.exceptions.Exit) or (isinstance(err, click.ClickException) and '\n' not in err.message):
                raise
            # DataLoader workers re-raise a reader's error with the worker's traceback in its text:
            # keep its last line, without the exception's type name; of other texts the first line.
            lines = str(err).strip().splitlines() or [type(err).__name__]
            text = lines[-1] if 'Traceback (most recent call last)' in str(err) else lines[0]
            raise dnnlib.UserError(re.sub(r'^[\w.]+(Error|Exception): ', '', text)) from None


@click.group(cls=_Commands)
def main():
    """Inception activations and metrics (FID, sFID, Inception Score, precision, recall, KID, FD-DINOv2).

    \b
    torchrun --standalone --nproc_per_node=1 evaluate.py activations --data=DIR|ZIP|NPZ --dest=OUT.npz
    python evaluate.py calc -m fid -m sfid -m is -m pr --activations_sample=A.npz --ref=B.npz|URL|NAME
    python evaluate.py refs      # the published reference sets --ref takes by name
    """

#----------------------------------------------------------------------------
# Options and steps shared by the commands.

DETECTOR = click.option('--detector', help='Inception detector: NVIDIA .pkl or pytorch-fid .pth, path or URL', metavar='PATH|URL', default=DEFAULT_DETECTOR_URL, show_default=True)
TRUST_DETECTOR = click.option('--trust-detector', 'trust_detector', help='Allow a .pkl detector to run the code stored in it (needed for NVIDIA\'s Inception pickle, the default)', is_flag=True)
DINOV2 = click.option('--dinov2', help='DINOv2 ViT-L/14 weights (plain state dict) for fd_dinov2, path or URL', metavar='PATH|URL', default=DINOV2_VITL14_URL, show_default=True)
METRIC_OPTION = click.option('-m', 'metrics', help='Metric to compute (repeatable)', metavar='fid|sfid|is|pr|kid|fd_dinov2', type=click.Choice(METRICS), multiple=True, required=True)
JSON = click.option('--json', 'json_path', help='Also write the results to this JSON file (must not exist)', metavar='FILE')


def check_writable(path, option, suffix=None):
    """Refuse an output that exists or cannot be written, before any work starts."""
    if path is None:
        return
    if suffix is not None and not path.lower().endswith(suffix):
        raise dnnlib.UserError(f'{option} {path}: must end in {suffix}')
    if os.path.exists(path):
        raise dnnlib.UserError(f'{path} already exists; choose another {option} or remove it first')
    problem = dnnlib.util.file_write_problem(path)
    if problem:
        raise dnnlib.UserError(f'{option} {path}: {problem}; choose a path in an existing, writable folder')


def on_rank0(fn):
    """fn() on rank 0 only, while the others wait for it without a deadline; an error of rank 0
    is raised there, and on the others as one pointing to it (dist.rank0_first)."""
    dist.rank0_first(lambda: fn() if dist.get_rank() == 0 else None)


def save_arrays(path, arrays):
    for key, value in arrays.items():
        if not np.isfinite(value).all():
            raise dnnlib.UserError(f'{key} contains NaN or inf; check the images, the networks and the detector')
    pipeline.save(path, lambda f: np.savez(f, **arrays))
    print(f'Saved {", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items())} to {path}')


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


def report(metrics, sample, ref, ref_info, json_path, record, **kwargs):
    """Compute, print `Name: value` lines (protocol warnings on stderr) and write --json."""
    results, counts = compute_metrics(metrics, sample, ref, **kwargs)
    for line in protocol_warnings(results, counts.get(sample.path), counts.get(ref.path) if ref else None, ref_info):
        click.echo(line, err=True)
    for name, value in results.items():
        print(f'{name}: {value:g}')
    if json_path is not None:
        pipeline.save(json_path, lambda f: json.dump(dict(results, **record), f, indent=2), 'w')

#----------------------------------------------------------------------------

@main.command()
@click.option('--data', 'data_path', help='Images: folder (recursive), dataset .zip, or ADM-style .npz (arr_0, uint8 NHWC)', metavar='PATH', required=True)
@click.option('--dest', 'dest_path',  help='Output .npz (must not exist)', metavar='NPZ', required=True)
@DETECTOR
@click.option('--batch',              help='Images per batch per process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--workers',            help='Data loader worker processes per process', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True)
@TRUST_DETECTOR
@click.option('--stats-only', 'stats_only', help='Write only mu/sigma/mu_s/sigma_s (streamed; for huge reference sets)', is_flag=True)
@click.option('--features', 'features', help='Features to compute (repeatable): Inception (FID/sFID/IS/PR/KID), DINOv2 (FD-DINOv2)', metavar='inception|dinov2', type=click.Choice(['inception', 'dinov2']), multiple=True, default=['inception'], show_default=True)
@DINOV2
def activations(data_path, dest_path, detector, trust_detector, batch, workers, stats_only, features, dinov2):
    """Compute Inception (and/or DINOv2) activations, or only their statistics, of a set of images.

    Sharded across torchrun processes in dataset order; the output holds feat [N, 2048],
    s_feat [N, 2023] and logits [N, 1008] (float32), plus dinov2 [N, 1024] with --features dinov2;
    or with --stats-only mu, sigma, mu_s, sigma_s (float64, ADM reference-batch keys) and
    mu_dinov2, sigma_dinov2.
    """
    dist.init()
    check_writable(dest_path, '--dest', '.npz')
    source = acts.open_images(data_path)
    if len(source) < 2:
        raise dnnlib.UserError(f'{data_path}: found {len(source)} image(s); need at least 2 for statistics')
    dets = load_detectors(features, detector, dinov2, trust_detector)
    dist.print0(f'Computing activations of {len(source)} images from {data_path} ...')
    workers = min(workers, os.cpu_count() or 1)  # More loader processes than cores only thrash.
    result = acts.compute_activations(source, dets, batch_size=batch, num_workers=workers, stats_only=stats_only)
    on_rank0(lambda: save_arrays(dest_path, result))

#----------------------------------------------------------------------------

def _is_logits(sample, detector, is_bias, trust_detector, batch):
    """The Inception Score's logits of a sample: stored (ADM: without the classifier's bias), or
    computed from feat with the detector's classifier; is_bias adds the bias as the reference
    evaluate.py does."""
    stored = sample.has('logits')
    if stored and not is_bias:
        return sample.features('logits', chunk=5000)  # The splits of the score, one at a time.
    what = 'Adding the classifier bias of' if stored else f'No logits in {sample.path}: computing them from feat with'
    click.echo(f'{what} {detector} ...', err=True)
    fc = load_detector(detector, device=dist.get_device(), trust_pickle=trust_detector).fc
    blocks = sample.features('logits' if stored else 'feat', chunk=batch)  # Checked [N, D].
    if not stored and sample.shape('feat')[1] != fc.in_features:
        raise dnnlib.UserError(f'{sample.path}: feat has {sample.shape("feat")[1]} values per image; the detector\'s classifier '
                               f'takes {fc.in_features} (was feat made with another detector?)')
    w = fc.weight.to(torch.float32)
    out = np.concatenate([block if stored else (torch.as_tensor(block, dtype=torch.float32, device=w.device) @ w.T).cpu().numpy()
                          for block in blocks])
    return out + fc.bias.detach().cpu().numpy().astype(out.dtype) if is_bias else out


@main.command()
@METRIC_OPTION
@click.option('--activations_sample', '--activations-sample', 'sample_path', help='Sample activations .npz (path or URL)', metavar='NPZ', required=True)
@click.option('--ref', '--activations_ref', '--activations-ref', 'ref_path', help='Reference activations, statistics or ADM reference batch .npz: path, URL, or a name from `evaluate.py refs`', metavar='NPZ|URL|NAME')
@DETECTOR
@TRUST_DETECTOR
@click.option('--batch',              help='Rows per batch for statistics', metavar='INT', type=click.IntRange(min=1), default=8192, show_default=True)
@click.option('--is-bias',            help='IS with the classifier bias added to the logits, as the reference evaluate.py (default: ADM, no bias)', is_flag=True)
@click.option('--kid-subsets',        help='KID: number of random subsets (torch-fidelity default)', metavar='INT', type=click.IntRange(min=1, max=KID_MAX_SUBSETS), default=KID_SUBSETS, show_default=True)
@click.option('--kid-subset-size',    help='KID: rows per subset, drawn from each set (torch-fidelity default)', metavar='INT', type=click.IntRange(min=2), default=KID_SUBSET_SIZE, show_default=True)
@JSON
def calc(metrics, sample_path, ref_path, detector, trust_detector, batch, is_bias, kid_subsets, kid_subset_size, json_path):
    """Compute metrics from activation / statistics files; prints `FID: v` etc.

    FID/sFID: Frechet distance of feat / s_feat statistics. IS: from the sample's logits (or from
    its feat with --detector's classifier). Precision/recall: ADM's k=3 manifold estimator on
    per-image feat of both files. KID: unbiased polynomial-kernel MMD on feat, mean and std over
    random subsets, as torch-fidelity computes it (seed 2020). FD_DINOv2: Frechet distance of the
    DINOv2 features (`activations --features dinov2`). Fewer than 50,000 samples, or a
    precision/recall reference of another size than the paper's, prints a warning (not an error).
    Under torchrun rank 0 does the work; the others wait for it.
    """
    def work():
        check_writable(json_path, '--json')
        ref, ref_info = open_reference(ref_path, metrics, '--activations_ref')
        sample = acts.FeatureSet(sample_path)
        report(metrics, sample, ref, ref_info, json_path, dict(activations_sample=sample_path, activations_ref=ref_path),
               is_logits=lambda fs: _is_logits(fs, detector, is_bias, trust_detector, batch), batch=batch,
               kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    dist.init()
    on_rank0(work)

#----------------------------------------------------------------------------
# gen: metrics straight from the networks.

@main.command()
@click.option('--network_first',      help='First stage network (.pkl, .pt, .safetensors)', metavar='PATH|URL', required=True)
@click.option('--network_second',     help='Second stage network (.pkl, .pt, .safetensors)', metavar='PATH|URL', required=True)
@click.option('--preset',             help='Sampler settings and post-processing of a generate script', type=click.Choice(list(pipeline.PRESETS)), default='generate', show_default=True)
@click.option('--seeds',              help='Random seeds (e.g. 1,2,5-10)  [default: the preset\'s, 50,000 for imagenet, 30,000 for celebahq]', metavar='LIST', type=dnnlib.util.seeds(pipeline.MAX_SEEDS))
@click.option('--class', 'class_idx', help='Class label  [default: seed % classes]', metavar='INT', type=click.IntRange(min=0))
@click.option('--postprocess',        help='Override the preset\'s post-processing of the images', type=click.Choice(list(pipeline.POSTPROCESS)))
@click.option('--batch',              help='Images per batch per process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@METRIC_OPTION
@click.option('--ref',                'ref_path', help='Reference: path, URL, or a name from `evaluate.py refs`', metavar='NPZ|URL|NAME')
@DETECTOR
@TRUST_DETECTOR
@DINOV2
@click.option('--dest', 'dest_path',  help='Also keep the sample activations in this .npz (must not exist)', metavar='NPZ')
@click.option('--outdir',             help='Also keep the images as PNGs here (generate.py\'s layout)', metavar='DIR')
@JSON
@pipeline.sampler_click_options('preset / checkpoint')
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
    seeds = pipeline.check_seeds(seeds if seeds is not None else pipeline.PRESETS[preset]['seeds'])
    pipeline.resolve_options(preset, sampler_options)
    check_writable(dest_path, '--dest', '.npz')
    check_writable(json_path, '--json')
    if outdir is not None:
        pipeline.check_outdir(outdir)
    ref, ref_info = dist.rank0_first(lambda: open_reference(ref_path, metrics))  # Every input, before the long work.
    pipe = dist.rank0_first(lambda: pipeline.RelayPipeline(network_first, network_second, preset=preset, device=dist.get_device(),
                                                           postprocess=postprocess, warn=False, **sampler_options))
    pipe.check_class(class_idx)
    for note in pipe.warnings:
        dist.print0(f'warning: {note}')
    dets = load_detectors(run_metrics.metric_features(metrics), detector, dinov2, trust_detector)

    def batches():
        for b in pipe.batches(seeds, batch, class_idx, distributed=True):
            for seed, image in zip(b.seeds, b.images) if outdir is not None else ():
                pipeline.save_png(image, pipeline.image_path(outdir, seed))
            yield b.indices, b.images, b.done
    dist.print0(f'Sampling {len(seeds)} images and computing their activations ...')
    result = acts.detect(batches(), dets, len(seeds))

    def finish():
        if dest_path is not None:
            save_arrays(dest_path, result)
        report(metrics, acts.FeatureSet(result), ref, ref_info, json_path, dict(network_first=network_first, network_second=network_second,
               preset=preset, num_samples=len(seeds), activations_ref=ref_path))
    on_rank0(finish)

#----------------------------------------------------------------------------
# sweep: metrics of every snapshot of a training run.

@main.command()
@click.option('--run-dir', '--run', 'run_dir', help='Training run folder (its network-snapshot-*.pkl)', metavar='DIR', required=True,
              type=click.Path(exists=True, file_okay=False))
@METRIC_OPTION
@click.option('--ref',                'ref_path', help='Reference: path, URL, or a name from `evaluate.py refs`  [default with --relay-from-data: the dataset images]', metavar='NPZ|URL|NAME')
@click.option('--num-images', '--num', 'num', help='Images per snapshot: seeds 0..num-1, or as many dataset images with --relay-from-data', metavar='INT', type=click.IntRange(min=2, max=pipeline.MAX_SEEDS), default=10000, show_default=True)
@click.option('--preset',             help='Sampler settings and post-processing of a generate script', type=click.Choice(list(pipeline.PRESETS)), default='generate', show_default=True)
@click.option('--network_first',      help='Second-stage run: the first stage whose images the relay takes', metavar='PATH|URL')
@click.option('--relay-from-data',    help='Second-stage run: relay the run\'s dataset images downsampled by up_scale, as its sample grid (the second stage alone)', is_flag=True)
@click.option('--data', 'data_path',  help='The run\'s dataset for --relay-from-data  [default: the path its snapshots record]', metavar='ZIP|DIR')
@click.option('--batch',              help='Images per batch per process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@DETECTOR
@TRUST_DETECTOR
@DINOV2
@pipeline.sampler_click_options('preset / checkpoint')
def sweep(run_dir, metrics, ref_path, num, preset, network_first, relay_from_data, data_path, batch, detector, trust_detector, dinov2,
          **sampler_options):
    """Measure every network snapshot of a training run (under torchrun too); the best is printed at the end.

    Results go to RUN/metrics-<tag>.jsonl, one line per snapshot and metric, as each snapshot is
    done, and RUN/metrics-<tag>.png plots them against kimg; tag = --num and 8 hex digits of the
    SHA-1 of the other settings (metrics/sweep.py). A rerun with the same settings measures only
    what the file lacks. First-stage runs sample with EDM's sampler; second-stage runs relay the
    images of --network_first, or with --relay-from-data those of the run's dataset.

    Under torchrun spell --run and --num as --run-dir and --num-images: torchrun's own parser
    takes --run for --run-path and --num for --numa-binding.

    \b
    torchrun --standalone --nproc_per_node=8 evaluate.py sweep --run-dir=training-runs/00001-... -m fid --ref=adm-imagenet-256
    """
    dist.init()
    device, options = dist.get_device(), {k: v for k, v in sampler_options.items() if v is not None}
    pipeline.resolve_options(preset, options)
    snapshots = training_loop.run_files(run_dir, rf'network-snapshot-{training_loop.NIMG}\.pkl')
    if not snapshots:
        raise dnnlib.UserError(f'{run_dir}: no network-snapshot-*.pkl in it; give the folder of a training run')
    data = dist.rank0_first(lambda: training.load_checkpoint(snapshots[0][1]))
    stage = loss.training_record(data).stage
    if (stage == 'second') != (relay_from_data or network_first is not None):
        raise dnnlib.UserError(f'{snapshots[0][1]} is a {stage}-stage snapshot: ' + ('give --network_first for the relay, or --relay-from-data'
                               if stage == 'second' else '--network_first and --relay-from-data are for second-stage runs'))
    kwargs = {k: v for k, v in (data.get('dataset_kwargs') or {}).items() if k in ('path', 'resolution', 'max_size', 'use_labels', 'xflip')}
    dataset = ImageFolderDataset(**dict(kwargs, path=data_path or kwargs.get('path', ''))) if relay_from_data else None
    run = run_metrics.RunMetrics(run_dir, metrics, num, ref_path, detector, dinov2, trust_detector, preset, options, network_first, dataset,
                                 data, batch, device)
    done = {(line['snapshot'], line['metric']) for line in run.lines}
    todo = [(nimg, path, missing) for nimg, path, _ in snapshots if (missing := [m for m in metrics if (os.path.basename(path), m) not in done])]
    dist.print0(f'{len(snapshots) - len(todo)} of {len(snapshots)} snapshots already measured; results in {run.path}.jsonl')
    for nimg, path, missing in tqdm.tqdm(todo, unit='snapshot', disable=dist.get_rank() != 0):
        data = dist.rank0_first(lambda: training.load_checkpoint(path))
        if loss.training_record(data).stage != stage:
            raise dnnlib.UserError(f'{run_dir} mixes stages: {path} is not a {stage}-stage snapshot like {snapshots[0][1]}; sweep one run at a time')
        run.measure(data['ema'], data, os.path.basename(path), nimg / 1000, missing)
    for name, (kimg, value, snapshot, best) in run_metrics.plot(run.lines, run.path + '.png').items() if dist.get_rank() == 0 else ():
        print(f'Best {name}: {value[best]:g} at {snapshot[best]} ({kimg[best]:g} kimg)')

#----------------------------------------------------------------------------

@main.command(name='refs')
def refs_command():
    """List the published reference sets that `calc --ref NAME` downloads (once, into the cache)."""
    print('\n'.join(refs.describe()))

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
