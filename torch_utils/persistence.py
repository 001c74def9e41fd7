"""Pickle format for networks and other objects: compatible with NVlabs/edm, safe to load.

Objects of classes decorated with `@persistent_class` pickle themselves exactly as EDM's do:

    torch_utils.persistence._reconstruct_persistent_obj(meta)
    meta = {'type': 'class', 'version': 6, 'module_src': <source text of the defining module>,
            'class_name': <class name>, 'state': <the object's __dict__>}

so EDM's own tools (and the published RDM code) read our snapshots, and we read theirs.
Every instance also remembers its constructor arguments (`obj.init_args`, `obj.init_kwargs`).

What differs from EDM is the way back. EDM executes `module_src` to recreate the class, which
runs whatever code a file carries. Here `_reconstruct_persistent_obj` never looks at
`module_src`: it picks the class by `class_name` from the registry of classes decorated in this
process (importing the `training` package registers `training.networks`, `training.loss` and
`training.augment`). For untrusted files use `torch_utils.checkpoint.load_checkpoint`, which
additionally restricts every other global a pickle may reference. The one deliberate exception is `load_trusted_pickle`, which
does execute `module_src` exactly as EDM does; it exists only for NVIDIA's Inception detector
pickle and runs only when the user explicitly trusts that file (evaluate.py --trust-detector).
"""

import contextlib
import contextvars
import copy
import inspect
import io
import pickle
import sys
import types
import uuid

import dnnlib

#----------------------------------------------------------------------------

_version = 6                    # Format version written into `meta`; EDM uses 6 as well.
FORMAT_VERSION = _version
_decorators = set()             # Every decorated class, for is_persistent().
_registry = dict()              # class_name -> decorated class, or None when ambiguous.
_registry_full = dict()         # 'module.class_name' -> decorated class.
_module_to_src_dict = dict()    # module -> source text.
_src_to_module_dict = dict()    # source text -> module (trusted path only).

# Modules created by load_trusted_pickle(); their classes stay out of the registry so that a
# trusted load can never widen what the safe path accepts.
_TRUSTED_MODULE_PREFIX = '_imported_module_'

#----------------------------------------------------------------------------

def persistent_class(orig_class):
    """Class decorator: instances pickle with their module source and constructor arguments.

    The instance's constructor arguments are deep-copied into `_init_args` / `_init_kwargs`
    (set `self._record_init_args = False` in the constructor to skip). Classes that a
    decorated class builds in its constructor must be decorated too if they should survive
    a pickle round trip as themselves.
    """
    assert isinstance(orig_class, type)
    if is_persistent(orig_class):
        return orig_class

    assert orig_class.__module__ in sys.modules
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record = getattr(self, '_record_init_args', True)
            self._init_args = copy.deepcopy(args) if record else None
            self._init_kwargs = copy.deepcopy(kwargs) if record else None
            assert orig_class.__name__ in orig_module.__dict__
            _check_pickleable(self.__reduce__())

        @property
        def init_args(self):
            assert self._init_args is not None
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            assert self._init_kwargs is not None
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            # Start from the default protocol-0 reduction (reconstructor, args, __dict__) and
            # swap in the persistent reconstructor carrying the state inside `meta`.
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    Decorator.__doc__ = orig_class.__doc__
    Decorator.__init__.__wrapped__ = orig_class.__init__  # inspect.signature() shows the real arguments.
    _decorators.add(Decorator)
    if not orig_class.__module__.startswith(_TRUSTED_MODULE_PREFIX):
        _register(Decorator)
    return Decorator


def _register(cls):
    _registry_full[f'{cls.__module__}.{cls.__name__}'] = cls
    name = cls.__name__
    if name not in _registry:
        _registry[name] = cls
    elif _registry[name] is not None and _registry[name].__module__ == cls.__module__:
        _registry[name] = cls  # The same module imported again (e.g. reloaded).
    else:
        _registry[name] = None  # Two modules define this name: refuse to guess.


def get_registered_class(class_name):
    """The decorated class for a pickled `class_name`, or raise KeyError with the reason."""
    if class_name in _registry_full:
        return _registry_full[class_name]
    cls = _registry.get(class_name, False)
    if cls is None:
        owners = sorted(k for k in _registry_full if k.rsplit('.', 1)[-1] == class_name)
        raise KeyError(f'class name "{class_name}" is ambiguous: {", ".join(owners)}')
    if cls is False:
        raise KeyError(f'unknown persistent class "{class_name}"')
    return cls


def registered_class_names():
    return sorted(name for name, cls in _registry.items() if cls is not None)

#----------------------------------------------------------------------------
# Skipping random weight initialisation while a loader rebuilds a network whose every weight it
# overwrites right after construction (large networks spend seconds drawing them). Layers read
# it through weight_init_skipped() at call time; a context variable keeps it to the loading
# thread.

_skip_weight_init = contextvars.ContextVar('skip_weight_init', default=False)


@contextlib.contextmanager
def skip_weight_init():
    """Within this context, layers that support it build their weights without random draws."""
    token = _skip_weight_init.set(True)
    try:
        yield
    finally:
        _skip_weight_init.reset(token)


def weight_init_skipped():
    return _skip_weight_init.get()

#----------------------------------------------------------------------------

