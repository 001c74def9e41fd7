"""Networks: parameter names/shapes as in the reference, attention paths, preconditioning maths."""

import inspect

import numpy as np
import pytest
import torch

from training import networks



#----------------------------------------------------------------------------
# Small configurations of the three architectures (16x16, two levels).

ARCHS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1,1], model_channels=16, channel_mult=[1,2], num_blocks=1, attn_resolutions=[8]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1,3,3,1], model_channels=16, channel_mult=[1,2], num_blocks=1, attn_resolutions=[8]),
    'songskip': dict(model_type='SongUNet', encoder_type='skip', decoder_type='skip', model_channels=16, channel_mult=[1,2],
                     num_blocks=1, attn_resolutions=[16]),
    # 64 and 128 channels -> 1 and 2 attention heads of 64 channels.
    'adm': dict(model_type='DhariwalUNet', model_channels=64, channel_mult=[1,2], num_blocks=1, attn_resolutions=[8]),
}
PRECONDS = ['VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond']
PAIRS = [('VPPrecond', 'ddpmpp'), ('VEPrecond', 'ncsnpp'), ('EDMPrecond', 'adm'), ('EDMPrecond', 'ddpmpp'),
         ('iDDPMPrecond', 'adm'), ('EDMPrecond', 'songskip')]


def make_net(precond, arch, label_dim=0, augment_dim=0, seed=0, resolution=16, **extra):
    torch.manual_seed(seed)
    kwargs = dict(ARCHS[arch], **extra)
    return getattr(networks, precond)(img_resolution=resolution, img_channels=3, label_dim=label_dim, augment_dim=augment_dim, **kwargs)

#----------------------------------------------------------------------------
# Expected state-dict names, written from reading the reference constructors (module by
# module: own parameters, own buffers, then children in creation order).

def _conv(p, kernel=3, bias=True, resample=False):
    return ([f'{p}.weight'] if kernel else []) + ([f'{p}.bias'] if kernel and bias else []) + ([f'{p}.resample_filter'] if resample else [])

def _norm(p):
    return [f'{p}.weight', f'{p}.bias']

def _block(p, cin, cout, up=False, down=False, attn=False, resample_proj=False):
    names = _norm(f'{p}.norm0') + _conv(f'{p}.conv0', resample=up or down) + [f'{p}.affine.weight', f'{p}.affine.bias']
    names += _norm(f'{p}.norm1') + _conv(f'{p}.conv1')
    if cout != cin or up or down:
        names += _conv(f'{p}.skip', kernel=1 if resample_proj or cout != cin else 0, resample=up or down)
    if attn:
        names += _norm(f'{p}.norm2') + _conv(f'{p}.qkv', 1) + _conv(f'{p}.proj', 1)
    return names

