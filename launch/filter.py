r"""Filters a TFDS dataset with a rater or a scores file into a new TFDS dataset.

  python -m launch.filter --dataset=sklearn_digits --split=train --rater=RATER_DIR --keep=0.8 \
      --out=OUT_DIR
  python -m launch.filter --dataset=sklearn_digits --split=train --scores=scores.parquet \
      --min_score=0.0 --out=OUT_DIR

Streams each split in batches (never the whole dataset in memory: only one float score per
example), scores every example (an exported rater, `launch.export_rater`, on all local devices; or
the `value` column of a scores parquet keyed by TFDS example `id`, e.g. from `launch.valuate`),
picks the kept examples (`--keep`: exactly round(keep * N) of the best, ties to the lower id;
`--threshold=streaming`: an approximate threshold from a reservoir sample, see
datarater/filtering.py; `--min_score`: score >= value; `--balance`: every class keeps its share)
and writes OUT_DIR: the kept examples as a TFDS dataset with the source's features
(`tfds.builder_from_directory(OUT_DIR)`), the other splits copied unchanged, `scores.parquet`
(id, label, score, kept), `filter_report.json` and `scores.png` (score histogram, kept vs dropped).
Everything is written to a temporary folder beside OUT_DIR and renamed into place at the end, so an
interrupted run leaves OUT_DIR absent (or, with --overwrite, the previous one), never half-written.
`--label_noise` applies the same recorded symmetric label noise as the training pipeline
(`datarater.data.pipeline`) to the filtered splits before scoring, for experiments.
"""
import glob
import json
import os
import shutil
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from datarater import checkpointing, filtering, tfds_writer
from datarater.data import pipeline
from datarater.errors import UserError, exit_on_user_error

FLAGS = flags.FLAGS
THRESHOLD_MODES = ('exact', 'streaming')


def define_flags() -> None:
  flags.DEFINE_string('dataset', 'sklearn_digits', 'TFDS dataset name (prepared in --data_dir).')
  flags.DEFINE_string('data_dir', '', 'TFDS data_dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets).')
  flags.DEFINE_list('split', ['train'], 'Split(s) to filter; other splits are copied unchanged.')
  flags.DEFINE_string('rater', None, 'An exported rater folder (launch.export_rater).')
  flags.DEFINE_string('scores', None, 'A parquet of per-example scores: `id` and `value` or `score`.')
  flags.DEFINE_float('keep', None, 'Fraction of each filtered split to keep, in (0, 1].')
  flags.DEFINE_float('min_score', None, 'Keep examples scoring >= this (instead of --keep).')
  flags.DEFINE_enum('threshold', 'exact', THRESHOLD_MODES, 'How --keep finds its threshold.')
  flags.DEFINE_bool('balance', False, 'Per-class balance: each class keeps its --keep share.')
  flags.DEFINE_float('label_noise', 0.0, 'Symmetric label noise applied to the filtered splits.')
  flags.DEFINE_integer('noise_seed', 0, 'Seed of --label_noise.')
  flags.DEFINE_bool('copy_other_splits', True, 'Copy the splits not filtered into OUT_DIR.')
  flags.DEFINE_integer('batch_size', 1024, 'Examples read and scored at a time.')
  flags.DEFINE_string('out', None, 'Output folder (a TFDS dataset folder).')
  flags.DEFINE_bool('overwrite', False, 'Replace OUT_DIR if it exists.')


def _stream(source, batch_size: int, desc: str):
  """(ids, examples) chunks of a random-access TFDS source, in id order."""
  n = len(source)
  for start in tqdm(range(0, n, batch_size), desc=desc, unit='batch', disable=None):
    ids = list(range(start, min(n, start + batch_size)))
    yield np.asarray(ids, np.int64), source.__getitems__(ids)


def _noise_offsets(n: int, num_classes: int, rate: float, seed: int) -> np.ndarray:
  """Label shifts of pipeline.symmetric_label_noise: noisy = (label + offset) % C (0 = clean)."""
  return pipeline.symmetric_label_noise(np.zeros(n, np.int32), num_classes, rate, seed)[0]


def read_scores_file(path: str, split: str, num_examples: int) -> np.ndarray:
  """Scores [N] in id order from a parquet (`id`, and `value` (higher = better) or `score`)."""
  if not os.path.exists(path):
    raise UserError(f'scores file {path!r} does not exist')
  try:
    table = pq.read_table(path)
  except (pa.ArrowInvalid, OSError) as e:
    raise UserError(f'scores file {path!r} is not a readable parquet file ({e})') from None
  cols = table.column_names
  column = 'value' if 'value' in cols else 'score' if 'score' in cols else None
  if 'id' not in cols or column is None:
    raise UserError(f'scores file {path!r} has columns {cols}; it needs `id` and `value` or `score`')
  if 'split' in cols:
    mask = np.asarray(table.column('split').to_pylist()) == split
    table = table.filter(pa.array(mask))
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
                    f'examples of split {split!r} ({detail}, {len(ids)} rows)')
  scores = np.empty(num_examples, np.float64)
  scores[ids] = values
  if not np.all(np.isfinite(scores)):
    raise UserError(f'scores file {path!r} has a non-finite score (id '
                    f'{int(np.flatnonzero(~np.isfinite(scores))[0])})')
  return scores


