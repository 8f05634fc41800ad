"""Ctrl-C and SIGTERM stop a launcher even when handled inside a garbage-collector callback or a
finalizer, where Python drops what they raise."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests import forked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exec(code: str, args: list) -> None:
  """`python -c code *args`, in a process forked from one that imported JAX (tests/forked.py)."""
  sys.argv = ['-c', *args]
  exec(compile(code, '<string>', 'exec'), {'__name__': '__main__'})  # pylint: disable=exec-used

# A gc callback (as JAX registers one) that signals its own process once: the handler runs inside
# the callback, where Python prints and drops whatever it raises.
CHILD = '''
import gc, os, signal, sys, time
from launch import interrupts
signal.signal(signal.SIGINT, signal.default_int_handler)  # as started from a terminal, even when
# the tests run as a shell's background job (started ignoring SIGINT, as their children are)
if sys.argv[2] == 'install':
  interrupts.install()
else:
  signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))  # raises, as a plain handler
sent = []
def callback(phase, info):
  if phase == 'start' and not sent:
    sent.append(1)
    os.kill(os.getpid(), int(sys.argv[1]))
    sum(range(1000))  # handled here, inside the callback
if sys.argv[3] == 'gc':
  gc.callbacks.append(callback)
else:  # a finalizer: handled in __del__
  class Finalized:
    def __del__(self):
      callback('start', None)
  Finalized()
start = time.time()
while time.time() - start < 0.5:  # 10x the handler's resend (interrupts.RESEND_S, 0.05 s)
  class Node: pass
  node = Node(); node.self = node
print('went on to the end')
'''


def _run(signum: int, mode: str, where: str):
  return subprocess.run([sys.executable, '-c', CHILD, str(signum), mode, where], cwd=ROOT,
                        capture_output=True, text=True, timeout=60,
                        env={**os.environ, 'PYTHONPATH': ROOT})


# Each signal in each place once (SIGINT in a gc callback, SIGTERM in a finalizer); the other two
# pairs, variants of them, run with the slow checks.
@pytest.mark.parametrize('signum,code,where', [
    (signal.SIGINT, -signal.SIGINT, 'gc'), (signal.SIGTERM, 128 + signal.SIGTERM, 'finalizer'),
    pytest.param(signal.SIGINT, -signal.SIGINT, 'finalizer', marks=pytest.mark.slow),
    pytest.param(signal.SIGTERM, 128 + signal.SIGTERM, 'gc', marks=pytest.mark.slow)])
def test_signal_inside_a_gc_callback_or_finalizer_stops_the_run(signum, code, where):
  lost = _run(signum, 'plain', where)  # the failure this guards against: the signal is dropped
  assert lost.returncode == 0 and 'went on to the end' in lost.stdout, lost.stderr[-2000:]
  stopped = _run(signum, 'install', where)
  assert stopped.returncode == code, stopped.stderr[-2000:]
  assert 'went on to the end' not in stopped.stdout
  if signum == signal.SIGINT:  # one line where it stopped, no traceback
    assert stopped.stderr.strip().startswith('interrupted (Ctrl-C) at <string>:'), stopped.stderr
    assert len(stopped.stderr.strip().splitlines()) == 1, stopped.stderr[-2000:]


# Stops at the first import of jax and says which SIGINT handler is in place then.
AT_JAX_IMPORT = '''
import importlib.abc, os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal (see CHILD)
class Watch(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name == 'jax':
      print(getattr(signal.getsignal(signal.SIGINT), '__module__', None), flush=True)
      os._exit(0)
sys.meta_path.insert(0, Watch())
sys.argv = [sys.argv[1]]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
'''


def _entry_points() -> list[str]:
  names = lambda folder: sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, folder))
                                if f.endswith('.py') and 'cli.run(' in open(
                                    os.path.join(ROOT, folder, f)).read())
  return [f'launch.{n}' for n in names('launch') if n != 'cli'] + [f'bench.{n}' for n in
                                                                    names('bench') if n != 'cli']


@pytest.mark.parametrize('module', _entry_points())
def test_an_entry_point_handles_ctrl_c_before_jax_is_imported(module):
  """A Ctrl-C handled in JAX's gc callback while a launcher's imports ran was dropped and the
  run went on to exit 0: the handlers go in before JAX loads (every launch and bench script)."""
  proc = subprocess.run([sys.executable, '-c', AT_JAX_IMPORT, module], cwd=ROOT,
                        capture_output=True, text=True, timeout=60,
                        env={**os.environ, 'PYTHONPATH': ROOT})
  assert proc.stdout.strip() == 'launch.interrupts', (proc.stdout, proc.stderr[-2000:])


# A compiled module's initialisation (its loader's exec_module) signalled from inside: raised
# there, the exception aborted the process (matplotlib's ft2font: a fatal error, SIGABRT).
IN_EXTENSION_INIT = '''
import importlib.machinery, os, signal, sys
from launch import interrupts
signal.signal(signal.SIGINT, signal.default_int_handler)
interrupts.install()
class Loader(importlib.machinery.ExtensionFileLoader):
  def exec_module(self, module):
    os.kill(os.getpid(), int(sys.argv[1]))
    sum(range(1000))  # handled here
    print('initialised', flush=True)
try:
  Loader('ext', 'ext.so').exec_module(None)
  print('main went on', flush=True)  # then ends at once: the deferred signal is still raised
finally:
  interrupts.disarm()
'''


@pytest.mark.parametrize('signum,code', [(signal.SIGINT, -signal.SIGINT),
                                         (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_a_signal_inside_a_compiled_modules_initialisation_is_raised_after_it(signum, code):
  proc = subprocess.run([sys.executable, '-c', IN_EXTENSION_INIT, str(signum)], cwd=ROOT,
                        capture_output=True, text=True, timeout=60,
                        env={**os.environ, 'PYTHONPATH': ROOT})
  assert proc.returncode == code, proc.stderr[-2000:]
  assert proc.stdout.split('\n')[0] == 'initialised', proc.stdout  # not cut inside it
  if signum == signal.SIGINT:
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith('interrupted (Ctrl-C) at <string>:')


def test_a_signal_the_process_was_started_ignoring_stays_ignored():
  """A shell's background job starts with SIGINT ignored; installing the handlers keeps it so."""
  code = ('import signal\nfrom launch import interrupts\ninterrupts.install()\n'
          'print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN, '
          'signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, 'PYTHONPATH': ROOT},
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
  assert out.stdout.split() == ['True', 'False'], out.stderr[-2000:]


def test_after_the_launchers_code_a_dropped_signal_is_not_sent_into_exits_clean_up(tmp_path):
  """Disarmed (the launcher's main has returned), a signal a finalizer dropped is not sent again:
  it would cut short atexit's clean-up (temporary folders left behind). The process exits by it
  once the clean-up is done."""
  code = ('import atexit, os, signal, sys, time\nfrom launch import interrupts\n'
          'signal.signal(signal.SIGINT, signal.default_int_handler)\n'
          'interrupts.install()\ninterrupts.disarm()\n'
          'def clean_up():\n  time.sleep(0.5)\n  open(sys.argv[1], "w").write("done")\n'
          'atexit.register(clean_up)\n'
          'class Finalized:\n  def __del__(self):\n'
          '    os.kill(os.getpid(), signal.SIGINT)\n    sum(range(1000))\n'
          'Finalized()\n')
  marker = tmp_path / 'cleaned'
  out = subprocess.run([sys.executable, '-c', code, str(marker)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={**os.environ, 'PYTHONPATH': ROOT})
  assert out.returncode == -signal.SIGINT and marker.read_text() == 'done', out.stderr[-2000:]



@pytest.mark.parametrize('signals,code', [((signal.SIGINT,), -signal.SIGINT),
                                          ((signal.SIGTERM,), 128 + signal.SIGTERM),
                                          ((signal.SIGINT, signal.SIGINT), -signal.SIGINT),
                                          ((signal.SIGTERM, signal.SIGTERM), -signal.SIGTERM)])
def test_a_signal_while_the_process_exits_waits_for_its_clean_up_then_exits_by_it(
    tmp_path, signals, code):
  """After the launcher's code, a signal in an atexit clean-up (JAX's, the removal of a temporary
  folder) lets it finish, without a traceback, and the process then exits as killed by it; a
  second signal stops it at once. Raised there, it cut the clean-up short with a traceback."""
  code_ = ('import atexit, os, signal, sys, time\nfrom launch import interrupts\n'
           'signal.signal(signal.SIGINT, signal.default_int_handler)\n'  # as from a terminal
           'interrupts.install()\ninterrupts.disarm()\n'
           'def clean_up():\n'
           '  for s in sys.argv[2:]:\n    os.kill(os.getpid(), int(s))\n    time.sleep(0.2)\n'
           '  open(sys.argv[1], "w").write("done")\n'
           'atexit.register(clean_up)\nprint("work done", flush=True)\n')
  marker = tmp_path / 'cleaned'
  out = subprocess.run([sys.executable, '-c', code_, str(marker), *map(str, signals)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, 'PYTHONPATH': ROOT})
  assert out.returncode == code, out.stderr[-2000:]
  assert out.stdout == 'work done\n' and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert marker.exists() == (len(signals) == 1)
  if signals[0] == signal.SIGINT:
    assert out.stderr.count('\n') == 1 and 'while exiting' in out.stderr, out.stderr
  else:
    assert out.stderr == ''


# A program whose compilation takes ~0.75 s (more under load), interrupted 0.1 s into it.
COMPILING = '''
import os, signal, sys, threading
import jax, jax.numpy as jnp
from launch import interrupts
interrupts.install()
def f(x):
  for i in range(30):
    x = jnp.tanh(x @ (x.T + i)) + jnp.sin(x * i)
  return x
jax.config.update('jax_enable_compilation_cache', False)  # compiled here, not read from a cache
lowered = jax.jit(f).lower(jnp.ones((8, 8)))
threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
import time
began = time.time()
lowered.compile()
print('compiled', time.time() - began > 0.15, flush=True)
start = time.time()
while time.time() - start < 60:
  pass
print('went on to the end')
'''


def test_ctrl_c_while_xla_compiles_stops_after_the_compilation_without_a_crash():
  """Raised inside JAX's compile call, KeyboardInterrupt crashed the process (a segmentation
  fault); the handler sends it again until the compilation is over, and the process stops there,
  as killed by SIGINT, with one line."""
  out = subprocess.run([sys.executable, '-c', COMPILING], cwd=ROOT, capture_output=True,
                       text=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': ROOT, 'XLA_FLAGS': ''},
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  assert out.returncode == -signal.SIGINT, out.stderr[-3000:]
  # The signal came during the compilation (it took longer than the timer's 0.1 s).
  assert out.stdout.split() == ['compiled', 'True'], (out.stdout, out.stderr[-2000:])
  assert 'interrupted (Ctrl-C) at <string>:' in out.stderr


def test_a_signal_inside_jax_compile_code_is_deferred_elsewhere_raised(monkeypatch):
  """The handler raises KeyboardInterrupt in the launcher's code, but defers (sends again later)
  inside JAX's compiler, its cache, and pxla's `from_hlo` (bare `except:` clauses there swallowed
  the interrupt: 2 of 12 Ctrl-Cs at compile time were lost), until the compilation is over or the
  user signals a second time."""
  from launch import interrupts  # pylint: disable=g-import-not-at-top
  resent = []
  monkeypatch.setattr(interrupts, '_resend', resent.append)
  monkeypatch.setattr(interrupts, '_armed', [True])  # in the launcher's code
  def call_from(path, name):
    namespace = {}
    exec(compile(f'def {name}(handler, frame):\n  return handler(2, frame())\n', path, 'exec'),
         namespace)
    return namespace[name](interrupts._handler, sys._getframe)
  compiling = os.path.join('x', 'jax', '_src', 'compiler.py')
  for path, name in ((compiling, 'anything'),
                     (os.path.join('x', 'jax', '_src', 'compilation_cache.py'), 'put'),
                     (os.path.join('x', 'jax', '_src', 'interpreters', 'pxla.py'), 'from_hlo')):
    monkeypatch.setattr(interrupts, '_deferred', [False])  # a first Ctrl-C
    assert call_from(path, name) is None
  assert resent == [signal.SIGINT] * 3
  monkeypatch.setattr(interrupts, '_sent', [1])  # the one sent again: deferred again
  assert call_from(compiling, 'anything') is None and interrupts._sent == [0]
  with pytest.raises(KeyboardInterrupt):  # the user's second Ctrl-C: raised at once
    call_from(compiling, 'anything')
  assert resent == [signal.SIGINT] * 4 and interrupts._deferred == [False]
  for path, name in ((os.path.join('x', 'jax', '_src', 'interpreters', 'pxla.py'), 'execute'),
                     (os.path.join('x', 'datarater', 'meta_train.py'), '_run')):
    with pytest.raises(KeyboardInterrupt):
      call_from(path, name)


def test_a_signal_raised_before_its_resend_is_not_sent_again(monkeypatch):
  """A Ctrl-C deferred (in a gc callback), then a second one raised in the launcher's code: the
  timer of the first sent it again into the clean-up the second had started."""
  from launch import interrupts  # pylint: disable=g-import-not-at-top
  sent = []
  monkeypatch.setattr(os, 'kill', lambda pid, signum: sent.append(signum))
  monkeypatch.setattr(interrupts, '_armed', [True])
  monkeypatch.setattr(interrupts, '_sent', [0])
  monkeypatch.setattr(interrupts, '_pending', [signal.SIGINT])  # deferred, its timer running
  interrupts._fire(signal.SIGINT)  # pylint: disable=protected-access
  assert sent == [signal.SIGINT]
  with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C, raised at once
    interrupts._raise(signal.SIGINT)  # pylint: disable=protected-access
  interrupts._fire(signal.SIGINT)  # pylint: disable=protected-access  (the first's timer)
  assert sent == [signal.SIGINT] and interrupts._sent == [1]  # pylint: disable=protected-access


def test_the_unraisable_hooks_install_once_in_either_order(monkeypatch):
  """launch.interrupts' resender and checkpointing's closed-loop filter each wrap
  sys.unraisablehook once, whichever comes first and however often launchers run in a process;
  the filter drops only tensorstore's 'Event loop is closed' and passes the rest on."""
  import types  # pylint: disable=g-import-not-at-top
  from datarater import checkpointing  # pylint: disable=g-import-not-at-top
  from launch import interrupts  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(signal, 'signal', lambda *_: None)  # this test's process keeps its handlers
  monkeypatch.setattr(interrupts, '_installed', [True])  # and its atexit callbacks
  monkeypatch.setattr(sys, 'excepthook', sys.excepthook)
  for first, second in [(interrupts.install, checkpointing._drop_closed_loop_noise),
                        (checkpointing._drop_closed_loop_noise, interrupts.install)]:
    seen = []
    base = seen.append
    monkeypatch.setattr(sys, 'unraisablehook', base)
    for _ in range(3):
      first(), second()
    interrupts.disarm()
    depth, hook = 0, sys.unraisablehook
    while hook is not base:
      depth += 1
      hook = next(c.cell_contents for c in hook.__closure__ if callable(c.cell_contents)
                  and c.cell_contents is not hook)
    assert depth == 2
    noise, other = RuntimeError('Event loop is closed'), RuntimeError('something else')
    for e in (noise, other):
      sys.unraisablehook(types.SimpleNamespace(exc_value=e, err_msg=None, object=None))
    assert [u.exc_value for u in seen] == [other]


# One jax.distributed process that sends itself SIGTERM once started.
IN_DISTRIBUTED = '''
import os, signal, sys, time
from absl import flags
from launch import distributed, interrupts
interrupts.install()
distributed.define_flags()
flags.FLAGS([sys.argv[0], f'--coordinator_address=127.0.0.1:{sys.argv[1]}', '--num_processes=1',
             '--process_id=0'])
distributed.initialize_from_flags()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(2)
print('went on to the end', flush=True)
'''


def test_sigterm_stops_a_jax_distributed_process():
  """jax.distributed's preemption notifier takes SIGTERM over and only logs it: a
  multi-process run went on when killed with SIGTERM."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  proc = forked.call(_exec, IN_DISTRIBUTED, [str(port)], timeout=120,
                     env={**os.environ, 'PYTHONPATH': ROOT})
  assert 'went on to the end' not in proc.stdout, proc.stderr[-2000:]
  assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
