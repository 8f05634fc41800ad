"""Valuing every training example with one method: the run behind `launch.valuate`.

`valuate(method, config, workdir)` fits the method (`factory.build`) to the config's task and
training split (corrupted as `config.data` says), scores every training example and writes
`scores_<method>.parquet` (a scores file: id, score, value, the corruption record; Mimic adds its
offline keep decision) and `scores_<method>.json` (noise AUROC overall and per corruption kind,
what the method cost, the config).
"""
import json
import os

import jax
import numpy as np

from datarater import config_checks, evaluation, files, tasks
from datarater.curation import scores_file
from datarater.data import pipeline
from datarater.errors import UserError
from datarater.valuation import factory
from datarater.valuation.mimic import mimic_filter


def valuate(method: str, config, workdir: str, progress: bool = True) -> dict:
  """Fits `method`, scores the training split, writes the files; returns the summary."""
  if method not in factory.METHODS:
    raise UserError(f'unknown --method {method!r} (choose from {", ".join(factory.METHODS)})')
  if not workdir:
    raise UserError('--workdir is required')
  config_checks.validate(config, ('data', 'task', 'valuation'))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir {workdir!r} exists and is not a folder')
  d = config.data
  train = pipeline.load_split(d, d.train_split, corrupt=True)
  heldout = pipeline.load_split(d, d.heldout_split)
  task = tasks.make_task(config.task, train.info)
  valuation = factory.build(method, config, task, train, heldout)
  # Trace one scoring call before anything is written: bad layer names etc. fail here.
  jax.eval_shape(valuation.score, train.take(np.arange(min(2, len(train)))))
  with files.workdir_lock(workdir):
    return _write(method, config, workdir, progress, train, valuation)


def _write(method, config, workdir, progress, train, valuation) -> dict:
  scores = evaluation.score_split(valuation.score, train, config.valuation.score_batch_size,
                                  progress=progress, desc=f'{method} scores')
  values = scores if valuation.higher_is_better else -scores
  stem = os.path.join(workdir, f'scores_{method}')
  extra, columns = {}, {'corruption': train.corruption}
  if method == 'mimic':  # Grad-Mimic's offline filter: keep/drop with an automatic threshold.
    fraction = config.valuation.mimic_keep_fraction or None
    columns['keep'], extra['keep_threshold'] = mimic_filter(values, fraction)
    extra['kept'] = int(columns['keep'].sum())
  scores_file.write(stem + '.parquet', train.ids, scores, values, **columns)
  summary = {'method': method, 'valuation': valuation.name, 'num_examples': len(train),
             'higher_is_better': valuation.higher_is_better,
             'noise_auroc': evaluation.noise_auroc(values, train.is_corrupted),
             'auroc_by_kind': evaluation.auroc_by_kind(values, train),
             'corruption_kinds': list(train.corruption_kinds),
             'example_gradients': int(valuation.example_gradients), **extra,
             'config': json.loads(config.to_json_best_effort())}
  files.write_json(stem + '.json', summary)
  return summary
