"""Allow-list unpickler for checkpoint files: reads them without running anything they name.

Reads three containers and returns the unpickled structure with placeholders:

  * plain pickles (EDM/RDM `.pkl`);
  * torch.save zip archives (`.pt`): <root>/data.pkl plus one member per storage;
  * legacy (pre-zip) torch.save streams, also found as the storage bytes inside plain pickles.

How nothing from the file runs:

  1. Every global a pickle references is checked against an explicit allow-list (tensor and
     storage rebuild helpers, OrderedDict, set, numpy scalars/arrays, EasyDict, torch dtypes,
     torch.nn containers, the persistence hook) by a static scan of the opcodes BEFORE
     unpickling starts, and again when the unpickler resolves it. Anything else (os.system,
     builtins.eval, subprocess, an unknown class) is refused with an error naming the global.
  2. The allowed callables are restricted re-implementations (tensor rebuilds check sizes
     against the stored bytes, numpy rebuilds take plain numeric dtypes only).
  3. A persistent object becomes a `PersistentStub` holding only `class_name` and `state`; its
     `module_src` is never executed or imported. Pickled torch.nn containers become inert
     `ContainerStub`s. Neither accepts a pickle BUILD, so a file cannot rewrite a placeholder.
     Turning stubs into real objects is torch_utils.rebuild's job; this module knows nothing
     of the classes they stand for.

How nothing from the file makes us allocate more than its contents justify: every read is
clamped to the bytes left in the file, memo indices are bounded by the file's length, storages
must be backed by bytes actually present (the legacy stream's budget; zip members stored
uncompressed with their declared size), and numpy rebuilds may not create uninitialised arrays.
"""

import collections
import io
import os
import pickle
import pickletools
import struct
import types
import zipfile

import numpy as np
import torch

import dnnlib
from torch_utils import persistence

#----------------------------------------------------------------------------

class Refused(pickle.UnpicklingError):
    """The file references something outside the allow-list, or is malformed in a way that
    would make the reader run something or allocate more than the file holds."""

#----------------------------------------------------------------------------
# Reads clamped to the bytes left: a length field in the file can never make us ask for more.

class _BoundedReader:
    def __init__(self, f):
        self._f = f
        start = f.tell()
        f.seek(0, os.SEEK_END)
        self._end = f.tell()
        f.seek(start)

    def _left(self):
        return max(self._end - self._f.tell(), 0)

    def read(self, n=-1):
        n = self._left() if n is None or n < 0 else min(n, self._left())
        return self._f.read(n)

    def readinto(self, buf):
        view = memoryview(buf).cast('B')
        return self._f.readinto(view[:self._left()])

    def readline(self, limit=-1):
        limit = self._left() if limit is None or limit < 0 else min(limit, self._left())
        return self._f.readline(limit)

    def seek(self, pos, whence=os.SEEK_SET):
        return self._f.seek(pos, whence)

    def tell(self):
        return self._f.tell()

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


def _numel(size):
    out = 1
    for n in size:
        out *= n
    return out


def _check_no_hooks(hooks, what):
    if hooks is not None and not (isinstance(hooks, dict) and len(hooks) == 0):
        raise Refused(f'{what} carries backward hooks; refusing them')


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise Refused(f'tensor rebuild got a {type(storage).__name__} instead of a storage')
    if type(storage_offset) is not int or not _is_int_tuple(size) or not _is_int_tuple(stride) or len(size) != len(stride):  # pylint: disable=unidiomatic-typecheck
        raise Refused('tensor rebuild got malformed offset/size/stride')
    _check_no_hooks(backward_hooks, 'a tensor')
    if metadata:
        raise Refused('tensor rebuild got unsupported metadata')
    itemsize = torch.empty((), dtype=storage.dtype).element_size()
    numel = storage.untyped.nbytes() // itemsize
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else storage_offset - 1
    if last >= numel:
        raise Refused(f'tensor of size {tuple(size)} reaches past the end of its storage ({numel} elements)')
    if _numel(size) > max(numel, 1):  # Overlapping views (stride 0) would expand on first copy.
        raise Refused(f'tensor of size {tuple(size)} has more elements than its storage ({numel})')
    t = torch.empty((0,), dtype=storage.dtype).set_(storage.untyped, storage_offset, tuple(size), tuple(stride))
    if requires_grad:
        if not t.is_floating_point() and not t.is_complex():
            raise Refused('integer tensor with requires_grad')
        t.requires_grad_(True)
    return t


