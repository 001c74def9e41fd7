"""Activation extraction and the files it reads and writes.

Image sources (`open_images`): a folder of images (searched recursively) or a dataset zip, read
through training.dataset.ImageFolderDataset in its sorted file order as the reference does; or
an ADM-style .npz whose `arr_0` is uint8 [N, H, W, C] (memory-mapped when stored uncompressed).

Files:
  activations   feat [N, 2048], s_feat [N, 2023], logits [N, 1008], float32, in dataset order.
                feat/s_feat are the reference's keys; its own files (float64, no logits) load too.
                s_feat rows are in (C, H, W) order as the reference's detector hook gives them.
                logits = feat @ W^T of the detector's classifier, without bias (ADM's IS inputs).
                dinov2 [N, 1024] (float32): DINOv2 ViT-L/14 CLS features for FD-DINOv2, when asked for.
  statistics    mu, sigma, mu_s, sigma_s (float64), ADM's reference-batch keys. mu_s/sigma_s are
                in ADM's (H, W, C) order, so ADM reference batches and our files mix freely;
                statistics computed from s_feat are permuted to that order. mu_dinov2/sigma_dinov2
                are those of the DINOv2 features.
"""

import math
import os
import zipfile

import numpy as np
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist

from .frechet import StatsAccumulator

SPATIAL_CHANNELS = 7

# Per-image feature key -> its statistics keys in statistics files.
STATS_KEYS = {'feat': ('mu', 'sigma'), 's_feat': ('mu_s', 'sigma_s'), 'dinov2': ('mu_dinov2', 'sigma_dinov2')}
INCEPTION_KEYS = ('feat', 's_feat', 'logits')

#----------------------------------------------------------------------------
# Spatial feature layouts.

def spatial_chw_to_hwc_index(dim, channels=SPATIAL_CHANNELS):
    """Index that reorders a (C, H, W)-flattened s_feat vector into ADM's (H, W, C) order."""
    if dim % channels != 0:
        raise ValueError(f's_feat has {dim} values, not a multiple of {channels} channels')
    return np.arange(dim).reshape(channels, dim // channels).T.reshape(-1)


def spatial_stats_to_hwc(mu, sigma):
    idx = spatial_chw_to_hwc_index(mu.shape[0])
    return mu[idx], sigma[idx][:, idx]

#----------------------------------------------------------------------------
# Image sources.

def _npy_header_by_loading(path):
    with np.load(path, allow_pickle=False, mmap_mode=None) as data:
        arr = data['arr_0']
        return arr.shape, False, arr.dtype


class _NpzImages(torch.utils.data.Dataset):
    def __init__(self, path):
        self.path = path
        try:
            with zipfile.ZipFile(path) as z:
                if 'arr_0.npy' not in z.namelist():
                    raise dnnlib.UserError(f'{path}: no arr_0 in the .npz (expected ADM-style uint8 images [N, H, W, C])')
                info = z.getinfo('arr_0.npy')
                stored = info.compress_type == zipfile.ZIP_STORED
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    else:  # Newer .npy versions: no mapping, plain load below.
                        shape, fortran, dtype = _npy_header_by_loading(path)
                        stored = False
                    header_len = f.tell()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise dnnlib.UserError(f'{path}: cannot read .npz ({err})') from None
        if len(shape) != 4 or shape[3] not in (1, 3) or dtype != np.uint8:
            raise dnnlib.UserError(f'{path}: arr_0 is {dtype} {list(shape)}; expected uint8 [N, H, W, 1 or 3]')
        self.shape = shape
        try:
            if stored and not fortran:
                # The member's bytes sit unmodified in the zip: map them instead of loading GBs.
                with open(path, 'rb') as f:
                    f.seek(info.header_offset)
                    local = f.read(30)
                    name_len = int.from_bytes(local[26:28], 'little')
                    extra_len = int.from_bytes(local[28:30], 'little')
                offset = info.header_offset + 30 + name_len + extra_len + header_len
                self.images = np.memmap(path, dtype=np.uint8, mode='r', offset=offset, shape=tuple(shape))
            else:
                with np.load(path, allow_pickle=False) as data:
                    self.images = data['arr_0']
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise dnnlib.UserError(f'{path}: cannot read arr_0 ({err}); is the file complete?') from None

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, idx):
        return np.ascontiguousarray(self.images[idx].transpose(2, 0, 1))

    def __getstate__(self):  # DataLoader workers re-map the file.
        return dict(self.__dict__, images=None) if isinstance(self.images, np.memmap) else self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.images is None:
            self.__init__(self.path)


