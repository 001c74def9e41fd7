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

import collections

import numpy as np
import torch
from torch.nn import functional as F

#----------------------------------------------------------------------------

def BasicConv2d(in_channels, out_channels, **conv_kwargs):  # pylint: disable=invalid-name  # torchvision's name.
    """Convolution, batch norm (TF's epsilon; used in eval mode, with running statistics), ReLU."""
    return torch.nn.Sequential(collections.OrderedDict(conv=torch.nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs),
                                                       bn=torch.nn.BatchNorm2d(out_channels, eps=0.001), relu=torch.nn.ReLU()))


# Pooling steps of the mixed blocks: TF's 'SAME' 3x3 average (padded positions not counted), the
# 3x3 stride-2 max pool of the grid reductions, and mixed_10's padded stride-1 max pool (a TF quirk).
POOLS = {
    'avg': lambda x: F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False),
    'max': lambda x: F.max_pool2d(x, kernel_size=3, stride=2),
    'max1': lambda x: F.max_pool2d(x, kernel_size=3, stride=1, padding=1),
}


class Mixed(torch.nn.Module):
    """A mixed block: parallel branches, concatenated. `convs`: name -> (in, out, kernel, stride,
    padding) of each BasicConv2d, in torchvision's names; `branches`: the steps of each branch, a
    conv name, a pool of POOLS, or a tuple of conv names applied side by side and concatenated."""

    def __init__(self, convs, branches):
        super().__init__()
        for name, (cin, cout, kernel, stride, padding) in convs.items():
            setattr(self, name, BasicConv2d(cin, cout, kernel_size=kernel, stride=stride, padding=padding))
        self.branches = branches

    def step(self, x, step):
        if isinstance(step, tuple):
            return torch.cat([getattr(self, name)(x) for name in step], dim=1)
        return POOLS[step](x) if step in POOLS else getattr(self, step)(x)

    def forward(self, x):
        outs = []
        for branch in self.branches:
            y = x
            for step in branch:
                y = self.step(y, step)
            outs.append(y)
        return torch.cat(outs, dim=1)


K17, K71, P17, P71 = (1, 7), (7, 1), (0, 3), (3, 0)  # The factorised 7x7 convolutions and their padding.


def mixed_a(c, pool):  # mixed, mixed_1, mixed_2 (35x35)
    return Mixed(dict(branch1x1=(c, 64, 1, 1, 0), branch5x5_1=(c, 48, 1, 1, 0), branch5x5_2=(48, 64, 5, 1, 2),
                      branch3x3dbl_1=(c, 64, 1, 1, 0), branch3x3dbl_2=(64, 96, 3, 1, 1), branch3x3dbl_3=(96, 96, 3, 1, 1),
                      branch_pool=(c, pool, 1, 1, 0)),
                 [['branch1x1'], ['branch5x5_1', 'branch5x5_2'], ['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'], ['avg', 'branch_pool']])


def mixed_b(c):  # mixed_3 (35x35 -> 17x17)
    return Mixed(dict(branch3x3=(c, 384, 3, 2, 0), branch3x3dbl_1=(c, 64, 1, 1, 0), branch3x3dbl_2=(64, 96, 3, 1, 1),
                      branch3x3dbl_3=(96, 96, 3, 2, 0)),
                 [['branch3x3'], ['branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'], ['max']])


def mixed_c(c, c7):  # mixed_4 .. mixed_7 (17x17); branch1x1 of mixed_6 is mixed_6/conv, the sFID layer.
    return Mixed(dict(branch1x1=(c, 192, 1, 1, 0), branch7x7_1=(c, c7, 1, 1, 0), branch7x7_2=(c7, c7, K17, 1, P17),
                      branch7x7_3=(c7, 192, K71, 1, P71), branch7x7dbl_1=(c, c7, 1, 1, 0), branch7x7dbl_2=(c7, c7, K71, 1, P71),
                      branch7x7dbl_3=(c7, c7, K17, 1, P17), branch7x7dbl_4=(c7, c7, K71, 1, P71), branch7x7dbl_5=(c7, 192, K17, 1, P17),
                      branch_pool=(c, 192, 1, 1, 0)),
                 [['branch1x1'], ['branch7x7_1', 'branch7x7_2', 'branch7x7_3'],
                  ['branch7x7dbl_1', 'branch7x7dbl_2', 'branch7x7dbl_3', 'branch7x7dbl_4', 'branch7x7dbl_5'], ['avg', 'branch_pool']])


