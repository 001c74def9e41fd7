"""Load network checkpoints safely; save snapshots; export to safetensors.

One loader serves generate, train (--resume/--transfer) and evaluate. It reads

  * `.pkl`  pickle of a dict whose `ema` (and maybe `loss_fn`, `augment_pipe`) are EDM
            "persistent" objects (format in torch_utils/persistence.py), as EDM/RDM write them;
  * `.pt`   torch.save zip of a dict with `ema` and maybe `net`, `optimizer_state`, `step`;
            legacy (pre-zip) torch.save files too;
  * our own snapshots (the same two formats, written by save_snapshot/save_training_state);
  * `.safetensors` plus its JSON config, written by `python -m torch_utils.checkpoint export`.

Nothing from the file is executed. The published reference loads these files with plain
pickle, which imports whatever module and calls whatever function a file names, and executes
the module source embedded in every persistent object. Here instead:

  1. Every global the pickle references is checked against an explicit allow-list (tensor and
     storage rebuild helpers, OrderedDict, set, numpy scalars/arrays, EasyDict, torch dtypes,
     torch.nn containers, the persistence hook) by a static scan of the opcodes BEFORE
     unpickling starts, and again when the unpickler resolves it. Anything else (os.system,
     builtins.eval, subprocess, an unknown class) is refused with an error naming the global.
  2. The allowed callables are our own restricted re-implementations (e.g. tensor rebuilds
     check sizes against the stored bytes); pickled torch.nn containers become inert stubs.
  3. A persistent object becomes a stub holding `class_name` and `state`; `module_src` is
     never executed or imported. After unpickling, each top-level stub is rebuilt as OUR
     class (looked up by `class_name`) from its recorded constructor arguments, and every
     parameter and buffer is copied in with a check that it exists with the right shape.

This also means the reference's second-stage `.pt`, whose embedded module imports xformers and
einops, loads without either installed.
"""

import collections
import io
import json
import os
import pickle
import pickletools
import struct
import sys
import types
import zipfile

import numpy as np
import torch

import dnnlib
from torch_utils import persistence
from torch_utils.misc import atomic_write

#----------------------------------------------------------------------------

class CheckpointError(Exception):
    """A checkpoint could not be read; the message names the file and the problem."""


class _Refused(pickle.UnpicklingError):
    """The file references something outside the allow-list."""

# Modules whose persistent classes may appear in checkpoints. Imported lazily (the loss and
# augmentation modules import heavier things) and tolerated when missing or broken.
_KNOWN_MODULES = ('training.networks', 'training.loss', 'training.augment')
_import_errors = {}


def _import_known_modules():
    import importlib
    for name in _KNOWN_MODULES:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
            _import_errors.pop(name, None)
        except Exception as err:  # A module being rewritten must not block loading networks.
            _import_errors[name] = f'{type(err).__name__}: {err}'

#----------------------------------------------------------------------------
# Restricted re-implementations of the callables a checkpoint may invoke.

class _Storage:
    """Raw bytes of one torch storage plus the element type they were saved with."""
    def __init__(self, untyped, dtype):
        self.untyped = untyped
        self.dtype = dtype


class _StorageType:
    """Stands for `torch.FloatStorage` & co. in persistent ids: only its dtype is used."""
    def __init__(self, name, dtype):
        self.name = name
        self.dtype = dtype

    def __repr__(self):
        return f'<storage type {self.name}>'


_STORAGE_DTYPES = {
    'DoubleStorage': torch.float64, 'FloatStorage': torch.float32, 'HalfStorage': torch.float16,
    'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
    'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
    'BoolStorage': torch.bool, 'ComplexFloatStorage': torch.complex64,
    'ComplexDoubleStorage': torch.complex128, 'UntypedStorage': torch.uint8,
}


def _is_int_tuple(x):
    return isinstance(x, (tuple, list, torch.Size)) and all(type(v) is int and v >= 0 for v in x)  # pylint: disable=unidiomatic-typecheck


