"""Convert raw images into a training dataset: a folder or an uncompressed zip of PNG files,
named 00000/img00000000.png, 00000/img00000001.png, ..., plus dataset.json =
{"labels": [["00000/img00000000.png", class_index], ...]} or {"labels": null}.

This is the format of EDM's dataset_tool.py, read by training/dataset.py and by EDM's own
reader. Sources: a folder (recursive), a zip of images, the CIFAR-10 python tarball, MNIST gz
files, an ADM-style .npz. Transforms: EDM's center-crop and center-crop-wide, and ADM's
center crop for ImageNet (center-crop-dhariwal, as in EDM2's dataset_tool).

Differences from EDM's tool, on purpose:
- Output indices count written images, so names have no gaps when inputs are skipped.
- Unreadable inputs are skipped, counted and listed in DEST.skipped.txt (--strict refuses).
- Grayscale, RGBA, palette, CMYK ... become RGB, unless every input is grayscale (then L).
- The destination appears only when complete (written under a temporary name, then renamed),
  and is never written over. Zip entries carry a fixed time stamp, so the same input gives the
  same archive bytes, with any --workers.
"""

import codecs
import contextlib
import dataclasses
import gzip
import io
import json
import multiprocessing
import os
import pickle
import re
import shutil
import struct
import sys
import tarfile
import zipfile
import zlib

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

import dnnlib
from dnnlib.util import atomic_write
from training import data_files

#----------------------------------------------------------------------------
# Presets as data.

TRANSFORMS = ['center-crop', 'center-crop-wide', 'center-crop-dhariwal']
SMALL_POLICIES = ['upscale', 'skip', 'error']

# What to do with an input smaller than the target when --small is not given: what EDM and ADM
# do. EDM's center-crop-wide drops such images; all other modes upsample them (ImageNet has a few
# images with a short side under 256, and ADM's crop upsamples them with BICUBIC).
DEFAULT_SMALL = {None: 'upscale', 'center-crop': 'upscale', 'center-crop-wide': 'skip', 'center-crop-dhariwal': 'upscale'}

GRAY_MODES = data_files.GRAY_MODES | {'LA', 'La'}
MAX_RESOLUTION = 8192  # Per side; 8192x8192x3 is 192 MiB per image, far beyond any diffusion training size.
MAX_WORKERS = 256  # More processes than this only cost memory (each one decodes its own images).
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # Fixed zip time stamp: same input => same archive bytes.
CIFAR10_MEMBERS = [f'cifar-10-batches-py/data_batch_{i}' for i in range(1, 6)]  # Training split, as EDM.

#----------------------------------------------------------------------------
# Small helpers.

def parse_resolution(ctx, param, value):
    """'256x256' or '256,256' -> (256, 256); None stays None."""
    if value is None:
        return None
    m = re.fullmatch(r'\s*(\d+)\s*[x,]\s*(\d+)\s*', value)
    digits = [g.lstrip('0') or '0' for g in m.groups()] if m else []
    w, h = [int(g) if len(g) <= 12 else 10 ** 12 for g in digits] or [0, 0]  # Huge digit strings: just "too large".
    if w == 0 or h == 0:
        raise click.BadParameter(f'expected WxH with positive integers, e.g. 256x256, got {value!r}')
    if max(w, h) > MAX_RESOLUTION:
        raise click.BadParameter(f'{w}x{h} is larger than {MAX_RESOLUTION} per side; choose a training-size resolution such as 256x256')
    return w, h

def is_image_name(name):
    return os.path.splitext(name)[1].lower() in PIL.Image.EXTENSION

def is_hidden(relpath):
    # Dot files (.DS_Store, macOS '._x.jpg' shadows) and zips' __MACOSX folders are not data.
    return any(part.startswith('.') or part == '__MACOSX' for part in relpath.split('/'))

def printable(text):
    """One line of text: tabs, newlines and other control characters escaped."""
    return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))

def output_name(idx):
    s = f'{idx:08d}'
    return f'{s[:5]}/img{s}.png'

#----------------------------------------------------------------------------
# Sources. Each lists its items up front in a fixed order; the pixels are read later, in the
# workers, from `refs[i]` (a path, a zip member, an array, or an index), so order, names and
# labels never depend on timing or --workers.

