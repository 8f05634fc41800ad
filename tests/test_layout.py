"""WORKSPACE's import rules, read off every module's import statements (top level and inside
functions): the library (`datarater`, `inner_loop`, `outer_loop`) never imports `launch`, `bench`
or `tests`; `launch` never imports `bench` or `tests`; `inner_loop` reads only
`datarater.tasks.base` and `datarater.errors` of the rest."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(package: str, root: str = ROOT):
  """(file, imported modules) for every import under `package`, relative ones made absolute."""
  for folder, _, names in sorted(os.walk(os.path.join(root, package))):
    for name in sorted(n for n in names if n.endswith('.py')):
      path = os.path.join(folder, name)
      parts = os.path.relpath(path, root)[:-3].split(os.sep)
      with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          yield path, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
          base = node.module or ''
          if node.level:  # relative: from the module's package upwards
            up = parts[:len(parts) - node.level]
            base = '.'.join(up + ([base] if base else []))
          yield path, [f'{base}.{a.name}' for a in node.names]


def _top(module: str) -> str:
  return module.split('.')[0]


@pytest.mark.parametrize('package,forbidden', [
    ('datarater', {'launch', 'bench', 'tests'}),
    ('inner_loop', {'launch', 'bench', 'tests', 'outer_loop'}),
    ('outer_loop', {'launch', 'bench', 'tests'}),
    ('launch', {'bench', 'tests'}),
])
def test_imports_go_one_way(package, forbidden):
  wrong = [(os.path.relpath(p, ROOT), m) for p, ms in _imports(package) for m in ms
           if _top(m) in forbidden]
  assert not wrong, wrong


def test_inner_loop_reads_only_the_task_interface_and_errors_of_datarater():
  read = {m.rsplit('.', 1)[0] if m.rsplit('.', 1)[0] in ('datarater.tasks.base',
                                                       'datarater.errors') else m
          for _, ms in _imports('inner_loop') for m in ms if _top(m) == 'datarater'}
  assert read <= {'datarater.tasks.base', 'datarater.errors'}, read


def test_the_walk_finds_imports_inside_functions_and_relative_ones(tmp_path):
  """A planted package: an import inside a function and a relative one are both read."""
  (tmp_path / 'pkg' / 'sub').mkdir(parents=True)
  (tmp_path / 'pkg' / 'sub' / 'mod.py').write_text(
      'def f():\n  from launch import train\n  return train\n\nfrom .. import errors\n')
  found = {m for _, ms in _imports('pkg', str(tmp_path)) for m in ms}
  assert found == {'launch.train', 'pkg.errors'}, found