def _decode_batch(examples) -> dict:
  image = np.stack([np.asarray(e['image']) for e in examples]).astype(np.float32) / 255.0
  return {'image': image, 'label': np.asarray([int(e['label']) for e in examples], np.int32)}


def _save_histogram(path: str, per_split: dict) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(per_split), figsize=(5 * len(per_split), 3.5), squeeze=False)
  for ax, (split, d) in zip(axes[0], per_split.items()):
    s, kept = d['scores'], d['kept']
    bins = np.linspace(s.min(), s.max() + 1e-9, 41)
    ax.hist(s[kept], bins, alpha=0.7, label=f'kept ({int(kept.sum())})')
    ax.hist(s[~kept], bins, alpha=0.7, label=f'dropped ({int((~kept).sum())})')
    if d['corrupted'] is not None and d['corrupted'].any():
      ax.hist(s[d['corrupted']], bins, histtype='step', color='k', label='label corrupted')
    ax.set_title(f'{split}: scores'); ax.set_xlabel('score'); ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90, metadata={'Software': None})
  plt.close(fig)


def _clean_stale(out: str) -> None:
  """Removes temporary folders left by killed runs for the same OUT_DIR."""
  for tmp in glob.glob(os.path.join(os.path.dirname(out), f'.{os.path.basename(out)}.tmp-*')):
    try:
      pid = int(tmp.rsplit('-', 1)[1])
      os.kill(pid, 0)  # still running: leave it
    except (ValueError, ProcessLookupError):
      shutil.rmtree(tmp, ignore_errors=True)
    except PermissionError:
      pass


