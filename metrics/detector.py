"""Feature detectors for the metrics: one interface over the two supported formats.

    det = load_detector(spec, device)   # spec: path or URL
    out = det(images)                   # uint8 [N, C, H, W] -> dict(feat, s_feat, logits), float32

Formats, chosen by file name:
  *.pkl  NVIDIA's Inception-v3 pickle (the reference's detector, DEFAULT_DETECTOR_URL): an EDM
         persistence pickle whose embedded module source must be EXECUTED to load it
         (torch_utils.persistence.load_trusted_pickle, exactly as EDM does). Because that runs
         whatever code the file holds, it is done only when the caller passes trust_pickle=True
         (evaluate.py --trust-detector); otherwise the file is refused before it is unpickled.
         No published SHA-256 of NVIDIA's file was found to pin it by, so the default URL needs
         the flag as well; with the flag the file's SHA-256 is printed, for the record.
         feat = net(x, return_features=True); s_feat = output of net.layers.mixed_6.conv,
         first 7 channels, flattened (C, H, W) like the reference; logits = feat @ output.weight^T.
  other  a state dict in pytorch-fid's format (pt_inception-2015-12-05-*.pth), read with
         torch.load(weights_only=True) into metrics.inception.InceptionV3: weights only,
         nothing runs.
"""

import os
import urllib.parse

import torch

import dnnlib
from torch_utils import persistence

from .inception import load_inception_state_dict

DEFAULT_DETECTOR_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
SPATIAL_CHANNELS = 7  # sFID uses the first 7 channels of mixed_6/conv (ADM).


def _file_name(spec):
    return os.path.basename(urllib.parse.urlparse(spec).path) if dnnlib.util.is_url(spec, allow_file_urls=True) else os.path.basename(spec)


class Detector:
    def __init__(self, net, kind, include_bias=False):
        self.net = net
        self.kind = kind  # 'nvidia-pickle' | 'state-dict'
        self.include_bias = include_bias
        self._spatial = []
        if kind == 'nvidia-pickle':
            try:
                layer = net.layers.mixed_6.conv
                self.out_weight = net.output.weight
                self.out_bias = getattr(net.output, 'bias', None)
            except AttributeError as err:
                raise dnnlib.UserError(f'pickle does not look like NVIDIA\'s Inception detector ({err})') from None
            layer.register_forward_hook(lambda _mod, _inp, out: self._spatial.append(out))
        else:
            self.out_weight = net.fc.weight
            self.out_bias = net.fc.bias

    @property
    def device(self):
        return self.out_weight.device

    def logits(self, feat):
        """Softmax inputs for the Inception Score from pool3 features ([N, 2048] tensor)."""
        feat = torch.as_tensor(feat, device=self.device).to(torch.float32)
        if feat.ndim != 2 or feat.shape[1] != self.out_weight.shape[1]:
            raise dnnlib.UserError(f'feat has shape {list(feat.shape)}; the detector\'s classifier takes '
                                f'[N, {self.out_weight.shape[1]}] (was feat made with another detector?)')
        out = feat @ self.out_weight.to(torch.float32).T
        if self.include_bias and self.out_bias is not None:
            out = out + self.out_bias.to(torch.float32)
        return out

    @torch.no_grad()
    def __call__(self, images):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise dnnlib.UserError(f'images must be [N, 1 or 3, H, W], got {list(images.shape)}')
        if images.shape[1] == 1:
            images = images.repeat([1, 3, 1, 1])
        images = images.to(self.device)
        if self.kind == 'nvidia-pickle':
            self._spatial.clear()
            feat = self.net(images, return_features=True).to(torch.float32)
            spatial = self._spatial.pop()
            s_feat = spatial[:, :SPATIAL_CHANNELS].reshape(spatial.shape[0], -1).to(torch.float32)
        else:
            out = self.net(images)
            feat, s_feat = out['feat'], out['s_feat']
        return dict(feat=feat, s_feat=s_feat, logits=self.logits(feat))


def load_detector(spec=DEFAULT_DETECTOR_URL, device=torch.device('cpu'), verbose=True, include_bias=False, trust_pickle=False):
    """The detector at `spec` (path or URL). A .pkl runs code from the file and is loaded only
    with trust_pickle=True; anything else is read as a pytorch-fid state dict (weights only)."""
    is_pickle = _file_name(spec).lower().endswith('.pkl')
    if is_pickle and not trust_pickle:
        raise dnnlib.UserError(f'{spec}: a .pkl detector runs the code stored in it when loaded; pass --trust-detector '
                            f'if you trust this file (e.g. NVIDIA\'s published Inception pickle), or use a pytorch-fid .pth detector')
    try:
        path = dnnlib.util.open_url(spec, verbose=verbose, return_filename=True)
        if is_pickle:
            if verbose:
                print(f'Running the code in trusted detector pickle {spec} (SHA-256 {dnnlib.util.file_sha256(path)})', flush=True)
            with open(path, 'rb') as f:
                net = persistence.load_trusted_pickle(f)
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
            if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
                state = state['state_dict']
            if not isinstance(state, dict) or 'fc.weight' not in state:
                raise ValueError('not an Inception-v3 state dict (pytorch-fid format)')
            # Optional 'resolution' entry: a smaller resize target for test-only detectors.
            resolution = state.pop('resolution', torch.tensor(299))
            if not (torch.is_tensor(resolution) and resolution.numel() == 1 and float(resolution) in range(75, 300)):
                raise ValueError(f'its "resolution" entry {resolution!r} is not a whole number of pixels in 75..299')
            net = load_inception_state_dict(state, resolution=int(resolution))
    except Exception as err:  # pylint: disable=broad-exception-caught  # Foreign files raise anything.
        raise dnnlib.UserError(f'cannot load detector {spec}: {err}') from None
    if not isinstance(net, torch.nn.Module):
        raise dnnlib.UserError(f'{spec}: unpickled a {type(net).__name__}, not a torch module')
    try:
        net = net.eval().requires_grad_(False).to(device)
    except (AttributeError, RuntimeError, TypeError) as err:
        raise dnnlib.UserError(f'{spec}: the detector module is unusable ({type(err).__name__}: {err})') from None
    return Detector(net, 'nvidia-pickle' if is_pickle else 'state-dict', include_bias=include_bias)
