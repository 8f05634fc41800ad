"""Short command lines run as their own processes, forked from a `multiprocessing` fork server
that imported JAX and the library once (~0.3 s a run instead of ~3 s).

`run(module, args, env)` is `python -m module *args`: the child runs the module as `__main__`
with that argv and environment, so its exit code and output are the command line's. `call` runs
any importable function in such a child. JAX reads its own `JAX_*` variables when it is imported,
in the fork server, so a child's `env` changes what is read later (`XLA_FLAGS`, the launchers'
`JAX_COMPILATION_CACHE_DIR`), not those.
"""
import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imported once by the fork server; none of them starts a thread or a JAX backend.
PRELOAD = ['jax', 'optax', 'flax.linen', 'tensorflow_datasets', 'matplotlib.pyplot',
           'datarater.meta_train', 'datarater.train', 'datarater.trainer', 'bench.runs',
           'bench.cli', 'launch.cli']


def _child(function: Callable, args: tuple, env: dict, out: str, err: str) -> None:
  os.environ.clear()
  os.environ.update(env)
  for fd, path in ((1, out), (2, err)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
  try:
    function(*args)  # multiprocessing turns SystemExit(code) into the exit code
  finally:
    atexit._run_exitfuncs()  # pylint: disable=protected-access  # as at a process's exit


def call(function: Callable, *args, env: dict, cwd: str = ROOT,
         timeout: float = 300) -> subprocess.CompletedProcess:
  """`function(*args)` in a forked child with environment `env`, in folder `cwd`: its exit code
  (0 on return, 1 on an exception) and its stdout and stderr as text."""
  context = multiprocessing.get_context('forkserver')
  context.set_forkserver_preload(PRELOAD)
  with tempfile.TemporaryDirectory() as tmp:
    out, err = os.path.join(tmp, 'stdout'), os.path.join(tmp, 'stderr')
    open(out, 'w').close()
    open(err, 'w').close()
    here = os.getcwd()
    os.chdir(cwd)  # the child starts in the folder its parent is in at start()
    try:
      process = context.Process(target=_child, args=(function, args, dict(env), out, err))
      process.start()
    finally:
      os.chdir(here)
    process.join(timeout)
    killed = process.exitcode is None
    if killed:
      process.kill()
      process.join()
    with open(out) as f_out, open(err) as f_err:
      stdout, stderr = f_out.read(), f_err.read()
  if killed:
    raise TimeoutError(f'{function.__name__}{args} ran over {timeout} s:\n{stderr[-2000:]}')
  return subprocess.CompletedProcess(args, process.exitcode, stdout, stderr)


def _as_main(module: str, args: list) -> None:
  sys.argv = [module, *args]
  runpy.run_module(module, run_name='__main__', alter_sys=True)


def run(module: str, args: list, env: dict, cwd: str = ROOT) -> subprocess.CompletedProcess:
  """`python -m module *args` with environment `env` in folder `cwd`, as
  `subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True)` returns
  it."""
  done = call(_as_main, module, list(args), env=env, cwd=cwd)
  done.args = [sys.executable, '-m', module, *args]
  return done
