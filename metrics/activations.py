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

import zipfile

import numpy as np
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training import data_files
from training.dataset import ImageFolderDataset

from .frechet import StatsAccumulator

SPATIAL_CHANNELS = 7

# Per-image feature key -> its statistics keys in statistics files.
STATS_KEYS = {'feat': ('mu', 'sigma'), 's_feat': ('mu_s', 'sigma_s'), 'dinov2': ('mu_dinov2', 'sigma_dinov2')}

#----------------------------------------------------------------------------
# Spatial feature layouts.

def spatial_chw_to_hwc_index(dim, channels=SPATIAL_CHANNELS):
    """Index that reorders a (C, H, W)-flattened s_feat vector into ADM's (H, W, C) order."""
    return np.arange(dim).reshape(channels, dim // channels).T.reshape(-1)


def spatial_stats_to_hwc(mu, sigma):
    idx = spatial_chw_to_hwc_index(mu.shape[0])
    return mu[idx], sigma[idx][:, idx]

#----------------------------------------------------------------------------
# Image sources.

class _NpzImages(torch.utils.data.Dataset):
    def __init__(self, path):
        self.file = FeatureSet(path)  # Its members are read by rows, a failure is one line naming the file.
        if not self.file.has('arr_0'):
            raise dnnlib.UserError(f'{path}: no arr_0 in the .npz (expected ADM-style uint8 images [N, H, W, C])')
        shape, dtype = self.file.read('arr_0', lambda m: (m.shape, m.dtype))
        if len(shape) != 4 or shape[3] not in (1, 3) or dtype != np.uint8:
            raise dnnlib.UserError(f'{path}: arr_0 is {dtype} {list(shape)}; expected uint8 [N, H, W, 1 or 3]')
        self.image_shape = [shape[3], shape[1], shape[2]]

    def __len__(self):
        return self.file.shape('arr_0')[0]

    def __getitem__(self, idx):
        return np.ascontiguousarray(self.file.get('arr_0', idx, idx + 1)[0].transpose(2, 0, 1))


def open_images(path):
    """Dataset of uint8 CHW images from an ADM-style .npz, or of (image, label) from a folder or
    a zip (training.dataset.ImageFolderDataset)."""
    # ImageFolderDataset refuses anything but a folder or a zip with one DatasetError (a UserError) line.
    source = _NpzImages(path) if str(path).lower().endswith('.npz') else ImageFolderDataset(path=path)
    if source.image_shape[0] not in (1, 3):
        raise dnnlib.UserError(f'{path}: images have {source.image_shape[0]} channels; the detector needs 1 (gray) or 3 (RGB)')
    return source

#----------------------------------------------------------------------------
# Sharded extraction.

@torch.no_grad()
def detect(batches, detectors, num_items, stats_only=False, progress=True):
    """Run `detectors` over this process's `batches`, (indices, uint8 images [n, C, H, W], images
    done by all processes after this step) each. Returns on rank 0 {key: float32 [num_items, D]}
    of every detector output in item order, or with stats_only the float64 statistics
    (STATS_KEYS: mu/sigma, mu_s/sigma_s, mu_dinov2/sigma_dinov2); None on the other ranks.
    Collective: every rank calls it, with or without batches."""
    device = next(detectors[0].parameters()).device

    def run(images):
        images = torch.as_tensor(images)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise dnnlib.UserError(f'images must be [N, 1 or 3, H, W] for the detectors, got {list(images.shape)}')
        return {k: v for det in detectors for k, v in det(images).items()}
    # The outputs' widths, known on every rank (even one without images) before the collectives.
    widths = {k: v.shape[1] for k, v in run(torch.zeros([1, 3, 32, 32], dtype=torch.uint8)).items()}
    accs = {k: StatsAccumulator(widths[k], device) for k in STATS_KEYS if k in widths} if stats_only else {}
    hwc_index = torch.from_numpy(spatial_chw_to_hwc_index(widths['s_feat'])).to(device) if 's_feat' in accs else None
    rows, indices, error = [], [], None
    with tqdm.tqdm(total=num_items, unit='img', disable=(not progress or dist.get_rank() != 0), dynamic_ncols=True) as bar:
        try:
            for idx, images, done in batches:
                out = run(images)
                for k, acc in accs.items():
                    acc.update(out[k][:, hwc_index] if k == 's_feat' else out[k])
                if not stats_only:
                    rows.append(torch.cat([out[k].to(torch.float32).cpu() for k in widths], dim=1))
                    indices.append(torch.as_tensor(idx))
                bar.update(done - bar.n)
            bar.update(num_items - bar.n)
        except Exception as err:  # pylint: disable=broad-exception-caught
            error = err  # Re-raised below, after telling the other processes not to wait for us.
    if not dist.all_ok(error is None):
        raise error if error is not None else dnnlib.UserError('another process failed; see its message')
    if stats_only:
        stats = {STATS_KEYS[k][i]: value for k, acc in accs.items() for i, value in enumerate(acc.finalize())}
        return stats if dist.get_rank() == 0 else None
    result = gather_rows(rows, indices, num_items, sum(widths.values()), device)
    return dict(zip(widths, np.split(result, np.cumsum(list(widths.values()))[:-1], axis=1))) if result is not None else None


def compute_activations(source, detectors, batch_size=64, num_workers=3, stats_only=False, progress=True):
    """`detect` over an image source (`open_images`), sharded across the torchrun processes in
    the reference generate.py's batches (torch_utils.distributed.my_batches)."""
    mine = dist.my_batches(len(source), batch_size)
    loader = torch.utils.data.DataLoader(source, batch_sampler=[idx for idx, _done in mine], num_workers=num_workers)
    # A folder or zip gives (images, labels).
    images = (batch[0] if isinstance(batch, (list, tuple)) else batch for batch in loader)
    return detect(((idx, imgs, done) for (idx, done), imgs in zip(mine, images)), detectors, len(source), stats_only, progress)


def gather_rows(rows, indices, num_items, width, device, chunk_rows=4096):
    """Every rank's rows on rank 0, in item order: `rows` are this rank's [n, width] tensors of
    the items `indices` (lists of the same lengths). Returns float32 [num_items, width] on rank 0,
    None elsewhere. Collective: chunk_rows rows at a time, each rank fills the rows of its items
    and zeros elsewhere, and the ranks' chunks are summed into rank 0 through `device` (every
    item comes from one rank, so the sum is its row: x + 0 == x)."""
    rows = torch.cat(rows) if rows else torch.zeros([0, width])
    indices = torch.cat(indices) if indices else torch.zeros([0], dtype=torch.int64)
    result = np.zeros([num_items, width], dtype=np.float32) if dist.get_rank() == 0 else None
    for r0 in range(0, num_items, chunk_rows):
        chunk = torch.zeros([min(chunk_rows, num_items - r0), width])
        mine = (indices >= r0) & (indices < r0 + chunk_rows)
        chunk[indices[mine] - r0] = rows[mine]
        if dist.get_world_size() > 1:
            torch.distributed.reduce(chunk := chunk.to(device), dst=0)
        if result is not None:
            result[r0:r0 + len(chunk)] = chunk.cpu().numpy()
    return result

#----------------------------------------------------------------------------
# Feature sets for the metrics: an .npz file, or arrays in memory.

class FeatureSet:
    """Named arrays of one set of images, as the metrics read them: per-image activations
    (feat/s_feat/logits/dinov2), statistics (mu/sigma/mu_s/sigma_s/...) or an ADM reference batch
    (statistics + arr_0 images). `source`: a dict of arrays, or the path or URL of an .npz whose
    members are read when asked for, in chunks where the work allows (data_files.NpyMember).
    `name`: how messages call it (default: the path)."""

    def __init__(self, source, name=None):
        self.path, self.members = name or ('the samples' if isinstance(source, dict) else source), {}
        if isinstance(source, dict):  # Arrays slice as the file's members do.
            self.members, self.keys = {k: np.asarray(v) for k, v in source.items()}, set(source)
            return
        try:
            self.local = dnnlib.util.open_url(source, return_filename=True, verbose=False)
            self.keys = data_files.npz_keys(self.local)
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            raise dnnlib.UserError(f'{source}: cannot read as .npz ({err})') from None

    def has(self, *keys):
        return all(k in self.keys for k in keys)

    def read(self, key, read):
        """read(the array `key`): an np.ndarray, or a data_files.NpyMember that reads rows when sliced."""
        try:
            if key not in self.members:
                self.members[key] = data_files.NpyMember(self.local, key)
            return read(self.members[key])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
            raise dnnlib.UserError(f'{self.path}: cannot read {key} ({err}); is the file complete?') from None

    def shape(self, key):
        return self.read(key, lambda m: tuple(m.shape))

    def get(self, key, start=0, stop=None):
        """The whole array, or its rows start..stop-1."""
        return self.read(key, lambda m: m[start:stop])

    def features(self, key, chunk=None):
        """Per-image features [N, D] (N, D >= 1), finite: the whole array, or with `chunk` an iterator
        over blocks of that many rows (the file is then never held whole)."""
        shape = self.shape(key)
        if len(shape) != 2 or 0 in shape:
            raise dnnlib.UserError(f'{self.path}: {key} has shape {list(shape)}; expected [N, D] with N, D >= 1')

        def finite(block):
            if not np.isfinite(block).all():
                raise dnnlib.UserError(f'{self.path}: {key} contains NaN or inf')
            return block
        if chunk:
            return (finite(self.get(key, i, i + chunk)) for i in range(0, shape[0], chunk))
        return finite(self.get(key))

#----------------------------------------------------------------------------
