"""Rebuild the placeholders of an unpickled checkpoint as the project's own classes.

torch_utils.safe_pickle turns every persistent object of a file into a PersistentStub (class
name and saved state). Here each stub becomes an instance of the class registered under that
name in torch_utils.persistence (whichever modules the caller imported registered them), built
from its recorded constructor arguments; every parameter and buffer is then copied in with a
check that it exists with the right shape, and the submodule tree must match exactly.

The constructor arguments come from the file too, and a tampered file can claim a huge network
(model_channels=10**6, a long channel_mult, M=10**9 noise levels) around a few kilobytes of
tensors. So the class is built under a budget set by the file's contents (see construct()):
every allocation is sized on the `meta` device (shape only, no memory) and charged before it
happens, submodules are counted, and so are tensor operations; a constructor that exceeds the
budget is stopped with one error line before it can allocate what the file does not justify.
"""

import contextlib
import contextvars

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from torch_utils import persistence
from torch_utils.safe_pickle import ContainerStub, PersistentStub, Refused

#----------------------------------------------------------------------------

class RebuildError(ValueError):
    """A stub could not be rebuilt as a registered class (unknown class, mismatched tensors)."""


def registered_class(class_name):
    """The persistent class registered for `class_name`, or RebuildError saying what to import."""
    try:
        return persistence.get_registered_class(class_name)
    except KeyError as err:
        known = ', '.join(persistence.registered_class_names()) or 'none'
        raise RebuildError(f'{err.args[0]} (the module source stored in the file is never executed; import the module '
                           f'that defines the class before loading, e.g. `import training`; known classes: {known})') from None

# Rebuilding persistent objects as our classes.

_SIMPLE_TYPES = (bool, int, float, str, type(None))


def _collect_stub_tree(stub, prefix, kinds, tensors):
    """Walk a stub's `_modules`, recording submodule kinds and every parameter/buffer."""
    state = stub.state
    kinds[prefix] = stub.class_name if isinstance(stub, PersistentStub) else stub.kind
    for group in ('_parameters', '_buffers'):
        entries = state.get(group) or {}
        if not isinstance(entries, dict):
            raise Refused(f'{group} of "{prefix or "<root>"}" is not a dict')
        for name, value in entries.items():
            if value is not None and not isinstance(value, torch.Tensor):
                raise Refused(f'{prefix}{name} is a {type(value).__name__}, not a tensor')
            tensors[prefix + name] = value
    modules = state.get('_modules') or {}
    if not isinstance(modules, dict):
        raise Refused(f'_modules of "{prefix or "<root>"}" is not a dict')
    for name, sub in modules.items():
        if sub is None:
            kinds[f'{prefix}{name}'] = None
        elif isinstance(sub, (PersistentStub, ContainerStub)):
            _collect_stub_tree(sub, f'{prefix}{name}.', kinds, tensors)
        else:
            raise Refused(f'submodule {prefix}{name} is a {type(sub).__name__}, not a network module')


def _collect_module_tree(module, prefix, kinds, tensors, modules):
    kinds[prefix] = type(module).__name__
    modules[prefix] = module
    for name, value in list(module._parameters.items()) + list(module._buffers.items()):  # pylint: disable=protected-access
        tensors[prefix + name] = value
    for name, sub in module._modules.items():  # pylint: disable=protected-access
        if sub is None:
            kinds[f'{prefix}{name}'] = None
        else:
            _collect_module_tree(sub, f'{prefix}{name}.', kinds, tensors, modules)


def _stub_states(stub, prefix, out):
    out[prefix] = stub.state
    for name, sub in (stub.state.get('_modules') or {}).items():
        if sub is not None:
            _stub_states(sub, f'{prefix}{name}.', out)


def _copy_simple_attributes(obj, state):
    """Plain settings saved with the object (e.g. a changed sigma_min) override the defaults."""
    for key, value in state.items():
        if key.startswith('_') or key not in obj.__dict__:
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, _SIMPLE_TYPES) and isinstance(obj.__dict__[key], _SIMPLE_TYPES + (np.generic,)):
            setattr(obj, key, value)


