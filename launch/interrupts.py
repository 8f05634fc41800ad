"""Ctrl-C and SIGTERM that always stop a launcher.

Python drops (prints, then ignores) an exception raised inside a garbage-collector callback (JAX
registers one), a `__del__` or a weakref callback: an interrupt handled there is lost and the
run goes on; one raised while JAX compiles, or while a compiled module initialises, crashes the
process. Here a signal handled inside a gc callback, a compilation or such an initialisation, or
whose exception such code dropped, is sent again a moment later (again until the compilation is
over, unless the user signals again), to be raised in the launcher's own code, or when it ends
(`disarm`). Python runs handlers between bytecodes only: a signal that comes while XLA's
compiler itself runs is handled when it returns. SIGTERM (a scheduler's kill) ends a run as
Ctrl-C does: temporary files and folders are removed on the way out (exit code 128 + 15). In a
rater run's outer loop either stops every process after the step they agree on (checkpointed),
in launch.valuate's and launch.filter's scoring after the block; in launch.train one that comes
while a checkpoint is written stops the run once the checkpoint is (`multihost.StopVote`), and
over several processes every process after the chunk of steps they agree on. In a
job of one process a second Ctrl-C stops it at once. Ctrl-C ends with one line saying where,
not a traceback. A signal while the process exits, its launcher's code done, lets exit's clean-up
finish, then exits by it; a second stops it at once.
"""
import atexit
import gc
import importlib.machinery
import os
import signal
import sys
import threading
import traceback

RESEND_S = 0.05
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_in_hook = [0]  # > 0 while the unraisable hook runs: what it raises would be dropped too
_armed = [False]  # from `install` until `disarm`: the launcher's own code runs
_sent = [0]  # signals sent again by this module, not yet handled
_deferred = [False]  # a signal is being sent again until a compilation is over
_pending = [0]  # the signal being sent again, not yet raised (0: none)
_installed = [False]  # `_exit_by_signal` is registered
_exiting = [0]  # a signal that came after `disarm`, while the process exits (0: none)


def _in_gc_callback(frame) -> bool:
  codes = {getattr(callback, '__code__', None) for callback in gc.callbacks}
  while frame is not None:
    if frame.f_code in codes:
      return True
    frame = frame.f_back
  return False


_JAX = os.path.join('jax', '_src', '')
COMPILING = tuple(_JAX + f for f in ('compiler.py', 'compilation_cache.py'))
EXECUTABLE = os.path.join(_JAX, 'interpreters', 'pxla.py')


def _in_compile(frame) -> bool:
  """Inside JAX's compilation (from the lowered program to the loaded executable, its on-disk
  cache included): an exception raised while XLA compiles crashes the process (a segmentation
  fault, not exit code 130); the executable's layouts and shardings are read under bare
  `except:` clauses that swallow it; a cache entry could be left half-written."""
  while frame is not None:
    code = frame.f_code
    if code.co_filename.endswith(COMPILING) or (code.co_name == 'from_hlo'
                                                and code.co_filename.endswith(EXECUTABLE)):
      return True
    frame = frame.f_back
  return False


def _in_extension_init(frame) -> bool:
  """Inside a compiled module's initialisation (e.g. matplotlib's ft2font, imported lazily): an
  exception raised there aborts the process (a fatal error, SIGABRT)."""
  while frame is not None:
    if frame.f_code.co_name in ('create_module', 'exec_module') and isinstance(
        frame.f_locals.get('self'), importlib.machinery.ExtensionFileLoader):
      return True
    frame = frame.f_back
  return False


def _fire(signum: int) -> None:
  if _armed[0] and _pending[0] == signum:  # not raised meanwhile (by a second Ctrl-C)
    _sent[0] += 1
    os.kill(os.getpid(), signum)


def _resend(signum: int) -> None:
  _pending[0] = signum
  timer = threading.Timer(RESEND_S, _fire, (signum,))
  timer.daemon = True  # exit does not wait for it
  timer.start()


def _handler(signum, frame) -> None:
  again = _sent[0] > 0  # one this module sent itself
  _sent[0] -= again
  if again and not _armed[0]:  # sent just before `disarm`, which raised it
    return
  if not _armed[0]:
    _while_exiting(signum)
    return
  if _stops_at_an_agreed_step(signum):
    if _pending[0] == signum:  # one being sent again: the vote has it now
      _pending[0] = 0
    _deferred[0] = signum == signal.SIGINT  # a second Ctrl-C it lets through stops at once
    return
  if _in_hook[0] or _in_gc_callback(frame):
    _resend(signum)
  elif ((_in_compile(frame) or _in_extension_init(frame))
        and (again or not _deferred[0])):  # a second Ctrl-C stops at once
    _deferred[0] = True
    _resend(signum)
  else:
    _raise(signum)


