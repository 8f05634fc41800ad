"""Ctrl-C and SIGTERM that always stop a launcher.

Python drops (prints, then ignores) an exception raised inside a garbage-collector callback, and
JAX registers one: an interrupt handled during a collection was lost and the run went on. Here
a signal handled inside such a callback is sent again a moment later, to be raised in the
launcher's own code. SIGTERM (a scheduler's kill) ends a run as Ctrl-C does: temporary files and
folders are removed on the way out (exit code 128 + 15).
"""
import gc
import os
import signal
import sys
import threading

RESEND_S = 0.05


def _in_gc_callback(frame) -> bool:
  codes = {getattr(callback, '__code__', None) for callback in gc.callbacks}
  while frame is not None:
    if frame.f_code in codes:
      return True
    frame = frame.f_back
  return False


def _handler(signum, frame) -> None:
  if _in_gc_callback(frame):
    threading.Timer(RESEND_S, os.kill, (os.getpid(), signum)).start()
  elif signum == signal.SIGINT:
    raise KeyboardInterrupt
  else:
    sys.exit(128 + signum)


def install() -> None:
  """Handles SIGINT and SIGTERM as above (from the main thread, as every Python handler); a
  signal the process was started ignoring (SIGINT in a shell's background job) stays ignored."""
  for signum in (signal.SIGINT, signal.SIGTERM):
    if signal.getsignal(signum) != signal.SIG_IGN:
      signal.signal(signum, _handler)
