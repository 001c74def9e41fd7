"""dataset_tool.py: every source kind and transform against an independent computation with PIL,
labels, output format (read back with training/dataset.py), --workers determinism, bad input."""

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest

import dataset_tool
from conftest import run_cli
from reference_restatement import lanczos, ref_center_crop, ref_center_crop_wide, ref_dhariwal
from training.dataset import ImageFolderDataset

#----------------------------------------------------------------------------
# Helpers.

def make_image(rng, w, h, mode='RGB'):
    """Smooth gradient plus noise, so resampling differences would show."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255 // max(w - 1, 1) + yy * 3) % 256
    chans = {'L': 1, 'LA': 2, 'RGB': 3, 'RGBA': 4}[mode]
    arr = np.stack([(base + 40 * c + rng.integers(0, 30, (h, w))) % 256 for c in range(chans)], axis=-1).astype(np.uint8)
    return PIL.Image.fromarray(arr[:, :, 0] if chans == 1 else arr, mode)

def save(img, path, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt)

def run(*args):
    return run_cli(dataset_tool.main, *args)

def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result

def read_output(dest):
    """{name: bytes} of a folder or zip output."""
    dest = str(dest)
    if dest.endswith('.zip'):
        with zipfile.ZipFile(dest) as z:
            return {n: z.read(n) for n in z.namelist()}
    files = {}
    for root, _dirs, names in os.walk(dest):
        for n in names:
            p = os.path.join(root, n)
            with open(p, 'rb') as f:
                files[os.path.relpath(p, dest).replace(os.sep, '/')] = f.read()
    return files

def images_of(dest):
    files = read_output(dest)
    names = sorted(n for n in files if n.endswith('.png'))
    imgs = [PIL.Image.open(io.BytesIO(files[n])) for n in names]
    return names, imgs, json.loads(files['dataset.json'])

def expected_names(n):
    return [f'{i:08d}'[:5] + f'/img{i:08d}.png' for i in range(n)]

def same(a, b):
    assert a.mode == b.mode and a.size == b.size
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

def leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith('.'))

#----------------------------------------------------------------------------
# Folder source, labels, loading with training/dataset.py.

def test_folder_labels_center_crop_and_loader(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / 'src'
    sizes = {'n02/b.png': (40, 30), 'n02/a.jpg': (30, 40), 'n01/z.png': (33, 33), 'n01/sub/y.png': (25, 20), 'n03/x.bmp': (21, 37)}
    originals = {}
    for rel, (w, h) in sizes.items():
        img = make_image(rng, w, h)
        save(img, str(src / rel))
        originals[rel] = PIL.Image.open(src / rel).convert('RGB')  # JPEG: compare with what it decodes to.
    dest = tmp_path / 'out.zip'
    ok('--source', src, '--dest', dest, '--transform', 'center-crop', '--resolution', '16x16', '--workers', 1)

    names, imgs, meta = images_of(dest)
    order = sorted(sizes)  # n01/sub/y.png, n01/z.png, n02/a.jpg, n02/b.png, n03/x.bmp
    assert names == expected_names(len(order))
    for rel, img in zip(order, imgs):
        same(img, ref_center_crop(originals[rel], 16, 16))
    assert meta['labels'] == [[n, {'n01': 0, 'n02': 1, 'n03': 2}[rel.split('/')[0]]] for n, rel in zip(names, order)]
    assert meta['class_names'] == ['n01', 'n02', 'n03']

    ds = ImageFolderDataset(str(dest), use_labels=True)
    assert len(ds) == 5 and ds.resolution == 16 and ds.num_channels == 3 and ds.label_dim == 3
    image, label = ds[2]
    np.testing.assert_array_equal(image, np.asarray(imgs[2]).transpose(2, 0, 1))
    np.testing.assert_array_equal(label, [0, 1, 0])

def test_labels_stable_under_max_images_and_root_files(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / 'src'
    for rel in ['b/1.png', 'b/2.png', 'c/1.png', 'a/1.png']:
        save(make_image(rng, 8, 8), str(src / rel))
    ok('--source', src, '--dest', tmp_path / 'o1', '--max-images', 2, '--workers', 1)
    _, _, meta = images_of(tmp_path / 'o1')
    assert [l for _, l in meta['labels']] == [0, 1]  # a/1 -> 0, b/1 -> 1: ids from all folders.
    # An image beside the class folders makes the folder labels ambiguous: no labels, and a note.
    save(make_image(rng, 8, 8), str(src / 'loose.png'))
    res = ok('--source', src, '--dest', tmp_path / 'o2', '--workers', 1)
    assert images_of(tmp_path / 'o2')[2] == {'labels': None}
    assert 'Note: 1 images lie beside the class folders, not in one: writing no labels' in res.output

def test_folder_dest_loads_and_single_class_has_no_labels(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / 'src'
    for i in range(3):
        save(make_image(rng, 8, 8), str(src / 'only' / f'{i}.png'))
    dest = tmp_path / 'out'
    dest.mkdir()  # An existing empty folder is fine.
    ok('--source', src, '--dest', dest, '--workers', 1)
    assert sorted(read_output(dest)) == expected_names(3) + ['dataset.json']
    assert json.loads(read_output(dest)['dataset.json']) == {'labels': None}
    ds = ImageFolderDataset(str(dest))
    assert len(ds) == 3 and ds.image_shape == [3, 8, 8] and not ds.has_labels
    assert leftovers(tmp_path) == []

#----------------------------------------------------------------------------
# Transforms vs independent PIL computations.

@pytest.mark.parametrize('transform,res', [
    (None, (16, 16)),
    ('center-crop', (16, 16)),
    ('center-crop-wide', (16, 8)),
    ('center-crop-dhariwal', (16, 16)),
])
def test_transforms_match_reference(tmp_path, transform, res):
    rng = np.random.default_rng(3)
    src = tmp_path / 'src'
    # Odd sizes, both orientations; 200x90 is halved twice by center-crop-dhariwal, 70x45 once.
    sizes = [(70, 45), (45, 70), (200, 90), (33, 32)]
    originals = []
    for i, (w, h) in enumerate(sizes):
        img = make_image(rng, w, h)
        save(img, str(src / f'{i}.png'))
        originals.append(img)
    args = ['--source', src, '--dest', tmp_path / 'out.zip', '--resolution', f'{res[0]}x{res[1]}', '--workers', 1]
    if transform:
        args += ['--transform', transform]
    res_ = ok(*args)
    names, imgs, _ = images_of(tmp_path / 'out.zip')
    if transform == 'center-crop-wide':
        # EDM drops images whose band at the target width is lower than the target: 200x90 -> 16x7.
        originals = [o for o in originals if round(res[0] * o.size[1] / o.size[0]) >= res[1]]
        assert len(originals) == 3
    assert len(imgs) == len(originals)
    for img, orig in zip(imgs, originals):
        if transform is None:
            want = lanczos(orig, res)
        elif transform == 'center-crop':
            want = ref_center_crop(orig, *res)
        elif transform == 'center-crop-wide':
            want = ref_center_crop_wide(orig, *res)
        else:
            want = ref_dhariwal(orig, res[0])
        same(img, want)
    assert 'Upscaled' not in res_.output

def test_dhariwal_function_on_many_sizes():
    # The array-level function against the restatement, over shapes that hit each branch
    # (no halving, one and several halvings, rounding of the BICUBIC target size).
    rng = np.random.default_rng(4)
    for w, h in [(16, 16), (17, 40), (31, 32), (32, 31), (64, 33), (129, 64), (150, 47), (11, 9)]:
        img = make_image(rng, w, h)
        out = dataset_tool.center_crop_dhariwal(np.asarray(img), 16)
        same(PIL.Image.fromarray(out), ref_dhariwal(img, 16))

def test_small_images_policies(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / 'src'
    save(make_image(rng, 20, 20), str(src / 'a.png'))
    save(make_image(rng, 10, 12), str(src / 'b.png'))
    # Default for center-crop-dhariwal: upscale as ADM does, and say so.
    res = ok('--source', src, '--dest', tmp_path / 'up.zip', '--transform', 'center-crop-dhariwal', '--resolution', '16x16', '--workers', 1)
    assert 'Upscaled 1 ' in res.output
    same(images_of(tmp_path / 'up.zip')[1][1], ref_dhariwal(PIL.Image.open(src / 'b.png'), 16))
    # center-crop-wide skips it by default (as EDM), and lists it.
    ok('--source', src, '--dest', tmp_path / 'wide.zip', '--transform', 'center-crop-wide', '--resolution', '16x16', '--workers', 1)
    assert len(images_of(tmp_path / 'wide.zip')[0]) == 1
    assert (tmp_path / 'wide.zip.skipped.txt').read_text().startswith('b.png\tsmaller than the target')
    # --small=error refuses, writing nothing.
    res = run('--source', src, '--dest', tmp_path / 'err.zip', '--transform', 'center-crop', '--resolution', '16x16', '--small', 'error', '--workers', 1)
    assert res.exit_code != 0 and 'b.png is 10x12, smaller than the 16x16 target' in res.output
    assert not (tmp_path / 'err.zip').exists() and leftovers(tmp_path) == []

#----------------------------------------------------------------------------
# Other sources.

def test_zip_source_with_folder_labels(tmp_path):
    rng = np.random.default_rng(6)
    imgs = {'dogs/1.png': make_image(rng, 8, 8), 'cats/2.png': make_image(rng, 8, 8), 'cats/1.png': make_image(rng, 8, 8)}
    src = tmp_path / 'src.zip'
    with zipfile.ZipFile(src, 'w') as z:
        for n, img in imgs.items():
            buf = io.BytesIO()
            img.save(buf, format='png')
            z.writestr(n, buf.getvalue())
        z.writestr('__MACOSX/cats/._1.png', b'junk')  # macOS resource forks are not data.
        z.writestr('notes.txt', b'hello')
    res = ok('--source', src, '--dest', tmp_path / 'out', '--workers', 1)
    names, out, meta = images_of(tmp_path / 'out')
    for img, n in zip(out, ['cats/1.png', 'cats/2.png', 'dogs/1.png']):
        same(img, imgs[n])
    assert [l for _, l in meta['labels']] == [0, 0, 1]
    assert 'ignored 1 zip members' in res.output

def test_zip_source_keeps_its_dataset_json_labels(tmp_path):
    # Re-converting one of our own outputs (e.g. to another resolution) keeps its labels.
    rng = np.random.default_rng(7)
    src = tmp_path / 'src'
    for rel in ['a/0.png', 'b/0.png', 'c/0.png']:
        save(make_image(rng, 16, 16), str(src / rel))
    ok('--source', src, '--dest', tmp_path / 'first.zip', '--workers', 1)
    ok('--source', tmp_path / 'first.zip', '--dest', tmp_path / 'second.zip', '--resolution', '8x8', '--workers', 1)
    names, imgs, meta = images_of(tmp_path / 'second.zip')
    assert [l for _, l in meta['labels']] == [0, 1, 2] and imgs[0].size == (8, 8)
    assert meta['class_names'] == ['a', 'b', 'c']

def write_cifar(path, batches):
    with tarfile.open(path, 'w:gz') as tar:
        for i, (data, labels) in enumerate(batches, 1):
            payload = pickle.dumps({'data': data, 'labels': labels, 'batch_label': f'batch {i}'}, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{i}')
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

def test_cifar10_tarball(tmp_path):
    rng = np.random.default_rng(8)
    batches = [(rng.integers(0, 256, (2, 3072), dtype=np.uint8), [int(x) for x in rng.integers(0, 10, 2)]) for _ in range(5)]
    src = tmp_path / 'cifar-10-python.tar.gz'
    write_cifar(src, batches)
    ok('--source', src, '--dest', tmp_path / 'out.zip', '--workers', 1)
    names, imgs, meta = images_of(tmp_path / 'out.zip')
    want = np.concatenate([d for d, _ in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert len(imgs) == 10
    for img, w in zip(imgs, want):
        assert img.mode == 'RGB'
        np.testing.assert_array_equal(np.asarray(img), w)
    assert [l for _, l in meta['labels']] == sum((l for _, l in batches), [])

def test_cifar10_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned > ' + str(tmp_path / 'pwned'),))
    src = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(src, 'w:gz') as tar:
        payload = pickle.dumps({'data': Evil(), 'labels': []}, protocol=2)
        info = tarfile.TarInfo('cifar-10-batches-py/data_batch_1')
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    res = run('--source', src, '--dest', tmp_path / 'out.zip', '--workers', 1)
    assert res.exit_code != 0 and 'cannot read CIFAR-10 tarball' in res.output
    assert not (tmp_path / 'pwned').exists() and not (tmp_path / 'out.zip').exists()

def test_mnist_gz(tmp_path):
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    labels = np.array([7, 0, 3], dtype=np.uint8)
    with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>IIII', 0x803, 3, 28, 28) + images.tobytes())
    with gzip.open(tmp_path / 'train-labels-idx1-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>II', 0x801, 3) + labels.tobytes())
    ok('--source', tmp_path / 'train-images-idx3-ubyte.gz', '--dest', tmp_path / 'out.zip', '--workers', 1)
    names, imgs, meta = images_of(tmp_path / 'out.zip')
    for img, want in zip(imgs, images):
        assert img.mode == 'L' and img.size == (32, 32)  # Grayscale stays grayscale; padded as EDM.
        np.testing.assert_array_equal(np.asarray(img), np.pad(want, 2))
    assert [l for _, l in meta['labels']] == [7, 0, 3]
    ds = ImageFolderDataset(str(tmp_path / 'out.zip'), use_labels=True)
    assert ds.image_shape == [1, 32, 32] and ds.label_dim == 8

@pytest.mark.parametrize('compressed', [False, True])
def test_adm_npz(tmp_path, compressed):
    rng = np.random.default_rng(10)
    arr = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    labels = np.array([5, 1, 0, 999], dtype=np.int64)
    (np.savez_compressed if compressed else np.savez)(tmp_path / 'samples.npz', arr, labels)
    ok('--source', tmp_path / 'samples.npz', '--dest', tmp_path / 'out.zip', '--workers', 2 if compressed else 1)
    names, imgs, meta = images_of(tmp_path / 'out.zip')
    for img, want in zip(imgs, arr):
        np.testing.assert_array_equal(np.asarray(img), want)
    assert [l for _, l in meta['labels']] == [5, 1, 0, 999]

def test_adm_npz_gray_no_labels_and_bad_array(tmp_path):
    rng = np.random.default_rng(11)
    gray = rng.integers(0, 256, (2, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / 'gray.npz', gray)
    ok('--source', tmp_path / 'gray.npz', '--dest', tmp_path / 'g.zip', '--transform', 'center-crop', '--resolution', '4x4', '--workers', 1)
    names, imgs, meta = images_of(tmp_path / 'g.zip')
    assert meta == {'labels': None}
    same(imgs[1], ref_center_crop(PIL.Image.fromarray(gray[1]), 4, 4))
    np.savez(tmp_path / 'float.npz', gray.astype(np.float32))
    res = run('--source', tmp_path / 'float.npz', '--dest', tmp_path / 'f.zip')
    assert res.exit_code != 0 and 'arr_0 must be uint8 images' in res.output

#----------------------------------------------------------------------------
# Channel handling.

def test_mixed_modes_become_rgb(tmp_path):
    rng = np.random.default_rng(12)
    src = tmp_path / 'src'
    pal = make_image(rng, 8, 8).convert('P')
    inputs = {'0.png': make_image(rng, 8, 8, 'L'), '1.png': make_image(rng, 8, 8, 'RGBA'), '2.png': pal,
              '3.png': make_image(rng, 8, 8, 'RGB'), '4.png': make_image(rng, 8, 8, 'LA')}
    for n, img in inputs.items():
        save(img, str(src / n))
    res = ok('--source', src, '--dest', tmp_path / 'out.zip', '--workers', 1)
    _, imgs, _ = images_of(tmp_path / 'out.zip')
    for img, n in zip(imgs, sorted(inputs)):
        same(img, PIL.Image.open(src / n).convert('RGB'))
    assert 'Converted to RGB' in res.output and '1 RGBA' in res.output

def test_all_gray_stays_gray(tmp_path):
    rng = np.random.default_rng(13)
    src = tmp_path / 'src'
    save(make_image(rng, 8, 8, 'L'), str(src / '0.png'))
    save(make_image(rng, 8, 8, 'LA'), str(src / '1.png'))
    deep = (rng.integers(0, 65536, (8, 8))).astype(np.uint16)
    PIL.Image.fromarray(deep).save(src / '2.png')  # 16-bit grayscale PNG.
    ok('--source', src, '--dest', tmp_path / 'out.zip', '--workers', 1)
    _, imgs, _ = images_of(tmp_path / 'out.zip')
    assert [i.mode for i in imgs] == ['L', 'L', 'L']
    same(imgs[1], PIL.Image.open(src / '1.png').convert('L'))
    np.testing.assert_array_equal(np.asarray(imgs[2]), (deep >> 8).astype(np.uint8))

#----------------------------------------------------------------------------
# Determinism across --workers.

def test_workers_give_identical_output(tmp_path):
    rng = np.random.default_rng(14)
    src = tmp_path / 'src'
    for i in range(20):
        save(make_image(rng, int(rng.integers(20, 40)), int(rng.integers(20, 40))), str(src / f'c{i % 3}' / f'{i}.jpg'))
    (src / 'c0' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    common = ['--source', src, '--transform', 'center-crop-dhariwal', '--resolution', '16x16']
    ok(*common, '--dest', tmp_path / 'w1.zip', '--workers', 1)
    ok(*common, '--dest', tmp_path / 'w2.zip', '--workers', 2)
    assert (tmp_path / 'w1.zip').read_bytes() == (tmp_path / 'w2.zip').read_bytes()
    assert (tmp_path / 'w1.zip.skipped.txt').read_text() == (tmp_path / 'w2.zip.skipped.txt').read_text()
    ok(*common, '--dest', tmp_path / 'd1', '--workers', 1, '--max-images', 7)
    ok(*common, '--dest', tmp_path / 'd2', '--workers', 2, '--max-images', 7)
    h1 = {n: hashlib.sha256(b).hexdigest() for n, b in read_output(tmp_path / 'd1').items()}
    h2 = {n: hashlib.sha256(b).hexdigest() for n, b in read_output(tmp_path / 'd2').items()}
    assert h1 == h2 and len(h1) == 8  # 7 images + dataset.json
    assert leftovers(tmp_path) == []

#----------------------------------------------------------------------------
# Corrupt inputs.

def make_corrupt_folder(tmp_path):
    rng = np.random.default_rng(15)
    src = tmp_path / 'src'
    for i in range(4):
        save(make_image(rng, 8, 8), str(src / f'{i}.png'))
    good = (src / '0.png').read_bytes()
    (src / '0t.png').write_bytes(good[:len(good) // 2])   # Truncated PNG.
    (src / '1t.jpg').write_bytes(b'this is not a jpeg')    # Text with an image name.
    (src / '2t.png').write_bytes(b'')                      # Empty file.
    (src / 'readme.md').write_text('not an image')         # Ignored: not an image name.
    return src

def test_corrupt_files_are_skipped_and_listed(tmp_path):
    src = make_corrupt_folder(tmp_path)
    res = ok('--source', src, '--dest', tmp_path / 'out.zip', '--workers', 1, '--max-images', 4)
    names, imgs, _ = images_of(tmp_path / 'out.zip')
    assert names == expected_names(4)  # No gaps in the names; --max-images counts written images.
    for img, n in zip(imgs, ['0.png', '1.png', '2.png', '3.png']):
        same(img, PIL.Image.open(src / n).convert('RGB'))
    listed = (tmp_path / 'out.zip.skipped.txt').read_text().splitlines()
    assert [l.split('\t')[0] for l in listed] == ['0t.png', '1t.jpg', '2t.png']
    assert 'Skipped 3 files' in res.output and 'ignored 1 files' in res.output

def test_strict_refuses_corrupt_files(tmp_path):
    src = make_corrupt_folder(tmp_path)
    res = run('--source', src, '--dest', tmp_path / 'out.zip', '--workers', 2, '--strict')
    assert res.exit_code == 1 and 'cannot read 0t.png' in res.output and 'Traceback' not in res.output
    assert not (tmp_path / 'out.zip').exists() and not (tmp_path / 'out.zip.skipped.txt').exists()
    assert leftovers(tmp_path) == []

#----------------------------------------------------------------------------
# Bad input: one clear line, non-zero exit, nothing written or damaged.

def test_bad_input_errors(tmp_path):
    rng = np.random.default_rng(16)
    src = tmp_path / 'src'
    save(make_image(rng, 8, 8), str(src / 'a.png'))
    save(make_image(rng, 12, 8), str(src / 'b.png'))
    full = tmp_path / 'full'
    full.mkdir()
    (full / 'keep.txt').write_text('mine')
    existing = tmp_path / 'existing.zip'
    existing.write_bytes(b'precious')
    (tmp_path / 'badmeta').mkdir()
    save(make_image(rng, 8, 8), str(tmp_path / 'badmeta' / 'a.png'))
    (tmp_path / 'badmeta' / 'dataset.json').write_text('{"labels": [1, 2')
    junk = tmp_path / 'junk.bin'
    junk.write_bytes(b'x')
    cases = [
        (['--source', tmp_path / 'nope', '--dest', tmp_path / 'o.zip'], 'no such file or folder'),
        (['--source', junk, '--dest', tmp_path / 'o.zip'], 'unknown kind'),
        (['--source', src, '--dest', full], 'already exists and is not empty'),
        (['--source', src, '--dest', existing], 'already exists'),
        (['--source', src, '--dest', tmp_path / 'o.zip', '--transform', 'center-crop'], 'needs --resolution'),
        (['--source', src, '--dest', tmp_path / 'o.zip', '--resolution', '16x8'], 'must be square'),
        (['--source', src, '--dest', tmp_path / 'o.zip', '--resolution', '24x24'], 'power of two'),
        (['--source', src, '--dest', tmp_path / 'o.zip', '--resolution', 'big'], 'expected WxH'),
        (['--source', src, '--dest', tmp_path / 'o.zip'], 'images differ in size: b.png comes out 12x8'),
        (['--source', tmp_path / 'full', '--dest', tmp_path / 'o.zip'], 'no images found'),
        (['--source', tmp_path / 'badmeta', '--dest', tmp_path / 'o.zip'], 'expected {"labels"'),
    ]
    for args, message in cases:
        res = run(*args, '--workers', 1)
        assert res.exit_code != 0, (args, res.output)
        assert message in res.output, (args, res.output)
        assert 'Traceback' not in res.output and isinstance(res.exception, SystemExit)
        assert not (tmp_path / 'o.zip').exists() and leftovers(tmp_path) == []
    assert (full / 'keep.txt').read_text() == 'mine' and existing.read_bytes() == b'precious'

def test_nothing_readable_is_an_error(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    (src / 'a.png').write_bytes(b'nope')
    res = run('--source', src, '--dest', tmp_path / 'out', '--workers', 1)
    assert res.exit_code != 0 and 'no image of' in res.output and 'a.png' in res.output
    assert not (tmp_path / 'out').exists() and leftovers(tmp_path) == []

def test_publish_never_clobbers(tmp_path):
    # A dest that appears while converting is left alone; the finished output stays in the temp file.
    for dest in [tmp_path / 'race.zip', tmp_path / 'race']:
        out = dataset_tool.Destination(str(dest))
        with pytest.raises(FileExistsError):
            with out.opened():
                out.write('00000/img00000000.png', b'x')
                if str(dest).endswith('.zip'):
                    dest.write_bytes(b'theirs')
                else:
                    dest.mkdir()
                    (dest / 'theirs.txt').write_text('theirs')
        assert (dest.read_bytes() if dest.is_file() else (dest / 'theirs.txt').read_bytes()) == b'theirs'
        assert leftovers(tmp_path) == []

def test_help_documents_every_option():
    res = run('--help')
    assert res.exit_code == 0
    for opt in ['--source', '--dest', '--max-images', '--transform', '--resolution', '--workers', '--strict', '--small', '--compress-level']:
        assert opt in res.output

#----------------------------------------------------------------------------
# Options and --dest checked before any work; stale temporaries; hostile sources.

def test_option_bounds_and_unwritable_dest_fail_before_work(tmp_path):
    rng = np.random.default_rng(17)
    src = tmp_path / 'src'
    save(make_image(rng, 8, 8), str(src / 'a.png'))
    afile = tmp_path / 'afile'
    afile.write_text('x')
    (tmp_path / 'dir.zip').mkdir()
    cases = [
        (['--dest', tmp_path / 'o.zip', '--resolution', '65536x65536'], 'larger than 8192 per side'),
        (['--dest', tmp_path / 'o.zip', '--resolution', '9' * 5000 + 'x8'], 'larger than 8192 per side'),
        (['--dest', tmp_path / 'o.zip', '--resolution', '0x0'], 'positive integers'),
        (['--dest', tmp_path / 'o.zip', '--resolution', '-8x-8'], 'positive integers'),
        (['--dest', tmp_path / 'o.zip', '--workers', '0'], 'x>=1'),
        (['--dest', tmp_path / 'o.zip', '--compress-level', 'nan'], 'not a valid integer'),
        (['--dest', afile / 'o.zip'], 'cannot write --dest'),
        (['--dest', '/proc/dataset-tool-test.zip'], 'cannot write --dest'),
        (['--dest', tmp_path / 'dir.zip'], 'already exists and is not empty'),
    ]
    for args, message in cases:
        res = run('--source', src, *args, *([] if '--workers' in args else ['--workers', 1]))
        assert res.exit_code != 0 and message in res.output, (args, res.output)
        assert 'Traceback' not in res.output and 'Converting' not in res.output, res.output  # Before any work.
        assert not (tmp_path / 'o.zip').exists() and leftovers(tmp_path) == [] and afile.read_text() == 'x'

def test_stale_temporaries_of_killed_runs_are_removed(tmp_path):
    import subprocess
    import sys
    import dnnlib.util
    rng = np.random.default_rng(18)
    src = tmp_path / 'src'
    save(make_image(rng, 8, 8), str(src / 'a.png'))
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    host = dnnlib.util.host_tag()
    stale_zip = tmp_path / f'.out.zip.{host}-{dead.pid}.00c0ffee.tmp'
    stale_zip.write_bytes(b'x' * 4096)
    stale_dir = tmp_path / f'.out.{host}-{dead.pid}.00c0ffee.tmp'
    (stale_dir / '00000').mkdir(parents=True)
    (stale_dir / '00000' / 'img00000000.png').write_bytes(b'x')
    live = tmp_path / f'.out.zip.{host}-{os.getppid()}.00c0ffee.tmp'  # A concurrent writer's: kept.
    live.write_bytes(b'y')
    theirs = tmp_path / '.out.zip.notes.tmp'
    theirs.write_bytes(b'z')
    ok('--source', src, '--dest', tmp_path / 'out.zip', '--workers', 1)
    ok('--source', src, '--dest', tmp_path / 'out', '--workers', 1)
    assert not stale_zip.exists() and not stale_dir.exists()
    assert live.read_bytes() == b'y' and theirs.read_bytes() == b'z'

def test_hostile_sources(tmp_path):
    rng = np.random.default_rng(19)
    png = io.BytesIO()
    make_image(rng, 8, 8).save(png, format='png')
    # Zip member names that would escape a folder are never used as paths; hidden '..' is skipped.
    with zipfile.ZipFile(tmp_path / 'evil.zip', 'w') as z:
        z.writestr('../x.png', png.getvalue())
        z.writestr('ok.png', png.getvalue())
    ok('--source', tmp_path / 'evil.zip', '--dest', tmp_path / 'o1', '--workers', 1)
    assert not (tmp_path / 'x.png').exists() and len(images_of(tmp_path / 'o1')[0]) == 1
    # A truncated zip.
    data = (tmp_path / 'evil.zip').read_bytes()
    (tmp_path / 'cut.zip').write_bytes(data[:len(data) // 2])
    # An .npz whose header claims 10^9 images.
    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {'descr': '|u1', 'fortran_order': False, 'shape': (10 ** 9, 8, 8, 3)})
    with zipfile.ZipFile(tmp_path / 'big.npz', 'w') as z:
        z.writestr('arr_0.npy', hdr.getvalue() + b'\0' * 384)
    # An MNIST file whose header claims 8 * 10^9 bytes.
    with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>IIII', 0x803, 2000, 2000, 2000) + b'\0' * 1000)
    # A symlink loop and a symlink to a device with an image name, beside a real image.
    (tmp_path / 'links').mkdir()
    save(make_image(rng, 8, 8), str(tmp_path / 'links' / 'a.png'))
    os.symlink(tmp_path / 'links', tmp_path / 'links' / 'loop')
    os.symlink('/dev/zero', tmp_path / 'links' / 'zero.png')
    # A file name with a newline: one line in the skip list.
    (tmp_path / 'nl').mkdir()
    save(make_image(rng, 8, 8), str(tmp_path / 'nl' / 'été.png'))
    (tmp_path / 'nl' / 'bad\nname.png').write_bytes(b'not an image')
    cases = [('cut.zip', 'cannot read zip file'), ('big.npz', 'claims shape [1000000000, 8, 8, 3]'),
             ('train-images-idx3-ubyte.gz', 'more than an MNIST-format file holds')]
    for name, message in cases:
        res = run('--source', tmp_path / name, '--dest', tmp_path / 'o.zip', '--workers', 1)
        assert res.exit_code == 1 and message in res.output and 'Traceback' not in res.output, (name, res.output)
    ok('--source', tmp_path / 'links', '--dest', tmp_path / 'o2', '--workers', 1)
    assert len(images_of(tmp_path / 'o2')[0]) == 1
    ok('--source', tmp_path / 'nl', '--dest', tmp_path / 'o3', '--workers', 1)
    assert (tmp_path / 'o3.skipped.txt').read_text(encoding='utf-8').splitlines()[0].startswith('bad\\nname.png\t')
    assert not (tmp_path / 'o.zip').exists() and leftovers(tmp_path) == []

#----------------------------------------------------------------------------
# Issue 21 families: what the user has survives; workers are light and capped; one Error line.

def test_temporaries_not_provably_ours_survive(tmp_path):
    import subprocess
    import sys
    import dnnlib.util
    rng = np.random.default_rng(20)
    src = tmp_path / 'src'
    save(make_image(rng, 8, 8), str(src / 'a.png'))
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    host = dnnlib.util.host_tag()
    backup = tmp_path / '.target.zip.backup01.tmp'  # A folder of the user's, old, 8 characters in the middle.
    (backup / 'sub').mkdir(parents=True)
    (backup / 'sub' / 'precious.png').write_bytes(b'mine')
    theirs = [backup / 'sub' / 'precious.png']
    for name in ['.target.zip.original.tmp', f'.target.zip.otherhost-{dead.pid}.00c0ffee.tmp',
                 f'.target.zip.{host}-{dead.pid}.00C0FFEE.tmp', f'.target.zip.{host}-{dead.pid}.00c0ffee.tmp.keep',
                 f'.target.zip.{host}-{os.getppid()}.00c0ffee.tmp', f'.target.{host}-{dead.pid}.0000ffff.tmpx',
                 f'.target.{host}-{dead.pid}-x.00c0ffee.tmp', 'target.zip.tmp', '.target.tmp']:
        (tmp_path / name).write_bytes(name.encode())
        theirs.append(tmp_path / name)
    before = {p: p.read_bytes() for p in theirs}
    ok('--source', src, '--dest', tmp_path / 'target.zip', '--workers', 1)
    ok('--source', src, '--dest', tmp_path / 'target', '--workers', 1)
    assert {p: p.read_bytes() for p in theirs} == before
    assert len(images_of(tmp_path / 'target.zip')[0]) == 1 and len(images_of(tmp_path / 'target')[0]) == 1

_WORKER_MODULES = '''
import multiprocessing, sys
import dataset_tool
import dnnlib
settings = dnnlib.EasyDict(kind='folder', path=sys.argv[1], mode='RGB', transform=None, resolution=None,
                           small='upscale', strict=False, compress_level=0)
with multiprocessing.get_context('spawn').Pool(1, initializer=dataset_tool.init_worker, initargs=(settings,)) as pool:
    print(pool.apply(dataset_tool.process_item, (('a.png', 'a.png'),))[0])
    print(' '.join(pool.apply(eval, ('sorted(__import__("sys").modules)',))))
'''

def test_worker_processes_import_no_torch(tmp_path):
    import subprocess
    import sys
    save(make_image(np.random.default_rng(21), 8, 8), str(tmp_path / 'a.png'))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, '-c', _WORKER_MODULES, str(tmp_path)], cwd=repo, capture_output=True,
                            text=True, timeout=120, check=False, env=dict(os.environ, PYTHONPATH=repo))
    assert result.returncode == 0, result.stderr[-2000:]
    status, modules = result.stdout.strip().splitlines()
    modules = set(modules.split())
    assert status == 'ok' and 'training.data_files' in modules  # It did the work...
    assert not {m for m in modules if m.split('.')[0] in ('torch', 'scipy', 'torchvision')}  # ...without torch.

def test_workers_are_capped_by_the_cpus(tmp_path, monkeypatch):
    rng = np.random.default_rng(22)
    src = tmp_path / 'src'
    for i in range(6):
        save(make_image(rng, 8, 8), str(src / f'{i}.png'))
    started = []
    real = dataset_tool.results_of
    monkeypatch.setattr(dataset_tool, 'results_of', lambda settings, workers: (started.append(workers), real(settings, workers))[1])
    monkeypatch.setattr(dataset_tool, 'usable_cpus', lambda: 2)
    res = ok('--source', src, '--dest', tmp_path / 'many.zip', '--workers', 64)
    assert started == [2] and '--workers=64 capped to the 2 CPUs' in res.output
    ok('--source', src, '--dest', tmp_path / 'one.zip', '--workers', 1)
    assert (tmp_path / 'many.zip').read_bytes() == (tmp_path / 'one.zip').read_bytes()
    assert 'one per CPU' in run('--help').output

def _one_error_line(output):
    errors = [line for line in output.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and 'Traceback' not in output, output
    return errors[0]

@pytest.mark.parametrize('dest', ['out.zip', 'out'])
def test_disk_full_is_one_error_line_and_leaves_nothing(tmp_path, monkeypatch, dest):
    import errno
    rng = np.random.default_rng(23)
    src = tmp_path / 'src'
    for i in range(5):
        save(make_image(rng, 8, 8), str(src / f'{i}.png'))
    real, calls = dataset_tool.Destination.write, []
    def write(self, name, data):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, name, data)
    monkeypatch.setattr(dataset_tool.Destination, 'write', write)
    res = run('--source', src, '--dest', tmp_path / dest, '--workers', 1)
    assert res.exit_code == 1 and 'No space left on device' in _one_error_line(res.output)
    assert not (tmp_path / dest).exists() and leftovers(tmp_path) == []

def test_file_size_limit_mid_zip_is_one_error_line(tmp_path):
    # A real failing write (RLIMIT_FSIZE: EFBIG, as ENOSPC would come from the kernel): the
    # temporary zip is removed, nothing is published.
    import subprocess
    import sys
    rng = np.random.default_rng(24)
    src = tmp_path / 'src'
    for i in range(20):
        save(make_image(rng, 64, 64), str(src / f'{i}.png'))
    code = ('import resource, signal, sys\n'
            'signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n'
            'resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))\n'
            'import dataset_tool\n'
            'dataset_tool.main(sys.argv[1:])\n')
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, '-c', code, '--source', str(src), '--dest', str(tmp_path / 'out.zip'),
                             '--workers', '1'], cwd=repo, capture_output=True, text=True, timeout=120, check=False,
                            env=dict(os.environ, PYTHONPATH=repo))
    assert result.returncode == 1 and 'cannot write --dest' in _one_error_line(result.stderr)
    assert not (tmp_path / 'out.zip').exists() and leftovers(tmp_path) == []

def _cifar_payload(batch):
    return pickle.dumps(batch, protocol=2)

class _Call:
    """Pickles as a call of `fn` with `args` (a crafted pickle without writing opcodes by hand)."""
    def __init__(self, fn, args):
        self.fn, self.args = fn, args
    def __reduce__(self):
        return self.fn, self.args

GOOD_DATA = np.zeros((2, 3072), np.uint8)
BAD_CIFAR = {
    'not a dict': [GOOD_DATA, [0, 1]],
    'no data': {'labels': [0, 1]},
    'no labels': {'data': GOOD_DATA},
    'data of wrong shape': {'data': np.zeros((2, 100), np.uint8), 'labels': [0, 1]},
    'data of wrong type': {'data': np.zeros((2, 3072), np.float64), 'labels': [0, 1]},
    'data a list': {'data': [[0] * 3072] * 2, 'labels': [0, 1]},
    'too few labels': {'data': GOOD_DATA, 'labels': [0]},
    'labels not a list': {'data': GOOD_DATA, 'labels': 5},
    'string labels': {'data': GOOD_DATA, 'labels': ['cat', 'dog']},
    'float labels': {'data': GOOD_DATA, 'labels': [0.5, 1.0]},
    'negative label': {'data': GOOD_DATA, 'labels': [0, -1]},
    'huge label': {'data': GOOD_DATA, 'labels': [0, 10 ** 30]},
    'array shape bomb': {'data': _Call(np.zeros(1).__reduce__()[0], (np.ndarray, (10 ** 10,), b'b')), 'labels': [0, 1]},
    'memo bomb': b'\x80\x02N' + b'r\xff\xff\xff\x7f' + b'.',
}

@pytest.mark.parametrize('case', sorted(BAD_CIFAR) + ['missing batch', 'batch is a folder', 'oversized batch',
                                                      'truncated', 'not a tar', 'corrupt deflate'])
def test_malformed_cifar10_is_one_error_line(tmp_path, case):
    src = tmp_path / 'cifar-10-python.tar.gz'
    good = _cifar_payload({'data': GOOD_DATA, 'labels': [0, 1]})
    payloads = {i: good for i in range(1, 6)}
    if case in BAD_CIFAR:
        bad = BAD_CIFAR[case]
        payloads[3] = bad if isinstance(bad, bytes) else _cifar_payload(bad)
    elif case == 'missing batch':
        del payloads[5]
    elif case == 'oversized batch':
        payloads[2] = good + bytes(33 << 20)
    with tarfile.open(src, 'w:gz') as tar:
        for i, payload in payloads.items():
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{i}')
            if case == 'batch is a folder' and i == 4:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    data = src.read_bytes()
    if case == 'truncated':
        src.write_bytes(data[:len(data) // 2])
    elif case == 'not a tar':
        src.write_bytes(gzip.compress(b'hello, not a tar'))
    elif case == 'corrupt deflate':
        src.write_bytes(data[:40] + bytes(b ^ 0x5a for b in data[40:80]) + data[80:])
    res = run('--source', src, '--dest', tmp_path / 'out.zip', '--workers', 1)
    line = _one_error_line(res.output)
    assert res.exit_code == 1 and ('CIFAR-10' in line or 'labels' in line), line
    assert not (tmp_path / 'out.zip').exists() and leftovers(tmp_path) == []

def _npz_member(z, name, header, data):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    z.writestr(name, buf.getvalue() + data)

@pytest.mark.parametrize('case', ['object images', 'object labels', 'labels per pixel', 'negative labels', 'huge labels',
                                  'float labels', 'labels claim a billion', 'fortran order', 'scalar', 'scalar labels too', 'no arr_0',
                                  'truncated', 'stored member shorter than its header', 'format version 3'])
def test_hostile_npz_is_one_error_line(tmp_path, case):
    images = np.zeros((3, 8, 8, 3), np.uint8)
    path = tmp_path / 'samples.npz'
    arrays = {'arr_0': images, 'arr_1': np.array([0, 1, 2])}
    if case == 'object images':
        arrays['arr_0'] = np.array([None, 1, 'x'], dtype=object)
    elif case == 'object labels':
        arrays['arr_1'] = np.array([None, 1, 'x'], dtype=object)
    elif case == 'labels per pixel':
        arrays['arr_1'] = np.zeros((3, 8), np.int64)
    elif case == 'negative labels':
        arrays['arr_1'] = np.array([0, -5, 1])
    elif case == 'huge labels':
        arrays['arr_1'] = np.array([0, 2 ** 40, 1])
    elif case == 'float labels':
        arrays['arr_1'] = np.array([0.5, 1.0, 2.0])
    elif case == 'fortran order':
        arrays['arr_0'] = np.asfortranarray(images)
    elif case == 'scalar':
        arrays['arr_0'] = np.uint8(7)
    elif case == 'scalar labels too':  # Was an IndexError traceback: the labels were checked against a 0-d count.
        arrays = {'arr_0': np.uint8(7), 'arr_1': np.int64(1)}
    elif case == 'no arr_0':
        arrays = {'images': images}
    np.savez(path, allow_pickle=True, **arrays) if 'object' in case else np.savez_compressed(path, **arrays)
    if case == 'labels claim a billion':
        with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr('arr_0.npy', (lambda b: (np.save(b, images), b.getvalue())[1])(io.BytesIO()))
            _npz_member(z, 'arr_1.npy', {'descr': '<i8', 'fortran_order': False, 'shape': (10 ** 9,)}, bytes(1000))
    elif case == 'stored member shorter than its header':
        with zipfile.ZipFile(path, 'w') as z:
            _npz_member(z, 'arr_0.npy', {'descr': '|u1', 'fortran_order': False, 'shape': (3, 8, 8, 3)}, bytes(500))
    elif case == 'format version 3':
        with zipfile.ZipFile(path, 'w') as z:
            z.writestr('arr_0.npy', b'\x93NUMPY\x03\x00' + bytes(100))
    elif case == 'truncated':
        path.write_bytes(path.read_bytes()[:300])
    res = run('--source', path, '--dest', tmp_path / 'out.zip', '--workers', 1)
    assert res.exit_code == 1 and 'samples.npz' in _one_error_line(res.output)
    assert not (tmp_path / 'out.zip').exists() and leftovers(tmp_path) == []

def test_mnist_damaged_gzip_is_one_error_line(tmp_path):
    images = np.zeros((3, 28, 28), np.uint8)
    path = tmp_path / 'train-images-idx3-ubyte.gz'
    data = gzip.compress(struct.pack('>IIII', 0x803, 3, 28, 28) + np.random.default_rng(25).bytes(images.size))
    for damaged in [data[:len(data) // 2], data[:30] + bytes(b ^ 0x5a for b in data[30:90]) + data[90:]]:
        path.write_bytes(damaged)
        res = run('--source', path, '--dest', tmp_path / 'out.zip', '--workers', 1)
        assert res.exit_code == 1 and 'MNIST' in _one_error_line(res.output)
    with gzip.open(tmp_path / 'train-labels-idx1-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>II', 0x801, 2) + bytes(2))  # Two labels for three images.
    path.write_bytes(data)
    res = run('--source', path, '--dest', tmp_path / 'out.zip', '--workers', 1)
    assert res.exit_code == 1 and 'expected 3 labels' in _one_error_line(res.output)
    assert not (tmp_path / 'out.zip').exists() and leftovers(tmp_path) == []

def test_fifo_and_device_names_neither_hang_nor_count(tmp_path):
    # A FIFO named like an image would block a reader forever; a device is endless.
    import subprocess
    import sys
    rng = np.random.default_rng(26)
    src = tmp_path / 'src'
    for i in range(2):
        save(make_image(rng, 8, 8), str(src / f'{i}.png'))
    os.mkfifo(src / 'pipe.png')
    os.symlink('/dev/zero', src / 'zero.png')
    ok('--source', src, '--dest', tmp_path / 'out.zip', '--workers', 1)
    assert len(images_of(tmp_path / 'out.zip')[0]) == 2
    # Training's reader lists files the same way: the FIFO and the device are not images.
    code = 'import sys\nfrom training.dataset import ImageFolderDataset\nprint(len(ImageFolderDataset(sys.argv[1])))\n'
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, '-c', code, str(src)], cwd=repo, capture_output=True, text=True,
                            timeout=60, check=False, env=dict(os.environ, PYTHONPATH=repo))
    assert result.returncode == 0 and result.stdout.strip() == '2', (result.stdout, result.stderr[-2000:])

def test_folder_dest_inside_the_source_is_refused(tmp_path):
    # The next conversion of the source would take the dataset for input images.
    rng = np.random.default_rng(27)
    src = tmp_path / 'src'
    for i in range(2):
        save(make_image(rng, 8, 8), str(src / f'{i}.png'))
    for dest in (src / 'out', src / 'sub' / 'out'):
        line = _one_error_line(run('--source', src, '--dest', dest, '--workers', 1).output)
        assert 'is inside --source' in line and not dest.exists()
    ok('--source', src, '--dest', src / 'out.zip', '--workers', 1)  # A zip there is no image: harmless.
    assert sorted(os.listdir(src)) == ['0.png', '1.png', 'out.zip']

def test_symlink_loops_in_the_source_are_skipped(tmp_path):
    rng = np.random.default_rng(28)
    src = tmp_path / 'src'
    for i in range(2):
        save(make_image(rng, 8, 8), str(src / f'{i}.png'))
    os.symlink(src / 'a.png', src / 'b.png')
    os.symlink(src / 'b.png', src / 'a.png')
    ok('--source', src, '--dest', tmp_path / 'out.zip', '--workers', 1)
    assert len(images_of(tmp_path / 'out.zip')[0]) == 2
    assert len(ImageFolderDataset(str(src))) == 2