def _stops_at_an_agreed_step(signum: int) -> bool:
  """A training loop runs that stops every process after the same step
  (`datarater.multihost.StopVote`, which sends the signal again once it has). Not imported here:
  this module is installed before JAX loads."""
  multihost = sys.modules.get('datarater.multihost')
  return multihost is not None and multihost.ask_to_stop(signum)


def _raise(signum: int) -> None:
  _deferred[0], _pending[0] = False, 0
  if signum == signal.SIGINT:
    raise KeyboardInterrupt
  sys.exit(128 + signum)


def _while_exiting(signum: int) -> None:
  """A signal after the launcher's code: raised, it would cut short the exit's clean-up (an
  atexit callback, e.g. the removal of a temporary folder) with a traceback. Clean-up finishes
  first and the process then exits by it (`_exit_by_signal`); a second signal stops it at once."""
  if _exiting[0]:
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return
  _exiting[0] = signum
  if signum == signal.SIGINT:
    print('interrupted (Ctrl-C) while exiting: its clean-up finishes first (Ctrl-C again stops '
          'at once)', file=sys.stderr)


def _exit_by_signal() -> None:
  """The last atexit callback (registered by `install`, before any other module's): a process
  signalled while it exited exits as it would have in its run: killed by SIGINT, or 128 + 15."""
  signum = _exiting[0]
  if signum:
    for stream in (sys.stdout, sys.stderr):
      stream.flush()
    if signum == signal.SIGINT:
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
    os._exit(128 + signum)


def _dropped(previous):
  def hook(unraisable) -> None:
    _in_hook[0] += 1
    try:
      exc = unraisable.exc_value
      if not _armed[0] or (unraisable.err_msg or '').startswith('Exception ignored in atexit'):
        previous(unraisable)  # the run is over: exit's own clean-up goes on
      elif isinstance(exc, KeyboardInterrupt):
        _resend(signal.SIGINT)
      elif isinstance(exc, SystemExit) and exc.code == 128 + signal.SIGTERM:
        _resend(signal.SIGTERM)
      else:
        previous(unraisable)
    finally:
      _in_hook[0] -= 1
  hook.__dict__.update(getattr(previous, '__dict__', {}))  # the markers of hooks below it
  hook.resends = True
  return hook


def _one_line(previous):
  """sys.excepthook: an uncaught KeyboardInterrupt prints one line (the last line of this
  codebase it went through), not a traceback; Python still exits as killed by SIGINT."""
  def hook(exc_type, exc, tb) -> None:
    if not issubclass(exc_type, KeyboardInterrupt):
      return previous(exc_type, exc, tb)
    frames = [f for f in traceback.extract_tb(tb) if f.filename != __file__]  # not the handler
    ours = [f for f in frames if f.filename.startswith(_ROOT)] or frames  # the codebase's line
    where = f' at {ours[-1].filename}:{ours[-1].lineno}' if ours else ''
    print(f'interrupted (Ctrl-C){where}', file=sys.stderr)
  hook.one_line = True
  return hook


def install() -> None:
  """Handles SIGINT and SIGTERM as above (from the main thread, as every Python handler); a
  signal the process was started ignoring (SIGINT in a shell's background job) stays ignored."""
  if not _installed[0]:
    atexit.register(_exit_by_signal)
    _installed[0] = True
  _armed[0] = True  # before the handlers: one at once is not taken for one while exiting
  for signum in (signal.SIGINT, signal.SIGTERM):
    if signal.getsignal(signum) != signal.SIG_IGN:
      signal.signal(signum, _handler)
  if not getattr(sys.unraisablehook, 'resends', False):  # once, however often it is called
    sys.unraisablehook = _dropped(sys.unraisablehook)
  if not getattr(sys.excepthook, 'one_line', False):
    sys.excepthook = _one_line(sys.excepthook)


def disarm() -> None:
  """The launcher's code is done: a dropped signal is no longer sent again (it would interrupt
  exit's clean-up, e.g. the removal of temporary folders). One that came while the launcher's
  code ran and is still being sent again is raised here: the run stops as it would have. One
  that comes later waits for exit's clean-up (`_while_exiting`)."""
  _armed[0] = False
  if _pending[0]:
    _raise(_pending[0])