def _check_no_hooks(hooks, what):
    if hooks is not None and not (isinstance(hooks, dict) and len(hooks) == 0):
        raise _Refused(f'{what} carries backward hooks; refusing them')


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise _Refused(f'tensor rebuild got a {type(storage).__name__} instead of a storage')
    if type(storage_offset) is not int or not _is_int_tuple(size) or not _is_int_tuple(stride) or len(size) != len(stride):  # pylint: disable=unidiomatic-typecheck
        raise _Refused('tensor rebuild got malformed offset/size/stride')
    _check_no_hooks(backward_hooks, 'a tensor')
    if metadata:
        raise _Refused('tensor rebuild got unsupported metadata')
    itemsize = torch.empty((), dtype=storage.dtype).element_size()
    numel = storage.untyped.nbytes() // itemsize
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else storage_offset - 1
    if last >= numel:
        raise _Refused(f'tensor of size {tuple(size)} reaches past the end of its storage ({numel} elements)')
    t = torch.empty((0,), dtype=storage.dtype).set_(storage.untyped, storage_offset, tuple(size), tuple(stride))
    if requires_grad:
        if not t.is_floating_point() and not t.is_complex():
            raise _Refused('integer tensor with requires_grad')
        t.requires_grad_(True)
    return t


def _rebuild_parameter(data, requires_grad, backward_hooks=None):
    if not isinstance(data, torch.Tensor):
        raise _Refused('parameter rebuild got a non-tensor')
    _check_no_hooks(backward_hooks, 'a parameter')
    return torch.nn.Parameter(data.detach(), bool(requires_grad))


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    if state:
        raise _Refused('parameter rebuild with extra Python state')
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _codecs_encode(text, encoding='latin1'):
    # Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise _Refused('_codecs.encode is allowed only as the protocol-2 spelling of bytes')
    return text.encode('latin1')


def _torch_device(*args):
    if not all(isinstance(a, (str, int)) for a in args):
        raise _Refused('torch.device with unexpected arguments')
    return torch.device(*args)


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_LEGACY_PREFIX = pickle.dumps(_LEGACY_MAGIC, protocol=2)[:-1]  # a torch.save stream starts so


def _load_legacy_stream(f, what):
    """torch.save's pre-zip format: magic, protocol, sys_info, main pickle, storage keys, raw data.

    Used for whole legacy files and for the storage bytes inside plain pickles
    (torch.storage._load_from_bytes).
    """
    def load_one(persistent_load=None):
        start = f.tell()
        _scan_globals(f, what)
        f.seek(start)
        return _RestrictedUnpickler(f, persistent_load).load()

    start = f.tell()
    f.seek(0, os.SEEK_END)
    total_bytes = f.tell() - start
    f.seek(start)
    magic = load_one()
    if type(magic) is not int or magic != _LEGACY_MAGIC:  # pylint: disable=unidiomatic-typecheck
        raise _Refused(f'{what}: not a torch.save stream (bad magic number)')
    protocol = load_one()
    if type(protocol) is not int or protocol != _LEGACY_PROTOCOL:  # pylint: disable=unidiomatic-typecheck
        raise _Refused(f'{what}: unsupported torch.save protocol')
    sys_info = load_one()
    if not isinstance(sys_info, dict) or not sys_info.get('little_endian', True):
        raise _Refused(f'{what}: big-endian torch.save streams are not supported')

    storages = {}
    def persistent_load(pid):
        # Legacy files name the class of every plain torch.nn module with its source file and
        # text; only the (allow-listed, inert) class is used, the source is ignored.
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == 'module':
            if isinstance(pid[1], type) and issubclass(pid[1], _ContainerStub):
                return pid[1]
            raise _Refused(f'{what}: unsupported module reference {str(pid[1])[:80]}')
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != 'storage':
            raise _Refused(f'{what}: unsupported persistent id {str(pid)[:80]}')
        _, storage_type, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise _Refused(f'{what}: storage views are not supported')
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:  # pylint: disable=unidiomatic-typecheck
            raise _Refused(f'{what}: malformed storage reference')
        if key not in storages:
            nbytes = numel * torch.empty((), dtype=storage_type.dtype).element_size()
            claimed = nbytes + sum(st[2].untyped.nbytes() for st in storages.values())
            if claimed > total_bytes:  # Checked before allocating: no memory bombs.
                raise _Refused(f'{what}: storages claim {claimed} bytes in a stream of {total_bytes}')
            # Allocated now (tensors get built on it), filled once the data section is read.
            storages[key] = (storage_type.dtype, numel, _Storage(torch.UntypedStorage(nbytes), storage_type.dtype))
        elif storages[key][0] != storage_type.dtype:
            raise _Refused(f'{what}: storage used with two element types')
        return storages[key][2]

    result = load_one(persistent_load)
    keys = load_one()
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise _Refused(f'{what}: storage list does not match the stored tensors')
    for key in keys:
        dtype, numel, storage = storages[key]
        itemsize = torch.empty((), dtype=dtype).element_size()
        head = f.read(8)
        if len(head) != 8:
            raise EOFError(f'{what}: storage data truncated')
        count = struct.unpack('<q', head)[0]
        if count != numel:
            raise _Refused(f'{what}: storage size mismatch')
        if count:
            # Read straight into the storage's memory (no intermediate copies).
            view = torch.empty((0,), dtype=torch.uint8).set_(storage.untyped).numpy()
            if f.readinto(view) != count * itemsize:
                raise EOFError(f'{what}: storage data truncated')
    return result


