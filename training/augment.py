"""EDM's non-leaking augmentation pipeline (after ADA, "Training Generative Adversarial Networks
with Limited Data"). Each augmentation is applied with probability `p * multiplier`, and its
parameters are returned as a conditioning vector ("augment labels") so the network can learn to
undo them; at sampling time the labels are zero and the model generates clean images.

Same options, same order of random draws and same label layout as EDM, so an `augment_dim`
network trained by EDM or RDM sees the labels it expects. train.py enables
xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1 -> 9 label channels.
"""

import numpy as np
import torch

from torch_utils import misc
from torch_utils import persistence

# Low-pass filter for the 2x up/downsampling around geometric transforms (Symlet-6 wavelet).
_SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
         0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
         -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148]


#----------------------------------------------------------------------------
# Batched homogeneous matrices. Entries are python numbers or [N] tensors; the result is
# [3, 3] / [4, 4] for all-constant entries, else [N, 3, 3] / [N, 4, 4].

def matrix(*rows, device=None):
    assert all(len(row) == len(rows[0]) for row in rows)
    elems = [x for row in rows for x in row]
    ref = [x for x in elems if isinstance(x, torch.Tensor)]
    if not ref:
        return misc.constant(np.asarray(rows), device=device)
    assert device is None or torch.device(device) == ref[0].device
    elems = [x if isinstance(x, torch.Tensor) else misc.constant(x, shape=ref[0].shape, device=ref[0].device)
             for x in elems]
    return torch.stack(elems, dim=-1).reshape(ref[0].shape + (len(rows), -1))


def translate2d(tx, ty, **kw):
    return matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], **kw)


def translate3d(tx, ty, tz, **kw):
    return matrix([1, 0, 0, tx], [0, 1, 0, ty], [0, 0, 1, tz], [0, 0, 0, 1], **kw)


def scale2d(sx, sy, **kw):
    return matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], **kw)


def scale3d(sx, sy, sz, **kw):
    return matrix([sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1], **kw)


def rotate2d(theta, **kw):
    c, s = torch.cos(theta), torch.sin(theta)
    return matrix([c, -s, 0], [s, c, 0], [0, 0, 1], **kw)


