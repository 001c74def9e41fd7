"""evaluate.py sweep and train.py --metrics: every snapshot of a run measured as evaluate.py gen
measures one, resumable, plotted; the training's weights untouched by the measurement."""

import json
import os
import re
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

import evaluate
import train
import training
from conftest import perturbed_net as _net
from conftest import run_cli, write_fake_nvidia_detector, write_images
from metrics import sweep
from torch_utils import checkpoint

BLUR = dict(class_name='training.loss.BlurLoss', up_scale=4, block_scale=0.15, prob_length=0.93, blur_sigma_max=3)
FAST = ['--num_steps_first=3', '--num_steps_second=4', '--batch=3']


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A second-stage run of 3 snapshots (out of training order by name length), a first stage,
    a random-weight detector, a reference and the run's dataset."""
    d = tmp_path_factory.mktemp('sweep')
    rng = np.random.default_rng(0)
    write_images(d / 'data', list(rng.integers(0, 256, [6, 32, 32, 3], dtype=np.uint8)))
    for idx, name in enumerate(['000000_004', '000000_400', '000001']):
        checkpoint.save_snapshot(str(d / 'run' / f'network-snapshot-{name}.pkl'), dict(ema=_net(32, idx), loss_kwargs=BLUR,
                                 dataset_kwargs=dict(path=str(d / 'data'))))
    checkpoint.save_snapshot(str(d / 'first.pkl'), dict(ema=_net(8, 9)))
    np.savez(d / 'ref.npz', feat=rng.standard_normal([6, 32]).astype(np.float32))
    return dict(d=d, run=str(d / 'run'), first=str(d / 'first.pkl'), det=write_fake_nvidia_detector(d), ref=str(d / 'ref.npz'))


def _sweep(s, run, *extra):
    return run_cli(evaluate.main, 'sweep', '--run-dir', run, '-m', 'fid', '-m', 'is', '--ref', s['ref'], '--detector', s['det'], '--trust-detector',
                   '--num=5', '--preset=celebahq', *FAST, *extra)


def _jsonl(run):
    (path,) = [os.path.join(run, n) for n in os.listdir(run) if n.startswith('metrics-') and n.endswith('.jsonl')]
    return path


def _records(run):
    # Strict JSON (no NaN/Infinity tokens), which jq and other readers need; S_max is inf by default.
    with open(_jsonl(run), encoding='utf-8') as f:
        records = [json.loads(line, parse_constant=lambda token: pytest.fail(f'{token} in the record')) for line in f]
    assert all(r['options']['S_max_first'] == 'Infinity' for r in records)
    return records


def test_sweep_equals_gen_resumes_and_plots(setup, tmp_path, monkeypatch):
    s, run = setup, str(tmp_path / 'run')
    shutil.copytree(s['run'], run)
    # A sweep killed after its first snapshot...
    real, measured = sweep.RunMetrics.measure, []

    def measure(self, net, record, snapshot, kimg, metrics=None):
        if measured and not os.environ.get('SWEEP_RESUMED'):
            raise KeyboardInterrupt
        measured.append(snapshot)
        return real(self, net, record, snapshot, kimg, metrics)
    monkeypatch.setattr(sweep.RunMetrics, 'measure', measure)
    res = _sweep(s, run, '--network_first', s['first'])
    assert res.exit_code == 1 and 'Aborted!' in res.output, res.output
    assert measured == ['network-snapshot-000000_004.pkl']
    assert [(r['snapshot'], r['name']) for r in _records(run)] == [('network-snapshot-000000_004.pkl', 'FID'),
                                                                   ('network-snapshot-000000_004.pkl', 'Inception Score')]
    # ... resumes with the other two, in training order, and writes each line once.
    monkeypatch.setenv('SWEEP_RESUMED', '1')
    res = _sweep(s, run, '--network_first', s['first'])
    assert res.exit_code == 0, res.output
    assert measured == ['network-snapshot-000000_004.pkl', 'network-snapshot-000000_400.pkl', 'network-snapshot-000001.pkl']
    records = _records(run)
    assert [(r['kimg'], r['name']) for r in records] == [(k, n) for k in (0.004, 0.4, 1) for n in ('FID', 'Inception Score')]
    assert all(r['num'] == 5 and r['options']['num_steps_second'] == 4 and r['seconds'] > 0 for r in records)
    assert res.output.count('Best ') == 2
    # The same numbers as evaluate.py gen of each snapshot by hand.
    for path in sorted(os.listdir(s['run'])):
        json_path = tmp_path / f'{path}.json'
        res = run_cli(evaluate.main, 'gen', '--preset=celebahq', '--network_first', s['first'], '--network_second',
                      os.path.join(s['run'], path), '--seeds=0-4', '-m', 'fid', '-m', 'is', '--ref', s['ref'], '--detector', s['det'], '--trust-detector',
                      '--json', json_path, *FAST)
        assert res.exit_code == 0, res.output
        by_hand = json.loads(json_path.read_text())
        for r in [r for r in records if r['snapshot'] == path]:
            assert r['value'] == pytest.approx(by_hand[r['name']], rel=1e-6), (path, r['name'])
    # A rerun measures nothing; the plot is a PNG of one point per snapshot and result.
    res = _sweep(s, run, '--network_first', s['first'])
    assert res.exit_code == 0 and len(measured) == 3 and _records(run) == records, res.output
    (png,) = [os.path.join(run, n) for n in os.listdir(run) if n.endswith('.png')]
    assert PIL.Image.open(png).format == 'PNG'
    drawn = sweep.plot(records, tmp_path / 'again.png')
    assert sorted(drawn) == ['FID', 'Inception Score'] and all(kimg == (0.004, 0.4, 1) for kimg, *_rest in drawn.values())
    fids = [r['value'] for r in records if r['name'] == 'FID']
    assert drawn['FID'][3] == int(np.argmin(fids)) and f'Best FID: {min(fids):g} at {drawn["FID"][2][drawn["FID"][3]]}' in res.output
    assert (tmp_path / 'again.png').read_bytes() == open(png, 'rb').read()


