"""Reading the files of a dataset: image files -> uint8 arrays, dataset.json -> labels, arrays of
an .npz (ADM sample batches, activation and statistics files) -> rows.

The one reader used by training (training/dataset.py), evaluation (metrics/activations.py) and
dataset_tool.py, so that a file gives the same pixels everywhere. No torch here: dataset_tool's
worker processes import this module.

Pixel rules, per PIL mode:
- 1, L, LA, RGB, RGBA: as stored (1 becomes 0/255).
- I;16 (any byte order) and I with values in 0..65535 (16-bit PNG/TIFF): the top 8 bits.
  PIL's own convert('L') would clip them instead (a 16-bit photo comes out almost all white).
- P and PA: the palette colours (through RGBA, so palette transparency needs no warning).
- CMYK, YCbCr, LAB, HSV: converted to RGB by PIL. 16-bit RGB(A) PNGs: PIL keeps the top 8 bits.
- F (floating point) and I outside 0..65535: refused; their intended range is unknown.

What a file may cost is decided by its pixels, not by what it claims or carries: more pixels
than PIL.Image.MAX_IMAGE_PIXELS are refused before decoding, and no more of a file is read than
METADATA_BYTES before its pixels and METADATA_BYTES + BYTES_PER_PIXEL per pixel in all (PIL keeps
PNG chunks it does not know whole: a 16x16 PNG in a zip can carry gigabytes of deflated padding).
"""

import contextlib
import io
import json
import math
import os
import struct
import warnings
import zipfile
import zlib

import numpy as np
import PIL.Image

import dnnlib

try:
    import pyspng  # Optional: decodes uncompressed PNGs (dataset_tool's default) 5-6x faster than PIL.
except ImportError:
    pyspng = None


class DatasetError(dnnlib.UserError):
    """An image file, a dataset.json or a dataset that cannot be used; the message names the file.
    dataset_tool skips the images that raise it; train.py and evaluate.py stop with its line."""


GRAY16_MODES = {'I;16', 'I;16L', 'I;16B', 'I;16N'}
GRAY_MODES = {'1', 'L', 'I', 'F'} | GRAY16_MODES

# Largest class index + 1 a label may imply. One-hot labels of this size cost 400 kB per image;
# ImageNet-21k, the largest common class set, has 21,841 classes.
MAX_CLASSES = 100_000

# Read budget of an image file: ICC profiles, EXIF and XMP fit in METADATA_BYTES; 16 bytes per
# pixel is twice 16-bit RGBA, room for encodings that expand incompressible pixels.
METADATA_BYTES = 16 << 20
BYTES_PER_PIXEL = 16

# dataset.json may be at most 1 MiB plus 64 KiB per image (room for long float label vectors).
JSON_BASE_BYTES = 1 << 20
JSON_BYTES_PER_IMAGE = 64 << 10

#----------------------------------------------------------------------------
# Listing.

def _visible(rel):
    return not any(part.startswith('.') or part == '__MACOSX' for part in rel.split('/'))


def _raise(err):
    raise err


def list_files(path):
    """Sorted relative names ('a/b.png') of the files in folder or zip `path`: regular files only
    (links followed, loops cut; no FIFOs or devices, which would block or never end), no hidden
    names (.DS_Store, macOS '._x.jpg' shadows, __MACOSX). A repeated zip member is one file."""
    if not os.path.isdir(path):
        with zipfile.ZipFile(path) as z:
            return sorted({i.filename for i in z.infolist() if not i.is_dir() and _visible(i.filename)})
    found, seen = [], set()
    for folder, dirs, files in os.walk(path, onerror=_raise, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # A link back to a folder already listed: a loop.
            dirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if _visible(d)]
        found += [os.path.relpath(os.path.join(folder, f), path).replace(os.sep, '/') for f in files
                  if _visible(f) and os.path.isfile(os.path.join(folder, f))]
    return sorted(found)


def open_member(path, name, opened):
    """Binary file `name` ('a/b.png') of folder or zip `path`. The zip is opened once per process and
    kept in dict `opened`: a forked worker must not read through its parent's zip handle, whose file
    position both processes would move (corrupt reads, "Bad CRC-32")."""
    if os.path.isdir(path):
        return open(os.path.join(path, name), 'rb')
    if opened.get('pid') != os.getpid():
        opened.update(pid=os.getpid(), zip=zipfile.ZipFile(path))
    return opened['zip'].open(name)


