"""Image datasets in EDM's format: a folder or a zip of PNG/JPEG files, plus an optional
`dataset.json` = {"labels": [[relative_file_name, label], ...]} (label = class index or a list of
floats). Items are `(uint8 CHW numpy array, float32 label vector)`; integer labels become one-hot.
Datasets written by EDM's or our dataset_tool.py load unchanged.

Pixels and labels are read by training/data_files.py, the reader that dataset_tool.py and the
metrics share (16-bit images keep their top 8 bits, labels are checked once, and so on).

Errors in the data itself (nothing found, unreadable files, mixed sizes, bad labels) raise
`DatasetError`, an OSError, with a message that names the file; train.py turns it into one line.
"""

import os
import zipfile

import numpy as np
import PIL.Image
import torch

import dnnlib
from training import data_files


class DatasetError(OSError):
    """The dataset is missing, unreadable or inconsistent."""


#----------------------------------------------------------------------------
# Base class: index bookkeeping (max_size, xflip), caching and labels.

class Dataset(torch.utils.data.Dataset):
    def __init__(self,
        name,               # Name of the dataset (used in run folder names).
        raw_shape,          # Shape of the raw image data, NCHW.
        max_size=None,      # Keep at most this many images (random subset), None = all. Applied before xflip.
        use_labels=False,   # Return labels? False = label dimension zero.
        xflip=False,        # Double the dataset with horizontally mirrored copies. Applied after max_size.
        random_seed=0,      # Seed of the max_size subset.
        cache=False,        # Keep decoded images in memory?
    ):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images = dict()  # raw_idx => np.ndarray
        self._raw_labels = None
        self._label_shape = None

        # The subset is drawn exactly as EDM draws it, so max_size selects the same images.
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])

        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _get_raw_labels(self):
        if self._raw_labels is None:
            labels = self._load_raw_labels() if self._use_labels else None
            if labels is None:
                labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            assert isinstance(labels, np.ndarray) and labels.shape[0] == self._raw_shape[0]
            assert labels.dtype in (np.float32, np.int64)
            if labels.dtype == np.int64:
                assert labels.ndim == 1
                if np.any(labels < 0):
                    raise DatasetError(f'{self._name}: class labels must be non-negative integers')
            self._raw_labels = labels
        return self._raw_labels

    def close(self):  # Overridden by subclasses that hold open files.
        pass

    def _load_raw_image(self, raw_idx):  # Overridden: uint8 CHW array.
        raise NotImplementedError

    def _load_raw_labels(self):  # Overridden: int64 [N] or float32 [N, D] array, or None.
        raise NotImplementedError

    def __getstate__(self):
        # DataLoader workers get a copy; labels are reloaded lazily there.
        return dict(self.__dict__, _raw_labels=None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, idx):
        raw_idx = self._raw_idx[idx]
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        if list(image.shape) != self.image_shape or image.dtype != np.uint8:
            raise DatasetError(f'{self._describe(raw_idx)}: shape {list(image.shape)} {image.dtype}, '
                               f'expected {self.image_shape} uint8 like the other images')
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def _describe(self, raw_idx):
        return f'image {raw_idx}'

    def get_label(self, idx):
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            label = onehot
        return label.copy()

    def get_details(self, idx):
        d = dnnlib.EasyDict()
        d.raw_idx = int(self._raw_idx[idx])
        d.xflip = int(self._xflip[idx]) != 0
        d.raw_label = self._get_raw_labels()[d.raw_idx].copy()
        return d

    @property
    def name(self):
        return self._name

    @property
    def image_shape(self):  # [C, H, W]
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        return self.image_shape[0]

    @property
    def resolution(self):
        assert self.image_shape[1] == self.image_shape[2], 'images must be square'
        return self.image_shape[1]

    @property
    def label_shape(self):
        if self._label_shape is None:
            raw_labels = self._get_raw_labels()
            if raw_labels.dtype == np.int64:
                self._label_shape = [int(np.max(raw_labels)) + 1]
            else:
                self._label_shape = list(raw_labels.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self):
        assert len(self.label_shape) == 1
        return self.label_shape[0]

    @property
    def has_labels(self):
        return any(x != 0 for x in self.label_shape)

    @property
    def has_onehot_labels(self):
        return self._get_raw_labels().dtype == np.int64


#----------------------------------------------------------------------------
# Folder or zip of images, searched recursively; file names sorted so the order is stable.

