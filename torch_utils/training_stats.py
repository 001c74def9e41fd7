"""Cheap statistics reporting across devices and processes (EDM's training_stats interface).

Anywhere in the code: `training_stats.report('Loss/loss', tensor)` adds the tensor's elements to
running moments [count, sum, sum of squares] kept on the tensor's own device (no sync). Once per
tick the training loop calls `default_collector.update()`, which sums the moments over devices
and (with `init_multiprocessing`) over processes in one all_reduce, and exposes mean/std of
everything reported since the previous update.

Every process must report the same names in the same order (an empty list is fine), because
the all_reduce stacks the names into one tensor.
"""

import re

import numpy as np
import torch

import dnnlib

from . import misc

_num_moments = 3                # [count, sum, sum of squares]
_reduce_dtype = torch.float32   # Per-tensor reduction dtype.
_counter_dtype = torch.float64  # Running counters: float64 so long runs do not lose precision.
_rank = 0                       # This process's rank.
_sync_device = None             # Device used for the all_reduce; None = single process.
_sync_called = False            # init_multiprocessing must come before the first sync.
_counters = dict()              # name => device => moments tensor, filled by report().
_cumulative = dict()            # name => moments on the CPU, summed over devices and ranks.


def init_multiprocessing(rank, sync_device):
    """Enable cross-process collection; call after init_process_group, before any update()."""
    global _rank, _sync_device
    assert not _sync_called, 'init_multiprocessing() must be called before the first update()'
    _rank = rank
    _sync_device = sync_device


@misc.profiled_function
def report(name, value):
    """Add a set of scalars (tensor, array, list or number) to statistic `name`; returns value."""
    if name not in _counters:
        _counters[name] = dict()
    elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value
    elems = elems.detach().flatten().to(_reduce_dtype)
    moments = torch.stack([torch.ones_like(elems).sum(), elems.sum(), elems.square().sum()])
    moments = moments.to(_counter_dtype)
    device = moments.device
    if device not in _counters[name]:
        _counters[name][device] = torch.zeros_like(moments)
    _counters[name][device].add_(moments)
    return value


def report0(name, value):
    """Like report(), but only rank 0's value counts (other ranks report an empty set)."""
    report(name, value if _rank == 0 else [])
    return value


class Collector:
    """Averages of everything reported between the last two calls to `update()`.

    regex selects the statistics; with keep_previous, a statistic that received nothing since
    the last update keeps its previous average instead of becoming NaN.
    """

    def __init__(self, regex='.*', keep_previous=True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative = dict()
        self._moments = dict()
        self.update()
        self._moments.clear()

    def names(self):
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self):
        if not self._keep_previous:
            self._moments.clear()
        for name, cumulative in _sync(self.names()):
            if name not in self._cumulative:
                self._cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
            delta = cumulative - self._cumulative[name]
            self._cumulative[name].copy_(cumulative)
            if float(delta[0]) != 0:
                self._moments[name] = delta

    def _get_delta(self, name):
        assert self._regex.fullmatch(name)
        if name not in self._moments:
            self._moments[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        return self._moments[name]

    def num(self, name):
        return int(self._get_delta(name)[0])

    def mean(self, name):
        delta = self._get_delta(name)
        if int(delta[0]) == 0:
            return float('nan')
        return float(delta[1] / delta[0])

    def std(self, name):
        delta = self._get_delta(name)
        if int(delta[0]) == 0 or not np.isfinite(float(delta[1])):
            return float('nan')
        if int(delta[0]) == 1:
            return 0.0
        mean = float(delta[1] / delta[0])
        raw_var = float(delta[2] / delta[0])
        return float(np.sqrt(max(raw_var - mean * mean, 0)))

    def as_dict(self):
        """{name: EasyDict(num=, mean=, std=)} for every collected statistic."""
        stats = dnnlib.EasyDict()
        for name in self.names():
            stats[name] = dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
        return stats

    def __getitem__(self, name):
        return self.mean(name)


def _sync(names):
    """Sum the per-device counters (and, if enabled, the per-process ones) into _cumulative."""
    if len(names) == 0:
        return []
    global _sync_called
    _sync_called = True
    device = _sync_device if _sync_device is not None else torch.device('cpu')
    deltas = []
    for name in names:
        delta = torch.zeros([_num_moments], dtype=_counter_dtype, device=device)
        for counter in _counters[name].values():
            delta.add_(counter.to(device))
            counter.zero_()
        deltas.append(delta)
    deltas = torch.stack(deltas)
    if _sync_device is not None:
        torch.distributed.all_reduce(deltas)
    deltas = deltas.cpu()
    for idx, name in enumerate(names):
        if name not in _cumulative:
            _cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        _cumulative[name].add_(deltas[idx])
    return [(name, _cumulative[name]) for name in names]


default_collector = Collector()