#----------------------------------------------------------------------------
# Construction bounded by the file's contents.

# A constructor may allocate up to SLACK times the elements the file holds, plus SMALL_NUMEL,
# before the exact comparison, so that an honest mismatch (other channel counts or block
# numbers) is still reported by the name of the first differing tensor.
SLACK = 8
SMALL_NUMEL = 1 << 16
BASE_OPS = 100_000          # Tensor operations any constructor may run, plus one per element of the
                            # file's tensors (e.g. a noise-level table filled in a loop).
RISKY_NUMEL = 1 << 22       # Operations whose result could exceed this (see _BoundedConstruction)
                            # are sized on the meta device first and charged to the budget.
_META = torch.device('meta')


class OverBudget(RebuildError):
    """The constructor arguments describe more than the file's tensors can back."""


class _Budget:
    def __init__(self, where, max_numel, max_modules, max_ops):
        self.where = where
        self.max_numel, self.max_modules, self.max_ops = max_numel, max_modules, max_ops
        self.numel = 0          # Elements allocated by factories and charged operations so far.
        self.ops = 0
        self.modules = 0

    def _refuse(self, what):
        raise OverBudget(f'{self.where}: its constructor arguments describe {what} than the file holds '
                         f'(tampered or mismatched arguments?); refusing to build it')

    def allocate(self, numel):
        self.numel += numel
        if self.numel > self.max_numel:
            self._refuse(f'tensors of more than {self.max_numel:,} elements, far more')

    def count_op(self):
        self.ops += 1
        if self.ops > self.max_ops:
            self._refuse(f'more than {self.max_ops:,} tensor operations, far more work')

    def register_module(self):
        self.modules += 1
        if self.max_modules is not None and self.modules > self.max_modules:
            self._refuse(f'more than {self.max_modules:,} submodules, far more')


_active_budget = contextvars.ContextVar('rebuild_budget', default=None)


def _on_module(module, name, sub):
    budget = _active_budget.get()
    if budget is not None:
        budget.register_module()


# Functions whose result size comes from their size arguments rather than from input tensors.
_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.rand, torch.randn, torch.randint, torch.randperm,
              torch.arange, torch.linspace, torch.logspace, torch.eye, torch.empty_strided, torch.tril_indices,
              torch.triu_indices}
_SIZED_METHODS = {torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty, torch.Tensor.new_full,
                  torch.Tensor.repeat, torch.Tensor.tile, torch.tile, torch.Tensor.repeat_interleave,
                  torch.repeat_interleave, torch.Tensor.resize_, torch.Tensor.expand, torch.Tensor.broadcast_to}


