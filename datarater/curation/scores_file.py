"""The scores file: one row per example of a split, keyed by its id (parquet).

Columns: `id` (int64, the example's position in its split), `score` (the method's raw score),
`value` (oriented: higher = more useful); optionally `split` and anything else a writer records
(label, corruption kind, a keep decision). `write` makes one atomically, with the dataset and
split it scores in the file's metadata (a dataset folder also by a digest of its files' bytes);
`read_values` reads the `value` (or, failing that, `score`) of every example of a split, in id
order, and refuses files that do not cover the split exactly or were written for another dataset
or split, or for a dataset folder whose contents changed since (written again, `--overwrite`).
"""
import contextlib
import json
import os
from typing import Optional

import numpy as np

from datarater import files
from datarater.errors import UserError

_READ_ROWS = 65536  # rows read at a time


_SCORED = b'datarater.scored'  # metadata key: {"dataset", "split", "planted"} the rows score,
# the dataset folder's files ("dataset_files"), and the example-gradients spent making them
# ("example_gradients", when the writer says)
UNCHECKED = object()  # planted=UNCHECKED: not said (write) or not checked (read_values)


def _folder_files(dataset: Optional[str], recorded: Optional[dict] = None) -> Optional[dict]:
  """{'stat', 'contents'} digests of `dataset`'s files if it is a dataset folder (dataset_name:
  absolute), None for a TFDS name; the bytes are read only where the names, sizes and times
  differ from `recorded`'s. OSError if the folder cannot be read."""
  if not (dataset and os.path.isabs(dataset) and os.path.isdir(dataset)):
    return None
  stat = files.stat_digest(dataset, hidden=True)
  if recorded and recorded.get('stat') == stat:
    return dict(recorded)
  return {'stat': stat, 'contents': files.content_digest_once(dataset)}


def write(path: str, ids: np.ndarray, score: np.ndarray, value: np.ndarray, *, dataset: str,
          split: str, planted=UNCHECKED, example_gradients: Optional[int] = None,
          **columns) -> None:
  """The scores of split `split` of `dataset` (a name, or a dataset folder), corrupted as
  `planted` (`Corruption.describe()`: None when nothing was planted; UNCHECKED: not said)
  describes, made with `example_gradients` (None: not said)."""
  scored = {'dataset': dataset, 'split': split}
  with contextlib.suppress(OSError):  # unreadable (a broken link): the path alone is recorded
    if (digest := _folder_files(dataset)) is not None:
      scored['dataset_files'] = digest
  if planted is not UNCHECKED:
    scored['planted'] = planted
  if example_gradients is not None:
    scored['example_gradients'] = int(example_gradients)
  files.write_parquet(path, {'id': np.asarray(ids, np.int64),
                             'score': np.asarray(score, np.float64),
                             'value': np.asarray(value, np.float64),
                             **{k: np.asarray(v) for k, v in columns.items()}},
                      metadata={_SCORED: json.dumps(scored)})


def _check_scored(path: str, metadata, dataset: Optional[str], split: Optional[str],
                  planted, planted_by: str) -> None:
  """Refuses a file whose metadata says it scores another dataset, split or planted
  corruption than the reader's."""
  try:
    scored = json.loads((metadata or {})[_SCORED])
  except (KeyError, ValueError):
    return  # not written by `write` (e.g. by hand): the ids are all there is to check
  for what, want in (('dataset', dataset), ('split', split)):
    if want is not None and scored.get(what) not in (None, want):
      raise UserError(f'scores file {path!r} scores {what} {scored[what]!r}, not {want!r}')
  recorded = scored.get('dataset_files')
  if dataset is not None and isinstance(recorded, dict):
    try:
      now = _folder_files(dataset, recorded)
    except OSError as e:
      raise UserError(f'dataset folder {dataset!r} cannot be read to check it against scores '
                      f'file {path!r} ({e.strerror or type(e).__name__}: {e.filename})') from None
    if now is not None and now['contents'] != recorded.get('contents'):
      raise UserError(f'scores file {path!r} scores dataset folder {dataset!r} as it was before '
                      'it was written again (its contents differ now): score it again')
  if planted is not UNCHECKED and 'planted' in scored and scored['planted'] != (
      json.loads(json.dumps(planted))):
    raise UserError(f'scores file {path!r} scores examples under planted corruption '
                    f'{scored["planted"]}, but here '
                    f'{"none is planted" if planted is None else f"it is {planted}"} '
                    f'({planted_by}): other examples are corrupted here')