def expected_names(precond, arch, label_dim, augment_dim):
    cfg = ARCHS[arch]
    res0, mc, mults, nb, attn_res = 16, cfg['model_channels'], cfg['channel_mult'], cfg['num_blocks'], cfg['attn_resolutions']
    names = []
    if cfg['model_type'] == 'SongUNet':
        enc_t, dec_t = cfg.get('encoder_type', 'standard'), cfg.get('decoder_type', 'standard')
        if cfg.get('embedding_type', 'positional') == 'fourier':
            names += ['model.map_noise.freqs']
        names += (['model.map_label.weight', 'model.map_label.bias'] if label_dim else [])
        names += (['model.map_augment.weight'] if augment_dim else [])
        names += ['model.map_layer0.weight', 'model.map_layer0.bias', 'model.map_layer1.weight', 'model.map_layer1.bias']
        heads = lambda ch, res: res in attn_res
        cout, skips = 3, []
        for level, mult in enumerate(mults):
            res = res0 >> level
            if level == 0:
                names += _conv(f'model.enc.{res}x{res}_conv'); cout = mc; skips.append(cout)
            else:
                names += _block(f'model.enc.{res}x{res}_down', cout, cout, down=True, resample_proj=True); skips.append(cout)
                if enc_t == 'skip':
                    names += _conv(f'model.enc.{res}x{res}_aux_down', kernel=0, resample=True) + _conv(f'model.enc.{res}x{res}_aux_skip', 1)
                if enc_t == 'residual':
                    names += _conv(f'model.enc.{res}x{res}_aux_residual', resample=True)
            for i in range(nb):
                names += _block(f'model.enc.{res}x{res}_block{i}', cout, mc * mult, attn=heads(mc * mult, res), resample_proj=True)
                cout = mc * mult; skips.append(cout)
        for level, mult in reversed(list(enumerate(mults))):
            res = res0 >> level
            if level == len(mults) - 1:
                names += _block(f'model.dec.{res}x{res}_in0', cout, cout, attn=True, resample_proj=True)
                names += _block(f'model.dec.{res}x{res}_in1', cout, cout, resample_proj=True)
            else:
                names += _block(f'model.dec.{res}x{res}_up', cout, cout, up=True, resample_proj=True)
            for i in range(nb + 1):
                cin = cout + skips.pop()
                names += _block(f'model.dec.{res}x{res}_block{i}', cin, mc * mult, attn=(i == nb and res in attn_res), resample_proj=True)
                cout = mc * mult
            if dec_t == 'skip' or level == 0:
                if dec_t == 'skip' and level < len(mults) - 1:
                    names += _conv(f'model.dec.{res}x{res}_aux_up', kernel=0, resample=True)
                names += _norm(f'model.dec.{res}x{res}_aux_norm') + _conv(f'model.dec.{res}x{res}_aux_conv')
    else:
        names += (['model.map_augment.weight'] if augment_dim else [])
        names += ['model.map_layer0.weight', 'model.map_layer0.bias', 'model.map_layer1.weight', 'model.map_layer1.bias']
        names += (['model.map_label.weight'] if label_dim else [])
        heads = lambda ch, res: res in attn_res and ch // 64 > 0
        cout, skips = 3, []
        for level, mult in enumerate(mults):
            res = res0 >> level
            if level == 0:
                names += _conv(f'model.enc.{res}x{res}_conv'); cout = mc * mult
            else:
                names += _block(f'model.enc.{res}x{res}_down', cout, cout, down=True)
            skips.append(cout)
            for i in range(nb):
                names += _block(f'model.enc.{res}x{res}_block{i}', cout, mc * mult, attn=heads(mc * mult, res))
                cout = mc * mult; skips.append(cout)
        for level, mult in reversed(list(enumerate(mults))):
            res = res0 >> level
            if level == len(mults) - 1:
                names += _block(f'model.dec.{res}x{res}_in0', cout, cout, attn=cout // 64 > 0)
                names += _block(f'model.dec.{res}x{res}_in1', cout, cout)
            else:
                names += _block(f'model.dec.{res}x{res}_up', cout, cout, up=True)
            for i in range(nb + 1):
                cin = cout + skips.pop()
                names += _block(f'model.dec.{res}x{res}_block{i}', cin, mc * mult, attn=heads(mc * mult, res))
                cout = mc * mult
        names += _norm('model.out_norm') + _conv('model.out_conv')
    if precond == 'iDDPMPrecond':
        names = ['u'] + names
    return names


@pytest.mark.parametrize('precond,arch', PAIRS)
def test_names_and_shapes(precond, arch):
    label_dim, augment_dim = 5, 9
    net = make_net(precond, arch, label_dim=label_dim, augment_dim=augment_dim, dropout=0).eval()
    assert list(net.state_dict().keys()) == expected_names(precond, arch, label_dim, augment_dim)
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.3, 5.0])
    labels = torch.nn.functional.one_hot(torch.tensor([1, 4]), 5).float()
    with torch.no_grad():
        y = net(x, sigma, labels, augment_labels=torch.zeros(2, 9))
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    # The reference's interface attributes.
    assert (net.img_resolution, net.img_channels, net.label_dim, net.use_fp16) == (16, 3, label_dim, False)
    assert net.sigma_min >= 0 and net.sigma_max > net.sigma_min
    assert net.init_kwargs.model_type == ARCHS[arch]['model_type']


def test_literal_names_adm():
    # Spelled out by hand from the reference for the smallest ADM config (1 level).
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, model_channels=64, channel_mult=[1], num_blocks=1, attn_resolutions=[8])
    blk = lambda p, skip, attn: [f'{p}.{n}' for n in ['norm0.weight', 'norm0.bias', 'conv0.weight', 'conv0.bias', 'affine.weight', 'affine.bias',
                                                       'norm1.weight', 'norm1.bias', 'conv1.weight', 'conv1.bias']
                                 + (['skip.weight', 'skip.bias'] if skip else []) + (['norm2.weight', 'norm2.bias', 'qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias'] if attn else [])]
    expected = ['model.map_layer0.weight', 'model.map_layer0.bias', 'model.map_layer1.weight', 'model.map_layer1.bias',
                'model.enc.8x8_conv.weight', 'model.enc.8x8_conv.bias'] + blk('model.enc.8x8_block0', False, True)
    expected += blk('model.dec.8x8_in0', False, True) + blk('model.dec.8x8_in1', False, False)
    expected += blk('model.dec.8x8_block0', True, True) + blk('model.dec.8x8_block1', True, True)
    expected += ['model.out_norm.weight', 'model.out_norm.bias', 'model.out_conv.weight', 'model.out_conv.bias']
    sd = net.state_dict()
    assert list(sd) == expected
    assert sd['model.map_layer0.weight'].shape == (256, 64)
    assert sd['model.enc.8x8_block0.qkv.weight'].shape == (192, 64, 1, 1)
    assert sd['model.dec.8x8_block0.conv0.weight'].shape == (64, 128, 3, 3)
    assert net.model.enc['8x8_block0'].num_heads == 1
    # Zero-initialized output layer, as ADM.
    assert sd['model.out_conv.weight'].abs().max() == 0


