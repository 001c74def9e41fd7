"""Regenerate docs/<script>-help.txt from each CLI's --help (run after changing an option).

    python docs/update_help.py          # rewrite the files
    python docs/update_help.py --check  # exit 1 if any file is out of date (used by the tests)
"""

import concurrent.futures
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (doc file stem, command line after `python`)
CLIS = [
    ('dataset-tool', ['dataset_tool.py']),
    ('train', ['train.py']),
    ('generate', ['generate.py']),
    ('generate-imagenet', ['generate_imagenet.py']),
    ('generate-celebahq', ['generate_celebahq.py']),
    ('evaluate', ['evaluate.py']),
    ('evaluate-activations', ['evaluate.py', 'activations']),
    ('evaluate-calc', ['evaluate.py', 'calc']),
    ('evaluate-gen', ['evaluate.py', 'gen']),
    ('evaluate-refs', ['evaluate.py', 'refs']),
    ('checkpoint-export', ['-m', 'torch_utils.checkpoint', 'export']),
    ('quickstart', ['quickstart.py']),
]


def help_text(args: list[str]) -> str:
    env = dict(os.environ, COLUMNS='100', LINES='50')  # Fixed width: click wraps to the terminal.
    result = subprocess.run([sys.executable, *args, '--help'], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=True)
    return result.stdout


def main() -> int:
    check = '--check' in sys.argv[1:]
    stale = []
    # Each --help is a fresh interpreter that spends most of its time importing torch: run them side by side.
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        texts = list(pool.map(help_text, [args for _, args in CLIS]))
    for (stem, args), text in zip(CLIS, texts):
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
    sys.exit(main())
