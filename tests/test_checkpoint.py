"""Checkpoints: reference-format files load as our classes; crafted files are refused unexecuted."""

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import checkpoint, persistence
from training import networks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



#----------------------------------------------------------------------------
# An independent writer of the reference (EDM persistence v6) format. It does not use our
# decorator's __reduce__: every network module becomes
#   torch_utils.persistence._reconstruct_persistent_obj(dict(type, version, module_src, class_name, state))
# with state = the module's __dict__ (which holds _init_args/_init_kwargs), and the module
# source of the reference, which imports xformers/einops and must never run.

REFERENCE_SRC = '''"""Model architectures (stand-in for the reference training/networks.py)."""
import numpy as np
import torch
from torch_utils import persistence
from einops import rearrange
import xformers.ops
open({marker!r}, "w").write("module_src was executed")
'''

PERSISTENT_NAMES = {'Linear', 'Conv2d', 'GroupNorm', 'UNetBlock', 'PositionalEmbedding', 'FourierEmbedding',
                    'SongUNet', 'DhariwalUNet', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond', 'ToyLoss'}


def reference_meta(obj, module_src, class_name=None, **state_overrides):
    state = {k: v for k, v in obj.__dict__.items() if k != '_compiled_call_impl'}
    state.update(state_overrides)
    return dict(type='class', version=6, module_src=module_src, class_name=class_name or type(obj).__name__, state=state)


class ReferencePickler(pickle.Pickler):
    module_src = REFERENCE_SRC.format(marker='/nonexistent/marker')
    overrides = {}  # id(obj) -> changes to its meta (class_name=...) or state (_init_kwargs=...)

    def reducer_override(self, obj):
        if type(obj).__name__ in PERSISTENT_NAMES and hasattr(obj, '_init_kwargs'):
            changes = dict(self.overrides.get(id(obj), {}))
            class_name = changes.pop('class_name', None)
            return (persistence._reconstruct_persistent_obj, (reference_meta(obj, self.module_src, class_name, **changes),))
        return NotImplemented


def _pickler(f, protocol, module_src, overrides, base=ReferencePickler):
    p = base(f, protocol=protocol)
    if module_src is not None:
        p.module_src = module_src
    p.overrides = {id(k): v for k, v in (overrides or [])}
    return p


def write_reference_pkl(path, data, module_src=None, overrides=None, protocol=4):
    with open(path, 'wb') as f:
        _pickler(f, protocol, module_src, overrides).dump(data)


def write_reference_pt(path, data, module_src=None, overrides=None, location='cuda:0'):
    """torch.save's zip layout written by hand: <root>/data.pkl (protocol 2) + <root>/data/<key>.

    Storages are recorded on `location` (the reference saves its training state from the GPU).
    """
    storages = {}

    class ZipPickler(ReferencePickler):
        def persistent_id(self, obj):
            if isinstance(obj, torch.storage.TypedStorage):
                untyped = obj._untyped_storage
                key = str(untyped.data_ptr())
                storages[key] = untyped
                return ('storage', getattr(torch, obj._pickle_storage_type()), key, location, untyped.nbytes() // obj.dtype.itemsize)
            return None

    buf = io.BytesIO()
    _pickler(buf, 2, module_src, overrides, base=ZipPickler).dump(data)
    root = os.path.splitext(os.path.basename(path))[0]
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f'{root}/data.pkl', buf.getvalue())
        zf.writestr(f'{root}/byteorder', 'little')
        for key, s in storages.items():
            zf.writestr(f'{root}/data/{key}', torch.empty((0,), dtype=torch.uint8).set_(s).numpy().tobytes())
        zf.writestr(f'{root}/version', '3\n')

#----------------------------------------------------------------------------

@persistence.persistent_class
class ToyLoss:
    """Stands in for training.loss classes (non-module persistent objects)."""
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data


def small_net(arch='adm', seed=0, **kw):
    torch.manual_seed(seed)
    if arch == 'adm':
        cfg = dict(model_type='DhariwalUNet', model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    else:
        cfg = dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', channel_mult_noise=2,
                   resample_filter=[1, 3, 3, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    cfg.update(kw)
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, **cfg)
    with torch.no_grad():  # Non-trivial weights everywhere (the output layer starts at zero).
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope='module')
def net():
    return small_net()


def check_same_outputs(a, b):
    torch.manual_seed(123)
    x = torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.4, 6.0])
    labels = torch.eye(4)[[0, 3]]
    with torch.no_grad():
        ya, yb = a(x, sigma, labels), b(x, sigma, labels)
    assert torch.equal(ya, yb)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)

