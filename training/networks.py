"""The denoiser networks: two U-Nets (DDPM++/NCSN++ as `SongUNet`, ADM as `DhariwalUNet`) and the
four preconditioning wrappers (VP, VE, iDDPM, EDM) that turn a U-Net into D(x; sigma).

Published EDM and RDM checkpoints must load into these classes and give the same numbers, so the
facts are theirs: class names, constructor arguments and defaults, parameter names and module
nesting (`model.enc['32x32_block0'].conv0.weight`, ...), the order in which layers are created
(it fixes the random draws of a seeded initialisation) and the order of the arithmetic (it fixes
the bits of every output). Both RDM stages use `EDMPrecond`; the second stage's blurring lives in
the loss and the sampler, not here.

This file's text is also pickled into every snapshot (`module_src`) and executed inside EDM's and
the reference's own trees, so it may import only numpy, torch and `torch_utils.persistence`.

`eff_attn=True` computes attention with `torch.nn.functional.scaled_dot_product_attention`
(fused kernels on CUDA; the reference used xformers there); the default path forms the full
token-by-token weight matrix in float32.
"""

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence

#----------------------------------------------------------------------------
# Initialisation: a unit draw (uniform in [-1, 1) or standard normal) times a gain set by the fans.

_INIT_GAINS = {
    'xavier_uniform':  ('uniform', lambda fan_in, fan_out: np.sqrt(6 / (fan_in + fan_out))),
    'xavier_normal':   ('normal',  lambda fan_in, fan_out: np.sqrt(2 / (fan_in + fan_out))),
    'kaiming_uniform': ('uniform', lambda fan_in, fan_out: np.sqrt(3 / fan_in)),
    'kaiming_normal':  ('normal',  lambda fan_in, fan_out: np.sqrt(1 / fan_in)),
}


def weight_init(shape, mode, fan_in, fan_out):
    kind, gain = _INIT_GAINS[mode]
    unit = torch.rand(*shape) * 2 - 1 if kind == 'uniform' else torch.randn(*shape)
    return gain(fan_in, fan_out) * unit


def _parameter(shape, scale, init_mode, fan_in, fan_out):
    return torch.nn.Parameter(weight_init(shape, init_mode, fan_in, fan_out) * scale)

#----------------------------------------------------------------------------
# Layers. Parameters stay float32 and are cast to the activations' dtype at every call, so one
# set of weights serves float32, float16 and bfloat16 passes.