class _FolderImages(torch.utils.data.Dataset):
    def __init__(self, path):
        from training.dataset import ImageFolderDataset, DatasetError
        try:
            self.dataset = ImageFolderDataset(path=path)
        except DatasetError as err:
            raise dnnlib.UserError(str(err)) from None
        self.shape = [len(self.dataset)] + self.dataset.image_shape[1:] + self.dataset.image_shape[:1]

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        return self.dataset[idx][0]


def open_images(path):
    """Dataset of uint8 CHW images from a folder, a zip, or an ADM-style .npz."""
    if os.path.isfile(path) and path.lower().endswith('.npz'):
        source = _NpzImages(path)
    elif os.path.isdir(path) or (os.path.isfile(path) and path.lower().endswith('.zip')):
        source = _FolderImages(path)
    elif not os.path.exists(path):
        raise dnnlib.UserError(f'{path}: no such file or folder')
    else:
        raise dnnlib.UserError(f'{path}: expected a folder of images, a .zip dataset or an ADM-style .npz')
    if source.shape[3] not in (1, 3):
        raise dnnlib.UserError(f'{path}: images have {source.shape[3]} channels; the detector needs 1 (gray) or 3 (RGB)')
    return source

#----------------------------------------------------------------------------
# Sharded extraction.

class Detectors:
    """Several detectors on the same batches (Inception and DINOv2): their outputs merged."""

    def __init__(self, detectors):
        self.detectors = list(detectors)

    @property
    def device(self):
        return self.detectors[0].device

    def __call__(self, images):
        out = dict()
        for det in self.detectors:
            out.update(det(images))
        return out


def compute_activations(source, detector, batch_size=64, num_workers=3, stats_only=False,
                        progress=True, keys=INCEPTION_KEYS):
    """Run the detector over `source` sharded across the torchrun processes.

    Returns on rank 0 a dict of float32 arrays in dataset order (or, with stats_only, of float64
    statistics mu/sigma/mu_s/sigma_s, and mu_dinov2/sigma_dinov2 when `keys` has dinov2); other
    ranks return None. Collective: call on every rank.
    """
    num_items = len(source)
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = dist.split_batches(num_items, batch_size, world)
    loader = torch.utils.data.DataLoader(source, batch_sampler=[b.tolist() for b in batches[rank::world] if len(b)],
                                         num_workers=num_workers, prefetch_factor=(2 if num_workers > 0 else None))
    bar = tqdm.tqdm(total=num_items, unit='img', disable=(not progress or rank != 0), dynamic_ncols=True)

    device = detector.device
    outputs = {k: [] for k in keys}
    accs = dict()
    hwc_index = None
    error = None
    try:
        for step, images in enumerate(loader):
            out = detector(torch.as_tensor(images))
            if stats_only:
                if not accs:
                    accs = _stats_accumulators(out, keys, device)
                    if 's_feat' in accs:
                        hwc_index = torch.from_numpy(spatial_chw_to_hwc_index(out['s_feat'].shape[1])).to(device)
                for k, acc in accs.items():
                    acc.update(out[k][:, hwc_index] if k == 's_feat' else out[k])
            else:
                for k in keys:
                    outputs[k].append(out[k].cpu())
            bar.update(sum(map(len, batches[:(step + 1) * world])) - bar.n)
        bar.update(num_items - bar.n)
    except Exception as err:  # pylint: disable=broad-exception-caught
        error = err  # Re-raised below, after telling the other processes not to wait for us.
    finally:
        bar.close()
    if not dist.all_ok(error is None):
        raise error if error is not None else dnnlib.UserError('another process failed; see its message')
    if stats_only:
        return _finalize_stats(accs, detector, keys)
    mine = [b for b in batches[rank::world] if len(b)]
    return gather_rows(outputs, torch.cat(mine) if mine else torch.zeros([0], dtype=torch.int64), num_items, device)


def _stats_accumulators(out, keys, device):
    return {k: StatsAccumulator(out[k].shape[1], device) for k in STATS_KEYS if k in keys}


def _finalize_stats(accs, detector, keys):
    # A rank without images still takes part in the reductions (with zero counts).
    if not accs:
        probe = detector(torch.zeros([1, 3, 32, 32], dtype=torch.uint8))
        accs = _stats_accumulators(probe, keys, detector.device)
    result = dict()
    for k, acc in accs.items():
        mu_key, sigma_key = STATS_KEYS[k]
        result[mu_key], result[sigma_key] = acc.finalize()
    return result if dist.get_rank() == 0 else None


