"""dnnlib.util.atomic_write: atomic writes, and removal of temporaries left by killed writers
(only ours, only of the same target, only when their process is gone)."""

import os
import subprocess
import sys

import pytest

import dnnlib.util
from dnnlib import util as files
from dnnlib.util import atomic_write


def _dead_pid():
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / 'out.bin'
    target.write_bytes(b'old')
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b'partial')
            raise RuntimeError('boom')
    assert target.read_bytes() == b'old' and os.listdir(tmp_path) == ['out.bin']
    with atomic_write(target, 'w', encoding='utf-8') as f:
        f.write('new é')
    assert target.read_text(encoding='utf-8') == 'new é' and os.listdir(tmp_path) == ['out.bin']


def test_killed_writer_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    # A real writer process dies (os._exit, as kill -9) in the middle of its write.
    target = tmp_path / 'snap.pkl'
    code = ('import os, sys; from dnnlib.util import atomic_write\n'
            'cm = atomic_write(sys.argv[1]); f = cm.__enter__(); f.write(b"x" * 1000); f.flush(); os._exit(9)')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, '-c', code, str(target)], cwd=root, env=dict(os.environ, PYTHONPATH=root))
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith('.snap.pkl.') and left[0].endswith('.tmp')
    with atomic_write(target) as f:
        f.write(b'done')
    assert os.listdir(tmp_path) == ['snap.pkl'] and target.read_bytes() == b'done'


def test_only_stale_temporaries_of_the_same_target_are_removed(tmp_path):
    host = dnnlib.util.host_tag()
    dead, live = _dead_pid(), os.getppid()
    keep = {
        f'.t.zip.{host}-{live}.0123abcd.tmp': 'writer alive',
        f'.t.zip.{host}-{os.getpid()}.0123abcd.tmp': 'this process',
        f'.t.zip.otherhost-{dead}.0123abcd.tmp': 'other host (its pid means nothing here)',
        f'.other.zip.{host}-{dead}.0123abcd.tmp': 'other target',
        f'.t.zip.{host}-{dead}.0123abcd.tmp.keep': 'not our pattern',
        't.zip.notes.tmp': 'not hidden, not ours',
        '.t.zip.abcd1234.tmp': 'no host and pid: not provably ours',
        '.t.zip.backup01.tmp': 'a user file of the same shape',
        f'.t.zip.{host}-{dead}.draft123.tmp': 'not 8 hex digits',
    }
    remove = {
        f'.t.zip.{host}-{dead}.0123abcd.tmp': 'dead writer',
    }
    for name in list(keep) + list(remove):
        (tmp_path / name).write_text('x')
    os.mkdir(tmp_path / f'.t.zip.{host}-{dead}.feedbeef.tmp')  # A dead writer's folder output.
    (tmp_path / f'.t.zip.{host}-{dead}.feedbeef.tmp' / 'img.png').write_bytes(b'x')
    removed = files.remove_stale_temporaries(tmp_path / 't.zip')
    assert sorted(os.path.basename(p) for p in removed) == sorted(list(remove) + [f'.t.zip.{host}-{dead}.feedbeef.tmp'])
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_temp_name_carries_host_and_pid(tmp_path):
    with atomic_write(tmp_path / 'a.json') as f:
        name = os.path.basename(f.name)
    assert name.startswith(f'.a.json.{dnnlib.util.host_tag()}-{os.getpid()}.') and name.endswith('.tmp')


def test_folder_output_and_no_clobber(tmp_path):
    target = tmp_path / 'ds'
    with atomic_write(target, directory=True) as tmp:
        (os.path.join(tmp, 'a.png') and open(os.path.join(tmp, 'a.png'), 'wb')).write(b'png')
        assert not target.exists()
    assert os.listdir(target) == ['a.png']
    # A folder that failed halfway leaves nothing; a target that appeared meanwhile is kept.
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / 'half', directory=True):
            raise RuntimeError('boom')
    with pytest.raises(FileExistsError):
        with atomic_write(tmp_path / 'x.zip', overwrite=False) as f:
            f.write(b'new')
            (tmp_path / 'x.zip').write_bytes(b'theirs')
    assert (tmp_path / 'x.zip').read_bytes() == b'theirs' and sorted(os.listdir(tmp_path)) == ['ds', 'x.zip']
