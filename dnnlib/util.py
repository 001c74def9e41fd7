"""Generic helpers: the user-error type, attribute dicts, objects by dotted name, atomic writes,
output checks, downloads into a cache, console helpers."""

import contextlib
import hashlib
import importlib
import math
import numbers
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from typing import Any

import click
import psutil


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

    __setattr__ = dict.__setitem__
    __delattr__ = dict.__delitem__


#----------------------------------------------------------------------------
# Command-line lists: '1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10] (seeds, channel multipliers).

# Every generator of the project is seeded with seed % 2**32 (as in EDM and the reference): a
# larger seed would silently repeat the image of a smaller one.
MAX_SEED = (1 << 32) - 1


class IntList(click.ParamType):
    """Click type of comma-separated integers and inclusive ranges ('1,2,5-10').

    A range written backwards (5-3) is refused rather than read as empty; with `limit` the
    entries are counted before the list is built, so '0-99999999999' fails at once instead of
    filling the memory; `max_value` caps every entry. A list or range given from Python is
    checked the same way. `seeds(limit)` is the type of every --seeds option.
    """
    name = 'list'

    def __init__(self, limit: int | None = None, max_value: int | None = None, what: str = 'numbers'):
        self.limit, self.max_value, self.what = limit, max_value, what

    def convert(self, value, param, ctx) -> list[int]:
        if isinstance(value, str):
            parts = [(part.strip(), re.fullmatch(r'(\d+)(?:-(\d+))?', part.strip())) for part in value.split(',')]
            for text, m in parts:
                if m is None:
                    self.fail(f'"{text}" is not a number or a range like 5-10', param, ctx)
            ranges = [(text, int(m.group(1)), int(m.group(2) or m.group(1))) for text, m in parts]
        elif isinstance(value, range) and value.step == 1:
            ranges = [(f'{value.start}-{value.stop - 1}', value.start, value.stop - 1)] if value.stop > value.start else []
        elif isinstance(value, (list, tuple, range)):
            wrong = [v for v in value if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
            if wrong:
                self.fail(f'{wrong[0]!r} is not a whole number', param, ctx)
            ranges = [(str(v), int(v), int(v)) for v in value]
        else:
            self.fail(f'{value!r} is not a list of whole numbers', param, ctx)
        count = 0
        for text, lo, hi in ranges:
            if lo < 0 or hi < lo:
                self.fail(f'"{text}" is negative or an empty range (write the lower number first)', param, ctx)
            count += hi - lo + 1
            if self.limit is not None and count > self.limit:
                self.fail(f'{repr(value) if isinstance(value, str) else "the list"} lists more than {self.limit:,} {self.what}; split it into smaller ranges', param, ctx)
            if self.max_value is not None and hi > self.max_value:
                self.fail(f'"{text}" goes above the largest allowed value {self.max_value:,}', param, ctx)
        return [v for _text, lo, hi in ranges for v in range(lo, hi + 1)]


def seeds(limit: int | None = None) -> IntList:
    """The type of a --seeds option: at most `limit` seeds, each in 0..MAX_SEED."""
    return IntList(limit, MAX_SEED, 'seeds')


class Number(click.FloatRange):
    """The number type of the project's options (train.py, the samplers, the scripts): click.FloatRange
    (low_open: > low; --help shows the range) that also refuses NaN, booleans, infinity unless
    allow_inf (FloatRange lets NaN through: it compares false with every bound, and 1e309 is inf)
    and, with integer, fractions. Command-line text and Python numbers alike."""

    def __init__(self, low=0, high=None, low_open=False, integer=False, allow_inf=False):
        super().__init__(low, high, min_open=low_open)
        self.integer, self.allow_inf, self.name = integer, allow_inf, 'INT' if integer else 'FLOAT'

    def convert(self, value, param, ctx):
        try:
            number = float(value) if isinstance(value, (str, numbers.Real)) and not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None:
            self.fail(f'{value!r} is not a number', param, ctx)
        if math.isnan(number) or (math.isinf(number) and not self.allow_inf):
            self.fail(f'{value} must be a finite number', param, ctx)
        if self.integer and number != int(number):
            self.fail(f'{value} must be a whole number', param, ctx)
        if self.integer:  # The range in whole numbers, in the message too.
            return click.IntRange(self.min, self.max).convert(int(number), param, ctx)
        return super().convert(number, param, ctx)  # A float, as every float option gives (training_options.json).


#----------------------------------------------------------------------------
# Objects by dotted name, e.g. construct_class_by_name(class_name='training.loss.EDMLoss').

def construct_class_by_name(*args, class_name: str, **kwargs) -> Any:
    module, _, attr = class_name.rpartition('.')
    return getattr(importlib.import_module(module), attr)(*args, **kwargs)

#----------------------------------------------------------------------------
# Atomic writes: every output (snapshot, PNG, dataset, download, JSON) is written under a
# temporary name beside its target and renamed onto it only when complete.
#
# Temporaries are named `.<target name>.<host>-<pid>.<8 hex>.tmp`. A process killed mid-write
# leaves one behind; the next write to the same target removes it when its name is exactly of
# that form, its host is this one and its process is gone. Nothing else is ever removed.

def host_tag() -> str:
    return re.sub(r'[^0-9a-zA-Z-]', '_', socket.gethostname())[:40] or 'host'


def _remove(path):
    """Remove a file, or a folder and its contents (never what a link points to); one that is gone
    already or not ours to remove stays."""
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def remove_stale_temporaries(path) -> list:
    """Remove the temporaries of `path` that dead processes of this host left; returns their paths."""
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    ours = re.compile(re.escape(f'.{base}.{host_tag()}-') + r'([1-9]\d{0,8})\.[0-9a-f]{8}\.tmp')  # A pid that fits a C int.
    stale = []
    with contextlib.suppress(OSError):  # A folder we may not list has nothing to clean.
        stale = [os.path.join(folder, name) for name in os.listdir(folder)
                 if (m := ours.fullmatch(name)) and not psutil.pid_exists(int(m.group(1)))]
    for full in stale:
        _remove(full)
    return stale


@contextlib.contextmanager
def atomic_write(path, mode: str = 'wb', directory: bool = False, overwrite: bool = True, **open_kwargs):
    """Write `path` atomically: yields an open file (or, with directory=True, the path of a new
    empty folder to fill) under a temporary name beside it, which becomes `path` only when the
    block ends without an exception and is removed otherwise. overwrite=False refuses to replace
    what appeared at `path` meanwhile (FileExistsError); an empty folder may be replaced."""
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = os.path.join(folder, f'.{base}.{host_tag()}-{os.getpid()}.{secrets.token_hex(4)}.tmp')
    try:
        if directory:
            os.mkdir(tmp)
            yield tmp
        else:
            with open(tmp, mode.replace('w', 'x'), **open_kwargs) as f:  # 'x': never someone else's file.
                yield f
                f.flush()
                os.fsync(f.fileno())
        if not overwrite and not directory:
            os.link(tmp, path)  # Fails if path exists: never clobber.
        elif not overwrite and os.path.isdir(path) and os.listdir(path):
            raise FileExistsError(f'{path} appeared meanwhile')
        else:
            os.replace(tmp, path)  # A folder replaces only an empty folder.
    finally:
        _remove(tmp)

#----------------------------------------------------------------------------
# Output checks before long work: a real write, since permission bits say nothing for root or
# read-only file systems. Each returns None when fine, else the reason as a phrase for the
# caller's one-line error.

def folder_write_problem(folder) -> str | None:
    """Why `folder` (existing, or to be created) cannot take new files; None if it can."""
    folder = existing = os.path.abspath(os.fspath(folder))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f'{folder} is a file, not a folder' if existing == folder else f'{folder} cannot be created: {existing} is a file'
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f'cannot write in {existing} ({err.strerror or err})'
    return None


def file_write_problem(path) -> str | None:
    """Why the file `path` cannot be written in its (existing) folder; None if it can."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        return f'{path} is a folder'
    if not os.path.isdir(folder):
        return f'its folder {folder} ' + ('is a file' if os.path.exists(folder) else 'does not exist')
    return folder_write_problem(folder)

#----------------------------------------------------------------------------
# Downloads.

DEFAULT_MAX_DOWNLOAD_BYTES = 4 << 30   # A URL of unknown size: more than any detector or reference set.
DEFAULT_DOWNLOAD_SECONDS = 4 * 3600    # Overall deadline of one download (a stalled read ends after 60 s).


def make_cache_dir_path(*paths: str) -> str:
    """Cache root: $DNNLIB_CACHE_DIR, else $XDG_CACHE_HOME/dnnlib, else ~/.cache/dnnlib."""
    xdg = os.environ.get('XDG_CACHE_HOME', os.path.join(os.path.expanduser('~'), '.cache'))
    return os.path.join(os.environ.get('DNNLIB_CACHE_DIR', os.path.join(xdg, 'dnnlib')), *paths)


def is_url(obj: Any) -> bool:
    return isinstance(obj, str) and '://' in obj and urllib.parse.urlparse(obj).scheme in ('http', 'https')


def _cache_file_name(url: str) -> str:
    base = re.sub(r'[^0-9a-zA-Z._-]', '_', os.path.basename(urllib.parse.urlparse(url).path)) or 'download'
    return f'{hashlib.md5(url.encode("utf-8")).hexdigest()}_{base}'


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def _download(url: str, path: str, max_bytes: int, deadline_s: float, sha256: str | None, check) -> None:
    """Stream `url` into `path` through atomic_write: at most `max_bytes`, within `deadline_s` (checked
    after every network read, so a server dripping bytes is stopped too). What does not have `sha256`,
    is an HTML page or fails `check` raises UserError and never becomes `path`."""
    give_up = time.monotonic() + deadline_s
    with urllib.request.urlopen(url, timeout=60) as response, atomic_write(path, 'w+b') as dst:
        declared = response.length  # The Content-Length header as http.client read it; None without one.
        if declared is not None and declared > max_bytes:
            raise UserError(f'Refusing to download {url}: it has {declared} bytes, more than the limit of {max_bytes}')
        for chunk in iter(lambda: response.read1(1 << 20), b''):
            dst.write(chunk)
            if dst.tell() > max_bytes:  # At most one chunk over the limit reaches the temporary.
                raise UserError(f'Stopped downloading {url}: more than the limit of {max_bytes} bytes')
            if time.monotonic() > give_up:
                raise UserError(f'Stopped downloading {url}: not done after {deadline_s:.0f} s')
        if declared is not None and dst.tell() != declared:
            raise OSError(f'download truncated: {dst.tell()} of {declared} bytes')
        dst.flush()
        if sha256 is not None and (found := file_sha256(dst.name)) != sha256:
            raise UserError(f'Downloaded {url} but its SHA-256 {found} does not match the expected {sha256}; not using it')
        dst.seek(0)
        if re.match(rb'\s*<(!doctype html|html)', dst.read(64), re.IGNORECASE):  # Every download here is binary.
            raise UserError(f'{url} sent an HTML page instead of the file (a login, quota or error page?); not cached')
        check(dst.name)


def open_url(url: str, cache_dir: str | None = None, num_attempts: int = 3, verbose: bool = True,
             return_filename: bool = False, sha256: str | None = None, max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
             deadline_s: float = DEFAULT_DOWNLOAD_SECONDS, check=lambda path: None):
    """Open a local path, a file:// URL or an http(s) URL as a binary file object (or its path).

    http(s) URLs are streamed, once, into the cache folder (through atomic_write); a download of
    more than `max_bytes` or longer than `deadline_s` is stopped. With `sha256` (hex) the content
    must have that SHA-256, whether it is a local file, a cache hit or a fresh download (a cache
    entry that does not match is downloaded again). An HTML page (a login or quota page served
    with status 200) is refused, and so is whatever `check(path)` refuses by raising UserError: a
    refused download never enters the cache.
    Refusals raise UserError, other failures OSError; both name the URL.
    """
    if sha256 is not None and not re.fullmatch(r'[0-9a-fA-F]{64}', str(sha256)):
        raise ValueError(f'sha256 must be 64 hex digits, got {sha256!r}')
    sha256 = sha256 and sha256.lower()
    if not is_url(url):
        path = urllib.request.url2pathname(url.removeprefix('file://')) if url.startswith('file://') else url
        if not os.path.isfile(path):
            raise FileNotFoundError(f'No such file: {path}' + (f' (from {url})' if path != url else ''))
        if sha256 is not None and (found := file_sha256(path)) != sha256:
            raise UserError(f'{path}: SHA-256 {found} does not match the expected {sha256}')
        return path if return_filename else open(path, 'rb')
    path = os.path.join(cache_dir or make_cache_dir_path('downloads'), _cache_file_name(url))
    cached = os.path.isfile(path) and (sha256 is None or file_sha256(path) == sha256)
    if verbose and os.path.isfile(path) and not cached:
        print(f'Cached copy of {url} does not match its SHA-256; downloading it again.', flush=True)
    for attempt in range(0 if cached else num_attempts):
        try:
            if verbose:
                print(f'Downloading {url} ...', flush=True)
            _download(url, path, max_bytes, deadline_s, sha256, check)
            break
        except UserError:
            raise  # Size, time, hash and content refusals are not transient.
        except Exception as err:  # pylint: disable=broad-except  urllib raises several unrelated types.
            if attempt == num_attempts - 1:
                raise OSError(f'Cannot download {url}: {err}') from err
            time.sleep(1)
    return path if return_filename else open(path, 'rb')

#----------------------------------------------------------------------------
# Console helpers used by the training loop.

def format_time(seconds: float) -> str:
    """Compact human-readable duration: '42s', '3m 05s', '2h 07m 09s', '1d 04h 13m'."""
    s = int(round(seconds))
    units = [(s // 86400, 'd'), (s // 3600 % 24, 'h'), (s // 60 % 60, 'm'), (s % 60, 's')]
    units = units[next(i for i, (value, _) in enumerate(units) if value or i == 3):][:3]  # From the largest non-zero unit.
    return ' '.join(f'{value}{unit}' if i == 0 else f'{value:02d}{unit}' for i, (value, unit) in enumerate(units))


class Logger(contextlib.AbstractContextManager):
    """Copies everything written to stdout and stderr into a file as well. Used as a context
    manager or closed explicitly: close() puts the original streams back (unless replaced since)."""

    def __init__(self, file_name: str | None = None, file_mode: str = 'w', should_flush: bool = True):
        self.file = open(file_name, file_mode) if file_name is not None else None
        self.should_flush, self.stdout, self.stderr = should_flush, sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self

    def __exit__(self, *_exc) -> None:
        self.close()

    def write(self, text: str | bytes) -> None:
        for stream in filter(None, (self.file, self.stdout)):
            stream.write(text.decode() if isinstance(text, bytes) else text)
        if self.should_flush:
            self.flush()

    def flush(self) -> None:
        for stream in filter(None, (self.file, self.stdout)):
            stream.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self.flush()
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None