def _load_from_bytes(data):
    if not isinstance(data, bytes):
        raise _Refused('torch.storage._load_from_bytes needs bytes')
    storage = _load_legacy_stream(io.BytesIO(data), 'embedded storage')
    if not isinstance(storage, _Storage):
        raise _Refused('torch.storage._load_from_bytes did not produce a storage')
    return storage

#----------------------------------------------------------------------------
# Stubs: persistent objects and torch.nn containers are not built while unpickling.

class _PersistentStub:
    def __init__(self, meta):
        persistence._check_meta(meta)  # pylint: disable=protected-access
        self.class_name = meta['class_name']
        self.state = meta['state'] or {}
        try:
            self.cls = persistence.get_registered_class(self.class_name)
        except KeyError as err:
            known = ', '.join(persistence.registered_class_names())
            extra = ''.join(f'; could not import {m} ({e})' for m, e in _import_errors.items())
            raise _Refused(f'{err.args[0]} (the module source stored in the file is never executed; known classes: {known}{extra})') from None


class _ContainerStub:
    """Inert stand-in for a pickled torch.nn container (ModuleDict & co.)."""
    kind = None

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise _Refused(f'{self.kind} state must be a dict')
        self.state = state


_CONTAINERS = {name: type(f'_{name}Stub', (_ContainerStub,), dict(kind=name)) for name in ('ModuleDict', 'ModuleList', 'Sequential')}

#----------------------------------------------------------------------------
# The allow-list.

def _numpy_attr(*candidates):
    for module_name, attr in candidates:
        try:
            module = __import__(module_name, fromlist=[attr])
            return getattr(module, attr)
        except (ImportError, AttributeError):
            continue
    raise ImportError(candidates)

_np_reconstruct = _numpy_attr(('numpy._core.multiarray', '_reconstruct'), ('numpy.core.multiarray', '_reconstruct'))
_np_scalar = _numpy_attr(('numpy._core.multiarray', 'scalar'), ('numpy.core.multiarray', 'scalar'))


def _numpy_reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise _Refused('numpy array rebuild for a type other than numpy.ndarray')
    return _np_reconstruct(subtype, shape, dtype)


_ALLOWED = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _PersistentStub,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice,
    ('_codecs', 'encode'): _codecs_encode,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter_with_state,
    ('torch.storage', '_load_from_bytes'): _load_from_bytes,
    ('torch', 'Size'): torch.Size,
    ('torch', 'device'): _torch_device,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('numpy.core.multiarray', '_reconstruct'): _numpy_reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): _numpy_reconstruct,
    ('numpy.core.multiarray', 'scalar'): _np_scalar,
    ('numpy._core.multiarray', 'scalar'): _np_scalar,
    ('dnnlib.util', 'EasyDict'): dnnlib.EasyDict,
    ('dnnlib', 'EasyDict'): dnnlib.EasyDict,
}
for _name, _dtype in _STORAGE_DTYPES.items():
    _ALLOWED[('torch', _name)] = _StorageType(_name, _dtype)
    _ALLOWED[('torch.cuda', _name)] = _StorageType(_name, _dtype)
for _name in ('float32', 'float', 'float64', 'double', 'float16', 'half', 'bfloat16', 'int64', 'long',
              'int32', 'int', 'int16', 'short', 'int8', 'uint8', 'bool', 'complex64', 'complex128'):
    _ALLOWED[('torch', _name)] = getattr(torch, _name)
for _name, _stub in _CONTAINERS.items():
    _ALLOWED[('torch.nn.modules.container', _name)] = _stub