def cost(path: str) -> int:
  """The example-gradients spent making the scores of `path`, as its writer recorded them (0 if
  it did not)."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    return int(json.loads(pq.read_schema(path).metadata[_SCORED]).get('example_gradients', 0))
  except (KeyError, TypeError, ValueError, OSError):
    return 0


def read_values(path: str, num_examples: int, split: Optional[str] = None,
                dataset: Optional[str] = None, planted=UNCHECKED,
                planted_by: str = 'data.label_noise, noise_seed, input_corruption') -> np.ndarray:
  """Values [N] in id order for a split of `num_examples` (rows of other splits skipped) of
  `dataset` (a name, or a dataset folder; None: not checked), corrupted as `planted`
  (`Corruption.describe()`) says; a mismatch names `planted_by`, what sets it for the reader."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise UserError(f'scores file {path!r} does not exist')
  try:
    reader = pq.ParquetFile(path)
    schema = reader.schema_arrow
  except (pa.ArrowInvalid, OSError) as e:
    raise UserError(f'scores file {path!r} is not a readable parquet file ({e})') from None
  cols = schema.names
  _check_scored(path, schema.metadata, dataset, None if 'split' in cols else split, planted,
                planted_by)
  column = 'value' if 'value' in cols else 'score' if 'score' in cols else None
  if 'id' not in cols or column is None:
    raise UserError(f'scores file {path!r} has columns {cols}; it needs `id` and `value` or '
                    '`score`')
  by_split = 'split' in cols and split is not None
  id_type, value_type = schema.field('id').type, schema.field(column).type
  if not pa.types.is_integer(id_type):
    raise UserError(f'scores file {path!r}: column `id` must hold integers, it holds {id_type}')
  if not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
    raise UserError(f'scores file {path!r}: column `{column}` must hold numbers, it holds '
                    f'{value_type}')
  split_type = schema.field('split').type if by_split else pa.string()
  names = split_type.value_type if pa.types.is_dictionary(split_type) else split_type
  if not (pa.types.is_string(names) or pa.types.is_large_string(names)):
    raise UserError(f'scores file {path!r}: column `split` must hold split names (strings), it '
                    f'holds {split_type}')
  # Read a row batch at a time: only the [N] scores and a coverage mask are held.
  scores = np.empty(num_examples, np.float64)
  covered = np.zeros(num_examples, bool)
  rows, outside = 0, None  # rows read; the first id out of range
  try:
    for batch in reader.iter_batches(_READ_ROWS, columns=['id', column] +
                                     (['split'] if by_split else [])):
      if by_split:
        batch = batch.filter(pc.equal(batch.column('split'), split))
      if batch.column('id').null_count:
        raise UserError(f'scores file {path!r}: column `id` holds a null (row '
                        f'{rows + batch.column("id").is_null().index(True).as_py()})')
      ids = np.asarray(batch.column('id').to_numpy(zero_copy_only=False), np.int64)
      values = np.asarray(batch.column(column).to_numpy(zero_copy_only=False), np.float64)
      rows += len(ids)
      inside = (ids >= 0) & (ids < num_examples)
      if outside is None and not inside.all():
        outside = int(ids[~inside][0])
      ids, values = ids[inside], values[inside]
      covered[ids] = True
      scores[ids] = values
  except (pa.ArrowInvalid, OSError) as e:
    raise UserError(f'scores file {path!r} is not a readable parquet file ({e})') from None
  if not covered.all() or rows != num_examples or outside is not None:
    missing = np.flatnonzero(~covered)
    detail = (f'missing id {int(missing[0])}' if len(missing) else
              f'id {outside} out of range' if outside is not None else 'duplicate ids')  # rows > N
    raise UserError(f'scores file {path!r} covers {int(covered.sum())} of the {num_examples} '
                    f'examples{f" of split {split!r}" if split else ""} ({detail}, '
                    f'{rows} rows)')
  if not np.all(np.isfinite(scores)):
    raise UserError(f'scores file {path!r} has a missing (null) or non-finite score (id '
                    f'{int(np.flatnonzero(~np.isfinite(scores))[0])})')
  return scores
