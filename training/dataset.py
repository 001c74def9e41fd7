"""Image datasets in EDM's format: a folder or a zip of image files (searched recursively, in
sorted name order) and, optionally, `dataset.json` = {"labels": [[relative_file_name, label], ...]}
where a label is a class index or a list of floats. An item is (uint8 CHW numpy array, float32
label vector); class indices come out one-hot. Datasets written by EDM's or our dataset_tool.py
load unchanged.

Pixels and labels are read by training/data_files.py, the reader that dataset_tool.py and the
metrics share. Problems with the data (nothing found, unreadable files, mixed sizes, bad labels)
raise DatasetError with one line that names the file.
"""

import os
import zipfile

import numpy as np
import torch

from training import data_files
from training.data_files import DatasetError


class ImageFolderDataset(torch.utils.data.Dataset):
    """The images of a folder or zip, with their labels; `dataset_kwargs` of train.py (recorded in
    training_options.json and snapshots) are this constructor's arguments."""

    # Headers compared with the first image when the dataset opens: all of them up to this many,
    # else this many spread evenly (1.3M headers in a zip take minutes). Items are checked when read.
    max_header_checks = 10000

    def __init__(self,
        path,               # Folder or .zip file.
        resolution=None,    # Require images of this size; None = whatever they are.
        max_size=None,      # Use at most this many images (a random subset); before xflip.
        use_labels=False,   # Read labels from dataset.json; False = labels of size zero.
        xflip=False,        # Also give every image mirrored left to right (twice the items).
        random_seed=0,      # Seed of the max_size subset.
        cache=False,        # Keep decoded images in memory.
        use_pyspng=True,    # Decode 8-bit PNGs with pyspng when it is installed.
    ):
        self._path, self._use_pyspng, self._zip = path, use_pyspng, {}
        self._cache, self._caching = {}, cache
        if not os.path.isdir(path) and not (os.path.isfile(path) and str(path).lower().endswith('.zip')):
            problem = 'must be a folder or a .zip file' if os.path.exists(path) else 'no such file or folder'
            raise DatasetError(f'{path}: {problem}')
        try:
            self._names = data_files.list_files(path)  # Regular, visible files only: no FIFO can block a read.
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            raise DatasetError(f'{path}: cannot read it ({err})') from None
        self._images = [n for n in self._names if data_files.is_image_name(n)]
        if not self._images:
            raise DatasetError(f'{path}: no image files found')
        self.name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        self.image_shape = list(self._read_image(0).shape)  # [C, H, W]
        if resolution is not None and self.image_shape[1:] != [resolution, resolution]:
            raise DatasetError(f'{path}: images are {self.image_shape[2]}x{self.image_shape[1]}, '
                               f'expected {resolution}x{resolution}')
        self._check_headers()
        read_labels = lambda f, where: data_files.read_labels(f, where, self._images)  # noqa: E731  None for {"labels": null}.
        labels = self._read('dataset.json', read_labels) if use_labels and 'dataset.json' in self._names else None
        self._labels = labels if labels is not None else np.zeros([len(self._images), 0], dtype=np.float32)
        self.label_dim = int(self._labels.max()) + 1 if self._labels.dtype == np.int64 else self._labels.shape[1]

        # Which image each item shows. The max_size subset is EDM's draw (a seeded shuffle of all
        # indices, the first max_size of it, sorted), so a seed selects the same images as there;
        # xflip appends the mirrored copies after the originals.
        chosen = np.arange(len(self._images), dtype=np.int64)
        if max_size is not None and chosen.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(chosen)
            chosen = np.sort(chosen[:max_size])
        self._item_image = np.concatenate([chosen, chosen]) if xflip else chosen
        self._item_mirrored = np.arange(self._item_image.size) >= chosen.size

    # What the training loop, the sample grid and the metrics ask.

    @property
    def num_channels(self):
        return self.image_shape[0]

    @property
    def resolution(self):
        if self.image_shape[1] != self.image_shape[2]:
            raise DatasetError(f'{self._path}: images are {self.image_shape[2]}x{self.image_shape[1]}; '
                               f'training needs square images (dataset_tool.py --transform=center-crop)')
        return self.image_shape[1]

    @property
    def has_labels(self):
        return self.label_dim != 0

    def __len__(self):
        return self._item_image.size

    def __getitem__(self, idx):
        which = int(self._item_image[idx])
        image = self._cache[which] if which in self._cache else self._read_image(which)
        if self._caching:
            self._cache[which] = image
        if list(image.shape) != self.image_shape:
            raise DatasetError(f'{self._path}: {self._images[which]} is {list(image.shape)} (CHW), the first image '
                               f'{self.image_shape}; make them all one size first (dataset_tool.py)')
        label = self._labels[which].copy()
        if self._labels.dtype == np.int64:  # A class index: one-hot.
            label = (np.arange(self.label_dim) == label).astype(np.float32)
        return (image[:, :, ::-1] if self._item_mirrored[idx] else image).copy(), label

    # Files.

    def __getstate__(self):
        return dict(self.__dict__, _zip={})  # DataLoader workers open the zip themselves.

    def _read(self, name, reader):
        """reader(open binary file of `name`, message prefix); read errors become one DatasetError."""
        where = f'{self._path}: {name}'
        try:
            with data_files.open_member(self._path, name, self._zip) as f:  # A forked worker opens its own zip.
                return reader(f, where)
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            raise DatasetError(f'{where}: cannot read it ({err})') from None

    def _read_image(self, which):
        image = self._read(self._images[which],
                           lambda f, where: data_files.read_image(f, where, use_pyspng=self._use_pyspng))
        return image[np.newaxis] if image.ndim == 2 else image.transpose(2, 0, 1)  # HW or HWC => CHW

    def _check_headers(self):
        """Size and channels of (a spread of) the other images against the first one's; PIL
        reads only the header here, so this is cheap."""
        n, (c, h, w) = len(self._images), self.image_shape
        for which in np.unique(np.linspace(1, n - 1, min(n - 1, self.max_header_checks)).round().astype(np.int64)):
            size = self._read(self._images[which], data_files.read_header)
            if size != (w, h, c):
                raise DatasetError(f'{self._path}: mixed image sizes: {self._images[which]} is {"x".join(map(str, size))}, '
                                   f'{self._images[0]} is {w}x{h}x{c}; resize them all first (dataset_tool.py)')
