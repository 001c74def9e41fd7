"""Hostile checkpoint files: memory bombs, tampered placeholders and mutated pickles.

Every such file must end in one CheckpointError line: never another exception, never a hang,
never an allocation larger than the file justifies, and nothing from it runs.
"""

import io
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from torch_utils import checkpoint
from training import networks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_rss_mb_of_loads(paths):
    """Load each path in one fresh interpreter; return its one-line outcomes and the growth of
    its peak RSS in MB over all loads (an upper bound for each)."""
    code = (
        'import resource, sys\n'
        'import training.augment, training.loss, training.networks\n'
        'from torch_utils import checkpoint\n'
        'base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n'
        'for path in sys.argv[1:]:\n'
        '    try:\n'
        '        checkpoint.load_checkpoint(path); print("loaded")\n'
        '    except checkpoint.CheckpointError as err:\n'
        '        print(f"CheckpointError: {err}")\n'
        'print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n')
    result = subprocess.run([sys.executable, '-c', code, *map(str, paths)], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=False, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    return lines[-1 - len(paths):-1], int(lines[-1])


def _torch_zip(path, compression, declared_numel, member_bytes):
    """A torch.save-style zip: data.pkl says one float32 storage of `declared_numel` elements."""
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, torch.storage.TypedStorage):
                return ('storage', torch.FloatStorage, '0', 'cpu', declared_numel)
            return None
    buf = io.BytesIO()
    P(buf, protocol=2).dump({'ema': torch.zeros(4)})
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('archive/data.pkl', buf.getvalue(), compress_type=zipfile.ZIP_STORED)
        zf.writestr('archive/byteorder', 'little', compress_type=zipfile.ZIP_STORED)
        zf.writestr('archive/version', '3\n', compress_type=zipfile.ZIP_STORED)
        zf.writestr('archive/data/0', member_bytes, compress_type=compression)