@persistence.persistent_class
class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(init_mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = _parameter([out_features, in_features], init_weight, **fans)
        self.bias = _parameter([out_features], init_bias, **fans) if bias else None

    def forward(self, x):
        y = x @ self.weight.to(x.dtype).t()
        return y if self.bias is None else y.add_(self.bias.to(x.dtype))


def _fir(x, f, up, pad):
    """2x up- or downsampling of every channel by the normalised 2D filter f [1, 1, k, k]."""
    per_channel = f.tile([x.shape[1], 1, 1, 1])
    if up:  # Transposed convolution; the gain of 4 keeps the mean.
        return torch.nn.functional.conv_transpose2d(x, per_channel.mul(4), groups=x.shape[1], stride=2, padding=pad)
    return torch.nn.functional.conv2d(x, per_channel, groups=x.shape[1], stride=2, padding=pad)


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """A k x k convolution, optionally preceded (up) or preceded/followed (down) by a 2x FIR
    resampling. kernel=0: the resampling alone, without weights. fused_resample: the resampling
    and the convolution share their padding (upsampling first; downsampling after the
    convolution), as NCSN++'s residual encoder wants."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=[1,1],
                 fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        assert not (up and down)
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(init_mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = _parameter([out_channels, in_channels, kernel, kernel], init_weight, **fans) if kernel else None
        self.bias = _parameter([out_channels], init_bias, **fans) if kernel and bias else None
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        fir = torch.outer(taps, taps)[None, None] / taps.sum().square()  # Sums to one.
        self.register_buffer('resample_filter', fir if up or down else None)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        fused = self.fused_resample and w is not None
        if self.up:  # Fused: the upsampling takes over part of the convolution's padding.
            x = _fir(x, f, up=True, pad=max(f_pad - w_pad, 0) if fused else f_pad)
            w_pad = max(w_pad - f_pad, 0) if fused else w_pad
        if self.down and not fused:
            x = _fir(x, f, up=False, pad=f_pad)
        if w is not None:
            x = torch.nn.functional.conv2d(x, w, padding=w_pad + f_pad if self.down and fused else w_pad)
        if self.down and fused:
            x = _fir(x, f, up=False, pad=0)
        return x if self.bias is None else x.add_(self.bias.to(x.dtype).reshape(1, -1, 1, 1))


@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Group normalisation with at most `num_groups` groups of at least `min_channels_per_group`."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps

    def forward(self, x):
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=weight, bias=bias, eps=self.eps)

#----------------------------------------------------------------------------
# Attention over the tokens of [batch * heads, channels, tokens] tensors.

class AttentionOp(torch.autograd.Function):
    """The weights softmax(q^T k / sqrt(channels)), computed in float32 forwards and backwards
    whatever the dtype of q and k (which the result and the gradients keep)."""

    @staticmethod
    def forward(ctx, q, k):
        f32 = torch.float32
        logits = torch.einsum('ncq,nck->nqk', q.to(f32), (k / np.sqrt(k.shape[1])).to(f32))
        weights = logits.softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, weights)
        return weights

    @staticmethod
    def backward(ctx, grad_weights):
        q, k, weights = ctx.saved_tensors
        f32 = torch.float32
        grad_logits = torch._softmax_backward_data(grad_output=grad_weights.to(f32), output=weights.to(f32), dim=2, input_dtype=f32)
        grad_q = torch.einsum('nck,nqk->ncq', k.to(f32), grad_logits).to(q.dtype) / np.sqrt(k.shape[1])
        grad_k = torch.einsum('ncq,nqk->nck', q.to(f32), grad_logits).to(k.dtype) / np.sqrt(k.shape[1])
        return grad_q, grad_k


def plain_attention(q, k, v):
    return torch.einsum('nqk,nck->ncq', AttentionOp.apply(q, k), v)


def sdpa_attention(q, k, v, num_heads):
    """plain_attention's result through scaled_dot_product_attention, which wants
    [batch, heads, tokens, channels] with the channels contiguous."""
    n, c, t = q.shape
    q, k, v = (z.reshape(n // num_heads, num_heads, c, t).transpose(2, 3).contiguous() for z in (q, k, v))
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return a.transpose(2, 3).reshape(n, c, t)

#----------------------------------------------------------------------------
# The residual block of all three architectures: two normalise-SiLU-convolve steps with the
# embedding added (or applied as scale and shift, `adaptive_scale`) in between, a shortcut that
# projects when the shape changes, and optional self-attention after it.

@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False, num_heads=None,
                 channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5, resample_filter=[1,1], resample_proj=False,
                 adaptive_scale=True, init=dict(), init_zero=dict(init_weight=0), init_attn=None, eff_attn=False):
        super().__init__()
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = (num_heads if num_heads is not None else out_channels // channels_per_head) if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale, self.eff_attn = dropout, skip_scale, adaptive_scale, eff_attn
        resample = dict(up=up, down=down, resample_filter=resample_filter)

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, **resample, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)
        self.skip = None
        if in_channels != out_channels or up or down:
            # A 1x1 projection where the channels change (or where asked); resampling alone otherwise.
            skip_kernel = 1 if (resample_proj or in_channels != out_channels) else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=skip_kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels * 3, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        h = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = silu(self.norm1(h.add_(params)))
        h = self.conv1(torch.nn.functional.dropout(h, p=self.dropout, training=self.training))
        h = h.add_(x if self.skip is None else self.skip(x)) * self.skip_scale
        return self._attend(h) if self.num_heads else h

    def _attend(self, x):
        # The qkv channels are laid out [head, channel, (q, k, v)].
        n, c = x.shape[:2]
        q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
        a = sdpa_attention(q, k, v, self.num_heads) if self.eff_attn else plain_attention(q, k, v)
        return self.proj(a.reshape(*x.shape)).add_(x) * self.skip_scale

#----------------------------------------------------------------------------
# Noise-level embeddings: [cos, sin] of the level times a set of frequencies.

@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    """Geometric frequencies from 1 down to 1/max_positions (reached only with `endpoint`)."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - 1 if self.endpoint else half)
        angles = torch.outer(x, ((1 / self.max_positions) ** exponents).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    """Random frequencies, drawn once (a buffer, saved with the weights)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        angles = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)

#----------------------------------------------------------------------------
# What the two U-Nets share: the layout of their encoder and decoder. Keys are
# '<res>x<res>_<role>'; the encoder keeps every non-auxiliary output for the decoder, whose
# blocks take it back (concatenated) wherever their input is wider than the running tensor.

def _levels(img_resolution, channel_mult, model_channels):
    """(level, resolution, channels) from the finest level to the coarsest."""
    return [(level, img_resolution >> level, model_channels * mult) for level, mult in enumerate(channel_mult)]


def _drop_labels(labels, p, training, x):
    """Classifier-free guidance training: zero each sample's labels with probability p."""
    if training and p:
        keep = torch.rand([x.shape[0], 1], device=x.device) >= p
        labels = labels * keep.to(labels.dtype)
    return labels


def _role(key):
    return key.split('_', 1)[1]


def _add_encoder(enc, levels, first_conv, block, num_blocks, attn_resolutions, add_aux=None):
    """The encoder from the finest level: first_conv there, a downsampling block on every other
    level (after which add_aux(at, channels) adds that level's 'aux' layers), then num_blocks
    blocks per level. Returns the output channels of each non-auxiliary layer, for the decoder."""
    for level, res, level_channels in levels:
        at = f'{res}x{res}'
        if level == 0:
            enc[f'{at}_conv'] = first_conv
            channels = first_conv.out_channels
        else:
            enc[f'{at}_down'] = block(channels, channels, down=True)
            if add_aux is not None:
                add_aux(at, channels)
        for i in range(num_blocks):
            enc[f'{at}_block{i}'] = block(channels, level_channels, attention=res in attn_resolutions)
            channels = level_channels
    return [layer.out_channels for key, layer in enc.items() if not _role(key).startswith('aux')]


def _add_decoder(dec, levels, channels, skips, block, num_blocks, attention, add_heads=None):
    """The decoder from the coarsest level: two blocks there (an upsampling one elsewhere), then
    num_blocks + 1 blocks that each take back a skip; attention(i, res) says which blocks attend,
    add_heads(level, at, channels) adds a level's output layers."""
    for level, res, level_channels in reversed(levels):
        at = f'{res}x{res}'
        if level == len(levels) - 1:
            dec[f'{at}_in0'] = block(channels, channels, attention=True)
            dec[f'{at}_in1'] = block(channels, channels)
        else:
            dec[f'{at}_up'] = block(channels, channels, up=True)
        for i in range(num_blocks + 1):
            cin, channels = channels + skips.pop(), level_channels
            dec[f'{at}_block{i}'] = block(cin, channels, attention=attention(i, res))
        if add_heads is not None:
            add_heads(level, at, channels)
    return channels


def _encode(enc, x, emb):
    """The encoder's last output and the outputs kept for the decoder. The 'aux' layers of the
    'skip' and 'residual' encoders run a second path fed by the image, resampled."""
    skips, aux = [], x
    for key, layer in enc.items():
        role = _role(key)
        if role == 'aux_down':
            aux = layer(aux)
        elif role == 'aux_skip':
            x = skips[-1] = x + layer(aux)
        elif role == 'aux_residual':
            x = skips[-1] = aux = (x + layer(aux)) / np.sqrt(2)
        else:
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
    return x, skips


def _decode(dec, x, emb, skips):
    """The decoder's last output and the sum of its 'aux_conv' heads (None without heads)."""
    out = normed = None
    for key, layer in dec.items():
        role = _role(key)
        if role == 'aux_up':
            out = layer(out)
        elif role == 'aux_norm':
            normed = layer(x)
        elif role == 'aux_conv':
            head = layer(silu(normed))
            out = head if out is None else head + out
        else:
            if x.shape[1] != layer.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
    return x, out

#----------------------------------------------------------------------------
# DDPM++ / NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through Stochastic
# Differential Equations"), in EDM's form.
#
# Arguments: image resolution and channels in/out, number of class labels (0: unconditional)
# and of augmentation labels (0: none); model_channels x channel_mult[level] channels per
# level, model_channels x channel_mult_emb for the embedding and x channel_mult_noise for the
# noise embedding (1 for DDPM++, 2 for NCSN++); num_blocks residual blocks per level;
# self-attention at attn_resolutions; dropout of activations and, for guidance, label_dropout of
# labels; embedding_type 'positional' (DDPM++) or 'fourier' (NCSN++); encoder_type 'standard'
# (DDPM++), 'residual' (NCSN++) or 'skip'; decoder_type 'standard' or 'skip'; resample_filter
# [1,1] (DDPM++) or [1,3,3,1] (NCSN++); eff_attn as at the top of this file.

@persistence.persistent_class
class SongUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=[1,2,2,2], channel_mult_emb=4, num_blocks=4, attn_resolutions=[16],
                 dropout=0.10, label_dropout=0, embedding_type='positional', channel_mult_noise=1,
                 encoder_type='standard', decoder_type='standard', resample_filter=[1,1], eff_attn=False):
        assert embedding_type in ('positional', 'fourier')
        assert encoder_type in ('standard', 'residual', 'skip')
        assert decoder_type in ('standard', 'skip')
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        xavier = dict(init_mode='xavier_uniform')
        near_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        fir = dict(resample_filter=resample_filter)
        blocks = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6, **fir,
                      resample_proj=True, adaptive_scale=False, init=xavier, init_zero=near_zero,
                      init_attn=dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2)), eff_attn=eff_attn)
        block = lambda cin, cout, **kw: UNetBlock(in_channels=cin, out_channels=cout, **kw, **blocks)

        # The mapping network, layer by layer in the reference's order of creation.
        self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True) if embedding_type == 'positional' \
            else FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **xavier) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **xavier) if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **xavier)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **xavier)

        # 'skip' and 'residual' encoders add a second path (aux) fed by the image, resampled.
        aux_channels = in_channels
        def add_aux(at, channels):
            nonlocal aux_channels
            if encoder_type == 'skip':
                self.enc[f'{at}_aux_down'] = Conv2d(in_channels=aux_channels, out_channels=aux_channels, kernel=0, down=True, **fir)
                self.enc[f'{at}_aux_skip'] = Conv2d(in_channels=aux_channels, out_channels=channels, kernel=1, **xavier)
            if encoder_type == 'residual':
                self.enc[f'{at}_aux_residual'] = Conv2d(in_channels=aux_channels, out_channels=channels, kernel=3, down=True, **fir,
                                                        fused_resample=True, **xavier)
                aux_channels = channels
        levels = _levels(img_resolution, channel_mult, model_channels)
        self.enc = torch.nn.ModuleDict()
        skips = _add_encoder(self.enc, levels, Conv2d(in_channels=in_channels, out_channels=model_channels, kernel=3, **xavier),
                             block, num_blocks, attn_resolutions, add_aux)
        channels = skips[-1]

        # Attention only in the last block of a level; the output is the sum of the 'aux_conv'
        # heads ('skip': one per level, upsampled along; 'standard': the finest only).
        def add_heads(level, at, channels):
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(levels) - 1:
                    self.dec[f'{at}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=0, up=True, **fir)
                self.dec[f'{at}_aux_norm'] = GroupNorm(num_channels=channels, eps=1e-6)
                self.dec[f'{at}_aux_conv'] = Conv2d(in_channels=channels, out_channels=out_channels, kernel=3, **near_zero)
        self.dec = torch.nn.ModuleDict()
        _add_decoder(self.dec, levels, channels, skips, block, num_blocks,
                     attention=lambda i, res: i == num_blocks and res in attn_resolutions, add_heads=add_heads)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] -> [sin, cos], as DDPM++.
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training, x)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer1(silu(self.map_layer0(emb))))
        x, skips = _encode(self.enc, x, emb)
        return _decode(self.dec, x, emb, skips)[1]

