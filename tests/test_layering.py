"""Imports go downward only: torch_utils/ and dnnlib/ never import training/ or metrics/.

A static check reads every module's syntax tree (imports at any depth, and no import inside a
function, where one would hide a cycle); a dynamic check imports each module in a fresh
interpreter and looks at what ended up in sys.modules.
"""

import ast
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
LOWER = ('torch_utils', 'dnnlib')
UPPER = ('training', 'metrics')


def _modules(package):
    return sorted(p for p in (REPO / package).glob('*.py'))


def _imported_names(node, module_name):
    """Absolute module names an Import/ImportFrom node brings in."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # Relative: resolve against the module's own package.
        parts = module_name.split('.')[:-node.level] + ([node.module] if node.module else [])
    else:
        parts = [node.module]
    return ['.'.join(parts)] * bool(parts) + ['.'.join(parts + [alias.name]) for alias in node.names]


def _is_main_guard(node):
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == '__name__'
            and len(test.comparators) == 1 and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == '__main__')


def _import_problems(path, package):
    """(line, text) of every upward import and every function-level import in one module.

    The body of `if __name__ == '__main__':` is the script entry point of the file (run with
    python -m), which like every script may import what it runs; it is left out.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    module_name = f'{package}.{path.stem}'
    problems = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if _is_main_guard(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                text = ast.unparse(child)
                if in_function:
                    problems.append((child.lineno, f'import inside a function: {text}'))
                upward = [name for name in _imported_names(child, module_name) if name.split('.')[0] in UPPER]
                if upward:
                    problems.append((child.lineno, f'imports {upward[0]} from a lower layer: {text}'))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return problems


def test_static_layering():
    found = []
    for package in LOWER:
        for path in _modules(package):
            found += [f'{path.relative_to(REPO)}:{line}: {msg}' for line, msg in _import_problems(path, package)]
    assert found == []


def test_static_check_catches_violations(tmp_path):
    # The checker itself must see each kind of violation (else the test above proves nothing).
    bad = tmp_path / 'bad.py'
    bad.write_text('import os\nfrom training import networks\n'
                   'def f():\n    import json\n    from .. import metrics\n'
                   'if __name__ == "__main__":\n    import training\n')
    problems = [msg for _, msg in _import_problems(bad, 'torch_utils')]
    assert any('imports training' in m for m in problems)
    assert any(m == 'import inside a function: import json' for m in problems)
    assert any('imports metrics' in m for m in problems)
    assert len([m for m in problems if 'training' in m]) == 1  # The __main__ block is a script.


def _upper_modules_after_import(modules):
    """Upper-layer modules in sys.modules after one fresh interpreter imports `modules`."""
    code = (f'import sys\nfor m in {modules!r}: __import__(m)\n'
            f'print(sorted(m for m in sys.modules if m.split(".")[0] in {UPPER!r}))')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True)
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])


def test_import_pulls_in_no_upper_layer():
    # One fresh interpreter imports every lower-layer module: an import anywhere below that
    # reached training/ or metrics/ would leave that module in sys.modules.
    modules = [f'{pkg}.{p.stem}' for pkg in LOWER for p in _modules(pkg) if p.stem != '__init__'] + list(LOWER)
    assert 'torch_utils.checkpoint' in modules and 'dnnlib.util' in modules
    assert _upper_modules_after_import(modules) == []


def test_dynamic_check_catches_violations():
    # The same checker reports an upper-layer module when the imported set pulls one in.
    assert 'training.blurring' in _upper_modules_after_import(['dnnlib.util', 'training.blurring'])
