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

import urllib.parse

import torch

import dnnlib
from torch_utils import persistence

from .activations import SPATIAL_CHANNELS
from .inception import load_inception_state_dict

DEFAULT_DETECTOR_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'


class NvidiaInception(torch.nn.Module):
    """NVIDIA's Inception pickle behind InceptionV3's interface: uint8-valued images [N, C, H, W]
    -> dict(feat, s_feat, logits), float32; `fc` is its classifier."""

    def __init__(self, net):
        super().__init__()
        self.net, self.spatial = net, []
        try:
            self.fc = net.output
            net.layers.mixed_6.conv.register_forward_hook(lambda _mod, _inp, out: self.spatial.append(out))
        except AttributeError as err:
            raise dnnlib.UserError(f'pickle does not look like NVIDIA\'s Inception detector ({err})') from None

    def forward(self, images):
        images = images.to(self.fc.weight.device)
        self.spatial.clear()
        feat = self.net(images.repeat([1, 3, 1, 1]) if images.shape[1] == 1 else images, return_features=True).to(torch.float32)
        s_feat = self.spatial.pop()[:, :SPATIAL_CHANNELS].flatten(1).to(torch.float32)
        return dict(feat=feat, s_feat=s_feat, logits=feat @ self.fc.weight.to(torch.float32).T)


def load_detector(spec=DEFAULT_DETECTOR_URL, device=torch.device('cpu'), verbose=True, trust_pickle=False):
    """The detector at `spec` (path or URL), in eval mode without gradients: InceptionV3 from a
    pytorch-fid state dict (weights only), or NvidiaInception from a .pkl, which runs code from
    the file and is loaded only with trust_pickle=True."""
    is_pickle = urllib.parse.urlparse(spec).path.lower().endswith('.pkl')  # The file name of a path or URL.
    if is_pickle and not trust_pickle:
        raise dnnlib.UserError(f'{spec}: a .pkl detector runs the code stored in it when loaded; pass --trust-detector '
                               f'if you trust this file (e.g. NVIDIA\'s published Inception pickle), or use a pytorch-fid .pth detector')
    try:
        path = dnnlib.util.open_url(spec, verbose=verbose, return_filename=True)
        if is_pickle:
            if verbose:
                print(f'Running the code in trusted detector pickle {spec} (SHA-256 {dnnlib.util.file_sha256(path)})', flush=True)
            with open(path, 'rb') as f:
                net = NvidiaInception(persistence.load_trusted_pickle(f))
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
        return net.eval().requires_grad_(False).to(device)
    except Exception as err:  # pylint: disable=broad-exception-caught  # Foreign files and trusted modules raise anything.
        raise dnnlib.UserError(f'cannot load detector {spec}: {err}') from None
