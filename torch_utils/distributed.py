"""Process-group helpers. `torchrun` sets RANK/WORLD_SIZE and we join a process group
(NCCL on CUDA, gloo on CPU); a plain `python script.py` is one process with no group at all."""

import atexit
import contextlib
import datetime
import os

import torch

import dnnlib
from torch_utils import training_stats


def get_device() -> torch.device:
    """The device this process should use: its own GPU under torchrun, else cuda:0, else CPU."""
    return torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0'))) if torch.cuda.is_available() else torch.device('cpu')


def init() -> None:
    """Join the torchrun process group if there is one; idempotent; a no-op for one process."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ and not torch.distributed.is_initialized():  # Under torchrun.
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(get_device())
        torch.distributed.init_process_group(backend='nccl' if use_cuda else 'gloo', init_method='env://',
                                             timeout=datetime.timedelta(minutes=30))
        # A CPU group without a practical deadline, for waiting on long work of one rank
        # (a multi-GB download): the main group's collectives time out after 30 minutes.
        global _patient_group
        _patient_group = torch.distributed.new_group(backend='gloo', timeout=datetime.timedelta(days=7))
        # Without an explicit teardown, gloo's threads can abort the process at interpreter exit
        # ("terminate called without an active exception"), which torchrun reports as a failure.
        atexit.register(shutdown)
    if get_world_size() > 1:
        training_stats.init_multiprocessing(rank=get_rank(), sync_device=get_device())


_patient_group = None


def all_ok(ok: bool, patient: bool = False) -> bool:
    """True on every rank iff `ok` on every rank (collective; trivial for one process).
    patient=True waits without the main group's deadline (see init)."""
    if not torch.distributed.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=torch.device('cpu') if patient else get_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=_patient_group if patient else None)
    return bool(flag.item())


def rank0_first(fn):
    """fn() on rank 0, then on the other ranks, which wait without a deadline meanwhile: a
    download lands in the cache once and the others read it from there. An exception of rank 0
    is raised there; the other ranks then raise a UserError pointing to rank 0's message."""
    result, error = None, None
    if get_rank() == 0:
        try:
            result = fn()
        except Exception as err:  # pylint: disable=broad-exception-caught
            error = err
    if not all_ok(error is None, patient=True):
        if error is not None:
            raise error
        raise dnnlib.UserError('rank 0 failed; see its message')
    return fn() if get_rank() != 0 else result


def split_batches(num_items: int, batch_size: int, world_size: int) -> list:
    """Indices 0..num_items-1 in the reference generate.py's batches: contiguous, of near-equal
    size (at most batch_size), and a multiple of world_size of them; rank r takes
    batches[r::world_size], so step s of every rank ends with batches[:(s + 1) * world_size]."""
    num_batches = max((num_items - 1) // (batch_size * world_size) + 1, 1) * world_size
    return list(torch.arange(num_items).tensor_split(num_batches))


def my_batches(num_items: int, batch_size: int, distributed: bool = True) -> list:
    """This process's non-empty batches of split_batches (all of them with distributed=False), as
    (index list, how many items all processes have done once this step is over)."""
    rank, world = (get_rank(), get_world_size()) if distributed else (0, 1)
    batches = split_batches(num_items, batch_size, world)
    return [(b.tolist(), sum(map(len, batches[:i - rank + world]))) for i, b in enumerate(batches) if i % world == rank and len(b)]


def shutdown() -> None:
    """Leave the process group (registered at exit by init(); safe to call twice)."""
    if torch.distributed.is_initialized():
        # Every rank gets here before any tears down: a gloo peer that closes its connections
        # while another still listens can abort that one ("terminate called ..."). A rank that
        # stopped on an error waits a minute at most for the others.
        with contextlib.suppress(RuntimeError):
            torch.distributed.monitored_barrier(group=_patient_group, timeout=datetime.timedelta(seconds=60))
        torch.distributed.destroy_process_group()


def get_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def print0(*args, **kwargs) -> None:
    if get_rank() == 0:
        print(*args, **kwargs)
