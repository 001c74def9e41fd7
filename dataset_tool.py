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
  same archive bytes, with any --workers (at most one per CPU; the workers import no torch).
- Sources are read without trusting them: CIFAR-10's pickles through the checkpoint reader's
  allow-list (nothing runs), and no source makes the tool allocate more than its bytes justify.
"""

import contextlib
import dataclasses
import gzip
import io
import json
import multiprocessing
import operator
import os
import re
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
from dnnlib import UserError
from training import data_files

#----------------------------------------------------------------------------
# Presets as data.

MAX_RESOLUTION = 8192  # Per side; 8192x8192x3 is 192 MiB per image, far beyond any diffusion training size.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # Fixed zip time stamp: same input => same archive bytes.
CIFAR10_MEMBERS = [f'cifar-10-batches-py/data_batch_{i}' for i in range(1, 6)]  # Training split, as EDM.
MAX_CIFAR10_BATCH_BYTES = 32 << 20  # A real batch pickle has 31,035,704 bytes.
MAX_IDX_BYTES = 1 << 30  # MNIST-format files hold tens of MB (EMNIST 550 MB); more is not such a file.

#----------------------------------------------------------------------------
# Options.

def parse_resolution(ctx, param, value):
    """'256x256' or '256,256' -> (256, 256); None stays None."""
    if value is None:
        return None
    m = re.fullmatch(r'\s*(\d+)\s*[x,]\s*(\d+)\s*', value)
    size = [int(g) if len(g.lstrip('0')) <= 6 else 10 ** 6 for g in m.groups()] if m else [0, 0]  # No 5000-digit ints.
    if 0 in size:
        raise click.BadParameter(f'expected WxH with positive integers, e.g. 256x256, got {value!r}')
    if max(size) > MAX_RESOLUTION:
        raise click.BadParameter(f'{size[0]}x{size[1]} is larger than {MAX_RESOLUTION} per side; '
                                 f'choose a training-size resolution such as 256x256')
    return tuple(size)

def check_options(transform, resolution, max_images, dest):
    (w, h), wide = resolution or (1, 1), transform == 'center-crop-wide'
    for bad, problem in [
        (max_images is not None and max_images < 1, '--max-images must be at least 1'),
        (not dest, '--dest must not be empty'),
        (transform is not None and resolution is None, f'--transform={transform} needs --resolution=WxH'),
        (wide and h > w, f'--transform=center-crop-wide needs H <= W in --resolution, got {w}x{h}'),
        (not wide and w != h, f'--resolution must be square (got {w}x{h}); only center-crop-wide takes W > H '
                              f'and pads the result to WxW'),
        (w & (w - 1), f'--resolution width must be a power of two (got {w}): the networks halve it at every level')]:
        if bad:
            raise UserError(problem)

def usable_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1

#----------------------------------------------------------------------------
# Sources. Each lists its items up front in a fixed order; the pixels are read later, in the
# workers, from `refs[i]` (a relative path, a zip member, an array or an index into the .npz),
# so order, names and labels never depend on timing or --workers.

@dataclasses.dataclass
class Source:
    kind: str               # 'folder', 'zip', 'cifar10', 'mnist', 'npz'
    path: str               # The --source argument.
    refs: object            # Per item: what the worker opens (see open_item).
    labels: list = None     # Per item class index, or None for an unlabelled dataset.
    class_names: list = None  # Class index -> folder name, when labels come from folders.
    mode: str = None        # Common PIL mode of all items if known without decoding.
    notes: list = dataclasses.field(default_factory=list)  # Lines for the final summary.

    def name(self, i):
        """The item's name in messages and the skip list."""
        return self.refs[i] if self.kind in ('folder', 'zip') else f'{os.path.basename(self.path)}[{i}]'

