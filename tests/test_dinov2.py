"""metrics/dinov2.py against an independent implementation (Hugging Face transformers' Dinov2Model,
installed for the tests) on the same random weights, the position-embedding resampling against a
numpy bicubic written from the formula, and the ViT-L/14 parameter names/shapes of the release."""

import numpy as np
import pytest
import torch

import dnnlib
from metrics import dinov2

transformers = pytest.importorskip('transformers')


def _hf_model(hidden=128, layers=2, image_size=56, patch=14, seed=0):
    config = transformers.Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                       image_size=image_size, patch_size=patch, mlp_ratio=4)
    torch.manual_seed(seed)
    model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # Random everything, layer scales and norms included.
            p.copy_(torch.randn_like(p) * 0.2 + (1 if p.ndim == 1 and p.shape[0] == hidden else 0) * 0.5)
    return model


def _official_state_dict(model):
    """The HF model's weights under DINOv2's own parameter names (the release's format)."""
    sd = model.state_dict()
    out = {
        'cls_token': sd['embeddings.cls_token'],
        'pos_embed': sd['embeddings.position_embeddings'],
        'mask_token': sd['embeddings.mask_token'],
        'patch_embed.proj.weight': sd['embeddings.patch_embeddings.projection.weight'],
        'patch_embed.proj.bias': sd['embeddings.patch_embeddings.projection.bias'],
        'norm.weight': sd['layernorm.weight'],
        'norm.bias': sd['layernorm.bias'],
    }
    for i in range(model.config.num_hidden_layers):
        h, o = f'encoder.layer.{i}.', f'blocks.{i}.'
        att = h + 'attention.attention.'
        for kind in ('weight', 'bias'):
            out[o + f'attn.qkv.{kind}'] = torch.cat([sd[att + f'{n}.{kind}'] for n in ('query', 'key', 'value')])
            out[o + f'attn.proj.{kind}'] = sd[h + f'attention.output.dense.{kind}']
            for n in ('norm1', 'norm2', 'mlp.fc1', 'mlp.fc2'):
                out[o + f'{n}.{kind}'] = sd[h + f'{n}.{kind}']
        out[o + 'ls1.gamma'] = sd[h + 'layer_scale1.lambda1']
        out[o + 'ls2.gamma'] = sd[h + 'layer_scale2.lambda1']
    return {k: v.clone() for k, v in out.items()}


def test_matches_transformers_on_random_weights(tmp_path):
    model = _hf_model()
    state = _official_state_dict(model)
    path = tmp_path / 'tiny_dinov2.pth'
    torch.save(state, path)
    det = dinov2.load_dinov2(str(path), verbose=False)
    assert sum(p.numel() for p in det.net.parameters()) == sum(p.numel() for p in model.parameters())
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(pixel_values=x).pooler_output  # layernorm(tokens)[:, 0]
        ours = det.net(x)
    assert ours.shape == (3, 128)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours[0], ours[1])  # Distinct inputs, distinct features.


def _cubic_weights(t, a=-0.75):
    d = np.array([1 + t, t, 1 - t, 2 - t])
    w = np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a)
    return w


def _resample_axis(x, out_len, scale, axis):
    """Bicubic along one axis with source coordinate (i + 0.5) / scale - 0.5, borders clamped."""
    x = np.moveaxis(x, axis, 0)
    n = x.shape[0]
    out = np.zeros((out_len,) + x.shape[1:])
    for i in range(out_len):
        src = (i + 0.5) / scale - 0.5
        base = int(np.floor(src))
        for w, j in zip(_cubic_weights(src - base), range(base - 1, base + 3)):
            out[i] += w * x[min(max(j, 0), n - 1)]
    return np.moveaxis(out, 0, axis)


def test_position_embedding_resampling_uses_offset_scale():
    net = dinov2.DINOv2ViT(dim=64, depth=1, num_heads=1, patch_size=14, img_size=14 * 9)
    with torch.no_grad():
        net.pos_embed.copy_(torch.randn_like(net.pos_embed))
    pos = net.pos_embed.detach().numpy()[0]
    grid = pos[1:].reshape(9, 9, 64)
    scale = (4 + 0.1) / 9  # 56 px -> 4x4 patches; DINOv2 passes this scale, not the size.
    want = _resample_axis(_resample_axis(grid, 4, scale, 0), 4, scale, 1).reshape(16, 64)
    got = net.position_embeddings(56, 56).detach().numpy()[0]
    np.testing.assert_allclose(got[0], pos[0], rtol=0, atol=0)
    np.testing.assert_allclose(got[1:], want, rtol=1e-5, atol=1e-5)
    # Resampling to the target size instead (what some ports do) gives other values.
    by_size = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(4, 4), mode='bicubic')
    assert not np.allclose(by_size[0].permute(1, 2, 0).reshape(16, 64).numpy(), want, atol=1e-3)


