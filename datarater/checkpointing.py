"""Orbax checkpoints of a run, tied to the config that made them.

A workdir holds `checkpoints/<step>/` (orbax: the whole training state plus a JSON record of the
data position, the config fingerprint and the inputs' digests). A run started
on a workdir whose checkpoint came from a different config stops with a one-line error before it
writes anything. Fields that do not change the training trajectory (run length, logging, paths)
may differ, so a finished run can be extended; a run's own checkpointer adds to them (the
config sections it does not read) or narrows them (a cosine schedule fixes `outer.steps`). A
checkpoint that cannot be read (truncated, flipped bits, garbled metadata) is passed over with a
one-line warning for the newest intact one; if none can be read, the run stops with one line
and nothing written. Each checkpoint records checksums of its arrays (`checksums`): files damaged
so that they still decode (a flipped bit in compressed data read as another value) are
unreadable too. Inputs the config names by path only (a `dataset_dir`, a scores file, a
rater) are digested into each checkpoint, and a resume with other contents there is refused.
"""
import collections
import contextlib
import itertools
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
import warnings
from typing import Any, NamedTuple, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from datarater import files, multihost
from datarater.errors import UserError
from datarater.mesh import spans_processes

log = logging.getLogger('datarater')

# Fields added to the configs after checkpoints were written without them, at the value that
# behaves as their absence did: such a checkpoint still matches.
ADDED_FIELDS = {f'{section}.{name}': '' for section in ('task', 'rater', 'features.task')
                for name in ('input', 'label')}
ADDED_FIELDS.update({'task.token_weights': '', 'rater.causal': False})
# Added fields left out of a run's record at that value (`trajectory_fields`): a config holding
# one there and a config without it record the same, so hash to one valuation fingerprint.
UNRECORDED_AT_DEFAULT = tuple(f'{section}.{name}' for section in ('task', 'rater', 'features.task')
                              for name in ('dtype', 'param_dtype'))
ADDED_FIELDS.update({field: '' for field in UNRECORDED_AT_DEFAULT})
# Config fields a resumed run may change: they do not alter the state at a given step.
NON_TRAJECTORY_FIELDS = ('outer.steps', 'log_every', 'checkpoint_every', 'final_eval',
                         'data.data_dir')


