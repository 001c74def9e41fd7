"""The reference implementation's maths, re-stated plainly for tests and benchmarks (one copy):
the stacked per-seed generators, the time steps, per-block scipy DCTs, get_alpha_t's blur
schedule through scipy one noise level at a time, the 16-roll block noise, both samplers, EDM2's
autoguided sampler, EDM's max_size subset, BlurLoss, the training loop, dataset_tool's crops
(EDM's, ADM's), and the ADM evaluator's Frechet distance (sqrtm) and precision/recall (numpy
float64). Slow on purpose: it follows the reference's operations, so the optimised code can be
checked against it."""

import copy

import numpy as np
import PIL.Image
import scipy.fft
import scipy.linalg
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
    return torch.tensor(ref_block_dct_np(x.cpu().numpy(), k, inverse), device=x.device)


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
# The reference's samplers (generate*.py): float64, the reference's order of operations.

def ref_guided(net, x, t, labels, cfg_scale):
    if cfg_scale > 1:
        return cfg_scale * net(x, t, labels).to(torch.float64) - (cfg_scale - 1) * net(x, t, None).to(torch.float64)
    return net(x, t, labels).to(torch.float64)


def ref_edm(net, latents, labels, randn_like, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
            S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, cfg_scale=1, sde_scale=None):
    t = ref_steps(num_steps, sigma_min, sigma_max, rho)
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    x = latents.to(torch.float64) * t[0]
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x)
        d = (x_hat - ref_guided(net, x_hat, t_hat, labels, cfg_scale)) / t_hat
        if sde_scale is None:
            x_e = x_hat + (t_next - t_hat) * d
            if i < num_steps - 1:
                d2 = (x_e - ref_guided(net, x_e, t_next, labels, cfg_scale)) / t_next
                x_e = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
        else:
            g = sde_scale * t_next
            a = ((t_next ** 2 - g ** 2) / t_hat ** 2) ** 0.5
            x_e = x_hat + (a - 1) * t_hat * d + g * randn_like(x)
            if i < num_steps - 1:
                d2 = (x_e - ref_guided(net, x_e, t_next, labels, cfg_scale)) / t_next
                x_e = x_hat + (a - 1) * t_hat * (0.5 * d + 0.5 * d2) + g * randn_like(x_e)
        x = x_e
    return x


def ref_blur(net, latents, labels, randn_like, num_steps=18, sigma_min=0.008, sigma_max=80, rho=7,
             truncation_sigma=0.9, truncation_t=0.93, up_scale=4, cfg_scale=1, s_block=0.15, s_noise=0.2,
             blur_sigma_max=3, S_churn=None, S_min=0, S_max=float('inf'), S_noise=1):
    k, size = up_scale, latents.shape[-1]
    t = ref_steps(num_steps, sigma_min, sigma_max, rho)
    start = 0
    while t[start] >= truncation_sigma:
        start += 1
    t = t[start:]
    n = len(t)
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])

    def noise(like):
        if s_block > 0:
            return randn_like(like) + s_block * ref_block_noise(latents, randn_like, k)
        return randn_like(like)

    x = latents.to(torch.float64)
    for i in range(n):
        t_cur, t_next = t[i], t[i + 1]
        if i == 0:
            if s_block > 0:
                x = x + randn_like(x) * t_cur + s_block * ref_block_noise(latents, randn_like, k) * t_cur
            else:
                x = x + randn_like(x) * t_cur
        t_hat, x_hat = t_cur, x
        if S_churn is not None:
            gamma = min(S_churn / n, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
            t_hat = t_cur + gamma * t_cur
            x_hat = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x)
        den = ref_guided(net, x_hat, t_hat, labels, cfg_scale)
        if i == n - 1:
            return den
        a_next = ref_alpha(t_next, k, size, truncation_t, blur_sigma_max)
        a_cur = ref_alpha(t_hat, k, size, truncation_t, blur_sigma_max)
        u_cur = ref_dct(x, k)
        d_cur = (u_cur - ref_dct(den, k)) / t_hat
        gamma = (1 - s_noise ** 2) ** 0.5 * t_next / t_hat
        coef_u = a_next + gamma - gamma * a_cur  # float32, as in the reference
        coef_d = t_hat * (gamma * a_cur - a_next)
        x_e = ref_dct(coef_u * u_cur + coef_d * d_cur, k, inverse=True) + s_noise * t_next * noise(x)
        den = ref_guided(net, x_e, t_next, labels, cfg_scale)
        d_prime = (ref_dct(x_e, k) - ref_dct(den, k)) / t_next
        x = ref_dct(coef_u * u_cur + coef_d * (d_cur + d_prime) / 2, k, inverse=True) + s_noise * t_next * noise(x_e)
    return x


#----------------------------------------------------------------------------
# NVlabs/edm2's sampler (generate_images.py, edm_sampler) in float64, for autoguidance: the guide
# `gnet` gets the labels too, its output is moved toward the main one by guide.lerp(main, guidance),
# and the churn noise is drawn only where churn applies. `interval` (lo, hi): the guidance interval
# of Kynkaanniemi et al. 2024, guidance only where lo < t <= hi (not in edm2).

