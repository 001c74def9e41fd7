"""The reference implementation's maths, re-stated plainly for tests and benchmarks (one copy):
the stacked per-seed generators, the time steps, per-block scipy DCTs, get_alpha_t's blur
schedule through scipy one noise level at a time, the 16-roll block noise, EDM's max_size
subset, BlurLoss, the training loop and dataset_tool's crops (EDM's, ADM's). Slow on purpose:
it follows the reference's operations, so the optimised code can be checked against it."""

import copy

import numpy as np
import PIL.Image
import scipy.fft
import scipy.stats
import torch

import dnnlib
from torch_utils import misc


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

#----------------------------------------------------------------------------
# The reference's BlurLoss (training/loss.py), restated with scipy (ppf, per-block DCT) and the
# 16-roll block noise.

def ref_blur_loss(net, images, P_mean=-1.2, P_std=1.2, sigma_data=0.5, up_scale=4, prob_length=0.93,
                  blur_sigma_max=3, min_scale=0.001, block_scale=0, truncate_sigma=7.5e-3):
    # The reference's BlurLoss re-stated with scipy (ppf, per-block DCT) and the 16-roll block noise.
    u = torch.rand([images.shape[0], 1, 1, 1])
    u = torch.clamp(u, min=scipy.stats.norm.cdf((np.log(truncate_sigma) - P_mean) / P_std) * prob_length)
    blur_sigma = blur_sigma_max * torch.sin(u * torch.pi / 2) ** 2
    sigma = (torch.tensor(scipy.stats.norm.ppf((u * prob_length).numpy())) * P_std + P_mean).exp()
    weight = torch.clamp((sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2, max=100000)
    f = np.pi * np.arange(up_scale) / up_scale
    fsq = f[:, None] ** 2 + f[None, :] ** 2
    n_, c_, h_, w_ = images.shape
    factor = np.exp(-fsq[None] * (blur_sigma.numpy().reshape(-1, 1, 1) ** 2 / 2)) * (1 - min_scale) + min_scale
    coefs = ref_block_dct_np(images.numpy().astype(np.float64), up_scale).reshape(n_, c_, h_ // up_scale, up_scale, w_ // up_scale, up_scale)
    coefs = coefs * factor[:, None, None, :, None, :]
    y_blurred = torch.tensor(ref_block_dct_np(coefs.reshape(n_, c_, h_, w_), up_scale, inverse=True))
    n = torch.randn_like(images) * sigma
    if block_scale > 0:
        n = torch.randn_like(images) * sigma
        n = n + ref_roll_sum(torch.randn_like(images), up_scale) * sigma * block_scale
    return weight * ((net(y_blurred + n, sigma) - images) ** 2)


#----------------------------------------------------------------------------
# The reference's training loop (training/training_loop.py), restated: one process, CPU; the
# reference's loss normalisation (loss_scaling / t, t = 32 at 64 px, else 256).

def ref_training(dataset_kwargs, network_kwargs, loss_kwargs, augment_kwargs, optimizer_kwargs, num_steps,
                 seed, batch_size, batch_gpu, ema_halflife_kimg, ema_rampup_ratio, lr_rampup_kimg, loss_scaling,
                 divisor=None):
    """divisor=None: the reference's rule; a number: that constant instead (EDM's rule is the
    images per process)."""
    np.random.seed(seed % (1 << 31))  # (seed * world + rank) with world = 1, rank = 0.
    torch.manual_seed(np.random.randint(1 << 31))
    rounds = batch_size // batch_gpu

    dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    sampler = misc.InfiniteSampler(dataset=dataset, rank=0, num_replicas=1, seed=seed)
    batches = iter(torch.utils.data.DataLoader(dataset=dataset, sampler=sampler, batch_size=batch_gpu))

    net = dnnlib.util.construct_class_by_name(**network_kwargs, img_resolution=dataset.resolution,
                                              img_channels=dataset.num_channels, label_dim=dataset.label_dim)
    net.train().requires_grad_(True)
    initial = copy.deepcopy(net)
    with torch.no_grad():  # The module summary's forward pass: dropout draws happen here too.
        net(torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution]),
            torch.ones([batch_gpu]), torch.zeros([batch_gpu, net.label_dim]))

    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs else None
    ema = copy.deepcopy(net).eval().requires_grad_(False)

    nimg = 0
    for _step in range(num_steps):
        optimizer.zero_grad(set_to_none=True)
        for _round in range(rounds):
            images, labels = next(batches)
            images = images.to(torch.float32) / 127.5 - 1
            loss = loss_fn(net=net, images=images, labels=labels, augment_pipe=augment_pipe)
            t = (32 if images.shape[-1] == 64 else 256) if divisor is None else divisor
            loss.sum().mul(loss_scaling / t).backward()
        for group in optimizer.param_groups:
            group['lr'] = optimizer_kwargs['lr'] * min(nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        halflife = ema_halflife_kimg * 1000
        if ema_rampup_ratio is not None:
            halflife = min(halflife, nimg * ema_rampup_ratio)
        beta = 0.5 ** (batch_size / max(halflife, 1e-8))
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        nimg += batch_size
    return initial, net, ema

#----------------------------------------------------------------------------
# dataset_tool.py transforms: EDM's center-crop and center-crop-wide, ADM's center_crop_arr
# (center-crop-dhariwal), on PIL images.

def lanczos(img, size):
    return img.resize(size, PIL.Image.Resampling.LANCZOS)


def ref_center_crop(img, w, h):
    s = min(img.size)
    left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2
    return lanczos(img.crop((left, top, left + s, top + s)), (w, h))


def ref_center_crop_wide(img, w, h):
    band = int(np.round(w * img.size[1] / img.size[0]))
    top = (img.size[1] - band) // 2
    img = lanczos(img.crop((0, top, img.size[0], top + band)), (w, h))
    canvas = PIL.Image.new(img.mode, (w, w), 0)
    canvas.paste(img, (0, (w - h) // 2))
    return canvas


def ref_dhariwal(img, size):
    # guided-diffusion center_crop_arr, restated.
    while img.size[0] >= 2 * size and img.size[1] >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), PIL.Image.BOX)
    f = size / min(img.size)
    img = img.resize((int(round(img.size[0] * f)), int(round(img.size[1] * f))), PIL.Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))
