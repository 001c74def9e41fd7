"""Post-hoc EMA (EDM2's): the weights of any power-function EMA profile, after training, from the
snapshots that `train.py --ema-std=...` stored (phema-<N>-<std>.pkl in the run folder). Either
relay stage: a run trains one, and its outputs are that stage's network.

Each output, OUTDIR/reconstructed-<N>-<std>.pkl, is an ordinary network snapshot (the input
snapshot of that time with the reconstructed weights: its loss_kwargs, relay settings,
augment_pipe and dataset_kwargs carried over) that generate.py, evaluate.py and
training.load_network read. The snapshots are read one at a time; memory holds one of them plus
one float64 copy of the weights per --outstd.
"""

import os

import click
import numpy as np
import torch
import tqdm

import dnnlib
import training
from torch_utils import checkpoint
from training import phema
from training.loss import training_record
from training.training_loop import NIMG, nimg_suffix, run_files


def choose_snapshots(indir, outkimg, outstd):
    """The run's snapshots up to the output time (default: the latest stored), that time, and the
    coefficients [snapshot, std] and profile error of each std of `outstd` there."""
    found = run_files(indir, rf'phema-{NIMG}-(\d\.\d{{3}})\.pkl') if os.path.isdir(indir) else []
    snapshots = [dnnlib.EasyDict(nimg=nimg, std=float(m[3]), path=path) for nimg, path, m in found]  # By time, then std.
    if not snapshots:
        raise dnnlib.UserError(f'--indir={indir} holds no phema-*.pkl snapshots; train with --ema-std to store them')
    times = sorted({s.nimg for s in snapshots})
    out_nimg = times[-1] if outkimg is None else round(outkimg * 1000)
    if out_nimg not in times:
        raise dnnlib.UserError(f'--outkimg={outkimg:g}: {indir} has no snapshot of that time; choose one of '
                               f'{", ".join(f"{t / 1000:g}" for t in times)} (see --list)')
    snapshots = [s for s in snapshots if s.nimg <= out_nimg]
    args = [s.nimg for s in snapshots], [s.std for s in snapshots], out_nimg, outstd
    coefs = phema.solve_posthoc_coefficients(*args)
    return snapshots, out_nimg, coefs, phema.profile_error(*args, coefs)


def print_listing(indir, outkimg=None, max_error=0.05):
    stds = np.round(np.arange(0.001, phema.MAX_STD, 0.001), 3)
    snapshots, out_nimg, _coefs, errors = choose_snapshots(indir, outkimg, stds)
    click.echo(f'{"kimg":>12}  stds')
    for nimg in sorted({s.nimg for s in snapshots}):
        click.echo(f'{nimg / 1000:>12g}  {" ".join(f"{s.std:.3f}" for s in snapshots if s.nimg == nimg)}')
    good = stds[errors <= max_error]
    span = f'from {good.min():.3f} to {good.max():.3f}' if len(good) else 'none'
    click.echo(f'--outstd reconstructable at {out_nimg / 1000:g} kimg (--outkimg) within --max-error={max_error:g}: {span}')


@torch.no_grad()
def reconstruct_phema(indir, outdir, outstd, outkimg=None, max_error=0.05, verbose=True):
    """Write OUTDIR/reconstructed-<N>-<std>.pkl for every std of `outstd` at `outkimg` (default: the
    latest stored); return their paths. Bad requests raise dnnlib.UserError before writing."""
    snapshots, out_nimg, coefs, errors = choose_snapshots(indir, outkimg, outstd)
    for std, error in zip(outstd, errors):
        if error > max_error:
            raise dnnlib.UserError(f'--outstd={std:.3f}: the {len(snapshots)} snapshots up to {out_nimg / 1000:g} kimg make its '
                                   f'profile only within {error:.1%} (--max-error={max_error:g}); too few or too far '
                                   f'from the tracked stds (see --list), or raise --max-error')
    paths = [os.path.join(outdir, f'reconstructed-{nimg_suffix(out_nimg)}-{std:.3f}.pkl') for std in outstd]
    problem = dnnlib.util.folder_write_problem(outdir) or next((f'{p} exists' for p in paths if os.path.lexists(p)), None)
    if problem:
        raise dnnlib.UserError(f'--outdir: {problem}; choose another --outdir or remove it')
    sums, first = None, None
    for i, snapshot in enumerate(tqdm.tqdm(snapshots, unit='snapshot', disable=not verbose)):
        data = training.load_checkpoint(snapshot.path)  # The last one (of the output time) becomes the template.
        kind = type(data['ema']).__name__, dict(getattr(data['ema'], 'init_kwargs', {})), training_record(data)
        first = first or (snapshot.path, kind)
        if kind != first[1] or not isinstance(data['ema'], torch.nn.Module):
            raise dnnlib.UserError(f'{snapshot.path}: not a network of the kind and stage of {first[0]}; '
                                   f'give --indir the snapshots of one run')
        sums = sums or [{n: torch.zeros_like(p, dtype=torch.float64) for n, p in data['ema'].named_parameters()} for _ in outstd]
        for total, coef in zip(sums, coefs[i]):
            for name, param in data['ema'].named_parameters():
                total[name].add_(param.double(), alpha=float(coef))
    for path, total, std, error in zip(paths, sums, outstd, errors):
        for name, param in data['ema'].named_parameters():
            param.copy_(total[name])
        checkpoint.save_snapshot(path, data)
        if verbose:
            click.echo(f'std {std:.3f} at {out_nimg / 1000:g} kimg from {len(snapshots)} snapshots (profile error {error:.2%}): {path}')
    return paths


@click.command()
@click.option('--indir',     help='Training run folder holding phema-*.pkl (train.py --ema-std)', metavar='DIR', required=True,
              type=click.Path(exists=True, file_okay=False))
@click.option('--list', 'list_only', help='List the stored snapshots and the reconstructable stds, then exit', is_flag=True)
@click.option('--outstd',    help='Relative standard deviations to reconstruct, e.g. 0.070,0.120', metavar='LIST', callback=phema.parse_stds)
@click.option('--outkimg',   help='Training time to reconstruct (a stored one)  [default: latest]', metavar='KIMG', type=dnnlib.util.Number(0, low_open=True))
@click.option('--outdir',    help='Where to write reconstructed-<N>-<std>.pkl (existing files are refused)', metavar='DIR')
@click.option('--max-error', help='Refuse a std whose profile the snapshots make less closely (relative L2 distance)', metavar='FLOAT', type=dnnlib.util.Number(0), default=0.05, show_default=True)
def main(indir, list_only, outstd, outkimg, outdir, max_error):
    """Reconstruct power-function EMA weights of any std from a run's stored snapshots.

    \b
    Examples:
      python reconstruct_phema.py --indir=training-runs/00000-... --list
      python reconstruct_phema.py --indir=training-runs/00000-... --outstd=0.070,0.120 --outdir=phema-out
    """
    if list_only:
        return print_listing(indir, outkimg, max_error)
    if not outstd or outdir is None:
        raise dnnlib.UserError('give --outstd and --outdir (or --list)')
    return reconstruct_phema(indir, outdir, outstd, outkimg, max_error)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