def ref_edm2(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7, guidance=1,
             S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, randn_like=torch.randn_like, interval=None):
    def denoise(x, t):
        main = net(x, t, labels).to(torch.float64)
        if guidance == 1 or (interval is not None and not interval[0] < t <= interval[1]):
            return main
        return gnet(x, t, labels).to(torch.float64).lerp(main, guidance)

    levels = torch.cat([ref_steps(num_steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])
    x = noise.to(torch.float64) * levels[0]
    for i in range(num_steps):
        t, t_next = levels[i], levels[i + 1]
        t_hat, x_hat = t, x
        if S_churn > 0 and S_min <= t <= S_max:
            gamma = min(S_churn / num_steps, np.sqrt(2) - 1)
            t_hat = t + gamma * t
            x_hat = x + (t_hat ** 2 - t ** 2).sqrt() * S_noise * randn_like(x)
        slope = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * slope
        if i < num_steps - 1:
            slope_next = (x - denoise(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * slope + 0.5 * slope_next)
    return x

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

#----------------------------------------------------------------------------
# The ADM evaluator's Frechet distance: scipy.linalg.sqrtm of the product.

def ref_frechet_distance(mu1, sigma1, mu2, sigma2):
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(np.real(covmean)))

#----------------------------------------------------------------------------
# Reference-style computation, step for step as RDM's evaluate.py does it (numpy float64
# distance blocks of 10000 rows, clamping through np.max over a stacked zero array, radii in a
# float32 [rows, N] buffer selected by np.partition over 4 chunks, membership through
# broadcast comparisons): the value and the time to beat for metrics.precision_recall.

def _np_pairwise(u, v):
    norm_u = np.square(u).sum(axis=1).reshape(-1, 1)
    norm_v = np.square(v).sum(axis=1).reshape(1, -1)
    d = norm_u - 2 * np.matmul(u, v.T) + norm_v
    return np.max([d, np.zeros_like(d)], axis=0)


def _np_radii(x, k, batch, num_chunks):
    n = len(x)
    radii = np.zeros([n, 1], dtype=np.float32)
    rows = np.zeros([batch, n], dtype=np.float32)
    kth = np.arange(k + 1)
    for b0 in range(0, n, batch):
        b1 = min(b0 + batch, n)
        for c0 in range(0, n, batch):
            c1 = min(c0 + batch, n)
            rows[0:b1 - b0, c0:c1] = _np_pairwise(x[b0:b1], x[c0:c1])
        chunks = np.array_split(rows[0:b1 - b0], num_chunks)
        radii[b0:b1] = np.concatenate([np.partition(c, kth, axis=1)[:, [k]] for c in chunks if len(c)], axis=0)
    return radii


def ref_precision_recall(ref_feats, sample_feats, k=3, batch=10000, num_chunks=4):
    ref_feats = np.asarray(ref_feats, dtype=np.float64)
    sample_feats = np.asarray(sample_feats, dtype=np.float64)
    r_ref = _np_radii(ref_feats, k, batch, num_chunks)
    r_smp = _np_radii(sample_feats, k, batch, num_chunks)
    ref_in = np.zeros([len(ref_feats), 1], dtype=bool)
    smp_in = np.zeros([len(sample_feats), 1], dtype=bool)
    for b0 in range(0, len(ref_feats), batch):
        for c0 in range(0, len(sample_feats), batch):
            d = _np_pairwise(ref_feats[b0:b0 + batch], sample_feats[c0:c0 + batch])[..., None]
            ref_in[b0:b0 + batch] |= np.any(d <= r_smp[c0:c0 + batch], axis=1)
            smp_in[c0:c0 + batch] |= np.any(d <= r_ref[b0:b0 + batch][:, None], axis=0)
    return float(np.mean(smp_in.astype(np.float64))), float(np.mean(ref_in.astype(np.float64)))

#----------------------------------------------------------------------------
# EDM2's post-hoc EMA (NVlabs/edm2 training/phema.py), one profile pair at a time in Python floats.

def ref_std_to_exp(std):
    inv = float(std) ** -2
    return float(max(np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv]).real))


def ref_power_function_beta(std, t_next, t_delta):
    return (1.0 - t_delta / t_next) ** (ref_std_to_exp(std) + 1.0)


def ref_power_function_correlation(t_a, std_a, t_b, std_b):
    g_a, g_b = ref_std_to_exp(std_a), ref_std_to_exp(std_b)
    scale = (g_a + 1.0) * (g_b + 1.0) / (g_a + g_b + 1.0)
    if t_a < t_b:
        return scale * (t_a / t_b) ** g_b / t_b
    return scale * (t_a / t_b) ** -g_a / t_a


def ref_solve_posthoc_coefficients(in_t, in_std, out_t, out_std):
    inputs = list(zip(in_t, in_std))
    gram = np.array([[ref_power_function_correlation(*a, *b) for b in inputs] for a in inputs])
    cross = np.array([[ref_power_function_correlation(*a, t, s) for t, s in zip(out_t, out_std)] for a in inputs])
    coefs = np.linalg.solve(gram, cross)
    return coefs / coefs.sum(axis=0, keepdims=True)