def test_relay_from_data_defaults_to_the_dataset_images(setup, tmp_path):
    # The reference of --relay-from-data: the activations of the same (all 6) dataset images.
    s, run = setup, str(tmp_path / 'run')
    shutil.copytree(s['run'], run)
    res = run_cli(evaluate.main, 'activations', '--data', s['d'] / 'data', '--dest', tmp_path / 'data.npz', '--detector', s['det'],
                  '--trust-detector', '--workers=0')
    assert res.exit_code == 0, res.output
    figures = []
    guided = ['--gnet_second', os.path.join(run, 'network-snapshot-000000_004.pkl'), '--cfg_scale_second=2']
    for extra in [[], ['--ref', tmp_path / 'data.npz'], guided]:
        res = run_cli(evaluate.main, 'sweep', '--run-dir', run, '--relay-from-data', '-m', 'fid', '--num=6', '--detector', s['det'],
                      '--trust-detector', '--num_steps_second=4', *extra)
        assert res.exit_code == 0, res.output
        figures.append([float(v) for v in re.findall(r'Metrics of \S+: FID (\S+)', res.output)])
    assert figures[0] == pytest.approx(figures[1], rel=1e-6) and len(os.listdir(run)) == 3 + 6  # Three tags.
    assert len(figures[0]) == 3 and figures[2] != pytest.approx(figures[0], rel=1e-3)  # Autoguidance (a gen option) changes images.


def test_sweep_errors(setup, tmp_path):
    s = setup
    os.makedirs(tmp_path / 'empty')
    for run, extra, message in [(tmp_path / 'empty', [], 'no network-snapshot-*.pkl'),
                                (s['run'], [], 'give --network_first for the relay, or --relay-from-data'),
                                (s['run'], ['--network_first', s['run'] + '/network-snapshot-000001.pkl'], 'second-stage checkpoint')]:
        res = _sweep(s, run, *extra)
        assert res.exit_code == 1 and message in res.output and 'Traceback' not in res.output, res.output
    mixed = tmp_path / 'mixed'
    shutil.copytree(s['run'], mixed)
    shutil.copy(s['first'], mixed / 'network-snapshot-000002.pkl')
    res = _sweep(s, mixed, '--network_first', s['first'])
    assert res.exit_code == 1 and 'mixes stages' in res.output, res.output
    res = run_cli(evaluate.main, 'sweep', '--run', s['run'], '-m', 'fidd')
    assert res.exit_code == 2 and "'fidd' is not one of" in res.output
    for missing in (tmp_path / 'missing', s['first']):  # No such folder; a file.
        res = run_cli(evaluate.main, 'sweep', '--run-dir', missing, '-m', 'fid')
        assert res.exit_code == 2 and "Invalid value for '--run-dir'" in res.output, res.output
    common = ['--outdir', tmp_path / 'runs', '--data', s['d'] / 'data', '--dry-run']
    np.savez(tmp_path / 'wrong.npz', logits=np.zeros([4, 8], np.float32))
    for extra, message in [(['--metrics=fid10k'], 'needs --metrics-ref'), (['--metrics=fid10k,is5'], 'one sample count'),
                           (['--metrics=fld10k', '--metrics-ref=x'], 'such as fid10k'),
                           (['--metrics=fid2', '--metrics-ref', tmp_path / 'x.npz'], 'x.npz: cannot read as .npz'),
                           (['--metrics=fid2', '--metrics-ref', tmp_path / 'wrong.npz'], 'FID needs feat or mu/sigma'),
                           (['--metrics-ref', s['ref']], 'give --metrics too')]:  # Was an AttributeError traceback.
        res = run_cli(train.main, *common[:-1], *extra)  # Refused before the run folder exists, not only in a dry run.
        assert res.exit_code == 1 and message in res.output and not os.path.exists(tmp_path / 'runs'), res.output
    assert run_cli(train.main, *common, '--metrics=is2,fid_2', '--metrics-ref', s['ref']).exit_code == 0