def is_image_name(name):
    PIL.Image.init()
    return os.path.splitext(name)[1].lower() in PIL.Image.EXTENSION

#----------------------------------------------------------------------------
# Images.

class _Budget(io.RawIOBase):
    """Read-only view of binary file `f` that refuses to read past `limit` bytes (PIL reads
    through read(), seek() and tell(); readline() and the like come from io.RawIOBase)."""

    def __init__(self, f, name, limit, what):
        super().__init__()
        self.f, self.name, self.limit, self.what = f, name, limit, what

    def seek(self, pos, whence=io.SEEK_SET):
        return self.f.seek(pos, whence)

    def tell(self):
        return self.f.tell()

    def read(self, size=-1):
        room = self.limit - self.f.tell()
        data = self.f.read(room + 1 if size is None or size < 0 else min(size, room + 1))
        if len(data) > room:
            raise DatasetError(f'{self.name}: more than {self.limit} bytes {self.what}; '
                               f'an image needs far less (padding or hidden data?), re-save it')
        return data


def _check_pixels(w, h, name):
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit is not None and w * h > limit:
        raise DatasetError(f'{name}: {w}x{h} is more than PIL.Image.MAX_IMAGE_PIXELS = {limit} pixels '
                           f'(a decompression bomb?); shrink it first')


def natural_channels(mode):
    """Channels an image of this PIL mode gives when read without a target mode."""
    return 1 if mode in GRAY_MODES else {'LA': 2, 'La': 2, 'RGBA': 4, 'RGBa': 4}.get(mode, 3)


def to_array(img, name, mode=None):
    """Decoded PIL image -> uint8 array, HxW (L) or HxWxC, by the pixel rules above.
    mode=None keeps the image's natural channels (1, 2, 3 or 4, see natural_channels);
    mode='L' or 'RGB' converts to that (alpha is dropped, as ADM's and EDM2's convert('RGB'))."""
    if img.mode in GRAY16_MODES or img.mode == 'I':
        arr = np.asarray(img)
        if img.mode == 'I' and arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DatasetError(f'{name}: 32-bit integer pixels outside 0..65535 ({arr.min()}..{arr.max()}); '
                               f'save it as an 8- or 16-bit image')
        img = PIL.Image.fromarray((arr.astype(np.uint16) >> 8).astype(np.uint8), 'L')
    elif img.mode == 'F':
        raise DatasetError(f'{name}: floating-point pixels (PIL mode F) have no known range; '
                           f'save it as an 8- or 16-bit image')
    elif img.mode in ('P', 'PA', 'RGBa'):
        img = img.convert('RGBA') if img.mode == 'RGBa' else img.convert('RGBA').convert('RGB')
    elif img.mode not in ('L', 'LA', 'RGB', 'RGBA'):
        img = img.convert({'1': 'L', 'La': 'LA'}.get(img.mode, 'RGB'))
    if mode is not None and img.mode != mode:
        img = img.convert(mode)
    return np.asarray(img)


# What PIL's decoders raise on damaged files (our own DatasetError passes through as it is).
_DECODE_ERRORS = (PIL.Image.DecompressionBombError, MemoryError, OSError, ValueError, EOFError,
                  SyntaxError, IndexError, TypeError, KeyError, struct.error, zlib.error)
_DECODE_REASONS = {
    PIL.Image.DecompressionBombError: 'more pixels than PIL.Image.MAX_IMAGE_PIXELS (a decompression bomb?); shrink it first',
    PIL.UnidentifiedImageError: 'not an image file that PIL can read', MemoryError: 'out of memory while decoding it'}


