"""The reference implementation's maths, re-stated plainly for tests and benchmarks (one copy):
the stacked per-seed generators, the time steps, per-block scipy DCTs, get_alpha_t's blur
schedule through scipy one noise level at a time, and the 16-roll block noise. Slow on purpose:
it follows the reference's operations, so the optimised code can be checked against it."""

import numpy as np
import scipy.fft
import scipy.stats
import torch


class RefGenerators:
    """One generator per seed; every draw is a torch.stack of per-seed randn calls."""

    def __init__(self, seeds, device='cpu'):
        self.gens = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, size, **kw):
        return torch.stack([torch.randn(size[1:], generator=g, **kw) for g in self.gens])

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)


def ref_steps(num_steps, sigma_min, sigma_max, rho):
    i = torch.arange(num_steps, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def ref_block_dct_np(x, k, inverse=False):
    """Orthonormal DCT-II (or its inverse) of every k x k block of a numpy (N, C, H, W) array."""
    n, c, h, w = x.shape
    fn = scipy.fft.idctn if inverse else scipy.fft.dctn
    return fn(x.reshape(n, c, h // k, k, w // k, k), axes=(3, 5), norm='ortho').reshape(n, c, h, w)


def ref_dct(x, k, inverse=False):
    return torch.tensor(ref_block_dct_np(x.numpy(), k, inverse))


def ref_alpha(t, k, size, prob_length=0.93, blur_sigma_max=3, min_scale=0.001, device=None):
    """get_alpha_t: scipy cdf in float64, a float32 frequency grid tiled over the image."""
    t = np.float64(torch.as_tensor(t).cpu().numpy())
    u = torch.tensor(scipy.stats.norm.cdf((np.log(t) - (-1.2)) / 1.2) / prob_length, device=device)
    blur_t = (blur_sigma_max * torch.sin(u * torch.pi / 2) ** 2) ** 2 / 2
    freqs = torch.pi * torch.linspace(0, k - 1, k).to(device) / k
    fsq = freqs[:, None] ** 2 + freqs[None, :] ** 2
    return torch.exp(-fsq.repeat(size // k, size // k) * blur_t) * (1 - min_scale) + min_scale


def ref_roll_sum(g, k):
    """The sum of the k*k circular shifts of g, divided by k."""
    total = torch.zeros_like(g)
    for px in range(k):
        for py in range(k):
            total += torch.roll(g, shifts=(px, py), dims=(-2, -1))
    return total / k


def ref_block_noise(ref, randn_like, k):
    return ref_roll_sum(randn_like(ref), k)


#----------------------------------------------------------------------------
# EDM's dataset (training/dataset.py, Dataset.__init__): which images max_size keeps.

def ref_max_size_subset(num_images, max_size, random_seed):
    """Indices of the images EDM keeps: all of them, or a seeded shuffle's first max_size, sorted."""
    order = np.arange(num_images, dtype=np.int64)
    if num_images > max_size:
        np.random.RandomState(random_seed % (1 << 31)).shuffle(order)
        order = np.sort(order[:max_size])
    return order
