"""The scores file: one row per example of a split, keyed by its TFDS id (parquet).

Columns: `id` (int64, the example's position in its split), `score` (the method's raw score),
`value` (oriented: higher = more useful); optionally `split` and anything else a writer records
(label, corruption kind, a keep decision). `write` makes one atomically; `read_values` reads the
`value` (or, failing that, `score`) of every example of a split, in id order, and refuses files
that do not cover the split exactly.
"""
import os
from typing import Optional

import numpy as np

from datarater import files
from datarater.errors import UserError


def write(path: str, ids: np.ndarray, score: np.ndarray, value: np.ndarray, **columns) -> None:
  files.write_parquet(path, {'id': np.asarray(ids, np.int64),
                             'score': np.asarray(score, np.float64),
                             'value': np.asarray(value, np.float64),
                             **{k: np.asarray(v) for k, v in columns.items()}})


def read_values(path: str, num_examples: int, split: Optional[str] = None) -> np.ndarray:
  """Values [N] in id order for a split of `num_examples` (rows of other splits skipped)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise UserError(f'scores file {path!r} does not exist')
  try:
    cols = pq.read_schema(path).names
    column = 'value' if 'value' in cols else 'score' if 'score' in cols else None
    if 'id' not in cols or column is None:
      raise UserError(f'scores file {path!r} has columns {cols}; it needs `id` and `value` or '
                      '`score`')
    by_split = 'split' in cols and split is not None
    table = pq.read_table(path, columns=['id', column] + (['split'] if by_split else []))
  except (pa.ArrowInvalid, OSError) as e:
    raise UserError(f'scores file {path!r} is not a readable parquet file ({e})') from None
  if by_split:
    table = table.filter(pc.equal(table.column('split'), split))
  id_type, value_type = table.schema.field('id').type, table.schema.field(column).type
  if not pa.types.is_integer(id_type):
    raise UserError(f'scores file {path!r}: column `id` must hold integers, it holds {id_type}')
  if not (pa.types.is_floating(value_type) or pa.types.is_integer(value_type)):
    raise UserError(f'scores file {path!r}: column `{column}` must hold numbers, it holds '
                    f'{value_type}')
  ids = np.asarray(table.column('id').to_numpy(), np.int64)
  values = np.asarray(table.column(column).to_numpy(), np.float64)
  inside = (ids >= 0) & (ids < num_examples)
  covered = np.zeros(num_examples, bool)
  covered[ids[inside]] = True
  if not covered.all() or len(ids) != num_examples or not inside.all():
    missing = np.flatnonzero(~covered)
    detail = (f'missing id {int(missing[0])}' if len(missing) else
              f'id {int(ids[~inside][0])} out of range' if (~inside).any() else 'duplicate ids')
    raise UserError(f'scores file {path!r} covers {int(covered.sum())} of the {num_examples} '
                    f'examples{f" of split {split!r}" if split else ""} ({detail}, '
                    f'{len(ids)} rows)')
  scores = np.empty(num_examples, np.float64)
  scores[ids] = values
  if not np.all(np.isfinite(scores)):
    raise UserError(f'scores file {path!r} has a non-finite score (id '
                    f'{int(np.flatnonzero(~np.isfinite(scores))[0])})')
  return scores
