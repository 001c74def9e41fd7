"""training/data_files.py: the one image reader and label checker shared by training, evaluation and
dataset_tool.py. Pixels per PIL mode against an independent computation, the same pixels through
all three users, one clear error per bad file, labels checked once, bombs refused."""

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import PIL.Image
import pytest

import dataset_tool
from conftest import run_cli
from training import data_files
from training.dataset import DatasetError, ImageFolderDataset

#----------------------------------------------------------------------------
# Helpers.

def png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)

def raw_png(w, h, bit_depth, colour_type, pixel_rows):
    """A PNG written byte by byte (PIL cannot write 16-bit RGB)."""
    ihdr = struct.pack('>IIBBBBB', w, h, bit_depth, colour_type, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', ihdr) + png_chunk(b'IDAT', zlib.compress(pixel_rows))
            + png_chunk(b'IEND', b''))

RNG = np.random.RandomState(0)
GRAY16 = RNG.randint(0, 65536, (8, 8)).astype(np.uint16)
RGB8 = RNG.randint(0, 256, (8, 8, 3)).astype(np.uint8)
RGBA8 = RNG.randint(0, 256, (8, 8, 4)).astype(np.uint8)
LA8 = RNG.randint(0, 256, (8, 8, 2)).astype(np.uint8)
BITS = RNG.rand(8, 8) > 0.5
RGB16 = RNG.randint(0, 65536, (8, 8, 3)).astype(np.uint16)

def write_case(path, case):
    """Write one test image; return the uint8 HxW(xC) array the reader must give (None = refuse)."""
    if case == 'I;16 png':
        PIL.Image.fromarray(GRAY16).save(path + '.png')
        return (GRAY16 >> 8).astype(np.uint8)
    if case == 'I;16B tiff':
        PIL.Image.frombytes('I;16B', (8, 8), GRAY16.astype('>u2').tobytes()).save(path + '.tif')
        return (GRAY16 >> 8).astype(np.uint8)
    if case == 'I;16L tiff':
        PIL.Image.frombytes('I;16L', (8, 8), GRAY16.astype('<u2').tobytes()).save(path + '.tif')
        return (GRAY16 >> 8).astype(np.uint8)
    if case == 'I tiff':
        PIL.Image.fromarray(GRAY16.astype(np.int32)).save(path + '.tif')
        return (GRAY16 >> 8).astype(np.uint8)
    if case == 'I out of range':
        PIL.Image.fromarray(GRAY16.astype(np.int32) * 4).save(path + '.tif')
        return None
    if case == 'F':
        PIL.Image.fromarray(RNG.rand(8, 8).astype(np.float32)).save(path + '.tif')
        return None
    if case == '1':
        PIL.Image.fromarray(BITS).save(path + '.png')
        return BITS.astype(np.uint8) * 255
    if case == 'L':
        PIL.Image.fromarray(RGB8[:, :, 0]).save(path + '.png')
        return RGB8[:, :, 0]
    if case == 'LA':
        PIL.Image.fromarray(LA8, 'LA').save(path + '.png')
        return LA8
    if case == 'RGBA':
        PIL.Image.fromarray(RGBA8, 'RGBA').save(path + '.png')
        return RGBA8
    if case in ('P', 'P transparent'):
        img = PIL.Image.fromarray(RGB8).quantize(16)
        if case == 'P transparent':
            img.info['transparency'] = 3
        img.save(path + '.png')
        palette = np.array(img.getpalette()[:3 * 256], np.uint8).reshape(-1, 3)
        return palette[np.asarray(img)]
    if case == 'CMYK':
        cmyk = RNG.randint(0, 256, (8, 8, 4)).astype(np.uint8)
        PIL.Image.fromarray(cmyk, 'CMYK').save(path + '.tif')
        return np.asarray(PIL.Image.fromarray(cmyk, 'CMYK').convert('RGB'))  # PIL's formula differs by version.
    if case == 'RGB 16-bit png':
        rows = b''.join(b'\x00' + RGB16[y].astype('>u2').tobytes() for y in range(8))
        with open(path + '.png', 'wb') as f:
            f.write(raw_png(8, 8, 16, 2, rows))
        return (RGB16 >> 8).astype(np.uint8)
    raise ValueError(case)