def _rebuild_parameter(data, requires_grad, backward_hooks=None):
    if not isinstance(data, torch.Tensor):
        raise Refused('parameter rebuild got a non-tensor')
    _check_no_hooks(backward_hooks, 'a parameter')
    return torch.nn.Parameter(data.detach(), bool(requires_grad))


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    if state:
        raise Refused('parameter rebuild with extra Python state')
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _codecs_encode(text, encoding='latin1'):
    # Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise Refused('_codecs.encode is allowed only as the protocol-2 spelling of bytes')
    return text.encode('latin1')


def _torch_device(*args):
    if not all(isinstance(a, (str, int)) for a in args):
        raise Refused('torch.device with unexpected arguments')
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
        raise Refused(f'{what}: not a torch.save stream (bad magic number)')
    protocol = load_one()
    if type(protocol) is not int or protocol != _LEGACY_PROTOCOL:  # pylint: disable=unidiomatic-typecheck
        raise Refused(f'{what}: unsupported torch.save protocol')
    sys_info = load_one()
    if not isinstance(sys_info, dict) or not sys_info.get('little_endian', True):
        raise Refused(f'{what}: big-endian torch.save streams are not supported')

    storages = {}
    def persistent_load(pid):
        # Legacy files name the class of every plain torch.nn module with its source file and
        # text; only the (allow-listed, inert) class is used, the source is ignored.
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == 'module':
            if isinstance(pid[1], type) and issubclass(pid[1], ContainerStub):
                return pid[1]
            raise Refused(f'{what}: unsupported module reference {str(pid[1])[:80]}')
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != 'storage':
            raise Refused(f'{what}: unsupported persistent id {str(pid)[:80]}')
        _, storage_type, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise Refused(f'{what}: storage views are not supported')
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:  # pylint: disable=unidiomatic-typecheck
            raise Refused(f'{what}: malformed storage reference')
        if key not in storages:
            nbytes = numel * torch.empty((), dtype=storage_type.dtype).element_size()
            claimed = nbytes + sum(st[2].untyped.nbytes() for st in storages.values())
            if claimed > total_bytes:  # Checked before allocating: no memory bombs.
                raise Refused(f'{what}: storages claim {claimed} bytes in a stream of {total_bytes}')
            # Allocated now (tensors get built on it), filled once the data section is read.
            storages[key] = (storage_type.dtype, numel, _Storage(torch.UntypedStorage(nbytes), storage_type.dtype))
        elif storages[key][0] != storage_type.dtype:
            raise Refused(f'{what}: storage used with two element types')
        return storages[key][2]

    result = load_one(persistent_load)
    keys = load_one()
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise Refused(f'{what}: storage list does not match the stored tensors')
    for key in keys:
        dtype, numel, storage = storages[key]
        itemsize = torch.empty((), dtype=dtype).element_size()
        head = f.read(8)
        if len(head) != 8:
            raise EOFError(f'{what}: storage data truncated')
        count = struct.unpack('<q', head)[0]
        if count != numel:
            raise Refused(f'{what}: storage size mismatch')
        if count:
            # Read straight into the storage's memory (no intermediate copies).
            view = torch.empty((0,), dtype=torch.uint8).set_(storage.untyped).numpy()
            if f.readinto(view) != count * itemsize:
                raise EOFError(f'{what}: storage data truncated')
    return result


def _load_from_bytes(data):
    if not isinstance(data, bytes):
        raise Refused('torch.storage._load_from_bytes needs bytes')
    storage = _load_legacy_stream(io.BytesIO(data), 'embedded storage')
    if not isinstance(storage, _Storage):
        raise Refused('torch.storage._load_from_bytes did not produce a storage')
    return storage

#----------------------------------------------------------------------------
# Stubs: persistent objects and torch.nn containers are not built while unpickling.

