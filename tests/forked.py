"""Command lines run as their own processes, forked from a `multiprocessing` fork server that
imported JAX and the library once (~0.3 s a start instead of ~3 s).

`run(module, args, env)` is `python -m module *args`: the child runs the module as `__main__`
with that argv and environment, so its exit code and output are the command line's. `call` runs
any importable function in such a child; `start` and `start_module` return at once with a handle
that has the part of `subprocess.Popen` the tests use. JAX reads its own `JAX_*` variables when it
is imported, in the fork server, so a child's `env` changes what is read later (`XLA_FLAGS`, the
launchers' `JAX_COMPILATION_CACHE_DIR`), not those.
"""
import atexit
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imported once by the fork server; none of them starts a thread or a JAX backend.
PRELOAD = ['jax', 'optax', 'flax.linen', 'tensorflow_datasets', 'matplotlib.pyplot',
           'datarater.meta_train', 'datarater.train', 'datarater.trainer', 'bench.runs',
           'bench.cli', 'launch.cli']


def _every_process_writes_the_compilation_cache() -> None:
  """JAX writes compilation cache entries from process 0 of a job alone, and on CPU the other
  processes' keys differ from its own (they hash the process's devices), so process 1 of the
  tests' two-process jobs compiled every program anew in every job (~3 s a job). Here every
  process writes its entries as process 0 does (another JAX version: left as it is)."""
  from jax._src import (  # pylint: disable=g-import-not-at-top
      compilation_cache, compiler, config, distributed)
  write = getattr(compiler, '_cache_write', None)
  if write is None or not hasattr(compilation_cache, 'put_executable_and_time'):
    return

  def cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
    if (distributed.global_state.process_id in (None, 0) or host_callbacks or
        compile_time_secs < config.persistent_cache_min_compile_time_secs.value):
      return write(cache_key, compile_time_secs, module_name, backend, executable,
                   host_callbacks)
    compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                              int(compile_time_secs))
  compiler._cache_write = cache_write  # pylint: disable=protected-access


def _child(function: Callable, args: tuple, env: dict, out: str, err: str) -> None:
  _every_process_writes_the_compilation_cache()
  os.environ.clear()
  os.environ.update(env)
  for fd, path in ((1, out), (2, err)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_APPEND), fd)
  # As a command started from a terminal (the tests may run as a shell's background job, whose
  # children start ignoring SIGINT).
  signal.signal(signal.SIGINT, signal.default_int_handler)
  interrupted = False
  try:
    function(*args)  # multiprocessing turns SystemExit(code) into the exit code
  except KeyboardInterrupt:  # as Python's main: sys.excepthook, exit's clean-up, killed by SIGINT
    sys.excepthook(*sys.exc_info())
    interrupted = True
  finally:
    atexit._run_exitfuncs()  # pylint: disable=protected-access  # as at a process's exit
  if interrupted:
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


class Started:
  """A child `start` forked: `poll`, `wait`, `send_signal`, `kill`, `communicate` and
  `returncode` as `subprocess.Popen`'s, output as text read once it has exited."""

  def __init__(self, process, folder: tempfile.TemporaryDirectory, out: str, err: str):
    self._process, self._folder, self._out, self._err = process, folder, out, err
    self.pid = process.pid

  @property
  def returncode(self) -> Optional[int]:
    return self._process.exitcode

  def poll(self) -> Optional[int]:
    return self._process.exitcode

  def wait(self, timeout: Optional[float] = None) -> int:
    self._process.join(timeout)
    if self._process.exitcode is None:
      raise subprocess.TimeoutExpired(repr(self._process), timeout)
    return self._process.exitcode

  def send_signal(self, signum: int) -> None:
    if self._process.exitcode is None:
      os.kill(self._process.pid, signum)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)

  def outputs(self) -> tuple[str, str]:
    """(stdout, stderr) so far (one text, and '', when they were merged)."""
    with open(self._out) as f:
      out = f.read()
    if self._err == self._out:
      return out, ''
    with open(self._err) as f:
      return out, f.read()

  def communicate(self, timeout: Optional[float] = None) -> tuple[str, Optional[str]]:
    self.wait(timeout)
    out, err = self.outputs()
    self._folder.cleanup()
    return out, err if self._err != self._out else None


def start(function: Callable, *args, env: dict, cwd: str = ROOT, merged: bool = False) -> Started:
  """`function(*args)` in a forked child with environment `env`, in folder `cwd` (`merged`:
  stderr into stdout, as `stderr=subprocess.STDOUT`); its exit code is 0 on return, 1 on an
  exception."""
  context = multiprocessing.get_context('forkserver')
  context.set_forkserver_preload(PRELOAD)
  folder = tempfile.TemporaryDirectory()
  out = os.path.join(folder.name, 'stdout')
  err = out if merged else os.path.join(folder.name, 'stderr')
  for path in {out, err}:
    open(path, 'w').close()
  here = os.getcwd()
  os.chdir(cwd)  # the child starts in the folder its parent is in at start()
  try:
    process = context.Process(target=_child, args=(function, args, dict(env), out, err))
    process.start()
  finally:
    os.chdir(here)
  return Started(process, folder, out, err)


def call(function: Callable, *args, env: dict, cwd: str = ROOT,
         timeout: float = 300) -> subprocess.CompletedProcess:
  """`start(function, *args, ...)` waited for: its exit code and its stdout and stderr."""
  child = start(function, *args, env=env, cwd=cwd)
  try:
    child.wait(timeout)
  except subprocess.TimeoutExpired:
    child.kill()
    child.wait()
    raise TimeoutError(f'{function.__name__}{args} ran over {timeout} s:\n'
                       f'{child.outputs()[1][-2000:]}') from None
  stdout, stderr = child.communicate()
  return subprocess.CompletedProcess(args, child.returncode, stdout, stderr)


def as_main(module: str, args: list) -> None:
  """`python -m module *args`, in this process (a child patched first runs a launcher so)."""
  sys.argv = [module, *args]
  runpy.run_module(module, run_name='__main__', alter_sys=True)


def _as_script(path: str, args: list) -> None:
  sys.argv = [path, *args]
  runpy.run_path(path, run_name='__main__')


def run(module: str, args: list, env: dict, cwd: str = ROOT) -> subprocess.CompletedProcess:
  """`python -m module *args` with environment `env` in folder `cwd`, as
  `subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True)` returns
  it."""
  done = call(as_main, module, list(args), env=env, cwd=cwd)
  done.args = [sys.executable, '-m', module, *args]
  return done


def start_module(module: str, args: list, env: dict, cwd: str = ROOT) -> Started:
  """`python -m module *args` started, its stderr merged into its stdout."""
  return start(as_main, module, list(args), env=env, cwd=cwd, merged=True)


def start_script(path: str, args: list, env: dict, cwd: str = ROOT) -> Started:
  """`python path *args` started, its stderr merged into its stdout."""
  return start(_as_script, path, list(args), env=env, cwd=cwd, merged=True)
