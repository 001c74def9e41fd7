"""Blurring maths of the relay (second) stage, shared by `BlurLoss` and `blur_sampler`.

Three pieces, all defined on k x k pixel blocks (k = up_scale, the relay's upsampling factor):

- an orthonormal 2-D DCT-II of every block (`block_dct` / `block_idct`), computed as two small
  matrix products with a k x k DCT matrix; coefficients keep the image layout, i.e. coefficient
  (u, v) of the block at (bi, bj) sits at pixel (bi*k + u, bj*k + v), as in the reference;
- the blur schedule: noise level sigma -> u = Phi((ln sigma - P_mean) / P_std) / prob_length ->
  blur sigma = blur_sigma_max * sin^2(u pi / 2) -> per-frequency attenuation
  exp(-|f|^2 blur_sigma^2 / 2) * (1 - min_scale) + min_scale with f = pi * (i, j) / k;
- block noise: a Gaussian field summed over its k*k circular shifts, divided by k.

Works for any image size divisible by k (the reference tiles a 64 x 64 grid of blocks, i.e.
assumes 256 px). The attenuation is produced in float32 from a float32 frequency grid exactly as
the reference does, because the reference's sampler arithmetic inherits that precision.
"""

import functools
import math

import numpy as np
import scipy.special
import torch

# The reference's sampler hard-codes the EDM training distribution of ln(sigma) here.
P_MEAN = -1.2
P_STD = 1.2

#----------------------------------------------------------------------------
# Block DCT.

@functools.cache
def dct_matrix(k: int, dtype: torch.dtype = torch.float64, device='cpu') -> torch.Tensor:
    """Orthonormal DCT-II matrix D (k x k): coefficients = D @ signal, signal = D.T @ coefficients."""
    n = torch.arange(k, dtype=torch.float64)
    # Row u holds basis function u: c_u * cos(pi * (2n + 1) * u / (2k)), orthonormal rows.
    mat = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * k)) * math.sqrt(2 / k)
    mat[0] /= math.sqrt(2)
    return mat.to(dtype=dtype, device=device)


