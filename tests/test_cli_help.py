"""Every CLI documents every option, and docs/*-help.txt match the current --help output."""

import concurrent.futures
import os
import subprocess
import sys

import click
import pytest

import dataset_tool
import evaluate
import generate
import generate_celebahq
import generate_imagenet
import quickstart
import reconstruct_phema
import train
from torch_utils import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMANDS = {
    'dataset_tool.py': dataset_tool.main,
    'train.py': train.main,
    'generate.py': generate.main,
    'generate_imagenet.py': generate_imagenet.main,
    'generate_celebahq.py': generate_celebahq.main,
    'evaluate.py activations': evaluate.main.commands['activations'],
    'evaluate.py calc': evaluate.main.commands['calc'],
    'evaluate.py gen': evaluate.main.commands['gen'],
    'checkpoint export': checkpoint.main.commands['export'],
    'quickstart.py': quickstart.main,
    'reconstruct_phema.py': reconstruct_phema.main,
}


@pytest.mark.parametrize('name', sorted(COMMANDS))
def test_every_option_has_help(name):
    command = COMMANDS[name]
    assert command.help, f'{name} has no description'
    options = [p for p in command.params if isinstance(p, click.Option)]
    assert options
    undocumented = [p.opts[0] for p in options if not (p.help and p.help.strip())]
    assert not undocumented, f'{name}: options without help: {undocumented}'


def test_presets_differ_only_in_defaults():
    # The preset scripts are the same command: the same options, other defaults.
    names = lambda cmd: sorted(p.name for p in cmd.params)  # noqa: E731
    assert names(generate_imagenet.main) == names(generate.main) == names(generate_celebahq.main)
    defaults = lambda cmd: {p.name: p.get_default(click.Context(cmd, **cmd.context_settings)) for p in cmd.params}  # noqa: E731
    assert defaults(generate_imagenet.main)['num_steps_first'] != defaults(generate.main)['num_steps_first']


def test_docs_help_files_are_current(capsys):
    # In this process: the same text as `python script.py --help` (docs/update_help.py says why).
    sys.path.insert(0, os.path.join(ROOT, 'docs'))
    import update_help  # noqa: E402  (docs/ is not a package)
    assert update_help.main(['--check']) == 0, 'run `python docs/update_help.py`:\n' + capsys.readouterr().out


def test_benchmark_scripts_start():
    # Run from anywhere (not only the repository root), as the README shows them; side by side,
    # since each interpreter spends its time importing torch.
    scripts = sorted(f for f in os.listdir(os.path.join(ROOT, 'benchmarks')) if f.endswith('.py'))
    run = lambda script: subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', script), '--help'],  # noqa: E731
                                        cwd=os.path.dirname(ROOT), capture_output=True, text=True)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for script, result in zip(scripts, pool.map(run, scripts)):
            assert result.returncode == 0 and '--help' in result.stdout, f'{script}: {result.stderr[-2000:]}'