@dataclasses.dataclass
class Source:
    kind: str               # 'folder', 'zip', 'cifar10', 'mnist', 'npz'
    path: str               # The --source argument.
    names: list             # Per item: a name for messages and the skip list.
    refs: object            # Per item: what the worker opens (see open_item).
    labels: list = None     # Per item class index, or None for an unlabelled dataset.
    class_names: list = None  # Class index -> folder name, when labels come from folders.
    mode: str = None        # Common PIL mode of all items if known without decoding.
    notes: list = dataclasses.field(default_factory=list)  # Lines for the final summary.

def labels_from_names(relpaths, meta, notes):
    """Labels from a source's own dataset.json (`meta`), else from first-level folder names."""
    if meta is not None:
        missing = sum(1 for p in relpaths if p not in meta['labels'])
        if missing == 0:
            return [meta['labels'][p] for p in relpaths], meta['class_names']
        notes.append(f'dataset.json in the source has no label for {missing} images: writing no labels')
        return None, None
    tops = [p.split('/')[0] if '/' in p else None for p in relpaths]
    folders = sorted(set(t for t in tops if t is not None))
    if len(folders) < 2:
        return None, None  # One folder or none: nothing to tell apart (as EDM).
    if None in tops:
        notes.append(f'{tops.count(None)} images lie beside the class folders, not in one: writing no labels')
        return None, None
    # Ids follow sorted folder names over ALL listed files, so they do not depend on
    # --max-images or on which files turn out unreadable (ImageNet: n01440764 = 0, ...).
    index = {name: i for i, name in enumerate(folders)}
    return [index[t] for t in tops], folders

def read_meta_labels(f, where, num_images):
    """A source's dataset.json, checked by the same rules as training's reader."""
    try:
        meta = data_files.read_json(f, where, num_images)
        labels = data_files.parse_labels(meta, where)
    except data_files.DataFileError as err:
        raise click.ClickException(f'{err}; fix or remove it') from None
    if labels is None:
        return None
    class_names = meta.get('class_names')
    if not (isinstance(class_names, list) and all(isinstance(c, str) for c in class_names)):
        class_names = None
    return dict(labels=labels, class_names=class_names)

def open_folder(path):
    found, ignored = [], 0
    seen = set()
    def walk(folder, rel):
        nonlocal ignored
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # Symlink loop.
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            for e in it:
                r = f'{rel}{e.name}'
                if is_hidden(e.name):
                    continue
                if e.is_dir():
                    walk(e.path, r + '/')
                elif e.is_file():
                    if is_image_name(e.name):
                        found.append(r)
                    elif r != 'dataset.json':
                        ignored += 1
    walk(path, '')
    found.sort()
    src = Source(kind='folder', path=path, names=found, refs=[os.path.join(path, *p.split('/')) for p in found])
    meta = None
    if os.path.isfile(os.path.join(path, 'dataset.json')):
        with open(os.path.join(path, 'dataset.json'), 'rb') as f:
            meta = read_meta_labels(f, os.path.join(path, 'dataset.json'), len(found))
    src.labels, src.class_names = labels_from_names(found, meta, src.notes)
    if ignored:
        src.notes.append(f'ignored {ignored} files without an image extension')
    return src

def open_zip(path):
    try:
        with zipfile.ZipFile(path) as z:
            members = [i.filename for i in z.infolist() if not i.is_dir()]
            visible = [m for m in members if not is_hidden(m)]
            found = sorted(set(m for m in visible if is_image_name(m)))  # A repeated name is one image (the last).
            meta = None
            if 'dataset.json' in members:
                with z.open('dataset.json') as f:
                    meta = read_meta_labels(f, f'{path}: dataset.json', len(found))
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
        raise click.ClickException(f'cannot read zip file {path}: {err}') from None
    src = Source(kind='zip', path=path, names=found, refs=found)
    src.labels, src.class_names = labels_from_names(found, meta, src.notes)
    ignored = sum(1 for m in visible if not is_image_name(m) and m != 'dataset.json')
    if ignored:
        src.notes.append(f'ignored {ignored} zip members without an image extension')
    return src

try:  # numpy >= 2 moved numpy.core to numpy._core.
    from numpy._core import multiarray as _np_multiarray, numeric as _np_numeric
except ImportError:
    from numpy.core import multiarray as _np_multiarray, numeric as _np_numeric

