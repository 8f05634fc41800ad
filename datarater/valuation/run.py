"""Valuing every training example with one method: the run behind `launch.valuate`.

`valuate(method, config, workdir)` fits the method (`factory.build`) to the config's task and
training split, scores every training example and writes `scores_<method>.parquet` (a scores file:
id, score, value, the corruption record; Mimic adds its offline keep decision) and
`scores_<method>.json` (noise AUROC overall and per corruption kind, what the method cost, the
config). With `valuation.store`, the training examples' factored-projected gradients are written
once to a gradient store (`valuation/store.py`, `workdir/store_<method>-<fingerprint>`: a hash of
the method, config and data it depends on) and the scores come from it; `valuation.topk` > 0
also writes `topk_<method>.parquet`: for every example of `valuation.topk_split`, its most
supporting and most opposing training examples (TracIn). The
training split is streamed (`data.source.Source`): the recorded training run reads its batches as it
goes and scoring reads fixed-size blocks, so memory does not grow with the split (a few bytes per
example). The fitted runs are kept in `workdir/fit/` (by the fingerprint, which digests the
model's traced programs too: changed model code is fitted again) and every finished block's
scores in a memory-mapped file, so a killed run resumes where it stopped and writes the same
files (Ctrl-C or SIGTERM stops it after the block it scores, every process of a job after the
same one). In a
`jax.distributed` job every process fits the same runs, scores every P-th block, and process 0
merges the blocks into the one scores file.
"""
import contextlib
import glob
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import signal

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from datarater import (checkpointing, config_checks, evaluation, files, multihost, seeding,
                       tasks)
from datarater.curation import scores_file
from datarater.data import pipeline, source
from datarater.errors import UserError
from datarater.progress import bar as progress_bar, setup_logging
from datarater.valuation import factory, store
from datarater.valuation.mimic import mimic_filter

log = logging.getLogger('datarater')

SECTIONS = ('data', 'task', 'valuation')


def unread(method: str) -> tuple[str, ...]:
  """The sections and the fields (dotted) of SECTIONS that a valuation by `method` does not read:
  no split is evaluated (data.eval_split), and the rater's scores read neither the task (built
  to check the data alone) nor the held-out split."""
  return ('data.eval_split', *(('task', 'data.heldout_split') if method == 'datarater' else ()))


def fingerprint(method: str, config, *outside: str) -> str:
  """What fixes a valuation's numbers: the method, the config's data, task and valuation, how
  the seeds' keys derive (`seeding.KEYS_VERSION`), and digests of what the config only names (the
  dataset's files, a rater's parameters)."""
  fields = checkpointing.trajectory_fields(config)
  kept = {k: v for k, v in fields.items() if k.split('.')[0] in SECTIONS}
  return hashlib.sha256(json.dumps([method, kept, *outside, seeding.KEYS_VERSION],
                                   sort_keys=True).encode()).hexdigest()[:16]


def model_digest(task: tasks.Task) -> str:
  """A digest of the task's programs as traced (its init, and its loss on a batch of
  `tasks.base.CHECK_BATCH`) and of the constant arrays they hold: a model whose code changed
  under the same config (a layer's width, an activation, a fixed encoding) is fitted again, not
  valued on the runs of the old code."""
  params = jax.eval_shape(task.init, jax.random.key(0))
  b = tasks.base.CHECK_BATCH
  batch = {'index': jax.ShapeDtypeStruct((b,), np.int32),
           **{k: jax.ShapeDtypeStruct((b, *s.shape), s.dtype) for k, s in task.spec.items()}}
  programs = (jax.make_jaxpr(task.init)(jax.random.key(0)),
              jax.make_jaxpr(task.per_example_loss)(params, batch))
  digest = hashlib.sha256(printed(programs).encode())
  for const in (c for p in programs for c in p.consts):  # arrays the code made (printed by name)
    if jax.dtypes.issubdtype(getattr(const, 'dtype', None), jax.dtypes.prng_key):
      const = jax.random.key_data(const)
    const = np.asarray(const)
    digest.update(f'{const.dtype}{const.shape}'.encode() + const.tobytes())
  return digest.hexdigest()[:16]


def printed(programs) -> str:
  """Jaxprs as text, the same in every process: a frozenset parameter (a remat policy's names)
  prints in hash order, which differs between processes (PYTHONHASHSEED), so its elements are
  sorted."""
  return re.sub(r'frozenset\(\{([^{}]*)\}\)',
                lambda m: 'frozenset({' + ', '.join(sorted(m[1].split(', '))) + '})',
                ''.join(map(str, programs)))


