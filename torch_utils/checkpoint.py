"""Network checkpoints: read published and own files without running anything from them, write
snapshots that EDM's and the reference's tools unpickle, export to safetensors.

Read:  .pkl          pickle of a dict whose 'ema' (and maybe 'loss_fn', 'augment_pipe') are EDM
                     persistent objects (torch_utils/persistence.py): EDM's, the reference's, ours;
       .pt           torch.save of a dict with 'ema' and maybe 'net', 'optimizer_state', 'step'
                     (the pre-zip format too, for plain tensors);
       .safetensors  with the JSON config that `python -m torch_utils.checkpoint export` writes.

Unpickling knows only ALLOWED: .pt through torch.load(weights_only=True) in
torch.serialization.safe_globals, .pkl through the pure-Python unpickler with an allow-list
find_class (tensors rebuilt by torch's own functions, their storages through torch.load again). A
persistent object comes out as a `Persistent` (class name and saved state; its module source is
never looked at). Each is then built as the class registered under its name
(training.load_checkpoint imports the project's) from its constructor arguments, on the meta
device under an operation budget, compared tensor by tensor and attribute by attribute with the
file, and given the file's tensors.

Memory stays bounded by the file: zip members must be stored as torch.save stores them and fit in
the archive, pickle reads stop at the end of the file, no tensor views more elements than its
storage holds, and a network described as larger than the file's tensors is refused unbuilt.
"""

import _compat_pickle
import codecs
import collections
import io
import json
import os
import pickle
import pickletools
import re
import reprlib
import zipfile

import click
import numpy as np
import safetensors.torch
import torch

import dnnlib
from torch_utils import persistence

MAX_DOWNLOAD_BYTES = 16 << 30   # A checkpoint URL: an ADM-256 training state (net, EMA, Adam: 9 GB) fits.
LEGACY_MAGIC = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)[:-1]  # How a pre-zip torch.save file starts.
MAX_CONFIG_BYTES = 1 << 20      # The JSON config beside a .safetensors file.


class CheckpointError(dnnlib.UserError):
    """A checkpoint that cannot be read; the message names the file. Callers add the option."""

#----------------------------------------------------------------------------
# What the unpicklers may produce.

Persistent = collections.namedtuple('Persistent', 'class_name state')  # Immutable: no BUILD can retarget it.


def _persistent(meta):
    """Stands in for torch_utils.persistence._reconstruct_persistent_obj(meta)."""
    ok = isinstance(meta, dict) and meta.get('type') == 'class' and meta.get('version') == persistence.FORMAT_VERSION
    name, state = (meta.get('class_name'), meta.get('state')) if ok else (None, None)
    if type(name) is not str or not name.isidentifier() or type(state) not in (dict, type(None)):  # pylint: disable=unidiomatic-typecheck
        raise CheckpointError('a persistent object whose metadata is not EDM\'s (type, version 6, class_name, state)')
    return Persistent(name, state or {})


class Container:
    """A pickled torch.nn container (ModuleDict, ModuleList, Sequential); BUILD gives it its state."""


def _numpy_dtype(spec, align=False, copy=False):
    # A dtype object (which a BUILD may have altered) is rebuilt from its string and checked again.
    spec = spec.str if isinstance(spec, np.dtype) else spec.decode('latin1') if isinstance(spec, bytes) else spec
    dtype = np.dtype(spec[:8], bool(align), bool(copy)) if isinstance(spec, str) else None
    if dtype is None or dtype.kind not in 'biufc':  # Plain numbers: no objects, records or strings.
        raise CheckpointError(f'numpy dtype {str(spec)[:20]!r} is not a plain numeric type')
    return dtype


def _numpy_scalar(dtype, data):
    return np.frombuffer(data, _numpy_dtype(dtype), count=1)[0]  # Refuses data shorter than the dtype.


_NDARRAY = object()  # What a pickle's numpy.ndarray stands for: _numpy_array's first argument, nothing callable.


def _numpy_array(cls, shape, dtype):
    # numpy pickles an array as an empty one that BUILD then fills from the file's bytes.
    if cls is not _NDARRAY or shape != (0,):
        raise CheckpointError(f'numpy array rebuild with shape {str(shape)[:40]} (numpy writes (0,) and fills it from the file)')
    return np.ndarray(shape, _numpy_dtype(dtype))


