"""EDM's non-leaking augmentation (after ADA, "Training Generative Adversarial Networks with
Limited Data"). Each transform is applied to an image with probability `p * multiplier`; its
parameters go out as a conditioning vector ("augment labels") that lets the network learn what
was done, and sampling passes zeros, so the model generates clean images.

Options, random draws (their order included) and label layout are EDM's, so a network with
`augment_dim` trained by EDM or RDM gets the labels it expects. train.py enables xflip=1e8,
yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1: 9 label channels.

A snapshot stores this module's source and runs it inside EDM's and the reference's trees, so
it imports from torch_utils only what those trees have (misc.constant, persistence).
"""

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils import misc
from torch_utils import persistence

# Low-pass filter of the 2x resampling around geometric transforms: the Symlet-6 wavelet.
_SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
         0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
         -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148]

#----------------------------------------------------------------------------
# Homogeneous transformation matrices. An entry is a number or an [N] tensor; with any tensor
# entry the result is a batch [N, k, k], else one constant [k, k].

def matrix(*rows, device=None):
    entries = [x for row in rows for x in row]
    batch = next((x for x in entries if isinstance(x, torch.Tensor)), None)
    if batch is None:
        return misc.constant(np.asarray(rows), device=device)
    entries = [x if isinstance(x, torch.Tensor) else misc.constant(x, shape=batch.shape, device=batch.device) for x in entries]
    return torch.stack(entries, dim=-1).reshape(batch.shape + (len(rows), -1))


def translate2d(tx, ty, **kw):
    return matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], **kw)


def scale2d(sx, sy, **kw):
    return matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], **kw)


def rotate2d(theta, **kw):
    cos, sin = torch.cos(theta), torch.sin(theta)
    return matrix([cos, -sin, 0], [sin, cos, 0], [0, 0, 1], **kw)


def rotate3d(axis, theta, **kw):
    """Rotation by theta around the unit vector `axis` (Rodrigues' formula)."""
    x, y, z = axis[..., 0], axis[..., 1], axis[..., 2]
    sin, cos = torch.sin(theta), torch.cos(theta)
    one_cos = 1 - cos
    return matrix([x * x * one_cos + cos, x * y * one_cos - z * sin, x * z * one_cos + y * sin, 0],
                  [y * x * one_cos + z * sin, y * y * one_cos + cos, y * z * one_cos - x * sin, 0],
                  [z * x * one_cos - y * sin, z * y * one_cos + x * sin, z * z * one_cos + cos, 0],
                  [0, 0, 0, 1], **kw)

#----------------------------------------------------------------------------

