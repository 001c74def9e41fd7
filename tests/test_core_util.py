"""dnnlib console helpers and torch_utils.misc file/tensor helpers."""

import os
import stat
import sys

import pytest
import torch

import dnnlib
from torch_utils import misc


def test_format_time():
    assert dnnlib.util.format_time(42) == '42s'
    assert dnnlib.util.format_time(185) == '3m 05s'
    assert dnnlib.util.format_time(2 * 3600 + 7 * 60 + 9) == '2h 07m 09s'
    assert dnnlib.util.format_time(86400 + 4 * 3600 + 13 * 60) == '1d 04h 13m'


def test_logger_tees_and_restores_streams(tmp_path, capsys):
    path = tmp_path / 'log.txt'
    before = sys.stdout
    with dnnlib.util.Logger(file_name=str(path), file_mode='a'):
        print('hello log')
        print('to stderr', file=sys.stderr)
    assert sys.stdout is before
    text = path.read_text()
    assert 'hello log' in text and 'to stderr' in text
    assert 'hello log' in capsys.readouterr().out


def test_atomic_write_permissions_and_failure(tmp_path):
    path = tmp_path / 'out.json'
    with misc.atomic_write(path, 'wt') as f:
        f.write('first')
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask
    with pytest.raises(RuntimeError):
        with misc.atomic_write(path, 'wt') as f:
            f.write('partial')
            raise RuntimeError('crash')
    assert path.read_text() == 'first' and os.listdir(tmp_path) == ['out.json']


def test_constant_is_cached_and_broadcast():
    a = misc.constant([1, 2], shape=[3, 2], dtype=torch.float32)
    assert a.shape == (3, 2) and a.is_contiguous() and torch.equal(a[2], torch.tensor([1.0, 2.0]))
    assert misc.constant([1, 2], shape=[3, 2], dtype=torch.float32) is a


def test_assert_shape():
    misc.assert_shape(torch.zeros(2, 3), [2, None])
    with pytest.raises(AssertionError):
        misc.assert_shape(torch.zeros(2, 3), [2, 4])
    with pytest.raises(AssertionError):
        misc.assert_shape(torch.zeros(2, 3), [2])


def test_print_module_summary(capsys):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    out = misc.print_module_summary(net, [torch.zeros(5, 4)])
    assert out.shape == (5, 2)
    text = capsys.readouterr().out
    assert 'Total' in text and str(4 * 3 + 3 + 3 * 2 + 2) in text and '[5, 2]' in text
