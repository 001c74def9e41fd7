"""EDM's pickle format for networks and other objects, written as EDM writes it, read safely.

A class decorated with `@persistent_class` pickles its instances as a call of
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with
    meta = {'type': 'class', 'version': 6, 'module_src': <source text of the defining module>,
            'class_name': <class name>, 'state': <the instance's __dict__>},
so EDM's and the reference RDM's own tools unpickle our snapshots (they execute `module_src`), and
every instance remembers its constructor arguments (`init_args`, `init_kwargs`, pickled in state).

Reading back never executes `module_src`. Files go through torch_utils.checkpoint, which rebuilds
the registered class of the name from its constructor arguments and checks every tensor. In this
process, plain `pickle.loads` and `copy.deepcopy` also come through `_reconstruct_persistent_obj`,
which takes the class registered under `class_name` (classes register when their module is
imported) and restores the state without calling the constructor.

`load_trusted_pickle` is the one exception: it executes `module_src` exactly as EDM does, for
NVIDIA's Inception detector pickle, and only when the user trusts that file
(evaluate.py --trust-detector).
"""

import copy
import inspect
import pickle
import sys
import types
import uuid

import dnnlib

FORMAT_VERSION = 6              # Written into meta; EDM's version as well.
_registry = {}                  # class name and 'module.class name' -> class; None when ambiguous.
_decorated = set()
_trusted_modules = {}           # module source -> module executed by load_trusted_pickle.

#----------------------------------------------------------------------------

def persistent_class(orig_class):
    """Class decorator: instances pickle as EDM persistent objects and record their arguments."""
    if orig_class in _decorated:
        return orig_class
    module = sys.modules[orig_class.__module__]
    module_src = next((src for src, m in _trusted_modules.items() if m is module), None) or inspect.getsource(module)

    class Decorated(orig_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        @property
        def init_args(self):
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            # The default reduction (reconstructor, args, state, ...) with our hook in front and
            # the state moved into meta, as EDM writes it.
            parts = list(super().__reduce__()) + [None] * 3
            meta = dict(type='class', version=FORMAT_VERSION, module_src=module_src,
                        class_name=orig_class.__name__, state=parts[2])
            return (_reconstruct_persistent_obj, (meta,), None, *parts[3:5])

    for attr in ('__name__', '__qualname__', '__module__', '__doc__'):
        setattr(Decorated, attr, getattr(orig_class, attr))
    Decorated.__init__.__wrapped__ = orig_class.__init__  # inspect.signature shows the real arguments.
    _decorated.add(Decorated)
    if not orig_class.__module__.startswith('_trusted_'):
        for name in (orig_class.__name__, f'{orig_class.__module__}.{orig_class.__name__}'):
            known = _registry.get(name, Decorated)
            # Two modules defining one name: refuse to guess (a reloaded module replaces itself).
            _registry[name] = Decorated if known is not None and known.__module__ == Decorated.__module__ else None
    return Decorated


def get_registered_class(class_name, error=pickle.UnpicklingError):
    """The decorated class for a pickled `class_name`; `error` saying why not."""
    cls = _registry.get(class_name, False)
    if cls is None:
        raise error(f'class name "{class_name}" is ambiguous: it is defined in two modules')
    if cls is False:
        known = sorted(name for name, entry in _registry.items() if entry is not None and '.' not in name)
        raise error(f'unknown persistent class "{class_name}" (known: {", ".join(known) or "none"}); '
                    f'the module source stored in a file is never executed: load files with training.load_checkpoint / '
                    f'training.load_network, which know the project\'s classes')
    return cls

#----------------------------------------------------------------------------

def _restore(cls, state):
    obj = cls.__new__(cls)
    getattr(obj, '__setstate__', obj.__dict__.update)(dict(state or {}))  # nn.Module has one, plain classes not.
    return obj


def _reconstruct_persistent_obj(meta):
    """Called by pickle for every persistent object; never executes meta['module_src']."""
    if meta.get('module_src') in _trusted_modules:  # copy.deepcopy of an object load_trusted_pickle made: runs nothing new.
        return _reconstruct_trusted_obj(meta)
    return _restore(get_registered_class(meta['class_name']), meta['state'])

#----------------------------------------------------------------------------
# Trusted path: EDM's behaviour, executing the module source stored in the pickle. ONLY for
# NVIDIA's Inception detector (metrics/detector.py, behind --trust-detector).

def _reconstruct_trusted_obj(meta):
    assert meta['type'] == 'class' and meta['version'] == FORMAT_VERSION
    module = _trusted_modules.get(meta['module_src'])
    if module is None:
        module = types.ModuleType(f'_trusted_{uuid.uuid4().hex}')
        sys.modules[module.__name__] = module
        _trusted_modules[meta['module_src']] = module
        exec(meta['module_src'], module.__dict__)  # pylint: disable=exec-used
    return _restore(persistent_class(module.__dict__[meta['class_name']]), meta['state'])


class _TrustedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == (__name__, '_reconstruct_persistent_obj'):
            return _reconstruct_trusted_obj
        return super().find_class(module, name)


def load_trusted_pickle(f):
    """Unpickle the binary file object `f` EXACTLY as EDM would: runs the code in it."""
    return _TrustedUnpickler(f).load()
