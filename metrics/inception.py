"""Inception-v3 as in TensorFlow's 2015-12-05 graph (the FID/IS/sFID detector), for the public
pytorch-fid weights file `pt_inception-2015-12-05-6726825d.pth` (a plain state dict with
torchvision's parameter names; load it with `load_inception_state_dict`).

Differences from torchvision's Inception3, all from the TF graph (pytorch-fid notes the same):
average pools in the A, C and first E blocks exclude the zero padding from the mean; the last E
block (mixed_10) uses a max pool in its pool branch; the classifier has 1008 outputs. In front
of the network, as in the graph: uint8-valued images are resized to 299x299 with TF's legacy
bilinear resize (align_corners=False, no half-pixel centres) and mapped by (x - 128) / 128.

Outputs: `feat` = pool_3 (2048), `s_feat` = first 7 channels of mixed_6/conv (the 1x1 branch
of Mixed_6d, after ReLU) flattened in channel-major (C, H, W) order = 7*17*17 = 2023 as the
reference's NVIDIA detector hook gives them, `logits` = feat @ W^T (no bias, see
inception_score.py).
"""

import numpy as np
import torch
from torch.nn import functional as F

#----------------------------------------------------------------------------

class BatchNorm(torch.nn.Module):
    """Inference-only batch norm (TF eps 0.001) with torchvision's parameter names."""

    def __init__(self, channels, eps=0.001):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones([channels]))
        self.bias = torch.nn.Parameter(torch.zeros([channels]))
        self.register_buffer('running_mean', torch.zeros([channels]))
        self.register_buffer('running_var', torch.ones([channels]))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class BasicConv2d(torch.nn.Module):
    def __init__(self, in_channels, out_channels, **conv_kwargs):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = BatchNorm(out_channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x):
    # TF 'SAME' 3x3 average pool: padded positions do not count in the mean.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(torch.nn.Module):  # mixed, mixed_1, mixed_2 (35x35)
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_same(x))
        return torch.cat([a, b, c, d], dim=1)


class InceptionB(torch.nn.Module):  # mixed_3 (35x35 -> 17x17)
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], dim=1)


class InceptionC(torch.nn.Module):  # mixed_4 .. mixed_7 (17x17)
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch1x1(x)  # For mixed_6 this is mixed_6/conv, the sFID layer.
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in [self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5]:
            c = layer(c)
        d = self.branch_pool(_avg_pool_same(x))
        return torch.cat([a, b, c, d], dim=1)


class InceptionD(torch.nn.Module):  # mixed_8 (17x17 -> 8x8)
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], dim=1)


class InceptionE(torch.nn.Module):  # mixed_9 (avg pool), mixed_10 (max pool) (8x8)
    def __init__(self, in_channels, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], dim=1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], dim=1)
        if self.max_pool:  # TF graph quirk in mixed_10.
            d = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            d = _avg_pool_same(x)
        d = self.branch_pool(d)
        return torch.cat([a, b, c, d], dim=1)

#----------------------------------------------------------------------------

def tf_resize_bilinear(x, height, width):
    """tf.image.resize_bilinear(align_corners=False) of the 2015 graph: source coordinate =
    destination * (in / out), no half-pixel offset, edge clamped. x: float32 NCHW."""
    in_h, in_w = x.shape[2], x.shape[3]
    if (in_h, in_w) == (height, width):
        return x

    def axis(in_size, out_size):
        scale = np.float32(in_size) / np.float32(out_size)  # float32 as in TF's kernel.
        src = np.arange(out_size, dtype=np.float32) * scale
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, in_size - 1)
        frac = (src - lo.astype(np.float32)).astype(np.float32)
        to = lambda a: torch.from_numpy(a).to(x.device)
        return to(lo), to(hi), to(frac)

    y0, y1, fy = axis(in_h, height)
    x0, x1, fx = axis(in_w, width)
    top, bottom = x[:, :, y0], x[:, :, y1]
    tl, tr, bl, br = top[..., x0], top[..., x1], bottom[..., x0], bottom[..., x1]
    fx = fx[None, None, None, :]
    t = tl + (tr - tl) * fx
    b = bl + (br - bl) * fx
    return t + (b - t) * fy[None, None, :, None]


class InceptionV3(torch.nn.Module):
    """forward(images) with images uint8-valued [N, 3, H, W] (any dtype, 0..255) returns
    dict(feat=[N, 2048], s_feat=[N, 7*h*w], logits=[N, 1008]), float32.

    `resolution` is the size the input is resized to: 299 for the real detector; tests may use
    a smaller one (>= 75) for speed with randomly initialised weights.
    """

    def __init__(self, resolution=299, num_classes=1008, spatial_channels=7):
        super().__init__()
        self.resolution = resolution
        self.spatial_channels = spatial_channels
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = torch.nn.Linear(2048, num_classes)

    def forward(self, images):
        x = images.to(torch.float32)
        if x.shape[1] == 1:
            x = x.repeat([1, 3, 1, 1])
        x = tf_resize_bilinear(x, self.resolution, self.resolution)
        x = (x - 128) * 0.0078125
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c]:
            x = block(x)
        spatial = self.Mixed_6d.branch1x1(x)  # mixed_6/conv (computed twice; cheap next to the rest).
        for block in [self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c]:
            x = block(x)
        feat = x.mean(dim=[2, 3])  # pool_3: 8x8 average.
        s_feat = spatial[:, :self.spatial_channels].flatten(1)
        logits = feat @ self.fc.weight.T
        return dict(feat=feat, s_feat=s_feat, logits=logits)


def load_inception_state_dict(state_dict, resolution=299):
    """Build InceptionV3 from a pytorch-fid style state dict (torchvision names). Ignores the
    auxiliary classifier and BatchNorm's num_batches_tracked; anything else must match."""
    state_dict = {k: v for k, v in state_dict.items()
                  if not k.startswith('AuxLogits.') and not k.endswith('.num_batches_tracked')}
    with torch.device('meta'):  # No random init: every tensor comes from the file.
        net = InceptionV3(resolution=resolution, num_classes=state_dict['fc.weight'].shape[0])
    missing, unexpected = net.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f'not an Inception-v3 state dict: missing {missing[:3]}, unexpected {unexpected[:3]}')
    return net.to(torch.float32).eval().requires_grad_(False)

#----------------------------------------------------------------------------