@contextlib.contextmanager
def open_image(f, name):
    """PIL image of binary file `f`, its header read within METADATA_BYTES, its pixels readable
    within the budget of its size. Whatever opening or decoding it in the block raises becomes one
    DatasetError line naming `name`."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', PIL.Image.DecompressionBombWarning)  # We refuse those ourselves.
        try:
            f = _Budget(f, name, METADATA_BYTES, 'before its pixel data')
            img = PIL.Image.open(f)
            w, h = img.size
            _check_pixels(w, h, name)
            f.limit, f.what = METADATA_BYTES + BYTES_PER_PIXEL * w * h, f'for {w}x{h} pixels'
            yield img
        except _DECODE_ERRORS as err:
            reason = _DECODE_REASONS.get(type(err)) or f'cannot decode it ({" ".join(str(err).split()) or type(err).__name__})'
            raise DatasetError(f'{name}: {reason}') from None


def read_header(f, name):
    """(width, height, natural channels) from the header only (cheap)."""
    with open_image(f, name) as img:
        return img.size[0], img.size[1], natural_channels(img.mode)


def read_image(f, name, mode=None, use_pyspng=True):
    """Decode the image in binary file object `f` (named `name` in messages) into a uint8 array
    (see to_array). Any failure raises DatasetError with one line naming the file."""
    with open_image(f, name) as img:
        # An 8-bit gray, GA, RGB or RGBA PNG (PIL's raw mode says the bit depth): pyspng gives PIL's
        # pixels. What it cannot decode (damage; GA in pyspng 0.1) and files beyond the budget, PIL
        # decides: it stops reading at the image's end.
        if use_pyspng and pyspng is not None and mode is None and img.format == 'PNG' \
                and img.tile[0][3] in ('L', 'LA', 'RGB', 'RGBA'):
            img.fp.seek(0)  # The budgeted view of `f` that open_image gave PIL.
            with contextlib.suppress(RuntimeError, DatasetError):
                arr = pyspng.load(img.fp.read())
                return arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr
        return to_array(img, name, mode)

#----------------------------------------------------------------------------
# dataset.json.

def _parse_label(value):
    """One label -> int (class index) or tuple of floats; None when it is neither."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    if isinstance(value, list) and all(type(x) in (int, float) for x in value):  # Not bool, a subclass of int.
        with contextlib.suppress(OverflowError):  # float() of an integer beyond 1e308.
            vector = tuple(float(x) for x in value)
            return vector if all(math.isfinite(x) for x in vector) else None
    return value if type(value) is int else None


def read_dataset_json(f, name, num_images):
    """dataset.json from binary file `f`, reading at most what `num_images` can need -> (its contents,
    None (no labels) or {file name: int class | tuple of floats}). Checks every entry once: [file
    name, label] pairs, no duplicate names, labels all class indices in 0..MAX_CLASSES-1 (integral
    floats such as 1.0 count) or all equal-length lists of finite numbers. Raises DatasetError
    naming the file and the entry."""
    limit = JSON_BASE_BYTES + JSON_BYTES_PER_IMAGE * num_images
    data = f.read(limit + 1)
    if len(data) > limit:
        raise DatasetError(f'{name}: larger than {limit} bytes, more than {num_images} images can need; '
                           f'is it the right file?')
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise DatasetError(f'{name}: not valid JSON ({err}); expected {{"labels": [[file_name, label], ...]}} '
                           f'or {{"labels": null}}') from None
    if not isinstance(meta, dict):
        raise DatasetError(f'{name}: expected {{"labels": [[file_name, label], ...]}} or {{"labels": null}}')
    entries = meta.get('labels')
    if entries is None:
        return meta, None
    if isinstance(entries, dict):  # {file: label}, accepted as EDM's dict() accepts it.
        entries = [[k, v] for k, v in entries.items()]
    if not isinstance(entries, list):
        raise DatasetError(f'{name}: "labels" must be a list of [file_name, label] pairs or null, '
                           f'got {type(entries).__name__}')
    table, kind = {}, None  # kind: 'class' or the vector length, of the first label.
    for idx, entry in enumerate(entries):
        text = json.dumps(entry, allow_nan=True)
        where = f'{name}: entry {idx} {text if len(text) <= 80 else text[:77] + "..."}'
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise DatasetError(f'{where}: expected [file_name, label]')
        fname, label = entry[0], _parse_label(entry[1])
        if label is None:
            raise DatasetError(f'{where}: a label must be a class index (integer >= 0) or a list of finite numbers')
        if isinstance(label, int) and not 0 <= label < MAX_CLASSES:
            raise DatasetError(f'{where}: class index must be in 0..{MAX_CLASSES - 1}')
        this_kind = 'class' if isinstance(label, int) else len(label)
        kind = this_kind if kind is None else kind
        if this_kind != kind:
            first = 'class indices' if kind == 'class' else f'lists of {kind} numbers'
            raise DatasetError(f'{where}: earlier labels are {first}; all labels must be of one kind')
        if fname in table:
            raise DatasetError(f'{where}: {fname!r} is listed twice')
        table[fname] = label
    return meta, table