def filter_dataset(dataset: str, out: str, splits: Sequence[str] = ('train',), *,
                   rater: Optional[str] = None, scores: Optional[str] = None,
                   keep: Optional[float] = None, min_score: Optional[float] = None,
                   threshold: str = 'exact', balance: bool = False, data_dir: str = '',
                   label_noise: float = 0.0, noise_seed: int = 0, copy_other_splits: bool = True,
                   batch_size: int = 1024, overwrite: bool = False, devices=None) -> dict:
  """Runs the filter (see the module docstring); returns the report. Checks everything first."""
  # ---- every check before anything is written
  if not out:
    raise UserError('--out is required')
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise UserError(f'output {out!r} already exists (pass --overwrite to replace it)')
  if (rater is None) == (scores is None):
    raise UserError('give exactly one of --rater and --scores')
  if (keep is None) == (min_score is None):
    raise UserError('give exactly one of --keep and --min_score')
  if keep is not None:
    filtering.check_keep(keep)
  if threshold not in THRESHOLD_MODES:
    raise UserError(f'unknown --threshold {threshold!r} (choose from {", ".join(THRESHOLD_MODES)})')
  if balance and keep is None:
    raise UserError('--balance needs --keep (a score threshold cannot balance classes)')
  if batch_size < 1:
    raise UserError(f'--batch_size must be >= 1, got {batch_size}')
  splits = list(splits)
  if not splits:
    raise UserError('--split names no split')
  builder = pipeline.get_builder(dataset, data_dir)
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise UserError(f'dataset {dataset!r} has features {list(features)}; need `image` and `label`')
  for s in splits:
    if s not in builder.info.splits:
      raise UserError(f'dataset {dataset!r} has no split {s!r} '
                      f'(it has: {", ".join(builder.info.splits)})')
  num_classes = features['label'].num_classes
  sources = {s: builder.as_data_source(split=s) for s in builder.info.splits}
  loaded = score_table = None
  if rater is not None:
    from datarater.export import load_rater  # pylint: disable=g-import-not-at-top
    loaded = load_rater(rater, devices=devices)
    loaded.check_matches(features['image'].shape, num_classes, f'dataset {dataset!r}')
  else:
    if len(splits) > 1:
      raise UserError('--scores filters one split at a time (give one --split)')
    score_table = read_scores_file(scores, splits[0], len(sources[splits[0]]))

  # ---- pass 1: labels and scores, streamed
  per_split = {}
  for s in splits:
    n = len(sources[s])
    offsets = (_noise_offsets(n, num_classes, label_noise, noise_seed) if label_noise
               else np.zeros(n, np.int32))
    labels = np.empty(n, np.int32)
    split_scores = np.empty(n, np.float64) if score_table is None else score_table
    sketch = {c: filtering.StreamingQuantile(seed=c) for c in range(num_classes)} if balance \
        else {None: filtering.StreamingQuantile()}
    for ids, examples in _stream(sources[s], batch_size, f'scoring {s}'):
      batch = _decode_batch(examples) if loaded is not None else {
          'label': np.asarray([int(e['label']) for e in examples], np.int32)}
      batch['label'] = ((batch['label'] + offsets[ids]) % num_classes).astype(np.int32)
      labels[ids] = batch['label']
      if loaded is not None:
        split_scores[ids] = loaded(batch)
      if threshold == 'streaming':
        for c, q in sketch.items():
          q.update(split_scores[ids] if c is None else split_scores[ids][batch['label'] == c])
    if min_score is not None:
      kept, thr = filtering.select_threshold(split_scores, min_score), {'all': float(min_score)}
    elif threshold == 'exact':
      kept = filtering.select_top(split_scores, keep, np.arange(n), labels, num_classes, balance)
      thr = {'all': float(split_scores[kept].min())}
    else:
      cut = {c: q.keep_threshold(keep) if q.count else np.inf for c, q in sketch.items()}
      kept = split_scores >= (cut[None] if not balance else np.array([cut[c] for c in labels]))
      thr = {'all' if c is None else str(c): float(v) for c, v in cut.items()}
    per_split[s] = {'scores': split_scores, 'labels': labels, 'kept': kept, 'threshold': thr,
                    'offsets': offsets,
                    'corrupted': offsets != 0 if label_noise else None}

  # ---- pass 2: write into a temporary folder, then rename
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  _clean_stale(out)
  tmp_root = os.path.join(parent, f'.{os.path.basename(out)}.tmp-{os.getpid()}')
  shutil.rmtree(tmp_root, ignore_errors=True)
  os.makedirs(tmp_root)
  selection = {s: np.flatnonzero(d['kept']) for s, d in per_split.items()}
  if copy_other_splits:
    selection.update({s: np.arange(len(src)) for s, src in sources.items() if s not in splits})

  def relabel(offsets):
    def transform(i, example):
      example = dict(example)
      example['label'] = int((int(example['label']) + int(offsets[i])) % num_classes)
      return example
    return transform

  transforms = {s: relabel(d['offsets']) for s, d in per_split.items() if label_noise}
  description = (f'{dataset} filtered by '
                 f'{"rater " + os.path.basename(os.path.normpath(rater)) if rater else "scores"}')
  name = f'{dataset}_filtered'
  folder = tfds_writer.write_subset(builder, os.path.join(tmp_root, 'tfds'), name, selection,
                                    description, transforms)
  report = {'dataset': dataset, 'name': name, 'keep': keep, 'min_score': min_score,
            'threshold_mode': threshold if keep is not None else 'min_score', 'balance': balance,
            'label_noise': label_noise, 'noise_seed': noise_seed,
            'source': {'rater': rater, 'scores': scores},
            'copied_splits': sorted(set(selection) - set(splits)), 'splits': {}}
  for s, d in per_split.items():
    kept, labels = d['kept'], d['labels']
    columns = {'id': np.arange(len(kept), dtype=np.int64), 'label': labels,
               'score': d['scores'].astype(np.float64), 'kept': kept}
    if d['corrupted'] is not None:
      columns['is_corrupted'] = d['corrupted']
    columns['split'] = np.full(len(kept), s)
    pq.write_table(pa.table(columns), os.path.join(folder, f'scores_{s}.parquet'))
    info = {'num_examples': int(len(kept)), 'kept': int(kept.sum()),
            'requested': filtering.keep_count(len(kept), keep) if keep is not None else None,
            'threshold': d['threshold'],
            'num_per_class': np.bincount(labels, minlength=num_classes).tolist(),
            'kept_per_class': np.bincount(labels[kept], minlength=num_classes).tolist()}
    if d['corrupted'] is not None:
      info['corrupted'] = int(d['corrupted'].sum())
      info['kept_corrupted'] = int((d['corrupted'] & kept).sum())
    report['splits'][s] = info
  checkpointing.write_json_atomic(os.path.join(folder, 'filter_report.json'), report)
  _save_histogram(os.path.join(folder, 'scores.png'), per_split)
  old = None
  if os.path.exists(out):
    old = os.path.join(parent, f'.{os.path.basename(out)}.tmp-{os.getpid()}-old')
    os.rename(out, old)
  os.rename(folder, out)
  shutil.rmtree(tmp_root, ignore_errors=True)
  if old:
    shutil.rmtree(old, ignore_errors=True)
  return report


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  with exit_on_user_error():
    report = filter_dataset(
        FLAGS.dataset, FLAGS.out, FLAGS.split, rater=FLAGS.rater, scores=FLAGS.scores,
        keep=FLAGS.keep, min_score=FLAGS.min_score, threshold=FLAGS.threshold,
        balance=FLAGS.balance, data_dir=FLAGS.data_dir, label_noise=FLAGS.label_noise,
        noise_seed=FLAGS.noise_seed, copy_other_splits=FLAGS.copy_other_splits,
        batch_size=FLAGS.batch_size, overwrite=FLAGS.overwrite)
  for s, info in report['splits'].items():
    print(f'{s}: kept {info["kept"]} of {info["num_examples"]} examples')
  print(f'wrote {FLAGS.out} (tfds.builder_from_directory({FLAGS.out!r}))')


if __name__ == '__main__':
  define_flags()
  app.run(main)