def _flatten(d: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def trajectory_fields(config: ml_collections.ConfigDict,
                      free_fields: tuple[str, ...] = NON_TRAJECTORY_FIELDS) -> dict[str, Any]:
  """The flattened config minus `free_fields` and the UNRECORDED_AT_DEFAULT fields at their
  default (JSON-normalised: tuples become lists)."""
  flat = _flatten(json.loads(config.to_json()))
  return _without({k: v for k, v in flat.items()
                   if not (k in UNRECORDED_AT_DEFAULT and v == ADDED_FIELDS[k])}, free_fields)


def _without(flat: dict[str, Any], free_fields: tuple[str, ...]) -> dict[str, Any]:
  return {k: v for k, v in flat.items()
          if not any(k == f or k.startswith(f + '.') for f in free_fields)}


def unread_sections(config: ml_collections.ConfigDict, read: tuple[str, ...]) -> tuple[str, ...]:
  """The config's sections (top-level ConfigDicts) not in `read`: free fields of a run that reads
  only `read`, so a setting added to another section leaves its checkpoints resumable."""
  return tuple(k for k in sorted(config.keys())
               if isinstance(config[k], ml_collections.ConfigDict) and k not in read)


def config_differences(theirs: dict, ours: dict, fields=None, added=None) -> list[str]:
  """'field=X there, Y here' for each of `fields` (default: every field of either flattened
  config) whose values differ; a field an older record lacks counts as its ADDED_FIELDS default
  (or its default in `added`, e.g. a policy's own fields: `policies.defaults`)."""
  added = {**ADDED_FIELDS, **(added or {})}
  shown = lambda config, k: (repr(config[k]) if k in config else repr(ADDED_FIELDS[k])
                             if k in UNRECORDED_AT_DEFAULT else '(not recorded)')  # free, or older
  value = lambda config, k: config.get(k, added.get(k))
  fields = sorted(set(theirs) | set(ours)) if fields is None else fields
  return [f'{k}={shown(theirs, k)} there, {shown(ours, k)} here' for k in fields
          if value(theirs, k) != value(ours, k)]


def _why(error: Exception) -> str:
  return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


UNAWAITED_METADATA_READ = r"coroutine 'Store\._get_array_metadatas' was never awaited"


def _drop_closed_loop_noise() -> None:
  """Drops the 'Event loop is closed' errors that tensorstore reports as unraisable (a traceback
  each on stderr, some after the call returns) when orbax gives up reading a damaged checkpoint,
  and asyncio's reports of its read errors left in other tasks; others go to the hook in place.
  Installed once, at the first read or save (a hook that wraps it keeps its marker:
  launch.interrupts').
  Also ignores the RuntimeWarning that one of orbax's metadata reads was never awaited (seen
  after a damaged checkpoint's read failed), printed whenever the garbage collector finds one."""
  warnings.filterwarnings('ignore', UNAWAITED_METADATA_READ, RuntimeWarning)  # idempotent
  hook = sys.unraisablehook
  if getattr(hook, 'drops_closed_loop_noise', False):
    return

  def dropping(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'):
      hook(unraisable)
  dropping.__dict__.update(getattr(hook, '__dict__', {}))  # the markers of hooks below it
  dropping.drops_closed_loop_noise = True
  sys.unraisablehook = dropping
  logging.getLogger('asyncio').addFilter(_unretrieved_tensorstore_error)


def _unretrieved_tensorstore_error(record: logging.LogRecord) -> bool:
  """False for asyncio's '(Task|Future) exception was never retrieved' report of a tensorstore
  error or of one raised in orbax's code (a traceback on stderr, some after the call returns):
  orbax reads the arrays of a damaged checkpoint, or writes a checkpoint's files, in several
  tasks and raises the first error, which the caller reports (a full disk failed the others'
  writes too); and for its 'Task was destroyed but it is pending!' of an orbax task left when a
  save failed."""
  error = record.exc_info[1] if record.exc_info else None
  first, *rest = str(record.msg).split('\n', 1)
  in_orbax = error is not None and any(f'{os.sep}orbax{os.sep}' in frame.filename
                                       for frame in traceback.extract_tb(error.__traceback__))
  return not (first.endswith('exception was never retrieved')
              and ('tensorstore_spec' in str(error) or in_orbax)
              or first == 'Task was destroyed but it is pending!'
              and f'{os.sep}orbax{os.sep}' in ''.join(rest))


_BACKGROUND_SAVE_REPORT = re.compile(
    r'_SignalingThread\.run\(\) raised an exception|in background save thread'
    r'|Save Finalize thread .*failed|Failed to write metadata=')


def _background_save_report(record: logging.LogRecord) -> bool:
  """False for orbax's error logs (each with a traceback) of a save that failed in its background
  threads, or of a checkpoint's metadata file it could not write, e.g. on a full disk: orbax
  raises that error again in the caller's next save, wait or close, which reports it in one line.
  A failure of this process's part of a multi-process save is also made known to the other
  processes here (`_SaveBarrier.fail`): orbax logs it in the failed thread, before that process
  skips the barriers the others wait in."""
  if not (record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname and
          _BACKGROUND_SAVE_REPORT.search(str(record.msg)) is not None):
    return True
  error = record.exc_info[1] if record.exc_info else None
  if error is not None and not isinstance(error, _AnotherProcessFailed):
    for barrier in list(_SaveBarrier.saving):  # (the one whose folder the report names)
      if f'{barrier.directory}{os.sep}' in record.getMessage():
        barrier.fail(error)
  return False


class _AnotherProcessFailed(RuntimeError):
  """Raised in orbax's save threads of every process when one process's part of a save failed."""

  def __init__(self, process: int):
    super().__init__(f'process {process} of this job could not write its part of a checkpoint')
    self.process = process


class _SaveBarrier:
  """orbax's barrier for the saves of one `RunCheckpointer` across the processes of a job
  (`AsyncOptions.barrier_sync_fn`), which every process leaves as soon as any process's part of a
  save has failed. With orbax's own barrier (the coordinator's), a process whose shards failed to
  write (a full disk) waits in one barrier for the others' finalizing while they wait in
  another for its write, each up to orbax's timeout (20 min), then all end in tracebacks. Each
  process counts itself in at a barrier (a counter in the coordinator's key-value store, one per
  call of a barrier name) and waits until every process has, or one has marked its save failed
  (`fail`), then raises `_AnotherProcessFailed` (orbax ends that save there and raises it again
  in the next save, wait or close).

  Every process makes the same RunCheckpointers in the same order: the number of those made
  before names the keys of one (not its folder's path, which may differ between hosts that mount
  one file system at different points).
  """
  saving = set()  # those of this process with a save written in the background, by `fail`
  _made = itertools.count()

  def __init__(self, directory: str):
    self.directory = directory  # (this process's path of it: orbax's error logs name it)
    self._prefix = f'datarater/checkpoints/{next(_SaveBarrier._made)}'
    self._calls = collections.Counter()
    self._passed = set()  # the (barrier, call) this process left with every process there
    self._lock = threading.Lock()
    self.error = None  # this process's own failed part of a save (what orbax raised)

  @staticmethod
  def _client():
    return jax._src.distributed.global_state.client  # pylint: disable=protected-access

  def fail(self, error: BaseException) -> None:
    """Marks this process's part of a save failed: every process's barriers raise from now on."""
    self.error = self.error or error
    if jax.process_count() == 1:
      return
    try:
      self._client().key_value_set(f'{self._prefix}/failed', str(jax.process_index()))
    except jax.errors.JaxRuntimeError:  # ALREADY_EXISTS: another process failed first
      pass

  def failed_process(self) -> Optional[int]:
    """The process whose part of a save failed first, if one has."""
    try:
      return int(self._client().key_value_try_get(f'{self._prefix}/failed'))
    except jax.errors.JaxRuntimeError:  # NOT_FOUND
      return None

  def __call__(self, *, key: str, timeout_ms: int) -> None:
    with self._lock:
      n = self._calls[key]
      self._calls[key] += 1
    client, name = self._client(), f'{self._prefix}/{key}/'
    client.key_value_increment(f'{name}{n}', 1)
    if (key, n - 1) in self._passed:  # every process reached its last call: its counter goes
      self._passed.discard((key, n - 1))
      client.key_value_delete(f'{name}{n - 1}')
    deadline, pause = time.monotonic() + timeout_ms / 1000, 0.001
    while self._count(f'{name}{n}') < jax.process_count():
      failed = self.failed_process()
      if failed is not None:
        raise _AnotherProcessFailed(failed)
      if time.monotonic() > deadline:
        raise TimeoutError(f'the processes did not all reach barrier {key} of a checkpoint save '
                           f'in {timeout_ms / 1000:.0f} s')
      time.sleep(pause)
      pause = min(2 * pause, 0.05)  # (at 5 ms, 20% of a core waiting for a slow process)
    self._passed.add((key, n))

  def _count(self, name: str) -> int:
    """The processes counted in at a barrier's call; all, once another process has deleted it
    (at its next call of that barrier, after every process counted itself in at this one)."""
    try:
      return int(self._client().key_value_try_get(name))
    except jax.errors.JaxRuntimeError as e:
      if 'NOT_FOUND' not in str(e):  # (an unreachable coordinator is no proof that all came)
        raise
      return jax.process_count()  # deleted


def drop_background_save_reports() -> None:
  """For any orbax save: installs `_background_save_report` on absl's logger (once) and drops
  tensorstore's closed-loop tracebacks, which a failed write prints as well."""
  _drop_closed_loop_noise()
  absl_log = logging.getLogger('absl')
  if _background_save_report not in absl_log.filters:
    absl_log.addFilter(_background_save_report)


@contextlib.contextmanager
def quiet_orbax():
  """Reading with orbax, without its absl warnings about a damaged or foreign folder (the
  caller's error says what is wrong in one line) or tensorstore's closed-loop tracebacks."""
  _drop_closed_loop_noise()
  absl_log = logging.getLogger('absl')
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_log.setLevel(level)


class PathInput(NamedTuple):
  """An input a run reads by path alone: `stat` digests its files' names, sizes and times
  (`files.stat_digest`, cheap), `digest` its contents (`files.content_digest`, read when first
  needed unless given)."""
  path: str
  stat: str
  digest: Optional[str] = None


def path_inputs(data, **launcher_inputs: str) -> dict[str, PathInput]:
  """{field: PathInput} of what a run reads by path alone: `data.dataset_dir` and the launcher's
  inputs given as keywords that are set (`scores=PATH` is field `--scores`; launch.train adds
  `--rater` itself, digested as the parameters `load_rater` gives).

  A TFDS dataset named in `data.data_dir` is not digested: its name and version fix its
  contents, and data_dir is free to move (NON_TRAJECTORY_FIELDS) -- prepared again elsewhere, or
  a copy per host of a multi-process job, it would differ in files but not in examples. What a
  path alone names (launch.filter's --out written again with --overwrite, a scores file or rater
  replaced) has nothing else to tell it apart. A checkpoint records the contents' digest, so a
  copy made for each host of a job, or moved with the workdir, still matches; it also records
  the stat digest, and files whose names, sizes and times are as recorded are not read again.
  One a process cannot read stops every process in one line.
  """
  named = {'data.dataset_dir': data.get('dataset_dir', '')}
  named.update({f'--{k}': v for k, v in launcher_inputs.items()})
  inputs, problem = {}, None
  for field, path in named.items():
    try:
      if path:
        inputs[field] = PathInput(path, files.stat_digest(path))
    except OSError as e:  # a broken link, an unreadable file, one removed meanwhile
      problem = problem or _unreadable_input(field, path, e)
  if not multihost.agree(problem is None):
    raise UserError(problem or 'an input named by path cannot be read on another process')
  return inputs


def _unreadable_input(field: str, path: str, e: OSError) -> str:
  return (f'{field} {path!r} cannot be read to check it against the checkpoint '
          f'({e.strerror or type(e).__name__}: {e.filename or path})')


def _drop_empty(tree):
  """Zero-size leaves -> None: orbax cannot save them, and they carry nothing."""
  return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


def _empty_like(like):
  """The zero-size array `like` (a ShapeDtypeStruct) describes, placed as it says."""
  empty = np.zeros(like.shape, like.dtype)
  sharding = getattr(like, 'sharding', None)
  return jax.device_put(empty, sharding) if sharding is not None else jax.numpy.asarray(empty)


def _block_checksum(block: np.ndarray, index: tuple, shape: tuple) -> int:
  """sum_i bits_i * (2i + 1) mod 2**32 over the elements of `block`, the part `index` (slices) of
  an array of `shape`, i an element's row-major position in that array (an 8-byte value: two
  uint32 words). Exact in any order of summation, and changed by any one flipped bit."""
  block = np.asarray(block)
  if block.ndim and block.size > 2**22 and block.shape[0] > 1:  # in parts: bounded temporaries
    start, rows = index[0].indices(shape[0])[0], max(1, 2**22 * block.shape[0] // block.size)
    return sum(_block_checksum(block[r:r + rows], (slice(start + r, None), *index[1:]), shape)
               for r in range(0, block.shape[0], rows)) % 2**32
  block = np.asarray(block, order='C')  # (a 0-d one stays 0-d)
  if block.dtype.itemsize == 8:
    words = block.view(np.uint64)
    u = np.stack([words & np.uint64(2**32 - 1), words >> np.uint64(32)], -1).astype(np.uint32)
    index, shape = (*index, slice(0, 2)), (*shape, 2)
  else:
    u = block.view(f'u{block.dtype.itemsize}').astype(np.uint32)
  position = np.zeros(u.shape, np.uint32)
  stride = 1
  for d in reversed(range(u.ndim)):
    start = index[d].indices(shape[d])[0]
    axis = np.arange(start, start + u.shape[d], dtype=np.uint64) * np.uint64(stride % 2**32)
    position += axis.astype(np.uint32).reshape([-1] + [1] * (u.ndim - 1 - d))  # (wraps)
    stride *= shape[d]
  return int(np.sum(u * (2 * position + 1), dtype=np.uint32))


def checksums(tree) -> dict[str, int]:
  """{leaf path: checksum} of a tree of arrays (`_block_checksum` of the whole array, summed over
  the shards this process holds), the same for any sharding or device count, and for the dicts
  orbax reads a dataclass or named tuple back into; zero-size leaves, which are not saved, have
  none. Of arrays that span processes, every process computes it together (a collective); one a
  process holds whole (a host array, one on its own devices) is summed by that process alone."""
  paths, sums, spanning = [], [], []
  for path, x in jax.tree_util.tree_flatten_with_path(_drop_empty(tree))[0]:
    paths.append('/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                          for k in path))
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    spanning.append(isinstance(x, jax.Array) and spans_processes(x))
    if not isinstance(x, jax.Array):  # (a host array: one whole block)
      sums.append(_block_checksum(x, (slice(None),) * np.ndim(x), np.shape(x)))
      continue
    sums.append(sum(_block_checksum(s.data, s.index, x.shape) for s in x.addressable_shards
                    if s.replica_id == 0) % 2**32)  # (each part once: replicas are copies)
  if any(spanning):  # (the parts of each spanning array, summed over the processes)
    parts = multihost.allgather(np.asarray([v * s for v, s in zip(sums, spanning)], np.uint64))
    sums = [int(p) % 2**32 if s else v for v, p, s in zip(sums, parts.sum(0), spanning)]
  return dict(zip(paths, sums))


DAMAGED = 'its arrays differ from the checksums saved with them'


def intact(state, meta: dict) -> bool:
  """False if `meta` records checksums of the state saved (`state_checksums`) that `state`, as
  read back, does not have; a checkpoint of older code records none and is taken as read."""
  return 'state_checksums' not in meta or meta['state_checksums'] == checksums(state)


def check_writable_path(path: str, flag: str) -> None:
  """Refuses a folder for orbax checkpoints whose path holds a glob character (`*`, `?`, `[`) or
  a backslash: orbax finds a checkpoint's per-process parts by a glob over the whole path, and
  tensorstore reads a backslash as a separator (the arrays go to another folder), so under such a
  path it writes checkpoints it cannot read back. Also refuses a path that is not UTF-8, or a
  relative one under a current folder that is not (bytes Python decoded as surrogates):
  tensorstore cannot take it (a traceback at the first save)."""
  full = os.path.abspath(path)
  try:
    full.encode('utf-8')
  except UnicodeEncodeError as e:
    where = 'is' if full == path else f'is in {full!r}, which is'
    raise UserError(f'{flag} {path!r} {where} not UTF-8 ({e.reason} at character {e.start}): '
                    'orbax cannot write checkpoints under it; choose a folder with a UTF-8 '
                    'name') from None
  bad = sorted(set('*?[\\') & set(full))
  if bad:
    raise UserError(f'{flag} {path!r} holds {"".join(bad)!r} in its path: orbax cannot read back '
                    'checkpoints written under it; choose a folder without *, ?, [ or \\')


class RunCheckpointer:
  """Saves and restores (state, data position, JSON extras) in `workdir/checkpoints` with orbax.

  `free_fields`: config fields a resumed run may change (default NON_TRAJECTORY_FIELDS).
  `inputs`: {field: PathInput} of what the run reads by path (`path_inputs`); a checkpoint
  records their digests, and one made from other contents is not resumed. `extra_fields`: what
  the run's `extra` must hold (a record without them is unreadable). `added_fields`: {field:
  default} of fields an older record may lack, besides ADDED_FIELDS (`config_differences`).
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, max_to_keep: int = 2,
               free_fields: tuple[str, ...] = NON_TRAJECTORY_FIELDS,
               inputs: Optional[dict[str, PathInput]] = None,
               extra_fields: tuple[str, ...] = (), added_fields: Optional[dict] = None):
    check_writable_path(workdir, '--workdir')
    checkpoints = os.path.join(workdir, 'checkpoints')
    if os.path.lexists(checkpoints) and not os.path.isdir(checkpoints):
      raise UserError(f'--workdir {workdir!r} holds {checkpoints!r}, which is not a folder: '
                      'remove it or use a new --workdir')
    files.check_outside(workdir, **{field: i.path for field, i in (inputs or {}).items()})
    self.workdir = workdir
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.config = config
    self.free_fields = free_fields
    self.inputs = dict(inputs or {})
    self.extra_fields = extra_fields
    self.added_fields = dict(added_fields or {})
    self._manager = None
    self._max_to_keep = max_to_keep
    # (made on every process, single or not, so that all count their checkpointers alike)
    self._barrier = _SaveBarrier(self.directory)
    self._unreadable = {}  # step -> why, for the steps passed over
    self._warned = set()

  def _open(self, create: bool):
    if self._manager is None and (create or os.path.isdir(self.directory)):
      async_options = None
      if jax.process_count() > 1:
        async_options = ocp.AsyncOptions(barrier_sync_fn=self._barrier)
      self._manager = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(
              max_to_keep=self._max_to_keep, create=create, async_options=async_options))
    return self._manager

  def _steps(self) -> list[int]:
    """Saved steps, newest first (none if the folder holds no checkpoint)."""
    try:
      with quiet_orbax():  # (its warning of each checkpoint without orbax's metadata file)
        manager = self._open(create=False)
        return [] if manager is None else sorted(manager.all_steps(), reverse=True)
    except Exception as e:  # pylint: disable=broad-except  (a garbled checkpoint folder)
      raise UserError(f'cannot read the checkpoints in {self.directory!r}: '
                      f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None

  def _warn_passed_over(self) -> None:
    """Warns (once each) of the unreadable checkpoints passed over for a readable one."""
    for step in sorted(set(self._unreadable) - self._warned, reverse=True):
      log.warning('warning: checkpoint %s is unreadable (%s); using an earlier one',
                  os.path.join(self.directory, str(step)), _why(self._unreadable[step]))
      self._warned.add(step)

  def _none_readable(self) -> UserError:
    """The error of a workdir whose every checkpoint is unreadable: resuming is impossible and
    starting afresh would overwrite the old run's logs, so nothing is written."""
    steps = sorted(self._unreadable, reverse=True)
    if not steps:  # (the folder emptied meanwhile)
      return UserError(f'no checkpoint in {self.directory!r} any more; use a new --workdir')
    return UserError(f'no readable checkpoint in {self.directory!r} (step(s) '
                     f'{", ".join(map(str, steps))} unreadable; {steps[0]}: '
                     f'{_why(self._unreadable[steps[0]])}); move it aside or use a new --workdir')

  def _set_aside_unreadable(self) -> None:
    """Renames unreadable checkpoints to `unreadable-<step>-<pid>` (kept for inspection; not
    steps to orbax), so the run can save those steps again."""
    if not self._unreadable:
      return
    self.close()
    if jax.process_index() == 0:  # one process renames; the others wait for it
      for step in sorted(self._unreadable):
        path = os.path.join(self.directory, str(step))
        if os.path.isdir(path):
          os.rename(path, os.path.join(self.directory, f'unreadable-{step}-{os.getpid()}'))
    multihost.barrier('datarater.checkpointing: unreadable set aside')
    self._unreadable, self._warned = {}, set()

  def _readable_everywhere(self, step: int, read):
    """(read(step), True) if it works on every process (each reads its own shards), else
    (None, False), warned."""
    try:
      value, error = read(step), None
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore/JSON errors)
      value, error = None, e
    if multihost.agree(error is None):
      return value, True
    self._unreadable.setdefault(step, error or RuntimeError('unreadable on another process'))
    return None, False

  def latest_step(self) -> int | None:
    """The newest step whose record can be read (unreadable ones are passed over, warned); None
    if there is no checkpoint, UserError if there are some but none can be read."""
    steps = self._steps()
    for step in steps:
      if self._readable_everywhere(step, self.meta)[1]:
        self._warn_passed_over()
        return step
    if steps:
      raise self._none_readable()
    return None

  def check_compatible(self) -> int | None:
    """The latest readable checkpoint's step, None if there is none; UserError if it was made
    with another config, or an input named by path now has other contents or cannot be read."""
    step = self.latest_step()
    if step is None:  # a fresh run: its inputs' contents now, as it reads them, not at its
      problem = None  # first save (changed meanwhile, they would be recorded as read)
      for field in sorted(self.inputs):
        try:
          self._digest(field)
        except OSError as e:
          problem = problem or _unreadable_input(field, self.inputs[field].path, e)
      if not multihost.agree(problem is None):
        raise UserError(problem or 'an input named by path cannot be read on another process')
      return None
    meta = self.meta(step)
    # (a field free now is not compared, though an older record may hold it)
    diffs = config_differences(_without(meta['config'], self.free_fields),
                               trajectory_fields(self.config, self.free_fields),
                               added=self.added_fields)
    if diffs:
      raise UserError(f'workdir {self.workdir!r} holds a checkpoint of a different config '
                      f'({"; ".join(diffs[:3])}); use a new --workdir')
    # A checkpoint of older code records no digests: it resumes unchecked, as it did then (like a
    # field it lacks in ADDED_FIELDS). A field it holds is checked on every process, which read
    # the path for themselves, and refused on all if any sees other contents.
    recorded, stats = meta.get('inputs') or {}, meta.get('input_stats') or {}
    for field in sorted(set(recorded) & set(self.inputs)):
      given = self.inputs[field]
      if given.digest is None and stats.get(field) == given.stat:  # the same files, untouched
        self.inputs[field] = given._replace(digest=recorded[field])
      try:
        same, problem = self._digest(field) == recorded[field], None
      except OSError as e:
        same, problem = False, _unreadable_input(field, given.path, e)
      if not multihost.agree(same):
        raise UserError(problem or f'{field} {given.path!r} changed since the checkpoint in '
                        f'{self.workdir!r} was made (its contents differ); resuming would mix '
                        'the two: use a new --workdir')
    return step

  def _digest(self, field: str) -> str:
    """The contents' digest of input `field`, read once."""
    given = self.inputs[field]
    if given.digest is None:
      self.inputs[field] = given._replace(digest=files.content_digest(given.path))
    return self.inputs[field].digest

  def restore_latest(self, abstract_state):
    """(state, meta) of the newest checkpoint that restores on every process; unreadable ones
    are passed over (and renamed, by process 0)."""
    for step in self._steps():
      restored, ok = self._readable_everywhere(step, lambda s: self.restore(s, abstract_state))
      if ok and not multihost.agree(intact(*restored)):  # (checked once all have read: together)
        self._unreadable.setdefault(step, ValueError(DAMAGED))
        ok = False
      if ok:
        self._warn_passed_over()
        self._set_aside_unreadable()
        return restored
    raise self._none_readable()

  def meta(self, step: int) -> dict:
    """The JSON record saved with checkpoint `step` (config, data position, step, extra)."""
    self._open(create=False)
    with quiet_orbax():
      return checked_meta(self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))['meta'], self.extra_fields)

  def save(self, step: int, state, data_position: dict[str, int], extra: Any = None) -> None:
    """`extra`: JSON-serialisable progress kept beside the state (e.g. the metrics so far)."""
    drop_background_save_reports()
    manager = self._open(create=True)
    meta = {'config': trajectory_fields(self.config, self.free_fields),
            'data_position': data_position, 'step': int(step), 'extra': extra,
            'inputs': {field: self._digest(field) for field in self.inputs},
            'state_checksums': checksums(state),
            'input_stats': {field: given.stat for field, given in self.inputs.items()}}
    with self._failing_together():
      _SaveBarrier.saving.add(self._barrier)
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_drop_empty(state)), meta=ocp.args.JsonSave(meta)),
                   force=True)

  def check(self) -> None:
    """Raises the error of this process's part of a save written in the background once orbax
    has reported it (orbax itself raises it at the next save, wait or close): a run calls it before
    each step's vote (`multihost.StopVote`), which then stops every process there."""
    if self._barrier.error is not None:
      raise self._barrier.error

  @contextlib.contextmanager
  def _failing_together(self):
    """In a multi-process job, an error of this process in a save, wait or close marks its part
    failed, so that no other process waits for it in a barrier; where another process's part
    failed first, a UserError naming it (its own error line says why)."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  (re-raised)
      if jax.process_count() == 1:
        raise
      failed, own = self._barrier.failed_process(), self._barrier.error
      if failed == jax.process_index() and own is not None and own is not e:
        raise own from None  # (orbax may raise another process's abort over it)
      if isinstance(e, _AnotherProcessFailed) or failed not in (None, jax.process_index()):
        raise UserError(f'process {failed} of this job could not write its part of a checkpoint '
                        f'in {self.directory!r} (its error line says why)') from None
      self._barrier.fail(e)
      raise

  def restore(self, step: int, abstract_state):
    """(state placed as `abstract_state`'s shardings say, meta dict).

    Each process reads its own shards through the handler, not the manager, whose restore ends
    in a barrier: a process that fails to read would otherwise leave the others waiting there.
    """
    meta = self.meta(step)
    handler = ocp.StandardCheckpointHandler()
    with quiet_orbax():
      try:
        restored = handler.restore(epath.Path(self.directory) / str(step) / 'state',
                                   args=ocp.args.StandardRestore(_drop_empty(abstract_state)))
      finally:
        handler.close()
    state = jax.tree.map(lambda like, x: _empty_like(like) if x is None else x,
                         abstract_state, restored)
    return state, meta

  def close(self) -> None:
    if self._manager is not None:
      manager, self._manager = self._manager, None
      try:
        with self._failing_together():
          manager.wait_until_finished()
          manager.close()
      finally:  # (not before: a write failing meanwhile must still be made known)
        _SaveBarrier.saving.discard(self._barrier)

  @contextlib.contextmanager
  def closing(self):
    """Closes on leaving the block; leaving it by an error, the error stands, not a failed save's
    own (raised again by orbax at close, or another process's, which stops there too)."""
    try:
      yield self
    except BaseException:
      try:
        self.close()
      except Exception:  # pylint: disable=broad-except
        pass
      raise
    self.close()


def checked_meta(meta, extra_fields: tuple[str, ...] = ()) -> dict:
  """A checkpoint's JSON record; ValueError (unreadable: passed over) if it lacks what a resume
  reads: a dict `config`, an integer `step`, an `extra` holding `extra_fields` (a record damaged
  into other valid JSON)."""
  if not (isinstance(meta, dict) and isinstance(meta.get('config'), dict)
          and type(meta.get('step')) is int):  # pylint: disable=unidiomatic-typecheck  (not bool)
    raise ValueError('its record has no config or step')
  extra = meta.get('extra')
  if extra_fields and not (isinstance(extra, dict) and all(f in extra for f in extra_fields)):
    raise ValueError(f'its record has no {", ".join(extra_fields)}')
  return meta


def abstract_of(tree):
  """ShapeDtypeStructs of a tree of placed arrays, keeping each array's sharding."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restoring onto any device count."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def this_process_alone() -> ocp.options.MultiprocessingOptions:
  """Orbax options whose barriers span this process only: a read each process makes alone, where
  one that fails must not leave the others in orbax's barriers."""
  return ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                            active_processes={jax.process_index()})


def restore_latest_on_host(directory: str):
  """(state, meta) of the newest readable checkpoint, its state on this process's first device,
  whatever mesh saved it (unreadable ones passed over for it are warned of); None if there is
  none, UserError if there are some but none can be read."""
  if not os.path.isdir(directory):
    return None
  try:
    with quiet_orbax():
      manager = ocp.CheckpointManager(directory, item_handlers={
          'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()},
          options=ocp.CheckpointManagerOptions(create=False,
                                               multiprocessing_options=this_process_alone()))
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'cannot read the checkpoints in {directory!r}: {_why(e)}') from None
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  unreadable = {}
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        with quiet_orbax():
          target = jax.tree.map(
              lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
              manager.item_metadata(step)['state'])
          restored = manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        checked_meta(restored['meta'])
        if not intact(restored['state'], restored['meta']):
          raise ValueError(DAMAGED)
      except Exception as e:  # pylint: disable=broad-except
        unreadable[step] = e
        continue
      for passed, e in unreadable.items():
        log.warning('warning: checkpoint %s is unreadable (%s); using an earlier one',
                    os.path.join(directory, str(passed)), _why(e))
      return restored['state'], restored['meta']
  finally:
    manager.close()
  if unreadable:
    newest = max(unreadable)
    raise UserError(f'no readable checkpoint in {directory!r}: every one is unreadable (step(s) '
                    f'{", ".join(map(str, sorted(unreadable, reverse=True)))}; {newest}: '
                    f'{_why(unreadable[newest])})')
  return None