@persistence.persistent_class
class AugmentPipe:
    """Every transform is off (multiplier 0) unless enabled, e.g. with 1."""

    def __init__(self, p=1,
        xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125,
        scale=0, rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1,
        aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125,
        brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2,
        contrast_std=0.5, hue_max=1, saturation_std=1,
    ):
        # p multiplies every probability. Exact pixel moves: x/y flips, quarter turns, integer
        # translation (reflect padding, range translate_int_max of the size). Resampled through
        # the wavelet filter: isotropic and anisotropic scaling (log2 std), rotation
        # (rotate_frac_max 1 = full circle; aniso in a frame rotated with aniso_rotate_prob),
        # fractional translation (std relative to the size). Colour: brightness (std), contrast
        # and saturation (log2 std), luma flip, hue rotation (hue_max 1 = full circle).
        for name, value in dict(locals()).items():
            if name != 'self':
                setattr(self, name, float(value))

    def _gate(self, value, multiplier, shape):
        """`value` where a uniform draw of `shape` falls below p * multiplier, else 0 (identity)."""
        return torch.where(torch.rand(shape, device=value.device) < multiplier * self.p, value, torch.zeros_like(value))

    def __call__(self, images):
        N, C, H, W = images.shape
        labels = [torch.zeros([N, 0], device=images.device)]
        images = self._move_pixels(images, labels)
        G_inv = self._geometry(N, H, W, images.device, labels)
        if G_inv is not None:
            images = _resample(images, G_inv)
        M = self._colour(N, images.device, labels)
        if M is not None:
            flat = images.reshape([N, C, H * W])
            if C == 3:
                flat = M[:, :3, :3] @ flat + M[:, :3, 3:]
            elif C == 1:  # Grey: the mean of the RGB rows.
                M = M[:, :3, :].mean(dim=1, keepdim=True)
                flat = flat * M[:, :, :3].sum(dim=2, keepdim=True) + M[:, :, 3:]
            else:
                raise ValueError('Colour augmentation needs RGB (3 channels) or L (1 channel) images')
            images = flat.reshape([N, C, H, W])
        return images, torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)

    def _move_pixels(self, images, labels):
        """Flips, quarter turns and integer translation: exact, no resampling."""
        N, C, H, W = images.shape
        device = images.device
        for multiplier, axis in [(self.xflip, 3), (self.yflip, 2)]:
            if multiplier > 0:
                flip = self._gate(torch.randint(2, [N, 1, 1, 1], device=device), multiplier, [N, 1, 1, 1])
                images = torch.where(flip == 1, images.flip(axis), images)
                labels.append(flip)
        if self.rotate_int > 0:
            turns = self._gate(torch.randint(4, [N, 1, 1, 1], device=device), self.rotate_int, [N, 1, 1, 1])
            images = torch.where((turns == 1) | (turns == 2), images.flip(3), images)
            images = torch.where((turns == 2) | (turns == 3), images.flip(2), images)
            images = torch.where((turns == 1) | (turns == 3), images.transpose(2, 3), images)
            labels += [(turns == 1) | (turns == 2), (turns == 2) | (turns == 3)]
        if self.translate_int > 0:
            shift = self._gate(torch.rand([2, N, 1, 1, 1], device=device) * 2 - 1, self.translate_int, [1, N, 1, 1, 1])
            tx = shift[0].mul(W * self.translate_int_max).round().to(torch.int64)
            ty = shift[1].mul(H * self.translate_int_max).round().to(torch.int64)
            b, c, y, x = torch.meshgrid(*(torch.arange(n, device=device) for n in images.shape), indexing='ij')
            x = W - 1 - (W - 1 - (x - tx) % (W * 2 - 2)).abs()  # Source column, mirrored at the borders.
            y = H - 1 - (H - 1 - (y + ty) % (H * 2 - 2)).abs()
            images = images.flatten()[(((b * C) + c) * H + y) * W + x]
            labels += [tx.div(W * self.translate_int_max), ty.div(H * self.translate_int_max)]
        return images

    def _geometry(self, N, H, W, device, labels):
        """The inverse transform [N, 3, 3] (output pixel -> input pixel), or None when off."""
        G_inv = eye = torch.eye(3, device=device)
        if self.scale > 0:
            w = self._gate(torch.randn([N], device=device), self.scale, [N])
            s = w.mul(self.scale_std).exp2()
            G_inv = G_inv @ scale2d(1 / s, 1 / s)
            labels.append(w)
        if self.rotate_frac > 0:
            w = self._gate((torch.rand([N], device=device) * 2 - 1) * (np.pi * self.rotate_frac_max), self.rotate_frac, [N])
            G_inv = G_inv @ rotate2d(w)
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = torch.randn([N], device=device)
            frame = (torch.rand([N], device=device) * 2 - 1) * np.pi
            w = self._gate(w, self.aniso, [N])
            frame = torch.where(torch.rand([N], device=device) < self.aniso_rotate_prob, frame, torch.zeros_like(frame))
            s = w.mul(self.aniso_std).exp2()
            G_inv = G_inv @ rotate2d(-frame) @ scale2d(1 / s, 1 / (1 / s)) @ rotate2d(frame)
            labels += [w * frame.cos(), w * frame.sin()]
        if self.translate_frac > 0:
            w = self._gate(torch.randn([2, N], device=device), self.translate_frac, [1, N])
            G_inv = G_inv @ translate2d(-w[0].mul(W * self.translate_frac_std), -w[1].mul(H * self.translate_frac_std))
            labels += [w[0], w[1]]
        return None if G_inv is eye else G_inv

    def _colour(self, N, device, labels):
        """The colour transform [N, 4, 4] on homogeneous RGB, or None when off."""
        M = eye = torch.eye(4, device=device)
        luma = misc.constant(np.asarray([1, 1, 1, 0]) / np.sqrt(3), device=device)  # The grey axis.
        if self.brightness > 0:
            w = self._gate(torch.randn([N], device=device), self.brightness, [N])
            b = w * self.brightness_std
            M = matrix([1, 0, 0, b], [0, 1, 0, b], [0, 0, 1, b], [0, 0, 0, 1]) @ M  # Shift along every channel.
            labels.append(w)
        if self.contrast > 0:
            w = self._gate(torch.randn([N], device=device), self.contrast, [N])
            c = w.mul(self.contrast_std).exp2()
            M = matrix([c, 0, 0, 0], [0, c, 0, 0], [0, 0, c, 0], [0, 0, 0, 1]) @ M  # Scale every channel.
            labels.append(w)
        if self.lumaflip > 0:
            w = self._gate(torch.randint(2, [N, 1, 1], device=device), self.lumaflip, [N, 1, 1])
            M = (eye - 2 * luma.ger(luma) * w) @ M
            labels.append(w)
        if self.hue > 0:
            w = self._gate((torch.rand([N], device=device) * 2 - 1) * (np.pi * self.hue_max), self.hue, [N])
            M = rotate3d(luma, w) @ M
            labels += [w.cos() - 1, w.sin()]
        if self.saturation > 0:
            w = self._gate(torch.randn([N, 1, 1], device=device), self.saturation, [N, 1, 1])
            M = (luma.ger(luma) + (eye - luma.ger(luma)) * w.mul(self.saturation_std).exp2()) @ M
            labels.append(w)
        return None if M is eye else M