# Python 2 spellings that protocol-2 pickles use (pickle maps them the same way).
_PY2_MODULES = {'__builtin__': 'builtins', 'copy_reg': 'copyreg'}


def _resolve_global(module, name):
    module = _PY2_MODULES.get(module, module)
    obj = _ALLOWED.get((module, name), None)
    if obj is None:
        raise _Refused(f'refusing to load global "{module}.{name}": it is not on the allow-list of '
                       f'checkpoint contents (nothing from the file was executed)')
    return _fresh(obj)


def _fresh(obj):
    """A private copy of an allowed global for one unpickler.

    A pickle can BUILD (setattr) onto any object it references, including the globals it
    names. Mutable ones (Python classes, functions, our markers) are therefore handed out as
    throwaway copies, so a file can never alter what the next load sees. Immutable C types and
    dtypes are returned as they are.
    """
    if isinstance(obj, _StorageType):
        return _StorageType(obj.name, obj.dtype)
    if obj is _PersistentStub:
        return lambda meta: _PersistentStub(meta)
    if obj is dnnlib.EasyDict or (isinstance(obj, type) and issubclass(obj, _ContainerStub)):
        return type(obj.__name__, (obj,), dict(_throwaway_of=obj))
    if isinstance(obj, types.FunctionType):
        return lambda *args, **kwargs: obj(*args, **kwargs)
    return obj


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, persistent_load=None):
        super().__init__(file)
        self._persistent_load = persistent_load

    def find_class(self, module, name):
        return _resolve_global(module, name)

    def persistent_load(self, pid):
        if self._persistent_load is None:
            raise _Refused(f'unexpected persistent id {str(pid)[:80]}')
        return self._persistent_load(pid)


_STRING_OPS = {'STRING', 'BINSTRING', 'SHORT_BINSTRING', 'UNICODE', 'BINUNICODE', 'SHORT_BINUNICODE', 'BINUNICODE8'}
_NEUTRAL_OPS = {'PROTO', 'FRAME', 'PUT', 'BINPUT', 'LONG_BINPUT', 'MEMOIZE'}


def _scan_globals(f, what):
    """Check every global of ONE pickle (up to its STOP) against the allow-list, running nothing.

    Tracks the two most recent pushes and the memo well enough to name the operands of
    STACK_GLOBAL as the standard pickler writes them; operands it cannot name are refused.
    """
    memo = {}
    recent = []  # most recent pushed values; None = not a string constant
    for op, arg, _pos in pickletools.genops(f):
        name = op.name
        if name in _STRING_OPS:
            recent.append(arg)
        elif name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
            memo[arg] = recent[-1] if recent else None
        elif name == 'MEMOIZE':
            memo[len(memo)] = recent[-1] if recent else None
        elif name in ('GET', 'BINGET', 'LONG_BINGET'):
            recent.append(memo.get(arg))
        elif name in ('GLOBAL', 'INST'):
            module, _, attr = arg.partition(' ')
            _resolve_global(module, attr)
            recent.append(None)
        elif name == 'STACK_GLOBAL':
            if len(recent) < 2 or not isinstance(recent[-1], str) or not isinstance(recent[-2], str):
                raise _Refused(f'{what}: a global whose name is computed at load time cannot be verified; refusing it')
            _resolve_global(recent[-2], recent[-1])
            recent.append(None)
        elif name in ('EXT1', 'EXT2', 'EXT4'):
            raise _Refused(f'{what}: copyreg extension codes are not allowed')
        elif name not in _NEUTRAL_OPS:
            recent.append(None)
        if isinstance(arg, (bytes, str)) and len(arg) > len(_LEGACY_PREFIX):
            # Storage bytes of a plain pickle are themselves torch.save streams: check their
            # globals now too, so that nothing at all runs before the whole file is vetted.
            head = arg[:len(_LEGACY_PREFIX)]
            if (head if isinstance(head, bytes) else head.encode('latin1', errors='replace')) == _LEGACY_PREFIX:
                inner = io.BytesIO(arg if isinstance(arg, bytes) else arg.encode('latin1'))
                for _ in range(5):  # magic, protocol, sys_info, object, storage keys
                    _scan_globals(inner, what)
        if len(recent) > 4:
            del recent[:-4]

#----------------------------------------------------------------------------
# Rebuilding persistent objects as our classes.

_SIMPLE_TYPES = (bool, int, float, str, type(None))


