"""Reading the files of a dataset: image files -> uint8 arrays, dataset.json -> labels.

The one reader used by training (training/dataset.py), evaluation (metrics/activations.py, through
the dataset) and dataset_tool.py, so that a file gives the same pixels everywhere. No torch here:
dataset_tool's worker processes import this module.

Pixel rules, per PIL mode:
- 1, L, LA, RGB, RGBA: as stored (1 becomes 0/255).
- I;16 (any byte order) and I with values in 0..65535 (16-bit PNG/TIFF): the top 8 bits.
  PIL's own convert('L') would clip them instead (a 16-bit photo comes out almost all white).
- P and PA: the palette colours (through RGBA, so palette transparency needs no warning).
- CMYK, YCbCr, LAB, HSV: converted to RGB by PIL. 16-bit RGB(A) PNGs: PIL keeps the top 8 bits.
- F (floating point) and I outside 0..65535: refused; their intended range is unknown.
Images with more pixels than PIL.Image.MAX_IMAGE_PIXELS are refused before decoding (a tiny
file can claim a huge size: a decompression bomb).
"""

import json
import math
import struct
import warnings
import zlib

import numpy as np
import PIL.Image

try:
    import pyspng  # Optional: about twice as fast as PIL for PNG decoding.
except ImportError:
    pyspng = None


class DataFileError(ValueError):
    """An image or dataset.json that cannot be used; the message names the file."""
    def __init__(self, name, reason):
        super().__init__(f'{name}: {reason}')
        self.name = name
        self.reason = reason


GRAY16_MODES = {'I;16', 'I;16L', 'I;16B', 'I;16N'}
GRAY_MODES = {'1', 'L', 'I', 'F'} | GRAY16_MODES

# Largest class index + 1 a dataset.json may imply. One-hot labels of this size cost 400 kB per
# image; ImageNet-21k, the largest common class set, has 21,841 classes.
MAX_CLASSES = 100_000

# dataset.json may be at most this big: 1 MiB plus 64 KiB per image (room for long float label
# vectors), so a file cannot make us parse and hold far more than the dataset justifies.
JSON_BASE_BYTES = 1 << 20
JSON_BYTES_PER_IMAGE = 64 << 10

#----------------------------------------------------------------------------
# Images.

def natural_channels(mode):
    """Channels an image of this PIL mode gives when read without a target mode."""
    if mode in GRAY_MODES:
        return 1
    return {'LA': 2, 'La': 2, 'RGBA': 4, 'RGBa': 4}.get(mode, 3)


def _check_pixels(img, name):
    limit = PIL.Image.MAX_IMAGE_PIXELS
    w, h = img.size
    if limit is not None and w * h > limit:
        raise DataFileError(name, f'{w}x{h} is more than PIL.Image.MAX_IMAGE_PIXELS = {limit} pixels '
                            f'(a decompression bomb?); shrink it first')


def _to_8bit(img, name):
    """Any PIL mode -> an image in L, LA, RGB or RGBA."""
    mode = img.mode
    if mode in GRAY16_MODES or mode == 'I':
        arr = np.asarray(img)
        if mode == 'I' and arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataFileError(name, f'32-bit integer pixels outside 0..65535 ({arr.min()}..{arr.max()}); '
                                f'save it as an 8- or 16-bit image')
        return PIL.Image.fromarray((arr.astype(np.uint16) >> 8).astype(np.uint8), 'L')
    if mode == 'F':
        raise DataFileError(name, f'floating-point pixels (PIL mode F) have no known range; '
                            f'save it as an 8- or 16-bit image')
    if mode in ('L', 'LA', 'RGB', 'RGBA'):
        return img
    if mode == '1':
        return img.convert('L')
    if mode == 'La':
        return img.convert('LA')
    if mode in ('P', 'PA', 'RGBa'):
        rgba = img.convert('RGBA')
        return rgba if mode == 'RGBa' else rgba.convert('RGB')
    try:
        return img.convert('RGB')
    except ValueError as err:
        raise DataFileError(name, f'cannot convert PIL mode {mode} to RGB ({err})') from None


def to_array(img, name, mode=None):
    """Decoded PIL image -> uint8 array, HxW (L) or HxWxC.
    mode=None keeps the image's natural channels (1, 2, 3 or 4, see natural_channels);
    mode='L' or 'RGB' converts to that (alpha is dropped, as ADM's and EDM2's convert('RGB'))."""
    img = _to_8bit(img, name)
    if mode is not None and img.mode != mode:
        img = img.convert(mode)
    return np.asarray(img)


def _png_layout(head):
    """(width, height, bit depth, colour type) from a PNG's first 26 bytes, or None."""
    if len(head) < 26 or head[:8] != b'\x89PNG\r\n\x1a\n' or head[12:16] != b'IHDR':
        return None
    return int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big'), head[24], head[25]


def _decode_error(name, err):
    """DataFileError for an exception raised while opening or decoding an image."""
    if isinstance(err, DataFileError):
        return err
    if isinstance(err, PIL.Image.DecompressionBombError):
        return DataFileError(name, 'more pixels than PIL.Image.MAX_IMAGE_PIXELS (a decompression bomb?); shrink it first')
    if isinstance(err, PIL.UnidentifiedImageError):
        return DataFileError(name, 'not an image file that PIL can read')
    if isinstance(err, MemoryError):
        return DataFileError(name, 'out of memory while decoding it')
    reason = f'{err}'.replace('\n', ' ').replace('\t', ' ') or type(err).__name__
    return DataFileError(name, f'cannot decode it ({reason})')