def is_persistent(obj):
    """True for a decorated class or an instance of one."""
    try:
        if obj in _decorators:
            return True
    except TypeError:
        pass
    return type(obj) in _decorators  # pylint: disable=unidiomatic-typecheck

#----------------------------------------------------------------------------

def _check_meta(meta):
    if not isinstance(meta, dict):
        raise pickle.UnpicklingError(f'persistent object metadata must be a dict, got {type(meta).__name__}')
    missing = [k for k in ('type', 'version', 'class_name', 'state') if k not in meta]
    if missing:
        raise pickle.UnpicklingError(f'persistent object metadata lacks {", ".join(missing)}')
    if meta['type'] != 'class':
        raise pickle.UnpicklingError(f'unsupported persistent object type {meta["type"]!r}')
    if meta['version'] != _version:
        raise pickle.UnpicklingError(f'unsupported persistence format version {meta["version"]!r} (expected {_version})')
    if not isinstance(meta['class_name'], str):
        raise pickle.UnpicklingError('persistent object class_name must be a string')
    if meta['state'] is not None and not isinstance(meta['state'], dict):
        raise pickle.UnpicklingError(f'state of persistent "{meta["class_name"]}" must be a dict')


def _reconstruct_persistent_obj(meta):
    """Called by pickle for every persistent object. Never executes `meta['module_src']`.

    The class comes from the registry of classes decorated in this process, looked up by
    `class_name`; the object is restored from `state` like any pickled object (no constructor
    call). `torch_utils.checkpoint` does not use this function: it rebuilds from the
    constructor arguments and checks every tensor, which is the path for untrusted files.
    """
    _check_meta(meta)
    try:
        cls = get_registered_class(meta['class_name'])
    except KeyError as err:
        # copy.deepcopy() of an object from load_trusted_pickle() comes back here: reuse the
        # module that trusted load already executed (nothing new runs).
        module = _src_to_module_dict.get(meta.get('module_src'))
        if module is not None and isinstance(module.__dict__.get(meta['class_name']), type):
            return _restore(persistent_class(module.__dict__[meta['class_name']]), meta['state'])
        raise pickle.UnpicklingError(f'{err.args[0]}; the module source stored in the pickle is never executed. '
            f'Known classes: {", ".join(registered_class_names())}') from None
    return _restore(cls, meta['state'])


def _restore(cls, state):
    obj = cls.__new__(cls)
    state = dict(state or {})
    setstate = getattr(obj, '__setstate__', None)
    if callable(setstate):
        setstate(state)  # pylint: disable=not-callable
    else:
        obj.__dict__.update(state)
    return obj

#----------------------------------------------------------------------------

def _module_to_src(module):
    src = _module_to_src_dict.get(module, None)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
    return src


def _check_pickleable(obj):
    """Raise if `obj` cannot be pickled; cheaper than pickling tensors and nested networks."""
    def strip(obj):
        if isinstance(obj, (list, tuple, set)):
            return [strip(x) for x in obj]
        if isinstance(obj, dict):
            return [[strip(x), strip(y)] for x, y in obj.items()]
        if isinstance(obj, (str, int, float, bool, bytes, bytearray)):
            return None
        if f'{type(obj).__module__}.{type(obj).__name__}' in ('numpy.ndarray', 'torch.Tensor', 'torch.nn.parameter.Parameter'):
            return None
        if is_persistent(obj):
            return None
        if _is_torch_module(obj):
            # A plain container (ModuleDict & co.) of persistent modules: check its contents
            # instead of pickling every tensor in it (EDM pickles them all, which makes large
            # networks slow to construct).
            return strip(obj.__dict__)
        return obj
    with io.BytesIO() as f:
        pickle.dump(strip(obj), f)

def _is_torch_module(obj):
    torch = sys.modules.get('torch')
    return torch is not None and isinstance(obj, torch.nn.Module)

#----------------------------------------------------------------------------
# Trusted path: EDM's original behaviour, executing the module source stored in the pickle.
# ONLY for NVIDIA's Inception detector pickle used by the metrics (fixed URL, known content).
# Never use it for networks or anything a user hands in: it runs arbitrary code by design.

def _src_to_module(src):
    module = _src_to_module_dict.get(src, None)
    if module is None:
        module_name = _TRUSTED_MODULE_PREFIX + uuid.uuid4().hex
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        exec(src, module.__dict__)  # pylint: disable=exec-used
    return module


def _reconstruct_trusted_obj(meta):
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state)
    assert meta.version == _version
    assert meta.type == 'class'
    module = _src_to_module(meta.module_src)
    return _restore(persistent_class(module.__dict__[meta.class_name]), meta.state)


class _TrustedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == __name__ and name == '_reconstruct_persistent_obj':
            return _reconstruct_trusted_obj
        return super().find_class(module, name)


def load_trusted_pickle(file):
    """Unpickle a file EXACTLY as EDM would, executing the module source it contains.

    `file` is a binary file object or a path. Use it only for NVIDIA's Inception detector
    pickle (metrics); every network checkpoint goes through `torch_utils.checkpoint`.
    """
    if isinstance(file, (str, bytes)) or hasattr(file, '__fspath__'):
        with open(file, 'rb') as f:
            return _TrustedUnpickler(f).load()
    return _TrustedUnpickler(file).load()

#----------------------------------------------------------------------------
