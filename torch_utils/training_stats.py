"""Running statistics of a training run, summed over devices and processes.

`report('Loss/loss', tensor)` adds the tensor's values to three running sums of that name (how
many, their sum, their sum of squares), on the tensor's own device, so reporting never waits for
the GPU. Once per tick the training loop calls `collect()`: the sums since the previous call are
added up over processes in one all_reduce (after `init_multiprocessing`) and turned into
num / mean / std per name.

Every process must report the same names in the same order, since the all_reduce stacks them
into one tensor: `report0` lets the other ranks register a name with no values.
"""

import math

import torch

import dnnlib

_rank = 0             # This process's rank: report0 counts only rank 0's values.
_sync_device = None   # Where the all_reduce runs; None = one process, nothing to reduce.
_pending = {}         # name -> float64 tensor [count, sum, sum of squares] since the last collect().
_latest = {}          # name -> EasyDict(num, mean, std) of the last period that had values.


def init_multiprocessing(rank, sync_device):
    """Sum the statistics over processes from now on (call once the process group exists)."""
    global _rank, _sync_device
    _rank, _sync_device = rank, sync_device


def report(name, value):
    """Add the values of `value` (tensor, array, list or number) to statistic `name`; returns value."""
    values = torch.as_tensor(value).detach().flatten().to(torch.float32)  # Empty: zero moments, the name registered.
    sums = _pending.get(name)
    moments = torch.stack([torch.ones_like(values).sum(), values.sum(), values.square().sum()]).to(torch.float64)
    _pending[name] = moments if sums is None else sums.add_(moments.to(sums.device))
    return value


def report0(name, value):
    """report() of rank 0's value only; the other ranks register the name."""
    report(name, value if _rank == 0 else [])
    return value


def _summary(count, total, squares):
    mean = total / count if count else math.nan
    # No values or an inf/nan among them: nan; one value: 0.
    std = math.nan if not math.isfinite(mean) else 0.0 if count == 1 else math.sqrt(max(squares / count - mean * mean, 0))
    return dnnlib.EasyDict(num=int(count), mean=mean, std=std)


def collect():
    """{name: EasyDict(num, mean, std)} of every statistic, over what all processes reported since
    the previous call; a statistic that got no values since then keeps its previous summary."""
    names = list(_pending)
    if names:
        sums = torch.stack([_pending[name].to(_sync_device or 'cpu') for name in names])
        if _sync_device is not None:
            torch.distributed.all_reduce(sums)
        for name, row in zip(names, sums.cpu().tolist()):
            _pending[name].zero_()
            if row[0] > 0 or name not in _latest:
                _latest[name] = _summary(*row)
    return dnnlib.EasyDict({name: _latest[name] for name in names})
