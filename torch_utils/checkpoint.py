"""Network checkpoints: read any published or own file without running anything from it; write
snapshots EDM's tools read; export to safetensors.

Formats read:
  .pkl          plain pickle of a dict whose `ema` (and maybe `loss_fn`, `augment_pipe`) are EDM
                persistent objects (torch_utils/persistence.py): EDM's and RDM's snapshots;
  .pt           torch.save zip of a dict with `ema` and maybe `net`, `optimizer_state`, `step`;
                legacy (pre-zip) torch.save streams of plain tensors;
  .safetensors  with the JSON config written by `python -m torch_utils.checkpoint export`.

How: the file is unpickled against an allow-list (ALLOWED) — `.pt` by torch's own weights-only
unpickler (torch.load(weights_only=True) inside torch.serialization.safe_globals), `.pkl` by the
pure-Python unpickler with a find_class that knows only ALLOWED, its tensors' storages again
through torch.load(weights_only=True). A persistent object comes out as a `Persistent`
placeholder (class name and saved state; its module source is never looked at), a torch.nn
container as a `Container`. Then each placeholder becomes the class registered under its name
(training.load_checkpoint imports the project's), built from its recorded constructor arguments
on the meta device (no memory, no random draws, a bound on the work), checked tensor by tensor
against the file, and given the file's tensors.

Memory stays bounded by the file: zip members must be stored uncompressed and within the
archive, pickle reads are clamped to the bytes left, no tensor may view more elements than its
storage holds, and a network described as larger than the file's tensors is refused unbuilt.
"""

import _compat_pickle
import collections
import io
import json
import os
import pickle
import re
import struct
import zipfile

import click
import numpy as np
import safetensors
import safetensors.torch
import torch

import dnnlib
from torch_utils import persistence

MAX_DOWNLOAD_BYTES = 64 << 30   # A checkpoint URL: training states of the largest published networks fit.
LEGACY_PREFIX = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)[:-1]  # torch.save's pre-zip magic number.


class CheckpointError(dnnlib.UserError):
    """A checkpoint could not be read; the message names the file and the problem."""


class Refused(pickle.UnpicklingError):
    """Something in the file outside what a checkpoint may hold."""

#----------------------------------------------------------------------------
# Placeholders.

class Persistent:
    """An EDM persistent object as the file describes it: class name and saved state."""
    __slots__ = ('class_name', 'state')

    def __init__(self, meta):
        if not isinstance(meta, dict) or not {'type', 'version', 'class_name', 'state'} <= set(meta):
            raise Refused('persistent object metadata is not a dict with type, version, class_name and state')
        if meta['type'] != 'class' or meta['version'] != persistence.FORMAT_VERSION:
            raise Refused(f'unsupported persistent object type {str(meta["type"])[:40]!r} or format version {str(meta["version"])[:40]!r}')
        if type(meta['class_name']) is not str or not meta['class_name'].isidentifier():  # pylint: disable=unidiomatic-typecheck
            raise Refused(f'persistent object class name {str(meta["class_name"])[:80]!r} is not an identifier')
        if meta['state'] is not None and type(meta['state']) is not dict:  # pylint: disable=unidiomatic-typecheck
            raise Refused(f'state of persistent "{meta["class_name"]}" is not a dict')
        object.__setattr__(self, 'class_name', meta['class_name'])
        object.__setattr__(self, 'state', meta['state'] or {})

    def __setattr__(self, name, value):
        raise Refused(f'the file tries to set "{str(name)[:40]}" on the placeholder of persistent "{self.class_name}"')

    def __setstate__(self, state):
        raise Refused(f'the file tries to overwrite the placeholder of persistent "{self.class_name}"')


class Container:
    """A pickled torch.nn container (ModuleDict & co.): its saved state, nothing built."""

    def __setstate__(self, state):
        if type(state) is not dict or 'state' in self.__dict__:  # pylint: disable=unidiomatic-typecheck
            raise Refused(f'malformed state of a torch.nn.{type(self).__name__}')
        self.__dict__['state'] = state


