"""Writing files so that nothing is ever half-written: atomic files and folders.

`atomic_path(path)` gives a temporary path in the same folder; when the block ends without an
exception the file is renamed over `path` (readable by all, as a plain `open` would make it),
otherwise it is removed. JSON, text, parquet and figures go through it. `atomic_dir(path)` does
the same for a whole folder (an exported rater, a filtered dataset). `JsonlLog` is a run's
JSON-lines log that a resumed run truncates to its restored point. `open_memmap` maps a .npy file
with its disk space reserved.
"""
import contextlib
import errno
import fcntl
import fnmatch
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Optional

import jax
import numpy as np

from datarater.errors import UserError


def digest(tree) -> str:
  """sha256 of a pytree's paths, dtypes, shapes and bytes (a store's fingerprint; what
  processes compare to hold the same data or policy)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{jax.tree_util.keystr(path)}:{x.dtype.str}:{x.shape};'.encode())
    h.update(x.tobytes())
  return h.hexdigest()


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path beside `path`; renamed over `path` on success, removed on error."""
  folder = os.path.dirname(os.path.abspath(path))
  base = os.path.basename(path)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{base}.tmp-')
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _leftovers(path: str, kind: str):
  """(folder, pid) of `.<name>.<kind>-<pid>` folders beside `path` whose process is gone."""
  parent, name = os.path.dirname(path), os.path.basename(path)
  for folder in glob.glob(os.path.join(glob.escape(parent), f'.{glob.escape(name)}.{kind}-*')):
    try:
      pid = int(folder.rsplit('-', 1)[1])
    except ValueError:
      continue
    if pid == os.getpid() or not _pid_alive(pid):  # this process writes none yet: its pid
      yield folder, pid  # is a dead writer's, reused (as in every fresh container)


def recover_dir(path: str) -> None:
  """Cleans up after killed `atomic_dir` writers of `path`: their temporary folders are removed,
  and a previous `path` they had moved aside (to replace it) is put back if `path` is missing."""
  for folder, _ in _leftovers(path, 'tmp'):
    shutil.rmtree(folder, ignore_errors=True)
  for folder, _ in _leftovers(path, 'old'):
    if not os.path.exists(path):
      os.rename(folder, path)
    else:
      _remove(folder)


def _remove(path: str) -> None:
  """Removes a folder, or a file (what --overwrite may have replaced)."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


def replace_dir(src: str, path: str, replace: bool = True) -> None:
  """Renames the finished folder `src` to `path`; an existing `path` is moved aside first and
  deleted after (put back if the second rename fails or is interrupted; a kill in between leaves
  it for `recover_dir`). Without `replace`, an existing `path` (another run's output, written
  meanwhile) is kept: FileExistsError."""
  if not replace:
    if os.path.lexists(path):
      raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    os.rename(src, path)  # (a folder that appeared since: ENOTEMPTY, a file: ENOTDIR)
    return
  parent, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
  old = os.path.join(parent, f'.{name}.old-{os.getpid()}') if os.path.lexists(path) else None
  try:
    if old:
      os.rename(path, old)
    os.rename(src, path)
  except BaseException:
    if old and os.path.lexists(old) and not os.path.lexists(path):
      os.rename(old, path)
    raise
  if old:
    _remove(old)


def _nearest_above(path: str) -> str:
  """The nearest existing path above `path` (a folder, or a file where a folder should be)."""
  above = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(above) and above != os.path.dirname(above):
    above = os.path.dirname(above)
  return above


def why_not(path: str, error: OSError) -> str:
  """Why `path` could not be written: a file where a folder above it should be, else the OS's
  reason."""
  above = _nearest_above(path)
  if os.path.exists(above) and not os.path.isdir(above):
    return f'{above!r} is a file, not a folder'
  return error.strerror or str(error)


def check_can_create(path: str) -> None:
  """Refuses an output `path` that could not be created where it goes (the nearest existing
  folder above it is a file, or not writable: a read-only file system, permissions), before a
  command's long work rather than at its end."""
  above = _nearest_above(path)
  if not os.path.isdir(above):
    raise UserError(f'cannot write {path!r}: {above!r} is a file, not a folder')
  if not os.access(above, os.W_OK | os.X_OK):
    why = ('a read-only file system' if os.statvfs(above).f_flag & os.ST_RDONLY
           else 'no permission')
    raise UserError(f'cannot write {path!r}: {above!r} is not writable ({why})')


