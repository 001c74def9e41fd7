"""Generic helpers: attribute dicts, object lookup by dotted name, URL download with a cache."""

import contextlib
import hashlib
import importlib
import math
import os
import re
import socket
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from typing import Any

import click


class UserError(click.ClickException):
    """Bad input from the user (an option, a file, a folder): the one error type of the project.

    Its message is one line naming the problem and the fix. Every command line prints it as
    `Error: <message>` and exits with status 1 (click's own handling of ClickException); library
    callers catch it like any exception. Subclass it only where a caller branches on the kind.
    """


class EasyDict(dict):
    """A dict whose keys are also attributes: `d.lr` is `d['lr']`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


#----------------------------------------------------------------------------
# Command-line lists: '1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10] (seeds, channel multipliers).

def parse_int_list(s: str | list, limit: int | None = None, max_value: int | None = None, what: str = 'numbers') -> list[int]:
    """Comma-separated integers and inclusive ranges ('1,2,5-10'); ValueError names the bad part.

    A range written backwards (5-3) is refused rather than read as empty, and with `limit` the
    entries are counted before the list is built, so '0-99999999999' fails at once instead of
    filling the memory. `max_value`: the largest number allowed; `what` names the entries in messages.
    """
    if isinstance(s, list):
        return s
    ranges, count = [], 0
    for part in str(s).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)-(\d+)', part) or re.fullmatch(r'(\d+)', part)
        if not m:
            raise ValueError(f'"{part}" is not a number or a range like 5-10')
        lo, hi = int(m.group(1)), int(m.groups()[-1])
        if hi < lo:
            raise ValueError(f'"{part}" is an empty range (write the lower number first)')
        count += hi - lo + 1
        if limit is not None and count > limit:
            raise ValueError(f'"{s}" lists more than {limit:,} {what}; split it into smaller ranges')
        if max_value is not None and hi > max_value:
            raise ValueError(f'"{part}" goes above the largest allowed value {max_value:,}')
        ranges.append(range(lo, hi + 1))
    return [value for r in ranges for value in r]


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (including overflowing input like 1e309),
    which FloatRange lets through: nan compares false with every bound."""

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f'{value!r} is not a finite number.', param, ctx)
        return super().convert(number, param, ctx)


#----------------------------------------------------------------------------
# Objects by dotted name, e.g. construct_class_by_name(class_name='training.loss.EDMLoss').

def get_obj_by_name(name: str) -> Any:
    """Import the longest importable module prefix of `name` and walk the remaining attributes."""
    parts = name.split('.')
    for split in range(len(parts) - 1, 0, -1):
        module_name = '.'.join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                raise  # A real missing dependency inside an existing module.
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f'Cannot find an object named "{name}"')


def call_func_by_name(*args, func_name: str, **kwargs) -> Any:
    func = get_obj_by_name(func_name)
    if not callable(func):
        raise TypeError(f'"{func_name}" is not callable')
    return func(*args, **kwargs)


def construct_class_by_name(*args, class_name: str, **kwargs) -> Any:
    return call_func_by_name(*args, func_name=class_name, **kwargs)


#----------------------------------------------------------------------------
# Cache folder and URL access.

def make_cache_dir_path(*paths: str) -> str:
    """Cache root: $DNNLIB_CACHE_DIR, else $XDG_CACHE_HOME/dnnlib, else ~/.cache/dnnlib."""
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    if 'XDG_CACHE_HOME' in os.environ:
        return os.path.join(os.environ['XDG_CACHE_HOME'], 'dnnlib', *paths)
    return os.path.join(os.path.expanduser('~'), '.cache', 'dnnlib', *paths)


def is_url(obj: Any, allow_file_urls: bool = False) -> bool:
    if not isinstance(obj, str) or '://' not in obj:
        return False
    scheme = urllib.parse.urlparse(obj).scheme
    return scheme in ('http', 'https') or (allow_file_urls and scheme == 'file')


def _file_url_to_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    return urllib.request.url2pathname(parsed.netloc + parsed.path)


