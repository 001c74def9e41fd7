"""benchmarks/gpu_check.py: --smoke runs every part end to end on the CPU (with the packages the
GPU machine lacks made unimportable); rows reach --out as they finish; a failed row gives exit
status 1 and still the table; parts fit their 4 minutes by --list's estimates; bad options are
refused before any work."""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'benchmarks', 'gpu_check.py')
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import gpu_check  # noqa: E402

# In requirements.txt or pyproject.toml, but not on the lent GPU machine (Python, torch, numpy,
# click, pillow, scipy, tqdm, safetensors and psutil only).
NOT_ON_GPU_MACHINE = ['matplotlib', 'tensorboard', 'transformers', 'pytest', 'xdist']


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """The parts run at once, one process each (part 1 alone takes most of the time)."""
    tmp = tmp_path_factory.mktemp('gpu_check')
    for name in NOT_ON_GPU_MACHINE:
        os.makedirs(tmp / 'absent' / name)
        (tmp / 'absent' / name / '__init__.py').write_text(f'raise ImportError("the GPU machine has no {name}")\n')
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1', PYTHONPATH=str(tmp / 'absent'))
    procs = {part: subprocess.Popen([sys.executable, SCRIPT, '--device=cpu', '--smoke', f'--part={part}', f'--out={tmp / "results" / f"gpu{part}"}',
                                     f'--workdir={tmp / f"work{part}"}'], cwd=tmp, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for part in gpu_check.PARTS}
    runs = {part: (proc.communicate(timeout=600)[0], proc.returncode) for part, proc in procs.items()}
    rows, md = [], {}
    for part in procs:
        with open(tmp / 'results' / f'gpu{part}.json') as f:  # --out made the folder.
            rows += json.load(f)['rows']
        md[part] = (tmp / 'results' / f'gpu{part}.md').read_text()
    return runs, rows, md


def test_smoke_runs_every_part(smoke):
    runs, rows, md = smoke
    for printed, status in runs.values():
        assert status == 0, printed[-4000:]
    by_id = {r['id']: r for r in rows}
    for part, (_title, part_rows) in gpu_check.PARTS.items():
        for row in part_rows:
            mine = [r for r in rows if r['part'] == part and r['id'].split('/')[0] == row.id]
            assert [r['status'] for r in mine] == (['ok'] * len(mine) if row.smoke else ['skipped']), (row.id, mine)
            # One printed line per row, with the part's clock, and a line of the markdown table.
            for r in mine:
                assert re.search(rf'\[ *\d+\.\d s\] {part} {re.escape(r["id"])} +{r["status"]} ', runs[part][0]), r['id']
                assert f'| {part} | {r["id"]} | {r["status"]} |' in md[part]
    assert {r['part'] for r in rows if r['status'] == 'ok'} == {1, 2, 3, 4}
    # What the rows saw: the same images on both devices (the CPU twice here), the project's TF32
    # flags, DDP forced with accumulation, bf16 only inside the U-Net, one image set at any batch.
    assert by_id['consistency/SongUNet']['check'].startswith('max |cpu - cpu| 0.00e+00')
    assert by_id['consistency/DhariwalUNet']['check'].startswith('max |cpu - cpu| 0.00e+00')
    assert 'exact off/off, fast on/on' in by_id['consistency/tf32']['check']
    assert 'DDP 6 forwards (2 rounds x 3 steps); 1 workers' in by_id['train-ddp']['check']
    assert 'DDP forced' in by_id['train-ddp']['note']
    assert 'continued from 0.048 kimg to 0.080' in by_id['train-resume']['check']
    assert 'U-Net float32 under bfloat16 autocast, the rest full precision' in by_id['train-bf16']['check']
    assert 'equal those of --batch=8 (torchrun) bit for bit' in by_id['generate-batch1']['check']
    assert re.search(r'FID [\d.]+, Inception Score [\d.]+, Precision 1, Recall 0\.\d', by_id['calc']['check'])
    assert by_id['train-256-fp16']['img_s'] > 0
    for stage in ('first', 'second'):
        modes = [r for r in rows if r['id'].startswith(f'sample-{stage}/')]
        assert [r['id'].split('/')[1] for r in modes] == ['exact', 'fast fp16', 'fast bf16', 'fast channels-last']
        assert all(r['img_s'] > 0 for r in modes) and all('vs exact: mean' in r['check'] for r in modes[1:])
    assert 'vs uncompiled: mean 0.000 levels, max 0' in by_id['compile-second/eager']['check']


def test_list_shows_parts_within_four_minutes(capsys):
    gpu_check.main(['--list'])
    printed = capsys.readouterr().out
    totals = {int(p): int(s) for p, s in re.findall(r'^part (\d+) +~(\d+) s', printed, re.M)}
    assert totals.keys() == gpu_check.PARTS.keys() and all(60 <= s <= 240 for s in totals.values()), totals
    for _title, rows in gpu_check.PARTS.values():
        for row in rows:
            assert re.search(rf'^    {row.id} +{row.est} s ', printed, re.M)


def test_a_failed_row_gives_exit_status_1_and_every_row_in_the_table(tmp_path, monkeypatch, capsys):
    def fails(ctx, est):
        raise gpu_check.Failed('CUDA error: an illegal memory access')

    def defect(ctx, est):
        raise KeyError('a defect of the script')
    rows = [gpu_check.Row('good', lambda ctx, est: dict(check='fine'), 1, True, ''), gpu_check.Row('bad', fails, 1, True, ''),
            gpu_check.Row('broken', defect, 1, True, ''), gpu_check.Row('after', lambda ctx, est: [dict(sub='a'), dict(sub='b')], 1, True, '')]
    monkeypatch.setattr(gpu_check, 'PARTS', {1: ('test', rows)})
    monkeypatch.setattr(gpu_check, 'ORDER', {(1, row.id): idx for idx, row in enumerate(rows)})
    monkeypatch.setattr(gpu_check.signal, 'signal', lambda *args: None)
    out = tmp_path / 'res'
    # A row of another part already in the file stays; this part's rows are replaced.
    (tmp_path / 'res.json').write_text(json.dumps(dict(rows=[dict(part=0, id='old', status='ok'), dict(part=1, id='bad', status='ok')])))
    status = gpu_check.main(['--device=cpu', '--part=1', f'--out={out}', f'--workdir={tmp_path / "work"}'])
    printed = capsys.readouterr().out
    assert status == 1
    assert 'illegal memory access' in printed and 'KeyError' in printed and '2 row(s) failed' in printed
    with open(f'{out}.json') as f:
        assert [(r['part'], r['id'], r['status']) for r in json.load(f)['rows']] == [
            (0, 'old', 'ok'), (1, 'good', 'ok'), (1, 'bad', 'FAILED'), (1, 'broken', 'FAILED'), (1, 'after/a', 'ok'), (1, 'after/b', 'ok')]
    md = (tmp_path / 'res.md').read_text()
    assert '| 1 | bad | FAILED |' in md and '| 1 | after/b | ok |' in md and '`CUDA error: an illegal memory access`' in md


@pytest.mark.parametrize('args,message', [(['--part=1'], 'no CUDA device is visible'),
                                          (['--part=1', '--device=cpu', '--out=/proc/none/gpu'], '--out: cannot write to /proc/none')])
def test_no_cuda_or_no_out_folder_is_one_clear_line(args, message, monkeypatch, capsys):
    monkeypatch.setattr('torch.cuda.is_available', lambda: False)
    assert gpu_check.main(args) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and message in err


@pytest.mark.parametrize('args,message', [([], 'give --part N (or all), or --list'), (['--part=5'], "invalid choice: '5'"),
                                          (['--part=1', '--device=tpu'], "invalid choice: 'tpu'")])
def test_bad_options_are_refused(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err