def _part_path(workdir: str, method: str, tag: str, p: int, num: int) -> str:
  """Process p's partial scores; the name holds the process count, as the blocks p scores do."""
  return os.path.join(workdir, f'.scores_{method}-{tag}.part-{p}-of-{num}.npy')


class RunCache:
  """Fitted training runs kept in a folder by name (pickled host arrays, written atomically)."""

  def __init__(self, folder: str, tag: str):
    self.folder, self.tag = folder, tag

  def get(self, name: str, make):
    path = os.path.join(self.folder, f'{name}-{self.tag}.pkl')
    if os.path.exists(path):
      try:
        with open(path, 'rb') as f:
          return pickle.load(f)
      except (EOFError, pickle.UnpicklingError, ValueError) as e:  # damaged: made again
        log.warning('%s is unreadable (%s); fitting it again', path, e)
    value = jax.device_get(make())
    if jax.process_index() == 0:
      os.makedirs(self.folder, exist_ok=True)
      with files.atomic_path(path) as tmp, open(tmp, 'wb') as f:
        pickle.dump(value, f)
    return value


def _blocks_kept(partial: str, progress_path: str, n: int, num_blocks: int) -> int:
  """The blocks an earlier run scored into `partial` (and counted in `progress_path`), if both
  hold what this run would write: a float64 [n] file, whole, and a count of 0..num_blocks
  (a file cut short would read as zeros, a count past the blocks would keep what another run left).
  Otherwise 0, warned: scored again."""
  if not (os.path.exists(partial) and os.path.exists(progress_path)):
    return 0
  try:
    with open(progress_path) as f:
      done = json.load(f)['blocks_done']
    with open(partial, 'rb') as f:
      version = np.lib.format.read_magic(f)
      shape, _, dtype = {(1, 0): np.lib.format.read_array_header_1_0,
                         (2, 0): np.lib.format.read_array_header_2_0}[version](f)
      whole = os.path.getsize(partial) >= f.tell() + 8 * n
    if (type(done) is int and 0 <= done <= num_blocks  # pylint: disable=unidiomatic-typecheck
        and shape == (n,) and dtype == np.float64 and whole):
      return done
    why = 'another length or count'
  except (OSError, ValueError, KeyError, TypeError) as e:
    why = f'{type(e).__name__}: {e}'
  log.warning('warning: %s is not a partial scores file of this run (%s); scoring from the first '
              'block', partial, why)
  return 0


def score_blocks(score_fn, split, block: int, partial: str, progress: bool, desc: str,
                 check_data=None):
  """Scores this process's blocks of `split` into the memory-mapped [N] file `partial`, resuming
  after the blocks a `<partial>.json` says are done; returns the corruption record of those
  blocks (int8 [N], -1 elsewhere). `check_data(features)` refuses a block the scorer cannot read."""
  p, num = jax.process_index(), jax.process_count()
  starts = split.block_starts(block, p, num)
  n = len(split)
  progress_path = partial + '.json'
  # Each process opens its own file: one that cannot (a full disk) stops every process here (the
  # others would wait for it in the first vote for good).
  with multihost.together('opening its partial scores file'):
    done = _blocks_kept(partial, progress_path, n, len(starts))
    if done:
      scores = files.open_memmap(partial, 'r+')
    else:  # its count goes first: beside the new file of zeros it would keep them as scores
      if os.path.exists(progress_path):
        os.remove(progress_path)
      scores = files.open_memmap(partial, 'w+', np.float64, (n,))
  record = np.full(n, -1, np.int8)
  for start in starts[:done]:
    record[start:start + block] = split.corruption_of(np.arange(start, min(start + block, n)))
  fn = jax.jit(score_fn)

  def stopped(blocks_done, signum):
    if p == 0:
      tqdm.write(f'{desc}: stopped after {blocks_done} of {len(starts)} blocks (kept): '
                 f'{"a process of this job" if num > 1 else "the run"} was '
                 f'{"sent SIGTERM" if signum == signal.SIGTERM else "interrupted (Ctrl-C)"}; '
                 'run again to resume')

  # Ctrl-C or SIGTERM to any process stops every process after the block it is in (`StopVote`).
  # The blocks' read thread ends with the loop, however it is left (`contextlib.closing`).
  with multihost.StopVote(jax.devices(), done, stopped) as vote, progress_bar(
      total=len(starts), initial=done, desc=desc, unit='block', disable=not progress) as bar, \
      contextlib.closing(split.blocks(block, p, num, skip=done)) as blocks:
    for item in multihost.in_rounds(blocks, len(starts) - done):
      if item is not None:
        positions, batch = item
        if check_data:  # e.g. tokens outside the vocabulary (scored, they would be garbage)
          check_data({k: v for k, v in batch.items() if k != 'index'})
        padded = np.arange(positions[0], positions[0] + block) % n  # one shape: one compile
        out = np.asarray(fn(split.take(padded) if len(positions) < block else batch))
        scores[positions] = out[:len(positions)]
        record[positions] = split.corruption_of(positions)
        done += 1
        scores.flush()
        files.write_json(progress_path, {'blocks_done': done})
        bar.update(1)
      if vote.after(done):
        break
  return record


