"""Named reference sets: the published activations/statistics the paper's numbers were computed
against, downloaded once into the dnnlib cache.

`--ref NAME` in evaluate.py resolves a name here; paths and URLs pass through unchanged. No
SHA-256 or file size is published for any of these files, so none is pinned (`sha256=None`): the
download is capped at `max_bytes` (the size the contents imply, estimated below, plus a margin)
and its contents are checked when read (an .npz with the keys the metric needs, finite values,
covariances symmetric PSD). Where a hash is published one day, put it in `sha256` and the cache
verifies every fresh download and every cache hit.
"""

import dataclasses

import dnnlib

_TSINGHUA = 'https://cloud.tsinghua.edu.cn/f/{}/?dl=1'
_ADM = 'https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/{}'
_MB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Reference:
    url: str
    holds: str           # What is in the file.
    purpose: str         # Which metrics / protocol it serves.
    approx_bytes: int    # Estimated from the contents (shapes x dtype); not a published size.
    num_images: int      # Images behind the reference (what precision/recall compare against).
    sha256: str = None   # Published hash, where one exists (none does today).


REFERENCES = {
    'celebahq-256': Reference(
        url=_TSINGHUA.format('a26f714e36304c3e948d'),
        holds='feat + s_feat of the 30,000 CelebA-HQ 256x256 images (the RDM authors\' activations)',
        purpose='CelebA-HQ 256: FID and precision/recall as in the paper (FID 3.15, P 0.77, R 0.55)',
        approx_bytes=30000 * (2048 + 2023) * 8, num_images=30000),
    'imagenet-256-stats': Reference(
        url=_TSINGHUA.format('8b98f215ae3a4977978c'),
        holds='mu/sigma of the ImageNet 256x256 training set (the RDM authors\' statistics)',
        purpose='ImageNet 256: FID as in the paper (FID 1.87)',
        approx_bytes=(2048 + 2048 * 2048) * 8, num_images=1281167),
    'imagenet-256-pr10k': Reference(
        url=_TSINGHUA.format('924f9878ddc340bcb09c'),
        holds='feat + s_feat of 10,000 ImageNet 256x256 reference images (the RDM authors\' activations)',
        purpose='ImageNet 256: precision/recall against 10k references as ADM does (P 0.81, R 0.59)',
        approx_bytes=10000 * (2048 + 2023) * 8, num_images=10000),
    'adm-imagenet-256': Reference(
        url=_ADM.format('imagenet/256/VIRTUAL_imagenet256_labeled.npz'),
        holds='ADM\'s reference batch: mu/sigma/mu_s/sigma_s of ImageNet train + 10,000 images (arr_0)',
        purpose='ImageNet 256: FID and sFID (paper: sFID 3.97); for precision/recall run `activations` on it',
        approx_bytes=10000 * 256 * 256 * 3 + 2 * (2048 + 2048 * 2048) * 8, num_images=10000),
}

# Reference sizes of the paper's precision/recall protocol (ADM's 10k ImageNet batch; all of CelebA-HQ).
PR_PROTOCOL_SIZES = {10000: 'ImageNet 256 (ADM\'s 10,000-image reference batch)', 30000: 'CelebA-HQ 256 (all 30,000 images)'}
PROTOCOL_SAMPLES = 50000


def resolve(spec, verbose=True):
    """Local file name for a reference: a name from REFERENCES (downloaded once, checked), or a
    path / URL (returned as it is; activations.FeatureSet opens it). Returns (spec_or_path, Reference or None)."""
    ref = REFERENCES.get(spec)
    if ref is None:
        return spec, None
    max_bytes = int(ref.approx_bytes * 1.5) + 64 * _MB  # What the contents imply, plus a margin.
    return dnnlib.util.open_url(ref.url, return_filename=True, verbose=verbose, sha256=ref.sha256, max_bytes=max_bytes), ref


def describe():
    """Lines for `evaluate.py refs`."""
    return [line for name, ref in REFERENCES.items() for line in (
        f'{name}  (~{ref.approx_bytes / _MB:,.0f} MB, estimated from its contents; {ref.num_images:,} images)',
        f'    holds:   {ref.holds}', f'    for:     {ref.purpose}', f'    url:     {ref.url}', f'    sha256:  {ref.sha256 or "none published"}')]
