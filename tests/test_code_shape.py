"""The code's shape, held by the project's own config (pyproject.toml): the layering
contracts (import-linter), the lint rules (ruff), and no tool that branches on the
objective's name."""
import os
import re
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'hyperlora_jax')


def _run(*command):
  tool = shutil.which(command[0])
  assert tool, f'{command[0]} is not installed: pip install -e .[test]'
  return subprocess.run([tool, *command[1:]], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, check=False)


def test_import_layers():
  result = _run('lint-imports')
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  assert '0 broken' in result.stdout


def test_ruff():
  result = _run('ruff', 'check', '.')
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_no_tool_branches_on_the_objective_name():
  branch = re.compile(r'objective\S*\s+(==|!=|in|not in)\s')
  found = []
  for folder, _, files in os.walk(PACKAGE):
    if os.path.relpath(folder, PACKAGE).startswith('objectives'):
      continue  # The objectives' own modules.
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        with open(path) as f:
          found += [f'{os.path.relpath(path, ROOT)}:{i}: {line.strip()}'
                    for i, line in enumerate(f, 1) if branch.search(line)]
  assert not found, '\n'.join(found)