def class_labels(values, count, where):
    """A source's labels as class indices that training accepts, one per image."""
    try:
        labels = [operator.index(v) for v in values]
    except TypeError:
        labels = []
    if len(labels) != count or not all(0 <= v < data_files.MAX_CLASSES for v in labels):
        raise UserError(f'{where}: expected {count} labels, integers in 0..{data_files.MAX_CLASSES - 1}')
    return labels

def open_files(path):
    """A folder or zip of image files (hidden ones, FIFOs and devices left out). Labels come from
    its dataset.json, by the rules training reads it with, else from first-level folder names,
    sorted, over ALL listed files: ids depend neither on --max-images nor on which files turn out
    unreadable (ImageNet: n01440764 = 0, ...)."""
    kind, names = 'folder' if os.path.isdir(path) else 'zip', data_files.list_files(path)
    src = Source(kind=kind, path=path, refs=[n for n in names if data_files.is_image_name(n)])
    ignored = len(names) - len(src.refs) - int('dataset.json' in names)
    if ignored:
        src.notes.append(f'ignored {ignored} {"files" if kind == "folder" else "zip members"} without an image extension')
    if 'dataset.json' in names:
        where = os.path.join(path, 'dataset.json') if kind == 'folder' else f'{path}: dataset.json'
        with data_files.open_member(path, 'dataset.json', {}) as f:
            try:
                meta, table = data_files.read_dataset_json(f, where, len(src.refs))
            except data_files.DatasetError as err:
                raise UserError(f'{err.message}; fix or remove it') from None
        missing = sum(1 for n in src.refs if n not in (table or {}))
        if table is not None and missing:
            src.notes.append(f'dataset.json in the source has no label for {missing} images: writing no labels')
        elif table is not None:
            names = meta.get('class_names')
            src.labels = [table[n] for n in src.refs]
            src.class_names = names if isinstance(names, list) and all(isinstance(c, str) for c in names) else None
        return src
    tops = [n.split('/')[0] if '/' in n else None for n in src.refs]
    folders = sorted(set(tops) - {None})
    if len(folders) >= 2 and None in tops:
        src.notes.append(f'{tops.count(None)} images lie beside the class folders, not in one: writing no labels')
    elif len(folders) >= 2:  # One folder or none: nothing to tell apart (as EDM).
        index = {name: i for i, name in enumerate(folders)}
        src.labels, src.class_names = [index[t] for t in tops], folders
    return src

def open_cifar10(path):
    from torch_utils import checkpoint  # pylint: disable=import-outside-toplevel  Here only: workers import no torch.
    images, labels = [], []
    try:
        with tarfile.open(path, 'r:*') as tar:
            for member in CIFAR10_MEMBERS:
                info = tar.getmember(member)
                if not info.isfile() or info.size > MAX_CIFAR10_BATCH_BYTES:
                    raise ValueError(f'{member} is not a CIFAR-10 batch file ({info.size} bytes)')
                batch = checkpoint.read_pickle(io.BytesIO(tar.extractfile(info).read()), encoding='latin1')
                data = batch.get('data') if isinstance(batch, dict) else None
                if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)):
                    raise ValueError(f'{member}: expected a dict whose "data" is a uint8 array of shape [N, 3072]')
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # NCHW => NHWC
                labels.append((batch.get('labels'), len(data), f'{path}: {member}'))
    except Exception as err:  # pylint: disable=broad-except  Damaged tar or gzip, a pickle that is no batch: not CIFAR-10.
        raise UserError(f'cannot read CIFAR-10 tarball {path}: {type(err).__name__}: {err}') from None
    labels = [label for args in labels for label in class_labels(*args)]
    return Source(kind='cifar10', path=path, refs=np.concatenate(images), labels=labels, mode='RGB')