#----------------------------------------------------------------------------
# ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"), in EDM's form.
# Arguments as SongUNet's (those it has); heads of 64 channels; adaptive scale and shift.

@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=[1,2,3,4], channel_mult_emb=4, num_blocks=3, attn_resolutions=[32,16,8],
                 dropout=0.10, label_dropout=0, eff_attn=False):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        kaiming = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1/3), init_bias=np.sqrt(1/3))
        zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        blocks = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=kaiming, init_zero=zero, eff_attn=eff_attn)
        block = lambda cin, cout, **kw: UNetBlock(in_channels=cin, out_channels=cout, **kw, **blocks)

        # The mapping network, in the reference's order of creation (labels last).
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **zero) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **kaiming)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **kaiming)
        self.map_label = (Linear(in_features=label_dim, out_features=emb_channels, bias=False, init_mode='kaiming_normal',
                                 init_weight=np.sqrt(label_dim)) if label_dim else None)

        levels = _levels(img_resolution, channel_mult, model_channels)
        self.enc = torch.nn.ModuleDict()
        skips = _add_encoder(self.enc, levels, Conv2d(in_channels=in_channels, out_channels=levels[0][2], kernel=3, **kaiming),
                             block, num_blocks, attn_resolutions)
        self.dec = torch.nn.ModuleDict()
        channels = _add_decoder(self.dec, levels, skips[-1], skips, block, num_blocks, attention=lambda i, res: res in attn_resolutions)
        self.out_norm = GroupNorm(num_channels=channels)
        self.out_conv = Conv2d(in_channels=channels, out_channels=out_channels, kernel=3, **zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training, x))
        emb = silu(emb)
        x, skips = _encode(self.enc, x, emb)
        x, _ = _decode(self.dec, x, emb, skips)
        return self.out_conv(silu(self.out_norm(x)))

