"""Filtering a TFDS dataset with a rater or a scores file into a new TFDS dataset.

`filter_dataset(dataset, out, ...)` streams each filtered split in blocks (per example only a
float64 score, an int32 label and an int8 corruption record are held), scores every example (an
exported rater on all local devices, or the `value` column of a scores file keyed by id), picks the
kept examples (`keep`: exactly round(keep * N) of the best, ties to the lower id;
`threshold='streaming'`: an approximate threshold from a reservoir sample; `min_score`: score >=
value; `suggest_keep`: `keep` is the share of the upper cluster of the split's scores,
`select.suggest_keep`; `balance`: every class keeps its share) and writes `out`: the kept examples
as a TFDS dataset with the source's features, homepage, citation and metadata, described by how
it was made, the report in `info.metadata[METADATA]` (`tfds.builder_from_directory(out)`), the
other splits copied unchanged, `scores_<split>.parquet` (id, kept, and as both score and value
the value filtered on: the rater's score, or the scores file's `value`, e.g. minus TracIn's raw
score; label and corruption where the split has them), `filter_report.json` and `scores.png`.
Everything is written to a temporary folder beside `out` and renamed into place at the end
(`files.atomic_dir`).
`corruption` applies the same recorded corruption as the training pipeline to the filtered
splits before scoring (and writes the corrupted examples), for experiments. In a
`jax.distributed` job every process scores every P-th block, only the scores, labels and
corruption record are exchanged, each process computes the same exact threshold, and process 0
writes the dataset.
"""
import os
import shutil
from typing import NamedTuple, Optional, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from datarater import evaluation, files, multihost, plots
from datarater.curation import scores_file, select, tfds_writer
from datarater.data import corruption as corruption_lib
from datarater.data import pipeline
from datarater.data import source as source_lib
from datarater.errors import UserError

THRESHOLD_MODES = ('exact', 'streaming')
REPORT = 'filter_report.json'  # in every output: what --overwrite may replace
METADATA = 'datarater_filter'  # the output's info.metadata key: the reports of its filters


