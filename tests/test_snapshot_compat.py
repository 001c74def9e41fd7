"""Snapshots written by the training loop open with plain `pickle.load` in other EDM-family code.

Users open `network-snapshot-*.pkl` with the tools they already have (the reference RDM's and
EDM's generate.py / fid.py), which unpickle inside their own source tree. This test builds
stand-ins of those two trees in temporary folders: the same packages and modules
(dnnlib, torch_utils, training, and for RDM also torch_utils/torch_dct.py and blurring.py), each
module exposing exactly the top-level names the real one defines (listed below, read from
NVlabs/edm and THUDM/RelayDiffusion), with a persistence module of EDM's semantics: execute
the pickled `module_src` as a fresh module, take the class by name, build the object without
calling its constructor and set its state. Everything else is a stub that raises when used.
A snapshot whose module source imports a project-only name, or that pickles a project-only
object (such as the old `loss_fn`, whose module imports training.blurring), fails here as it
would for a user.

In a subprocess with only the stand-in tree importable, both stages' snapshots (with an
augmentation pipe) and training states are loaded and used: the EMA network's output and the
augmentation pipe's output must equal the project's.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import training
import dnnlib
from conftest import write_images
from torch_utils import checkpoint
from training import loss, training_loop

#----------------------------------------------------------------------------
# Top-level names of the real trees' modules (functions, classes, assignments; not imports).

_UTIL = ['EasyDict', 'Logger', '_dnnlib_cache_dir', 'set_cache_dir', 'make_cache_dir_path', 'format_time',
         'format_time_brief', 'ask_yes_no', 'tuple_product', '_str_to_ctype', 'get_dtype_and_ctype', 'is_pickleable',
         'get_module_from_obj_name', 'get_obj_from_module', 'get_obj_by_name', 'call_func_by_name',
         'construct_class_by_name', 'get_module_dir_by_obj_name', 'is_top_level_function',
         'get_top_level_function_name', 'list_dir_recursively_with_ignore', 'copy_files_and_create_dirs', 'is_url',
         'open_url']
_COMMON = {
    'dnnlib/util.py': _UTIL,
    'torch_utils/distributed.py': ['init', 'get_rank', 'get_world_size', 'should_stop', 'update_progress', 'print0'],
    'torch_utils/misc.py': ['_constant_cache', 'constant', 'suppress_tracer_warnings', 'assert_shape',
                            'profiled_function', 'InfiniteSampler', 'params_and_buffers', 'named_params_and_buffers',
                            'copy_params_and_buffers', 'ddp_sync', 'check_ddp_consistency', 'print_module_summary'],
    'torch_utils/persistence.py': ['_version', '_decorators', '_import_hooks', '_module_to_src_dict',
                                   '_src_to_module_dict', 'persistent_class', 'is_persistent', 'import_hook',
                                   '_reconstruct_persistent_obj', '_module_to_src', '_src_to_module',
                                   '_check_pickleable'],
    'torch_utils/training_stats.py': ['_num_moments', '_reduce_dtype', '_counter_dtype', '_rank', '_sync_device',
                                      '_sync_called', '_counters', '_cumulative', 'init_multiprocessing', 'report',
                                      'report0', 'Collector', '_sync', 'default_collector'],
    'training/augment.py': ['wavelets', 'matrix', 'translate2d', 'translate3d', 'scale2d', 'scale3d', 'rotate2d',
                            'rotate3d', 'translate2d_inv', 'scale2d_inv', 'rotate2d_inv', 'AugmentPipe'],
    'training/dataset.py': ['Dataset', 'ImageFolderDataset'],
    'training/training_loop.py': ['training_loop'],
}
_EDM_NETWORKS = ['weight_init', 'Linear', 'Conv2d', 'GroupNorm', 'AttentionOp', 'UNetBlock', 'PositionalEmbedding',
                 'FourierEmbedding', 'SongUNet', 'DhariwalUNet', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond']
TREES = {
    'edm': dict(_COMMON, **{
        'training/networks.py': _EDM_NETWORKS,
        'training/loss.py': ['VPLoss', 'VELoss', 'EDMLoss'],
    }),
    'rdm': dict(_COMMON, **{
        'training/networks.py': _EDM_NETWORKS + ['get_xformers_flash_attention_op'],
        'training/loss.py': ['VPLoss', 'VELoss', 'EDMLoss', 'DCTBlur', 'BlurLoss'],
        'torch_utils/torch_dct.py': ['re_arrange', 'recover', 'dct', 'idct', 'dct_2d', 'idct_2d', 'dct_3d', 'idct_3d',
                                     'LinearDCT', 'apply_linear_2d', 'apply_linear_3d'],
        'blurring.py': ['rearrange', 'reverse_rearrange', 'dct', 'idct', 'dct_2d', 'idct_2d', 'block_noise',
                        'get_alpha_t'],
    }),
}

#----------------------------------------------------------------------------
# Working definitions for the few names that loading and running a network needs; every other
# name is a stub.

_WORKING = {
    'dnnlib/util.py': '''
        class EasyDict(dict):
            def __getattr__(self, name):
                try:
                    return self[name]
                except KeyError:
                    raise AttributeError(name)
            def __setattr__(self, name, value):
                self[name] = value
            def __delattr__(self, name):
                del self[name]
    ''',
    'torch_utils/misc.py': '''
        import contextlib
        import numpy as np
        import torch
        _constant_cache = dict()
        def constant(value, shape=None, dtype=None, device=None, memory_format=None):
            tensor = torch.as_tensor(np.array(value), dtype=dtype or torch.get_default_dtype(), device=device)
            if shape is not None:
                tensor = tensor.expand(shape)
            return tensor.contiguous(memory_format=memory_format or torch.contiguous_format)
        def assert_shape(tensor, ref_shape):
            assert tensor.ndim == len(ref_shape)
            for size, ref in zip(tensor.shape, ref_shape):
                assert ref is None or int(size) == int(ref)
        def suppress_tracer_warnings():
            return contextlib.nullcontext()
        def profiled_function(fn):
            return fn
    ''',
    'torch_utils/persistence.py': '''
        import copy
        import inspect
        import sys
        import types
        import uuid
        import dnnlib
        _version = 6
        _decorators = set()
        _import_hooks = []
        _module_to_src_dict = dict()
        _src_to_module_dict = dict()
        def persistent_class(orig_class):
            if is_persistent(orig_class):
                return orig_class
            src = _module_to_src(sys.modules[orig_class.__module__])
            class Decorator(orig_class):
                _orig_module_src = src
                _orig_class_name = orig_class.__name__
                def __init__(self, *args, **kwargs):
                    super().__init__(*args, **kwargs)
                    self._init_args = copy.deepcopy(args)
                    self._init_kwargs = copy.deepcopy(kwargs)
            Decorator.__name__ = orig_class.__name__
            Decorator.__module__ = orig_class.__module__
            _decorators.add(Decorator)
            return Decorator
        def is_persistent(obj):
            return obj in _decorators or type(obj) in _decorators
        def import_hook(hook):
            _import_hooks.append(hook)
            return hook
        def _reconstruct_persistent_obj(meta):
            meta = dnnlib.EasyDict(meta)
            meta.state = dnnlib.EasyDict(meta.state)
            for hook in _import_hooks:
                meta = hook(meta)
            assert meta.version == _version, meta.version
            module = _src_to_module(meta.module_src)
            assert meta.type == 'class'
            cls = persistent_class(module.__dict__[meta.class_name])
            obj = cls.__new__(cls)
            setstate = getattr(obj, '__setstate__', None)
            if callable(setstate):
                setstate(meta.state)
            else:
                obj.__dict__.update(meta.state)
            return obj
        def _module_to_src(module):
            src = _module_to_src_dict.get(module)
            if src is None:
                src = inspect.getsource(module)
                _module_to_src_dict[module] = src
                _src_to_module_dict[src] = module
            return src
        def _src_to_module(src):
            module = _src_to_module_dict.get(src)
            if module is None:
                name = '_imported_module_' + uuid.uuid4().hex
                module = types.ModuleType(name)
                sys.modules[name] = module
                _module_to_src_dict[module] = src
                _src_to_module_dict[src] = module
                exec(src, module.__dict__)
            return module
    ''',
}


def _stub_source(module_path, names, working):
    lines = [f'# Stand-in for {module_path}: only the names the real module defines.', textwrap.dedent(working)]
    defined = set()
    for line in textwrap.dedent(working).splitlines():
        for prefix in ('def ', 'class '):
            if line.startswith(prefix):
                defined.add(line[len(prefix):].split('(')[0].split(':')[0])
        if line and not line[0].isspace() and ' = ' in line:
            defined.add(line.split(' = ')[0])
    for name in names:
        if name in defined:
            continue
        message = repr(f'stand-in {module_path}: {name} is not used by loading')
        if name[0].isupper():
            lines.append(f'class {name}:\n    def __init__(self, *args, **kwargs):\n        raise NotImplementedError({message})')
        elif name.startswith('_'):
            lines.append(f'{name} = None')
        else:
            lines.append(f'def {name}(*args, **kwargs):\n    raise NotImplementedError({message})')
    return '\n'.join(lines) + '\n'


def build_tree(root, kind):
    modules = TREES[kind]
    for package in ('dnnlib', 'torch_utils', 'training'):
        os.makedirs(os.path.join(root, package))
        with open(os.path.join(root, package, '__init__.py'), 'w') as f:
            f.write('from .util import EasyDict, make_cache_dir_path\n' if package == 'dnnlib' else '')
    for module_path, names in modules.items():
        with open(os.path.join(root, module_path), 'w') as f:
            f.write(_stub_source(module_path, names, _WORKING.get(module_path, '')))
    return root


#----------------------------------------------------------------------------
# Child process: only the stand-in tree on sys.path.

CHILD = r'''
import json, os, pickle, sys
import torch
tree = os.path.dirname(os.path.abspath(__file__))
import training, torch_utils, dnnlib
for package in (training, torch_utils, dnnlib):
    assert os.path.dirname(os.path.dirname(package.__file__)) == tree, package.__file__
cases = json.loads(sys.argv[1])
for case in cases:
    with open(case['snapshot'], 'rb') as f:
        data = pickle.load(f)
    assert type(data['loss_kwargs']) is dict and type(data['dataset_kwargs']) is dict, case
    assert data['loss_kwargs']['class_name'] == case['loss_class'], data['loss_kwargs']
    expected = torch.load(case['expected'])
    ema = data['ema']
    assert type(ema).__name__ == 'EDMPrecond' and type(ema).__module__.startswith('_imported_module_')
    with torch.no_grad():
        out = ema(expected['x'], expected['sigma'], expected['labels'])
    assert torch.allclose(out, expected['ema_out'], rtol=0, atol=1e-6), (out - expected['ema_out']).abs().max()
    pipe = data['augment_pipe']
    assert type(pipe).__name__ == 'AugmentPipe'
    torch.manual_seed(123)
    images, labels = pipe(expected['images'])
    assert torch.equal(images, expected['aug_images']) and torch.equal(labels, expected['aug_labels'])
    state = torch.load(case['state'], weights_only=False)
    assert state['step'] == case['step'] and type(state['net']).__name__ == 'EDMPrecond'
    assert state['loss_kwargs']['class_name'] == case['loss_class']
    with torch.no_grad():
        out = state['ema'](expected['x'], expected['sigma'], expected['labels'])
    assert torch.allclose(out, expected['ema_out'], rtol=0, atol=1e-6)
print('loaded', len(cases))
'''

#----------------------------------------------------------------------------
# Two tiny training runs (16 px, 2 steps of 4 images, augmentation on): first and second stage.

def _dataset(folder):
    import numpy as np
    import PIL.Image
    rng = np.random.RandomState(0)
    images = [np.asarray(PIL.Image.fromarray(rng.randint(0, 256, size=[4, 4, 3]).astype(np.uint8)).resize([16, 16]))
              for _ in range(8)]
    write_images(folder, images, labels=[idx % 2 for idx in range(8)])
    return folder


STAGES = {
    'first': dnnlib.EasyDict(class_name='training.loss.EDMLoss'),
    'second': dnnlib.EasyDict(class_name='training.loss.BlurLoss', up_scale=4, block_scale=0.15, prob_length=0.93,
                              blur_sigma_max=3),
}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('compat')
    data = _dataset(str(root / 'data'))
    out = {}
    for stage, loss_kwargs in STAGES.items():
        run_dir = str(root / stage)
        os.makedirs(run_dir)
        training_loop.training_loop(
            run_dir=run_dir, seed=1, batch_size=4, total_kimg=0.008, kimg_per_tick=0.004, snapshot_ticks=1,
            state_dump_ticks=1, progress_bar=False, device='cpu', lr_rampup_kimg=0,
            dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=data,
                                           use_labels=True),
            data_loader_kwargs=dict(num_workers=0),
            network_kwargs=dnnlib.EasyDict(class_name='training.networks.EDMPrecond', model_type='SongUNet',
                                           model_channels=8, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[8],
                                           augment_dim=9, dropout=0.1),
            loss_kwargs=loss_kwargs, optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3),
            augment_kwargs=dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=0.5, xflip=1e8, yflip=1,
                                           scale=1, rotate_frac=1, aniso=1, translate_frac=1))
        snapshot = os.path.join(run_dir, 'network-snapshot-000000_008.pkl')
        state = os.path.join(run_dir, 'training-state-000000_008.pt')
        # What the project computes with the same objects, for the child to reproduce.
        data_ = training.load_checkpoint(snapshot)
        g = torch.Generator().manual_seed(5)
        x, images = torch.randn([2, 3, 16, 16], generator=g), torch.rand([2, 3, 16, 16], generator=g) * 2 - 1
        sigma, labels = torch.tensor([0.3, 4.0]), torch.eye(2)
        with torch.no_grad():
            ema_out = data_['ema'](x, sigma, labels)
        torch.manual_seed(123)
        aug_images, aug_labels = data_['augment_pipe'](images)
        expected = os.path.join(run_dir, 'expected.pt')
        torch.save(dict(x=x, sigma=sigma, labels=labels, ema_out=ema_out, images=images, aug_images=aug_images,
                        aug_labels=aug_labels), expected)
        out[stage] = dict(snapshot=snapshot, state=state, expected=expected, step=8,
                          loss_class=loss_kwargs.class_name)
    return out


def _load_in_tree(tree, cases):
    with open(os.path.join(tree, 'load_check.py'), 'w') as f:
        f.write(CHILD)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(OMP_NUM_THREADS='1', PYTHONNOUSERSITE='1')
    return subprocess.run([sys.executable, os.path.join(tree, 'load_check.py'), json.dumps(cases)], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('kind', list(TREES))
def test_snapshots_load_in_foreign_tree(runs, tmp_path, kind):
    tree = build_tree(str(tmp_path / kind), kind)
    proc = _load_in_tree(tree, list(runs.values()))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.strip() == 'loaded 2'


def test_foreign_tree_refuses_project_only_names(runs, tmp_path):
    # The stand-ins are strict: the old snapshot format, which pickled the loss object (its
    # module imports training.blurring), fails in the reference tree as it did for users.
    old = training.load_checkpoint(runs['first']['snapshot'])
    import pickle
    from training import loss
    path = str(tmp_path / 'old-format.pkl')
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=old['ema'], loss_fn=loss.EDMLoss()), f)
    tree = build_tree(str(tmp_path / 'rdm'), 'rdm')
    with open(os.path.join(tree, 'old.py'), 'w') as f:
        f.write(f'import pickle\npickle.load(open({path!r}, "rb"))\n')
    proc = subprocess.run([sys.executable, os.path.join(tree, 'old.py')], cwd=tree, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}, timeout=300)
    assert proc.returncode != 0
    assert "cannot import name 'blurring' from 'training'" in proc.stderr



def test_relay_settings_read_back_from_a_trained_snapshot(runs):
    # The generator takes the second stage's defaults from the snapshot's loss_kwargs.
    from training import pipeline
    data = training.load_checkpoint(runs['second']['snapshot'])
    assert loss.training_record(data).relay == dict(up_scale=4, block_scale=0.15, prob_length=0.93, blur_sigma_max=3)
    assert loss.training_record(training.load_checkpoint(runs['first']['snapshot'])).relay == {}
