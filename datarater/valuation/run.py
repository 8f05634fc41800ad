"""Valuing every training example with one method: the run behind `launch.valuate`.

`valuate(method, config, workdir)` fits the method (`factory.build`) to the config's task and
training split, scores every training example and writes `scores_<method>.parquet` (a scores
file: id, score, value, the corruption record; Mimic adds its offline keep decision) and
`scores_<method>.json` (noise AUROC overall and per corruption kind, what the method cost, the
config). The training split is streamed (`data.source.Source`): the recorded training run reads
its batches as it goes and scoring reads fixed-size blocks, so memory does not grow with the
split (a few bytes per example). The fitted runs are kept in `workdir/fit/` and every finished
block's scores in a memory-mapped file, so a killed run resumes where it stopped and writes the
same files. In a `jax.distributed` job every process fits the same runs, scores every P-th
block, and process 0 merges the blocks into the one scores file.
"""
import contextlib
import hashlib
import json
import os
import pickle

import jax
import numpy as np
from tqdm import tqdm

from datarater import checkpointing, config_checks, evaluation, files, tasks
from datarater.curation import scores_file
from datarater.data import pipeline, source
from datarater.errors import UserError
from datarater.valuation import factory
from datarater.valuation.mimic import mimic_filter

SECTIONS = ('data', 'task', 'valuation')


def fingerprint(method: str, config) -> str:
  """What fixes a valuation's numbers: the method and the config's data, task and valuation."""
  fields = checkpointing.trajectory_fields(config)
  kept = {k: v for k, v in fields.items() if k.split('.')[0] in SECTIONS}
  return hashlib.sha256(json.dumps([method, kept], sort_keys=True).encode()).hexdigest()[:16]


class RunCache:
  """Fitted training runs kept in a folder by name (pickled host arrays, written atomically)."""

  def __init__(self, folder: str, tag: str):
    self.folder, self.tag = folder, tag

  def get(self, name: str, make):
    path = os.path.join(self.folder, f'{name}-{self.tag}.pkl')
    if os.path.exists(path):
      with open(path, 'rb') as f:
        return pickle.load(f)
    value = jax.device_get(make())
    if jax.process_index() == 0:
      os.makedirs(self.folder, exist_ok=True)
      with files.atomic_path(path) as tmp, open(tmp, 'wb') as f:
        pickle.dump(value, f)
    return value


def score_blocks(score_fn, split, block: int, partial: str, progress: bool, desc: str):
  """Scores this process's blocks of `split` into the memory-mapped [N] file `partial`, resuming
  after the blocks a `<partial>.json` says are done; returns the corruption record of those
  blocks (int8 [N], -1 elsewhere)."""
  p, num = jax.process_index(), jax.process_count()
  starts = split.block_starts(block, p, num)
  n = len(split)
  progress_path = partial + '.json'
  done = 0
  if os.path.exists(partial) and os.path.exists(progress_path):
    with open(progress_path) as f:
      done = json.load(f)['blocks_done']
    scores = np.lib.format.open_memmap(partial, mode='r+')
  else:
    scores = np.lib.format.open_memmap(partial, mode='w+', dtype=np.float64, shape=(n,))
  record = np.full(n, -1, np.int8)
  for start in starts[:done]:
    record[start:start + block] = split.corruption_of(np.arange(start, min(start + block, n)))
  fn = jax.jit(score_fn)
  with tqdm(total=len(starts), initial=done, desc=desc, unit='block', disable=not progress) as bar:
    for positions, batch in split.blocks(block, p, num, skip=done):
      padded = np.arange(positions[0], positions[0] + block) % n  # one shape: one compile
      out = np.asarray(fn(split.take(padded) if len(positions) < block else batch))
      scores[positions] = out[:len(positions)]
      record[positions] = split.corruption_of(positions)
      done += 1
      scores.flush()
      files.write_json(progress_path, {'blocks_done': done})
      bar.update(1)
  return record


def valuate(method: str, config, workdir: str, progress: bool = True) -> dict:
  """Fits `method`, scores the training split, writes the files; returns the summary."""
  if method not in factory.METHODS:
    raise UserError(f'unknown --method {method!r} (choose from {", ".join(factory.METHODS)})')
  if not workdir:
    raise UserError('--workdir is required')
  config_checks.validate(config, SECTIONS)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir {workdir!r} exists and is not a folder')
  d = config.data
  train = source.open_source(d, d.train_split, corrupt=True)
  heldout = pipeline.load_split(d, d.heldout_split)
  task = tasks.make_task(config.task, train.info)
  factory.make_projection(config.valuation)  # a bad name fails before any work
  factory.check(method, config, task, train)  # bad layer names etc. fail before any work
  primary = jax.process_index() == 0
  with files.workdir_lock(workdir) if primary else contextlib.nullcontext():
    tag = fingerprint(method, config)
    valuation = factory.build(method, config, task, train, heldout,
                              RunCache(os.path.join(workdir, 'fit'), tag))
    stem = os.path.join(workdir, f'scores_{method}')
    partial = os.path.join(workdir, f'.scores_{method}-{tag}.part-{jax.process_index()}.npy')
    record = score_blocks(valuation.score, train, config.valuation.score_batch_size, partial,
                          progress and primary, f'{method} scores')
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('datarater.valuate: blocks scored')
    if not primary:
      return {}
    return _write(method, config, workdir, stem, tag, train, valuation, record)


def _write(method, config, workdir, stem, tag, train, valuation, record) -> dict:
  """Merges the processes' blocks (process 0) and writes the scores file and its summary."""
  n, block = len(train), config.valuation.score_batch_size
  scores = np.empty(n, np.float64)
  parts = []
  for p in range(jax.process_count()):
    part = os.path.join(workdir, f'.scores_{method}-{tag}.part-{p}.npy')
    data = np.load(part, mmap_mode='r')
    for start in train.block_starts(block, p, jax.process_count()):
      scores[start:start + block] = data[start:start + block]
      if record[start] < 0:  # another process's block: its record too
        record[start:start + block] = train.corruption_of(np.arange(start, min(start + block, n)))
    parts.append(part)
  values = scores if valuation.higher_is_better else -scores
  extra, columns = {}, {'corruption': record}
  if method == 'mimic':  # Grad-Mimic's offline filter: keep/drop with an automatic threshold.
    fraction = config.valuation.mimic_keep_fraction or None
    columns['keep'], extra['keep_threshold'] = mimic_filter(values, fraction)
    extra['kept'] = int(columns['keep'].sum())
  scores_file.write(stem + '.parquet', train.ids, scores, values, **columns)
  summary = {'method': method, 'valuation': valuation.name, 'num_examples': n,
             'higher_is_better': valuation.higher_is_better,
             'noise_auroc': evaluation.noise_auroc(values, record != 0),
             'auroc_by_kind': evaluation.auroc_by_kind(values, record, train.corruption_kinds),
             'corruption_kinds': list(train.corruption_kinds),
             'example_gradients': int(valuation.example_gradients), **extra,
             'config': json.loads(config.to_json_best_effort())}
  files.write_json(stem + '.json', summary)
  for part in parts:  # the scores file holds them now
    for path in (part, part + '.json'):
      if os.path.exists(path):
        os.remove(path)
  return summary