ALLOWED = {  # What a checkpoint may name, by the name pickles use; for both readers.
    'torch_utils.persistence._reconstruct_persistent_obj': _persistent,
    'dnnlib.util.EasyDict': dnnlib.EasyDict, 'dnnlib.EasyDict': dnnlib.EasyDict,
    **{f'torch.nn.modules.container.{name}': type(name, (Container,), {}) for name in ('ModuleDict', 'ModuleList', 'Sequential')},
    'numpy.dtype': _numpy_dtype, 'numpy.ndarray': _NDARRAY,
    **{f'numpy.dtypes.{type(np.dtype(c)).__name__}': type(np.dtype(c)) for c in '?bhilqBHILQefdFD'},  # BUILD targets.
    **{f'numpy.{core}.multiarray.{name}': fn for core in ('core', '_core') for name, fn in (('scalar', _numpy_scalar), ('_reconstruct', _numpy_array))},
}
PICKLE_ONLY = {  # Names torch.load's own list holds (its entries win there): tensors are rebuilt as torch.load rebuilds them.
    'torch.storage._load_from_bytes': lambda data: _torch_load(io.BytesIO(data)),  # Through our reader.
    **{f'{obj.__module__}.{obj.__qualname__}': obj for obj in (
        torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, torch._utils._rebuild_parameter_with_state,  # pylint: disable=protected-access
        collections.OrderedDict, set, frozenset, torch.Size, torch.device, codecs.encode)},
    **{str(t): t for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
                           torch.int16, torch.int32, torch.int64, torch.bool)},
}
READABLE = {**ALLOWED, **PICKLE_ONLY}


def _allowed(module, name):
    """What a pickle's global names (__builtin__.set is protocol 2's builtins.set), or a refusal."""
    name = f'{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}'
    if name not in READABLE:
        raise CheckpointError(f'refusing to load global "{name}": it is not on the allow-list of checkpoint contents '
                              f'(nothing from the file was executed)')
    return READABLE[name]

#----------------------------------------------------------------------------
# Unpickling.

class _PickleReader(pickle._Unpickler):  # pylint: disable=protected-access
    """The pure-Python unpickler (its memo is a dict: no index makes it allocate) with the allow-list."""
    dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

    def find_class(self, module, name):
        return _allowed(module, name)

    def _build(self):
        # BUILD sets attributes on whatever is on the stack, classes included: only instances of a
        # few inert types may receive state.
        if not isinstance(self.stack[-2], (Container, dnnlib.EasyDict, np.ndarray, np.dtype)) or isinstance(self.stack[-2], type):
            raise CheckpointError(f'the file sets the state of a {type(self.stack[-2]).__name__}')
        pickle._Unpickler.load_build(self)  # pylint: disable=protected-access
    dispatch[pickle.BUILD[0]] = _build

    def _refuse_bytearray(self):  # Its length is allocated, zero-filled, before the bytes are read.
        raise CheckpointError('the file holds a bytearray, which no checkpoint does')
    dispatch[pickle.BYTEARRAY8[0]] = _refuse_bytearray


class _Clamped:
    """A file whose reads stop at its end: no length field in a pickle makes us allocate more."""

    def __init__(self, f):
        self.f, self.readline, self.end = f, f.readline, f.seek(0, io.SEEK_END)
        f.seek(0)

    def read(self, n=-1):
        return self.f.read(-1 if n is None or n < 0 else max(0, min(n, self.end - self.f.tell())))


def _check_zip(path):
    """torch.save stores members uncompressed; a compressed member could expand to anything, and
    members sharing bytes could multiply the archive. Its pickles may name only what ours reads."""
    with zipfile.ZipFile(path) as zf:
        members = zf.infolist()
        for info in members:
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise CheckpointError(f'member "{info.filename}" is compressed; torch.save stores members uncompressed, and a '
                                      f'compressed member can expand far beyond the file (re-save it with torch.save)')
        if sum(info.file_size for info in members) > os.path.getsize(path):
            raise CheckpointError('members claim more bytes than the archive holds')
        for info in members:
            if info.filename.endswith('data.pkl'):
                _check_globals(io.BytesIO(zf.read(info)), pickles=1)


def _check_globals(f, pickles):
    """torch.load's own allow-list is wider than ours (its bytearray(10**10) would zero-fill 10 GB):
    the pickles of a torch.save file may name only ALLOWED, PICKLE_ONLY and storage types."""
    for _ in range(pickles):
        for op, arg, _ in pickletools.genops(f):
            if op.name == 'GLOBAL' and not re.fullmatch(r'torch \w+Storage', arg):
                _allowed(*arg.split(' ', 1))


