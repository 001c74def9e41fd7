"""Atomic writes: outputs are written under a temporary name beside the target and renamed onto it
only when complete. No torch here (dataset_tool's worker processes import it).

Temporaries are named `.<target name>.<host>-<pid>.<random>.tmp`. A process killed mid-write
(kill -9, power loss) leaves one behind; the next write to the same target removes those whose
process is gone (same host, pid no longer alive). A temporary of a live process, of another
host, or of another target is never touched.
"""

import contextlib
import os
import re
import secrets
import shutil
import tempfile
import time

import dnnlib

# Temporaries named by earlier versions (`.<target>.<8 random chars>.tmp`, no pid): removed once
# they have not been modified for this long, since no write takes a day without touching its file.
LEGACY_STALE_SECONDS = 24 * 3600


def current_umask():
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def temp_name(path):
    """A fresh temporary path beside `path`, carrying our host and pid."""
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    return os.path.join(folder, f'.{base}.{dnnlib.util.host_tag()}-{os.getpid()}.{secrets.token_hex(4)}.tmp')


def remove_stale_temporaries(path):
    """Remove temporaries of `path` left by dead processes of this host. Returns their paths."""
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    ours = re.compile(re.escape(f'.{base}.') + r'(?:(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[0-9a-f]{8}|(?P<legacy>[a-z0-9_]{8}))\.tmp')
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = ours.fullmatch(name)
        if m is None:
            continue
        full = os.path.join(folder, name)
        try:
            if m.group('legacy'):
                if time.time() - os.lstat(full).st_mtime < LEGACY_STALE_SECONDS:
                    continue
            elif m.group('host') != dnnlib.util.host_tag() or dnnlib.util.pid_alive(int(m.group('pid'))):
                continue
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.remove(full)
            removed.append(full)
        except OSError:
            pass  # Gone meanwhile, or not ours to remove: leave it.
    return removed


def make_temp(path, directory=False):
    """Create (exclusively) a temporary file or folder for `path`, after removing stale ones.
    Returns its path. Raises OSError when the folder of `path` cannot be written."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temp_name(path)
    if directory:
        os.mkdir(tmp, 0o700)
    else:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return tmp


@contextlib.contextmanager
def atomic_write(path, mode='wb', **open_kwargs):
    """Open a temporary file beside `path`; rename it onto `path` only if the block succeeds.

    A crash or exception leaves any existing `path` untouched and no partial file behind.
    """
    path = os.fspath(path)
    tmp_path = make_temp(path)
    try:
        # Created private; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~current_umask())
        with open(tmp_path, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)


#----------------------------------------------------------------------------
# Output checks before long work: a real write, since permission bits say nothing for root or
# read-only file systems. Each returns None when fine, else the reason as a phrase for the
# caller's one-line error.

def folder_write_problem(folder):
    """Why `folder` (existing, or to be created) cannot take new files; None if it can."""
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f'{folder} is a file, not a folder'
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f'{folder} cannot be created: {existing} is a file'
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f'cannot write in {existing} ({err.strerror or err})'
    return None


def file_write_problem(path):
    """Why the file `path` cannot be written in its (existing) folder; None if it can."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        return f'{path} is a folder'
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        return f'its folder {folder} ' + ('is a file' if os.path.exists(folder) else 'does not exist')
    return folder_write_problem(folder)
