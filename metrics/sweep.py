"""Metrics over a training run: every network snapshot measured on the same seeds (or the same
dataset images), recorded in RUN_DIR/metrics-<tag>.jsonl and plotted in RUN_DIR/metrics-<tag>.png.

`evaluate.py sweep` measures the snapshots of a run folder; `train.py --metrics` measures each
snapshot as the training writes it. Both go through RunMetrics (the training's with
the settings of a default sweep), so their figures and their record agree. The
sampling draws from per-seed generators only, never from the global random streams that the
training draws from (tests/test_sweep.py checks that the weights stay bit-identical).

What a snapshot's images are (RunMetrics.measure): a first-stage run, EDM's sampler from seeds
0..num-1 (as evaluate.py gen samples them); a second-stage run, the relay after a given first
stage, or (grid: a training.sample_grid.SampleGrid of the run's dataset) the relay of num
dataset images downsampled by up_scale and upsampled back, as the training's sample grid does,
which measures the second stage alone; the reference then defaults to those dataset images.

The tag is the sample count and the first 8 hex digits of the SHA-1 of the JSON of the other
settings that change the values (preset, sampler options as given, reference, detectors, first
stage or dataset relay): the same settings continue one file, other settings start another.
The .jsonl holds one line per snapshot and result: snapshot (file name), kimg, metric (-m name),
name (printed name), value, num, seconds (the snapshot's measurement), options (the sampler
options in effect), settings. It is rewritten atomically after each snapshot, so a kill leaves
whole snapshots only, and what it holds is not measured again.
"""

import hashlib
import json
import os
import time

import click

import dnnlib
from torch_utils import distributed as dist
from torch_utils import training_stats
from training import loss, pipeline, sample_grid

from . import activations as acts
from . import refs
from .compute import RESULTS, check_inputs, compute_metrics
from .detector import DEFAULT_DETECTOR_URL, load_detector
from .dinov2 import DINOV2_VITL14_URL, load_dinov2


def load_detectors(features, detector, dinov2, trust_detector=False):
    """The detectors of the requested feature kinds; rank 0 loads first (a download lands in the
    cache once), the others wait without a deadline."""
    device, verbose, dets = dist.get_device(), dist.get_rank() == 0, []
    if 'inception' in features:
        dist.print0(f'Loading detector {detector} ...')
        dets.append(dist.rank0_first(lambda: load_detector(detector, device=device, verbose=verbose, trust_pickle=trust_detector)))
    if 'dinov2' in features:
        dist.print0(f'Loading DINOv2 weights {dinov2} ...')
        dets.append(dist.rank0_first(lambda: load_dinov2(dinov2, device=device, verbose=verbose)))
    return dets


def open_reference(ref_path, metrics, flag='--ref'):
    """(FeatureSet, refs.Reference or None) of --ref, checked for what the metrics read (a
    published set is downloaded into the cache); (None, None) when no metric needs it."""
    if ref_path is None:
        if any(m != 'is' for m in metrics):
            raise click.UsageError(f'{flag} is required for fid, sfid, pr, kid and fd_dinov2 (a path, URL or name; see `evaluate.py refs`)')
        return None, None
    try:
        local, info = refs.resolve(ref_path, verbose=True)
    except (OSError, ValueError) as err:
        raise dnnlib.UserError(f'{flag} {ref_path}: {err}') from None
    check_inputs(metrics, None, ref := acts.FeatureSet(local, name=ref_path))
    return ref, info


def metric_features(metrics):
    """The feature kinds (evaluate.py activations --features) that the metrics read."""
    return ['inception'] * any(m != 'fd_dinov2' for m in metrics) + ['dinov2'] * ('fd_dinov2' in metrics)


def features(make, num, batch, detectors, name=None):
    """FeatureSet of the images make(indices) gives for 0..num-1, sharded over the processes as
    evaluate.py gen shards seeds; on rank 0, None elsewhere. Collective."""
    result = acts.detect(((idx, make(idx), done) for idx, done in dist.my_batches(num, batch)), detectors, num, progress=False)
    return acts.FeatureSet(result, name=name) if result is not None else None