CONTAINERS = {name: type(name, (Container,), {}) for name in ('ModuleDict', 'ModuleList', 'Sequential')}

#----------------------------------------------------------------------------
# The allow-list: everything a checkpoint may name, by the name pickles use.

def _no_hooks(hooks):
    if hooks:
        raise Refused('a tensor carries backward hooks')


def _tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    _no_hooks(hooks)
    if metadata:
        raise Refused('a tensor carries metadata')
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, collections.OrderedDict())  # pylint: disable=protected-access


def _parameter(data, requires_grad, hooks=None, state=None):
    _no_hooks(hooks)
    if state or not isinstance(data, torch.Tensor):
        raise Refused('a parameter of unexpected form')
    return torch.nn.Parameter(data, requires_grad)


def _storage_from_bytes(data):
    if not isinstance(data, bytes):
        raise Refused('tensor storage of unexpected form')
    return _torch_load(io.BytesIO(data))


def _numpy_dtype(spec, align=False, copy=False):
    spec = spec.decode('latin1') if isinstance(spec, bytes) else spec
    dtype = np.dtype(spec[:8], bool(align), bool(copy)) if isinstance(spec, str) else None
    if dtype is None or dtype.kind not in 'biufc':  # Plain numbers only: no objects, no records.
        raise Refused(f'numpy dtype {str(spec)[:20]!r} is not a plain numeric type')
    return dtype


def _numpy_scalar(dtype, data):
    if not isinstance(dtype, np.dtype) or dtype.kind not in 'biufc' or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise Refused('numpy scalar of unexpected form')
    return np.frombuffer(data, dtype)[0]


def _numpy_array(cls, shape, dtype):
    # numpy pickles an array as an empty one that BUILD then fills from the file's bytes.
    if cls is not np.ndarray or shape != (0,):
        raise Refused(f'numpy array rebuild with shape {str(shape)[:40]} (numpy writes (0,) and fills it from the file)')
    return np.ndarray(shape, dtype if isinstance(dtype, np.dtype) and dtype.kind in 'biufc' else _numpy_dtype(dtype))


def _device(*args):
    if not all(isinstance(a, (str, int)) for a in args):
        raise Refused('torch.device of unexpected form')
    return torch.device(*args)


def _latin1(text, encoding='latin1'):  # Protocol 2's spelling of bytes.
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise Refused('_codecs.encode other than the protocol-2 spelling of bytes')
    return text.encode('latin1')


ALLOWED = {
    'torch_utils.persistence._reconstruct_persistent_obj': Persistent,
    'dnnlib.util.EasyDict': dnnlib.EasyDict, 'dnnlib.EasyDict': dnnlib.EasyDict,
    **{f'torch.nn.modules.container.{name}': cls for name, cls in CONTAINERS.items()},
    'numpy.dtype': _numpy_dtype, 'numpy.ndarray': np.ndarray,
    # The classes of numeric dtypes, whose state torch's unpickler may then BUILD.
    **{f'numpy.dtypes.{type(np.dtype(c)).__name__}': type(np.dtype(c)) for c in '?bhilqBHILQefdFD'},
    **{f'numpy.{core}.multiarray.{name}': fn for core in ('core', '_core')
       for name, fn in (('scalar', _numpy_scalar), ('_reconstruct', _numpy_array))},
}
PICKLE_ONLY = {  # What torch.load's weights-only unpickler already allows, for the .pkl reader.
    'torch._utils._rebuild_tensor_v2': _tensor_v2, 'torch._utils._rebuild_parameter': _parameter,
    'torch._utils._rebuild_parameter_with_state': _parameter, 'torch.storage._load_from_bytes': _storage_from_bytes,
    'collections.OrderedDict': collections.OrderedDict, 'builtins.set': set, 'builtins.frozenset': frozenset,
    'torch.Size': torch.Size, 'torch.device': _device,
    '_codecs.encode': _latin1, **{str(t): t for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                                     torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)},
}
BUILDABLE = (Container, dnnlib.EasyDict, np.ndarray, np.dtype)  # Types a pickle BUILD may fill.