def read_idx(path, magic, ndim):
    """One MNIST IDX file: big-endian magic, ndim sizes, then uint8 data. Reads no more than the
    header declares (and at most MAX_IDX_BYTES), so a gzip bomb cannot fill memory."""
    with gzip.open(path, 'rb') as f:
        header = f.read(4 + 4 * ndim)
        found, *shape = struct.unpack(f'>{1 + ndim}I', header) if len(header) == 4 + 4 * ndim else [None]
        if found != magic:
            raise ValueError(f'{path} is not an MNIST IDX file')
        size = int(np.prod(shape, dtype=np.int64))
        if size > MAX_IDX_BYTES:
            raise ValueError(f'{path} declares {list(shape)} = {size} bytes of data, more than an MNIST-format file holds')
        data = f.read(size + 1)  # gzip reads in pieces: memory follows the data that is there, not the claim.
    if len(data) != size:
        raise ValueError(f'{path} is {"truncated" if len(data) < size else "longer than its header says"}: '
                         f'expected {size} bytes of data')
    return np.frombuffer(data, np.uint8).reshape(shape)

def open_mnist(path):
    labels_path = path.replace('-images-idx3-ubyte.gz', '-labels-idx1-ubyte.gz')
    images = read_idx(path, 0x803, 3)
    labels = read_idx(labels_path, 0x801, 1) if os.path.isfile(labels_path) else None
    src = Source(kind='mnist', path=path, refs=images, mode='L')
    if images.shape[1:] == (28, 28):
        src.refs = np.pad(images, [(0, 0), (2, 2), (2, 2)])  # 28 => 32 with black borders, as EDM.
    if labels is None:
        src.notes.append(f'no {os.path.basename(labels_path)} beside the images: writing no labels')
    else:
        src.labels = class_labels(labels, len(images), labels_path)
    return src

def open_npz(path):
    images, labels = data_files.NpyMember(path, 'arr_0'), None
    shape = images.shape
    if images.fortran:  # Its rows are not contiguous: reading one would read them all.
        raise ValueError('arr_0 is stored in Fortran order; save np.ascontiguousarray(x) instead')
    if images.dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3, 4)):
        raise UserError(f'{path}: arr_0 must be uint8 images shaped NHWC (C = 1, 3 or 4) or NHW, '
                        f'got {images.dtype} {list(shape)}')
    if 'arr_1' in data_files.npz_keys(path):  # Checked against the images' count, which must exist first.
        member = data_files.NpyMember(path, 'arr_1')
        if member.shape != shape[:1] or member.dtype.kind not in 'iu':
            raise ValueError(f'arr_1 must hold one integer label per image, got {member.dtype} {list(member.shape)}')
        labels = class_labels(member[:], shape[0], f'{path}: arr_1')
    mode = 'L' if len(shape) == 3 or shape[3] == 1 else {3: 'RGB', 4: 'RGBA'}[shape[3]]
    return Source(kind='npz', path=path, refs=range(shape[0]), mode=mode, labels=labels)

def open_source(path):
    cifar10 = (open_cifar10, 'CIFAR-10 tarball')  # Name ending (a folder: None) -> opener, and its kind in messages.
    kinds = {None: (open_files, 'folder'), '.zip': (open_files, 'zip file'), '.npz': (open_npz, 'ADM-style .npz'),
             '-images-idx3-ubyte.gz': (open_mnist, 'MNIST file'), '.tar.gz': cifar10, '.tgz': cifar10, '.tar': cifar10}
    if not os.path.isdir(path) and not os.path.isfile(path):
        raise UserError(f'--source {path}: no such file or folder')
    ending = None if os.path.isdir(path) else next((e for e in kinds if e and path.lower().endswith(e)), 'unknown')
    if ending not in kinds:
        raise UserError(f'--source {path}: unknown kind; expected a folder, a .zip of images, '
                        f'cifar-10-python.tar.gz, train-images-idx3-ubyte.gz or an ADM-style .npz')
    opener, what = kinds[ending]
    try:
        return opener(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, zlib.error) as err:  # Damaged or not of its kind.
        raise UserError(f'cannot read {what} {path}: {err}') from None

