"""Small torch helpers of the training loop and the augmentation pipe."""

import itertools

import numpy as np
import torch

#----------------------------------------------------------------------------
# Constant tensors, made once per (value, shape, dtype, device): the augmentation pipe asks for
# the same few numbers every step, and uploading them to the GPU each time would cost a sync.

_constants = {}


def constant(value, shape=None, dtype=None, device=None):
    value, dtype, device = np.asarray(value), dtype or torch.get_default_dtype(), torch.device(device or 'cpu')
    key = (value.tobytes(), value.shape, value.dtype, None if shape is None else tuple(shape), dtype, device)
    if key not in _constants:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        _constants[key] = (tensor if shape is None else tensor.expand(shape)).contiguous()
    return _constants[key]

#----------------------------------------------------------------------------

class InfiniteSampler(torch.utils.data.Sampler):
    """Dataset indices forever, in EDM's order: a permutation drawn from RandomState(seed), and
    after every item a swap with an item at most half the dataset back (drawn from the same
    RandomState), so that epochs differ. Rank r of n processes takes items r, r + n, ... of
    that one stream."""

    def __init__(self, dataset, rank=0, num_replicas=1, seed=0, window_size=0.5):
        assert len(dataset) > 0 and 0 <= rank < num_replicas
        super().__init__()
        self.size, self.rank, self.num_replicas, self.seed = len(dataset), rank, num_replicas, seed
        self.window = int(np.rint(self.size * window_size))

    def __iter__(self):
        rnd = np.random.RandomState(self.seed)
        order = rnd.permutation(self.size)  # arange, then shuffle: the same draws.
        for step in itertools.count():
            pos = step % self.size
            if step % self.num_replicas == self.rank:
                yield order[pos]
            if self.window >= 2:
                other = (pos - rnd.randint(self.window)) % self.size
                order[pos], order[other] = order[other], order[pos]

#----------------------------------------------------------------------------
# Parameters and buffers by name.

def named_tensors(module):
    """{name: tensor} of a module's parameters and buffers."""
    return dict(itertools.chain(module.named_parameters(), module.named_buffers()))


@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy every tensor of dst_module that src_module has under the same name; returns the
    names copied. ValueError when a shape differs, or (require_all) when src lacks a name."""
    src, dst = named_tensors(src_module), named_tensors(dst_module)
    for name, tensor in dst.items():
        if name not in src:
            if require_all:
                raise ValueError(f'the source has no tensor "{name}"')
            continue
        if src[name].shape != tensor.shape:
            raise ValueError(f'"{name}" is {list(src[name].shape)} in the source and {list(tensor.shape)} here')
        tensor.copy_(src[name])
    return [name for name in dst if name in src]


def check_ddp_consistency(module):
    """Assert that every process holds rank 0's parameters and buffers (NaNs count as equal)."""
    if not torch.distributed.is_initialized():
        return
    for name, tensor in named_tensors(module).items():
        mine = torch.nan_to_num(tensor.detach()) if tensor.is_floating_point() else tensor.detach()
        theirs = mine.clone()
        torch.distributed.broadcast(theirs, src=0)
        assert torch.equal(mine, theirs), f'{type(module).__name__}.{name} differs between processes'

def activation_bytes(module, *inputs, **kwargs):
    """Bytes of the tensors autograd keeps for backward in one call module(*inputs, **kwargs), each
    storage counted once, the module's own parameters and buffers not at all. On the meta device
    this costs neither memory nor compute."""
    own = {t.untyped_storage()._cdata for t in itertools.chain(module.parameters(), module.buffers())}
    saved = {}  # Storage -> bytes.

    def pack(tensor):
        saved[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(*inputs, **kwargs)
    return sum(nbytes for storage, nbytes in saved.items() if storage not in own)

#----------------------------------------------------------------------------

def print_module_summary(module, inputs, max_nesting=2):
    """Call module(*inputs) once and print a table of the submodules called at most `max_nesting`
    calls deep: the parameters and buffers not listed in an earlier row, and the first output's
    shape and dtype. Returns module's output."""
    names = {m: name or '<top-level>' for name, m in module.named_modules()}
    depth, calls = [0], []

    def enter(_module, _inputs):
        depth[0] += 1

    def leave(mod, _inputs, out):
        depth[0] -= 1
        if depth[0] <= max_nesting and mod in names:
            calls.append((mod, [t for t in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(t)]))

    with torch.nn.modules.module.register_module_forward_pre_hook(enter), \
            torch.nn.modules.module.register_module_forward_hook(leave):  # Removed on exit, also on an error.
        output = module(*inputs)
    seen, rows, totals = set(), [], [0, 0]
    for mod, outs in calls:
        own = [[t for t in tensors if id(t) not in seen] for tensors in (mod.parameters(), mod.buffers())]
        fresh = [t for t in outs if id(t) not in seen]
        seen.update(id(t) for t in own[0] + own[1] + fresh)
        if own[0] or own[1] or fresh:
            counts = [sum(t.numel() for t in tensors) for tensors in own]
            totals = [a + b for a, b in zip(totals, counts)]
            shape, dtype = (str(list(outs[0].shape)), str(outs[0].dtype).split('.')[-1]) if outs else ('-', '-')
            rows.append([names[mod], *(str(n) if n else '-' for n in counts), shape, dtype])
    rows = [[type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype'], *rows,
            ['Total', str(totals[0]), str(totals[1]), '', '']]
    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    print('\n' + '\n'.join('  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows) + '\n')
    return output
