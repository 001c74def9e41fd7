"""Regenerate docs/<script>-help.txt from each CLI's --help (run after changing an option).

    python docs/update_help.py          # rewrite the files
    python docs/update_help.py --check  # exit 1 if any file is out of date (used by the tests)
"""

import importlib
import os
import sys

import click.testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (doc file stem, module holding the click command, program name, arguments before --help)
CLIS = [
    ('dataset-tool', 'dataset_tool', 'dataset_tool.py', []),
    ('train', 'train', 'train.py', []),
    ('generate', 'generate', 'generate.py', []),
    ('generate-imagenet', 'generate_imagenet', 'generate_imagenet.py', []),
    ('generate-celebahq', 'generate_celebahq', 'generate_celebahq.py', []),
    ('evaluate', 'evaluate', 'evaluate.py', []),
    ('evaluate-activations', 'evaluate', 'evaluate.py', ['activations']),
    ('evaluate-calc', 'evaluate', 'evaluate.py', ['calc']),
    ('evaluate-gen', 'evaluate', 'evaluate.py', ['gen']),
    ('evaluate-refs', 'evaluate', 'evaluate.py', ['refs']),
    ('evaluate-sweep', 'evaluate', 'evaluate.py', ['sweep']),
    ('checkpoint-export', 'torch_utils.checkpoint', 'python -m torch_utils.checkpoint', ['export']),
    ('quickstart', 'quickstart', 'quickstart.py', []),
    ('reconstruct-phema', 'reconstruct_phema', 'reconstruct_phema.py', []),
]


def help_text(module: str, prog_name: str, args: list[str]) -> str:
    """`--help` of one CLI, made in this process (the same text as `python script.py --help`)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    command = importlib.import_module(module).main
    # The width click gives a wide terminal (80 - 2); it otherwise wraps to the terminal.
    result = click.testing.CliRunner().invoke(command, [*args, '--help'], prog_name=prog_name, terminal_width=78)
    assert result.exit_code == 0, result.output
    return result.output


def main(argv: list[str]) -> int:
    check = '--check' in argv
    stale = []
    for stem, module, prog_name, args in CLIS:
        text = help_text(module, prog_name, args)
        path = os.path.join(ROOT, 'docs', f'{stem}-help.txt')
        old = open(path, encoding='utf-8').read() if os.path.isfile(path) else None
        if old != text:
            stale.append(path)
            if not check:
                with open(path, 'w', encoding='utf-8') as f:
                    f.write(text)
    for path in stale:
        print(('out of date: ' if check else 'wrote ') + os.path.relpath(path, ROOT))
    return 1 if (check and stale) else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
