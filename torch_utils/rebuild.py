"""Rebuild the placeholders of an unpickled checkpoint as the project's own classes.

torch_utils.safe_pickle turns every persistent object of a file into a PersistentStub (class
name and saved state). Here each stub becomes an instance of the class registered under that
name in torch_utils.persistence (whichever modules the caller imported registered them), built
from its recorded constructor arguments; every parameter and buffer is then copied in with a
check that it exists with the right shape, and the submodule tree must match exactly.
"""

import numpy as np
import torch

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


def construct(cls, args, kwargs):
    """`cls(*args, **kwargs)` for a network whose every weight is overwritten right after.

    Random initialisation is skipped (persistence.skip_weight_init) and the global RNG is left
    untouched, so loading a network does not change what a seeded run draws next.
    """
    with torch.random.fork_rng(devices=[]), persistence.skip_weight_init():
        return cls(*args, **kwargs)


def _build_persistent(stub, where, seen):
    cls = registered_class(stub.class_name)
    state = stub.state
    args = state.get('_init_args')
    kwargs = state.get('_init_kwargs')
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise Refused(f'{where} ({stub.class_name}) was saved without usable constructor arguments')
    args = materialize(list(args), where, seen)
    kwargs = materialize(dict(kwargs), where, seen)
    try:
        obj = construct(cls, args, kwargs)
    except Exception as err:
        raise RebuildError(f'cannot rebuild {where} ({stub.class_name}) from its constructor arguments: {type(err).__name__}: {err}') from err

    if not isinstance(obj, torch.nn.Module):
        _copy_simple_attributes(obj, state)
        return obj

    file_kinds, file_tensors = {}, {}
    _collect_stub_tree(stub, '', file_kinds, file_tensors)
    our_kinds, our_tensors, our_modules = {}, {}, {}
    _collect_module_tree(obj, '', our_kinds, our_tensors, our_modules)

    for name in sorted(set(file_kinds) | set(our_kinds)):
        label = name.rstrip('.') or '<root>'
        if name not in our_kinds:
            raise RebuildError(f'{where}: the file has a submodule "{label}" that {stub.class_name} does not have')
        if name not in file_kinds:
            raise RebuildError(f'{where}: submodule "{label}" of {stub.class_name} is missing from the file')
        if file_kinds[name] != our_kinds[name]:
            raise RebuildError(f'{where}: submodule "{label}" is {file_kinds[name]} in the file but {our_kinds[name]} here')
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

    states = {}
    _stub_states(stub, '', states)
    with torch.no_grad():
        for prefix, module in our_modules.items():
            for group in (module._parameters, module._buffers):  # pylint: disable=protected-access
                for name, dst in group.items():
                    if dst is None:
                        continue
                    # The loaded tensor becomes the parameter's data (no extra copy of large
                    # networks); it keeps the stored dtype. Parameter objects stay the same.
                    src = file_tensors[prefix + name].detach()
                    if isinstance(dst, torch.nn.Parameter):
                        dst.data = src
                        dst.requires_grad_(bool(file_tensors[prefix + name].requires_grad))
                    else:
                        group[name] = src
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