def mixed_d(c):  # mixed_8 (17x17 -> 8x8)
    return Mixed(dict(branch3x3_1=(c, 192, 1, 1, 0), branch3x3_2=(192, 320, 3, 2, 0), branch7x7x3_1=(c, 192, 1, 1, 0),
                      branch7x7x3_2=(192, 192, K17, 1, P17), branch7x7x3_3=(192, 192, K71, 1, P71), branch7x7x3_4=(192, 192, 3, 2, 0)),
                 [['branch3x3_1', 'branch3x3_2'], ['branch7x7x3_1', 'branch7x7x3_2', 'branch7x7x3_3', 'branch7x7x3_4'], ['max']])


def mixed_e(c, pool):  # mixed_9 ('avg'), mixed_10 ('max1') (8x8)
    return Mixed(dict(branch1x1=(c, 320, 1, 1, 0), branch3x3_1=(c, 384, 1, 1, 0), branch3x3_2a=(384, 384, (1, 3), 1, (0, 1)),
                      branch3x3_2b=(384, 384, (3, 1), 1, (1, 0)), branch3x3dbl_1=(c, 448, 1, 1, 0), branch3x3dbl_2=(448, 384, 3, 1, 1),
                      branch3x3dbl_3a=(384, 384, (1, 3), 1, (0, 1)), branch3x3dbl_3b=(384, 384, (3, 1), 1, (1, 0)),
                      branch_pool=(c, 192, 1, 1, 0)),
                 [['branch1x1'], ['branch3x3_1', ('branch3x3_2a', 'branch3x3_2b')],
                  ['branch3x3dbl_1', 'branch3x3dbl_2', ('branch3x3dbl_3a', 'branch3x3dbl_3b')], [pool, 'branch_pool']])

#----------------------------------------------------------------------------

def tf_resize_bilinear(x, height, width):
    """tf.image.resize_bilinear(align_corners=False) of the 2015 graph: source coordinate =
    destination * (in / out), no half-pixel offset, edge clamped. x: float32 NCHW."""
    in_h, in_w = x.shape[2], x.shape[3]
    if (in_h, in_w) == (height, width):
        return x

    def axis(in_size, out_size):  # Source rows or columns below and above, and the weight of the one above.
        src = np.arange(out_size, dtype=np.float32) * (np.float32(in_size) / np.float32(out_size))  # float32 as in TF's kernel.
        lo = np.floor(src).astype(np.int64)
        frac = (src - lo.astype(np.float32)).astype(np.float32)
        return [torch.from_numpy(a).to(x.device) for a in (lo, np.minimum(lo + 1, in_size - 1), frac)]

    (y0, y1, fy), (x0, x1, fx) = axis(in_h, height), axis(in_w, width)
    top, bottom = x[:, :, y0], x[:, :, y1]
    t = top[..., x0] + (top[..., x1] - top[..., x0]) * fx
    b = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * fx
    return t + (b - t) * fy[:, None]


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
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = mixed_a(192, 32), mixed_a(256, 64), mixed_a(288, 64)
        self.Mixed_6a = mixed_b(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (mixed_c(768, c7) for c7 in (128, 160, 160, 192))
        self.Mixed_7a = mixed_d(768)
        self.Mixed_7b, self.Mixed_7c = mixed_e(1280, 'avg'), mixed_e(2048, 'max1')
        self.fc = torch.nn.Linear(2048, num_classes)

    def forward(self, images):
        x = images.to(self.fc.weight.device, torch.float32)
        if x.shape[1] == 1:
            x = x.repeat([1, 3, 1, 1])
        x = tf_resize_bilinear(x, self.resolution, self.resolution)
        x = (x - 128) * 0.0078125
        x = POOLS['max'](self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = POOLS['max'](self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c]:
            x = block(x)
        spatial = self.Mixed_6d.branch1x1(x)  # mixed_6/conv (computed twice; cheap next to the rest).
        for block in [self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c]:
            x = block(x)
        feat = x.mean(dim=[2, 3])  # pool_3: 8x8 average.
        return dict(feat=feat, s_feat=spatial[:, :self.spatial_channels].flatten(1), logits=feat @ self.fc.weight.T)


def load_inception_state_dict(state_dict, resolution=299):
    """Build InceptionV3 (in eval mode) from a pytorch-fid style state dict (torchvision names).
    Ignores the auxiliary classifier; BatchNorm's num_batches_tracked (unused in eval mode) may be
    absent; anything else must match."""
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith('AuxLogits.')}
    with torch.device('meta'):  # No random init: every tensor comes from the file.
        net = InceptionV3(resolution=resolution, num_classes=state_dict['fc.weight'].shape[0])
    state_dict = {**{k: torch.tensor(0) for k in net.state_dict() if k.endswith('.num_batches_tracked')}, **state_dict}
    missing, unexpected = net.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f'not an Inception-v3 state dict: missing {missing[:3]}, unexpected {unexpected[:3]}')
    return net.to(torch.float32).eval().requires_grad_(False)

#----------------------------------------------------------------------------