def _refuse_global(name):
    raise Refused(f'refusing to load global "{name}": it is not on the allow-list of checkpoint contents '
                  f'(nothing from the file was executed)')


class _PickleReader(pickle._Unpickler):  # pylint: disable=protected-access
    """The pure-Python unpickler (its memo is a dict: no index makes it allocate) with the allow-list."""
    dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

    def find_class(self, module, name):
        if self.proto < 3:  # Python 2 spellings (__builtin__, copy_reg) in protocol 2 pickles.
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        full = f'{module}.{name}'
        obj = ALLOWED.get(full, PICKLE_ONLY.get(full))
        return obj if obj is not None else _refuse_global(full)

    def persistent_load(self, pid):
        raise Refused('unexpected persistent id in a plain pickle')

    def _build(self):
        # BUILD sets attributes on whatever is on the stack, classes and functions included: only
        # instances of a few inert types may receive state.
        target, state = self.stack[-2], self.stack[-1]
        if isinstance(target, Persistent):
            target.__setstate__(state)
        if not isinstance(target, BUILDABLE) or isinstance(target, type):
            raise Refused(f'the file sets the state of a {type(target).__name__}')
        if isinstance(target, np.dtype) and not (isinstance(state, tuple) and len(state) == 8 and state[2:5] == (None,) * 3 and state[7] == 0):
            raise Refused('numpy dtype state of unexpected form')
        pickle._Unpickler.load_build(self)  # pylint: disable=protected-access
    dispatch[pickle.BUILD[0]] = _build


class _Clamped:
    """A file whose reads stop at its end: a length field in a pickle cannot make us allocate more."""

    def __init__(self, f):
        self.f, self.end = f, os.fstat(f.fileno()).st_size

    def _left(self, n):
        left = max(self.end - self.f.tell(), 0)
        return left if n is None or n < 0 else min(n, left)

    def read(self, n=-1):
        return self.f.read(self._left(n))

    def readline(self, n=-1):
        return self.f.readline(self._left(n))

    def readinto(self, buf):
        return self.f.readinto(memoryview(buf)[:self._left(len(buf))])


def _check_zip(path):
    """torch.save stores every member uncompressed; a compressed member could expand to anything,
    overlapping members could multiply the archive's bytes."""
    with zipfile.ZipFile(path) as zf:
        members = zf.infolist()
    for info in members:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise Refused(f'member "{info.filename}" is compressed; torch.save stores members uncompressed, and a '
                          f'compressed member can expand far beyond the file (re-save it with torch.save)')
    if sum(info.file_size for info in members) > os.path.getsize(path):
        raise Refused('members claim more bytes than the archive holds')