#----------------------------------------------------------------------------
# Transforms of uint8 HW or HWC arrays to a width x height target.

def scale(arr, width, height):
    # No transform: stretch to the target with LANCZOS (a same-size resize is a copy).
    return np.asarray(PIL.Image.fromarray(arr).resize((width, height), PIL.Image.Resampling.LANCZOS))

def center_crop(arr, width, height):
    # EDM: the largest centred square, then LANCZOS to the target.
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return scale(arr[top:top + side, left:left + side], width, height)

def center_crop_wide(arr, width, height):
    # EDM (for LSUN, e.g. 512x384): keep a centred band of rows, squeeze it to width x height,
    # and pad with black above and below to a width x width square.
    h, w = arr.shape[:2]
    band = round(width * h / w)
    top = (h - band) // 2
    canvas = np.zeros((width, width) + arr.shape[2:], dtype=np.uint8)
    canvas[(width - height) // 2:][:height] = scale(arr[top:top + band] if band <= h else arr, width, height)
    return canvas

def center_crop_dhariwal(arr, size, _height=None):
    # ADM (guided-diffusion center_crop_arr), the preprocessing of the ImageNet FID reference
    # batches: halve with BOX while the short side is at least twice the target (a cheap,
    # alias-free reduction), BICUBIC so the short side equals the target, then a centred crop.
    img = PIL.Image.fromarray(arr)
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), PIL.Image.Resampling.BOX)
    factor = size / min(img.size)
    arr = np.asarray(img.resize((round(img.size[0] * factor), round(img.size[1] * factor)), PIL.Image.Resampling.BICUBIC))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]

# --transform -> (its function; would a w x h input need upsampling to reach the W x H target?;
# what to do with such an input when --small is not given). The last is what EDM and ADM do: EDM's
# center-crop-wide drops such images, all other modes upsample them (ImageNet has a few images with
# a short side under 256, and ADM's crop upsamples them with BICUBIC).
TRANSFORMS = {None: (scale, lambda w, h, W, H: w < W or h < H, 'upscale'),
              'center-crop': (center_crop, lambda w, h, W, H: min(w, h) < max(W, H), 'upscale'),
              'center-crop-wide': (center_crop_wide, lambda w, h, W, H: w < W or round(W * h / w) < H, 'skip'),  # EDM's test.
              'center-crop-dhariwal': (center_crop_dhariwal, lambda w, h, W, H: min(w, h) < W, 'upscale')}

#----------------------------------------------------------------------------
# Worker side: open one item, convert its mode, transform, encode PNG. Runs in the main process
# with --workers=1 and in pool processes otherwise; the same function, so the same bytes.

_worker = {}  # Per process: the settings (convert's EasyDict), the source's open zip (open_member) or .npz.

def init_worker(settings):
    _worker.clear()
    _worker['settings'] = settings

def open_item(s, ref):
    """PIL image of one item, fully decoded (errors surface here, not later)."""
    if s.kind in ('folder', 'zip'):
        with data_files.open_member(s.path, ref, _worker) as f, data_files.open_image(f, ref) as img:
            img.load()
        return img
    if s.kind == 'npz':
        if 'npz' not in _worker:
            _worker['npz'] = data_files.NpyMember(s.path, 'arr_0')
        ref = _worker['npz'][ref:ref + 1][0]
    return PIL.Image.fromarray(ref[:, :, 0] if ref.ndim == 3 and ref.shape[2] == 1 else ref)