CASES = ['I;16 png', 'I;16B tiff', 'I;16L tiff', 'I tiff', 'I out of range', 'F', '1', 'L', 'LA', 'RGBA', 'P',
         'P transparent', 'CMYK', 'RGB 16-bit png']

#----------------------------------------------------------------------------
# Pixels per mode.

@pytest.mark.parametrize('case', CASES)
def test_read_image_modes(tmp_path, case):
    expected = write_case(str(tmp_path / 'img'), case)
    (path,) = [p for p in tmp_path.iterdir()]
    with open(path, 'rb') as f:
        if expected is None:
            with pytest.raises(data_files.DatasetError, match='img'):
                data_files.read_image(f, path.name)
            return
        arr = data_files.read_image(f, path.name)
    assert arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, expected)
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    with PIL.Image.open(path) as img:
        assert data_files.natural_channels(img.mode) == channels  # Header check agrees with the decode.


class _RefusingSpng:
    """pyspng as 0.1.4 behaves on gray + alpha PNGs and on damaged files."""
    @staticmethod
    def load(data):
        raise RuntimeError('pyspng: could not decode image size: invalid format')


def test_pngs_that_pyspng_refuses_are_read_by_pil(tmp_path, monkeypatch):
    # With pyspng installed, a gray + alpha or a truncated PNG must still give PIL's pixels or
    # one DatasetError, never pyspng's RuntimeError (a traceback in train.py).
    monkeypatch.setattr(data_files, 'pyspng', _RefusingSpng)
    expected = write_case(str(tmp_path / 'la'), 'LA')
    data = (tmp_path / 'la.png').read_bytes()
    np.testing.assert_array_equal(data_files.read_image(io.BytesIO(data), 'la.png'), expected)
    with pytest.raises(data_files.DatasetError, match='cut.png: cannot decode it'):
        data_files.read_image(io.BytesIO(data[:len(data) // 2]), 'cut.png')


@pytest.mark.skipif(data_files.pyspng is None, reason='pyspng is not installed')
@pytest.mark.parametrize('case', [c for c in CASES if 'png' in c or c in ('1', 'L', 'LA', 'RGBA', 'P', 'P transparent')])
def test_pyspng_gives_the_pixels_of_pil(tmp_path, case):
    write_case(str(tmp_path / 'img'), case)
    data = next(tmp_path.iterdir()).read_bytes()
    np.testing.assert_array_equal(data_files.read_image(io.BytesIO(data), 'img', use_pyspng=True),
                                  data_files.read_image(io.BytesIO(data), 'img', use_pyspng=False))


def test_16bit_gray_same_pixels_in_training_evaluation_and_dataset_tool(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    PIL.Image.fromarray(GRAY16).save(src / '000000.png')
    PIL.Image.fromarray(GRAY16[::-1].copy()).save(src / '000001.png')
    expected = [(GRAY16 >> 8).astype(np.uint8), (GRAY16[::-1] >> 8).astype(np.uint8)]
    assert (expected[0] == 255).mean() < 0.05  # convert('L') would saturate: almost all 255.

    ds = ImageFolderDataset(str(src))  # Training (and evaluate.py, which reads folders through it).
    for i in range(2):
        np.testing.assert_array_equal(ds[i][0][0], expected[i])

    from metrics.activations import open_images
    images = open_images(str(src))
    first = np.asarray(images[0][0] if isinstance(images[0], tuple) else images[0])
    np.testing.assert_array_equal(first.reshape(8, 8), expected[0])

    res = run_cli(dataset_tool.main, '--source', str(src), '--dest', str(tmp_path / 'out'), '--workers', '1')
    assert res.exit_code == 0, res.output
    out = ImageFolderDataset(str(tmp_path / 'out'))
    for i in range(2):
        np.testing.assert_array_equal(out[i][0][0], expected[i])


def test_palette_with_transparency_reads_as_rgb_beside_rgb(tmp_path):
    expected = write_case(str(tmp_path / '000000'), 'P transparent')
    PIL.Image.fromarray(RGB8).save(tmp_path / '000001.png')
    ds = ImageFolderDataset(str(tmp_path))
    assert ds.image_shape == [3, 8, 8]
    np.testing.assert_array_equal(ds[0][0], expected.transpose(2, 0, 1))
    np.testing.assert_array_equal(ds[1][0], RGB8.transpose(2, 0, 1))

#----------------------------------------------------------------------------
# Bad image files: one clear error naming the file.

@pytest.mark.parametrize('content', [b'hello, I am text', b'', b'\x89PNG\r\n\x1a\n broken'])
def test_text_file_named_png_is_one_clear_error(tmp_path, content):
    (tmp_path / '000000.png').write_bytes(content)
    PIL.Image.fromarray(RGB8).save(tmp_path / '000001.png')
    with pytest.raises(DatasetError) as info:
        ImageFolderDataset(str(tmp_path))
    message = str(info.value)
    assert '000000.png' in message and str(tmp_path) in message and '\n' not in message
    assert 'BufferedReader' not in message


def test_decompression_bomb_header_is_refused_before_decoding(tmp_path):
    # 100000 x 100000 RGB claimed by a 100-byte file: 30 GB if decoded.
    PIL.Image.fromarray(RGB8).save(tmp_path / '000000.png')
    (tmp_path / '000001.png').write_bytes(raw_png(100000, 100000, 8, 2, b'\x00' * 100))
    with pytest.raises(DatasetError, match='000001.png.*MAX_IMAGE_PIXELS'):
        ImageFolderDataset(str(tmp_path))
    with open(tmp_path / '000001.png', 'rb') as f:
        with pytest.raises(data_files.DatasetError, match='decompression bomb'):
            data_files.read_image(f, '000001.png')


def test_pixel_limit_applies_between_pil_warning_and_error(tmp_path, monkeypatch):
    # PIL only warns between MAX_IMAGE_PIXELS and twice that; we refuse at MAX_IMAGE_PIXELS.
    monkeypatch.setattr(PIL.Image, 'MAX_IMAGE_PIXELS', 40)
    PIL.Image.fromarray(RGB8).save(tmp_path / '000000.png')  # 64 pixels: warning zone for PIL.
    with pytest.raises(DatasetError, match='000000.png'):
        ImageFolderDataset(str(tmp_path))

#----------------------------------------------------------------------------
# Labels: validated once, with file and entry named.

def _labelled(tmp_path, labels_json, n=2):
    for i in range(n):
        PIL.Image.fromarray(RGB8).save(tmp_path / f'{i:06d}.png')
    (tmp_path / 'dataset.json').write_text(labels_json if isinstance(labels_json, str) else json.dumps(labels_json))
    return str(tmp_path)

def _pairs(*labels):
    return {'labels': [[f'{i:06d}.png', lab] for i, lab in enumerate(labels)]}

BAD_LABELS = {
    'fractional': (_pairs(0.7, 1.9), 'entry 0 ["000000.png", 0.7]'),
    'string': (_pairs('cat', 'dog'), 'entry 0 ["000000.png", "cat"]'),
    'huge class': (_pairs(0, 50_000_000), 'class index must be in 0..'),
    'bigger than int64': (_pairs(0, 2 ** 70), 'entry 1'),
    'negative': (_pairs(0, -1), 'entry 1'),
    'bool': (_pairs(True, False), 'entry 0'),
    'null': (_pairs(None, 1), 'entry 0'),
    'mixed kinds': (_pairs(1, [0.5, 0.5]), 'one kind'),
    'ragged vectors': (_pairs([1.0], [0.5, 0.5]), 'one kind'),
    'nan': ('{"labels": [["000000.png", [NaN, 1]], ["000001.png", [0, 1]]]}', 'finite'),
    'inf class': ('{"labels": [["000000.png", Infinity], ["000001.png", 1]]}', 'entry 0'),
    'duplicate': ({'labels': [['000000.png', 0], ['000001.png', 1], ['000000.png', 1]]}, 'listed twice'),
    'labels not a list': ({'labels': 5}, 'must be a list'),
    'one-element entry': ({'labels': [['000000.png'], ['000001.png', 1]]}, 'expected [file_name, label]'),
    'top level list': ([1, 2], 'expected {"labels"'),
    'missing': ({'labels': [['000000.png', 0]]}, 'no label for 000001.png'),
    'not json': ('{"labels": [["000000.png", 0', 'not valid JSON'),
}

@pytest.mark.parametrize('case', sorted(BAD_LABELS))
def test_bad_labels_are_refused_with_file_and_entry(tmp_path, case):
    content, message = BAD_LABELS[case]
    path = _labelled(tmp_path, content)
    with pytest.raises(DatasetError) as info:
        ImageFolderDataset(path, use_labels=True)
    assert 'dataset.json' in str(info.value) and message in str(info.value), str(info.value)
    # dataset_tool checks a source's dataset.json by the same rules, before writing anything.
    res = run_cli(dataset_tool.main, '--source', path, '--dest', str(tmp_path / 'out.zip'), '--workers', '1')
    if case != 'missing':  # The tool writes no labels then (documented), instead of failing.
        assert res.exit_code == 1 and message in res.output and 'Traceback' not in res.output, res.output
        assert not (tmp_path / 'out.zip').exists()


def test_good_labels(tmp_path):
    # Integral floats are class indices (as EDM reads them); a {file: label} dict is accepted.
    ds = ImageFolderDataset(_labelled(tmp_path, _pairs(0.0, 2.0)), use_labels=True)
    assert ds.label_dim == 3
    np.testing.assert_array_equal(ds[1][1], np.float32([0, 0, 1]))
    (tmp_path / 'dataset.json').write_text(json.dumps({'labels': {'000000.png': [1, 2.5], '000001.png': [0, -1]}}))
    ds = ImageFolderDataset(str(tmp_path), use_labels=True)
    assert ds.label_dim == 2
    np.testing.assert_array_equal(ds[0][1], np.float32([1, 2.5]))


def test_oversized_dataset_json_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(data_files, 'JSON_BASE_BYTES', 1000)
    monkeypatch.setattr(data_files, 'JSON_BYTES_PER_IMAGE', 100)
    labels = _pairs(0, 1)
    labels['labels'] += [[f'zz{i}.png', 1] for i in range(200)]  # About 4 kB for 2 images.
    path = _labelled(tmp_path, labels)
    with pytest.raises(DatasetError, match='dataset.json: larger than 1200 bytes'):
        ImageFolderDataset(path, use_labels=True)


def test_zip_bomb_dataset_json_is_refused(tmp_path, monkeypatch):
    # A deflated dataset.json that expands to 64 MiB of spaces in a zip of about 64 kB.
    monkeypatch.setattr(data_files, 'JSON_BASE_BYTES', 1 << 20)
    buf = io.BytesIO()
    PIL.Image.fromarray(RGB8).save(buf, format='png')
    with zipfile.ZipFile(tmp_path / 'd.zip', 'w', compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr('000000.png', buf.getvalue())
        with z.open('dataset.json', 'w', force_zip64=True) as f:
            f.write(b'{"labels": [["000000.png", 0]]')
            for _ in range(64):
                f.write(b' ' * (1 << 20))
            f.write(b'}')
    assert os.path.getsize(tmp_path / 'd.zip') < 1 << 20
    with pytest.raises(DatasetError, match='larger than'):
        ImageFolderDataset(str(tmp_path / 'd.zip'), use_labels=True)
    res = run_cli(dataset_tool.main, '--source', str(tmp_path / 'd.zip'), '--dest', str(tmp_path / 'o.zip'), '--workers', '1')
    assert res.exit_code == 1 and 'larger than' in res.output and not (tmp_path / 'o.zip').exists()

#----------------------------------------------------------------------------
# Memory follows the pixels, not what a file carries: padded PNGs in a dataset zip.

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _zero_chunk(f, kind, size):
    """A PNG chunk of `size` zero bytes, written a MiB at a time (the test holds none of it)."""
    f.write(struct.pack('>I', size) + kind)
    crc, block = zlib.crc32(kind), bytes(MiB)
    for _ in range(size // MiB):
        f.write(block)
        crc = zlib.crc32(block, crc)
    f.write(struct.pack('>I', crc & 0xffffffff))

def _inflating(prefix, size):
    """prefix + a zlib stream of `size` zero bytes, compressed in pieces."""
    z = zlib.compressobj(9)
    return prefix + b''.join(z.compress(bytes(MiB)) for _ in range(size // MiB)) + z.flush()

def padded_zip(path, before=(), after=(), trailing=0, json_pad=0):
    """A dataset zip (deflated): 000000.png is a 16x16 PNG with extra chunks before and after its
    pixels (kind, size of zeros or bytes) and `trailing` zero bytes after its end; 000001.png is
    plain; dataset.json has `json_pad` spaces."""
    rows = b''.join(b'\0' + RGB8[y % 8].tobytes() * 2 for y in range(16))
    plain = io.BytesIO()
    PIL.Image.fromarray(RGB8).resize((16, 16)).save(plain, format='png')
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr('000001.png', plain.getvalue())
        with z.open('000000.png', 'w', force_zip64=True) as f:
            f.write(b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', struct.pack('>IIBBBBB', 16, 16, 8, 2, 0, 0, 0)))
            for kind, size in before:
                _zero_chunk(f, kind, size) if isinstance(size, int) else f.write(png_chunk(kind, size))
            f.write(png_chunk(b'IDAT', zlib.compress(rows)))
            for kind, size in after:
                _zero_chunk(f, kind, size)
            f.write(png_chunk(b'IEND', b''))
            for _ in range(trailing // MiB):
                f.write(bytes(MiB))
        with z.open('dataset.json', 'w', force_zip64=True) as f:
            f.write(b'{"labels": [["000000.png", 0], ["000001.png", 1]]')
            for _ in range(json_pad // MiB):
                f.write(b' ' * MiB)
            f.write(b'}')
    return path

_LOAD_THREE_WAYS = '''
import os, resource, sys, zipfile
import dnnlib, dataset_tool
from training import data_files
from training.dataset import ImageFolderDataset
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[1:]:
    outcome = []
    with zipfile.ZipFile(path) as z, z.open('000000.png') as f:  # The shared reader itself.
        try:
            outcome.append(str(data_files.read_image(f, '000000.png').shape))
        except data_files.DatasetError:
            outcome.append('refused')
    try:  # train.py and evaluate.py read datasets through this.
        ds = ImageFolderDataset(path, use_labels=True)
        outcome.append(f'{len([ds[i] for i in range(len(ds))])} items')
    except data_files.DatasetError:
        outcome.append('refused')
    try:
        tally = dataset_tool.convert(path, path + '.out', workers=1, log=lambda msg: None)
        outcome.append(f'wrote {tally.written} skipped {len(tally.skipped)}')
    except dnnlib.UserError:
        outcome.append('refused')
    print(', '.join(outcome))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
'''

def test_padded_files_cost_memory_by_their_pixels(tmp_path):
    # Deflated zeros: each zip is 1-2 MB, each padded PNG 160-320 MiB (PIL keeps unknown chunks
    # whole, so unbounded reading would hold them). zTXt/iCCP inflate to 256 MiB.
    size = 160 * MiB
    cases = {
        'private chunk before the pixels': dict(before=[(b'prIv', size)]),
        'two private chunks after them': dict(after=[(b'prIv', size), (b'prIv', size)]),
        'huge tEXt': dict(before=[(b'tEXt', size)]),
        'zTXt that inflates': dict(before=[(b'zTXt', _inflating(b'Comment\0\0', 256 * MiB))]),
        'iCCP that inflates': dict(before=[(b'iCCP', _inflating(b'icc\0\0', 256 * MiB))]),
    }
    paths = [padded_zip(tmp_path / f'case{i}.zip', **kw) for i, kw in enumerate(cases.values())]
    paths.append(padded_zip(tmp_path / 'trailing.zip', trailing=2 * size))  # Never read: the image ends first.
    paths.append(padded_zip(tmp_path / 'json.zip', json_pad=size))
    assert max(os.path.getsize(p) for p in paths) < 4 * MiB
    result = subprocess.run([sys.executable, '-c', _LOAD_THREE_WAYS, *map(str, paths)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, check=False, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    *outcomes, growth_mb = result.stdout.strip().splitlines()
    assert outcomes == ['refused, refused, wrote 1 skipped 1'] * len(cases) + [
        '(16, 16, 3), 2 items, wrote 2 skipped 0', '(16, 16, 3), refused, refused'], outcomes
    assert int(growth_mb) < 100, f'reading the padded files grew the process by {growth_mb} MB'
    skipped = (tmp_path / 'case1.zip.out.skipped.txt').read_text()
    assert skipped.startswith('000000.png\tmore than ') and 'for 16x16 pixels' in skipped, skipped

#----------------------------------------------------------------------------
# Arrays of .npz files (dataset_tool's ADM source, evaluate's activation files): one reader.

def _member_bytes(shape, extra=b''):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {'descr': '|u1', 'fortran_order': False, 'shape': shape})
    return buf.getvalue() + bytes(int(np.prod(shape))) + extra

def test_npz_member_must_hold_exactly_what_its_header_claims(tmp_path):
    rows = np.arange(24, dtype='>i4').reshape(6, 4)  # Big-endian comes back native.
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / 'ok.npz', x=rows, f=np.asfortranarray(rows), e=np.zeros([0, 3]), s=np.float64(2))
        got = {k: data_files.NpyMember(str(tmp_path / 'ok.npz'), k) for k in data_files.npz_keys(tmp_path / 'ok.npz')}
        assert np.array_equal(got['x'][2:5], rows[2:5]) and got['x'][:].dtype == np.dtype('=i4') and got['x'][-2:].shape == (2, 4)
        assert np.array_equal(got['f'][1:3], rows[1:3]) and got['e'][:].shape == (0, 3) and got['s'][:] == 2
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):  # Longer or shorter than the header says.
        for data in (_member_bytes((4, 3), extra=b'\0'), _member_bytes((4, 3))[:-1]):
            with zipfile.ZipFile(tmp_path / 'bad.npz', 'w', compression=compression) as z:
                z.writestr('x.npy', data)
            with pytest.raises(ValueError, match='truncated or forged'):
                data_files.NpyMember(str(tmp_path / 'bad.npz'), 'x')

def test_npz_member_deflated_beyond_deflate_ratio_is_refused(tmp_path):
    # Zip sizes and .npy header agree, but claim more than deflate can expand the member's
    # compressed bytes to (a zip bomb): refused before anything is decompressed or allocated.
    def forged_npz(claim):
        header = _member_bytes((claim - 128,))[:128]
        assert header.endswith(b'\n') and len(_member_bytes((1,))) == 129  # 128-byte headers either way.
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        stream, crc = deflate.compress(header + bytes(1000)) + deflate.flush(), zlib.crc32(header + bytes(1000))
        local = struct.pack('<4s5H3I2H', b'PK\x03\x04', 20, 0, 8, 0, 0x21, crc, len(stream), claim, 5, 0) + b'x.npy'
        central = struct.pack('<4s6H3I5H2I', b'PK\x01\x02', 20, 20, 0, 8, 0, 0x21, crc, len(stream), claim, 5, 0, 0, 0, 0, 0, 0)
        end = struct.pack('<4s4H2IH', b'PK\x05\x06', 0, 0, 1, 1, len(central) + 5, len(local) + len(stream), 0)
        (tmp_path / 'bomb.npz').write_bytes(local + stream + central + b'x.npy' + end)
        return len(stream)
    compressed = forged_npz(1128)
    assert data_files.NpyMember(str(tmp_path / 'bomb.npz'), 'x').shape == (1000,)  # Within the ratio: read.
    claim = data_files.MAX_DEFLATE_RATIO * (compressed + 16)
    assert claim > data_files.MAX_DEFLATE_RATIO * forged_npz(claim)
    with pytest.raises(ValueError, match='truncated or forged'):
        data_files.NpyMember(str(tmp_path / 'bomb.npz'), 'x')