def _collect_stub_tree(stub, prefix, kinds, tensors):
    """Walk a stub's `_modules`, recording submodule kinds and every parameter/buffer."""
    state = stub.state
    kinds[prefix] = stub.class_name if isinstance(stub, _PersistentStub) else stub.kind
    for group in ('_parameters', '_buffers'):
        entries = state.get(group) or {}
        if not isinstance(entries, dict):
            raise _Refused(f'{group} of "{prefix or "<root>"}" is not a dict')
        for name, value in entries.items():
            if value is not None and not isinstance(value, torch.Tensor):
                raise _Refused(f'{prefix}{name} is a {type(value).__name__}, not a tensor')
            tensors[prefix + name] = value
    modules = state.get('_modules') or {}
    if not isinstance(modules, dict):
        raise _Refused(f'_modules of "{prefix or "<root>"}" is not a dict')
    for name, sub in modules.items():
        if sub is None:
            kinds[f'{prefix}{name}'] = None
        elif isinstance(sub, (_PersistentStub, _ContainerStub)):
            _collect_stub_tree(sub, f'{prefix}{name}.', kinds, tensors)
        else:
            raise _Refused(f'submodule {prefix}{name} is a {type(sub).__name__}, not a network module')


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


def _construct(cls, args, kwargs):
    from training import networks  # pylint: disable=import-outside-toplevel
    # Every weight is overwritten right after: skip random init (and never touch the global
    # RNG, so that loading a network does not change what a seeded run draws next).
    with torch.random.fork_rng(devices=[]):
        previous = networks._skip_weight_init  # pylint: disable=protected-access
        networks._skip_weight_init = True  # pylint: disable=protected-access
        try:
            return cls(*args, **kwargs)
        finally:
            networks._skip_weight_init = previous  # pylint: disable=protected-access


def _build_persistent(stub, where, seen):
    state = stub.state
    args = state.get('_init_args')
    kwargs = state.get('_init_kwargs')
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise _Refused(f'{where} ({stub.class_name}) was saved without usable constructor arguments')
    args = _materialize(list(args), where, seen)
    kwargs = _materialize(dict(kwargs), where, seen)
    try:
        obj = _construct(stub.cls, args, kwargs)
    except Exception as err:
        raise CheckpointError(f'cannot rebuild {where} ({stub.class_name}) from its constructor arguments: {type(err).__name__}: {err}') from err

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
            raise CheckpointError(f'{where}: the file has a submodule "{label}" that {stub.class_name} does not have')
        if name not in file_kinds:
            raise CheckpointError(f'{where}: submodule "{label}" of {stub.class_name} is missing from the file')
        if file_kinds[name] != our_kinds[name]:
            raise CheckpointError(f'{where}: submodule "{label}" is {file_kinds[name]} in the file but {our_kinds[name]} here')
    for name in sorted(set(file_tensors) | set(our_tensors)):
        if name not in our_tensors:
            raise CheckpointError(f'{where}: unexpected tensor "{name}" in the file')
        if name not in file_tensors:
            raise CheckpointError(f'{where}: tensor "{name}" is missing from the file')
        src, dst = file_tensors[name], our_tensors[name]
        if (src is None) != (dst is None):
            raise CheckpointError(f'{where}: tensor "{name}" is {"absent" if src is None else "present"} in the file but {"absent" if dst is None else "present"} here')
        if src is not None and src.shape != dst.shape:
            raise CheckpointError(f'{where}: tensor "{name}" has shape {list(src.shape)} in the file but {list(dst.shape)} here')

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


def _materialize(obj, where, seen):
    """Replace stubs in an unpickled structure by real objects (in place for dicts/lists)."""
    if isinstance(obj, _PersistentStub):
        key = id(obj)
        if key not in seen:
            seen[key] = (obj, _build_persistent(obj, where, seen))
        return seen[key][1]
    if isinstance(obj, _ContainerStub):
        raise _Refused(f'{where}: a bare torch.nn.{obj.kind} outside a network is not supported')
    if isinstance(obj, (dict, list, tuple)):
        key = id(obj)
        if key in seen:
            return seen[key][1]
        if isinstance(obj, dict):
            seen[key] = (obj, obj)
            for k in list(obj.keys()):
                obj[k] = _materialize(obj[k], f'{where}[{k!r}]', seen)
            original = getattr(type(obj), '_throwaway_of', None)
            if original is not None:  # Hand out the real EasyDict, not the per-load copy.
                seen[key] = (obj, original(obj))
                return seen[key][1]
        elif isinstance(obj, list):
            seen[key] = (obj, obj)
            for i, v in enumerate(obj):
                obj[i] = _materialize(v, f'{where}[{i}]', seen)
        else:
            items = [_materialize(v, f'{where}[{i}]', seen) for i, v in enumerate(obj)]
            new = type(obj)(items) if type(obj) in (tuple, torch.Size) else obj
            seen[key] = (obj, new)
            return new
    return obj