class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickles; allow only what numpy arrays need, so a crafted file
    cannot run code."""
    allowed = {
        ('numpy.core.multiarray', '_reconstruct'): (_np_multiarray, '_reconstruct'),
        ('numpy._core.multiarray', '_reconstruct'): (_np_multiarray, '_reconstruct'),
        ('numpy.core.multiarray', 'scalar'): (_np_multiarray, 'scalar'),
        ('numpy._core.multiarray', 'scalar'): (_np_multiarray, 'scalar'),
        ('numpy.core.numeric', '_frombuffer'): (_np_numeric, '_frombuffer'),
        ('numpy._core.numeric', '_frombuffer'): (_np_numeric, '_frombuffer'),
        ('numpy', 'ndarray'): (np, 'ndarray'),
        ('numpy', 'dtype'): (np, 'dtype'),
        ('_codecs', 'encode'): (codecs, 'encode'),  # How Python 3 writes bytes in protocol 2.
    }
    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f'unexpected object {module}.{name} in a CIFAR-10 batch')
        owner, attr = self.allowed[(module, name)]
        return getattr(owner, attr)

def open_cifar10(path):
    images, labels = [], []
    try:
        with tarfile.open(path, 'r:*') as tar:
            for member in CIFAR10_MEMBERS:
                with tar.extractfile(member) as f:
                    batch = _ArrayUnpickler(f, encoding='latin1').load()
                images.append(np.asarray(batch['data'], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(int(x) for x in batch['labels'])
    except (tarfile.TarError, KeyError, OSError, pickle.UnpicklingError, ValueError, EOFError) as err:
        raise click.ClickException(f'cannot read CIFAR-10 tarball {path}: {err}')
    images = np.concatenate(images).transpose(0, 2, 3, 1)  # NCHW => NHWC
    if len(labels) != len(images):
        raise click.ClickException(f'cannot read CIFAR-10 tarball {path}: {len(images)} images but {len(labels)} labels')
    names = ItemNames(os.path.basename(path), len(images))
    return Source(kind='cifar10', path=path, names=names, refs=images, labels=labels, mode='RGB')

MAX_IDX_BYTES = 1 << 30  # MNIST-format files hold tens of MB; more is not such a file (or a gzip bomb).

def read_idx(path, magic, ndim):
    """One MNIST IDX file: big-endian magic, ndim sizes, then uint8 data. Reads no more than the
    header declares (and at most MAX_IDX_BYTES), so a gzip bomb cannot fill memory."""
    head = 4 + 4 * ndim
    with gzip.open(path, 'rb') as f:
        header = f.read(head)
        if len(header) < head or struct.unpack('>I', header[:4])[0] != magic:
            raise ValueError(f'{path} is not an MNIST IDX file')
        shape = struct.unpack(f'>{ndim}I', header[4:head])
        size = int(np.prod(shape, dtype=np.int64))
        if size > MAX_IDX_BYTES:
            raise ValueError(f'{path} declares {list(shape)} = {size} bytes of data, more than an MNIST-format file holds')
        chunks, got = [], 0
        while got <= size:  # In chunks: memory grows with the data actually there, not the claim.
            chunk = f.read(min(size + 1 - got, 16 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        data = b''.join(chunks)
    if len(data) != size:
        raise ValueError(f'{path} is {"truncated" if len(data) < size else "longer than its header says"}: '
                         f'expected {size} bytes of data')
    return np.frombuffer(data, np.uint8).reshape(shape)

def open_mnist(path):
    labels_path = path.replace('-images-idx3-ubyte.gz', '-labels-idx1-ubyte.gz')
    try:
        images = read_idx(path, 0x803, 3)
        labels = read_idx(labels_path, 0x801, 1) if os.path.isfile(labels_path) else None
    except (OSError, ValueError, EOFError) as err:
        raise click.ClickException(f'cannot read MNIST file: {err}')
    notes = []
    if labels is None:
        notes.append(f'no {os.path.basename(labels_path)} beside the images: writing no labels')
    elif len(labels) != len(images):
        raise click.ClickException(f'{path}: {len(images)} images but {len(labels)} labels in {labels_path}')
    if images.shape[1:] == (28, 28):
        images = np.pad(images, [(0, 0), (2, 2), (2, 2)])  # 28 => 32 with black borders, as EDM.
    names = ItemNames(os.path.basename(path), len(images))
    return Source(kind='mnist', path=path, names=names, refs=images,
                  labels=None if labels is None else [int(x) for x in labels], mode='L', notes=notes)

class ItemNames:
    """Names of the items of an array source, made on demand ('file.npz[12]'): a header that
    claims a billion images must not make us build a billion strings."""
    def __init__(self, base, n):
        self.base, self.n = base, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return f'{self.base}[{i}]'

class NpyMember:
    """Random access to the images of arr_0 inside an .npz without loading the whole array
    (50k ImageNet-256 samples are 10 GB)."""
    def __init__(self, path, key='arr_0'):
        self._zip = zipfile.ZipFile(path)
        try:
            self._file = self._zip.open(key + '.npy')
            version = np.lib.format.read_magic(self._file)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f'unsupported .npy format version {version}')
            self.shape, fortran, self.dtype = read_header(self._file)
        except BaseException:
            self._zip.close()
            raise
        self._offset = self._file.tell()
        # The header's shape must fit in the bytes the member holds (deflate expands at most
        # about 1032 times), so a small file cannot claim a billion images.
        info = self._zip.getinfo(key + '.npy')
        stored = info.file_size if info.compress_type == zipfile.ZIP_STORED else min(info.file_size, 1032 * info.compress_size)
        needed = self._offset + int(np.prod(self.shape, dtype=np.float64)) * self.dtype.itemsize
        if needed > stored:
            self._zip.close()
            raise ValueError(f'{key} claims shape {list(self.shape)} ({needed} bytes) but the file holds only {stored} bytes')
        self._array = None
        if fortran:  # Rare; element i is not contiguous, so read it all once.
            with np.load(path, allow_pickle=False) as npz:
                self._array = np.ascontiguousarray(npz[key])
        self._item_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def close(self):
        self._file.close()
        self._zip.close()

    def __getitem__(self, i):
        if self._array is not None:
            return self._array[i]
        self._file.seek(self._offset + i * self._item_bytes)
        data = self._file.read(self._item_bytes)
        if len(data) != self._item_bytes:
            raise ValueError(f'arr_0 is truncated at image {i}')
        return np.frombuffer(data, self.dtype).reshape(self.shape[1:])

def open_npz(path):
    try:
        arr = NpyMember(path)
        shape, dtype = arr.shape, arr.dtype
        arr.close()  # Workers open their own.
        labels = None
        with zipfile.ZipFile(path) as z:
            has_labels = 'arr_1.npy' in z.namelist()
        if has_labels:
            NpyMember(path, 'arr_1').close()  # Checks its header against its size before loading it.
            with np.load(path, allow_pickle=False) as npz:
                labels = npz['arr_1']
    except (KeyError, ValueError, OSError, EOFError, MemoryError, zipfile.BadZipFile, zlib.error) as err:
        raise click.ClickException(f'cannot read {path} as an ADM-style .npz (arr_0 = NHWC uint8 images): {err}')
    if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3, 4)):
        raise click.ClickException(f'{path}: arr_0 must be uint8 images shaped NHWC (C = 1, 3 or 4) or NHW, '
                                   f'got {dtype} {list(shape)}')
    if labels is not None:
        if labels.shape != (shape[0],) or labels.dtype.kind not in 'iu' or (labels.size and labels.min() < 0):
            raise click.ClickException(f'{path}: arr_1 must hold one non-negative integer label per image, '
                                       f'got {labels.dtype} {list(labels.shape)}')
        labels = [int(x) for x in labels]
    mode = 'L' if len(shape) == 3 or shape[3] == 1 else {3: 'RGB', 4: 'RGBA'}[shape[3]]
    names = ItemNames(os.path.basename(path), shape[0])
    return Source(kind='npz', path=path, names=names, refs=range(shape[0]), labels=labels, mode=mode)

def open_source(path):
    base = os.path.basename(path.rstrip('/\\'))
    if os.path.isdir(path):
        try:
            return open_folder(path)
        except OSError as err:
            raise click.ClickException(f'cannot list --source {path}: {err}') from None
    if not os.path.isfile(path):
        raise click.ClickException(f'--source {path}: no such file or folder')
    lower = base.lower()
    if lower.endswith('.zip'):
        return open_zip(path)
    if lower.endswith('.npz'):
        return open_npz(path)
    if lower.endswith('-images-idx3-ubyte.gz'):
        return open_mnist(path)
    if lower.endswith(('.tar.gz', '.tgz', '.tar')):
        return open_cifar10(path)
    raise click.ClickException(f'--source {path}: unknown kind; expected a folder, a .zip of images, '
                               f'cifar-10-python.tar.gz, train-images-idx3-ubyte.gz or an ADM-style .npz')

#----------------------------------------------------------------------------
# Transforms on uint8 HW or HWC arrays. Each returns an array, or None when the image is too
# small for the target and policy says skip.

def pil_resize(arr, size, resample):
    return np.asarray(PIL.Image.fromarray(arr).resize(size, resample))

def is_small(transform, width, height, w, h):
    """Would this w x h input need upsampling to reach the width x height target?"""
    if width is None:
        return False
    if transform is None:
        return w < width or h < height
    if transform == 'center-crop':
        return min(w, h) < max(width, height)
    if transform == 'center-crop-wide':  # EDM's own test for this mode.
        return w < width or round(width * h / w) < height
    return min(w, h) < width  # center-crop-dhariwal

def scale(arr, width, height):
    # No transform: stretch to the target with LANCZOS, or keep the size without --resolution.
    h, w = arr.shape[:2]
    if width is None or (w, h) == (width, height):
        return arr
    return pil_resize(arr, (width, height), PIL.Image.Resampling.LANCZOS)

def center_crop(arr, width, height):
    # EDM: the largest centred square, then LANCZOS to the target.
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    arr = arr[top:top + side, left:left + side]
    return pil_resize(arr, (width, height), PIL.Image.Resampling.LANCZOS)

def center_crop_wide(arr, width, height):
    # EDM (for LSUN, e.g. 512x384): keep a centred band of rows, squeeze it to width x height,
    # and pad with black above and below to a width x width square.
    h, w = arr.shape[:2]
    band = round(width * h / w)
    top = (h - band) // 2
    arr = arr[top:top + band] if band <= h else arr
    arr = pil_resize(arr, (width, height), PIL.Image.Resampling.LANCZOS)
    canvas = np.zeros((width, width) + arr.shape[2:], dtype=np.uint8)
    pad = (width - height) // 2
    canvas[pad:pad + height] = arr
    return canvas

def center_crop_dhariwal(arr, size):
    # ADM (guided-diffusion center_crop_arr), the preprocessing of the ImageNet FID reference
    # batches: halve with BOX while the short side is at least twice the target (a cheap,
    # alias-free reduction), BICUBIC so the short side equals the target, then a centred crop.
    img = PIL.Image.fromarray(arr)
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), PIL.Image.Resampling.BOX)
    factor = size / min(img.size)
    img = img.resize((round(img.size[0] * factor), round(img.size[1] * factor)), PIL.Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]

def apply_transform(transform, resolution, arr):
    width, height = resolution if resolution is not None else (None, None)
    if transform is None:
        return scale(arr, width, height)
    if transform == 'center-crop':
        return center_crop(arr, width, height)
    if transform == 'center-crop-wide':
        return center_crop_wide(arr, width, height)
    if transform == 'center-crop-dhariwal':
        return center_crop_dhariwal(arr, width)
    raise ValueError(f'unknown transform {transform}')

#----------------------------------------------------------------------------
# Worker side: open one item, convert its mode, transform, encode PNG. Runs in the main process
# with --workers=1 and in pool processes otherwise; the same function, so the same bytes.

@dataclasses.dataclass(frozen=True)
class Settings:
    kind: str
    path: str
    mode: str               # Output mode: 'RGB' or 'L'.
    transform: str
    resolution: tuple
    small: str
    compress_level: int

_state = dict()  # Per process: settings and open file handles.

def init_worker(settings):
    _state.clear()
    _state['settings'] = settings

def open_item(s, ref):
    """PIL image of one item, fully decoded (errors surface here, not later)."""
    if s.kind in ('folder', 'zip'):
        if s.kind == 'folder':
            f = open(ref, 'rb')
        else:
            if 'zip' not in _state:
                _state['zip'] = zipfile.ZipFile(s.path)
            f = _state['zip'].open(ref)
        with f:
            return data_files.decode_image(f, os.path.basename(ref))
    if s.kind == 'npz':
        if 'npz' not in _state:
            _state['npz'] = NpyMember(s.path)
        ref = _state['npz'][ref]
    arr = np.ascontiguousarray(ref)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return PIL.Image.fromarray(arr)

def process_item(ref):
    """-> ('ok', png_bytes, shape, source_mode, upscaled) | ('unreadable', reason) | ('small', w, h)."""
    s = _state['settings']
    try:
        img = open_item(s, ref)
        source_mode = img.mode
        # The pixel rules shared with training and evaluation (16-bit gray keeps its top 8 bits, ...).
        img = PIL.Image.fromarray(data_files.to_array(img, 'image', s.mode), s.mode)
    except data_files.DataFileError as err:
        return ('unreadable', err.reason)
    except Exception as err:  # Any decoder failure means "this file is not a usable image".
        return ('unreadable', f'{type(err).__name__}: {err}'.replace('\n', ' ').replace('\t', ' '))
    w, h = img.size
    width, height = s.resolution if s.resolution is not None else (None, None)
    upscaled = is_small(s.transform, width, height, w, h)
    if upscaled and s.small != 'upscale':
        return ('small', w, h)
    arr = apply_transform(s.transform, s.resolution, np.asarray(img))
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format='png', compress_level=s.compress_level, optimize=False)
    return ('ok', buf.getvalue(), arr.shape, source_mode, upscaled)

def probe_mode(s, ref):
    """Mode of an item from its header only (cheap); None when unreadable."""
    try:
        if s.kind == 'folder':
            with PIL.Image.open(ref) as img:
                return img.mode
        if 'zip' not in _state:
            _state['zip'] = zipfile.ZipFile(s.path)
        with _state['zip'].open(ref) as f, PIL.Image.open(f) as img:
            return img.mode
    except Exception:
        return None

def choose_mode(src, settings):
    """'L' if every readable input is grayscale, else 'RGB'. Stops at the first colour image,
    so for typical photo datasets this reads one header."""
    if src.mode is not None:
        return 'L' if src.mode in GRAY_MODES else 'RGB'
    for ref in src.refs:
        m = probe_mode(settings, ref)
        if m is not None and m not in GRAY_MODES:
            return 'RGB'
    return 'L'

#----------------------------------------------------------------------------
# Destination: written under a temporary name (dnnlib.util.atomic_write), published only when
# complete, never over something that appeared meanwhile.

class Destination:
    def __init__(self, dest):
        self.dest = dest.rstrip('/\\') or dest
        self.is_zip = self.dest.lower().endswith('.zip')
        if os.path.isdir(self.dest):
            if self.is_zip or os.listdir(self.dest):
                raise click.ClickException(f'--dest {dest} already exists and is not empty; choose a new name')
        elif os.path.lexists(self.dest):
            raise click.ClickException(f'--dest {dest} already exists; choose a new name or remove it first')
        if os.path.lexists(self.dest + '.skipped.txt'):
            raise click.ClickException(f'{self.dest}.skipped.txt already exists (from an earlier run?); remove it first')
        problem = dnnlib.util.folder_write_problem(os.path.dirname(os.path.abspath(self.dest)))
        if problem:
            raise click.ClickException(f'cannot write --dest {dest}: {problem}; choose a writable location')
        self.zip = None
        self.folder = None
        self.made = set()

    @contextlib.contextmanager
    def opened(self):
        """The temporary output (atomic_write); it becomes dest when the block ends without error."""
        with atomic_write(self.dest, 'w+b', directory=not self.is_zip, overwrite=False) as target:
            if self.is_zip:
                with zipfile.ZipFile(target, 'w', compression=zipfile.ZIP_STORED) as self.zip:
                    yield self
            else:
                self.folder = target
                yield self

    def write(self, name, data):
        if self.is_zip:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
            info.external_attr = 0o644 << 16
            self.zip.writestr(info, data, compress_type=zipfile.ZIP_STORED)
            return
        folder = os.path.dirname(name)
        if folder not in self.made:
            os.makedirs(os.path.join(self.folder, folder), exist_ok=True)
            self.made.add(folder)
        with open(os.path.join(self.folder, name), 'wb') as f:
            f.write(data)

#----------------------------------------------------------------------------
# The conversion.

def check_options(transform, resolution):
    if transform is not None and resolution is None:
        raise click.UsageError(f'--transform={transform} needs --resolution=WxH')
    if resolution is None:
        return
    w, h = resolution
    if transform == 'center-crop-wide':
        if h > w:
            raise click.UsageError(f'--transform=center-crop-wide needs H <= W in --resolution, got {w}x{h}')
    elif w != h:
        raise click.UsageError(f'--resolution must be square (got {w}x{h}); only center-crop-wide takes W > H '
                               f'and pads the result to WxW')
    if w & (w - 1):
        raise click.UsageError(f'--resolution width must be a power of two (got {w}): the networks halve it at every level')

def check_first(shape, source_name):
    h, w = shape[:2]
    if h != w:
        raise click.ClickException(f'{source_name}: images must come out square, this one is {w}x{h}; '
                                   f'use --transform=center-crop --resolution=NxN')
    if w & (w - 1):
        raise click.ClickException(f'{source_name}: images must come out with a power-of-two size, this one is '
                                   f'{w}x{h}; use --resolution=NxN with N a power of two')

def convert(source, dest, max_images=None, transform=None, resolution=None, workers=1, strict=False,
            small=None, compress_level=0, log=None):
    """Convert `source` into `dest`; returns a summary dict. Raises click.ClickException on bad input."""
    log = log or (lambda msg: click.echo(msg, err=True))
    PIL.Image.init()
    check_options(transform, resolution)
    if max_images is not None and max_images < 1:
        raise click.UsageError('--max-images must be at least 1')
    if not dest:
        raise click.UsageError('--dest must not be empty')
    small = small or DEFAULT_SMALL[transform]

    src = open_source(source)
    if len(src.names) == 0:
        raise click.ClickException(f'--source {source}: no images found')
    out = Destination(dest)  # Checks that dest is free before any work.
    pool = None
    try:
        # Entered before any work: this is also the check that dest can be written.
        with out.opened():
            settings = Settings(kind=src.kind, path=src.path, mode='RGB', transform=transform, resolution=resolution,
                                small=small, compress_level=compress_level)
            # The output mode is fixed before any pixel work, from headers, in this process.
            init_worker(settings)
            settings = dataclasses.replace(settings, mode=choose_mode(src, settings))
            init_worker(settings)
            if workers > 1:
                # 'spawn': clean children, same behaviour on Linux, macOS and Windows.
                pool = multiprocessing.get_context('spawn').Pool(workers, initializer=init_worker, initargs=(settings,))
            n = len(src.names)
            log(f'Found {n} images in {source} ({src.kind}); writing {settings.mode} images to {out.dest}')
            refs = (src.refs[i] for i in range(n))
            results = pool.imap(process_item, refs, chunksize=8) if pool is not None else map(process_item, refs)
            written, labels, skipped, upscaled, converted = 0, [], [], 0, dict()
            first = None
            total = n if max_images is None else min(n, max_images)
            with tqdm(total=total, unit='img', desc='Converting', dynamic_ncols=True, file=sys.stderr) as bar:
                for i, res in enumerate(results):
                    name = src.names[i]
                    if res[0] == 'unreadable':
                        if strict:
                            raise click.ClickException(f'cannot read {name}: {res[1]} (--strict; without it such files are skipped)')
                        skipped.append((name, res[1]))
                    elif res[0] == 'small':
                        w, h = resolution
                        if small == 'error':
                            raise click.ClickException(f'{name} is {res[1]}x{res[2]}, smaller than the {w}x{h} target; '
                                                       f'pass --small=upscale or --small=skip')
                        skipped.append((name, f'smaller than the target: {res[1]}x{res[2]}'))
                    else:
                        _, png, shape, source_mode, was_upscaled = res
                        arch_name = output_name(written)
                        if first is None:
                            check_first(shape, name)
                            first = (shape, name)
                        elif shape != first[0]:
                            raise click.ClickException(
                                f'images differ in size: {name} comes out {shape[1]}x{shape[0]}, {first[1]} '
                                f'{first[0][1]}x{first[0][0]}; use --resolution (and --transform) to make them equal')
                        out.write(arch_name, png)
                        if src.labels is not None:
                            labels.append([arch_name, src.labels[i]])
                        upscaled += int(was_upscaled)
                        if source_mode != settings.mode:
                            converted[source_mode] = converted.get(source_mode, 0) + 1
                        written += 1
                    bar.update(1)
                    if max_images is not None and written >= max_images:
                        break
            if written == 0:
                examples = '; '.join(f'{n_}: {r}' for n_, r in skipped[:3])
                raise click.ClickException(f'no image of {source} could be converted ({examples})')

            meta = {'labels': labels if src.labels is not None else None}
            if src.class_names is not None:
                meta['class_names'] = src.class_names  # Extra key; readers look only at 'labels'.
            out.write('dataset.json', json.dumps(meta).encode('utf-8'))
            if pool is not None:
                pool.terminate()  # Drop work queued beyond --max-images.
                pool = None
    except FileExistsError:
        raise click.ClickException(f'--dest {out.dest} appeared while converting; left it alone, wrote nothing') from None
    except OSError as err:  # Disk full, dest folder removed meanwhile, ...: nothing is published.
        raise click.ClickException(f'cannot write --dest {out.dest}: {err.strerror or err}; nothing was written') from None
    finally:
        if pool is not None:
            pool.terminate()
    if skipped:
        try:
            with atomic_write(out.dest + '.skipped.txt', 'w', encoding='utf-8', errors='backslashreplace') as f:
                f.write(''.join(f'{printable(n_)}\t{printable(r)}\n' for n_, r in skipped))
        except OSError as err:
            log(f'Warning: cannot write {out.dest}.skipped.txt ({err}); the dataset itself is complete')

    c = 1 if settings.mode == 'L' else 3
    log(f'Wrote {written} images ({first[0][1]}x{first[0][0]}x{c}, '
        f'{"labels: " + str(len(set(x[1] for x in labels))) + " classes" if src.labels is not None else "no labels"}) to {out.dest}')
    for note in src.notes:
        log(f'Note: {note}')
    if converted:
        log(f'Converted to {settings.mode}: ' + ', '.join(f'{v} {k}' for k, v in sorted(converted.items())))
    if upscaled:
        log(f'Upscaled {upscaled} images smaller than the target (--small=skip or --small=error to avoid)')
    if skipped:
        log(f'Skipped {len(skipped)} files (unreadable or too small), listed in {out.dest}.skipped.txt')
    return dict(written=written, skipped=skipped, upscaled=upscaled, converted=converted, mode=settings.mode,
                labels=src.labels is not None)

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--source', help='Input folder or file (see above)', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output folder, or .zip file; must not exist (an empty folder is fine)', metavar='PATH', type=str, required=True)
@click.option('--max-images', help='Write at most this many images (the first ones in order)', metavar='INT', type=click.IntRange(min=1))
@click.option('--transform', help='Crop/resize mode; needs --resolution', type=click.Choice(TRANSFORMS))
@click.option('--resolution', help='Output size, e.g. 256x256', metavar='WxH', type=str, callback=parse_resolution)
@click.option('--workers', help='Decode/resize processes; the output is the same for any value  '
              '[default: the number of CPUs, at most 8]', metavar='INT', type=click.IntRange(1, MAX_WORKERS))
@click.option('--strict', help='Refuse unreadable inputs instead of skipping them', is_flag=True)
@click.option('--small', help='Inputs smaller than the target  [default: skip for center-crop-wide, else upscale]',
              type=click.Choice(SMALL_POLICIES))
@click.option('--compress-level', help='PNG zlib level; 0 = uncompressed, fastest to decode in training', metavar='0-9',
              type=click.IntRange(0, 9), default=0, show_default=True)
def main(source, dest, max_images, transform, resolution, workers, strict, small, compress_level):
    """Convert images into a dataset folder or zip for train.py (EDM's format).

    \b
    --source path/                      all images under path/, recursively; labels from
                                        path/dataset.json, else from first-level folder
                                        names (sorted, ids 0, 1, ...), as for ImageNet train/
    --source images.zip                 all images in the zip, labels likewise
    --source cifar-10-python.tar.gz     CIFAR-10 training set (50k, labels)
    --source train-images-idx3-ubyte.gz MNIST (labels from train-labels-idx1-ubyte.gz),
                                        padded to 32x32
    --source samples.npz                ADM-style: arr_0 = NHWC uint8 images, arr_1 = labels

    \b
    --dest path/                        path/00000/img00000000.png, ..., path/dataset.json
    --dest dataset.zip                  the same inside an uncompressed zip

    Unreadable inputs are skipped and listed in DEST.skipped.txt (--strict refuses them).
    Images come out RGB, or grayscale if all inputs are grayscale.

    \b
    Examples:
    python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
    python dataset_tool.py --source=downloads/imagenet/train --dest=datasets/imagenet-256x256.zip \\
        --transform=center-crop-dhariwal --resolution=256x256
    """
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    convert(source, dest, max_images=max_images, transform=transform, resolution=resolution, workers=workers,
            strict=strict, small=small, compress_level=compress_level)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
