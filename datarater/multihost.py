"""What the processes of a `jax.distributed` run decide together.

A choice one process makes alone (is the workdir free? does this checkpoint read?) must be the
same on every process, or they part ways and wait forever in the next collective. In a single
process nothing here runs a collective and the process's own answer stands (`workdir_lock` still
takes the lock; `StopVote` still holds Ctrl-C and SIGTERM until the step ends).
"""
import contextlib
import functools
import hashlib
import itertools
import json
import os
import signal
import time
from typing import Callable

import jax
import numpy as np

from datarater import files
from datarater.errors import UserError


def allgather(a: np.ndarray) -> np.ndarray:
  """[P, ...]: every process's `a`, bit for bit (8-byte values travel as uint32 pairs, since JAX
  without x64 would round float64 to float32 and int64 to int32)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  a = np.ascontiguousarray(a)
  if a.dtype.itemsize == 8:
    return np.asarray(multihost_utils.process_allgather(a.view(np.uint32))).view(a.dtype)
  return np.asarray(multihost_utils.process_allgather(a))


EXCHANGE_VALUES = 1 << 22  # values of one array gathered from all processes at once


def exchange_blocks(n: int, block: int, arrays) -> tuple:
  """Arrays over a split's `n` examples, each process having filled its own blocks (block b is
  process b % P's) -> the whole arrays, the same on every process. Gathered a slice at a time:
  P copies of a slice, not of the split, are held at once."""
  num = jax.process_count()
  out = tuple(np.empty_like(a) for a in arrays)
  step = max(1, EXCHANGE_VALUES // num)
  for start in range(0, n, step):
    rows = np.arange(start, min(start + step, n))
    owner = (rows // block) % num
    for a, whole in zip(arrays, out):
      whole[rows] = allgather(a[rows])[owner, rows - start]  # [P, slice] gathered
  return out


def agree(ok: bool) -> bool:
  """True on every process if `ok` is true on every process."""
  if jax.process_count() == 1:
    return bool(ok)
  return bool(np.all(allgather(np.asarray([ok], np.int32))))


@contextlib.contextmanager
def together(what: str):
  """Runs the block on every process; an error raised in it on any process stops every process
  once all have run it (the others with a UserError naming the process that failed), and so does
  a Ctrl-C or SIGTERM to any process (`StopVote`: the agreed signal, as the block ends), so none is
  left waiting alone in a collective, nor at exit (where JAX aborts a job whose processes end over
  300 s apart), however long the block takes on one. The block itself must run no collective. In
  a job of one process it is the block alone (a signal stops it at once)."""
  if jax.process_count() == 1:
    yield
    return
  with StopVote(jax.devices(), 0, what=what):
    yield


def same_everywhere(digest: str) -> bool:
  """True on every process if every process holds the same hex `digest` (e.g. of what each
  loaded from a path another job may be rewriting)."""
  if jax.process_count() == 1:
    return True
  mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
  return bool(np.all(allgather(mine) == mine[None]))


def check_same_settings(settings: dict) -> None:
  """UserError on every process, naming the first setting (name -> JSON-able value) that not
  every process holds alike: the processes of one job must run one computation."""
  if jax.process_count() == 1:
    return
  digest = lambda x: np.frombuffer(hashlib.sha256(
      json.dumps(x, sort_keys=True, default=repr).encode()).digest()[:8], np.uint8)
  names = sorted(settings)
  if not same_everywhere(digest(names).tobytes().hex()):  # then each gathers as many digests
    raise UserError('the processes of this job hold different settings (another --config file '
                    'or launcher?): give every process the same flags')
  gathered = allgather(np.stack([digest([n, settings[n]]) for n in names] or
                                [np.zeros(8, np.uint8)]))
  for i, name in enumerate(names):
    if not np.all(gathered[:, i] == gathered[0, i]):
      raise UserError(f'the processes of this job were given different {name} (this process, '
                      f'{jax.process_index()}: {settings[name]!r}): give every process the same '
                      'flags')


_voting = [0]  # the processes the running StopVote loop spans (0: none runs)
_asked = [0]  # the signal (SIGINT or SIGTERM) that came to this process while it ran
_ctrl_c = [False]  # a SIGINT came to this process while it ran
_FAILED = 1 << 10  # the vote of process p that left the loop by an error: _FAILED + p


def ask_to_stop(signum: int) -> bool:
  """For a SIGINT or SIGTERM handler: True if a `StopVote` loop runs, which then stops every
  process of the job after one step (the handler need do nothing more); False: stop as usual, as
  for a second Ctrl-C to a job of one process (in several, a process stopped alone would wait at
  exit for the others: every Ctrl-C waits for the vote)."""
  if not _voting[0] or signum == signal.SIGINT and _ctrl_c[0] and _voting[0] == 1:
    return False
  _asked[0] = max(_asked[0], signum)
  _ctrl_c[0] = _ctrl_c[0] or signum == signal.SIGINT
  return True


class StopVote:
  """Ctrl-C or SIGTERM to any process of a loop (training steps, blocks of examples scored) stops
  every process after the same step (in several, a process stopped alone leaves the others
  waiting in the next collective; loops of unequal length vote as often: `in_rounds`). After
  each step every process casts the signal it was asked to stop by (`ask_to_stop`; 0: none),
  max-reduced over all devices in a program queued behind the step, and reads the result: every
  process reads the same votes after the same step, so `after(done)` is True on all or none (and
  each step finishes before the next is queued). Leaving the block normally, the processes vote
  once more (a signal after the last step's vote, e.g. while its checkpoint is written), on the
  last step given to `after` (`step`, where the loop starts, if none). A process whose loop
  stopped so calls `on_stop(step, signum)` and is sent the agreed signal again (SIGTERM where any
  process had one): its handler then stops it as usual; so is one asked while the block ends by an
  exception, with its own. A process that leaves the block by an error casts one more vote, for
  its error, and every other process stops at that vote with a UserError naming it (it would
  otherwise wait in its next vote for good): so between two votes a process may run no collective
  after work that can fail on it alone (end that work in `together`). Around a stage without
  steps or collectives (every process fitting alone, process 0 writing the output while the others
  wait) the block's own votes stop every process as it ends, by an error or a signal to any; the
  last vote is cast twice, so that a signal that came while a process waited in it for the others
  counts too. Votes nest: an inner block's agreed signal goes to the enclosing vote. In one
  process the vote is its own signal, read without a program."""

  def __init__(self, devices, step: int,
               on_stop: Callable[[int, int], None] = lambda step, signum: None, what: str = ''):
    self._processes, self.stopped_at, self.signum, self._step, self._on_stop = (
        jax.process_count(), None, 0, step, on_stop)
    self._what = f' {what}' if what else ''  # the stage, for the others' error line
    self._voting_now = self._failed = False
    if self._processes > 1:
      self._sharding, self._local, self._max = _vote_program(tuple(np.asarray(devices).flat))

  def __enter__(self):
    self._outer = (_voting[0], _asked[0], _ctrl_c[0])  # of an enclosing vote (none: 0, 0, False)
    _voting[0], _asked[0], _ctrl_c[0] = self._processes, 0, False
    return self

  def __exit__(self, exc_type, *exc_info):
    try:
      if exc_type is None:  # every process got here: the last vote, twice in several (a signal
        self.after(self._step)  # that came while this one waited in it for the others counts)
        if self._processes > 1:
          self.after(self._step)
      elif (self._processes > 1 and issubclass(exc_type, Exception) and not self._failed
            and not self._voting_now):  # (not an error of the vote itself)
        self._vote(_FAILED + jax.process_index())  # the others stop at this vote
      if self.stopped_at is not None:
        self._on_stop(self.stopped_at, self.signum)
    finally:
      signum = self.signum or _asked[0]
      _voting[0], _asked[0], _ctrl_c[0] = self._outer  # an enclosing vote takes the signal
      if signum:
        os.kill(os.getpid(), signum)

  def after(self, done: int) -> bool:
    """After step `done` is queued: True if every process stops here (then at every later call)."""
    self._step = done
    if self.stopped_at is None:
      self.signum = self._vote(_asked[0])
      if self.signum >= _FAILED:
        failed, self.signum, self._failed = self.signum - _FAILED, 0, True
        raise UserError(f'process {failed} of this job stopped{self._what} (its error line says '
                        'why)')
      if self.signum:
        self.stopped_at = done
    return self.stopped_at is not None

  def _vote(self, vote: int) -> int:
    """The largest of the processes' votes (this process's own in a job of one)."""
    if self._processes == 1:
      return vote
    self._voting_now = True
    votes = jax.make_array_from_process_local_data(
        self._sharding, np.full(self._local, vote, np.int32), (self._sharding.mesh.size,))
    largest = int(np.asarray(self._max(votes).addressable_data(0)))
    self._voting_now = False
    return largest


@functools.lru_cache(maxsize=None)
def _vote_program(devices: tuple):
  """(sharding of one vote per device, this process's devices, the compiled max of the votes):
  one per device set, so the votes of every `StopVote` and `together` over it (a rater run votes
  at each logged step) share one program."""
  mesh = jax.sharding.Mesh(np.asarray(devices), ('devices',))
  local = [d.process_index for d in devices].count(jax.process_index())
  return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('devices')), local,
          jax.jit(jax.numpy.max, out_shardings=jax.sharding.NamedSharding(
              mesh, jax.sharding.PartitionSpec())))


def in_rounds(items, count: int):
  """This process's `count` `items`, then None until every process has had as many rounds as the
  one with the most: a loop over each process's own blocks that votes after each round
  (`StopVote.after`) votes as often on every process."""
  most = count
  if jax.process_count() > 1:
    most = int(np.max(allgather(np.asarray([count], np.int64))))
  return itertools.chain(items, itertools.repeat(None, most - count))


def barrier(name: str) -> None:
  """Waits until every process gets here."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def workdir_lock(path: str):
  """`files.workdir_lock`, taken by process 0 for the run; if process 0 cannot take it, every
  process stops with a UserError (process 0 with the one naming the holder), and so does every
  process if one does not see the folder that process 0 locked (`_check_shared`)."""
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(files.workdir_lock(path))
      except Exception as e:  # pylint: disable=broad-except  (re-raised below, after agreeing)
        error = e
    if not agree(error is None):
      raise error or UserError(f'--workdir {path!r} could not be locked by process 0 (see its '
                               'error)')
    _check_shared(path)
    yield path


SHARED_WAIT_S = 60.0  # how long a process looks for process 0's file (NFS caches lookups ~60 s)


def _check_shared(path: str) -> None:
  """UserError on every process unless each sees, within SHARED_WAIT_S, a file that process 0
  made in `path`: the workdir must be one folder on a shared file system. (On each host's own
  disk, process 0's checkpoints and merged scores miss the others' files: the processes wait
  for each other for good.)"""
  if jax.process_count() == 1:
    return
  token = allgather(np.frombuffer(os.urandom(8), np.uint8))[0].tobytes().hex()  # process 0's
  marker = os.path.join(path, f'.shared.tmp-{token}')  # (left by a kill: removed at next lock)
  try:
    with together('writing in the workdir'):
      if jax.process_index() == 0:
        open(marker, 'x').close()  # pylint: disable=consider-using-with
    with together('looking in the workdir'):  # (a signal while one looks stops every process)
      deadline = time.monotonic() + SHARED_WAIT_S
      while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    blind = np.flatnonzero(allgather(np.asarray([os.path.exists(marker)], np.int32))[:, 0] == 0)
    if len(blind):
      raise UserError(f'--workdir {path!r} is not one folder shared by every process (process '
                      f'{", ".join(map(str, blind))} cannot see a file process 0 made in it): '
                      'give every process a folder on a shared file system, at the same path')
  finally:
    if jax.process_index() == 0:
      with contextlib.suppress(OSError):
        os.remove(marker)