def _tensors_in(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


def _numel_of(result):
    if isinstance(result, torch.Tensor):
        return result.numel()
    if isinstance(result, (list, tuple)):
        return sum(_numel_of(x) for x in result)
    return 0


class _BoundedConstruction(TorchFunctionMode):
    """Charges what a constructor allocates to a budget before it is allocated.

    Factories (zeros, randn, arange, ...) and size-taking methods (new_zeros, repeat, ...) are
    first called on the meta device, which gives the result's shape without memory. An
    operation that could make a result much larger than its inputs (an outer product or
    broadcast of two large tensors, a copy of an expanded view) is sized the same way. Other
    operations produce at most what their inputs hold, and tensors made from Python data
    (torch.tensor, as_tensor) at most what the file's constructor arguments spell out. Every
    operation then runs as usual, so legitimate networks are built exactly as without the
    bound."""

    def __init__(self, budget):
        super().__init__()
        self.budget = budget

    def _charge(self, func, args, kwargs):
        if func in _FACTORIES:
            return _numel_of(func(*args, **dict(kwargs, device=_META)))
        if func in _SIZED_METHODS:
            if func in (torch.Tensor.expand, torch.Tensor.broadcast_to):
                return 0  # A view: copying it later is checked as a risky operation.
            meta_args = [args[0].to(_META)] + list(args[1:])
            return _numel_of(func(*meta_args, **kwargs))
        tensors = list(_tensors_in(args))
        if kwargs:
            tensors += _tensors_in(kwargs.values())
        sizes = sorted((x.numel() for x in tensors), reverse=True)
        risky = (len(sizes) >= 2 and sizes[0] * sizes[1] > RISKY_NUMEL) or any(
            x.numel() > RISKY_NUMEL and x.numel() > x.untyped_storage().nbytes() // max(x.element_size(), 1) for x in tensors)
        if not risky:
            return 0
        meta_args, meta_kwargs = pytree.tree_map(lambda x: x.to(_META) if isinstance(x, torch.Tensor) else x, (args, kwargs))
        return _numel_of(func(*meta_args, **meta_kwargs))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.budget.count_op()
        self.budget.allocate(self._charge(func, args, kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def _bounded(budget):
    token = _active_budget.set(budget)
    handle = torch.nn.modules.module.register_module_module_registration_hook(_on_module)
    try:
        with _BoundedConstruction(budget):
            yield
    finally:
        handle.remove()
        _active_budget.reset(token)


def construct(cls, args, kwargs, where='network', max_numel=0, max_modules=None):
    """`cls(*args, **kwargs)` for an object whose every parameter and buffer is replaced right after.

    The constructor runs under a bound set by what the file holds (`max_numel` tensor elements,
    `max_modules` submodules, None: no limit on those): it may allocate at most about SLACK
    times as many elements and register SLACK times as many submodules, and run at most
    BASE_OPS + max_numel tensor operations; beyond that it is stopped with OverBudget before
    the allocation happens (see _BoundedConstruction). Random initialisation is skipped
    (persistence.skip_weight_init) and the global RNG is left untouched, so loading a network
    does not change what a seeded run draws next.
    """
    budget = _Budget(where, SLACK * max_numel + SMALL_NUMEL, None if max_modules is None else SLACK * max_modules + 64,
                     BASE_OPS + max_numel)
    with torch.random.fork_rng(devices=[]), persistence.skip_weight_init(), _bounded(budget):
        return cls(*args, **kwargs)


def _module_tree(module):
    kinds, tensors, modules = {}, {}, {}
    _collect_module_tree(module, '', kinds, tensors, modules)
    return kinds, tensors, modules


def adopt_tensors(obj, file_tensors, where, requires_grad=None, same_dtype=False, state_dict_only=False):
    """Check `obj`'s parameters and buffers against the file's tensors (names, shapes, and
    dtypes when `same_dtype`), then make the file's tensors their data (no copy; the parameter
    objects stay the same). With `state_dict_only` the file need not list what state_dict()
    leaves out (empty entries, non-persistent buffers). RebuildError on any mismatch."""
    _, our_tensors, our_modules = _module_tree(obj)
    if state_dict_only:  # What state_dict() leaves out stays as constructed.
        saved = set(obj.state_dict(keep_vars=True))
        our_tensors = {name: t for name, t in our_tensors.items() if name in saved or name in file_tensors}
    for name in sorted(set(file_tensors) | set(our_tensors)):
        if name not in our_tensors:
            raise RebuildError(f'{where}: unexpected tensor "{name}" in the file')
        if name not in file_tensors:
            raise RebuildError(f'{where}: tensor "{name}" is missing from the file')
        src, dst = file_tensors[name], our_tensors[name]
        if (src is None) != (dst is None):
            raise RebuildError(f'{where}: tensor "{name}" is {"absent" if src is None else "present"} in the file but {"absent" if dst is None else "present"} here')
        if src is not None and src.shape != dst.shape:
            raise RebuildError(f'{where}: tensor "{name}" has shape {list(src.shape)} in the file but {list(dst.shape)} here')
        if src is not None and same_dtype and src.dtype != dst.dtype:
            raise RebuildError(f'{where}: tensor "{name}" is {src.dtype} in the file but {dst.dtype} here')

    with torch.no_grad():
        for prefix, module in our_modules.items():
            for group in (module._parameters, module._buffers):  # pylint: disable=protected-access
                for name, dst in group.items():
                    if dst is None or prefix + name not in our_tensors:
                        continue
                    # The loaded tensor becomes the parameter's data (no extra copy of large
                    # networks); it keeps the stored dtype. Parameter objects stay the same.
                    src = file_tensors[prefix + name]
                    if isinstance(dst, torch.nn.Parameter):
                        dst.data = src.detach()
                        dst.requires_grad_(bool(src.requires_grad) if requires_grad is None else requires_grad)
                    else:
                        group[name] = src.detach()
    return our_modules


def _build_persistent(stub, where, seen):
    cls = registered_class(stub.class_name)
    state = stub.state
    args = state.get('_init_args')
    kwargs = state.get('_init_kwargs')
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise Refused(f'{where} ({stub.class_name}) was saved without usable constructor arguments')
    args = materialize(list(args), where, seen)
    kwargs = materialize(dict(kwargs), where, seen)

    file_kinds, file_tensors = {}, {}
    _collect_stub_tree(stub, '', file_kinds, file_tensors)
    file_numel = sum(t.numel() for t in file_tensors.values() if t is not None)
    file_modules = sum(1 for name, kind in file_kinds.items() if name and kind is not None)
    try:
        obj = construct(cls, args, kwargs, where=f'{where} ({stub.class_name})', max_numel=file_numel, max_modules=file_modules)
    except OverBudget:
        raise
    except Exception as err:
        raise RebuildError(f'cannot rebuild {where} ({stub.class_name}) from its constructor arguments: {type(err).__name__}: {err}') from err

    if not isinstance(obj, torch.nn.Module):
        _copy_simple_attributes(obj, state)
        return obj

    our_kinds, _, _ = _module_tree(obj)
    for name in sorted(set(file_kinds) | set(our_kinds)):
        label = name.rstrip('.') or '<root>'
        if name not in our_kinds:
            raise RebuildError(f'{where}: the file has a submodule "{label}" that {stub.class_name} does not have')
        if name not in file_kinds:
            raise RebuildError(f'{where}: submodule "{label}" of {stub.class_name} is missing from the file')
        if file_kinds[name] != our_kinds[name]:
            raise RebuildError(f'{where}: submodule "{label}" is {file_kinds[name]} in the file but {our_kinds[name]} here')
    our_modules = adopt_tensors(obj, file_tensors, where)

    states = {}
    _stub_states(stub, '', states)
    for prefix, module in our_modules.items():
        state = states.get(prefix, {})
        _copy_simple_attributes(module, state)
        if isinstance(state.get('training'), bool):
            module.training = state['training']
    return obj


def materialize(obj, where, seen=None):
    """Replace stubs in an unpickled structure by real objects (in place for dicts/lists)."""
    seen = {} if seen is None else seen
    if isinstance(obj, PersistentStub):
        key = id(obj)
        if key not in seen:
            seen[key] = (obj, _build_persistent(obj, where, seen))
        return seen[key][1]
    if isinstance(obj, ContainerStub):
        raise Refused(f'{where}: a bare torch.nn.{obj.kind} outside a network is not supported')
    if isinstance(obj, (dict, list, tuple)):
        key = id(obj)
        if key in seen:
            return seen[key][1]
        if isinstance(obj, dict):
            seen[key] = (obj, obj)
            for k in list(obj.keys()):
                obj[k] = materialize(obj[k], f'{where}[{k!r}]', seen)
            original = getattr(type(obj), '_throwaway_of', None)
            if original is not None:  # Hand out the real EasyDict, not the per-load copy.
                seen[key] = (obj, original(obj))
                return seen[key][1]
        elif isinstance(obj, list):
            seen[key] = (obj, obj)
            for i, v in enumerate(obj):
                obj[i] = materialize(v, f'{where}[{i}]', seen)
        else:
            items = [materialize(v, f'{where}[{i}]', seen) for i, v in enumerate(obj)]
            new = type(obj)(items) if type(obj) in (tuple, torch.Size) else obj
            seen[key] = (obj, new)
            return new
    return obj