#----------------------------------------------------------------------------
# Reference-format files.

def test_reference_pkl_loads_as_our_classes(tmp_path, net):
    marker = tmp_path / 'marker'
    src = REFERENCE_SRC.format(marker=str(marker))
    path = tmp_path / 'network-snapshot-000100.pkl'
    loss = ToyLoss(P_mean=-0.4)
    loss.P_std = 2.5  # A setting changed after construction survives.
    write_reference_pkl(path, dict(ema=net, loss_fn=loss, augment_pipe=None,
                                   dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path='x.zip', xflip=False)),
                        module_src=src)
    rng_before = torch.random.get_rng_state()
    data = checkpoint.load_checkpoint(str(path))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # Loading draws no random numbers.
    assert not marker.exists()
    assert type(data['ema']) is networks.EDMPrecond and type(data['ema'].model) is networks.DhariwalUNet
    check_same_outputs(net, data['ema'])
    assert isinstance(data['loss_fn'], ToyLoss) and (data['loss_fn'].P_mean, data['loss_fn'].P_std) == (-0.4, 2.5)
    assert data['augment_pipe'] is None
    assert isinstance(data['dataset_kwargs'], dnnlib.EasyDict) and data['dataset_kwargs'].path == 'x.zip'
    loaded = checkpoint.load_network(str(path))
    assert (loaded.img_resolution, loaded.img_channels) == (8, 3)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_reference_pt_zip_loads(tmp_path):
    marker = tmp_path / 'marker'
    net = small_net('ncsnpp', seed=1)
    train_net = small_net('ncsnpp', seed=2).train().requires_grad_(True)
    opt = torch.optim.Adam(train_net.parameters(), lr=1e-4)
    train_net(torch.randn(1, 3, 8, 8), torch.ones(1)).square().mean().backward()
    opt.step()
    path = tmp_path / 'training-state-000500.pt'
    write_reference_pt(path, dict(optimizer_state=opt.state_dict(), step=500000, ema=net, net=train_net),
                       module_src=REFERENCE_SRC.format(marker=str(marker)))
    data = checkpoint.load_checkpoint(str(path))
    assert not marker.exists()
    assert data['step'] == 500000
    check_same_outputs(net, data['ema'])
    check_same_outputs(train_net.eval(), data['net'].eval())
    assert all(p.requires_grad for p in data['net'].parameters())
    # The optimizer state is usable as is.
    opt2 = torch.optim.Adam(data['net'].parameters(), lr=1e-4)
    opt2.load_state_dict(data['optimizer_state'])
    first = opt.state_dict()['state'][0]
    torch.testing.assert_close(opt2.state_dict()['state'][0]['exp_avg'], first['exp_avg'], rtol=0, atol=0)