class ImageFolderDataset(Dataset):
    # Above this many images we check a spread of headers instead of all of them at start-up
    # (reading 1.3M headers out of a zip takes minutes); __getitem__ still checks every image.
    max_header_checks = 10000

    def __init__(self,
        path,               # Folder or .zip file.
        resolution=None,    # Require this resolution, None = whatever the images have.
        max_size=None,      # See Dataset.
        use_labels=False,
        xflip=False,
        random_seed=0,
        cache=False,
        use_pyspng=True,    # Decode PNGs with pyspng when it is installed.
    ):
        self._path = path
        self._use_pyspng = use_pyspng
        self._zipfile = None
        self._zipfile_pid = None

        if os.path.isdir(self._path):
            self._type = 'dir'
            self._all_fnames = {os.path.relpath(os.path.join(root, fname), start=self._path).replace('\\', '/')
                                for root, _dirs, files in os.walk(self._path) for fname in files}
        elif self._file_ext(self._path) == '.zip':
            if not os.path.isfile(self._path):
                raise DatasetError(f'{self._path}: no such file')
            self._type = 'zip'
            try:
                self._all_fnames = set(self._get_zipfile().namelist())
            except (zipfile.BadZipFile, OSError) as err:
                raise DatasetError(f'{self._path}: cannot read zip file ({err})') from None
        elif not os.path.exists(self._path):
            raise DatasetError(f'{self._path}: no such folder or zip file')
        else:
            raise DatasetError(f'{self._path}: must be a folder or a .zip file')

        PIL.Image.init()
        self._image_fnames = sorted(f for f in self._all_fnames if self._file_ext(f) in PIL.Image.EXTENSION)
        if len(self._image_fnames) == 0:
            raise DatasetError(f'{self._path}: no image files found')

        name = os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]
        image_shape = list(self._load_raw_image(0).shape)
        if resolution is not None and (image_shape[1] != resolution or image_shape[2] != resolution):
            raise DatasetError(f'{self._path}: images are {image_shape[2]}x{image_shape[1]}, '
                               f'expected {resolution}x{resolution}')
        self._check_headers(image_shape)
        super().__init__(name=name, raw_shape=[len(self._image_fnames)] + image_shape, max_size=max_size,
                         use_labels=use_labels, xflip=xflip, random_seed=random_seed, cache=cache)

    @staticmethod
    def _file_ext(fname):
        return os.path.splitext(fname)[1].lower()

    def _get_zipfile(self):
        assert self._type == 'zip'
        # A forked DataLoader worker inherits the parent's open zip, whose file offset the
        # processes would then share (corrupt reads, "Bad CRC-32"): each process opens its own.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname):
        if self._type == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        return self._get_zipfile().open(fname, 'r')

    def close(self):
        try:
            if self._zipfile is not None:
                self._zipfile.close()
        finally:
            self._zipfile = None

    def __getstate__(self):
        return dict(super().__getstate__(), _zipfile=None)

    def _describe(self, raw_idx):
        return f'{self._path}: {self._image_fnames[raw_idx]}'

    def _check_headers(self, image_shape):
        """Compare the size and channel count of (a spread of) images with the first one.
        PIL reads only the header here, so this is cheap."""
        n = len(self._image_fnames)
        if n <= self.max_header_checks:
            indices = range(1, n)
        else:
            indices = np.unique(np.linspace(1, n - 1, self.max_header_checks).round().astype(np.int64))
        for raw_idx in indices:
            fname = self._image_fnames[raw_idx]
            try:
                with self._open_file(fname) as f:
                    w, h, channels = data_files.read_header(f, fname)
            except data_files.DataFileError as err:
                raise DatasetError(f'{self._path}: {err}') from None
            except (OSError, zipfile.BadZipFile) as err:
                raise DatasetError(f'{self._path}: cannot read {fname} ({err})') from None
            if [channels, h, w] != image_shape:
                raise DatasetError(f'{self._path}: mixed image sizes: {fname} is {w}x{h}x{channels}, '
                                   f'{self._image_fnames[0]} is {image_shape[2]}x{image_shape[1]}x{image_shape[0]}; '
                                   f'resize them all first (dataset_tool.py)')

    def _load_raw_image(self, raw_idx):
        fname = self._image_fnames[raw_idx]
        try:
            with self._open_file(fname) as f:
                image = data_files.read_image(f, fname, use_pyspng=self._use_pyspng)
        except data_files.DataFileError as err:
            raise DatasetError(f'{self._path}: {err}') from None
        except (OSError, zipfile.BadZipFile) as err:
            raise DatasetError(f'{self._path}: cannot read {fname} ({err})') from None
        if image.ndim == 2:
            image = image[:, :, np.newaxis]  # HW => HWC
        return image.transpose(2, 0, 1)     # HWC => CHW

    def _load_raw_labels(self):
        fname = 'dataset.json'
        if fname not in self._all_fnames:
            return None
        where = f'{self._path}: {fname}'
        try:
            with self._open_file(fname) as f:
                table = data_files.parse_labels(data_files.read_json(f, where, len(self._image_fnames)), where)
            if table is None:
                return None
            return data_files.labels_array(table, self._image_fnames, where)
        except data_files.DataFileError as err:
            raise DatasetError(str(err)) from None
        except (OSError, zipfile.BadZipFile) as err:
            raise DatasetError(f'{where}: cannot read it ({err})') from None
