"""`launch.train --selection=NAME`: train from scratch under a selection policy, one run per seed.

Reads the launcher's config fields (data.*, task_model.*, train.{epochs, batch_size, optimizer,
learning_rate, seeds}) plus `selection_ratio` and the SAE fields of configs/selection.py, and
reports per epoch in launch.train's record format (mean and std over seeds). Selection runs
through `datarater.selection.harness`, which feeds each epoch's training losses back to the
policy (InfoBatch needs them; the weighting Trainer has no such channel).
"""
import numpy as np

from datarater import selection
from datarater.data import pipeline
from datarater.errors import UserError
from datarater.selection.base import gini


def _summary(history: list, count_gini: float, wall_s: float, setup: int) -> dict:
  """What the report needs of a finished seed's run (also kept in checkpoints as JSON)."""
  return {'history': history, 'count_gini': count_gini, 'wall_s': wall_s, 'setup': setup}


def run_selection(config, name: str, splits=None, log=print, checkpoints=None,
                  stop_after=None) -> dict:
  """Trains one model per seed under policy `name`; returns a launch.train-style report.

  `splits` = (train, heldout, eval) as the launcher loaded them (e.g. from --dataset_dir); by
  default they are read from config.data. With `checkpoints` (a RunCheckpointer) the seeds' runs
  are checkpointed every config.train.checkpoint_every epochs and at each seed's end, epochs
  counted over the seeds in turn (seed i, epoch e is step i * epochs + e); a run resumes from the
  latest one, finished seeds are not trained again. `stop_after`: checkpoint and return
  {'stopped_after': step} after that many epochs so counted.
  """
  if 'selection_ratio' not in config or 'sae' not in config:
    raise UserError(f'--selection={name} needs a selection config: pass '
                    '--config=configs/selection.py')
  d, t = config.data, config.train
  load = lambda s, noise=0.0: pipeline.load_split(d.name, s, d.data_dir, noise, d.noise_seed)
  if splits is None:
    splits = load(d.train_split, d.label_noise), load(d.heldout_split), load(d.eval_split)
  train, heldout, evals = splits
  epochs, every = t.epochs, t.get('checkpoint_every', 1)
  latest = checkpoints.latest_step() if checkpoints is not None else None
  runs = checkpoints.meta(latest)['extra']['completed'] if latest is not None else []
  for i, seed in enumerate(t.seeds):
    if i < len(runs):
      continue  # finished before the restart: its summary came with the checkpoint
    policy, info = selection.make_policy(name, train, config, int(seed))
    setup = int(info.get('extractor_example_grads', 0))
    first = i * epochs  # this seed's epochs are steps first+1 .. first+epochs

    def restore(abstract, first=first):
      if latest is None or latest <= first:
        return None
      state, meta = checkpoints.restore(latest, abstract)
      return state, meta['extra']['current']

    def on_epoch_end(epoch, state, progress, first=first, setup=setup):
      step = first + epoch
      stop = stop_after is not None and step >= stop_after and epoch < epochs
      if checkpoints is not None and (epoch % every == 0 or epoch == epochs or stop):
        done = runs + ([_summary(progress['history'], gini(state[1].counts), progress['wall_s'],
                                   setup)] if epoch == epochs else [])
        checkpoints.save(step, state, {'seed_index': i, 'epoch': epoch},
                         extra={'completed': done, 'current': progress if epoch < epochs else None})
      return stop
    run = selection.train_with_selection(
        policy, train, {'heldout': heldout, 'eval': evals}, hidden=tuple(config.task_model.hidden),
        activation=config.task_model.activation, optimizer=t.optimizer,
        learning_rate=t.learning_rate, epochs=epochs, batch_size=t.batch_size, seed=int(seed),
        restore=restore, on_epoch_end=on_epoch_end)
    if 'stopped_after' in run:
      if checkpoints is not None:
        checkpoints.close()
      return {'stopped_after': first + run['stopped_after']}
    runs.append(_summary(run['history'], run['count_gini'], run['wall_s'], setup))
  if checkpoints is not None:
    checkpoints.close()
  setup = sum(r['setup'] for r in runs)
  history = []
  for epoch in range(t.epochs):
    recs = [r['history'][epoch] for r in runs]
    rec = {'epoch': epoch + 1, 'examples': recs[0]['example_grads'], 'steps': recs[0]['steps']}
    for split in ('heldout', 'eval'):
      for key in ('loss', 'accuracy'):
        vals = np.array([r[split][key] for r in recs])
        rec.update({f'{split}_{key}': float(vals.mean()), f'{split}_{key}_std': float(vals.std())})
      rec[f'{split}_accuracy_per_seed'] = [r[split]['accuracy'] for r in recs]
    history.append(rec)
    log(rec)
  return {'policy': f'selection:{name}', 'selection_ratio': float(config.selection_ratio),
          'seeds': list(t.seeds), 'history': history, 'final': history[-1],
          'example_gradients': history[-1]['examples'], 'steps': history[-1]['steps'],
          'scoring_forwards': 0, 'setup_example_gradients': setup // max(len(runs), 1),
          'total_example_gradients': history[-1]['examples'] + setup // max(len(runs), 1),
          'count_gini': float(np.mean([r['count_gini'] for r in runs])),
          'wall_s': float(np.mean([r['wall_s'] for r in runs]))}