def test_own_snapshots_round_trip(tmp_path, net):
    pkl, pt = tmp_path / 'network-snapshot-000001.pkl', tmp_path / 'training-state-000001.pt'
    checkpoint.save_snapshot(pkl, dict(ema=net, loss_fn=ToyLoss(), augment_pipe=None, dataset_kwargs=dict(path='d')))
    checkpoint.save_training_state(pt, dict(net=net, ema=net, optimizer_state={}, step=7))
    assert sorted(os.listdir(tmp_path)) == sorted([pkl.name, pt.name])  # No temp files left.
    # Our snapshot is in the EDM format: the persistence hook and a meta dict with module_src.
    raw = pkl.read_bytes()
    assert b'_reconstruct_persistent_obj' in raw and b'module_src' in raw and b'class DhariwalUNet' in raw
    metas = []
    class Spy(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
                return lambda meta: metas.append(meta)
            return super().find_class(module, name)
    Spy(io.BytesIO(raw)).load()
    import inspect
    top = [m for m in metas if m['class_name'] == 'EDMPrecond'][0]
    assert set(top) == {'type', 'version', 'module_src', 'class_name', 'state'}
    assert (top['type'], top['version']) == ('class', 6)
    assert top['module_src'] == inspect.getsource(networks)
    assert top['state']['_init_kwargs']['model_type'] == 'DhariwalUNet' and '_parameters' in top['state']
    check_same_outputs(net, checkpoint.load_network(str(pkl)))
    data = checkpoint.load_checkpoint(str(pt))
    assert data['step'] == 7
    check_same_outputs(net, data['ema'])
    # Plain pickle through our persistence module works too (restores state, no exec).
    check_same_outputs(net, pickle.loads(raw)['ema'])
    # EDM's way (executing the stored module source, here via load_trusted_pickle) rebuilds
    # the network from OUR snapshot: what EDM-based tools do with our files.
    net_only = tmp_path / 'net-only.pkl'
    checkpoint.save_snapshot(net_only, dict(ema=net))
    with open(net_only, 'rb') as f:
        edm_style = persistence.load_trusted_pickle(f)['ema']
    assert type(edm_style).__module__.startswith('_trusted_') and type(edm_style).__name__ == 'EDMPrecond'
    check_same_outputs(net, edm_style)
    import copy
    check_same_outputs(net, copy.deepcopy(edm_style))  # Reuses the trusted module, runs nothing new.
    assert persistence.get_registered_class('EDMPrecond') is networks.EDMPrecond  # Trusted classes stay out of the registry.


def test_reference_pkl_protocol_2(tmp_path, net):
    path = tmp_path / 'p2.pkl'
    write_reference_pkl(path, dict(ema=net), protocol=2)
    assert b'_codecs' in path.read_bytes()
    check_same_outputs(net, checkpoint.load_network(str(path)))


def test_url_and_file_url(tmp_path, net):
    path = tmp_path / 'net.pkl'
    checkpoint.save_snapshot(path, dict(ema=net))
    check_same_outputs(net, checkpoint.load_network(path.as_uri()))


def test_legacy_torch_save(tmp_path, net):
    # Pre-zip torch.save files (torch < 1.6): plain tensors load; modules, which that format
    # records with their source code, are refused.
    path = tmp_path / 'legacy.pt'
    torch.save(dict(ema=net.state_dict(), step=3), path, _use_new_zipfile_serialization=False)
    data = checkpoint.load_checkpoint(str(path))
    assert data['step'] == 3 and all(torch.equal(data['ema'][k], v) for k, v in net.state_dict().items())
    torch.save(dict(ema=net, step=3), path, _use_new_zipfile_serialization=False)
    with pytest.raises(checkpoint.CheckpointError, match=r'legacy\.pt: a legacy \(pre-zip\) torch.save file holding torch.nn modules'):
        checkpoint.load_checkpoint(str(path))


def test_safetensors_round_trip_and_cli(tmp_path, net):
    src = tmp_path / 'net.pkl'
    checkpoint.save_snapshot(src, dict(ema=net))
    out = tmp_path / 'net.safetensors'
    checkpoint.export_safetensors(str(src), str(out))
    config = json.loads((tmp_path / 'net.json').read_text())
    assert config['class_name'] == 'training.networks.EDMPrecond' and config['init_kwargs']['model_channels'] == 64
    check_same_outputs(net, checkpoint.load_network(str(out)))
    # Without the JSON, the config embedded in the safetensors metadata is used.
    os.remove(tmp_path / 'net.json')
    check_same_outputs(net, checkpoint.load_network(str(out)))

    # CLI, as a real `python -m` run: writes both files.
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    cli_out = tmp_path / 'cli.safetensors'
    r = subprocess.run([sys.executable, '-m', 'torch_utils.checkpoint', 'export', str(src), str(cli_out)],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert cli_out.exists() and (tmp_path / 'cli.json').exists()
    check_same_outputs(net, checkpoint.load_network(str(cli_out)))


def test_export_cli_errors(tmp_path, net):
    from click.testing import CliRunner
    src = tmp_path / 'net.pkl'
    checkpoint.save_snapshot(src, dict(ema=net))
    cli = checkpoint.main
    runner = CliRunner()
    out = tmp_path / 'out.safetensors'
    assert runner.invoke(cli, ['export', str(src), str(out)]).exit_code == 0
    before = out.read_bytes()
    # Refuses to overwrite; --overwrite replaces; bad input is one clean line, no traceback.
    r = runner.invoke(cli, ['export', str(src), str(out)])
    assert r.exit_code != 0 and 'already exists' in r.output and 'Traceback' not in r.output
    assert out.read_bytes() == before
    assert runner.invoke(cli, ['export', '--overwrite', str(src), str(out)]).exit_code == 0
    r = runner.invoke(cli, ['export', str(tmp_path / 'missing.pkl'), str(tmp_path / 'x.safetensors')])
    assert r.exit_code != 0 and 'missing.pkl: cannot open' in r.output and 'Traceback' not in r.output
    assert not (tmp_path / 'x.safetensors').exists()
    r = runner.invoke(cli, ['export', str(src), str(tmp_path / 'x.bin')])
    assert r.exit_code != 0 and 'must end in .safetensors' in r.output
    r = runner.invoke(cli, ['export', '--help'])
    assert r.exit_code == 0 and '--key' in r.output and '--overwrite' in r.output
    r = runner.invoke(cli, ['info', str(src)])
    assert r.exit_code == 0 and 'training.networks.EDMPrecond' in r.output


def test_safetensors_bad_input(tmp_path, net):
    src = tmp_path / 'net.pkl'
    checkpoint.save_snapshot(src, dict(ema=net))
    out = tmp_path / 'net.safetensors'
    checkpoint.export_safetensors(str(src), str(out))
    config = json.loads((tmp_path / 'net.json').read_text())
    config['init_kwargs']['model_channels'] = 32
    (tmp_path / 'net.json').write_text(json.dumps(config))
    with pytest.raises(checkpoint.CheckpointError, match=r'net\.safetensors \(training\.networks\.EDMPrecond\): tensor "model\.[^"]+" has shape'):
        checkpoint.load_checkpoint(str(out))
    config['class_name'] = 'os.system'
    (tmp_path / 'net.json').write_text(json.dumps(config))
    with pytest.raises(checkpoint.CheckpointError, match='unknown persistent class "os.system"'):
        checkpoint.load_checkpoint(str(out))
    # A config is a few kB: a padded one is refused without being read whole (it was json.load'ed).
    (tmp_path / 'net.json').write_text(json.dumps(config) + ' ' * (2 << 20))
    with pytest.raises(checkpoint.CheckpointError, match=r'net\.json has more than 1048576 bytes; a config is a few kB'):
        checkpoint.load_checkpoint(str(out))


#----------------------------------------------------------------------------
# Bad input.

def test_truncated_and_non_pickle(tmp_path, net):
    good = tmp_path / 'good.pkl'
    checkpoint.save_snapshot(good, dict(ema=net))
    trunc = tmp_path / 'trunc.pkl'
    trunc.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r'trunc\.pkl: truncated or corrupt'):
        checkpoint.load_checkpoint(str(trunc))
    pt = tmp_path / 'good.pt'
    checkpoint.save_training_state(pt, dict(ema=net))
    trunc_pt = tmp_path / 'trunc.pt'
    trunc_pt.write_bytes(pt.read_bytes()[:-200])
    with pytest.raises(checkpoint.CheckpointError, match=r'trunc\.pt: .*(corrupt|truncated)'):
        checkpoint.load_checkpoint(str(trunc_pt))
    text = tmp_path / 'notes.pkl'
    text.write_text('hello')
    with pytest.raises(checkpoint.CheckpointError, match=r'notes\.pkl: not a pickle'):
        checkpoint.load_checkpoint(str(text))
    with pytest.raises(checkpoint.CheckpointError, match=r'nothere\.pkl: cannot open'):
        checkpoint.load_checkpoint(str(tmp_path / 'nothere.pkl'))


def test_missing_ema_and_wrong_key(tmp_path, net):
    path = tmp_path / 'noema.pkl'
    checkpoint.save_snapshot(path, dict(net=net, step=1))
    with pytest.raises(checkpoint.CheckpointError, match=r'noema\.pkl: no "ema" network .*net, step'):
        checkpoint.load_checkpoint(str(path))
    assert type(checkpoint.load_network(str(path), key='net')) is networks.EDMPrecond
    with pytest.raises(checkpoint.CheckpointError, match='"step" is a int'):
        checkpoint.load_network(str(path), key='step')
    lst = tmp_path / 'list.pkl'
    lst.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(checkpoint.CheckpointError, match='expected a dict'):
        checkpoint.load_checkpoint(str(lst))


def test_shape_mismatch_names_tensor(tmp_path, net):
    # A file whose recorded arguments do not match its tensors (e.g. edited or from another
    # architecture): the offending tensor is named.
    other = small_net(model_channels=32, attn_resolutions=[])
    path = tmp_path / 'mismatch.pkl'
    write_reference_pkl(path, dict(ema=other), overrides=[(other, dict(_init_kwargs=dict(net._init_kwargs)))])
    with pytest.raises(checkpoint.CheckpointError, match=r'mismatch\.pkl: .*tensor "model\.[^"]+" has shape \[128\] \(torch.float32\) in the file but \[256\]'):
        checkpoint.load_checkpoint(str(path))


def test_http_error(tmp_path, monkeypatch):
    import http.server
    import threading
    import time
    monkeypatch.setattr(time, 'sleep', lambda s: None)  # open_url retries; do not wait.
    server = http.server.HTTPServer(('127.0.0.1', 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f'http://127.0.0.1:{server.server_address[1]}/no-such-file.pkl'
        with pytest.raises(checkpoint.CheckpointError, match=r'no-such-file\.pkl: cannot open .*404'):
            checkpoint.load_checkpoint(url)
    finally:
        server.shutdown()
        server.server_close()

#----------------------------------------------------------------------------
# Attack files: each is refused with a message naming the problem, and its side effect (a
# marker file) never happens. The first one also shows the payload is real under plain pickle.

class _Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _touch_code(marker):
    return f'__import__("pathlib").Path({str(marker)!r}).write_text("pwned")'


def test_attack_exec_and_eval(tmp_path):
    marker = tmp_path / 'marker'
    for func in (exec, eval):
        payload = pickle.dumps(dict(ema=_Reduce(func, _touch_code(marker))))
        path = tmp_path / f'{func.__name__}.pkl'
        path.write_bytes(payload)
        pickle.loads(payload)  # Plain pickle really runs it...
        assert marker.exists()
        marker.unlink()
        with pytest.raises(checkpoint.CheckpointError, match=rf'{func.__name__}\.pkl: refusing to load global "builtins\.{func.__name__}"'):
            checkpoint.load_checkpoint(str(path))
        assert not marker.exists()  # ...ours does not.


def test_attack_os_system(tmp_path):
    marker = tmp_path / 'marker'
    path = tmp_path / 'system.pkl'
    path.write_bytes(pickle.dumps(dict(ema=_Reduce(os.system, f'touch {marker}'))))
    with pytest.raises(checkpoint.CheckpointError, match=r'refusing to load global "(posix|os|nt)\.system"'):
        checkpoint.load_checkpoint(str(path))
    assert not marker.exists()
    # The same payload inside a torch.save zip (.pt).
    pt = tmp_path / 'system.pt'
    torch.save(dict(ema=_Reduce(os.system, f'touch {marker}')), pt)
    with pytest.raises(checkpoint.CheckpointError, match=r'system\.pt: refusing to load global "(posix|os|nt)\.system"'):
        checkpoint.load_checkpoint(str(pt))
    assert not marker.exists()


def test_attack_module_src(tmp_path, net):
    marker = tmp_path / 'marker'
    src = REFERENCE_SRC.format(marker=str(marker))
    # An unknown class whose definition lives only in module_src: refused, source not run.
    evil = ToyLoss()
    path = tmp_path / 'evil_class.pkl'
    write_reference_pkl(path, dict(ema=evil), module_src=src, overrides=[(evil, dict(class_name='EvilNet'))])
    with pytest.raises(checkpoint.CheckpointError, match=r'evil_class\.pkl: .*unknown persistent class "EvilNet" .*the module source stored in a file is never executed: load files with training\.load_checkpoint'):
        checkpoint.load_checkpoint(str(path))
    assert not marker.exists()
    # A known class with a side effect in its module_src: loads, the source is ignored.
    ok = tmp_path / 'src_ignored.pkl'
    write_reference_pkl(ok, dict(ema=net), module_src=src)
    check_same_outputs(net, checkpoint.load_network(str(ok)))
    assert not marker.exists()
    # Even our persistence hook under plain pickle does not execute module_src.
    with pytest.raises(pickle.UnpicklingError, match='unknown persistent class "EvilNet"'):
        pickle.loads(path.read_bytes())
    assert not marker.exists()


def test_attack_nested_in_state(tmp_path, net):
    marker = tmp_path / 'marker'
    path = tmp_path / 'nested.pkl'
    block = net.model.enc['8x8_block0']
    hooks = {0: _Reduce(subprocess.call, ['touch', str(marker)])}  # A payload deep inside one block's state.
    write_reference_pkl(path, dict(ema=net), overrides=[(block, dict(_forward_hooks=hooks))])
    with pytest.raises(checkpoint.CheckpointError, match=r'nested\.pkl: refusing to load global "subprocess\.call"'):
        checkpoint.load_checkpoint(str(path))
    assert not marker.exists()
    # And inside the constructor arguments, in a .pt file.
    pt = tmp_path / 'nested.pt'
    kwargs = dict(net._init_kwargs, model_type=_Reduce(eval, _touch_code(marker)))
    write_reference_pt(pt, dict(ema=net), overrides=[(net, dict(_init_kwargs=kwargs))])
    with pytest.raises(checkpoint.CheckpointError, match=r'nested\.pt: refusing to load global "builtins\.eval"'):
        checkpoint.load_checkpoint(str(pt))
    assert not marker.exists()


def test_attack_unexpected_modules(tmp_path):
    # Globals from modules that are not obviously dangerous are refused just the same.
    marker = tmp_path / 'marker'
    cases = {
        'torch_load.pkl': (torch.load, str(marker)),
        'numpy_load.pkl': (np.load, str(marker)),
        'importlib.pkl': (__import__('importlib').import_module, 'antigravity'),
        'shutil.pkl': (__import__('shutil').rmtree, str(tmp_path / 'nothing')),
    }
    for name, (func, arg) in cases.items():
        for suffix, save in (('', lambda p, d: p.write_bytes(pickle.dumps(d))), ('.pt', lambda p, d: torch.save(d, p))):
            path = tmp_path / (name + suffix)
            save(path, dict(weights=torch.ones(3), ema=_Reduce(func, arg)))
            with pytest.raises(checkpoint.CheckpointError, match=rf'{name}{suffix}: refusing to load global "{func.__module__}\.{func.__name__}"'):
                checkpoint.load_checkpoint(str(path))
    assert not marker.exists()


@pytest.mark.parametrize('protocol', [2, 4])  # protocol 2 spells the bytes as _codecs.encode(str)
def test_attack_via_storage_bytes(tmp_path, protocol):
    # A payload hidden inside the legacy storage bytes of a plain-pickled tensor: torch's
    # weights-only unpickler refuses it.
    marker = tmp_path / 'marker'
    inner = io.BytesIO()
    for part in (0x1950a86a20f9469cfc6c, 1001, dict(protocol_version=1001, little_endian=True)):
        pickle.dump(part, inner, protocol=2)
    pickle.dump(_Reduce(exec, _touch_code(marker)), inner, protocol=2)
    outer = pickle.dumps(dict(weights=torch.ones(3), ema=_Reduce(torch.storage._load_from_bytes, inner.getvalue())), protocol=protocol)
    path = tmp_path / 'storage.pkl'
    path.write_bytes(outer)
    with pytest.raises(checkpoint.CheckpointError, match=r'refusing to load global "(builtins\.)?exec"'):
        checkpoint.load_checkpoint(str(path))
    assert not marker.exists()


def test_attack_mutating_allowed_globals(tmp_path):
    # BUILD with a slot state does setattr() on whatever object is on the stack, including an
    # allowed global itself: refused, the real class stays as it is.
    getattr_before = dnnlib.EasyDict.__dict__['__getattr__']
    payloads = {
        'easydict.pkl': b'\x80\x02cdnnlib.util\nEasyDict\nN}X\x0b\x00\x00\x00__getattr__ctorch\ndevice\ns\x86b.',
        'storage.pkl': b'\x80\x02ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypectorch\nfloat64\ns\x86b.',
    }
    for name, payload in payloads.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(checkpoint.CheckpointError, match=rf'{name}: (the file sets the state of a type|refusing to load global)'):
            checkpoint.load_checkpoint(str(path))
    assert dnnlib.EasyDict.__dict__['__getattr__'] is getattr_before
    assert dnnlib.EasyDict(a=1).a == 1


def test_user_loader_in_a_fresh_interpreter(tmp_path, net):
    # The low-level reader knows only the classes imported so far and says which loader does.
    path = tmp_path / 'snap.pkl'
    checkpoint.save_snapshot(path, dict(ema=net))
    low = 'from torch_utils import checkpoint; checkpoint.load_network(sys.argv[1])'
    user = 'import training; print(type(training.load_network(sys.argv[1])).__name__)'
    env = dict(os.environ, PYTHONPATH=REPO)
    for code in (low, user):
        result = subprocess.run([sys.executable, '-c', 'import sys; ' + code, str(path)], cwd=str(tmp_path), env=env,
                                capture_output=True, text=True, timeout=120)
        if code is low:
            assert result.returncode == 1 and 'unknown persistent class "EDMPrecond"' in result.stderr
            assert 'training.load_network' in result.stderr
        else:
            assert result.returncode == 0 and result.stdout.strip() == 'EDMPrecond', result.stderr


@pytest.mark.parametrize('attr,value', [('img_resolution', 8192), ('label_dim', 0), ('img_channels', 1), ('num_heads', 7)])
def test_attributes_that_contradict_the_constructor_are_refused(tmp_path, net, attr, value):
    # A tampered state (say img_resolution=8192 around 8 px weights) would size everything that
    # follows; the network's attributes must be what its constructor arguments make.
    owner = net.model.enc['8x8_block0'] if attr == 'num_heads' else net
    path = tmp_path / 'tampered.pkl'
    write_reference_pkl(path, dict(ema=net), overrides=[(owner, {attr: value})])
    with pytest.raises(checkpoint.CheckpointError, match=rf'tampered\.pkl: .*its saved {attr}={value} contradicts its constructor arguments'):
        checkpoint.load_checkpoint(str(path))
    # Settings of other persistent objects (losses, augmentation) keep values changed after construction.
    loss = ToyLoss()
    loss.P_std = 9.0
    write_reference_pkl(path, dict(ema=net, loss_fn=loss))
    assert checkpoint.load_checkpoint(str(path))['loss_fn'].P_std == 9.0


def test_meta_build_draws_nothing_and_allocates_only_the_file(tmp_path):
    # Every preconditioner rebuilds on the meta device: the global random state is untouched.
    for precond in ('VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond'):
        torch.manual_seed(5)
        n = getattr(networks, precond)(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=16,
                                        channel_mult=[1], num_blocks=1, attn_resolutions=[])
        path = tmp_path / f'{precond}.pkl'
        checkpoint.save_snapshot(path, dict(ema=n))
        state = torch.random.get_rng_state()
        loaded = checkpoint.load_network(str(path))
        assert torch.equal(torch.random.get_rng_state(), state)
        assert (loaded.sigma_min, loaded.sigma_max) == (n.sigma_min, n.sigma_max)
        assert all(not t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
        assert all(torch.equal(a, b) for a, b in zip(n.state_dict().values(), loaded.state_dict().values()))
