"""A launcher's process keeps compiled programs in a temporary compilation cache (a program lowered
alike again loads instead of compiling) and removes it at exit; JAX_COMPILATION_CACHE_DIR wins."""
import os
import subprocess
import sys
import tempfile

import pytest

from tests import forked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = '''
import os, sys, jax, jax.numpy as jnp
from launch import cli
cli.process_compilation_cache()
hits = []
jax.monitoring.register_event_listener(
    lambda event, **_: hits.append(1) if event == '/jax/compilation_cache/cache_hits' else None)
print('cache', jax.config.jax_compilation_cache_dir)
x = jnp.ones(5)
def f(x):
  return jnp.sin(x) * 3
jax.jit(f)(x).block_until_ready()
before = len(hits)
def f(x):  # another function, the same program
  return jnp.sin(x) * 3
jax.jit(f)(x).block_until_ready()
print('hits', before, len(hits))
print('entries', len(os.listdir(jax.config.jax_compilation_cache_dir)))
'''


def _forked_child() -> None:
  """CHILD in a process forked from one that imported JAX (tests/forked.py) but never compiled:
  its temporary folder found from TMPDIR, as a new process finds it."""
  tempfile.tempdir = None
  exec(compile(CHILD, '<string>', 'exec'), {'__name__': '__main__'})  # pylint: disable=exec-used


def _run(tmp_path, stderr=None, fresh=False, **env):
  """The child's printed values (`stderr`: a list that gets what it wrote there); `fresh`: in a
  new Python process (~3 s: it imports JAX), else forked."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'} | env
  env = {**env, 'PYTHONPATH': ROOT, 'TMPDIR': str(tmp_path)}
  if fresh:
    out = subprocess.run([sys.executable, '-c', CHILD], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=env)
  else:
    out = forked.call(_forked_child, env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  if stderr is not None:
    stderr.append(out.stderr)
  return dict(line.split(' ', 1) for line in out.stdout.splitlines())


def test_a_launcher_process_caches_compiled_programs_in_a_folder_removed_at_exit(tmp_path):
  got = _run(tmp_path)
  assert os.path.dirname(got['cache']) == str(tmp_path)
  assert got['hits'] == '0 1'  # the second jit loaded the first's program
  assert os.listdir(tmp_path) == []
  kept = tmp_path / 'kept'
  got = _run(tmp_path, JAX_COMPILATION_CACHE_DIR=str(kept))
  assert got['cache'] == str(kept) and got['hits'] == '0 1' and int(got['entries']) >= 1
  assert os.listdir(kept)  # kept after the run


@pytest.mark.slow  # ~3 s: a fresh Python process imports JAX
def test_a_full_temporary_folder_costs_the_cache_not_a_warning_per_program(tmpfs):
  """A full /tmp (a tmpfs with room for the cache's folder, not for its entries): the programs
  run and compile, without JAX's two-line warning of each entry it could not write."""
  disk = tmpfs('4k')
  stderr = []
  got = _run(disk, stderr, fresh=True)
  assert os.path.dirname(got['cache']) == disk and got['hits'] == '0 0'  # none could be kept
  assert stderr == [''], stderr