def made_with_another_config(stem: str, config) -> list[str]:
  """How `config` differs from the config whose scores files are at `stem` (their summary's),
  over the fields a valuation reads ('field=X there, Y here'); [] if none or no summary."""
  try:
    with open(stem + '.json') as f:
      theirs = ml_collections.ConfigDict(json.load(f)['config'])
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return []
  read = lambda c: {k: v for k, v in checkpointing.trajectory_fields(c).items()
                    if k.split('.')[0] in SECTIONS}
  return checkpointing.config_differences(read(theirs), read(config))


def topk_file(workdir: str, method: str) -> str:
  """Where `valuation.topk` writes its table."""
  return os.path.join(workdir, f'topk_{method}.parquet')


def valuate(method: str, config, workdir: str, progress: bool = True) -> dict:
  """Fits `method`, scores the training split, writes the files; returns the summary."""
  setup_logging()
  if method not in factory.METHODS:
    raise UserError(f'unknown --method {method!r} (choose from {", ".join(factory.METHODS)})')
  if not workdir:
    raise UserError('--workdir is required')
  with multihost.together('checking its settings and data'):
    config_checks.validate(config, SECTIONS)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise UserError(f'--workdir {workdir!r} exists and is not a folder')
    # Another launcher's files would mix with its own.
    files.check_not_other_run(workdir, 'scores_*.json', 'valuation')
    d = config.data
    files.check_outside(workdir, **{'data.dataset_dir': d.get('dataset_dir', '')})
    train = source.open_source(d, d.train_split, corrupt=True)
    if len(train) < 2:  # nothing to rank (and the layer probes take two examples)
      raise UserError(f'data.train_split {d.train_split!r} holds {len(train)} example(s); '
                      'valuing needs at least 2')
    heldout = pipeline.load_split(d, d.heldout_split)
    task = tasks.make_task(config.task, train.info)
    train.corruption.check_targets(train.info, task)
    task.check_data(heldout.features)  # (the streamed training split is not read whole here)
    factory.make_projection(config.valuation)  # a bad name fails before any work
    factory.check(method, config, task, train)  # bad layer names etc. fail before any work
    from_store = bool(config.valuation.store or config.valuation.topk)
    if config.valuation.topk:
      pipeline.check_split(pipeline.builder_of(d), config.valuation.topk_split)
    if from_store:
      _check_store_size(method, config, len(train), workdir)
    if from_store and jax.process_count() > 1:
      raise UserError('valuation.store and valuation.topk run in one process')
  pipeline.check_same_everywhere(pipeline.builder_of(d), pipeline.dataset_name(d))
  stem = os.path.join(workdir, f'scores_{method}')
  with multihost.workdir_lock(workdir):
    diffs = made_with_another_config(stem, config)
    if diffs and jax.process_index() == 0:  # said before the fit: still time to stop it
      log.warning('warning: %s.{parquet,json} hold the scores of another config (%s): this run '
                  'replaces them (a new --workdir keeps both)', stem, '; '.join(diffs[:3]))
    data_files = pipeline.files_digest(pipeline.builder_of(d))  # a folder written again
    model = model_digest(task)  # the model's code, which the config alone does not fix
    tag = fingerprint(method, config, data_files, model)
    cache = RunCache(os.path.join(workdir, 'fit'), tag)
    if progress and jax.process_index() == 0:  # before the scoring bar, a progress line
      fit = os.path.join(workdir, 'fit')
      tqdm.write(f'datarater: loading the rater {config.valuation.rater} ...'
                 if method == 'datarater' else
                 f'{method}: fitting to {len(train)} training examples (runs kept in {fit}) ...')
    # Each process fits alone (no collective; process 0 keeps the runs): one that fails or is
    # signalled stops every process once all have fitted (not alone, the others left waiting).
    with multihost.together('fitting'):
      valuation = factory.build(method, config, task, train, heldout, cache, fit=not from_store,
                                checked=True)
    if method == 'datarater':  # the path may be a rater run that has trained on since
      rater_digest = store.digest(jax.device_get(valuation.params))
      if not multihost.same_everywhere(rater_digest):
        raise UserError(f'valuation.rater {config.valuation.rater!r} changed while the processes '
                        'loaded it (a run still training?): run again')
      tag = fingerprint(method, config, data_files, model, rater_digest)
    if from_store:
      return _from_store(method, config, task, train, heldout, workdir, stem, tag, valuation,
                         cache, progress)
    partial = _part_path(workdir, method, tag, jax.process_index(), jax.process_count())
    scorer = valuation.rater if method == 'datarater' else task  # what reads the examples
    record = score_blocks(valuation.score, train, config.valuation.score_batch_size, partial,
                          progress and jax.process_index() == 0, f'{method} scores',
                          scorer.check_data)
    multihost.barrier('datarater.valuate: blocks scored')
    summary = {}  # process 0 writes the files; the others wait for it here (not at exit, where
    # JAX aborts a job whose processes end over 300 s apart) and stop with it if it fails or any
    # process is signalled
    with multihost.together('writing the scores file'):
      if jax.process_index() == 0:
        summary = _write(method, config, workdir, stem, tag, train, valuation, record)
    return summary