# What PIL's decoders raise on damaged files.
_DECODE_ERRORS = (DataFileError, PIL.Image.DecompressionBombError, MemoryError, OSError, ValueError, EOFError,
                  SyntaxError, IndexError, TypeError, KeyError, struct.error, zlib.error)


def decode_image(f, name):
    """Open and fully decode the image in binary file object `f` with PIL (errors surface here,
    not later). Refuses more pixels than PIL.Image.MAX_IMAGE_PIXELS before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', PIL.Image.DecompressionBombWarning)  # We refuse those ourselves.
            img = PIL.Image.open(f)
            _check_pixels(img, name)
            img.load()
            return img
    except _DECODE_ERRORS as err:
        raise _decode_error(name, err) from None


def read_image(f, name, mode=None, use_pyspng=True):
    """Decode the image in binary file object `f` (named `name` in messages) into a uint8 array
    (see to_array). Any failure raises DataFileError with one line naming the file."""
    try:
        if use_pyspng and pyspng is not None and mode is None:
            # pyspng only for 8-bit gray, RGB, GA and RGBA PNGs, whose pixels it returns exactly
            # as PIL does; all else (palette, 16 bit, ...) goes through PIL's rules above.
            head = f.read(26)
            f.seek(0)
            layout = _png_layout(head)
            if layout is not None and layout[2] == 8 and layout[3] in (0, 2, 4, 6):
                limit = PIL.Image.MAX_IMAGE_PIXELS
                if limit is not None and layout[0] * layout[1] > limit:
                    raise DataFileError(name, f'{layout[0]}x{layout[1]} is more than PIL.Image.MAX_IMAGE_PIXELS = '
                                              f'{limit} pixels (a decompression bomb?); shrink it first')
                arr = pyspng.load(f.read())
                if arr.dtype == np.uint8:
                    return arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr
                f.seek(0)
        with decode_image(f, name) as img:
            return to_array(img, name, mode)
    except _DECODE_ERRORS as err:
        raise _decode_error(name, err) from None


def read_header(f, name):
    """(width, height, natural channels) from the header only (cheap)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(f) as img:
                _check_pixels(img, name)
                return img.size[0], img.size[1], natural_channels(img.mode)
    except _DECODE_ERRORS as err:
        raise _decode_error(name, err) from None

#----------------------------------------------------------------------------
# dataset.json.

def max_json_bytes(num_images):
    return JSON_BASE_BYTES + JSON_BYTES_PER_IMAGE * num_images


def read_json(f, name, num_images):
    """Parse dataset.json from binary file `f`, reading at most max_json_bytes(num_images)."""
    limit = max_json_bytes(num_images)
    data = f.read(limit + 1)
    if len(data) > limit:
        raise DataFileError(name, f'larger than {limit} bytes, more than {num_images} images can need; '
                            f'is it the right file?')
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:
        raise DataFileError(name, f'not valid JSON ({err}); expected {{"labels": [[file_name, label], ...]}} '
                                  f'or {{"labels": null}}') from None


def _entry_text(entry):
    text = json.dumps(entry, allow_nan=True)
    return text if len(text) <= 80 else text[:77] + '...'


def _parse_label(value):
    """One label -> int (class index) or tuple of floats; None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value == int(value) else None
    if isinstance(value, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        try:
            vector = tuple(float(x) for x in value)
        except OverflowError:
            return None
        return vector if all(math.isfinite(x) for x in vector) else None
    return None


def parse_labels(meta, name):
    """dataset.json contents -> None (no labels) or {file name: int class | tuple of floats}.
    Checks every entry once: [file name, label] pairs, no duplicate names, labels all class
    indices in 0..MAX_CLASSES-1 (integral floats such as 1.0 count) or all equal-length lists of
    finite numbers. Raises DataFileError naming the file and the entry."""
    if not isinstance(meta, dict):
        raise DataFileError(name, f'expected {{"labels": [[file_name, label], ...]}} or {{"labels": null}}')
    entries = meta.get('labels')
    if entries is None:
        return None
    if isinstance(entries, dict):  # {file: label}, accepted as EDM's dict() accepts it.
        entries = [[k, v] for k, v in entries.items()]
    if not isinstance(entries, list):
        raise DataFileError(name, f'"labels" must be a list of [file_name, label] pairs or null, '
                            f'got {type(entries).__name__}')
    table = {}
    kind = None  # 'class' or the vector length.
    for idx, entry in enumerate(entries):
        where = f'{name}: entry {idx} {_entry_text(entry)}'
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise DataFileError(where, f'expected [file_name, label]')
        fname, label = entry[0], _parse_label(entry[1])
        if label is None:
            raise DataFileError(where, f'a label must be a class index (integer >= 0) or a list of finite numbers')
        if isinstance(label, int) and not 0 <= label < MAX_CLASSES:
            raise DataFileError(where, f'class index must be in 0..{MAX_CLASSES - 1}')
        this_kind = 'class' if isinstance(label, int) else len(label)
        if kind is None:
            kind = this_kind
        elif this_kind != kind:
            first = 'class indices' if kind == 'class' else f'lists of {kind} numbers'
            raise DataFileError(where, f'earlier labels are {first}; all labels must be of one kind')
        if fname in table:
            raise DataFileError(where, f'{fname!r} is listed twice')
        table[fname] = label
    return table


def labels_array(table, image_names, name):
    """Labels of `image_names` in order: int64 [N] class indices or float32 [N, D]."""
    missing = [f for f in image_names if f not in table]
    if missing:
        raise DataFileError(name, f'no label for {missing[0]} ({len(missing)} images without labels)')
    values = [table[f] for f in image_names]
    if values and isinstance(values[0], int):
        return np.array(values, dtype=np.int64)
    return np.array(values, dtype=np.float32).reshape(len(values), -1)