def _torch_load(file):
    """torch.load(weights_only=True) with the allow-list; a refused global is named."""
    with torch.serialization.safe_globals([(obj, name) for name, obj in ALLOWED.items()]):
        if isinstance(file, str):  # A zip archive: its globals can be listed before anything is built.
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(file)
            if unsafe:
                _refuse_global(unsafe[0])
        try:
            return torch.load(file, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as err:
            text = str(err)
            if 'Only persistent_load of storage' in text:
                raise Refused('a legacy (pre-zip) torch.save file holding torch.nn modules, which no safe reader '
                              'takes; re-save it with torch.save in a trusted environment') from None
            found = re.search(r'GLOBAL ([\w.]+)', text)
            if found:
                _refuse_global(found.group(1))
            raise Refused(' '.join(text.split('WeightsUnpickler error:')[-1].split())[:200]) from None


def _unpickle(path):
    with open(path, 'rb') as f:
        head = f.read(16)
    if head.startswith(b'PK\x03\x04'):
        _check_zip(path)
        return _torch_load(path)
    if head.startswith(LEGACY_PREFIX):
        with open(path, 'rb') as f:
            return _torch_load(f)
    if not head.startswith(b'\x80'):
        raise Refused('not a pickle, torch.save or safetensors file')
    with open(path, 'rb') as f:
        return _PickleReader(_Clamped(f)).load()


#----------------------------------------------------------------------------
# Placeholders -> the project's classes.

class _Bounded(torch.overrides.TorchFunctionMode):
    """Counts the tensor operations and submodules a constructor makes: built on the meta device
    nothing is allocated, but a file's arguments could still ask for endless work."""

    def __init__(self, max_ops, max_modules, where):
        super().__init__()
        self.ops, self.max_ops, self.modules, self.max_modules, self.where = 0, max_ops, 0, max_modules, where

    def _count(self, what):
        if self.ops > self.max_ops or self.modules > self.max_modules:
            raise CheckpointError(f'{self.where}: its constructor arguments describe far more than the file holds '
                                  f'(more than {what}); refusing to build it')

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self._count(f'{self.max_ops:,} tensor operations')
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.hook = torch.nn.modules.module.register_module_module_registration_hook(self._module)
        return super().__enter__()

    def __exit__(self, *exc):
        self.hook.remove()
        return super().__exit__(*exc)

    def _module(self, *_args):
        self.modules += 1
        self._count(f'{self.max_modules:,} submodules')


def registered_class(class_name):
    try:
        return persistence.get_registered_class(class_name)
    except KeyError as err:
        raise CheckpointError(f'{err.args[0]}; the module source stored in a file is never executed: load files with '
                              f'training.load_checkpoint / training.load_network, which know the project\'s classes') from None


def _tree(state, prefix='', out=None):
    """{module path: (kind, state)} of a placeholder's module tree ('' = the root)."""
    out = {} if out is None else out
    modules = state.get('_modules') or {}
    if not isinstance(modules, dict):
        raise Refused(f'_modules of "{prefix or "<root>"}" is not a dict')
    for name, sub in modules.items():
        path = f'{prefix}{name}'
        if sub is None:
            out[path] = (None, {})
        elif isinstance(sub, Persistent):
            out[path] = (sub.class_name, sub.state)
        elif isinstance(sub, Container):
            out[path] = (type(sub).__name__, sub.__dict__.get('state', {}))
        else:
            raise Refused(f'submodule {path} is a {type(sub).__name__}, not a network module')
        if sub is not None:
            _tree(out[path][1], f'{path}.', out)
    return out


def _file_tensors(tree):
    tensors = {}
    for prefix, (_kind, state) in tree.items():
        for group in ('_parameters', '_buffers'):
            entries = state.get(group) or {}
            if not isinstance(entries, dict):
                raise Refused(f'{group} of "{prefix or "<root>"}" is not a dict')
            for name, value in entries.items():
                if value is not None and not isinstance(value, torch.Tensor):
                    raise Refused(f'{prefix}{"." if prefix else ""}{name} is a {type(value).__name__}, not a tensor')
                tensors[f'{prefix}{"." if prefix else ""}{name}'] = value
    return tensors


SIMPLE = (bool, int, float, str, type(None), np.generic)


def build(cls, args, kwargs, where, file_tensors, file_modules):
    """`cls(*args, **kwargs)` on the meta device, bounded by what the file holds, checked against
    `file_tensors` ({name: tensor}), then given them. Draws no random numbers."""
    max_ops = 100_000 + 16 * len(file_tensors)
    try:
        with torch.device('meta'), _Bounded(max_ops, 4 * file_modules + 64, where):
            obj = cls(*args, **kwargs)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f'{where}: cannot build it from its constructor arguments ({type(err).__name__}: {str(err)[:200]})') from None
    if not isinstance(obj, torch.nn.Module):
        return obj
    ours = dict(obj.named_parameters(recurse=True, remove_duplicate=False))
    ours.update(obj.named_buffers(recurse=True, remove_duplicate=False))
    file_numel = sum(t.numel() for t in file_tensors.values() if t is not None)
    if sum(t.numel() for t in ours.values()) > 8 * file_numel + (1 << 16):
        raise CheckpointError(f'{where}: its constructor arguments describe tensors of far more than the file holds '
                              f'({file_numel:,} elements); refusing to build it')
    present = {name: t for name, t in file_tensors.items() if t is not None}
    for name in sorted(set(present) | set(ours)):
        if name not in ours:
            raise CheckpointError(f'{where}: unexpected tensor "{name}" in the file')
        if name not in present:
            raise CheckpointError(f'{where}: tensor "{name}" is missing from the file')
        if present[name].shape != ours[name].shape or present[name].dtype != ours[name].dtype:
            raise CheckpointError(f'{where}: tensor "{name}" has shape {list(present[name].shape)} ({present[name].dtype}) '
                                  f'in the file but {list(ours[name].shape)} ({ours[name].dtype}) here')
    for prefix, module in obj.named_modules(remove_duplicate=False):
        for group in (module._parameters, module._buffers):  # pylint: disable=protected-access
            for name, mine in group.items():
                if mine is not None:
                    t = present[f'{prefix}{"." if prefix else ""}{name}']
                    group[name] = torch.nn.Parameter(t.detach(), t.requires_grad) if isinstance(mine, torch.nn.Parameter) else t.detach()
    return obj