def process_item(item):
    """(name, ref) -> ('ok', name, png_bytes, shape, source_mode, upscaled) or ('skip', name, reason);
    raises UserError where --strict or --small=error refuse the item."""
    s, (name, ref) = _worker['settings'], item
    try:
        img = open_item(s, ref)
        # The pixel rules shared with training and evaluation (16-bit gray keeps its top 8 bits, ...).
        arr = data_files.to_array(img, name, s.mode)
    except Exception as err:  # pylint: disable=broad-except  Any decoder failure: "not a usable image".
        reason = (str(err) if isinstance(err, UserError) else f'{type(err).__name__}: {err}').removeprefix(f'{name}: ')
        if s.strict:
            raise UserError(f'cannot read {name}: {reason} (--strict; without it such files are skipped)') from None
        return ('skip', name, reason)
    transform, is_small, _ = TRANSFORMS[s.transform]
    upscaled = s.resolution is not None and is_small(*img.size, *s.resolution)
    if upscaled and s.small == 'error':
        raise UserError(f'{name} is {img.size[0]}x{img.size[1]}, smaller than the {s.resolution[0]}x{s.resolution[1]} '
                        f'target; pass --small=upscale or --small=skip')
    if upscaled and s.small == 'skip':
        return ('skip', name, f'smaller than the target: {img.size[0]}x{img.size[1]}')
    out = arr if s.resolution is None else transform(arr, *s.resolution)
    buf = io.BytesIO()
    PIL.Image.fromarray(out).save(buf, format='png', compress_level=s.compress_level, optimize=False)
    return ('ok', name, buf.getvalue(), out.shape, img.mode, upscaled)

def choose_mode(src, s):
    """'L' if every readable input is grayscale, else 'RGB'. Reads headers up to the first colour
    image: for typical photo datasets, one."""
    if src.mode is not None:
        return 'L' if data_files.natural_channels(src.mode) <= 2 else 'RGB'
    for ref in src.refs:
        try:
            with data_files.open_member(s.path, ref, _worker) as f:
                if data_files.read_header(f, ref)[2] > 2:
                    return 'RGB'
        except (data_files.DatasetError, OSError, EOFError, zipfile.BadZipFile, zlib.error):
            pass  # Unreadable: skipped (or refused) when converting.
    return 'L'

@contextlib.contextmanager
def results_of(settings, workers):
    """A function items -> iterator of process_item results in order, in this process
    (workers=1, with the settings convert gave init_worker) or in spawned worker processes."""
    if workers == 1:
        yield lambda items: map(process_item, items)
        return
    try:  # 'spawn': clean children, same behaviour on Linux, macOS and Windows.
        pool = multiprocessing.get_context('spawn').Pool(workers, initializer=init_worker, initargs=(settings,))
    except OSError as err:
        raise UserError(f'cannot start {workers} worker processes ({err}); give fewer --workers') from None
    with pool:  # Leaving terminates it, which also drops work queued beyond --max-images.
        yield lambda items: pool.imap(process_item, items, chunksize=8)

#----------------------------------------------------------------------------
# Destination: written under a temporary name (dnnlib.util.atomic_write), published only when
# complete, never over something that appeared meanwhile.

class Destination:
    def __init__(self, dest):
        self.dest = dest.rstrip('/\\') or dest
        self.is_zip = self.dest.lower().endswith('.zip')
        if os.path.isdir(self.dest) and (self.is_zip or os.listdir(self.dest)):
            raise UserError(f'--dest {dest} already exists and is not empty; choose a new name')
        if os.path.lexists(self.dest) and not os.path.isdir(self.dest):
            raise UserError(f'--dest {dest} already exists; choose a new name or remove it first')
        if os.path.lexists(self.dest + '.skipped.txt'):
            raise UserError(f'{self.dest}.skipped.txt already exists (from an earlier run?); remove it first')
        problem = dnnlib.util.folder_write_problem(os.path.dirname(os.path.abspath(self.dest)))
        if problem:
            raise UserError(f'cannot write --dest {dest}: {problem}; choose a writable location')

    @contextlib.contextmanager
    def opened(self):
        """The temporary output (atomic_write); it becomes dest when the block ends without error."""
        with dnnlib.util.atomic_write(self.dest, 'w+b', directory=not self.is_zip, overwrite=False) as self.target:
            with zipfile.ZipFile(self.target, 'w') if self.is_zip else contextlib.nullcontext() as self.zip:
                yield self

    def write(self, name, data):
        if self.is_zip:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
            info.external_attr = 0o644 << 16
            self.zip.writestr(info, data)
            return
        os.makedirs(os.path.join(self.target, os.path.dirname(name)), exist_ok=True)
        with open(os.path.join(self.target, name), 'wb') as f:
            f.write(data)

