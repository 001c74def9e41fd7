"""`pip install .` installs the library packages (dnnlib, torch_utils, training, metrics) so that
the Python API imports from any folder."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ['dnnlib', 'torch_utils', 'training', 'metrics']


def test_pip_install_target_imports_the_api_from_another_folder(tmp_path):
    pytest.importorskip('setuptools', minversion='70.1')
    src = tmp_path / 'src'
    src.mkdir()
    shutil.copy(os.path.join(REPO, 'pyproject.toml'), src)
    for name in PACKAGES:
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=shutil.ignore_patterns('__pycache__'))
    target = tmp_path / 'site'
    result = subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-build-isolation',
                             '--no-index', '--target', str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p for p in os.listdir(target) if not p.endswith('.dist-info')) == sorted(PACKAGES)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    code = 'import training.pipeline, training.sampling, metrics, torch_utils.checkpoint; print(training.pipeline.__file__)'
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, '-c', code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
