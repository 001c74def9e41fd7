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
the module source embedded in every persistent object. Here the file is read in two steps:

  1. torch_utils.safe_pickle unpickles it against an allow-list, leaving a placeholder for
     every persistent object (see there for what is allowed and how memory stays bounded);
  2. torch_utils.rebuild turns each placeholder into an instance of the class registered under
     its name in torch_utils.persistence, from its recorded constructor arguments, and copies
     every tensor in with a shape check.

The classes must be registered, i.e. their module imported, before loading: importing the
`training` package registers the project's networks, losses and augmentation. An unknown class
is an error naming it; nothing is imported by name on the file's behalf.

This also means the reference's second-stage `.pt`, whose embedded module imports xformers and
einops, loads without either installed.
"""

import json
import os
import pickle
import struct
import zipfile

import click
import numpy as np
import safetensors
import safetensors.torch
import torch

import dnnlib
from torch_utils import persistence
from torch_utils import rebuild
from torch_utils import safe_pickle
from dnnlib.util import atomic_write

#----------------------------------------------------------------------------

class CheckpointError(Exception):
    """A checkpoint could not be read; the message names the file and the problem."""

#----------------------------------------------------------------------------
# Safetensors + JSON config.

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
    try:
        with safetensors.safe_open(path, framework='pt', device='cpu') as sf:
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
        cls = rebuild.registered_class(class_name)
    except rebuild.RebuildError as err:
        raise CheckpointError(f'{what}: {err}') from None
    args, kwargs = config.get('init_args', []), config.get('init_kwargs', {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise CheckpointError(f'{what}: config has malformed init_args/init_kwargs')
    file_numel = sum(t.numel() for t in tensors.values())
    try:
        # The file records no module tree: allow a few submodules per tensor it holds.
        net = rebuild.construct(cls, args, kwargs, where=f'{what} ({class_name})', max_numel=file_numel, max_modules=4 * len(tensors) + 64)
    except rebuild.OverBudget as err:
        raise CheckpointError(str(err)) from None
    except Exception as err:
        raise CheckpointError(f'{what}: cannot build {class_name} from its config: {type(err).__name__}: {err}') from None
    if not isinstance(net, torch.nn.Module):
        raise CheckpointError(f'{what}: {class_name} is not a network')
    try:
        rebuild.adopt_tensors(net, tensors, what, requires_grad=False, same_dtype=True, state_dict_only=True)
    except rebuild.RebuildError as err:
        raise CheckpointError(str(err)) from None
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
                raw = safe_pickle.read_pickle_file(f, what)
            data = rebuild.materialize(raw, 'checkpoint')
        except (CheckpointError, safe_pickle.Refused, rebuild.RebuildError) as err:
            raise CheckpointError(_prefixed(what, str(err))) from None
        except (EOFError, pickle.UnpicklingError, ValueError, struct.error) as err:
            raise CheckpointError(_prefixed(what, f'truncated or corrupt file ({type(err).__name__}: {err})')) from None
        except (RuntimeError, TypeError, AttributeError, KeyError, IndexError, MemoryError, OverflowError, RecursionError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as err:
            raise CheckpointError(_prefixed(what, f'malformed checkpoint contents ({type(err).__name__}: {str(err)[:200]})')) from None
        except OSError as err:
            raise CheckpointError(_prefixed(what, f'cannot read ({err})')) from None
        except Exception as err:  # pylint: disable=broad-except
            # The file is untrusted input: whatever else a malformed file provokes in the
            # allowed rebuild helpers is reported as one line, never as a traceback.
            raise CheckpointError(_prefixed(what, f'malformed checkpoint contents ({type(err).__name__}: {str(err)[:200]})')) from None

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
    if not str(dst).endswith('.safetensors'):
        raise CheckpointError(f'{dst}: output name must end in .safetensors')
    json_path = _json_path(dst)
    for out in (dst, json_path):
        if os.path.isdir(out):
            raise CheckpointError(f'{out}: is a folder; choose a file name')
        if os.path.exists(out) and not overwrite:
            raise CheckpointError(f'{out}: already exists (pass --overwrite to replace it)')
    check_writable_folder(dst)
    net = load_network(src, key=key)
    config = network_config(net, key='ema', source=os.path.basename(str(src)))
    config_text = json.dumps(config, indent=2)
    tensors = {name: t.detach().contiguous() for name, t in net.state_dict().items()}
    blob = safetensors.torch.save(tensors, metadata={'rdm_config': json.dumps(config)})
    try:
        with atomic_write(dst, 'wb') as f:
            f.write(blob)
        with atomic_write(json_path, 'w') as f:
            f.write(config_text + '\n')
    except OSError as err:
        raise CheckpointError(f'{dst}: cannot write ({err.strerror or err})') from None
    return dst, json_path


def check_writable_folder(path):
    """CheckpointError unless the folder of `path` exists and takes a new file (a real write:
    permission bits say nothing for root or read-only file systems)."""
    problem = dnnlib.util.file_write_problem(path)
    if problem:
        raise CheckpointError(f'{path}: {problem}; choose a path in an existing, writable folder')

#----------------------------------------------------------------------------
# Command line: python -m torch_utils.checkpoint export IN OUT.safetensors

def _cli():
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
    # Run as a script (python -m torch_utils.checkpoint), this file is the top of the import
    # chain: it registers the project's persistent classes like every other script does. The
    # library module itself never imports training/.
    import training
    training._register()  # pylint: disable=protected-access
    _cli()()  # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