#----------------------------------------------------------------------------
# The conversion.

def take(tally, res, label, out):
    """Write a worker's ('ok', ...) result; the first image sets the size that all must have."""
    _, name, png, shape, source_mode, upscaled = res
    if tally.first is None:
        if shape[0] != shape[1] or shape[1] & (shape[1] - 1):
            raise UserError(f'{name}: images must come out square with a power-of-two size, this one is {shape[1]}x{shape[0]}; '
                            f'use --transform=center-crop --resolution=NxN with N a power of two')
        tally.first = (shape, name)
    elif shape != tally.first[0]:
        raise UserError(f'images differ in size: {name} comes out {shape[1]}x{shape[0]}, {tally.first[1]} '
                        f'{tally.first[0][1]}x{tally.first[0][0]}; use --resolution (and --transform) to make them equal')
    archive_name = f'{tally.written:08d}'[:5] + f'/img{tally.written:08d}.png'
    out.write(archive_name, png)
    tally.labels.append([archive_name, label])  # Written to dataset.json only if the source has labels.
    tally.upscaled += int(upscaled)
    if source_mode != out.mode:
        tally.converted[source_mode] = tally.converted.get(source_mode, 0) + 1
    tally.written += 1

def printable(text):
    """One line of text: tabs, newlines and other control characters escaped."""
    return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))

def report(src, out, tally, log):
    if tally.skipped:
        try:
            with dnnlib.util.atomic_write(out.dest + '.skipped.txt', 'w', encoding='utf-8', errors='backslashreplace') as f:
                f.write(''.join(f'{printable(n)}\t{printable(r)}\n' for n, r in tally.skipped))
        except OSError as err:
            log(f'Warning: cannot write {out.dest}.skipped.txt ({err}); the dataset itself is complete')
    (h, w), c = tally.first[0][:2], 1 if out.mode == 'L' else 3
    classes = f'labels: {len(set(label for _, label in tally.labels))} classes' if src.labels is not None else 'no labels'
    log(f'Wrote {tally.written} images ({w}x{h}x{c}, {classes}) to {out.dest}')
    for note in src.notes:
        log(f'Note: {note}')
    if tally.converted:
        log(f'Converted to {out.mode}: ' + ', '.join(f'{v} {k}' for k, v in sorted(tally.converted.items())))
    if tally.upscaled:
        log(f'Upscaled {tally.upscaled} images smaller than the target (--small=skip or --small=error to avoid)')
    if tally.skipped:
        log(f'Skipped {len(tally.skipped)} files (unreadable or too small), listed in {out.dest}.skipped.txt')

