"""Progress bars and lines a person can follow on a terminal and in a log file.

`bar(...)` takes `tqdm`'s arguments. On a terminal it is tqdm's bar on stderr, redrawn in place;
when stderr is a file or a pipe (a job's log) tqdm's carriage-return redraws would pile up on one
line that ends only when the bar does, so there it writes one plain line at most every
`LOG_INTERVAL_S` seconds, and one when the bar closes, to stdout with the run's other progress
lines (stderr keeps only errors: one line for bad input). `setup_logging()` puts those lines,
the library's log 'datarater' (info and warnings), there too.
"""
import logging
import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
  """A stream for tqdm that turns each redraw into a line of its own."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> None:
    text = text.replace('\r', '').strip()
    if text:
      self.stream.write(text + '\n')

  def flush(self) -> None:
    self.stream.flush()


def bar(**kwargs) -> tqdm:
  if kwargs.get('disable') or sys.stderr.isatty():
    return tqdm(**kwargs)
  kwargs['leave'] = True  # a bar that clears itself would leave only its first line in a log
  # miniters=1: the time alone decides (tqdm's own count of updates between lines is fitted to
  # the rate, so when the rate falls it prints lines seconds apart after a long gap).
  return tqdm(file=_Lines(sys.stdout), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S,
              miniters=1, ascii=True, **kwargs)


log = logging.getLogger('datarater')


class _Stdout(logging.StreamHandler):
  """A handler that writes to whatever `sys.stdout` is when a line is logged."""

  @property
  def stream(self):
    return sys.stdout

  @stream.setter
  def stream(self, value):
    del value


def setup_logging() -> None:
  """The library's log lines (info and warnings) on stdout, library chatter (orbax, TFDS) off:
  each run behind a launcher (rater runs, valuations) calls it."""
  if not log.handlers:
    handler = _Stdout()
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