#----------------------------------------------------------------------------
# Resampling through an inverse transform: reflect-pad what the output can reach, upsample 2x
# with the wavelet filter, bilinear grid_sample, low-pass and downsample 2x, crop.

def _upsample2x(images, taps, dim):
    """A zero after every sample along `dim` (3 = width, 2 = height; the last one dropped), then
    the low-pass filter along it."""
    stuffed = torch.stack([images, torch.zeros_like(images)], dim=dim + 1).flatten(dim, dim + 1)
    stuffed = stuffed.narrow(dim, 0, stuffed.shape[dim] - 1)
    pad = (taps.shape[-1] + 1) // 2
    return F.conv2d(stuffed, taps.unsqueeze(5 - dim), groups=images.shape[1], padding=[0, pad] if dim == 3 else [pad, 0])


def _downsample2x(images, taps, dim, crop):
    """Low-pass along `dim`, every second sample, minus `crop` samples at both ends."""
    pad = (taps.shape[-1] - 1) // 2
    out = F.conv2d(images, taps.unsqueeze(5 - dim), groups=images.shape[1],
                   stride=[1, 2] if dim == 3 else [2, 1], padding=[0, pad] if dim == 3 else [pad, 0])
    return out.narrow(dim, crop, out.shape[dim] - 2 * crop)


def _resample(images, G_inv):
    N, C, H, W = images.shape
    device = images.device
    taps = np.asarray(_SYM6, dtype=np.float32)
    crop = len(taps) // 4

    # Padding: where the output's corners come from, plus the filter's reach, within one image size.
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = G_inv @ matrix([-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1], device=device).t()  # [N, xyz, corner]
    reach = corners[:, :2, :].permute(1, 0, 2).flatten(1)  # [xy, N * corner]
    pad = torch.cat([-reach, reach]).max(dim=1).values + misc.constant([crop * 2 - cx, crop * 2 - cy] * 2, device=device)
    pad = pad.max(misc.constant([0, 0] * 2, device=device)).min(misc.constant([W - 1, H - 1] * 2, device=device))
    left, top, right, bottom = pad.ceil().to(torch.int32)
    images = F.pad(input=images, pad=[left, right, top, bottom], mode='reflect')
    G_inv = translate2d((left - right) / 2, (top - bottom) / 2) @ G_inv

    up = misc.constant(taps[None, None, ::-1], dtype=images.dtype, device=device).tile([C, 1, 1])
    images = _upsample2x(_upsample2x(images, up, 3), up, 2)
    G_inv = scale2d(2, 2, device=device) @ G_inv @ scale2d(1 / 2, 1 / 2, device=device)
    G_inv = translate2d(-0.5, -0.5, device=device) @ G_inv @ translate2d(0.5, 0.5, device=device)

    # grid_sample works in [-1, 1] coordinates of the input and the output.
    shape = [N, C, (H + crop * 2) * 2, (W + crop * 2) * 2]
    to_unit = scale2d(2 / images.shape[3], 2 / images.shape[2], device=device)
    from_unit = scale2d(1 / (2 / shape[3]), 1 / (2 / shape[2]), device=device)
    grid = F.affine_grid(theta=(to_unit @ G_inv @ from_unit)[:, :2, :], size=shape, align_corners=False)
    images = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

    down = misc.constant(taps[None, None, :], dtype=images.dtype, device=device).tile([C, 1, 1])
    return _downsample2x(_downsample2x(images, down, 3, crop), down, 2, crop)
