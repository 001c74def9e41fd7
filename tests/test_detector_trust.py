"""Detector files: a .pkl (which runs code when loaded) is refused unless explicitly trusted.

The crafted detector's embedded module source writes a marker file; the marker proves whether
anything from the file ran.
"""

import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import evaluate
from dnnlib import UserError
from metrics.detector import DEFAULT_DETECTOR_URL, load_detector
from torch_utils import persistence

MODULE_SRC = '''import torch
open({marker!r}, "w").write("detector code ran")
class Evil(torch.nn.Module):
    pass
'''


class _EvilDetector:
    """Pickles as an EDM persistent object whose module_src writes the marker when executed."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        meta = dict(type='class', version=6, module_src=MODULE_SRC.format(marker=str(self.marker)), class_name='Evil', state={})
        return (persistence._reconstruct_persistent_obj, (meta,))


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil-inception.pkl'
    path.write_bytes(pickle.dumps(_EvilDetector(marker)))
    return path, marker


def test_pickle_detector_needs_trust(evil):
    path, marker = evil
    for spec in (str(path), path.as_uri()):
        with pytest.raises(UserError, match=r'evil-inception\.pkl: a \.pkl detector runs the code stored in it when loaded; pass --trust-detector'):
            load_detector(spec, verbose=False)
        assert not marker.exists()
    # With explicit trust the code does run (this is what the flag allows), proving the file
    # above was live and that only the missing flag kept it from running.
    with pytest.raises(UserError, match='evil-inception.pkl: pickle does not look like NVIDIA\'s Inception detector'):
        load_detector(str(path), verbose=False, trust_pickle=True)
    assert marker.read_text() == 'detector code ran'


def test_planted_default_detector_is_not_run(evil, tmp_path, monkeypatch):
    # A file planted in the download cache under the default URL's name: refused, not run.
    path, marker = evil
    cache = tmp_path / 'cache'
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(cache))
    planted = cache / 'downloads' / dnnlib.util._cache_file_name(DEFAULT_DETECTOR_URL)
    planted.parent.mkdir(parents=True)
    planted.write_bytes(path.read_bytes())
    with pytest.raises(UserError, match='pass --trust-detector'):
        load_detector(verbose=False)
    assert not marker.exists()


def _cli_fails(args, match):
    result = CliRunner().invoke(evaluate.main, args)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert 'Traceback' not in result.output and match in result.output, result.output
    return result


def test_evaluate_refuses_untrusted_pickle_detector(evil, tmp_path):
    path, marker = evil
    images = tmp_path / 'images.npz'
    np.savez(images, arr_0=np.zeros([2, 8, 8, 3], dtype=np.uint8))
    _cli_fails(['activations', '--data', str(images), '--dest', str(tmp_path / 'a.npz'), '--detector', str(path)], 'pass --trust-detector')
    # calc -m is on a sample with feat but no logits needs the detector's classifier.
    sample = tmp_path / 'sample.npz'
    np.savez(sample, feat=np.zeros([4, 32], dtype=np.float32))
    _cli_fails(['calc', '-m', 'is', '--activations_sample', str(sample), '--detector', str(path)], 'pass --trust-detector')
    assert not marker.exists() and not (tmp_path / 'a.npz').exists()


def test_pth_detector_is_a_weights_only_load(tmp_path):
    # A .pth carrying a pickled call is refused by torch's weights-only reader; nothing runs.
    marker = tmp_path / 'marker'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    path = tmp_path / 'pt_inception.pth'
    torch.save({'fc.weight': torch.zeros(2, 2), 'x': Payload()}, path)
    with pytest.raises(UserError, match=r'pt_inception\.pth'):
        load_detector(str(path), verbose=False, trust_pickle=True)  # Trust is about .pkl only.
    assert not marker.exists()
    torch.save({'x': torch.zeros(2)}, path)
    with pytest.raises(UserError, match=r'pt_inception\.pth: not an Inception-v3 state dict'):  # Its file:// URL names a .pth.
        load_detector(path.as_uri(), verbose=False)