#----------------------------------------------------------------------------
# File formats.

def _read_zip(f, what):
    """torch.save's zip format: <root>/data.pkl plus <root>/data/<key> per storage."""
    try:
        zf = zipfile.ZipFile(f)
    except zipfile.BadZipFile as err:
        raise CheckpointError(f'{what}: corrupt or truncated torch zip archive ({err})') from None
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
        if len(pkls) != 1:
            raise CheckpointError(f'{what}: zip archive is not a torch.save file (no single <name>/data.pkl)')
        root = pkls[0][:-len('data.pkl')]
        if f'{root}byteorder' in zf.namelist() and zf.read(f'{root}byteorder').strip() != b'little':
            raise CheckpointError(f'{what}: big-endian torch.save files are not supported')
        data_pkl = zf.read(pkls[0])
        _scan_globals(io.BytesIO(data_pkl), what)

        storages = {}
        def persistent_load(pid):
            if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != 'storage':
                raise _Refused(f'unsupported persistent id {str(pid)[:80]}')
            _, storage_type, key, _location, numel = pid
            if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or type(numel) is not int:  # pylint: disable=unidiomatic-typecheck
                raise _Refused('malformed storage reference')
            if key not in storages:
                member = f'{root}data/{key}'
                try:
                    info = zf.getinfo(member)
                except KeyError:
                    raise _Refused(f'storage "{key}" is missing from the archive') from None
                itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
                if info.file_size != numel * itemsize:
                    raise _Refused(f'storage "{key}" has {info.file_size} bytes, expected {numel * itemsize}')
                raw = zf.read(member)
                untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
                storages[key] = _Storage(untyped, storage_type.dtype)
            elif storages[key].dtype != storage_type.dtype:
                raise _Refused(f'storage "{key}" is used with two element types')
            return storages[key]

        return _RestrictedUnpickler(io.BytesIO(data_pkl), persistent_load).load()


def _read_pickle_file(f, what):
    start = f.tell()
    head = f.read(64)
    f.seek(start)
    if head[:4] == b'PK\x03\x04':
        return _read_zip(f, what)
    if not head or head[0] != 0x80:
        raise CheckpointError(f'{what}: not a pickle, torch.save or safetensors file')
    # Legacy torch.save starts with a pickled magic number; an EDM .pkl with a dict.
    _scan_globals(f, what)
    f.seek(start)
    first = _RestrictedUnpickler(f).load()
    if type(first) is int and first == _LEGACY_MAGIC:  # pylint: disable=unidiomatic-typecheck
        f.seek(start)
        return _load_legacy_stream(f, what)
    return first


def _is_safetensors(path):
    try:
        with open(path, 'rb') as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b'{' and struct.unpack('<Q', head[:8])[0] < (1 << 32)


def _json_path(path):
    root, _ = os.path.splitext(path)
    return root + '.json'