def test_reference_defaults():
    sig = lambda cls: {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items() if v.default is not inspect.Parameter.empty}
    assert sig(networks.SongUNet) == dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1,2,2,2], channel_mult_emb=4,
        num_blocks=4, attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type='positional', channel_mult_noise=1,
        encoder_type='standard', decoder_type='standard', resample_filter=[1,1], eff_attn=False)
    assert sig(networks.DhariwalUNet) == dict(label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1,2,3,4], channel_mult_emb=4,
        num_blocks=3, attn_resolutions=[32,16,8], dropout=0.10, label_dropout=0, eff_attn=False)
    assert sig(networks.EDMPrecond) == dict(label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float('inf'), sigma_data=0.5, model_type='DhariwalUNet')
    assert sig(networks.VPPrecond) == dict(label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, model_type='SongUNet')
    assert sig(networks.VEPrecond) == dict(label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100, model_type='SongUNet')
    assert sig(networks.iDDPMPrecond) == dict(label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000, model_type='DhariwalUNet')
    assert sig(networks.UNetBlock)['channels_per_head'] == 64 and sig(networks.UNetBlock)['eff_attn'] is False


def test_seeded_init_is_reproducible():
    a = make_net('EDMPrecond', 'ddpmpp', seed=3).state_dict()
    b = make_net('EDMPrecond', 'ddpmpp', seed=3).state_dict()
    c = make_net('EDMPrecond', 'ddpmpp', seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a['model.map_layer0.weight'], c['model.map_layer0.weight'])

#----------------------------------------------------------------------------
# Attention: the SDPA path equals the plain (reference) path.

def test_sdpa_matches_plain_attention_op():
    torch.manual_seed(1)
    q, k, v = (torch.randn(6, 16, 37, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a = networks.plain_attention(q, k, v)
    b = networks.sdpa_attention(q, k, v, num_heads=3)
    # Independent computation: softmax over keys of q.k / sqrt(c).
    w = torch.softmax(torch.einsum('ncq,nck->nqk', q, k) / np.sqrt(16), dim=2)
    ref = torch.einsum('nqk,nck->ncq', w, v)
    torch.testing.assert_close(a, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b, ref, rtol=1e-10, atol=1e-10)
    ga = torch.autograd.grad(a.square().sum(), (q, k, v))
    gb = torch.autograd.grad(b.square().sum(), (q, k, v))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('arch', ['adm', 'ddpmpp'])
def test_eff_attn_network_equals_plain(arch):
    plain = make_net('EDMPrecond', arch, dropout=0, resolution=8, attn_resolutions=[8, 4]).eval()
    eff = make_net('EDMPrecond', arch, dropout=0, resolution=8, attn_resolutions=[8, 4], eff_attn=True).eval()
    eff.load_state_dict(plain.state_dict())
    # Give the zero/tiny-initialized projections real weights so attention matters.
    with torch.no_grad():
        for a, b in zip(plain.parameters(), eff.parameters()):
            a.normal_(0, 0.2)
            b.copy_(a)
    assert any(m.num_heads for m in eff.modules() if isinstance(m, networks.UNetBlock))
    x = torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.7, 3.0])
    with torch.no_grad():
        torch.testing.assert_close(eff(x, sigma), plain(x, sigma), rtol=1e-4, atol=1e-4)


def test_fp16_flag_is_cuda_only():
    # As in the reference: use_fp16 runs the U-Net in FP16 only on CUDA; CPU stays FP32.
    a = make_net('EDMPrecond', 'ddpmpp', dropout=0).eval()
    b = make_net('EDMPrecond', 'ddpmpp', dropout=0, use_fp16=True).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(a(x, torch.tensor([1.0])), b(x, torch.tensor([1.0])))