def _torch_load(file):
    """torch.load(weights_only=True) with the allow-list; `file`: the path of a zip (torch.save's
    format) or a file object of the pre-zip format at its start (its five pickles); both checked first."""
    if isinstance(file, str):
        _check_zip(file)
    else:
        _check_globals(_Clamped(file), pickles=5)
        file.seek(0)
    # np.ndarray under a name no pickle reaches (_check_globals): torch lets BUILD fill arrays of allowed types only.
    with torch.serialization.safe_globals([(obj, name) for name, obj in ALLOWED.items()] + [(np.ndarray, 'BUILD target')]):
        try:
            return torch.load(file, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as err:
            if 'Only persistent_load of storage' in str(err):
                raise CheckpointError('a legacy (pre-zip) torch.save file holding torch.nn modules, which no safe reader '
                                      'takes; re-save it with torch.save in a trusted environment') from None
            raise CheckpointError(' '.join(str(err).split('WeightsUnpickler error:')[-1].split())[:200]) from None


def _format(path):
    """'zip', 'legacy', 'pickle' or 'safetensors' from the file's first 16 bytes, or a refusal. Also
    open_url's check of a download: an error page instead of a checkpoint never enters the cache."""
    with open(path, 'rb') as f:
        head = f.read(16)
    if head[:4] == b'PK\x03\x04':
        return 'zip'
    if head[:1] == b'\x80':
        return 'legacy' if head.startswith(LEGACY_MAGIC) else 'pickle'
    if head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < 1 << 32:
        return 'safetensors'
    raise dnnlib.UserError(f'not a pickle, torch.save or safetensors file (it starts with {head[:9]!r}; an error page?)')


def read_pickle(f, encoding='ASCII'):
    """A plain pickle (seekable binary file `f` at its start) read against the allow-list: numbers,
    strings, containers, numpy arrays, tensors; persistent objects stay `Persistent` placeholders."""
    return _PickleReader(_Clamped(f), encoding=encoding).load()

#----------------------------------------------------------------------------
# Placeholders -> the project's classes.

class _OpBudget(torch.overrides.TorchFunctionMode):
    """On the meta device a constructor allocates nothing, but a file's arguments could still ask
    for endless work (a hundred million blocks): count its tensor operations (about 6 per tensor it makes)."""

    def __init__(self, limit, where):
        super().__init__()
        self.left, self.where = limit, where

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.left -= 1
        if self.left < 0:
            raise CheckpointError(f'{self.where}: its constructor arguments describe far more than the file holds '
                                  f'(too many tensor operations); refusing to build it')
        return func(*args, **(kwargs or {}))


def _join(prefix, name):
    return f'{prefix}.{name}' if prefix else name


def _module_tree(obj, path=''):
    """{module path: (class name, state)} of a placeholder and its submodules ('' = itself)."""
    tree = {path: obj if isinstance(obj, Persistent) else (type(obj).__name__, vars(obj))}
    for name, sub in (tree[path][1].get('_modules') or {}).items():
        if not isinstance(sub, (Persistent, Container, type(None))):
            raise CheckpointError(f'submodule {_join(path, name)} is a {type(sub).__name__}, not a network module')
        tree.update(_module_tree(sub, _join(path, name)) if sub is not None else {})
    return tree


def build(class_name, args, kwargs, where, file_tensors):
    """The class registered as `class_name` built from a file's (args, kwargs) on the meta device,
    within an operation budget set by the file; a network is compared tensor by tensor with
    `file_tensors` ({name: tensor}) and given them. Draws no random numbers."""
    cls = persistence.get_registered_class(class_name, CheckpointError)
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise CheckpointError(f'{where} was saved without usable constructor arguments')
    try:
        with torch.device('meta'), _OpBudget(10_000 + 16 * len(file_tensors), where):
            obj = cls(*args, **kwargs)
    except Exception as err:  # pylint: disable=broad-except  Arguments from a file can raise anything.
        reason = f'cannot build it from its constructor arguments ({type(err).__name__}: {str(err)[:200]})'
        raise err if isinstance(err, CheckpointError) else CheckpointError(f'{where}: {reason}') from None
    if not isinstance(obj, torch.nn.Module):
        return obj
    ours = dict(obj.named_parameters(remove_duplicate=False), **dict(obj.named_buffers(remove_duplicate=False)))
    held = sum(t.numel() for t in file_tensors.values())
    if sum(t.numel() for t in ours.values()) > 8 * held + (1 << 16):
        raise CheckpointError(f'{where}: its constructor arguments describe tensors of far more than the file holds '
                              f'({held:,} elements); refusing to build it')
    describe = lambda t: 'none' if t is None else f'{list(t.shape)} ({t.dtype})'  # noqa: E731
    for name in sorted(set(file_tensors) | set(ours)):
        theirs, mine = file_tensors.get(name), ours.get(name)
        if theirs is None or mine is None or (theirs.shape, theirs.dtype) != (mine.shape, mine.dtype):
            raise CheckpointError(f'{where}: tensor "{name}" has shape {describe(theirs)} in the file but {describe(mine)} here')
    obj.load_state_dict({name: t.detach() for name, t in file_tensors.items()}, assign=True)
    for name, param in obj.named_parameters(remove_duplicate=False):
        param.requires_grad_(file_tensors[name].requires_grad)  # assign=True kept the meta parameters' flag.
    return obj


def _plain(value):
    if isinstance(value, (list, tuple)) and not isinstance(value, Persistent):
        return all(_plain(v) for v in value)
    return isinstance(value, (bool, int, float, str, type(None), np.generic))


def _adopt_attributes(obj, state, where, strict):
    """Plain attributes saved with an object. A network's follow from its constructor arguments,
    so one that contradicts them is refused (unless the meta-device build could not know it:
    None); other objects (losses, augmentation) keep settings changed after construction."""
    for key, value in state.items():
        mine = obj.__dict__.get(key, KeyError)
        if not isinstance(key, str) or key.startswith('_') or mine is KeyError or not _plain(value):
            continue
        if not strict or mine is None or (key == 'training' and isinstance(value, bool)):
            obj.__dict__[key] = value.item() if isinstance(value, np.generic) else value
        elif mine != value:
            raise CheckpointError(f'{where}: its saved {key}={str(value)[:40]} contradicts its constructor arguments '
                                  f'({key}={str(mine)[:40]}); the file is inconsistent')


def _rebuild(obj, where, memo):
    where = f'{where} ({obj.class_name})'
    tree = _module_tree(obj)
    tensors = {_join(path, name): t for path, (_, state) in tree.items() for group in ('_parameters', '_buffers')
               for name, t in (state.get(group) or {}).items() if isinstance(t, torch.Tensor)}  # Others read as missing.
    args, kwargs, tensors = _materialize((obj.state.get('_init_args'), obj.state.get('_init_kwargs'), tensors), where, memo)
    built = build(obj.class_name, args, kwargs, where, tensors)
    is_net = isinstance(built, torch.nn.Module)
    ours = dict(built.named_modules(remove_duplicate=False)) if is_net else {'': built}
    for path in sorted(set(tree) | set(ours)):
        theirs, mine = tree.get(path, ('absent',))[0], type(ours[path]).__name__ if path in ours else 'absent'
        if theirs != mine:
            raise CheckpointError(f'{where}: submodule "{path or "<root>"}" is {theirs} in the file but {mine} here')
        _adopt_attributes(ours[path], tree[path][1], where, strict=is_net)
    return built


def _materialize(obj, where, memo):
    """An unpickled structure with its placeholders replaced by real objects. `memo`: {id: (object,
    result)}; holding each object keeps its id from being reused by a later one."""
    if id(obj) in memo:
        return memo[id(obj)][1]
    out = obj
    if isinstance(obj, Persistent):
        out = _rebuild(obj, where, memo)
    elif isinstance(obj, torch.Tensor):
        held = obj.untyped_storage().nbytes() // max(obj.element_size(), 1)
        if obj.numel() > held:  # Overlapping views expand on first use.
            raise CheckpointError(f'tensor of size {tuple(obj.shape)} has more elements than its storage ({held})')
    elif isinstance(obj, Container):
        raise CheckpointError(f'a bare torch.nn.{type(obj).__name__} outside a network')
    elif isinstance(obj, dict):
        out = type(obj)()
        memo[id(obj)] = obj, out  # Entered first: a dict may hold itself.
        out.update((k, _materialize(v, f'{where}[{k!r}]', memo)) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(_materialize(v, f'{where}[{i}]', memo) for i, v in enumerate(obj))
    memo[id(obj)] = obj, out
    return out

#----------------------------------------------------------------------------
# Safetensors + JSON config.

def _json_path(path):
    return os.path.splitext(path)[0] + '.json'


def _load_safetensors(path, what, config_path):
    with safetensors.safe_open(path, framework='pt', device='cpu') as sf:
        config, tensors = (sf.metadata() or {}).get('rdm_config'), {k: sf.get_tensor(k) for k in sf.keys()}
    if config_path is not None and os.path.isfile(config_path):
        with open(config_path, 'rb') as f:
            config = f.read(MAX_CONFIG_BYTES + 1)
        if len(config) > MAX_CONFIG_BYTES:
            raise CheckpointError(f'{what}: its config {config_path} has more than {MAX_CONFIG_BYTES} bytes; a config is a few kB')
    if config is None:
        raise CheckpointError(f'{what}: no config found (expected {config_path or "<name>.json"} or embedded metadata)')
    config = json.loads(config)
    name = config.get('class_name') if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise CheckpointError(f'{what}: its config has no class_name')
    net = build(name, config.get('init_args', []), config.get('init_kwargs', {}), f'{what} ({name})', tensors)
    if not isinstance(net, torch.nn.Module):
        raise CheckpointError(f'{what}: {name} is not a network')
    return dict(ema=net.eval().requires_grad_(False))


def _json_value(value):
    if isinstance(value, np.generic):
        return value.item()
    raise CheckpointError(f'cannot export a constructor argument of type {type(value).__name__}')


def export_safetensors(src, dst, key='ema', overwrite=False):
    """Write network `key` of checkpoint `src` as `dst` (.safetensors) plus its JSON config."""
    if not str(dst).endswith('.safetensors'):
        raise CheckpointError(f'{dst}: output name must end in .safetensors')
    for out in (dst, _json_path(dst)):
        problem = 'already exists (pass --overwrite to replace it)' if os.path.isfile(out) and not overwrite \
            else dnnlib.util.file_write_problem(out)
        if problem:
            raise CheckpointError(f'{out}: {problem}')
    net = load_network(src, key=key)
    config = dict(format='rdm-network', format_version=1, class_name=f'{type(net).__module__}.{type(net).__name__}',
                  init_args=list(net.init_args), init_kwargs=dict(net.init_kwargs), key='ema', source=os.path.basename(str(src)))
    text = json.dumps(config, indent=2, default=_json_value)
    try:
        with dnnlib.util.atomic_write(dst) as f:
            f.write(safetensors.torch.save({k: t.contiguous() for k, t in net.state_dict().items()}, metadata={'rdm_config': text}))
        with dnnlib.util.atomic_write(_json_path(dst), 'w') as f:
            f.write(text + '\n')
    except OSError as err:
        raise CheckpointError(f'{dst}: cannot write ({err.strerror or err})') from None
    return dst, _json_path(dst)

#----------------------------------------------------------------------------
# Public API.

def load_checkpoint(path_or_url, require_ema=True):
    """The checkpoint (path or URL, downloaded once into the dnnlib cache) as a dict; networks come
    back as the registered classes. Raises CheckpointError naming the file and the problem."""
    what = str(path_or_url)
    try:
        path = dnnlib.util.open_url(what, return_filename=True, verbose=False, max_bytes=MAX_DOWNLOAD_BYTES, check=_format)
        kind = _format(path)
        if kind == 'safetensors':
            data = _load_safetensors(path, what, None if dnnlib.util.is_url(what) else _json_path(path))
        else:
            with open(path, 'rb') as f:
                data = read_pickle(f) if kind == 'pickle' else _torch_load(path if kind == 'zip' else f)
            data = _materialize(data, 'checkpoint', {})
    except dnnlib.UserError as err:
        raise CheckpointError(err.message if err.message.startswith(what) else f'{what}: {err.message}') from None
    except OSError as err:
        raise CheckpointError(f'{what}: cannot open ({err})') from None
    except Exception as err:  # pylint: disable=broad-except  Untrusted input: whatever else it provokes is one line.
        raise CheckpointError(f'{what}: truncated or corrupt file ({type(err).__name__}: {" ".join(str(err).split())[:200]})') from None
    if not isinstance(data, dict):
        raise CheckpointError(f'{what}: expected a dict with an "ema" network, found a {type(data).__name__}')
    if require_ema and 'ema' not in data:
        raise CheckpointError(f'{what}: no "ema" network in the checkpoint (it has: {", ".join(map(str, data)) or "nothing"})')
    return data


def load_network(path_or_url, key='ema'):
    """The network stored under `key` (default the EMA weights), in eval mode on the CPU."""
    data = load_checkpoint(path_or_url, require_ema=(key == 'ema'))
    net = data.get(key)
    if not isinstance(net, torch.nn.Module):
        found = f'is a {type(net).__name__}, not a network' if key in data else f'is missing (it has: {", ".join(map(str, data))})'
        raise CheckpointError(f'{path_or_url}: "{key}" {found}')
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
            click.echo(f'{key}: {reprlib.repr(value)}')


if __name__ == '__main__':
    from training import augment, loss, networks  # noqa: F401  pylint: disable=unused-import  Registers the project's classes.
    main()  # pylint: disable=no-value-for-parameter