def _cache_file_name(url: str) -> str:
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    base = re.sub(r'[^0-9a-zA-Z._-]', '_', os.path.basename(urllib.parse.urlparse(url).path)) or 'download'
    return f'{url_md5}_{base}'


DEFAULT_MAX_DOWNLOAD_BYTES = 32 << 30  # Above any published checkpoint or detector (training states included).
_CHUNK = 1 << 20


class DownloadError(OSError):
    """A download failed, was larger than allowed, or did not match its expected SHA-256."""


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(_CHUNK), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: str, sha256: str | None, what: str) -> None:
    if sha256 is not None and file_sha256(path) != sha256:
        raise DownloadError(f'{what}: SHA-256 {file_sha256(path)} does not match the expected {sha256}')


def host_tag() -> str:
    """This machine's name, reduced to characters safe in a file name: temporaries carry it with
    the writer's pid, so a later run can tell a dead writer's leftovers from a live one's."""
    return re.sub(r'[^0-9a-zA-Z-]', '_', socket.gethostname())[:40] or 'host'


def _part_prefix(cache_name: str) -> str:
    """Start of the temporary names of downloads into cache entry `cache_name` by this process:
    `.<entry>.<host>.<pid>.`; the owner of a leftover can thus be told from its name."""
    return f'.{cache_name}.{host_tag()}.{os.getpid()}.'


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine may still exist (when unsure: yes, keep its files)."""
    if pid == os.getpid() or os.name == 'nt':  # On Windows os.kill(pid, 0) would end the process.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # Someone else's process (or a value we cannot ask about): leave its file.
    return True


def remove_stale_downloads(cache_dir: str, cache_name: str) -> list:
    """Delete the temporaries that killed downloads into cache entry `cache_name` left behind:
    only ours (named by _part_prefix), only from this host, and only when the process that
    wrote them is gone. Returns the removed paths."""
    pattern = re.compile(re.escape(f'.{cache_name}.{host_tag()}.') + r'(\d+)\.[^/]*\.part')
    removed = []
    try:
        names = os.listdir(cache_dir)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        path = os.path.join(cache_dir, name)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.remove(path)
            removed.append(path)
    return removed


def _download(url: str, dst, max_bytes: int, verbose: bool) -> str:
    """Stream `url` into the open binary file `dst`, at most `max_bytes`; return its SHA-256."""
    if verbose:
        print(f'Downloading {url} ...', flush=True)
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response:
        declared = response.headers.get('Content-Length')
        declared = int(declared) if declared is not None and declared.strip().isdigit() else None
        if declared is not None and declared > max_bytes:
            raise DownloadError(f'Refusing to download {url}: it has {declared} bytes, more than the limit of {max_bytes}')
        total = 0
        for chunk in iter(lambda: response.read(_CHUNK), b''):
            total += len(chunk)
            if total > max_bytes:
                raise DownloadError(f'Stopped downloading {url}: more than the limit of {max_bytes} bytes')
            digest.update(chunk)
            dst.write(chunk)
        if declared is not None and total != declared:
            raise OSError(f'download truncated: {total} of {declared} bytes')
    return digest.hexdigest()


def open_url(url: str, cache_dir: str | None = None, num_attempts: int = 3, verbose: bool = True,
             return_filename: bool = False, cache: bool = True, sha256: str | None = None,
             max_bytes: int | None = None):
    """Open a local path, a file:// URL or an http(s) URL as a binary file object (or its path).

    http(s) URLs are streamed to disk, never held whole in memory: into the cache folder (once;
    the download goes to a temporary name that is renamed into place only when complete and
    verified; temporaries that a killed download of the same entry left are removed first), or
    with cache=False into an anonymous temporary file. A download larger than
    `max_bytes` (default DEFAULT_MAX_DOWNLOAD_BYTES) is stopped. When `sha256` (hex) is given,
    the content must have that SHA-256, whether it is a local file, a cache hit or a fresh
    download; a cache entry that does not match is downloaded again and replaced. Raises OSError
    (DownloadError for a refused size or hash) with the URL in the message on failure.
    """
    if not isinstance(url, str) or not url:
        raise ValueError('open_url() needs a non-empty path or URL')
    if sha256 is not None:
        if not isinstance(sha256, str) or not re.fullmatch(r'[0-9a-fA-F]{64}', sha256):
            raise ValueError(f'sha256 must be 64 hex digits, got {sha256!r}')
        sha256 = sha256.lower()
    max_bytes = DEFAULT_MAX_DOWNLOAD_BYTES if max_bytes is None else int(max_bytes)

    # Local files.
    if not is_url(url, allow_file_urls=True) or url.startswith('file://'):
        path = _file_url_to_path(url) if url.startswith('file://') else url
        if not os.path.isfile(path):
            raise FileNotFoundError(f'No such file: {path}' + (f' (from {url})' if path != url else ''))
        _check_sha256(path, sha256, path)
        return path if return_filename else open(path, 'rb')
    if return_filename and not cache:
        raise ValueError('open_url(return_filename=True) needs cache=True for remote URLs')

    # Cached download?
    cache_dir = cache_dir or make_cache_dir_path('downloads')
    cache_path = os.path.join(cache_dir, _cache_file_name(url))
    if cache and os.path.isfile(cache_path):
        if sha256 is None or file_sha256(cache_path) == sha256:
            return cache_path if return_filename else open(cache_path, 'rb')
        if verbose:
            print(f'Cached copy of {url} does not match its SHA-256; downloading it again.', flush=True)

    # Download (after removing what killed downloads of this entry left behind).
    if cache:
        remove_stale_downloads(cache_dir, os.path.basename(cache_path))
    for attempt in range(num_attempts):
        tmp_path = None
        try:
            if cache:
                os.makedirs(cache_dir, exist_ok=True)
                fd, tmp_path = tempfile.mkstemp(dir=cache_dir, prefix=_part_prefix(os.path.basename(cache_path)), suffix='.part')
                dst = os.fdopen(fd, 'w+b')
            else:
                dst = tempfile.TemporaryFile()
            try:
                digest = _download(url, dst, max_bytes, verbose)
                if sha256 is not None and digest != sha256:
                    raise DownloadError(f'Downloaded {url} but its SHA-256 {digest} does not match the expected {sha256}; not using it')
            except BaseException:
                dst.close()
                raise
            if not cache:
                dst.seek(0)
                return dst
            dst.close()
            os.replace(tmp_path, cache_path)
            return cache_path if return_filename else open(cache_path, 'rb')
        except DownloadError:
            raise  # Size and hash refusals are not transient.
        except Exception as err:  # urllib raises several unrelated exception types.
            if attempt == num_attempts - 1:
                raise OSError(f'Cannot download {url}: {err}') from err
            time.sleep(1)
        finally:
            if tmp_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp_path)
    raise OSError(f'Cannot download {url}: no attempts made (num_attempts={num_attempts})')


#----------------------------------------------------------------------------
# Console helpers used by the training loop.

def format_time(seconds: float) -> str:
    """Compact human-readable duration: '42s', '3m 05s', '2h 07m 09s', '1d 04h 13m'."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h {(s // 60) % 60:02d}m'


class Logger:
    """Copy everything written to stdout/stderr into a log file as well.

    Used as a context manager or closed explicitly; `close()` puts the original streams back so
    that tests (and scripts that train twice in one process) do not keep writing into old files.
    """

    def __init__(self, file_name: str | None = None, file_mode: str = 'w', should_flush: bool = True):
        self.file = open(file_name, file_mode) if file_name is not None else None
        self.should_flush = should_flush
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        sys.stdout = self
        sys.stderr = self

    def __enter__(self) -> 'Logger':
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def write(self, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode()
        if len(text) == 0:
            return
        if self.file is not None:
            self.file.write(text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()
        self.stdout.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self.flush()
        # Only restore the streams if nobody replaced us in the meantime.
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None