def _adopt_attributes(obj, state, where, strict):
    """Plain attributes saved with the object. A network's follow from its constructor arguments,
    so one that contradicts them is refused (unless the meta-device build could not know it,
    None); other objects (losses, augmentation) keep settings changed after construction."""
    for key, value in state.items():
        mine = obj.__dict__.get(key, KeyError)
        if key.startswith('_') or mine is KeyError or not isinstance(value, SIMPLE + (list, tuple)):
            continue
        if key == 'training' and isinstance(value, bool):
            obj.training = value
        elif not strict or mine is None:
            obj.__dict__[key] = value.item() if isinstance(value, np.generic) else value
        elif mine != value:
            raise CheckpointError(f'{where}: its saved {key}={str(value)[:40]} contradicts its constructor arguments '
                                  f'({key}={str(mine)[:40]}); the file is inconsistent')


def _materialize(obj, where, memo):
    """Placeholders in an unpickled structure -> real objects."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        if obj.numel() > obj.untyped_storage().nbytes() // max(obj.element_size(), 1):  # Overlapping views expand on first use.
            raise Refused(f'tensor of size {tuple(obj.shape)} has more elements than its storage '
                          f'({obj.untyped_storage().nbytes() // max(obj.element_size(), 1)})')
        return obj
    if isinstance(obj, Container):
        raise Refused(f'a bare torch.nn.{type(obj).__name__} outside a network')
    if isinstance(obj, dict):
        out = memo[id(obj)] = dnnlib.EasyDict() if isinstance(obj, dnnlib.EasyDict) else type(obj)()
        out.update((k, _materialize(v, f'{where}[{k!r}]', memo)) for k, v in obj.items())
        return out
    if isinstance(obj, (list, tuple)):
        items = [_materialize(v, f'{where}[{i}]', memo) for i, v in enumerate(obj)]
        memo[id(obj)] = out = type(obj)(items) if type(obj) in (list, tuple, torch.Size) else items
        return out
    if not isinstance(obj, Persistent):
        return obj
    where = f'{where} ({obj.class_name})'
    cls = registered_class(obj.class_name)
    args, kwargs = obj.state.get('_init_args'), obj.state.get('_init_kwargs')
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise Refused(f'{where} was saved without usable constructor arguments')
    tree = {'': (obj.class_name, obj.state), **_tree(obj.state)}
    tensors = {name: _materialize(t, where, memo) for name, t in _file_tensors(tree).items()}
    built = build(cls, _materialize(list(args), where, memo), _materialize(kwargs, where, memo), where, tensors, len(tree))
    if isinstance(built, torch.nn.Module):
        ours = dict(built.named_modules(remove_duplicate=False))
        for path in sorted(set(tree) | set(ours)):
            kind = type(ours[path]).__name__ if path in ours else None
            if path not in ours or tree[path][0] != kind:
                raise CheckpointError(f'{where}: submodule "{path or "<root>"}" is {tree.get(path, ("absent",))[0]} in the file '
                                      f'but {kind or "absent"} here')
            _adopt_attributes(ours[path], tree[path][1], where, strict=True)
    else:
        _adopt_attributes(built, obj.state, where, strict=False)
    memo[id(obj)] = built
    return built

#----------------------------------------------------------------------------
# Safetensors + JSON config.

def _json_path(path):
    return os.path.splitext(path)[0] + '.json'


def _load_safetensors(path, what, config_path):
    try:
        with safetensors.safe_open(path, framework='pt', device='cpu') as sf:
            metadata = sf.metadata() or {}
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
        if config_path is not None and os.path.isfile(config_path):
            with open(config_path, encoding='utf-8') as f:
                config = json.load(f)
        else:
            config = json.loads(metadata['rdm_config'])
    except KeyError:
        raise CheckpointError(f'{what}: no config found (expected {config_path or "<name>.json"} or embedded metadata)') from None
    except (OSError, ValueError, safetensors.SafetensorError) as err:
        raise CheckpointError(f'{what}: cannot read it or its config ({err})') from None
    config = config if isinstance(config, dict) else {}
    args, kwargs = config.get('init_args', []), config.get('init_kwargs', {})
    if not isinstance(config.get('class_name'), str) or not isinstance(args, list) or not isinstance(kwargs, dict):
        raise CheckpointError(f'{what}: its config lacks class_name, init_args or init_kwargs')
    where = f'{what} ({config["class_name"]})'
    net = build(registered_class(config['class_name']), args, kwargs, where, tensors, 4 * len(tensors) + 64)
    if not isinstance(net, torch.nn.Module):
        raise CheckpointError(f'{what}: {config["class_name"]} is not a network')
    return dict(ema=net.eval().requires_grad_(False))


def export_safetensors(src, dst, key='ema', overwrite=False):
    """Write network `key` of checkpoint `src` as `dst` (.safetensors) plus its JSON config."""
    if not str(dst).endswith('.safetensors'):
        raise CheckpointError(f'{dst}: output name must end in .safetensors')
    for out in (dst, _json_path(dst)):
        problem = 'is a folder' if os.path.isdir(out) else 'already exists (pass --overwrite to replace it)' \
            if os.path.exists(out) and not overwrite else dnnlib.util.file_write_problem(out)
        if problem:
            raise CheckpointError(f'{out}: {problem}')
    net = load_network(src, key=key)
    config = dict(format='rdm-network', format_version=1, class_name=f'{type(net).__module__}.{type(net).__name__}',
                  init_args=list(net.init_args), init_kwargs=dict(net.init_kwargs), key='ema', source=os.path.basename(str(src)))
    blob = safetensors.torch.save({k: t.contiguous() for k, t in net.state_dict().items()},
                                  metadata={'rdm_config': json.dumps(config, default=_json_value)})
    try:
        with dnnlib.util.atomic_write(dst) as f:
            f.write(blob)
        with dnnlib.util.atomic_write(_json_path(dst), 'w') as f:
            f.write(json.dumps(config, indent=2, default=_json_value) + '\n')
    except OSError as err:
        raise CheckpointError(f'{dst}: cannot write ({err.strerror or err})') from None
    return dst, _json_path(dst)


def _json_value(value):
    if isinstance(value, np.generic):
        return value.item()
    raise CheckpointError(f'cannot export a constructor argument of type {type(value).__name__}')

#----------------------------------------------------------------------------
# Public API.

def _sniff(path):
    """Refuses a download that is no checkpoint (an HTML error page), before it is cached."""
    with open(path, 'rb') as f:
        head = f.read(9)
    if not (head[:4] == b'PK\x03\x04' or head[:1] == b'\x80' or (len(head) == 9 and head[8:9] == b'{')):
        raise dnnlib.util.DownloadError(f'{path}: the download is not a checkpoint (starts with {head[:9]!r}; an error page?)')


def load_checkpoint(path_or_url, require_ema=True):
    """The checkpoint (path or URL, downloaded once into the dnnlib cache) as a dict; networks come
    back as the registered classes. Raises CheckpointError naming the file and the problem."""
    what = str(path_or_url)
    try:
        path = dnnlib.util.open_url(what, return_filename=True, verbose=False, max_bytes=MAX_DOWNLOAD_BYTES, check=_sniff)
        with open(path, 'rb') as f:
            head = f.read(9)
        if len(head) == 9 and head[8:9] == b'{' and struct.unpack('<Q', head[:8])[0] < (1 << 32):
            data = _load_safetensors(path, what, None if dnnlib.util.is_url(what) else _json_path(path))
        else:
            data = _materialize(_unpickle(path), 'checkpoint', {})
    except CheckpointError as err:
        raise CheckpointError(err.message if err.message.startswith(what) else f'{what}: {err.message}') from None
    except Refused as err:
        raise CheckpointError(f'{what}: {err}') from None
    except (EOFError, pickle.UnpicklingError, ValueError, struct.error, zipfile.BadZipFile) as err:
        raise CheckpointError(f'{what}: truncated or corrupt file ({type(err).__name__}: {str(err)[:200]})') from None
    except OSError as err:
        raise CheckpointError(f'{what}: cannot open ({err})') from None
    except Exception as err:  # pylint: disable=broad-except
        # The file is untrusted input: whatever else it provokes in the allowed rebuilds is one line.
        raise CheckpointError(f'{what}: malformed checkpoint contents ({type(err).__name__}: {str(err)[:200]})') from None
    if not isinstance(data, dict):
        raise CheckpointError(f'{what}: expected a dict with an "ema" network, found a {type(data).__name__}')
    if require_ema and 'ema' not in data:
        raise CheckpointError(f'{what}: no "ema" network in the checkpoint (it has: {", ".join(map(str, data)) or "nothing"})')
    return data


def load_network(path_or_url, key='ema', expect=None):
    """The network stored under `key` (default the EMA weights), in eval mode on the CPU.
    `expect` maps attributes to required values (e.g. dict(img_resolution=256)), so that the
    wrong checkpoint fails here with a clear message rather than deep inside a sampler."""
    data = load_checkpoint(path_or_url, require_ema=(key == 'ema'))
    net = data.get(key)
    if not isinstance(net, torch.nn.Module):
        found = f'is a {type(net).__name__}, not a network' if key in data else f'is missing (it has: {", ".join(map(str, data))})'
        raise CheckpointError(f'{path_or_url}: "{key}" {found}')
    for name, wanted in (expect or {}).items():
        if getattr(net, name, None) != wanted:
            raise CheckpointError(f'{path_or_url}: the network has {name}={getattr(net, name, None)}, expected {wanted} (wrong checkpoint for this stage?)')
    return net.eval().requires_grad_(False).cpu()


def save_snapshot(path, data):
    """`data` (dict with 'ema', ...) as an EDM-format pickle, atomically."""
    with dnnlib.util.atomic_write(path) as f:
        pickle.dump(data, f, protocol=4)  # Readable by every Python 3 that EDM tools run on.


def save_training_state(path, data):
    """`data` (dict with 'net', 'ema', 'optimizer_state', 'step') with torch.save, atomically."""
    with dnnlib.util.atomic_write(path) as f:
        torch.save(data, f)

#----------------------------------------------------------------------------
# Command line: python -m torch_utils.checkpoint export|info

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

    The JSON holds the class name and constructor arguments; `training.load_network(OUT.safetensors)`
    rebuilds the network bit-identically.
    """
    click.echo('Wrote {} and {}'.format(*export_safetensors(src, dst, key=key, overwrite=overwrite)))


@main.command()
@click.argument('src', metavar='IN')
def info(src):
    """Print the entries of checkpoint IN and the networks' classes and sizes."""
    for key, value in load_checkpoint(src, require_ema=False).items():
        if isinstance(value, torch.nn.Module):
            count = sum(p.numel() for p in value.parameters())
            click.echo(f'{key}: {type(value).__module__}.{type(value).__name__}, {count:,} parameters, kwargs {dict(value.init_kwargs)}')
        else:
            text = repr(value)
            click.echo(f'{key}: {text[:100]}{"..." if len(text) > 100 else ""}')


if __name__ == '__main__':
    # As a script this file is the top of the import chain: it registers the project's classes.
    import training
    training._register()  # pylint: disable=protected-access
    main()  # pylint: disable=no-value-for-parameter
