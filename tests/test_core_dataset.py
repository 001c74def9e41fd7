"""training.dataset.ImageFolderDataset: folders, zips, labels, xflip, max_size, errors."""

import json
import os

import numpy as np
import PIL.Image
import pytest

import dnnlib
from conftest import write_images, zip_folder
from reference_restatement import ref_max_size_subset
from training.dataset import DatasetError, ImageFolderDataset


def _images(n, size=8, channels=3, seed=0):
    rng = np.random.RandomState(seed)
    shape = [n, size, size, channels] if channels > 1 else [n, size, size]
    return rng.randint(0, 256, size=shape, dtype=np.uint8)


def test_folder_and_zip_read_same_pixels_and_labels(tmp_path):
    images = _images(10)
    labels = [i % 3 for i in range(10)]
    folder = tmp_path / 'mydata'
    write_images(folder, images, labels)
    zip_folder(folder, tmp_path / 'mydata.zip')

    for path in [folder, tmp_path / 'mydata.zip']:
        ds = ImageFolderDataset(str(path), use_labels=True)
        assert len(ds) == 10
        assert ds.name == 'mydata'
        assert ds.resolution == 8 and ds.num_channels == 3 and ds.image_shape == [3, 8, 8]
        assert ds.has_labels and ds.label_dim == 3
        for idx in range(10):
            img, lab = ds[idx]
            assert img.dtype == np.uint8 and img.shape == (3, 8, 8)
            np.testing.assert_array_equal(img, images[idx].transpose(2, 0, 1))
            expected = np.zeros(3, np.float32)
            expected[labels[idx]] = 1
            np.testing.assert_array_equal(lab, expected)


def test_float_labels_grayscale_and_no_labels(tmp_path):
    images = _images(4, channels=1)
    labels = [[0.5, -1.0], [1.0, 2.0], [0.0, 0.0], [3.0, 4.5]]
    write_images(tmp_path / 'g', images, labels)
    ds = ImageFolderDataset(str(tmp_path / 'g'), use_labels=True)
    assert ds.num_channels == 1 and ds.label_dim == 2
    np.testing.assert_array_equal(ds[3][1], np.float32([3.0, 4.5]))
    np.testing.assert_array_equal(ds[1][0][0], images[1])
    # Without use_labels the label is an empty vector.
    ds = ImageFolderDataset(str(tmp_path / 'g'), use_labels=False)
    assert not ds.has_labels and ds[0][1].shape == (0,)


def test_xflip_max_size_cache(tmp_path):
    images = _images(12)
    write_images(tmp_path / 'd', images)
    ds = ImageFolderDataset(str(tmp_path / 'd'), xflip=True, cache=True)
    assert len(ds) == 24
    for i in range(12):  # The originals in order, then their mirror images.
        np.testing.assert_array_equal(ds[i][0], images[i].transpose(2, 0, 1))
        np.testing.assert_array_equal(ds[12 + i][0], images[i].transpose(2, 0, 1)[:, :, ::-1])
    # max_size keeps EDM's subset for the seed (training runs depend on it), mirrored after it.
    for seed in [3, 2 ** 40 + 7]:
        keep = ref_max_size_subset(12, 5, seed)
        a = ImageFolderDataset(str(tmp_path / 'd'), max_size=5, random_seed=seed, xflip=True)
        assert len(a) == 10
        for i, which in enumerate(list(keep) * 2):
            want = images[which].transpose(2, 0, 1)
            np.testing.assert_array_equal(a[i][0], want if i < 5 else want[:, :, ::-1])
    assert len(ImageFolderDataset(str(tmp_path / 'd'), max_size=12)) == 12


def test_pickled_copy_reads_the_same(tmp_path):
    # DataLoader workers get a pickled copy: it opens the zip itself and keeps the labels.
    import pickle
    images = _images(4)
    write_images(tmp_path / 'src', images, labels=[0, 2, 1, 2])
    zip_folder(tmp_path / 'src', tmp_path / 'd.zip')
    ds = ImageFolderDataset(str(tmp_path / 'd.zip'), use_labels=True)
    copy = pickle.loads(pickle.dumps(ds))
    for i in range(4):
        np.testing.assert_array_equal(copy[i][0], ds[i][0])
        np.testing.assert_array_equal(copy[i][1], ds[i][1])
    assert copy.label_dim == 3