def check_replaceable(path: str, overwrite: bool, marker: str = '',
                      overwrite_with: str = '--overwrite') -> None:
  """Refuses an existing output `path` unless `overwrite` (what sets it, `overwrite_with`, is
  named), and with `marker` one that is not a folder holding that file (an earlier output of the
  same kind: a typo in --out with --overwrite would delete an unrelated folder or file)."""
  # An earlier output a killed writer moved aside (to replace it) is still this output:
  # `atomic_dir` puts it back before writing, so it is refused here, before any work.
  found = path if os.path.lexists(path) else next(
      (folder for folder, _ in _leftovers(os.path.abspath(path), 'old')), None)
  if found and not overwrite:
    raise UserError(f'output {path!r} already exists (pass {overwrite_with} to replace it)')
  if found and marker and not os.path.isfile(os.path.join(found, marker)):
    raise UserError(f'output {path!r} exists but is not an earlier output of this command (it '
                    f'holds no {marker}): {overwrite_with} replaces only those; remove it '
                    'yourself or write elsewhere')


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False, marker: str = '',
               overwrite_with: str = '--overwrite'):
  """Yields a temporary folder beside `path`, renamed to `path` when the block succeeds.

  With `overwrite`, an existing `path` is moved aside first and deleted after the rename (a
  killed run leaves it to be put back by `recover_dir`); with `marker`, only a folder holding
  that file (an earlier output of the same kind) is replaced, anything else is refused (naming
  `overwrite_with`, what sets `overwrite`). Without `overwrite`, a `path` that another run wrote
  while this one ran is kept and this run's output refused. On error the temporary folder goes.
  """
  path = os.path.abspath(path)
  parent, name = os.path.dirname(path), os.path.basename(path)
  try:
    os.makedirs(parent, exist_ok=True)
    recover_dir(path)
    check_replaceable(path, overwrite, marker, overwrite_with)
    tmp = os.path.join(parent, f'.{name}.tmp-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  except OSError as e:
    raise UserError(f'cannot write {path!r}: {why_not(path, e)}') from None
  try:
    yield tmp
    try:
      replace_dir(tmp, path, replace=overwrite)
    except OSError:
      if overwrite or not os.path.lexists(path):
        raise
      raise UserError(f'output {path!r} was written by another run while this one ran; it is '
                      f'kept and this output dropped (pass {overwrite_with} to replace it, or '
                      'write elsewhere)') from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _below(a: str, b: str) -> bool:
  """Resolved path `a` lies below folder `b` (not `b` itself)."""
  return a.startswith(b.rstrip(os.sep) + os.sep)


def check_apart(out: str, flag: str, **inputs: str) -> None:
  """Refuses an output folder that is, holds or lies inside one of the command's inputs
  (`--overwrite` would replace it, or part of it): `inputs` maps each input's flag to its path."""
  target = os.path.realpath(out)
  for name, path in inputs.items():
    if not path:
      continue
    where = os.path.realpath(path)
    if where == target or _below(where, target):
      raise UserError(f'{flag} {out!r} would replace --{name} {path!r}; write elsewhere')
    if _below(target, where):  # (a new folder too: a rerun with --overwrite would be refused)
      raise UserError(f'{flag} {out!r} is inside --{name} {path!r}; write elsewhere')


# What marks another launcher's output folder, by the file it always holds (a glob pattern).
RUN_MARKERS = {'metrics.jsonl': 'a launch.train_rater run', 'history.jsonl': 'a launch.train run',
               'rater.json': 'an exported rater', 'scores_*.json': 'a launch.valuate output'}


def check_not_other_run(workdir: str, own: str, run: str) -> None:
  """Refuses a --workdir that holds another launcher's output (`RUN_MARKERS` but `own`, the
  marker of this `run`'s own kind, '' for none): this run's files would be mixed into it."""
  for marker, what in RUN_MARKERS.items():
    found = sorted(glob.glob(os.path.join(glob.escape(workdir), marker)))
    if marker != own and found:
      raise UserError(f'--workdir {workdir!r} holds {what} ({os.path.basename(found[0])}); '
                      f'give the {run} a folder of its own')


def check_outside(workdir: str, **folders: str) -> None:
  """Refuses a run folder that is, or lies inside, a folder the run reads (`folders`: each one's
  name, as the user set it, to its path): the run's own files would change that folder's
  digest, and no resume would match its checkpoints. Any TFDS dataset folder too
  (`check_not_in_dataset`)."""
  target = os.path.realpath(workdir)
  for name, path in folders.items():
    if path and os.path.isdir(path):
      where = os.path.realpath(path)
      if target == where or _below(target, where):
        raise UserError(f'--workdir {workdir!r} is inside {name} {path!r}, which the run reads '
                        '(its own files would change it, and it could not resume): give a folder '
                        'outside it')
  check_not_in_dataset(workdir, '--workdir', itself=True)


def dataset_folder_of(path: str, itself: bool = True) -> str:
  """The TFDS dataset folder (one holding dataset_info.json) that lies above `path`, or is
  `path` with `itself`; '' if none."""
  folder = os.path.realpath(path)
  if not itself:
    folder = os.path.dirname(folder)
  while True:
    if os.path.isfile(os.path.join(folder, 'dataset_info.json')):
      return folder
    if os.path.dirname(folder) == folder:
      return ''
    folder = os.path.dirname(folder)


def check_not_in_dataset(path: str, flag: str, itself: bool = True) -> None:
  """Refuses an output folder inside a TFDS dataset folder (or that folder, with `itself`): a
  dataset read by path (data.dataset_dir) is digested whole, so files written in it stop every
  run that reads it from resuming, and launch.filter --overwrite of it would delete them."""
  folder = dataset_folder_of(path, itself)
  if folder:
    where = 'is' if folder == os.path.realpath(path) else 'is inside'
    raise UserError(f'{flag} {path!r} {where} the TFDS dataset folder {folder!r}: its files would '
                    'change that dataset (runs reading it could not resume); give a folder '
                    'outside it')


@contextlib.contextmanager
def workdir_lock(path: str):
  """Creates the run folder `path` and holds its lock for the block: a second run on the same
  folder stops with one line naming the process that holds it. Temporary files that a killed run
  left in it or its folders (`atomic_path`'s; not in orbax's `checkpoints` or a hidden folder,
  another writer's) are removed once the lock is held."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f'--workdir {path!r} exists and is not a folder')
  try:
    os.makedirs(path, exist_ok=True)
    handle = open(os.path.join(path, '.lock'), 'a+')
  except OSError as e:
    raise UserError(f'cannot write --workdir {path!r}: {why_not(path, e)}') from None
  with handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or 'unknown'
      raise UserError(f'--workdir {path!r} is in use by another run (process {holder}); wait for '
                      'it or use another --workdir') from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    for folder, dirs, names in os.walk(path):
      dirs[:] = [d for d in dirs if not d.startswith('.') and
                 not (folder == path and d == 'checkpoints')]
      for name in fnmatch.filter(names, '.*.tmp-*'):  # (a fitted run's pickle may be large)
        with contextlib.suppress(OSError):
          os.remove(os.path.join(folder, name))
    yield path


def stat_digest(path: str, hidden: bool = False) -> str:
  """sha256 of the relative names, sizes and modification times of a file or of the files under
  a folder (names starting with '.' left out unless `hidden`; a file named itself is always in):
  cheap, and it tells a file written again from the old one, but a copy elsewhere differs from
  its source too."""
  h = hashlib.sha256()
  root = os.path.abspath(path)
  if os.path.isfile(root):
    walked = [(os.path.dirname(root), [], [os.path.basename(root)])]
    root, hidden = os.path.dirname(root), True
  else:
    walked = sorted(os.walk(root))
  for folder, _, names in walked:
    rel = os.path.relpath(folder, root)
    if not hidden and any(part.startswith('.') for part in rel.split(os.sep) if part != '.'):
      continue
    for name in sorted(names):
      if hidden or not name.startswith('.'):
        st = os.stat(os.path.join(folder, name))
        h.update(f'{os.path.relpath(os.path.join(folder, name), root)}:{st.st_size}:'
                 f'{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()[:16]


_CONTENT_DIGESTS = {}  # (path, stat_digest) -> content_digest


def content_digest_once(path: str) -> str:
  """`content_digest(path)`, read once a process while its files' names, sizes and times
  (`stat_digest`) stay as they were."""
  key = (os.path.realpath(path), stat_digest(path, hidden=True))
  if key not in _CONTENT_DIGESTS:
    _CONTENT_DIGESTS[key] = content_digest(path)
  return _CONTENT_DIGESTS[key]


def content_digest(path: str) -> str:
  """sha256 of a file's bytes, or of every file's relative name, size and bytes under a folder;
  names starting with '.' (a workdir's lock, temporary files) are left out: they change while
  the content does not."""
  h = hashlib.sha256()
  root = os.path.abspath(path)
  if os.path.isfile(root):
    walked = [(os.path.dirname(root), [os.path.basename(root)])]
    root = os.path.dirname(root)
  else:
    walked = []
    for folder, dirs, names in os.walk(root):
      dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
      walked.append((folder, sorted(n for n in names if not n.startswith('.'))))
  for folder, names in walked:
    for name in names:
      full = os.path.join(folder, name)
      h.update(f'{os.path.relpath(full, root)}:{os.path.getsize(full)};'.encode())
      with open(full, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):  # pylint: disable=cell-var-from-loop
          h.update(block)
  return h.hexdigest()[:16]


def json_safe(obj: Any) -> Any:
  """`obj` with every non-finite float (NaN, inf; e.g. an AUROC where nothing is corrupted) as
  None, so the JSON written is standard (null, not NaN) and other tools read it."""
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, (np.ndarray, np.generic)):
    return json_safe(obj.tolist())
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def json_text(obj: Any) -> str:
  """`obj` as the text of a standard JSON file (non-finite floats as null), keys sorted."""
  return json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False)


def write_json(path: str, obj: Any) -> None:
  """`obj` as standard JSON (`json_text`), atomically."""
  write_text(path, json_text(obj))


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, 'w') as f:
    f.write(text)


def write_parquet(path: str, columns: dict, row_group: int = 65536,
                  metadata: Optional[dict] = None) -> None:
  """Equal-length columns as a parquet file, `row_group` rows at a time (readers can stream it);
  `metadata`: string keys and values kept in the file's schema."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  n = len(next(iter(columns.values())))
  first = pa.table({k: v[:row_group] for k, v in columns.items()}, metadata=metadata)
  with atomic_path(path) as tmp, pq.ParquetWriter(tmp, first.schema) as writer:
    writer.write_table(first)
    for start in range(row_group, n, row_group):
      writer.write_table(pa.table({k: v[start:start + row_group] for k, v in columns.items()},
                                  schema=first.schema))


def save_figure(fig, path: str, **kwargs) -> None:
  """A matplotlib figure as PNG (no timestamp in the file, so equal figures give equal bytes)."""
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format='png', metadata={'Software': None}, **kwargs)


def open_memmap(path: str, mode: str, dtype=None, shape=None) -> np.memmap:
  """`np.lib.format.open_memmap(path, mode, dtype, shape)` with the file's disk space reserved
  first: a memory-mapped file is sparse, and a write through the map to a page a full disk (or a
  quota) cannot give kills the process with SIGBUS; here it is an OSError naming `path`. (A file
  system that cannot reserve space is left as it was.)"""
  try:
    array = np.lib.format.open_memmap(path, mode=mode, dtype=dtype, shape=shape)
    fd = os.open(path, os.O_RDWR)
    try:
      os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
      if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
        raise
    finally:
      os.close(fd)
  except OSError as e:
    raise OSError(e.errno, e.strerror or str(e), e.filename or path) from None
  return array


def _record(line: bytes, key: str):
  """The record of a JSON line with a numeric `key` field, or None (also for bytes that are not
  UTF-8 text)."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  ok = isinstance(record, dict) and isinstance(record.get(key), (int, float))
  return record if ok and not isinstance(record[key], bool) else None


class JsonlLog:
  """A JSON-lines log of a run; on resume, records past the restored point are dropped.

  Records are dicts with a `key` field (e.g. 'step', 'epoch'); those with key <= `resume_at`
  are kept (rewritten atomically), the rest are appended as the run goes. A line that does not
  parse as such a record (the partial last line of a run killed mid-append) is dropped.
  """

  def __init__(self, path: str, key: str, resume_at: float = 0):
    self.path, self.history = path, []
    if os.path.exists(path):
      with open(path, 'rb') as f:
        records = [_record(line, key) for line in f]
      self.history = [r for r in records if r is not None and r[key] <= resume_at]
    write_text(path, ''.join(json.dumps(json_safe(r), allow_nan=False) + '\n'
                             for r in self.history))

  def write(self, record: dict) -> None:
    self.history.append(record)
    with open(self.path, 'a') as f:
      f.write(json.dumps(json_safe(record), allow_nan=False) + '\n')