class RunMetrics:
    """The metrics of a run's snapshots with fixed settings (evaluate.py sweep's options), and their
    record in run_dir: read by every rank that is given run_dir, written by rank 0. Loads the
    detectors, the reference (grid and no ref: the grid's dataset images) and network_first.
    stats: also report each measurement and its cost to training_stats (the training's stats.jsonl)."""

    def __init__(self, run_dir, metrics, num, ref=None, detector=DEFAULT_DETECTOR_URL, dinov2=DINOV2_VITL14_URL, trust_detector=False,
                 preset='generate', options=None, network_first=None, dataset=None, loss_kwargs=None, batch=64, device=None,
                 ref_flag='--ref', stats=False):
        self.metrics, self.num, self.batch, self.device, self.stats = metrics, num, batch, device, stats
        relay = dataset is not None and loss.training_record(loss_kwargs).stage == 'second'
        self.grid = grid = sample_grid.SampleGrid(dataset, loss_kwargs, num_images=num, device=device) if relay else None
        self.settings = dict(preset=preset, options=options or {}, ref=ref, detector=detector, dinov2=dinov2, network_first=network_first,
                             relay_from_data=grid is not None)
        self.first = dist.rank0_first(lambda: pipeline.load_stage(network_first, 'first', device)[0]) if network_first else None
        self.detectors = load_detectors(metric_features(metrics), detector, dinov2, trust_detector)
        self.ref = (features(lambda i: grid.images[i], num, batch, self.detectors, 'the dataset images') if ref is None and grid is not None
                    else dist.rank0_first(lambda: open_reference(ref, metrics, ref_flag)[0]))
        self.tag = f'{num}-{hashlib.sha1(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:8]}'
        self.path, self.lines = run_dir and os.path.join(run_dir, f'metrics-{self.tag}'), []
        if self.path is not None and os.path.exists(self.path + '.jsonl'):
            with open(self.path + '.jsonl', encoding='utf-8') as f:
                try:
                    self.lines = [json.loads(line) for line in f]
                except ValueError as err:
                    raise dnnlib.UserError(f'{self.path}.jsonl: not JSON lines ({err}); move it away to measure anew') from None

    def measure(self, net, source, snapshot, kimg, metrics=None):
        """{name: value} of the metrics of the EMA network `net` of a snapshot on rank 0, recorded
        and plotted; None elsewhere. Collective. source: the snapshot or the training's
        loss_kwargs (what training.loss.training_record reads). The images: seeds 0..num-1 of the
        first stage, or of the relay after network_first, or the relay of the grid's images."""
        start, metrics, preset, record = time.time(), metrics or self.metrics, self.settings['preset'], loss.training_record(source)
        options = pipeline.resolve_options(preset, self.settings['options'], record.relay)[0]
        pipe = pipeline.RelayPipeline(*((self.first, net) if record.stage == 'second' else (net, None)), preset=preset, device=self.device,
                                      warn=False, **options)  # The networks (guides too) prepared, and the options checked.
        if self.grid is not None:
            make = lambda idx: pipeline.to_uint8(self.grid.relay_batch(pipe.net_second, idx, **pipe.second_kwargs)[1]).cpu()
        else:
            make = lambda idx: pipe(idx, batch_size=len(idx))
        sample = features(make, self.num, self.batch, self.detectors)
        results, names = sample and compute_metrics(metrics, sample, self.ref)[0], [name for m in metrics for name in RESULTS[m]]
        for name in names if self.stats else ():
            training_stats.report0(f'Metrics/{name}', results[name] if results else 0)  # The other ranks register the names.
        seconds = training_stats.report0('Timing/metrics_sec', time.time() - start) if self.stats else time.time() - start
        dist.print0(f'Metrics of {snapshot}: ' + ', '.join(f'{n} {results[n]:g}' for n in names if results) + f' ({seconds:.1f} s)')
        if self.path is not None and results:
            new = [dict(snapshot=snapshot, kimg=kimg, metric=m, name=name, value=results[name], num=self.num, seconds=seconds,
                        options=options, settings=self.settings) for m in metrics for name in RESULTS[m]]
            new = json.loads(json.dumps(new), parse_constant=str)  # Strict JSON for other readers: S_max=inf as "Infinity".
            self.lines = sorted({(x['snapshot'], x['name']): x for x in self.lines + new}.values(), key=lambda x: x['kimg'])  # New ones win.
            pipeline.save(self.path + '.jsonl', lambda f: f.writelines(json.dumps(line) + '\n' for line in self.lines), 'w')
            plot(self.lines, self.path + '.png')
        return results


def plot(lines, path):
    """Draw the record's results against kimg into a PNG, one panel per result, the best marked;
    returns what it drew: {name: (kimgs, values, snapshots, index of the best)}."""
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel  # Only here: the rest runs without it.
    drawn, names = {}, list(dict.fromkeys(line['name'] for line in lines))
    fig = Figure(figsize=(6, 2.5 * len(names)), layout='constrained')
    for ax, name in zip(fig.subplots(len(names), 1, squeeze=False)[:, 0], names):
        kimg, value, snapshot = zip(*[(line['kimg'], line['value'], line['snapshot']) for line in lines if line['name'] == name])
        best = (max if name in ('Inception Score', 'Precision', 'Recall') else min)(range(len(value)), key=value.__getitem__)
        ax.plot(kimg, value, '.-', [kimg[best]], [value[best]], 'r*', markersize=10)
        ax.set(xlabel='kimg', ylabel=name, title=f'best {name} {value[best]:.4g} at {kimg[best]:g} kimg ({snapshot[best]})')
        drawn[name] = (kimg, value, snapshot, best)
    pipeline.save(path, lambda f: fig.savefig(f, format='png'))
    return drawn
