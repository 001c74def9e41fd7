"""dnnlib console helpers and torch_utils.misc file/tensor helpers."""

import os
import stat
import sys

import pytest
import torch

import dnnlib
from torch_utils import misc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_format_time():
    assert dnnlib.util.format_time(42) == '42s'
    assert dnnlib.util.format_time(185) == '3m 05s'
    assert dnnlib.util.format_time(2 * 3600 + 7 * 60 + 9) == '2h 07m 09s'
    assert dnnlib.util.format_time(86400 + 4 * 3600 + 13 * 60) == '1d 04h 13m'


def test_logger_tees_and_restores_streams(tmp_path, capsys):
    path = tmp_path / 'log.txt'
    before = sys.stdout
    with dnnlib.util.Logger(file_name=str(path), file_mode='a'):
        print('hello log')
        print('to stderr', file=sys.stderr)
    assert sys.stdout is before
    text = path.read_text()
    assert 'hello log' in text and 'to stderr' in text
    assert 'hello log' in capsys.readouterr().out


def test_atomic_write_permissions_and_failure(tmp_path):
    path = tmp_path / 'out.json'
    with dnnlib.util.atomic_write(path, 'wt') as f:
        f.write('first')
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask
    with pytest.raises(RuntimeError):
        with dnnlib.util.atomic_write(path, 'wt') as f:
            f.write('partial')
            raise RuntimeError('crash')
    assert path.read_text() == 'first' and os.listdir(tmp_path) == ['out.json']


def test_constant_is_cached_and_broadcast():
    a = misc.constant([1, 2], shape=[3, 2], dtype=torch.float32)
    assert a.shape == (3, 2) and a.is_contiguous() and torch.equal(a[2], torch.tensor([1.0, 2.0]))
    assert misc.constant([1, 2], shape=[3, 2], dtype=torch.float32) is a


def test_print_module_summary(capsys):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    out = misc.print_module_summary(net, [torch.zeros(5, 4)])
    assert out.shape == (5, 2)
    text = capsys.readouterr().out
    assert 'Total' in text and str(4 * 3 + 3 + 3 * 2 + 2) in text and '[5, 2]' in text


#----------------------------------------------------------------------------
# open_url: streamed downloads with a size cap and SHA-256 checks, against a local server.

import hashlib  # noqa: E402
import http.server  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402