def test_detector_preprocessing_and_output(tmp_path):
    model = _hf_model(image_size=224, layers=1)
    path = tmp_path / 'tiny224.pth'
    torch.save(_official_state_dict(model), path)
    det = dinov2.load_dinov2(str(path), verbose=False)
    images = torch.randint(0, 256, [2, 3, 40, 48], dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x = torch.nn.functional.interpolate(images.double(), size=(224, 224), mode='bicubic', antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).reshape(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).reshape(1, 3, 1, 1)
    torch.testing.assert_close(det.preprocess(images), x.float(), rtol=0, atol=1e-4)
    out = det(images)
    assert set(out) == {'dinov2'} and out['dinov2'].dtype == torch.float32
    with torch.no_grad():
        ref = model(pixel_values=x.float()).pooler_output
    torch.testing.assert_close(out['dinov2'], ref, rtol=1e-4, atol=1e-4)
    gray = det(images[:, :1])['dinov2']  # Grey images: the channel repeated, as for Inception.
    torch.testing.assert_close(gray, det(images[:, :1].repeat(1, 3, 1, 1))['dinov2'])


# Parameter names and shapes of dinov2_vitl14_pretrain.pth, restated from facebookresearch/dinov2
# (vit_large: embed_dim 1024, depth 24, 16 heads, mlp_ratio 4, patch 14, img_size 518, layer scale,
# no register tokens, block_chunks=0 in the hub constructor, so blocks are not chunked).
def _release_shapes():
    d, h = 1024, 4096
    shapes = {'cls_token': (1, 1, d), 'pos_embed': (1, 1 + 37 * 37, d), 'mask_token': (1, d),
              'patch_embed.proj.weight': (d, 3, 14, 14), 'patch_embed.proj.bias': (d,),
              'norm.weight': (d,), 'norm.bias': (d,)}
    for i in range(24):
        b = f'blocks.{i}.'
        shapes.update({b + 'norm1.weight': (d,), b + 'norm1.bias': (d,),
                       b + 'attn.qkv.weight': (3 * d, d), b + 'attn.qkv.bias': (3 * d,),
                       b + 'attn.proj.weight': (d, d), b + 'attn.proj.bias': (d,),
                       b + 'ls1.gamma': (d,), b + 'norm2.weight': (d,), b + 'norm2.bias': (d,),
                       b + 'mlp.fc1.weight': (h, d), b + 'mlp.fc1.bias': (h,),
                       b + 'mlp.fc2.weight': (d, h), b + 'mlp.fc2.bias': (d,), b + 'ls2.gamma': (d,)})
    return shapes


def test_vitl14_parameters_equal_the_release():
    with torch.device('meta'):
        net = dinov2.DINOv2ViT(dim=1024, depth=24, num_heads=16, patch_size=14, img_size=518)  # ViT-L/14 as released.
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == _release_shapes()
    assert dinov2.config_from_state_dict({k: torch.empty(s, device='meta') for k, s in _release_shapes().items()}) == \
        dict(dim=1024, depth=24, num_heads=16, patch_size=14, img_size=518, mlp_ratio=4)
    assert dinov2.DINOV2_VITL14_URL.endswith('/dinov2_vitl14/dinov2_vitl14_pretrain.pth')


def test_bad_weights_files(tmp_path):
    marker = tmp_path / 'ran'
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), 'w'))
    bad = tmp_path / 'evil.pth'
    torch.save({'x': Evil()}, bad)
    with pytest.raises(dnnlib.UserError, match='cannot load DINOv2 weights'):
        dinov2.load_dinov2(str(bad), verbose=False)
    assert not marker.exists()
    wrong = tmp_path / 'wrong.pth'
    torch.save({'fc.weight': torch.zeros(3, 3)}, wrong)
    with pytest.raises(dnnlib.UserError, match='not a DINOv2'):
        dinov2.load_dinov2(str(wrong), verbose=False)
    state = _official_state_dict(_hf_model(layers=1))
    state['blocks.0.attn.qkv.weight'] = state['blocks.0.attn.qkv.weight'][:10]
    torch.save(state, tmp_path / 'short.pth')
    with pytest.raises(dnnlib.UserError, match='short.pth: .*size mismatch for blocks.0.attn.qkv.weight'):
        dinov2.load_dinov2(str(tmp_path / 'short.pth'), verbose=False)
    with pytest.raises(dnnlib.UserError, match='cannot load'):
        dinov2.load_dinov2(str(tmp_path / 'missing.pth'), verbose=False)