def _load_safetensors(path, what, config_path=None):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    try:
        with safe_open(path, framework='pt', device='cpu') as sf:
            metadata = sf.metadata() or {}
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    except Exception as err:
        raise CheckpointError(f'{what}: cannot read safetensors file ({err})') from None
    if config_path is not None and os.path.isfile(config_path):
        try:
            with open(config_path, 'r', encoding='utf-8') as f:
                config = json.load(f)
        except (OSError, ValueError) as err:
            raise CheckpointError(f'{what}: cannot read its config {config_path} ({err})') from None
    elif 'rdm_config' in metadata:
        config = json.loads(metadata['rdm_config'])
    else:
        raise CheckpointError(f'{what}: no config found (expected {config_path or "<name>.json"} or embedded metadata)')
    if not isinstance(config, dict) or not isinstance(config.get('class_name'), str):
        raise CheckpointError(f'{what}: config lacks "class_name"')
    class_name = config['class_name']
    try:
        cls = persistence.get_registered_class(class_name)
    except KeyError as err:
        raise CheckpointError(f'{what}: {err.args[0]}') from None
    args, kwargs = config.get('init_args', []), config.get('init_kwargs', {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise CheckpointError(f'{what}: config has malformed init_args/init_kwargs')
    try:
        net = _construct(cls, args, kwargs)
    except Exception as err:
        raise CheckpointError(f'{what}: cannot build {class_name} from its config: {type(err).__name__}: {err}') from None
    state = net.state_dict()
    for name in sorted(set(state) | set(tensors)):
        if name not in state:
            raise CheckpointError(f'{what}: unexpected tensor "{name}" in the file')
        if name not in tensors:
            raise CheckpointError(f'{what}: tensor "{name}" is missing from the file')
        if tensors[name].shape != state[name].shape:
            raise CheckpointError(f'{what}: tensor "{name}" has shape {list(tensors[name].shape)} in the file but {list(state[name].shape)} here')
    with torch.no_grad():
        for name, dst in state.items():
            src = tensors[name]
            if src.dtype == dst.dtype:
                dst.copy_(src)
            else:
                raise CheckpointError(f'{what}: tensor "{name}" is {src.dtype} in the file but {dst.dtype} here')
    net.eval().requires_grad_(False)
    return {config.get('key', 'ema'): net} if config.get('key', 'ema') == 'ema' else {'ema': net, config['key']: net}

#----------------------------------------------------------------------------
# Public API.

def _prefixed(what, msg):
    return msg if msg.startswith(what) else f'{what}: {msg}'


def load_checkpoint(path_or_url, require_ema=True):
    """Load a checkpoint (path or URL) as a dict; networks come back as our own classes.

    Raises CheckpointError naming the file and the problem. Nothing stored in the file is
    executed. URLs are downloaded once into the dnnlib cache.
    """
    what = str(path_or_url)
    _import_known_modules()
    try:
        path = dnnlib.util.open_url(path_or_url, return_filename=True, verbose=False)
    except Exception as err:
        raise CheckpointError(f'{what}: cannot open ({err})') from None

    if _is_safetensors(path):
        config_path = _json_path(path) if not dnnlib.util.is_url(path_or_url) else None
        data = _load_safetensors(path, what, config_path)
    else:
        try:
            with open(path, 'rb') as f:
                raw = _read_pickle_file(f, what)
            data = _materialize(raw, 'checkpoint', {})
        except (CheckpointError, _Refused) as err:
            raise CheckpointError(_prefixed(what, str(err))) from None
        except (EOFError, pickle.UnpicklingError, ValueError, struct.error) as err:
            raise CheckpointError(_prefixed(what, f'truncated or corrupt file ({type(err).__name__}: {err})')) from None
        except (RuntimeError, TypeError, AttributeError, KeyError, IndexError, MemoryError) as err:
            raise CheckpointError(_prefixed(what, f'malformed checkpoint contents ({type(err).__name__}: {err})')) from None

    if not isinstance(data, dict):
        raise CheckpointError(f'{what}: expected a dict with an "ema" network, found a {type(data).__name__}')
    if require_ema and 'ema' not in data:
        raise CheckpointError(f'{what}: no "ema" network in the checkpoint (it has: {", ".join(map(str, data)) or "nothing"})')
    return data


def load_network(path_or_url, key='ema', expect=None):
    """The network stored under `key` (default the EMA weights), in eval mode on the CPU.

    `expect` optionally maps attributes to required values, e.g.
    `dict(img_resolution=256, img_channels=3)`, so that a checkpoint for the wrong stage or
    dataset fails here with a clear message instead of deep inside a sampler.
    """
    data = load_checkpoint(path_or_url, require_ema=(key == 'ema'))
    if key not in data:
        raise CheckpointError(f'{path_or_url}: no "{key}" entry in the checkpoint (it has: {", ".join(map(str, data))})')
    net = data[key]
    if not isinstance(net, torch.nn.Module):
        raise CheckpointError(f'{path_or_url}: "{key}" is a {type(net).__name__}, not a network')
    for name, wanted in (expect or {}).items():
        actual = getattr(net, name, None)
        if actual != wanted:
            raise CheckpointError(f'{path_or_url}: the network has {name}={actual}, expected {wanted} (wrong checkpoint for this stage?)')
    return net.eval().requires_grad_(False).cpu()


def save_snapshot(path, data):
    """Write `data` (dict with 'ema', ...) as an EDM-format pickle, atomically."""
    with atomic_write(path, 'wb') as f:
        pickle.dump(data, f, protocol=4)  # Readable by every Python 3 that EDM tools run on.


def save_training_state(path, data):
    """Write `data` (dict with 'net', 'ema', 'optimizer_state', 'step') with torch.save, atomically."""
    with atomic_write(path, 'wb') as f:
        torch.save(data, f)


def _to_json_value(value, where):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v, f'{where}[{i}]') for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _to_json_value(v, f'{where}.{k}') for k, v in value.items()}
    raise CheckpointError(f'cannot export constructor argument {where} of type {type(value).__name__}')