def read_labels(f, name, image_names):
    """Labels of `image_names` in order from the dataset.json in binary file `f`: int64 [N] class
    indices or float32 [N, D], or None where it says {"labels": null}."""
    table = read_dataset_json(f, name, len(image_names))[1]
    if table is None:
        return None
    missing = [f for f in image_names if f not in table]
    if missing:
        raise DatasetError(f'{name}: no label for {missing[0]} ({len(missing)} images without labels)')
    values = [table[f] for f in image_names]
    if values and isinstance(values[0], int):
        return np.array(values, dtype=np.int64)
    return np.array(values, dtype=np.float32).reshape(len(values), -1)

#----------------------------------------------------------------------------
# Arrays of .npz files, read by rows.

MAX_DEFLATE_RATIO = 1032  # Deflate expands its input at most about this many times.


def npz_keys(path):
    """Names of the arrays in the .npz at `path`."""
    with zipfile.ZipFile(path) as z:
        return {name[:-4] for name in z.namelist() if name.endswith('.npy')}


class NpyMember:
    """One array of an .npz, read by rows without the rest (50k ImageNet-256 samples are 10 GB).
    Its header must claim exactly the bytes the member holds, and a deflated member holds at most
    MAX_DEFLATE_RATIO times its compressed size: a small file can make us allocate neither what its
    header claims nor gigabytes of zeros. A stored member is memory-mapped, a deflated one
    decompressed only as far as the rows read (a Fortran-ordered one whole, once). Rows come back
    in native byte order."""

    def __init__(self, path, key):
        self.path, self.key, self._data = path, key, None
        with zipfile.ZipFile(path) as z, z.open(f'{key}.npy') as f:
            info = z.getinfo(f'{key}.npy')
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f'{key}: unsupported .npy format version {version}')
            self.shape, self.fortran, self.dtype = getattr(np.lib.format, f'read_array_header_{version[0]}_0')(f)
            self.offset = f.tell()
        if self.dtype.hasobject or self.dtype.itemsize == 0:
            raise ValueError(f'{key} holds {self.dtype}, not numbers')
        stored = info.compress_type == zipfile.ZIP_STORED
        holds = info.file_size if stored else min(info.file_size, MAX_DEFLATE_RATIO * info.compress_size)
        need = math.prod(self.shape) * self.dtype.itemsize
        if self.offset + need != holds:
            raise ValueError(f'{key}: its header claims shape {list(self.shape)} of {self.dtype} ({need:,} bytes), but the '
                             f'member holds {max(holds - self.offset, 0):,} bytes (truncated or forged)')
        self.stored = stored and need > 0 and len(self.shape) > 0
        self.header_offset = info.header_offset

    def __len__(self):
        return self.shape[0] if self.shape else 1

    def _open(self):
        if self.stored:  # The bytes sit unchanged in the file: map them.
            with open(self.path, 'rb') as f:
                f.seek(self.header_offset)
                local = f.read(30)  # The member's local header, then its name and extra field.
            start = self.header_offset + 30 + int.from_bytes(local[26:28], 'little') + int.from_bytes(local[28:30], 'little')
            return np.memmap(self.path, dtype=self.dtype, mode='r', offset=start + self.offset, shape=self.shape,
                             order='F' if self.fortran else 'C')
        f = zipfile.ZipFile(self.path).open(f'{self.key}.npy')
        if self.fortran or len(self.shape) == 0 or 0 in self.shape:  # Rows not contiguous, or none: whole, once.
            return np.lib.format.read_array(f, allow_pickle=False)
        return f

    def __getitem__(self, rows):
        """The rows of a slice (step 1), as numpy slices them, in a writable array in native byte order."""
        start, stop, _ = rows.indices(len(self))
        stop = max(start, stop)
        if self._data is None:
            self._data = self._open()
        if isinstance(self._data, np.ndarray):
            out = self._data[start:stop] if self.shape else self._data
        else:
            row = math.prod(self.shape[1:]) * self.dtype.itemsize
            self._data.seek(self.offset + start * row)
            out = np.frombuffer(self._data.read((stop - start) * row), dtype=self.dtype).reshape(stop - start, *self.shape[1:])
        return np.array(out, dtype=self.dtype.newbyteorder('='))

    def __getstate__(self):  # DataLoader workers open the file again.
        return dict(self.__dict__, _data=None)