def convert(source, dest, max_images=None, transform=None, resolution=None, workers=1, strict=False,
            small=None, compress_level=0, log=None):
    """Convert `source` into `dest`; returns the tally (written, skipped, ...). Raises dnnlib.UserError on bad input."""
    log = log or (lambda msg: click.echo(msg, err=True))
    check_options(transform, resolution, max_images, dest)
    src = open_source(source)
    if len(src.refs) == 0:
        raise UserError(f'--source {source}: no images found')
    out = Destination(dest)  # Checks that dest is free before any work.
    parent, root = os.path.realpath(os.path.dirname(os.path.abspath(out.dest))), os.path.realpath(source)
    if src.kind == 'folder' and not out.is_zip and os.path.commonpath([parent, root]) == root:
        raise UserError(f'--dest {out.dest} is inside --source {source}: the next conversion of --source would take the '
                        f'dataset for input images; choose a --dest outside it')
    settings = dnnlib.EasyDict(kind=src.kind, path=src.path, transform=transform, resolution=resolution, strict=strict,
                               small=small or TRANSFORMS[transform][2], compress_level=compress_level)
    init_worker(settings)
    settings.mode = out.mode = choose_mode(src, settings)  # Fixed before any pixel work, from headers, in this process.
    if workers > usable_cpus():
        log(f'Note: --workers={workers} capped to the {usable_cpus()} CPUs here (more processes only cost memory)')
        workers = usable_cpus()
    log(f'Found {len(src.refs)} images in {source} ({src.kind}); writing {out.mode} images to {out.dest}')
    # labels: [archive name, label] per written image; skipped: (item name, reason); converted: source mode ->
    # images converted from it; first: (shape, item name) of the first written image, which all must match.
    tally = dnnlib.EasyDict(written=0, labels=[], skipped=[], upscaled=0, converted={}, first=None)
    total = len(src.refs) if max_images is None else min(len(src.refs), max_images)
    with results_of(settings, workers) as run:
        try:
            with out.opened(), tqdm(total=total, unit='img', desc='Converting', dynamic_ncols=True, file=sys.stderr) as bar:
                for i, res in enumerate(run((src.name(i), ref) for i, ref in enumerate(src.refs))):
                    if res[0] == 'skip':
                        tally.skipped.append(res[1:])
                    else:
                        take(tally, res, None if src.labels is None else src.labels[i], out)
                    bar.update(1)
                    if tally.written == max_images:
                        break
                if tally.written == 0:
                    examples = '; '.join(f'{n}: {r}' for n, r in tally.skipped[:3])
                    raise UserError(f'no image of {source} could be converted ({examples})')
                meta = {'labels': tally.labels if src.labels is not None else None}
                if src.class_names is not None:
                    meta['class_names'] = src.class_names  # Extra key; readers look only at 'labels'.
                out.write('dataset.json', json.dumps(meta).encode('utf-8'))
        except FileExistsError:
            raise UserError(f'--dest {out.dest} appeared while converting; left it alone, wrote nothing') from None
        except OSError as err:  # Disk full, dest folder removed meanwhile, ...: nothing is published.
            raise UserError(f'cannot write --dest {out.dest}: {err.strerror or err}; nothing was written') from None
    report(src, out, tally, log)
    return tally

#----------------------------------------------------------------------------

@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.option('--source', help='Input folder or file (see above)', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Output folder, or .zip file; must not exist (an empty folder is fine)', metavar='PATH',
              type=str, required=True)
@click.option('--max-images', help='Write at most this many images (the first ones in order)', metavar='INT',
              type=click.IntRange(min=1))
@click.option('--transform', help='Crop/resize mode; needs --resolution', type=click.Choice([t for t in TRANSFORMS if t]))
@click.option('--resolution', help='Output size, e.g. 256x256', metavar='WxH', type=str, callback=parse_resolution)
@click.option('--workers', help='Decode/resize processes, at most one per CPU (more are capped); the output is the '
              'same for any value  [default: the number of CPUs, at most 8]', metavar='INT', type=click.IntRange(min=1))
@click.option('--strict', help='Refuse unreadable inputs instead of skipping them', is_flag=True)
@click.option('--small', help='Inputs smaller than the target  [default: skip for center-crop-wide, else upscale]',
              type=click.Choice(['upscale', 'skip', 'error']))
@click.option('--compress-level', help='PNG zlib level; 0 = uncompressed, fastest to decode in training', metavar='0-9',
              type=click.IntRange(0, 9), default=0, show_default=True)
def main(workers, **kwargs):
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
    convert(workers=workers if workers is not None else min(8, usable_cpus()), **kwargs)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