class _Handler(http.server.BaseHTTPRequestHandler):
    files = {}      # path -> bytes
    requests = []   # paths asked for
    release = threading.Event()

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.requests.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if not self.path.startswith('/nolength/'):
            self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.path.startswith('/drip/'):  # One byte every 0.1 s: no read ever times out.
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if self.release.wait(timeout=0.1):
                    return
            return
        if self.path.startswith('/stall/') and not self.release.is_set():  # Half the body, then wait.
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.release.wait(timeout=30)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files, _Handler.requests, _Handler.release = {}, [], threading.Event()
    srv = http.server.HTTPServer(('127.0.0.1', 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{srv.server_address[1]}'
    finally:
        _Handler.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def test_open_url_downloads_verifies_and_caches(tmp_path, server):
    data = os.urandom(3 * 2**20 + 17)  # Several chunks.
    _Handler.files['/w/net.pkl'] = data
    url = f'{server}/w/net.pkl'
    path = dnnlib.util.open_url(url, cache_dir=str(tmp_path), return_filename=True, verbose=False, sha256=_sha(data).upper())
    assert open(path, 'rb').read() == data and os.path.dirname(path) == str(tmp_path)
    with dnnlib.util.open_url(url, cache_dir=str(tmp_path), verbose=False, sha256=_sha(data)) as f:
        assert f.read() == data
    assert _Handler.requests == ['/w/net.pkl']  # The second call was a verified cache hit.
    assert os.listdir(tmp_path) == [os.path.basename(path)]


def test_open_url_refuses_hash_mismatch(tmp_path, server):
    _Handler.files['/a.pkl'] = b'tampered content'
    with pytest.raises(dnnlib.UserError, match=r'a\.pkl but its SHA-256 [0-9a-f]{64} does not match the expected 0{64}'):
        dnnlib.util.open_url(f'{server}/a.pkl', cache_dir=str(tmp_path), verbose=False, sha256='0' * 64)
    assert os.listdir(tmp_path) == []  # Nothing cached, no temporary left behind.
    assert _Handler.requests == ['/a.pkl']  # A wrong hash is not retried.


def test_open_url_replaces_planted_cache_entry(tmp_path, server):
    good = b'the real detector'
    _Handler.files['/det.pkl'] = good
    url = f'{server}/det.pkl'
    planted = tmp_path / dnnlib.util._cache_file_name(url)
    planted.write_bytes(b'planted by someone else')
    # Without a known hash the cache is trusted by name (that is what a cache is)...
    assert open(dnnlib.util.open_url(url, cache_dir=str(tmp_path), return_filename=True, verbose=False), 'rb').read() == b'planted by someone else'
    # ...with one, the planted entry is detected, downloaded again and replaced.
    path = dnnlib.util.open_url(url, cache_dir=str(tmp_path), return_filename=True, verbose=False, sha256=_sha(good))
    assert path == str(planted) and planted.read_bytes() == good
    # A planted entry that the server cannot correct is refused, and left as it is.
    planted.write_bytes(b'planted again')
    _Handler.files['/det.pkl'] = b'server compromised too'
    with pytest.raises(dnnlib.UserError, match='does not match'):
        dnnlib.util.open_url(url, cache_dir=str(tmp_path), verbose=False, sha256=_sha(good))
    assert sorted(os.listdir(tmp_path)) == [planted.name]


def test_open_url_size_cap(tmp_path, server):
    data = b'x' * (2**20 + 5)
    _Handler.files['/big.pt'] = data
    _Handler.files['/nolength/big.pt'] = data
    # Refused from the declared length, before reading the body.
    with pytest.raises(dnnlib.UserError, match=rf'big\.pt: it has {len(data)} bytes, more than the limit of 1000'):
        dnnlib.util.open_url(f'{server}/big.pt', cache_dir=str(tmp_path), verbose=False, max_bytes=1000)
    # No declared length: stopped while streaming once the limit is passed.
    with pytest.raises(dnnlib.UserError, match='more than the limit of 1000 bytes'):
        dnnlib.util.open_url(f'{server}/nolength/big.pt', cache_dir=str(tmp_path), verbose=False, max_bytes=1000)
    assert os.listdir(tmp_path) == []
    # Within the limit, with and without a declared length.
    for path in ('/big.pt', '/nolength/big.pt'):
        with dnnlib.util.open_url(server + path, cache_dir=str(tmp_path / 'ok'), verbose=False, max_bytes=len(data)) as f:
            assert f.read() == data


def test_open_url_checks_local_files_too(tmp_path):
    path = tmp_path / 'local.pkl'
    path.write_bytes(b'local')
    assert dnnlib.util.open_url(str(path), return_filename=True, sha256=_sha(b'local')) == str(path)
    assert dnnlib.util.open_url(path.as_uri(), return_filename=True, sha256=_sha(b'local')) == str(path)
    with pytest.raises(dnnlib.UserError, match='local.pkl: SHA-256 .* does not match'):
        dnnlib.util.open_url(str(path), sha256='1' * 64)
    with pytest.raises(ValueError, match='64 hex digits'):
        dnnlib.util.open_url(str(path), sha256='abc')


def test_open_url_removes_temporaries_of_killed_downloads(tmp_path, server):
    # A download killed with SIGKILL leaves its temporary; the next download of the same URL
    # removes it, but never a temporary whose writer is alive, one from another host, or one
    # belonging to another cache entry.
    data = os.urandom(2**20)
    _Handler.files['/stall/net.pkl'] = data
    url = f'{server}/stall/net.pkl'
    code = f'import dnnlib.util; dnnlib.util.open_url({url!r}, cache_dir={str(tmp_path)!r}, verbose=False)'
    proc = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        for _ in range(600):
            parts = [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]
            if parts and _Handler.requests:  # Killed mid-body (the server holds back the rest).
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        _Handler.release.set()
    assert len(parts) == 1, 'the download never started'
    stale = parts[0]
    entry = dnnlib.util._cache_file_name(url)
    host = dnnlib.util.host_tag()
    assert stale.name.startswith(f'.{entry}.{host}-{proc.pid}.'), stale.name
    live = tmp_path / f'.{entry}.{host}-{os.getpid()}.abc12345.tmp'      # A download in progress (ours).
    other_host = tmp_path / f'.{entry}.otherhost-{proc.pid}.abc12345.tmp'
    other_entry = tmp_path / f'.{dnnlib.util._cache_file_name(url + "x")}.{host}-{proc.pid}.abc12345.tmp'
    for path in (live, other_host, other_entry):
        path.write_bytes(b'partial')
    # The server now answers in full; the next download removes only the stale temporary.
    path = dnnlib.util.open_url(url, cache_dir=str(tmp_path), return_filename=True, verbose=False)
    assert open(path, 'rb').read() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_host.name, other_entry.name, entry])
    # A cache hit leaves the directory alone; a fresh download of the other entry removes its own.
    _Handler.files['/stall/net.pklx'] = data
    dnnlib.util.open_url(url + 'x', cache_dir=str(tmp_path), return_filename=True, verbose=False)
    assert not other_entry.exists() and live.exists() and other_host.exists()


def test_open_url_deadline_stops_a_dripping_server(tmp_path, server):
    # The deadline is checked after every network read, not after every 1 MiB: a server that
    # sends a byte at a time within the socket timeout cannot hold a download forever.
    _Handler.files['/drip/net.pkl'] = bytes(100)  # 10 s in all, less than one chunk.
    start = time.monotonic()
    with pytest.raises(dnnlib.UserError, match=r'net\.pkl: not done after 1 s'):
        dnnlib.util.open_url(f'{server}/drip/net.pkl', cache_dir=str(tmp_path), verbose=False, deadline_s=1)
    assert time.monotonic() - start < 5 and os.listdir(tmp_path) == []


def test_open_url_never_caches_an_html_page(tmp_path, server):
    # A login or quota page served with status 200 instead of a detector: refused, not cached,
    # so the next run downloads again instead of failing on the cached page forever.
    _Handler.files['/pt_inception.pth'] = b'\n  <!DOCTYPE html><html><body>Quota exceeded</body></html>'
    for _ in range(2):
        with pytest.raises(dnnlib.UserError, match=r'pt_inception\.pth sent an HTML page instead of the file'):
            dnnlib.util.open_url(f'{server}/pt_inception.pth', cache_dir=str(tmp_path), verbose=False)
    assert os.listdir(tmp_path) == [] and _Handler.requests == ['/pt_inception.pth'] * 2
    _Handler.files['/notes.pth'] = b'<h1>not an html document, just bytes that start with a tag</h1>'
    assert dnnlib.util.open_url(f'{server}/notes.pth', cache_dir=str(tmp_path), verbose=False).read().startswith(b'<h1>')

