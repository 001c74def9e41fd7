"""benchmarks/gpu_check.py: the smoke mode runs every row end to end on the CPU; failures give
exit status 1 and still a full table; bad options are refused before any work."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'benchmarks', 'gpu_check.py')
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import gpu_check  # noqa: E402


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp('gpu_check') / 'result'
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, SCRIPT, '--device=cpu', '--smoke', f'--out={out}'], cwd=os.path.dirname(REPO),
                          env=env, capture_output=True, text=True, timeout=900)
    return proc, out


def test_smoke_runs_every_group(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(f'{out}.json') as f:
        result = json.load(f)
    rows = result['rows']
    assert {r['group'] for r in rows} == {'train', 'sample', 'evaluate', 'consist.'}
    assert all(r['status'] in ('ok', 'skipped') for r in rows), rows
    ran = [r for r in rows if r['status'] == 'ok']
    # train.py ran (directly and under torchrun) with a finite loss; DDP over a process group.
    assert sum(r['group'] == 'train' and 'loss' in r['check'] for r in ran) == 3
    assert any('torchrun' in r['name'] for r in ran) and any('DDP' in r['name'] for r in ran)
    # Both stages sampled in exact and fast modes, compared pixel by pixel.
    for stage in ('first', 'second'):
        mine = [r for r in ran if r['group'] == 'sample' and r['name'].startswith(stage)]
        assert [r['name'].split('px ')[1] for r in mine] == ['exact', 'fast (fp16)', 'fast bf16']
        assert all(r['img_s'] > 0 for r in mine) and all(0 <= r['max_pixel_diff'] <= 255 for r in mine[1:])
    assert [r['check'] for r in ran if r['group'] == 'consist.'] == ['max |diff| 0.00e+00 (limit 0.001), 0 levels']
    # The same table on stdout and in the markdown file.
    with open(f'{out}.md') as f:
        md = f.read()
    assert md.startswith('gpu_check on CPU') and '| group | row | status |' in md
    for r in rows:
        assert r['name'] in proc.stdout and r['name'] in md


def test_a_failed_row_gives_exit_status_1_and_the_table(tmp_path, monkeypatch, capsys):
    def fake_child(args, name, extra, timeout):
        if name == 'evaluate':
            return [dict(group='evaluate', name='evaluate', status='FAILED', error='CUDA error: an illegal memory access')]
        return [dict(group='consist.', name='consistency', status='ok', check='max |diff| 0')]
    monkeypatch.setattr(gpu_check, '_run_child', fake_child)
    out = tmp_path / 'res'
    status = gpu_check.main(['--device=cpu', '--rows=evaluate,consistency', f'--out={out}', f'--workdir={tmp_path / "work"}'])
    printed = capsys.readouterr().out
    assert status == 1
    assert '2 rows, 1 failed' in printed and 'FAILED' in printed and 'illegal memory access' in printed
    assert 'consistency' in printed
    with open(f'{out}.json') as f:
        assert [r['status'] for r in json.load(f)['rows']] == ['FAILED', 'ok']


def test_no_cuda_is_one_clear_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().count('\n') == 0 and 'no CUDA device' in proc.stderr and '--device=cpu --smoke' in proc.stderr


@pytest.mark.parametrize('args,message', [(['--rows=train,nonsense'], 'unknown group "nonsense"'),
                                          (['--timeout=0'], '--timeout must be at least 1')])
def test_bad_options_are_refused(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err