def _save_histogram(path: str, per_split: dict, title: str) -> None:
  """Per split, its scores: kept, dropped and corrupted; `title` says whose scores of what."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(per_split), figsize=(5 * len(per_split), 3.8), squeeze=False)
  for ax, (split, d) in zip(axes[0], per_split.items()):
    s, kept = d['scores'], d['kept']
    unit, bins = plots.score_bins(s)
    s = s / unit if unit != 1.0 else s
    count = lambda mask: np.histogram(s, bins, weights=mask.astype(np.float32))[0]  # no copy of s
    ax.stairs(count(kept), bins, fill=True, alpha=0.7, label=f'kept ({int(kept.sum())})')
    ax.stairs(count(~kept), bins, fill=True, alpha=0.7, label=f'dropped ({int((~kept).sum())})')
    if d['record'] is not None and d['record'].any():
      bad = d['record'] != 0
      ax.stairs(count(bad), bins, color='k',
                label=f'corrupted ({int(bad.sum())}, {int((bad & kept).sum())} kept)')
    rule = (f'keep {d["keep"]:.3g}' if d['keep'] else f'score >= {d["threshold"]["all"]:.4g}')
    ax.set_title(f'split {split}: {rule}')
    ax.set_ylabel('examples')
    ax.set_xlabel('score' if unit == 1.0 else f'score / {unit:.0e}')
    ax.legend(fontsize=8)
  fig.suptitle(title)
  width = 5 * len(per_split)  # fixed margins, in inches (tight_layout would draw it twice)
  fig.subplots_adjust(left=0.7 / width, right=1 - 0.15 / width, bottom=0.13, top=0.82,
                      wspace=0.25)
  files.save_figure(fig, path, dpi=90)
  plt.close(fig)


def _example_transform(split: Optional[source_lib.Source]):
  """TFDS examples (a chunk, by id) -> the same examples corrupted as the training pipeline
  would, each with its kind in the `corruption` record, the whole chunk at once (for the
  writer); `split=None`: a split copied as it is (every example clean)."""
  def transform(ids, examples):
    if split is None:
      return [{**example, pipeline.RECORDED: 0} for example in examples]
    raw = split.raw(np.asarray(ids))
    kinds = split.corruption_of(np.asarray(ids))
    return [{**example, **{k: v[j] for k, v in raw.items()}, pipeline.RECORDED: int(kinds[j])}
            for j, example in enumerate(examples)]
  return transform


def filter_dataset(dataset: str, out: str, splits: Sequence[str] = ('train',), *,
                   rater: Optional[str] = None, scores: Optional[str] = None,
                   keep: Optional[float] = None, min_score: Optional[float] = None,
                   suggest_keep: bool = False, threshold: str = 'exact', balance: bool = False,
                   data_dir: str = '',
                   corruption: Optional[corruption_lib.Corruption] = None,
                   copy_other_splits: bool = True, batch_size: int = 1024,
                   overwrite: bool = False, devices=None) -> dict:
  """Runs the filter (see the module docstring); returns the report. Checks everything first."""
  splits = list(splits)
  corruption = corruption or corruption_lib.Corruption()
  with multihost.together('checking its settings and data'):
    if not out:
      raise UserError('--out is required')
    out = os.path.abspath(out)
    files.check_replaceable(out, overwrite)
    files.check_can_create(out)
    _check_settings(splits, rater, scores, keep, min_score, suggest_keep, threshold, balance,
                    batch_size)
    data = _open_dataset(dataset, data_dir, out, overwrite, splits, rater, scores, balance)
  pipeline.check_same_everywhere(data.builder, data.name)
  loaded = None if rater is None else _load_rater(rater, devices, data, corruption)
  with multihost.together('reading --scores'):
    given = (scores_file.read_values(scores, len(data.sources[splits[0]]), splits[0], data.name,
                                     planted=corruption.describe(),
                                     planted_by='launch.filter plants only symmetric noise: '
                                     '--label_noise, --noise_seed') if scores else None)

  # ---- pass 1: labels and scores, streamed; the kept examples chosen
  per_split = {}
  streams = {s: source_lib.Source(data.builder, s, corruption) for s in splits}
  for s in splits:
    split_scores, labels, record = _score_split(s, streams[s], batch_size, data.label, loaded,
                                                given)
    if not np.all(np.isfinite(split_scores)):
      bad = int(np.flatnonzero(~np.isfinite(split_scores))[0])
      raise UserError(f'the score of example {bad} of split {s!r} is not finite')
    split_keep = select.suggest_keep(split_scores) if suggest_keep else keep
    kept, thr = _choose(split_scores, labels, split_keep, min_score, threshold, balance,
                        data.num_classes, batch_size)
    if not kept.any():
      raise UserError(f'nothing of split {s!r} is kept (threshold {thr}; scores range '
                      f'{split_scores.min():.4g} .. {split_scores.max():.4g})')
    if len(streams[s].corruption_kinds) == 1:
      record = None
    per_split[s] = {'scores': split_scores, 'labels': labels, 'kept': kept, 'threshold': thr,
                    'record': record, 'keep': split_keep}

  # ---- pass 2: write into a temporary folder, renamed into place at the end
  selection = {s: np.flatnonzero(d['kept']) for s, d in per_split.items()}
  if copy_other_splits:
    selection.update({s: np.arange(len(src)) for s, src in data.sources.items()
                      if s not in splits})
  # Planted corruption is written out, and recorded per example in a `corruption` feature (so
  # the output knows its own bad data, as a dataset with its own record does).
  planted = len(corruption.kinds) > 1
  transforms = {s: _example_transform(streams[s] if s in splits else None)
                for s in selection} if planted else {}
  added = ({pipeline.RECORDED: tfds.features.ClassLabel(names=list(corruption.kinds))}
           if planted else None)
  name = f'{data.builder.info.name}_filtered'
  report = {'dataset': data.name, 'name': name, 'keep': keep, 'min_score': min_score,
            'suggest_keep': bool(suggest_keep),
            'threshold_mode': threshold if min_score is None else 'min_score', 'balance': balance,
            'corruption': {'kinds': list(corruption.kinds), 'label_noise': corruption.label_noise,
                           'seed': corruption.seed},
            'source': {k: v and os.path.realpath(v) for k, v in (('rater', rater),
                                                                    ('scores', scores))},
            'copied_splits': sorted(set(selection) - set(splits)), 'splits': {}}
  # Process 0 writes the dataset; the others wait for it here (not at exit, where JAX aborts a
  # job whose processes end over 300 s apart) and stop with it if it fails or any process is
  # signalled.
  with multihost.together('writing the filtered dataset'):
    if jax.process_index() == 0:
      _write(out, overwrite, data.builder, name, selection, data.name, transforms,
             streams, splits, added, per_split, data.num_classes, corruption, report)
  return report  # (its splits only on process 0)


def _check_settings(splits, rater, scores, keep, min_score, suggest_keep, threshold, balance,
                    batch_size) -> None:
  """UserError for settings that contradict each other or are out of range (no data read)."""
  if (rater is None) == (scores is None):
    raise UserError('give exactly one of --rater and --scores')
  if (keep is not None) + (min_score is not None) + bool(suggest_keep) != 1:
    raise UserError('give exactly one of --keep, --min_score and --suggest_keep')
  if keep is not None:
    select.check_keep(keep)
  if min_score is not None and not np.isfinite(min_score):
    raise UserError(f'--min_score must be a finite number, got {min_score}')
  if threshold not in THRESHOLD_MODES:
    raise UserError(f'unknown --threshold {threshold!r} '
                    f'(choose from {", ".join(THRESHOLD_MODES)})')
  if threshold != 'exact' and min_score is not None:
    raise UserError(f'--threshold={threshold} needs --keep or --suggest_keep (it finds their '
                    'threshold; --min_score is one)')
  if balance and min_score is not None:
    raise UserError('--balance needs --keep or --suggest_keep (a score threshold cannot balance '
                    'classes)')
  if batch_size < 1:
    raise UserError(f'--batch_size must be >= 1, got {batch_size}')
  if not splits:
    raise UserError('--split names no split')
  twice = sorted({s for s in splits if list(splits).count(s) > 1})
  if twice:
    raise UserError(f'--split names {twice[0]!r} twice')
  if scores is not None and len(splits) > 1:
    raise UserError('--scores filters one split at a time (give one --split)')


class _Dataset(NamedTuple):
  """The dataset to filter."""
  builder: tfds.core.DatasetBuilder
  name: str                 # as reports and scores files name it
  info: pipeline.DataInfo
  label: Optional[str]      # the supervised label feature (None without supervised keys)
  num_classes: int          # of `label` (0: none)
  sources: dict             # every split's TFDS data source


def _open_dataset(dataset, data_dir, out, overwrite, splits, rater, scores,
                  balance) -> _Dataset:
  """`dataset` (a TFDS name prepared in `data_dir`, or a TFDS dataset folder such as an earlier
  filter's output), checked: `out` is none of the inputs, and every split in `splits` exists."""
  folder = os.path.exists(os.path.join(dataset, 'dataset_info.json'))
  if not folder and (os.path.isabs(dataset) or dataset.startswith('.')):
    raise UserError(f'--dataset {dataset!r} is not a TFDS dataset folder (no dataset_info.json)')
  section = ml_collections.ConfigDict({'name': dataset, 'data_dir': data_dir,
                                       'dataset_dir': dataset if folder else ''})
  builder, dataset = pipeline.builder_of(section, '--data_dir'), pipeline.dataset_name(section)
  files.check_apart(out, '--out', **{'dataset' if folder else 'data_dir': str(builder.data_dir)},
                    rater=rater or '', scores=scores or '')
  if not folder:  # nor anywhere among a prepared name's versions (a folder there named like a
    # later version is what a plain tfds.builder(name) would then load)
    files.check_apart(out, '--out', **{f'data_dir\'s {dataset} versions folder':
                                       os.path.dirname(str(builder.data_dir))})
  files.check_replaceable(out, overwrite, REPORT)  # not an input: is it an earlier output?
  files.check_not_in_dataset(out, '--out', itself=False)
  info = pipeline.data_info(builder)
  for s in splits:
    if s not in builder.info.splits:
      what = ('is filtered by whole splits, not expressions like' if '[' in s or '+' in s
              else 'has no split')
      raise UserError(f'dataset {dataset!r} {what} {s!r} '
                      f'(it has: {", ".join(builder.info.splits)})')
  label = info.supervised_keys[1] if info.supervised_keys else None
  num_classes = info.num_classes.get(label, 0)
  if balance and not num_classes:
    raise UserError(f'--balance needs a class-label target; dataset {dataset!r} has none')
  sources = {s: builder.as_data_source(split=s) for s in builder.info.splits}
  return _Dataset(builder, dataset, info, label, num_classes, sources)


def _load_rater(rater: str, devices, data: _Dataset, corruption):
  """The exported rater or rater run `rater`, checked against the data; the same on every
  process."""
  from datarater.export import load_rater  # pylint: disable=g-import-not-at-top
  # Each process loads it alone: one that fails or is signalled stops every process.
  with multihost.together('loading the rater'):
    loaded = load_rater(rater, devices=devices)
    loaded.check_matches(data.info, f'dataset {data.name!r}', corruption)
  if not multihost.same_everywhere(files.digest(jax.device_get(loaded.params))):
    raise UserError(f'--rater {rater!r} changed while the processes loaded it (a run still '
                    'training?): filter again')
  return loaded


def _score_split(name: str, stream: source_lib.Source, batch_size: int, label: Optional[str],
                 loaded, given: Optional[np.ndarray]):
  """(scores float64 [N], labels int32 [N], corruption record int8 [N]) of a split, streamed in
  blocks: each process scores its own blocks, then every process gets all of them. The scores
  are the rater's, or `given` (a scores file's values)."""
  n = len(stream)
  labels = np.zeros(n, np.int32)
  record = stream.corruption_record
  if record is None:  # the dataset's own record, read with the examples
    record = np.zeros(n, np.int8)
  scores = np.empty(n, np.float64) if given is None else given

  def fill(ids, batch):
    if label is not None:
      labels[ids] = batch[label]
    if pipeline.RECORDED in batch:
      record[ids] = batch[pipeline.RECORDED]
    if loaded is not None:
      scores[ids] = loaded(batch)
  # Ctrl-C or SIGTERM to any process stops every process after the block it is in, or after
  # the exchange: nothing is written. Only the labels, record and scores are exchanged.
  return evaluation.shared_pass(stream, batch_size, fill, (scores, labels, record),
                                f'scoring {name}')


def _choose(scores, labels, keep, min_score, threshold, balance, num_classes, batch_size):
  """(kept mask [N], thresholds {'all' or class: score}) of a split's scores: `min_score`, or
  the best `keep` share (`threshold`: 'exact', or 'streaming' from a sketch fed block by block
  in id order, as one process reads them), per class with `balance`."""
  if min_score is not None:
    return select.select_threshold(scores, min_score), {'all': float(min_score)}
  if threshold == 'exact':
    kept = select.select_top(scores, keep, None, labels, num_classes, balance)
    return kept, {'all': float(np.min(scores, where=kept, initial=np.inf))}
  groups = range(num_classes) if balance else [None]
  sketch = {c: select.StreamingQuantile(seed=0 if c is None else c) for c in groups}
  for start in range(0, len(scores), batch_size):  # the blocks of `Source.block_starts`
    ids = np.arange(start, min(start + batch_size, len(scores)))
    for c, q in sketch.items():
      q.update(scores[ids] if c is None else scores[ids][labels[ids] == c])
  cut = {c: q.keep_threshold(keep) if q.count else np.inf for c, q in sketch.items()}
  lowest = cut[None] if not balance else np.array([cut[c] for c in groups])[labels]
  return scores >= lowest, {'all' if c is None else str(c): float(v) for c, v in cut.items()}


def _split_report(d: dict, num_classes: int) -> dict:
  """What the report says of one filtered split (`per_split`'s entry)."""
  kept, labels = d['kept'], d['labels']
  info = {'num_examples': int(len(kept)), 'kept': int(kept.sum()), 'keep': d['keep'],
          'requested': select.keep_count(len(kept), d['keep']) if d['keep'] else None,
          'threshold': d['threshold']}
  if num_classes:
    info['num_per_class'] = np.bincount(labels, minlength=num_classes).tolist()
    info['kept_per_class'] = np.bincount(labels[kept], minlength=num_classes).tolist()
  if d['record'] is not None:
    info['corrupted'] = int((d['record'] != 0).sum())
    info['kept_corrupted'] = int(((d['record'] != 0) & kept).sum())
  return info


def _description(report: dict, source_description: str, planted: Optional[dict]) -> str:
  """The output's TFDS description: how it was made (the report's settings and the corruption
  `planted`, `Corruption.describe()`), then the source's."""
  rater, scores = report['source']['rater'], report['source']['scores']
  lines = [f'{report["dataset"]} filtered by launch.filter with '
           + (f'rater {rater}' if rater else f'scores file {scores}')]
  for s, d in report['splits'].items():
    if report['min_score'] is not None:
      how = f'score >= {report["min_score"]:.9g}'
    else:
      cut = d['threshold']  # one per class with --balance: in the report
      cut = f'{cut["all"]:.9g}' if list(cut) == ['all'] else 'per class'
      how = (f'{"suggested keep" if report["suggest_keep"] else "keep"} {d["keep"]:.9g}'
             f'{", each class its share" if report["balance"] else ""}, '
             f'{report["threshold_mode"]} threshold {cut}')
    lines.append(f'{s}: kept {d["kept"]} of {d["num_examples"]} examples ({how})')
  if planted:
    rates = ', '.join(f'{kind} {rate:g}' for kind, rate in planted['rates'].items())
    partners = f', confusions {planted["confusions"]}' if 'confusions' in planted else ''
    lines.append(f'planted before scoring: {rates} (seed {planted["seed"]}{partners}), recorded '
                 f'in feature {pipeline.RECORDED!r}')
  if report['copied_splits']:
    lines.append(f'copied unchanged: {", ".join(report["copied_splits"])}')
  lines.append(f'(info.metadata[{METADATA!r}][-1]: the filter\'s report, {REPORT})')
  return '\n'.join(lines) + (f'\n\nSource: {source_description}' if source_description else '')


def _write(out, overwrite, builder, name, selection, dataset, transforms, streams, splits,
           added, per_split, num_classes, corruption, report) -> None:
  """Writes the filtered dataset, its scores files, report and figure (fills report['splits'])."""
  for s, d in per_split.items():
    report['splits'][s] = _split_report(d, num_classes)
  # The dataset's info says how it was made: its description, and its metadata the report, after
  # those of the filters that made its source (a filtered dataset filtered again).
  earlier = list((builder.info.metadata or {}).get(METADATA, []))
  with files.atomic_dir(out, overwrite, marker=REPORT) as tmp:
    folder = tfds_writer.write_subset(builder, os.path.join(tmp, 'tfds'), name, selection,
                                      _description(report, builder.info.description,
                                                   corruption.describe()),
                                      transforms, {s: streams[s].data_source for s in splits},
                                      added, {METADATA: [*earlier, report]})
    for s, d in per_split.items():
      kept, labels = d['kept'], d['labels']
      extra = {'kept': kept}  # the split is in the file's name
      if num_classes:  # the supervised label (none without supervised keys)
        extra['label'] = labels
      if d['record'] is not None:
        extra['corruption'] = d['record']
      scores_file.write(os.path.join(folder, f'scores_{s}.parquet'), np.arange(len(kept)),
                        d['scores'], d['scores'], dataset=dataset, split=s,
                        planted=corruption.describe(), **extra)
    files.write_json(os.path.join(folder, REPORT), report)
    given = report['source']
    source = 'rater scores' if given['rater'] else f'scores of {os.path.basename(given["scores"])}'
    source += ', suggested keep' if report['suggest_keep'] else ''
    plots.draw_or_warn(lambda path: _save_histogram(  # a figure that fails is a warning
        path, per_split, f'{builder.info.name}: {source}'), os.path.join(folder, 'scores.png'))
    # The dataset folder itself becomes `out`: move its contents up into the temporary root.
    for entry in os.listdir(folder):
      os.rename(os.path.join(folder, entry), os.path.join(tmp, entry))
    shutil.rmtree(os.path.join(tmp, 'tfds'))