def block_dct(x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    """Orthonormal 2-D DCT-II of every k x k block of `x` (..., H, W), in image layout (or its inverse)."""
    if x.ndim < 2 or x.shape[-1] % k != 0 or x.shape[-2] % k != 0:
        raise ValueError(f'Image size {tuple(x.shape[-2:])} is not divisible by the block size {k}')
    mat = dct_matrix(k, x.dtype, x.device)
    left, right = (mat.T, mat) if inverse else (mat, mat.T)
    # Rows inside each block: left @ (k x W slab); then columns: (every k-vector) @ right.
    y = torch.matmul(left, x.reshape(-1, k, x.shape[-1]))
    return torch.matmul(y.reshape(-1, k), right).reshape(x.shape)


block_idct = functools.partial(block_dct, inverse=True)


def scale_frequencies(coefs: torch.Tensor, factor: torch.Tensor, k: int) -> torch.Tensor:
    """Multiply block-DCT coefficients (N, ..., H, W) by a per-frequency factor.

    `factor` is (k, k) for all images, or (N, k, k) for one factor per image. Equivalent to the
    reference's multiplication by the factor tiled over the image, without the tiling.
    """
    *lead, height, width = coefs.shape
    view = coefs.reshape(*lead, height // k, k, width // k, k)
    fac = factor.reshape(k, 1, k) if factor.ndim == 2 else factor.reshape(factor.shape[0], *([1] * (len(lead) - 1)), 1, k, 1, k)
    return (view * fac).reshape(*lead, height, width)

#----------------------------------------------------------------------------
# Blur schedule.

def blur_sigma_from_u(u, blur_sigma_max: float) -> torch.Tensor:
    return blur_sigma_max * torch.sin(u * torch.pi / 2) ** 2


def attenuation(blur_sigma, k: int, min_scale: float = 0.001) -> torch.Tensor:
    """Per-frequency damping of the blur: (*blur_sigma.shape, k, k), float32.

    exp(-|f|^2 * t) * (1 - min_scale) + min_scale with t = blur_sigma^2 / 2; t is formed in the
    precision of `blur_sigma` and rounded to float32 for the product, as in the reference.
    """
    blur_sigma = torch.as_tensor(blur_sigma)
    freqs = torch.pi * torch.linspace(0, k - 1, k, device=blur_sigma.device) / k  # f = pi * (i, j) / k, float32 as the reference.
    fsq = freqs[:, None] ** 2 + freqs[None, :] ** 2
    t = (blur_sigma ** 2 / 2).to(torch.float32)
    exponent = (-fsq * t[..., None, None]).reshape(-1)
    # CPU exp has a SIMD path and a scalar tail path that may differ by one ulp; pad so that
    # every element takes the SIMD path, as the reference's large tiled grid does.
    damping = torch.exp(torch.nn.functional.pad(exponent, (0, (-exponent.numel()) % 64)))[:exponent.numel()]
    return damping.reshape(*t.shape, k, k) * (1 - min_scale) + min_scale


def blur_sigma_of_noise_level(sigma: float, prob_length: float = 0.93, blur_sigma_max: float = 3) -> torch.Tensor:
    """The sampler's blur sigma at one noise level, float64, in the reference's exact sequence of
    operations (host float64: numpy log, scipy ndtr, then 0-d torch tensors), so that the result
    is bit-identical to it. Cheap enough to call once per sampling step at the very most."""
    u = scipy.special.ndtr((np.log(np.float64(sigma)) - P_MEAN) / P_STD) / prob_length
    return blur_sigma_max * torch.sin(torch.tensor(u, dtype=torch.float64) * torch.pi / 2) ** 2


def alpha_schedule(sigmas, k: int, prob_length: float = 0.93, blur_sigma_max: float = 3, device=None) -> torch.Tensor:
    """The sampler's blur schedule: float32 attenuation (len(sigmas), k, k) for every noise level.

    Bit-identical to the reference's get_alpha_t for each sigma (see `blur_sigma_of_noise_level`),
    but computed once for a whole run, for any k and resolution, and without the 64x64 tiling.
    The exponential runs on `device`, where the reference computes it (CPU and CUDA float32 exp
    may differ by an ulp).
    """
    sigmas = [float(s) for s in torch.as_tensor(sigmas).reshape(-1).cpu()]
    blur_sigmas = torch.stack([blur_sigma_of_noise_level(s, prob_length, blur_sigma_max) for s in sigmas])
    return attenuation(blur_sigmas.to(device if device is not None else 'cpu'), k)  # The reference's min_scale, 0.001.


def blur(x: torch.Tensor, blur_sigma, k: int, min_scale: float = 0.001) -> torch.Tensor:
    """Blur each k x k block of `x` (N, C, H, W) in the DCT domain; blur_sigma scalar or per image."""
    blur_sigma = torch.as_tensor(blur_sigma, device=x.device)
    factor = attenuation(blur_sigma.reshape(-1) if blur_sigma.ndim else blur_sigma, k, min_scale)
    return block_idct(scale_frequencies(block_dct(x, k), factor, k), k)

#----------------------------------------------------------------------------
# Block noise.

def block_noise(ref: torch.Tensor, randn_like=torch.randn_like, k: int = 1) -> torch.Tensor:
    """One standard Gaussian draw shaped like `ref`, summed over its k*k circular shifts
    (0..k-1 along H and W) and divided by k, so every pixel keeps unit variance and pixels
    less than k apart are correlated. k == 1 returns the plain draw."""
    noise = randn_like(ref)
    if k == 1:
        return noise
    # The 2-D shift sum is separable: k shifts along W, then k shifts of that along H.
    rows = noise.clone()
    for shift in range(1, k):
        rows += torch.roll(noise, shifts=shift, dims=-1)
    total = rows.clone()
    for shift in range(1, k):
        total += torch.roll(rows, shifts=shift, dims=-2)
    return total / k

#----------------------------------------------------------------------------