def rotate3d(v, theta, **kw):
    """Rotation by theta around the unit axis v (Rodrigues)."""
    vx, vy, vz = v[..., 0], v[..., 1], v[..., 2]
    s, c = torch.sin(theta), torch.cos(theta)
    cc = 1 - c
    return matrix(
        [vx * vx * cc + c,      vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
        [vy * vx * cc + vz * s, vy * vy * cc + c,      vy * vz * cc - vx * s, 0],
        [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c,      0],
        [0, 0, 0, 1], **kw)


def translate2d_inv(tx, ty, **kw):
    return translate2d(-tx, -ty, **kw)


def scale2d_inv(sx, sy, **kw):
    return scale2d(1 / sx, 1 / sy, **kw)


def rotate2d_inv(theta, **kw):
    return rotate2d(-theta, **kw)


#----------------------------------------------------------------------------

@persistence.persistent_class
class AugmentPipe:
    """All augmentations are off by default; enable one by setting its multiplier (e.g. 1)."""

    def __init__(self, p=1,
        xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125,
        scale=0, rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1,
        aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125,
        brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2,
        contrast_std=0.5, hue_max=1, saturation_std=1,
    ):
        self.p = float(p)                                   # Overall probability multiplier.
        # Pixel blitting.
        self.xflip = float(xflip)                           # Horizontal flip.
        self.yflip = float(yflip)                           # Vertical flip.
        self.rotate_int = float(rotate_int)                 # Rotation by multiples of 90 degrees.
        self.translate_int = float(translate_int)           # Integer translation (reflect padding).
        self.translate_int_max = float(translate_int_max)   # ... range, relative to image size.
        # Geometric transformations (resampled with a wavelet filter, so nothing leaks in).
        self.scale = float(scale)                           # Isotropic scaling.
        self.rotate_frac = float(rotate_frac)               # Arbitrary rotation.
        self.aniso = float(aniso)                           # Anisotropic scaling.
        self.translate_frac = float(translate_frac)         # Fractional translation.
        self.scale_std = float(scale_std)                   # log2 std of isotropic scaling.
        self.rotate_frac_max = float(rotate_frac_max)       # Rotation range, 1 = full circle.
        self.aniso_std = float(aniso_std)                   # log2 std of anisotropic scaling.
        self.aniso_rotate_prob = float(aniso_rotate_prob)   # Chance of a rotated anisotropy frame.
        self.translate_frac_std = float(translate_frac_std) # Translation std, relative to size.
        # Colour transformations.
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.lumaflip = float(lumaflip)
        self.hue = float(hue)
        self.saturation = float(saturation)
        self.brightness_std = float(brightness_std)
        self.contrast_std = float(contrast_std)             # log2 std.
        self.hue_max = float(hue_max)                       # 1 = full circle.
        self.saturation_std = float(saturation_std)         # log2 std.

    def _gate(self, w, multiplier, shape, device):
        """Keep w where a uniform draw falls below p * multiplier, else zero (the 'off' value)."""
        return torch.where(torch.rand(shape, device=device) < multiplier * self.p, w, torch.zeros_like(w))

    def __call__(self, images):
        N, C, H, W = images.shape
        device = images.device
        labels = [torch.zeros([N, 0], device=device)]

        # Pixel blitting: exact, no resampling.
        if self.xflip > 0:
            w = self._gate(torch.randint(2, [N, 1, 1, 1], device=device), self.xflip, [N, 1, 1, 1], device)
            images = torch.where(w == 1, images.flip(3), images)
            labels.append(w)

        if self.yflip > 0:
            w = self._gate(torch.randint(2, [N, 1, 1, 1], device=device), self.yflip, [N, 1, 1, 1], device)
            images = torch.where(w == 1, images.flip(2), images)
            labels.append(w)

        if self.rotate_int > 0:
            w = self._gate(torch.randint(4, [N, 1, 1, 1], device=device), self.rotate_int, [N, 1, 1, 1], device)
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]

        if self.translate_int > 0:
            w = torch.rand([2, N, 1, 1, 1], device=device) * 2 - 1
            w = self._gate(w, self.translate_int, [1, N, 1, 1, 1], device)
            tx = w[0].mul(W * self.translate_int_max).round().to(torch.int64)
            ty = w[1].mul(H * self.translate_int_max).round().to(torch.int64)
            b, c, y, x = torch.meshgrid(*(torch.arange(n, device=device) for n in images.shape), indexing='ij')
            # Mirror-reflect indices that fall outside the image.
            x = W - 1 - (W - 1 - (x - tx) % (W * 2 - 2)).abs()
            y = H - 1 - (H - 1 - (y + ty) % (H * 2 - 2)).abs()
            images = images.flatten()[(((b * C) + c) * H + y) * W + x]
            labels += [tx.div(W * self.translate_int_max), ty.div(H * self.translate_int_max)]

        # Geometric transformations: compose the inverse transform G_inv (output -> input).
        I_3 = torch.eye(3, device=device)
        G_inv = I_3

        if self.scale > 0:
            w = self._gate(torch.randn([N], device=device), self.scale, [N], device)
            s = w.mul(self.scale_std).exp2()
            G_inv = G_inv @ scale2d_inv(s, s)
            labels.append(w)

        if self.rotate_frac > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.rotate_frac_max)
            w = self._gate(w, self.rotate_frac, [N], device)
            G_inv = G_inv @ rotate2d_inv(-w)
            labels += [w.cos() - 1, w.sin()]

        if self.aniso > 0:
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * np.pi
            w = self._gate(w, self.aniso, [N], device)
            r = torch.where(torch.rand([N], device=device) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = w.mul(self.aniso_std).exp2()
            G_inv = G_inv @ rotate2d_inv(r) @ scale2d_inv(s, 1 / s) @ rotate2d_inv(-r)
            labels += [w * r.cos(), w * r.sin()]

        if self.translate_frac > 0:
            w = self._gate(torch.randn([2, N], device=device), self.translate_frac, [1, N], device)
            G_inv = G_inv @ translate2d_inv(w[0].mul(W * self.translate_frac_std), w[1].mul(H * self.translate_frac_std))
            labels += [w[0], w[1]]

        if G_inv is not I_3:
            images = self._apply_geometric(images, G_inv)

        # Colour transformations: compose a 4x4 affine matrix M acting on homogeneous RGB.
        I_4 = torch.eye(4, device=device)
        M = I_4
        luma_axis = misc.constant(np.asarray([1, 1, 1, 0]) / np.sqrt(3), device=device)

        if self.brightness > 0:
            w = self._gate(torch.randn([N], device=device), self.brightness, [N], device)
            b = w * self.brightness_std
            M = translate3d(b, b, b) @ M
            labels.append(w)

        if self.contrast > 0:
            w = self._gate(torch.randn([N], device=device), self.contrast, [N], device)
            c = w.mul(self.contrast_std).exp2()
            M = scale3d(c, c, c) @ M
            labels.append(w)

        if self.lumaflip > 0:
            w = self._gate(torch.randint(2, [N, 1, 1], device=device), self.lumaflip, [N, 1, 1], device)
            M = (I_4 - 2 * luma_axis.ger(luma_axis) * w) @ M
            labels.append(w)

        if self.hue > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.hue_max)
            w = self._gate(w, self.hue, [N], device)
            M = rotate3d(luma_axis, w) @ M
            labels += [w.cos() - 1, w.sin()]

        if self.saturation > 0:
            w = self._gate(torch.randn([N, 1, 1], device=device), self.saturation, [N, 1, 1], device)
            M = (luma_axis.ger(luma_axis) + (I_4 - luma_axis.ger(luma_axis)) * w.mul(self.saturation_std).exp2()) @ M
            labels.append(w)

        if M is not I_4:
            images = images.reshape([N, C, H * W])
            if C == 3:
                images = M[:, :3, :3] @ images + M[:, :3, 3:]
            elif C == 1:
                M = M[:, :3, :].mean(dim=1, keepdim=True)
                images = images * M[:, :, :3].sum(dim=2, keepdim=True) + M[:, :, 3:]
            else:
                raise ValueError('Colour augmentation needs RGB (3 channels) or L (1 channel) images')
            images = images.reshape([N, C, H, W])

        labels = torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)
        return images, labels

    @staticmethod
    def _apply_geometric(images, G_inv):
        """Resample `images` through the inverse transform G_inv [N, 3, 3] (pixel coordinates
        centred on the image): reflect-pad enough to cover the source area, upsample 2x with the
        wavelet filter, bilinear grid_sample, filter and downsample 2x, crop."""
        N, C, H, W = images.shape
        device = images.device

        # Padding needed so that every output corner maps inside the padded input.
        cx, cy = (W - 1) / 2, (H - 1) / 2
        cp = matrix([-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1], device=device)  # [corner, xyz]
        cp = G_inv @ cp.t()  # [N, xyz, corner]
        Hz = np.asarray(_SYM6, dtype=np.float32)
        Hz_pad = len(Hz) // 4
        margin = cp[:, :2, :].permute(1, 0, 2).flatten(1)  # [xy, N * corner]
        margin = torch.cat([-margin, margin]).max(dim=1).values  # [x0, y0, x1, y1]
        margin = margin + misc.constant([Hz_pad * 2 - cx, Hz_pad * 2 - cy] * 2, device=device)
        margin = margin.max(misc.constant([0, 0] * 2, device=device))
        margin = margin.min(misc.constant([W - 1, H - 1] * 2, device=device))
        mx0, my0, mx1, my1 = margin.ceil().to(torch.int32)

        images = torch.nn.functional.pad(input=images, pad=[mx0, mx1, my0, my1], mode='reflect')
        G_inv = translate2d((mx0 - mx1) / 2, (my0 - my1) / 2) @ G_inv

        # Upsample 2x: zero-stuff, then separable low-pass filter.
        weight = misc.constant(Hz[None, None, ::-1], dtype=images.dtype, device=device).tile([C, 1, 1])
        pad = (len(Hz) + 1) // 2
        images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
        images = torch.nn.functional.conv2d(images, weight.unsqueeze(2), groups=C, padding=[0, pad])
        images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
        images = torch.nn.functional.conv2d(images, weight.unsqueeze(3), groups=C, padding=[pad, 0])
        G_inv = scale2d(2, 2, device=device) @ G_inv @ scale2d_inv(2, 2, device=device)
        G_inv = translate2d(-0.5, -0.5, device=device) @ G_inv @ translate2d_inv(-0.5, -0.5, device=device)

        # Resample in normalised [-1, 1] coordinates.
        shape = [N, C, (H + Hz_pad * 2) * 2, (W + Hz_pad * 2) * 2]
        G_inv = scale2d(2 / images.shape[3], 2 / images.shape[2], device=device) @ G_inv @ scale2d_inv(2 / shape[3], 2 / shape[2], device=device)
        grid = torch.nn.functional.affine_grid(theta=G_inv[:, :2, :], size=shape, align_corners=False)
        images = torch.nn.functional.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

        # Filter, downsample 2x and crop the filter margin.
        weight = misc.constant(Hz[None, None, :], dtype=images.dtype, device=device).tile([C, 1, 1])
        pad = (len(Hz) - 1) // 2
        images = torch.nn.functional.conv2d(images, weight.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, pad])[:, :, :, Hz_pad:-Hz_pad]
        images = torch.nn.functional.conv2d(images, weight.unsqueeze(3), groups=C, stride=[2, 1], padding=[pad, 0])[:, :, Hz_pad:-Hz_pad, :]
        return images