class PersistentStub:
    """Placeholder for an EDM persistent object: its class name and saved state, nothing run.

    Made by the pickle's call of the persistence hook; refuses a later BUILD, so the file cannot
    replace the class name or state it was made with.
    """
    __slots__ = ('class_name', 'state')

    def __init__(self, meta):
        if not isinstance(meta, dict):
            raise Refused(f'persistent object metadata must be a dict, got {type(meta).__name__}')
        missing = [k for k in ('type', 'version', 'class_name', 'state') if k not in meta]
        if missing:
            raise Refused(f'persistent object metadata lacks {", ".join(missing)}')
        if meta['type'] != 'class' or type(meta['version']) is not int or meta['version'] != persistence.FORMAT_VERSION:  # pylint: disable=unidiomatic-typecheck
            raise Refused(f'unsupported persistent object type {str(meta["type"])[:40]!r} or format version {str(meta["version"])[:40]!r}')
        if type(meta['class_name']) is not str or not meta['class_name'].isidentifier():  # pylint: disable=unidiomatic-typecheck
            raise Refused(f'persistent object class name {str(meta["class_name"])[:80]!r} is not an identifier')
        if meta['state'] is not None and type(meta['state']) is not dict:  # pylint: disable=unidiomatic-typecheck
            raise Refused(f'state of persistent "{meta["class_name"]}" must be a dict')
        object.__setattr__(self, 'class_name', meta['class_name'])
        object.__setattr__(self, 'state', meta['state'] or {})

    def __setattr__(self, name, value):
        raise Refused(f'the file tries to set "{str(name)[:40]}" on the placeholder of persistent "{self.class_name}"')

    def __setstate__(self, state):
        raise Refused(f'the file tries to overwrite the placeholder of persistent "{self.class_name}"')


class ContainerStub:
    """Inert stand-in for a pickled torch.nn container (ModuleDict & co.)."""
    kind = None

    def __setstate__(self, state):
        if type(state) is not dict:  # pylint: disable=unidiomatic-typecheck
            raise Refused(f'{self.kind} state must be a dict')
        if 'state' in self.__dict__:
            raise Refused(f'the file sets the state of a torch.nn.{self.kind} twice')
        self.__dict__['state'] = state

    def __setattr__(self, name, value):
        raise Refused(f'the file tries to set "{str(name)[:40]}" on a torch.nn.{self.kind} placeholder')


_CONTAINERS = {name: type(f'_{name}Stub', (ContainerStub,), dict(kind=name)) for name in ('ModuleDict', 'ModuleList', 'Sequential')}

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


_NUMPY_KINDS = 'biufc'  # bool, integers, floats, complex: no objects, no raw or string records


def _numpy_reconstruct(subtype, shape, dtype):
    # numpy pickles an array as an empty (0,) array that the following BUILD fills from the
    # stored bytes; any other shape would hand out uninitialised (or huge) memory.
    if subtype is not np.ndarray:
        raise Refused('numpy array rebuild for a type other than numpy.ndarray')
    if not isinstance(shape, tuple) or shape != (0,):
        raise Refused(f'numpy array rebuild with shape {str(shape)[:40]} (numpy writes (0,) and fills it from the file)')
    return _np_reconstruct(subtype, shape, _numpy_dtype(dtype))


def _numpy_dtype(spec, align=False, copy=False):
    if not isinstance(spec, (str, bytes)) or len(spec) > 8:
        raise Refused('numpy dtype from something other than a short type code')
    dtype = np.dtype(spec.decode('latin1') if isinstance(spec, bytes) else spec, bool(align), bool(copy))
    if dtype.kind not in _NUMPY_KINDS or dtype.itemsize > 16:
        raise Refused(f'numpy dtype {dtype.str} is not a plain numeric type')
    return dtype


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMPY_KINDS:
        raise Refused('numpy scalar of a type that is not plain numeric')
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise Refused('numpy scalar whose stored bytes do not match its type')
    return _np_scalar(dtype, data)


