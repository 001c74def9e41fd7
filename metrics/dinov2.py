"""DINOv2 ViT feature detector for FD-DINOv2 (Stein et al. 2023, as EDM2 reports it).

    det = load_dinov2(spec, device)   # spec: path or URL of a DINOv2 `*_pretrain.pth`
    out = det(images)                 # uint8 [N, C, H, W] -> dict(dinov2=[N, D] float32)

The architecture is DINOv2's plain ViT with layer scale and no register tokens, written here with
the official parameter names, so the released `dinov2_vitl14_pretrain.pth` (a plain state dict)
loads one to one with torch.load(weights_only=True): nothing in the file is executed.

    cls_token [1, 1, D]   pos_embed [1, 1 + (518/14)^2, D]   mask_token [1, D]
    patch_embed.proj.{weight [D, 3, 14, 14], bias}
    blocks.<i>.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}
    norm.{weight, bias}

The feature is the CLS token after the final LayerNorm (the model's forward output, 1024-d for
ViT-L/14). Preprocessing follows EDM2's detector: bicubic resize with antialiasing of the uint8
values (as float32, 0..255) to 224x224, then /255 and ImageNet mean/std normalisation. At 224 px
the 37x37 grid of position embeddings is resampled to 16x16 the way DINOv2 does it: bicubic
without antialiasing, with the scale factor (16 + 0.1) / 37 rather than a target size.
"""

import collections
import math

import torch

import dnnlib

DINOV2_VITL14_URL = 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth'
DINOV2_MAX_BYTES = 2 << 30          # ViT-L/14 weights are ~1.2 GB (304M float32 parameters).
RESOLUTION = 224                    # EDM2 / dgm-eval input size.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_DIM = 64                       # Every released DINOv2 ViT has 64 channels per head.
POS_EMBED_OFFSET = 0.1              # DINOv2's interpolate_offset.


#----------------------------------------------------------------------------
# Architecture.

class Attention(torch.nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = torch.nn.Linear(dim, dim * 3)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # Scale 1/sqrt(head dim).
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Block(torch.nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = torch.nn.ParameterDict(dict(gamma=torch.nn.Parameter(torch.ones(dim))))  # The release's names: ls1.gamma.
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.mlp = torch.nn.Sequential(collections.OrderedDict(
            fc1=torch.nn.Linear(dim, int(dim * mlp_ratio)), act=torch.nn.GELU(), fc2=torch.nn.Linear(int(dim * mlp_ratio), dim)))
        self.ls2 = torch.nn.ParameterDict(dict(gamma=torch.nn.Parameter(torch.ones(dim))))

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) * self.ls1.gamma
        return x + self.mlp(self.norm2(x)) * self.ls2.gamma


class DINOv2ViT(torch.nn.Module):
    """DINOv2 backbone; forward(x) takes normalised float images and returns the CLS feature."""

    def __init__(self, dim=1024, depth=24, num_heads=16, patch_size=14, img_size=518, mlp_ratio=4, in_channels=3):
        super().__init__()
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.patch_embed = torch.nn.ModuleDict(dict(proj=torch.nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)))
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
        self.mask_token = torch.nn.Parameter(torch.zeros(1, dim))  # Training only; kept so the release loads strictly.
        self.blocks = torch.nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)

    def position_embeddings(self, h, w):
        """Position embeddings for an h x w image, resampled as DINOv2 does (see module doc)."""
        gh, gw = h // self.patch_size, w // self.patch_size
        if gh == self.grid and gw == self.grid:
            return self.pos_embed
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        scale = ((gh + POS_EMBED_OFFSET) / self.grid, (gw + POS_EMBED_OFFSET) / self.grid)
        grid = torch.nn.functional.interpolate(grid, scale_factor=scale, mode='bicubic', antialias=False)
        assert grid.shape[-2:] == (gh, gw)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(self.pos_embed.dtype)

    def forward(self, x):
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [N, tokens, D], row-major patches.
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embeddings(x.shape[2], x.shape[3])
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


def config_from_state_dict(state):
    """Constructor arguments of DINOv2ViT that fit a state dict with the official key names."""
    try:
        dim = state['cls_token'].shape[-1]
        patch_size = state['patch_embed.proj.weight'].shape[-1]
        grid = math.isqrt(state['pos_embed'].shape[1] - 1)
        depth = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
        hidden = state['blocks.0.mlp.fc1.weight'].shape[0]
    except (KeyError, IndexError, AttributeError) as err:
        raise ValueError(f'not a DINOv2 ViT state dict (missing or malformed {err})') from None
    if dim % HEAD_DIM != 0 or hidden % dim != 0 or depth == 0:
        raise ValueError(f'not a DINOv2 ViT state dict (width {dim}, MLP {hidden}, {depth} blocks)')
    return dict(dim=dim, depth=depth, num_heads=dim // HEAD_DIM, patch_size=patch_size,
                img_size=grid * patch_size, mlp_ratio=hidden // dim)

#----------------------------------------------------------------------------
# Detector.

class DINOv2Detector(torch.nn.Module):
    """uint8-valued images [N, C, H, W] -> dict(dinov2=CLS features), with EDM2's preprocessing."""

    def __init__(self, net):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def preprocess(self, images):
        x = images.to(self.net.cls_token.device, torch.float32)
        x = x.repeat([1, 3, 1, 1]) if x.shape[1] == 1 else x
        x = torch.nn.functional.interpolate(x, size=(RESOLUTION, RESOLUTION), mode='bicubic', antialias=True) / 255
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        return (x - mean) / std

    def forward(self, images):
        return {'dinov2': self.net(self.preprocess(images)).to(torch.float32)}  # The key in activation files.


def load_dinov2(spec=DINOV2_VITL14_URL, device=torch.device('cpu'), verbose=True):
    """DINOv2Detector from a plain state dict (path or URL), read with weights_only=True."""
    try:
        path = dnnlib.util.open_url(spec, verbose=verbose, return_filename=True, max_bytes=DINOV2_MAX_BYTES)
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError('not a DINOv2 state dict (expected a dict of tensors)')
        with torch.device('meta'):  # No second copy of the weights: the loaded tensors are assigned.
            net = DINOv2ViT(**config_from_state_dict(state))
        net.load_state_dict(state, strict=True, assign=True)  # Names and shapes must fit exactly.
    except Exception as err:  # pylint: disable=broad-exception-caught  # torch.load and load_state_dict raise many kinds.
        raise dnnlib.UserError(f'cannot load DINOv2 weights {spec}: {" ".join(str(err).split()[:40])}') from None
    return DINOv2Detector(net.to(device=device, dtype=torch.float32))