#----------------------------------------------------------------------------
# Preconditioning: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), F the U-Net named by
# `model_type`. Inputs are taken in float32; the U-Net runs in float16 only on CUDA with
# use_fp16 (and not force_fp32), as in the reference.

_UNETS = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}


class _Preconditioned(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs, out_channels):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = img_resolution, img_channels, label_dim, use_fp16
        if model_type not in _UNETS:
            raise ValueError(f'Unknown model_type "{model_type}"; expected one of {", ".join(_UNETS)}')
        self.model = _UNETS[model_type](img_resolution=img_resolution, in_channels=img_channels, out_channels=out_channels,
                                        label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if not self.label_dim:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if self.use_fp16 and not force_fp32 and x.device.type == 'cuda' else torch.float32
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype or torch.is_autocast_enabled(x.device.type)  # bf16 training runs under autocast.
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

# Variance preserving (Song et al. 2021): sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1).

@persistence.persistent_class
class VPPrecond(_Preconditioned):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000,
                 epsilon_t=1e-5, model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs, img_channels)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        with torch.device('cpu'):  # Host scalars, also when the checkpoint loader builds on the meta device.
            self.sigma_min, self.sigma_max = float(self.sigma(epsilon_t)), float(self.sigma(1))

    def coefficients(self, sigma):
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)

    def sigma(self, t):
        t = torch.as_tensor(t)
        growth = (0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp()  # exp(integral of beta).
        return (growth - 1).sqrt()

    def sigma_inv(self, sigma):
        log_term = (1 + torch.as_tensor(sigma) ** 2).log()
        return ((self.beta_min ** 2 + 2 * self.beta_d * log_term).sqrt() - self.beta_min) / self.beta_d

# Variance exploding (Song et al. 2021): x + sigma noise, sigma in [sigma_min, sigma_max].

@persistence.persistent_class
class VEPrecond(_Preconditioned):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs, img_channels)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()