def _check_store_size(method: str, config, n: int, workdir: str) -> None:
  """Refuses a gradient store larger than the free space where it would go: at least
  valuation.store_k**2 float32s per example and checkpoint (one per projected layer; one
  embedding for the data value embedding, whose store keeps no training gradients). The
  method's stores already there count as free (one may be the store reused), so the check errs
  toward running."""
  v = config.valuation
  steps, every = factory.run_length(method, v)
  checkpoints = 1 if method == 'dvemb' else max(1, steps // every)
  need = n * v.store_k ** 2 * 4 * checkpoints
  folder = os.path.abspath(workdir)
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  free = shutil.disk_usage(folder).free
  for old in glob.glob(os.path.join(workdir, f'store_{method}-*')):
    free += sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(old)
                for f in names)
  if need > free:
    raise UserError(f'valuation.store_k={v.store_k} makes a gradient store of at least '
                    f'{need / 2**30:.3g} GiB ({n} examples x {v.store_k}**2 float32 x '
                    f'{checkpoints} checkpoint(s)), more than the {free / 2**30:.3g} GiB free in '
                    f'{folder!r}')


def _from_store(method, config, task, train, heldout, workdir, stem, tag, valuation, cache,
                progress) -> dict:
  """Scores (and top-k attribution) read from a gradient store of the fitted runs."""
  from datarater import pergrad  # pylint: disable=g-import-not-at-top
  from datarater.valuation import store as store_lib  # pylint: disable=g-import-not-at-top
  v = config.valuation
  loss = task.per_example_loss
  run, _ = factory.record_for(method, config, task, train, cache)
  # The in-memory method's layers (data value embedding takes every parameter).
  if method == 'mimic':
    layers = factory.mimic_layers(config, task, run.final_params, train)
  else:
    layers = factory.parse_layers(v.layers) if method == 'tracin' else None
  path = os.path.join(workdir, f'store_{method}-{tag}')
  store = store_lib.GradientStore(path) if os.path.exists(path) else None
  if store is not None and store.meta['projection']['layers'] != (
      None if layers is None else list(layers)):  # made by code that projected other layers
    log.info('rebuilding %s: it projects layers %s, the method reads %s', path,
             store.meta['projection']['layers'], layers)
    store = None
  if store is None:  # the data value embedding's reads only its embeddings (top-k is TracIn's)
    store = store_lib.build(path, loss, run, train, pergrad.factored_projection(
        v.store_k, v.store_k, v.projection_seed, layers), split_name=config.data.train_split,
                            block_size=v.score_batch_size, chunk_size=v.chunk_size,
                            overwrite=True, progress=progress, gradients=method != 'dvemb')
  heldout_batch = heldout.take(np.arange(len(heldout)))
  if method == 'tracin':
    if v.tracin_mode == 'self':
      scores = store.self_influence()
    else:
      scores = store.heldout_influence(loss, run, heldout_batch,
                                       cosine=v.tracin_mode == 'heldout_cos')
  elif method == 'mimic':
    reference, _ = factory.mimic_reference(config, task, heldout, cache)
    scores = store.mimic(loss, run, reference, cosine=v.mimic_cosine)
  else:
    if 'dvemb' not in store.meta:
      store.add_dvemb(task, run, v.dvemb_curvature, v.chunk_size)
    scores = store.dvemb_values(loss, run.final_params, heldout_batch)
  record = train.corruption_of(np.arange(len(train)))
  summary = _write(method, config, workdir, stem, tag, train, valuation, record, scores)
  if v.topk:
    test = pipeline.load_split(config.data, v.topk_split)
    top = store.top_k(loss, run, test.take(np.arange(len(test))), v.topk,
                      block_size=max(v.score_batch_size, 1024))
    k = top.support_ids.shape[1]
    scores_file_columns = {
        'test_id': np.repeat(test.ids, k), 'rank': np.tile(np.arange(k), len(test)),
        'support_id': top.support_ids.reshape(-1), 'support_score': top.support_scores.reshape(-1),
        'oppose_id': top.oppose_ids.reshape(-1), 'oppose_score': top.oppose_scores.reshape(-1)}
    files.write_parquet(topk_file(workdir, method), scores_file_columns)
    summary['topk'] = {'split': v.topk_split, 'k': int(k), 'num_test': len(test),
                       'file': topk_file(workdir, method)}
    files.write_json(stem + '.json', summary)
  return summary