def test_jpeg(tmp_path):
    write_images(tmp_path / 'j', _images(3), ext='jpg')
    ds = ImageFolderDataset(str(tmp_path / 'j'))
    assert len(ds) == 3 and ds[0][0].shape == (3, 8, 8)


@pytest.mark.parametrize('case', ['missing', 'empty', 'not_zip', 'bad_zip', 'mixed', 'corrupt', 'label_missing', 'resolution'])
def test_errors(tmp_path, case):
    kwargs = {}
    if case == 'missing':
        path = tmp_path / 'nope'
    elif case == 'empty':
        path = tmp_path / 'empty'
        path.mkdir()
        (path / 'readme.txt').write_text('no images here')
    elif case == 'not_zip':
        path = tmp_path / 'data.txt'
        path.write_text('x')
    elif case == 'bad_zip':
        path = tmp_path / 'data.zip'
        path.write_bytes(b'not a zip at all')
    elif case == 'mixed':
        path = tmp_path / 'mixed'
        write_images(path, _images(3))
        PIL.Image.fromarray(_images(1, size=16)[0]).save(path / 'zz_big.png')
    elif case == 'corrupt':
        path = tmp_path / 'corrupt'
        write_images(path, _images(3))
        (path / 'zz_broken.png').write_bytes(b'\x89PNG broken')
    elif case == 'label_missing':
        path = tmp_path / 'lab'
        names = write_images(path, _images(3), labels=[0, 1, 2])
        with open(path / 'dataset.json', 'w') as f:
            json.dump({'labels': [[names[0], 0], [names[1], 1]]}, f)
        kwargs = dict(use_labels=True)
    elif case == 'resolution':
        path = tmp_path / 'res'
        write_images(path, _images(2))
        kwargs = dict(resolution=16)
    with pytest.raises(DatasetError) as info:
        ImageFolderDataset(str(path), **kwargs)  # Labels are read (and checked) here too.
    assert isinstance(info.value, dnnlib.UserError)
    message = str(info.value)
    assert str(path) in message
    if case == 'mixed':
        assert 'zz_big.png' in message and 'mixed' in message
    if case == 'label_missing':
        assert 'no label' in message


_INHERITED = {}


def _child_reads(index):
    # Runs in a forked process on the parent's dataset object (inherited, not pickled, as in a
    # fork-started DataLoader worker): it must read through a zip handle of its own.
    ds = _INHERITED['ds']
    image, _ = ds[index]
    return ds._zip['zip'].fp.fileno(), image


def test_forked_worker_opens_its_own_zip(tmp_path):
    import multiprocessing
    images = _images(4)
    write_images(tmp_path / 'src', images)
    zip_folder(tmp_path / 'src', tmp_path / 'd.zip')
    ds = ImageFolderDataset(str(tmp_path / 'd.zip'))
    parent_fd = ds._zip['zip'].fp.fileno()  # Opened before the fork.
    _INHERITED['ds'] = ds
    try:
        with multiprocessing.get_context('fork').Pool(1) as pool:
            child_fd, child_image = pool.apply(_child_reads, (1,))
    finally:
        _INHERITED.clear()
    assert child_fd != parent_fd
    np.testing.assert_array_equal(child_image, images[1].transpose(2, 0, 1))


def test_hidden_files_fifos_and_devices_are_not_images(tmp_path):
    # macOS copies leave '._x.png' shadows and .DS_Store beside the images; none is an image.
    images = _images(3)
    write_images(tmp_path / 'd', images)
    (tmp_path / 'd' / '00000' / '._img00000000.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble')
    (tmp_path / 'd' / '.DS_Store').write_bytes(b'Bud1')
    (tmp_path / 'd' / '__MACOSX').mkdir()
    (tmp_path / 'd' / '__MACOSX' / 'x.png').write_bytes(b'junk')
    os.mkfifo(tmp_path / 'd' / 'pipe.png')
    ds = ImageFolderDataset(str(tmp_path / 'd'))
    assert len(ds) == 3 and all(np.array_equal(ds[i][0], images[i].transpose(2, 0, 1)) for i in range(3))