# Improved DDPM (Nichol & Dhariwal 2021): M discrete noise levels u[0] > ... > u[M-1] > u[M] = 0
# from the cosine schedule; the U-Net also predicts a variance (ignored), so twice the channels.

@persistence.persistent_class
class iDDPMPrecond(_Preconditioned):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000,
                 model_type='DhariwalUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs, img_channels * 2)
        self.C_1, self.C_2, self.M = C_1, C_2, M
        u = torch.zeros(M + 1)
        if not u.is_meta:  # On the meta device (the checkpoint loader) the levels come from the file.
            for j in range(M, 0, -1):
                ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
                u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer('u', u)
        self.sigma_min, self.sigma_max = (None, None) if u.is_meta else (float(u[M - 1]), float(u[0]))

    def coefficients(self, sigma):
        index = self.round_sigma(sigma, return_index=True)
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), self.M - 1 - index.to(torch.float32)

    def alpha_bar(self, j):
        return (0.5 * np.pi * torch.as_tensor(j) / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        """The nearest of the M + 1 levels (or its index)."""
        sigma = torch.as_tensor(sigma)
        distances = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1))
        index = distances.argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

# EDM (Karras et al. 2022): unit-variance input and target for data of standard deviation
# sigma_data at every noise level.

@persistence.persistent_class
class EDMPrecond(_Preconditioned):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float('inf'),
                 sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs, img_channels)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        var_data, var = self.sigma_data ** 2, sigma ** 2
        c_skip = var_data / (var + var_data)
        c_out = sigma * self.sigma_data / (var + var_data).sqrt()
        c_in = 1 / (var_data + var).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4