def network_config(net, key='ema', source=None):
    """JSON-able description that rebuilds `net`'s architecture."""
    if not persistence.is_persistent(net):
        raise CheckpointError(f'{type(net).__name__} is not a persistent network class')
    return dict(
        format='rdm-network', format_version=1,
        class_name=f'{type(net).__module__}.{type(net).__name__}',
        init_args=_to_json_value(list(net.init_args), 'init_args'),
        init_kwargs=_to_json_value(dict(net.init_kwargs), 'init_kwargs'),
        key=key, source=source,
    )


def export_safetensors(src, dst, key='ema', overwrite=False):
    """Write the network `key` of checkpoint `src` to `dst` (.safetensors) and its JSON config.

    Returns (safetensors_path, json_path).
    """
    from safetensors.torch import save as st_save  # pylint: disable=import-outside-toplevel
    if not str(dst).endswith('.safetensors'):
        raise CheckpointError(f'{dst}: output name must end in .safetensors')
    json_path = _json_path(dst)
    for out in (dst, json_path):
        if os.path.exists(out) and not overwrite:
            raise CheckpointError(f'{out}: already exists (pass --overwrite to replace it)')
    net = load_network(src, key=key)
    config = network_config(net, key='ema', source=os.path.basename(str(src)))
    config_text = json.dumps(config, indent=2)
    tensors = {name: t.detach().contiguous() for name, t in net.state_dict().items()}
    blob = st_save(tensors, metadata={'rdm_config': json.dumps(config)})
    with atomic_write(dst, 'wb') as f:
        f.write(blob)
    with atomic_write(json_path, 'w') as f:
        f.write(config_text + '\n')
    return dst, json_path

#----------------------------------------------------------------------------
# Command line: python -m torch_utils.checkpoint export IN OUT.safetensors

def _cli():
    import click  # pylint: disable=import-outside-toplevel

    @click.group()
    def main():
        """Inspect and convert network checkpoints (.pkl, .pt, .safetensors)."""

    @main.command()
    @click.argument('src', metavar='IN')
    @click.argument('dst', metavar='OUT.safetensors')
    @click.option('--key', help='Which network of the checkpoint to export', metavar='NAME', default='ema', show_default=True)
    @click.option('--overwrite', help='Replace OUT.safetensors / OUT.json if they exist', is_flag=True)
    def export(src, dst, key, overwrite):
        """Export the network of checkpoint IN (path or URL) as OUT.safetensors + OUT.json.

        The JSON holds the class name and constructor arguments; `load_checkpoint(OUT.safetensors)`
        rebuilds the network bit-identically.
        """
        try:
            st_path, json_path = export_safetensors(src, dst, key=key, overwrite=overwrite)
        except CheckpointError as err:
            raise click.ClickException(str(err)) from None
        click.echo(f'Wrote {st_path} and {json_path}')

    @main.command()
    @click.argument('src', metavar='IN')
    def info(src):
        """Print the entries of checkpoint IN and the networks' classes and sizes."""
        try:
            data = load_checkpoint(src, require_ema=False)
        except CheckpointError as err:
            raise click.ClickException(str(err)) from None
        for key, value in data.items():
            if isinstance(value, torch.nn.Module):
                count = sum(p.numel() for p in value.parameters())
                click.echo(f'{key}: {type(value).__module__}.{type(value).__name__}, {count:,} parameters, kwargs {dict(value.init_kwargs)}')
            else:
                text = repr(value)
                click.echo(f'{key}: {text[:100]}{"..." if len(text) > 100 else ""}')

    return main


if __name__ == '__main__':
    _cli()()  # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