_ALLOWED = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): PersistentStub,
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
    ('numpy', 'dtype'): _numpy_dtype,
    ('numpy.core.multiarray', '_reconstruct'): _numpy_reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): _numpy_reconstruct,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
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
        raise Refused(f'refusing to load global "{module}.{name}": it is not on the allow-list of '
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
    if obj is PersistentStub:
        return lambda meta: PersistentStub(meta)
    if obj is dnnlib.EasyDict or (isinstance(obj, type) and issubclass(obj, ContainerStub)):
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
            raise Refused(f'unexpected persistent id {str(pid)[:80]}')
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
    for count, (op, arg, _pos) in enumerate(pickletools.genops(f)):
        name = op.name
        if name in _STRING_OPS:
            recent.append(arg)
        elif name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
            # Picklers number memo entries 0, 1, 2, ...; the unpickler sizes its memo table by
            # the largest index, so a far-off index from a tiny file would allocate gigabytes.
            if arg > count:
                raise Refused(f'{what}: memo index {arg} out of range')
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
                raise Refused(f'{what}: a global whose name is computed at load time cannot be verified; refusing it')
            _resolve_global(recent[-2], recent[-1])
            recent.append(None)
        elif name in ('EXT1', 'EXT2', 'EXT4'):
            raise Refused(f'{what}: copyreg extension codes are not allowed')
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
# File formats.

def _read_member(zf, name, size, what, budget):
    """The bytes of zip member `name`, which must be stored uncompressed with exactly `size` bytes.

    torch.save writes every member uncompressed, so each byte we hand out is a byte of the file;
    a compressed member could expand to any size its header claims. `budget` (a one-element
    list) is what the whole archive may still hand out: overlapping members cannot multiply it.
    """
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise Refused(f'{what}: member "{name}" is missing from the archive') from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise Refused(f'{what}: member "{name}" is compressed; torch.save stores members uncompressed, '
                      f'and a compressed member can expand far beyond the file (re-save it with torch.save)')
    if info.file_size != size or info.compress_size != size:
        raise Refused(f'{what}: member "{name}" has {info.file_size} bytes, expected {size}')
    if size > budget[0]:
        raise Refused(f'{what}: members claim more bytes than the archive holds')
    budget[0] -= size
    buf = bytearray(size)
    with zf.open(info) as src:
        got = src.readinto(buf) if size else 0
        if got != size or src.read(1):
            raise Refused(f'{what}: member "{name}" does not hold the {size} bytes it declares')
    return buf


def _read_zip(f, what):
    """torch.save's zip format: <root>/data.pkl plus <root>/data/<key> per storage."""
    start = f.tell()
    f.seek(0, os.SEEK_END)
    budget = [f.tell() - start]
    f.seek(start)
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        raise Refused(f'{what}: corrupt or truncated torch zip archive ({err})') from None
    with zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
        if len(pkls) != 1:
            raise Refused(f'{what}: zip archive is not a torch.save file (no single <name>/data.pkl)')
        root = pkls[0][:-len('data.pkl')]
        if f'{root}byteorder' in names:
            size = zf.getinfo(f'{root}byteorder').file_size
            if size > 16 or bytes(_read_member(zf, f'{root}byteorder', size, what, budget)).strip() != b'little':
                raise Refused(f'{what}: big-endian torch.save files are not supported')
        data_pkl = bytes(_read_member(zf, pkls[0], zf.getinfo(pkls[0]).file_size, what, budget))
        _scan_globals(io.BytesIO(data_pkl), what)

        storages = {}
        def persistent_load(pid):
            if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != 'storage':
                raise Refused(f'unsupported persistent id {str(pid)[:80]}')
            _, storage_type, key, _location, numel = pid
            if not isinstance(storage_type, _StorageType) or type(key) is not str or type(numel) is not int or numel < 0:  # pylint: disable=unidiomatic-typecheck
                raise Refused('malformed storage reference')
            if key not in storages:
                itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
                raw = _read_member(zf, f'{root}data/{key}', numel * itemsize, f'{what}: storage "{key}"', budget)
                untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
                storages[key] = _Storage(untyped, storage_type.dtype)
            elif storages[key].dtype != storage_type.dtype:
                raise Refused(f'storage "{key}" is used with two element types')
            return storages[key]

        return _RestrictedUnpickler(io.BytesIO(data_pkl), persistent_load).load()


def read_pickle_file(f, what):
    """Unpickle a plain pickle, legacy torch.save stream or torch.save zip from binary file `f`.

    Returns the structure with PersistentStub placeholders; raises Refused naming `what`.
    """
    f = _BoundedReader(f)
    start = f.tell()
    head = f.read(64)
    f.seek(start)
    if head[:4] == b'PK\x03\x04':
        return _read_zip(f._f, what)  # pylint: disable=protected-access
    if not head or head[0] != 0x80:
        raise Refused(f'{what}: not a pickle, torch.save or safetensors file')
    # Legacy torch.save starts with a pickled magic number; an EDM .pkl with a dict.
    _scan_globals(f, what)
    f.seek(start)
    first = _RestrictedUnpickler(f).load()
    if type(first) is int and first == _LEGACY_MAGIC:  # pylint: disable=unidiomatic-typecheck
        f.seek(start)
        return _load_legacy_stream(f, what)
    return first