def test_train_metrics_equal_sweep_and_leave_weights_unchanged(setup, tmp_path):
    s = setup
    rng = np.random.default_rng(1)
    data = tmp_path / 'data'
    write_images(data, list(rng.integers(0, 256, [8, 16, 16, 3], dtype=np.uint8)))
    common = ['--data', data, '--duration=0.000008', '--tick=0.004', '--snap=1', '--dump=1', '--nosubdir', '--arch=ddpmpp', '--cbase=8',
              '--cres=1,1', '--blocks=1', '--workers=0', '--seed=1', '--augment=0', '--batch=4', '--grid=0', '--lr=1e-2', '--lr-rampup=0']
    res = run_cli(train.main, '--outdir', tmp_path / 'on', *common, '--metrics=fid5,is5', '--metrics-ref', s['ref'],
                  '--metrics-detector', s['det'], '--trust-detector')
    assert res.exit_code == 0, res.output
    res = run_cli(train.main, '--outdir', tmp_path / 'off', *common)
    assert res.exit_code == 0, res.output
    # Weights bit-identical with the measurement on or off.
    for name in ['network-snapshot-000000_004.pkl', 'network-snapshot-000000_008.pkl', 'training-state-000000_008.pt']:
        on, off = (training.load_checkpoint(str(tmp_path / run / name)) for run in ('on', 'off'))
        for key in [k for k in ('net', 'ema') if k in on]:
            for (n, a), (_, b) in zip(on[key].state_dict().items(), off[key].state_dict().items()):
                assert torch.equal(a, b), (name, key, n)
    # stats.jsonl and the log hold the figures; a sweep of the same snapshots gives them too, in the same file.
    with open(tmp_path / 'on' / 'stats.jsonl', encoding='utf-8') as f:
        stats = [json.loads(line) for line in f]
    fids = [r['value'] for r in _records(tmp_path / 'on') if r['name'] == 'FID']
    assert [line['Metrics/FID']['mean'] for line in stats] == pytest.approx(fids, rel=1e-6) and fids[0] != fids[1]  # float32 in stats.
    assert all(line['Timing/metrics_sec']['mean'] > 0 for line in stats)
    assert 'Metrics of network-snapshot-000000_008.pkl: FID ' in (tmp_path / 'on' / 'log.txt').read_text()
    records = _records(tmp_path / 'on')
    assert len(records) == 4
    shutil.copytree(tmp_path / 'on', tmp_path / 'again', ignore=shutil.ignore_patterns('metrics-*'))
    res = run_cli(evaluate.main, 'sweep', '--run', tmp_path / 'again', '-m', 'fid', '-m', 'is', '--num=5', '--ref', s['ref'],
                  '--detector', s['det'], '--trust-detector')
    assert res.exit_code == 0, res.output
    again = _records(tmp_path / 'again')
    assert os.listdir(tmp_path / 'again').count(os.path.basename(_jsonl(tmp_path / 'on'))) == 1  # The same tag.
    assert [(r['snapshot'], r['name']) for r in again] == [(r['snapshot'], r['name']) for r in records]
    for a, b in zip(again, records):
        assert a['value'] == pytest.approx(b['value'], rel=1e-6)