def _gather0(tensor):
    """The tensors of all ranks, concatenated, on rank 0 (None elsewhere); collective."""
    if dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
    torch.distributed.gather(tensor, gather_list=parts, dst=0)
    return torch.cat(parts).cpu() if parts is not None else None


def gather_rows(outputs, indices, num_items, device, chunk_rows=4096):
    """Every rank's rows on rank 0, in item order: outputs[key] is a list of this rank's [rows, D]
    tensors for the items `indices` (in that order). Returns {key: float32 [num_items, D]} on
    rank 0, None elsewhere. Collective."""
    keys = list(outputs)
    local = [torch.cat(outputs[k]).to(torch.float32) if outputs[k] else None for k in keys]
    widths = torch.tensor([x.shape[1] if x is not None else 0 for x in local], device=device)
    counts = torch.tensor([len(indices)], device=device)
    if dist.get_world_size() > 1:  # Widths from a rank that has rows, and the largest row count.
        torch.distributed.all_reduce(widths, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
    rows = torch.zeros([int(counts), int(widths.sum())], dtype=torch.float32)
    where = torch.full([int(counts)], -1, dtype=torch.int64)  # -1: padding.
    if len(indices):
        rows[:len(indices)], where[:len(indices)] = torch.cat(local, dim=1), indices
    where = _gather0(where.to(device))
    result = np.zeros([num_items, int(widths.sum())], dtype=np.float32)
    for r0 in range(0, len(rows), chunk_rows):
        part = _gather0(rows[r0:r0 + chunk_rows].to(device))
        if part is not None:
            idx = where.reshape(dist.get_world_size(), -1)[:, r0:r0 + chunk_rows].reshape(-1)
            result[idx[idx >= 0].numpy()] = part.cpu()[idx >= 0].numpy()
    if dist.get_rank() != 0:
        return None
    return dict(zip(keys, np.split(result, np.cumsum(widths.tolist())[:-1], axis=1)))

#----------------------------------------------------------------------------
# Feature sets for the metrics: an .npz file, or arrays in memory.

class FeatureSet:
    """Named arrays of one set of images, as the metrics read them: per-image activations
    (feat/s_feat/logits/dinov2), statistics (mu/sigma/mu_s/sigma_s/...) or an ADM reference batch
    (statistics + arr_0 images). `source`: a dict of arrays, or the path or URL of an .npz whose
    members are read when asked for."""

    def __init__(self, source, name='the samples'):
        self.path, self._npz = name, None
        if isinstance(source, dict):
            self.arrays = source
            self.keys = set(source)
            return
        self.path = source
        try:
            local = dnnlib.util.open_url(source, return_filename=True, verbose=False)
            if not zipfile.is_zipfile(local):
                raise ValueError('not an .npz (zip) archive')
            self._npz = np.load(local, allow_pickle=False)
            self.keys = set(self._npz.files)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise dnnlib.UserError(f'{source}: cannot read as .npz ({err})') from None

    def has(self, *keys):
        return all(k in self.keys for k in keys)

    def _check_size(self, key):
        # numpy allocates what a member's header claims before reading it: a tiny file could
        # claim terabytes. The claim must match the bytes the member holds.
        info = self._npz.zip.getinfo(key + '.npy')
        with self._npz.zip.open(info) as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f'unsupported .npy format version {version}')
            shape, _fortran, dtype = read_header(f)
            need = math.prod(shape) * dtype.itemsize
            if f.tell() + need != info.file_size:
                raise ValueError(f'its header claims shape {list(shape)} of {dtype} ({need:,} bytes), but the member '
                                 f'holds {max(info.file_size - f.tell(), 0):,} bytes (truncated or forged)')

    def get(self, key):
        if self._npz is None:
            return self.arrays[key]
        try:
            self._check_size(key)
            return self._npz[key]
        except (OSError, ValueError, KeyError, MemoryError, zipfile.BadZipFile, EOFError) as err:
            raise dnnlib.UserError(f'{self.path}: cannot read {key} ({err})') from None

    def features(self, key):
        """Per-image features [N, D], finite."""
        x = self.get(key)
        if x.ndim != 2:
            raise dnnlib.UserError(f'{self.path}: {key} has shape {list(x.shape)}; expected [N, D]')
        if not np.isfinite(x).all():
            raise dnnlib.UserError(f'{self.path}: {key} contains NaN or inf')
        return x

    def describe(self):
        return ', '.join(sorted(self.keys)) or 'nothing'

    def close(self):
        if self._npz is not None:
            self._npz.close()

#----------------------------------------------------------------------------