def _write(method, config, workdir, stem, tag, train, valuation, record, scores=None) -> dict:
  """Writes the scores file and its summary; without `scores`, merges the processes' blocks
  (process 0) first."""
  n, block = len(train), config.valuation.score_batch_size
  if scores is None:
    scores = np.empty(n, np.float64)
    for p in range(jax.process_count()):
      part = _part_path(workdir, method, tag, p, jax.process_count())
      data = np.load(part, mmap_mode='r')
      for start in train.block_starts(block, p, jax.process_count()):
        scores[start:start + block] = data[start:start + block]
        if record[start] < 0:  # another process's block: its record too
          record[start:start + block] = train.corruption_of(
              np.arange(start, min(start + block, n)))
  bad = int(np.sum(~np.isfinite(scores)))
  if bad:  # nothing non-finite is written
    why = (f'the rater valuation.rater={config.valuation.rater!r} gives them'
           if method == 'datarater' else
           'a diverged recorded run? try a smaller --config.valuation.learning_rate')
    raise UserError(f'{method}: {bad} of {n} scores are not finite ({why})')
  values = scores if valuation.higher_is_better else -scores
  extra, columns = {}, {'corruption': record}
  if method == 'mimic':  # Grad-Mimic's offline filter: keep/drop with an automatic threshold.
    extra['layers'] = None if valuation.layers is None else list(valuation.layers)
    fraction = config.valuation.mimic_keep_fraction or None
    columns['keep'], extra['keep_threshold'] = mimic_filter(values, fraction, ids=train.ids)
    extra['kept'] = int(columns['keep'].sum())
  # An earlier run's summary and top-k table go first: killed before its summary is written,
  # this run leaves its scores file alone, not beside another run's (another config's) figures
  # (a top-k run writes its table anew).
  for stale in (stem + '.json', topk_file(workdir, method)):
    if os.path.exists(stale):
      os.remove(stale)
  scores_file.write(stem + '.parquet', train.ids, scores, values,
                    dataset=pipeline.dataset_name(config.data), split=config.data.train_split,
                    planted=train.corruption.describe(),
                    example_gradients=valuation.example_gradients, **columns)
  summary = {'method': method, 'valuation': valuation.name, 'scores_file': stem + '.parquet',
             'num_examples': n,
             'higher_is_better': valuation.higher_is_better,
             'noise_auroc': evaluation.noise_auroc(values, record != 0),
             'auroc_by_kind': evaluation.auroc_by_kind(values, record, train.corruption_kinds),
             'corruption_kinds': list(train.corruption_kinds),
             'example_gradients': int(valuation.example_gradients), **extra,
             'config': json.loads(config.to_json_best_effort())}
  summary = files.json_safe(summary)  # returned as written (an AUROC not defined is None)
  files.write_json(stem + '.json', summary)
  # The scores file holds them now; parts left by a run with another process count, or by a
  # killed run of another config (whose scores file this one replaces), go too.
  for path in glob.glob(os.path.join(glob.escape(workdir), f'.scores_{method}-*.part-*')):
    os.remove(path)
  return summary