def test_memory_bombs_are_refused_without_allocating(tmp_path):
    # A 250 kB .pt whose deflated storage member expands to 256 MB, and 12 bytes that make
    # CPython's unpickler size its memo table for 128M entries (2 GB).
    size = 256 << 20
    bomb = tmp_path / 'bomb.pt'
    _torch_zip(bomb, zipfile.ZIP_DEFLATED, size // 4, bytes(size))
    assert bomb.stat().st_size < 1 << 20
    memo = tmp_path / 'memo.pkl'
    memo.write_bytes(b'\x80\x04N' + b'r' + struct.pack('<I', 0x08000000) + b'.')
    # torch.load's own allow-list admits bytearray(n), which zero-fills n bytes: a 300-byte .pt asks
    # for 1 GB; and protocol 5's BYTEARRAY8 allocates its length before reading the bytes.
    array_pt = tmp_path / 'bytearray.pt'
    with zipfile.ZipFile(array_pt, 'w') as zf:
        zf.writestr('archive/data.pkl', b'\x80\x02}X\x03\x00\x00\x00emac__builtin__\nbytearray\nJ\x00\x00\x00@\x85Rs.')
        zf.writestr('archive/byteorder', 'little')
        zf.writestr('archive/version', '3\n')
    array_pkl = tmp_path / 'bytearray.pkl'
    array_pkl.write_bytes(b'\x80\x05\x96' + struct.pack('<Q', 1 << 30) + b'.')
    outcomes, growth_mb = _peak_rss_mb_of_loads([bomb, memo, array_pt, array_pkl])
    assert outcomes[0].startswith(f'CheckpointError: {bomb}: member "archive/data/0" is compressed'), outcomes[0]
    # The pure-Python unpickler keeps its memo in a dict: the index costs nothing, the file is refused.
    assert outcomes[1] == f'CheckpointError: {memo}: expected a dict with an "ema" network, found a NoneType', outcomes[1]
    assert outcomes[2].startswith(f'CheckpointError: {array_pt}: refusing to load global "builtins.bytearray"'), outcomes[2]
    assert outcomes[3] == f'CheckpointError: {array_pkl}: the file holds a bytearray, which no checkpoint does', outcomes[3]
    assert growth_mb < 100, f'loading the bombs grew the process by {growth_mb} MB'


def test_zip_member_sizes_must_match(tmp_path):
    # A stored member that is shorter than its storage claims, and overlapping members.
    short = tmp_path / 'short.pt'
    _torch_zip(short, zipfile.ZIP_STORED, 1000, bytes(400))
    with pytest.raises(checkpoint.CheckpointError, match=r'short\.pt: .*record size \(400 bytes\) does not match expected size \(4000 bytes'):
        checkpoint.load_checkpoint(str(short))
    # A genuine torch.save file still loads, tensor intact.
    good = tmp_path / 'good.pt'
    torch.save({'ema': torch.arange(5.0)}, good)
    assert torch.equal(checkpoint.load_checkpoint(str(good))['ema'], torch.arange(5.0))


def test_zip_overlapping_members_cannot_multiply_memory(tmp_path):
    # Many central-directory entries pointing at the same stored bytes (a non-recursive zip
    # bomb): each looks fine alone, together they claim more than the archive holds.
    path = tmp_path / 'overlap.pt'
    numel = 1 << 16
    class Ref:
        def __init__(self, key):
            self.key = key

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ('storage', torch.FloatStorage, obj.key, 'cpu', numel) if isinstance(obj, Ref) else None
    buf = io.BytesIO()
    P(buf, protocol=2).dump({'ema': [Ref(str(i)) for i in range(8)]})
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('archive/data.pkl', buf.getvalue())
        zf.writestr('archive/data/0', bytes(4 * numel))
    raw = bytearray(path.read_bytes())
    # Duplicate the central-directory entry of data/0 under the names data/1 .. data/7.
    cd_start = raw.index(b'PK\x01\x02', raw.index(b'archive/data/0') + 1)
    entries = raw[cd_start:raw.index(b'PK\x05\x06')]
    entry0 = entries[entries.index(b'PK\x01\x02', 1):]
    extra = b''.join(entry0.replace(b'archive/data/0', f'archive/data/{i}'.encode()) for i in range(1, 8))
    eocd = raw[raw.index(b'PK\x05\x06'):]
    count = struct.unpack('<H', eocd[10:12])[0] + 7
    new_eocd = eocd[:8] + struct.pack('<HHII', count, count, len(entries) + len(extra), cd_start) + eocd[20:]
    path.write_bytes(bytes(raw[:cd_start] + entries + extra + new_eocd))
    assert len(zipfile.ZipFile(path).namelist()) == 9
    with pytest.raises(checkpoint.CheckpointError, match=r'overlap\.pt: .*members claim more bytes than the archive holds'):
        checkpoint.load_checkpoint(str(path))


@pytest.mark.parametrize('opcode', [b'\x95', b'\x8e'])  # FRAME, BINBYTES8
def test_huge_length_fields_are_clamped(tmp_path, opcode):
    path = tmp_path / 'length.pkl'
    path.write_bytes(b'\x80\x04' + opcode + struct.pack('<Q', 1 << 40) + b'N.')
    with pytest.raises(checkpoint.CheckpointError, match=r'length\.pkl: (truncated or corrupt|malformed|expected a dict)'):
        checkpoint.load_checkpoint(str(path))


def test_placeholder_cannot_be_overwritten(tmp_path):
    # REDUCE the persistence hook, then BUILD onto the placeholder it returned: a tampered
    # snapshot trying to swap the class (or state) it will be rebuilt as.
    meta = dict(type='class', version=6, module_src='', class_name='EDMPrecond', state={})
    for build in ({'class_name': 'ToyLoss'}, ({'state': {}}, {'cls': 'x'}), {'__class__': None}):
        payload = io.BytesIO()
        p = pickle.Pickler(payload, protocol=2)
        # Hand-assembled: GLOBAL hook, (meta,), REDUCE, <state>, BUILD, then {'ema': ...}.
        body = pickle.dumps((meta,), protocol=2)[2:-1] + pickle.dumps(build, protocol=2)[2:-1]
        raw = b'\x80\x02}q\x00X\x03\x00\x00\x00emaq\x01ctorch_utils.persistence\n_reconstruct_persistent_obj\n' + body
        # Stack: {} 'ema' hook (meta,) -> REDUCE -> stub; state; BUILD; SETITEM; STOP.
        raw = raw.replace(pickle.dumps(build, protocol=2)[2:-1], b'R' + pickle.dumps(build, protocol=2)[2:-1]) + b'bs.'
        del p
        path = tmp_path / 'swap.pkl'
        path.write_bytes(raw)
        with pytest.raises(checkpoint.CheckpointError, match=r'swap\.pkl: the file sets the state of a Persistent'):
            checkpoint.load_checkpoint(str(path))
    stub = checkpoint._persistent(meta)  # pylint: disable=protected-access
    with pytest.raises(AttributeError):
        stub.class_name = 'ToyLoss'
    assert stub.class_name == 'EDMPrecond'


def test_numpy_rebuild_cannot_hand_out_uninitialised_memory(tmp_path):
    # numpy's _reconstruct(ndarray, shape, dtype) with a real shape and no BUILD gives an array
    # of whatever was in memory (the `checkpoint info` command printed it as `ema`).
    raw = (b'\x80\x02}q\x00X\x03\x00\x00\x00emaq\x01cnumpy.core.multiarray\n_reconstruct\n'
           b'cnumpy\nndarray\nM\x00\x10\x85C\x01b\x87Rs.')
    path = tmp_path / 'uninit.pkl'
    path.write_bytes(raw)
    with pytest.raises(checkpoint.CheckpointError, match=r'uninit\.pkl: numpy array rebuild with shape \(4096,\)'):
        checkpoint.load_checkpoint(str(path), require_ema=False)
    result = subprocess.run([sys.executable, '-m', 'torch_utils.checkpoint', 'info', str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 1 and 'numpy array rebuild' in result.stderr and 'Traceback' not in result.stderr
    assert result.stdout == ''
    # Object arrays and odd dtypes are refused; ordinary numpy values still load.
    for bad in (b'O', b'V99999999', b'U8'):
        raw = b'\x80\x02cnumpy\ndtype\nC' + bytes([len(bad)]) + bad + b'\x85R.'
        path.write_bytes(raw)
        with pytest.raises(checkpoint.CheckpointError, match='numpy dtype|not a plain numeric'):
            checkpoint.load_checkpoint(str(path), require_ema=False)
    # numpy.ndarray called directly (REDUCE) or through NEWOBJ: an uninitialised array of any size the
    # file names (here 2**30 elements, 8 GB), in a .pkl and in a .pt alike.
    for opcode in (b'R', b'\x81'):
        body = b'cnumpy\nndarray\nJ\x00\x00\x00\x40\x85\x85' + opcode
        path.write_bytes(b'\x80\x02}X\x03\x00\x00\x00ema' + body + b's.')
        pt = tmp_path / 'ndarray.pt'
        with zipfile.ZipFile(pt, 'w') as zf:
            zf.writestr('archive/data.pkl', b'\x80\x02}X\x03\x00\x00\x00ema' + body + b's.')
            zf.writestr('archive/byteorder', 'little')
            zf.writestr('archive/version', '3\n')
        for bad in (path, pt):
            with pytest.raises(checkpoint.CheckpointError, match='not callable|not a type'):
                checkpoint.load_checkpoint(str(bad))
    value = dict(ema=None, a=np.arange(6, dtype=np.float32).reshape(2, 3), s=np.float64(2.5), i=np.int64(7))
    for good in (tmp_path / 'numpy.pkl', tmp_path / 'numpy.pt'):
        if good.suffix == '.pt':
            torch.save(value, good)
        else:
            good.write_bytes(pickle.dumps(value, protocol=4))
        got = checkpoint.load_checkpoint(str(good))
        assert np.array_equal(got['a'], value['a']) and got['a'].dtype == np.float32 and got['s'] == 2.5 and got['i'] == 7


def test_overlapping_tensor_views_are_refused(tmp_path):
    # A stride-0 view of one element standing for a billion: expands on the first copy.
    big = torch.zeros(1).expand(10**9)
    path = tmp_path / 'expand.pt'
    torch.save({'ema': big}, path)
    with pytest.raises(checkpoint.CheckpointError, match=r'expand\.pt: tensor of size \(1000000000,\) has more elements than its storage \(1\)'):
        checkpoint.load_checkpoint(str(path))


def _fuzz_outcome(path):
    try:
        checkpoint.load_checkpoint(str(path))
    except checkpoint.CheckpointError as err:
        text = str(err)
        assert '\n' not in text and text.startswith(str(path)), text
        return 'error'
    return 'loaded'


def test_mutated_checkpoints_fail_cleanly(tmp_path):
    # Random byte flips, truncations and insertions into a real snapshot and training state.
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, model_type='DhariwalUNet', model_channels=32,
                              channel_mult=[1], num_blocks=1, attn_resolutions=[])
    pkl = pickle.dumps(dict(ema=net, step=3), protocol=4)
    pt = io.BytesIO()
    torch.save(dict(ema=net, step=3), pt)
    rng = random.Random(1234)
    outcomes = {}
    for name, blob in (('snap.pkl', pkl), ('state.pt', pt.getvalue())):
        for trial in range(60):
            data = bytearray(blob)
            kind = trial % 3
            if kind == 0:
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            elif kind == 1:
                del data[rng.randrange(len(data)):]
            else:
                pos = rng.randrange(len(data))
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
            path = tmp_path / f'{trial}-{name}'
            path.write_bytes(bytes(data))
            outcome = _fuzz_outcome(path)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            path.unlink()
    assert outcomes.get('error', 0) > 60  # Most mutations must be caught, each as one line.


def _tampered_snapshot(path, cls='EDMPrecond', base=None, **claimed):
    """A genuine tiny snapshot whose recorded constructor arguments are replaced by `claimed`."""
    kwargs = dict(dict(img_resolution=8, img_channels=3, model_type='DhariwalUNet', model_channels=16, channel_mult=[1],
                       num_blocks=1, attn_resolutions=[]), **(base or {}))
    net = getattr(networks, cls)(**kwargs)
    net._init_kwargs = dict(net._init_kwargs, **claimed)  # pylint: disable=protected-access
    path.write_bytes(pickle.dumps(dict(ema=net), protocol=4))
    return path


def test_constructor_argument_bombs_fail_fast(tmp_path):
    # A few kB of tensors under constructor arguments that describe terabytes of weights, ten
    # million modules, a 10**9-entry noise table or a 60000x60000 resampling filter: each must
    # be refused before it is allocated, in one line; the untampered file still loads.
    song = dict(model_type='SongUNet', channel_mult=[1, 1])
    bombs = [
        _tampered_snapshot(tmp_path / 'channels.pkl', model_channels=10**6),
        _tampered_snapshot(tmp_path / 'emb.pkl', channel_mult_emb=10**7),
        _tampered_snapshot(tmp_path / 'blocks.pkl', num_blocks=10**8),
        _tampered_snapshot(tmp_path / 'levels.pkl', channel_mult=[1] * 10**5),
        _tampered_snapshot(tmp_path / 'noise_levels.pkl', cls='iDDPMPrecond', M=10**9),
        _tampered_snapshot(tmp_path / 'filter.pkl', base=song, resample_filter=[1] * 60000),
    ]
    good = _tampered_snapshot(tmp_path / 'good.pkl')
    assert all(path.stat().st_size < 1 << 20 for path in bombs)
    outcomes, growth_mb = _peak_rss_mb_of_loads(bombs + [good])
    for path, outcome in zip(bombs, outcomes):
        assert outcome.startswith(f'CheckpointError: {path}: ') and outcome.endswith('refusing to build it'), outcome
        assert 'far more than the file holds' in outcome, outcome
    assert outcomes[-1] == 'loaded'
    assert growth_mb < 300, f'loading the bombs grew the process by {growth_mb} MB'


def test_constructor_argument_bomb_in_safetensors_config(tmp_path):
    # The same attack through the JSON config of an exported network.
    src = _tampered_snapshot(tmp_path / 'net.pkl')
    st_path, json_path = checkpoint.export_safetensors(str(src), str(tmp_path / 'net.safetensors'))
    config = json.loads(open(json_path, encoding='utf-8').read())
    reference = checkpoint.load_network(st_path)
    config['init_kwargs']['model_channels'] = 10**6
    with open(json_path, 'w', encoding='utf-8') as f:
        json.dump(config, f)
    with pytest.raises(checkpoint.CheckpointError, match=r'net\.safetensors \((training\.networks\.)?EDMPrecond\): its constructor arguments describe tensors of far more than the file holds \([\d,]+ elements\)'):
        checkpoint.load_checkpoint(st_path)
    # An honest mismatch (twice the channels) names the first differing tensor instead.
    config['init_kwargs']['model_channels'] = 32
    with open(json_path, 'w', encoding='utf-8') as f:
        json.dump(config, f)
    with pytest.raises(checkpoint.CheckpointError, match=r'net\.safetensors \(training\.networks\.EDMPrecond\): tensor "model\.[^"]+" has shape \['):
        checkpoint.load_checkpoint(st_path)
    assert sum(p.numel() for p in reference.parameters()) > 0
