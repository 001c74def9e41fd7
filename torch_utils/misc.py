"""Small torch and file helpers shared across the project."""

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb'):
    """Open a temporary file beside `path`; rename it onto `path` only if the block succeeds.

    A crash or exception leaves any existing `path` untouched and no partial file behind.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