#----------------------------------------------------------------------------
# Layers against independent computations.

def test_resampling_layers():
    x = torch.randn(2, 4, 8, 8)
    down = networks.Conv2d(4, 4, kernel=0, down=True, resample_filter=[1,1])
    up = networks.Conv2d(4, 4, kernel=0, up=True, resample_filter=[1,1])
    assert down.weight is None and down.bias is None
    torch.testing.assert_close(down(x), torch.nn.functional.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    conv = networks.Conv2d(4, 5, kernel=3, init_bias=1)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))
    # NCSN++ filter [1,3,3,1]: normalized outer product.
    f = networks.Conv2d(4, 4, kernel=0, down=True, resample_filter=[1,3,3,1]).resample_filter
    torch.testing.assert_close(f[0, 0], torch.tensor([1., 3, 3, 1]).outer(torch.tensor([1., 3, 3, 1])) / 64)


def test_linear_groupnorm_embeddings():
    lin = networks.Linear(3, 4, init_bias=1)
    x = torch.randn(5, 3)
    torch.testing.assert_close(lin(x), x @ lin.weight.t() + lin.bias)
    assert networks.GroupNorm(16).num_groups == 4 and networks.GroupNorm(512).num_groups == 32
    emb = networks.PositionalEmbedding(8, endpoint=True)
    t = torch.tensor([0.5, 3.0])
    freqs = (1 / 10000) ** (torch.arange(4) / 3)
    torch.testing.assert_close(emb(t), torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1))
    fe = networks.FourierEmbedding(8)
    arg = t[:, None] * (2 * np.pi * fe.freqs)
    torch.testing.assert_close(fe(t), torch.cat([arg.cos(), arg.sin()], dim=1))

#----------------------------------------------------------------------------
# Preconditioning formulas with the U-Net replaced by a known function.

class _Const(torch.nn.Module):
    """F(x) = 1 everywhere; records the noise labels it receives."""
    def forward(self, x, noise_labels, class_labels=None, **kwargs):
        self.noise_labels = noise_labels
        return torch.ones_like(x)


def test_edm_precond_formula():
    net = make_net('EDMPrecond', 'adm')
    net.model = _Const()
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.2, 7.0])
    d = net(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1); sd = 0.5
    expected = sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt()
    torch.testing.assert_close(d, expected)
    torch.testing.assert_close(net.model.noise_labels, sigma.log() / 4)


def test_vp_ve_precond_formulas():
    vp = make_net('VPPrecond', 'ddpmpp')
    t = torch.tensor([0.01, 0.3, 1.0])
    torch.testing.assert_close(vp.sigma_inv(vp.sigma(t)), t, rtol=1e-4, atol=1e-5)
    assert vp.sigma_max == pytest.approx(float(np.sqrt(np.exp(0.5 * 19.9 + 0.1) - 1)), rel=1e-6)
    vp.model = _Const()
    x = torch.randn(3, 3, 16, 16)
    s = vp.sigma(t)
    torch.testing.assert_close(vp(x, s), x - s.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(vp.model.noise_labels, 999 * t, rtol=1e-4, atol=1e-3)
    ve = make_net('VEPrecond', 'ncsnpp')
    ve.model = _Const()
    torch.testing.assert_close(ve(x, s), x + s.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(ve.model.noise_labels, (0.5 * s).log())


def test_iddpm_schedule():
    net = make_net('iDDPMPrecond', 'ddpmpp')
    M, C1, C2 = 1000, 0.001, 0.008
    alpha_bar = lambda j: np.sin(0.5 * np.pi * j / M / (C2 + 1)) ** 2
    u = np.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C1) - 1)
    np.testing.assert_allclose(net.u.numpy(), u, rtol=1e-3)  # reference computes in FP32
    assert net.sigma_max == pytest.approx(u[0], rel=1e-3) and net.sigma_min == pytest.approx(u[M - 1], rel=1e-3)
    u = net.u
    sigma = torch.tensor([u[10] * 1.001, u[500] * 0.999])
    torch.testing.assert_close(net.round_sigma(sigma), torch.stack([u[10], u[500]]))
    torch.testing.assert_close(net.round_sigma(sigma, return_index=True), torch.tensor([10, 500]))
    assert net.model.dec['16x16_aux_conv'].out_channels == 6  # mean and variance


def test_unknown_model_type():
    with pytest.raises(ValueError, match='model_type'):
        networks.EDMPrecond(img_resolution=16, img_channels=3, model_type='Nope')
