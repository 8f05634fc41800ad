"""What the curation benchmarks share (bench.curation, bench.lm_curation, bench.steps_saved): fresh
task models trained on a corpus with the one trainer, their curves, when a curve reaches a target,
statistics over seeds (paired differences, pairs = seeds), and the compute a filtered subset saves
(`break_even`, `steps_saved`)."""
from typing import Optional

import numpy as np

from datarater.trainer import Trainer
from inner_loop.optimizers import make_inner_optimizer


def train_run(task, section, split, test, policy, seed: int, metric: str = 'accuracy',
              evals_per_epoch: int = 1, section_name: str = 'train', **length) -> dict:
  """A fresh `task` model (optimizer, learning rate and batch size from the config `section`,
  `section_name` in the config: what a refusal names) trained on `split` under `policy` for
  `length` (epochs= or steps=), `metric` on `test` along the way: the final value, the curve
  [(step, value)], the compute spent."""
  run = Trainer(task, make_inner_optimizer(section.optimizer, section.learning_rate), policy,
                section.batch_size, batch_size_setting=f'{section_name}.batch_size').run(
                    split, {'test': test}, [seed], evals_per_epoch=evals_per_epoch, **length)
  curve = [(h['step'], h['test'][metric][0]) for h in run.history]
  return {metric: curve[-1][1], 'loss': run.final['test']['loss'][0],
          'example_gradients': run.example_gradients, 'steps': run.steps,
          'num_train': len(split), 'curve': curve, 'wall_s': run.wall_s}


def steps_to_reach(curve, target: float, higher_is_better: bool = True,
                   interpolate: bool = False) -> Optional[float]:
  """The first evaluated step at which the curve reaches `target` (None if never); with
  `interpolate`, the step where the straight line between the evaluations on either side of the
  first crossing reaches it (the last finite one before it: NaN evaluations are skipped)."""
  reached = (lambda v: v >= target - 1e-9) if higher_is_better else (lambda v: v <= target + 1e-9)
  before = None  # the last finite evaluation so far
  for step, value in curve:
    if reached(value):
      if not interpolate or before is None:
        return step
      (s0, v0) = before
      return s0 + (step - s0) * (target - v0) / (value - v0)
    if np.isfinite(value):
      before = (step, value)
  return None


def fraction_to_own_final(run: dict) -> float:
  """The share of its steps a training run (`curve`, final `accuracy`, `steps`) takes to first
  reach its own final accuracy: below 1 when the curve peaks early, as it does under noise
  (`bench.steps_saved.check` refuses a run whose curve never reaches it)."""
  return steps_to_reach(run['curve'], run['accuracy']) / run['steps']


def stats(values, scale: float = 100.0) -> dict:
  """Over the n values x_i (times `scale`, e.g. accuracies in points): `mean` = sum x_i / n,
  `std` = sqrt(sum (x_i - mean)^2 / n), the population standard deviation (numpy's default,
  dividing by n: the README's `+-` after a mean over seeds; 0 for one value), and `n`."""
  x = scale * np.asarray(values, np.float64)
  return {'mean': float(x.mean()), 'std': float(x.std()), 'n': len(x)}


def paired(a, b, scale: float = 100.0) -> dict:
  """Over the n pairs (seeds), d_i = scale * (a_i - b_i): `diff` = their mean, and `se` = its
  paired standard error s / sqrt(n), s = sqrt(sum (d_i - diff)^2 / (n - 1)) the sample standard
  deviation of the differences (dividing by n - 1); NaN for a single pair."""
  d = scale * (np.asarray(a, np.float64) - np.asarray(b, np.float64))
  se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float('nan')
  return {'diff': float(d.mean()), 'se': se}


def break_even(setup: int, all_data: int, fraction, all_fraction=1.0) -> Optional[float]:
  """Training runs after which a method's one-off cost `setup` is paid back, when each run on its
  filtered data stops at all data's final accuracy, `fraction` of all data's example-gradients
  `all_data`, and each run on all data stops after `all_fraction` of them: 1 (trained to the end)
  or the share it needs to reach its own final accuracy (None: never paid back)."""
  if fraction is None or fraction >= all_fraction:
    return None
  return float(setup / (all_data * (all_fraction - fraction)))


def steps_saved(rs: list, fractions: list, setup: int, all_data: int) -> dict:
  """Against all data stopped as soon as it reaches its own final accuracy (it gets there early
  when its curve peaks before the end): all data's shares per seed, the paired saving
  (all data's share minus the filtered run's), and the break-even runs at that saving."""
  own = [fraction_to_own_final(r['all']) for r in rs]
  out = {'all_steps_to_own_final': own, 'saved_vs_all_own': None,
         'break_even_runs_vs_all_own': None}
  if all(f is not None for f in fractions):
    out['saved_vs_all_own'] = paired(own, fractions, scale=1.0)
    out['break_even_runs_vs_all_own'] = break_even(setup, all_data, float(np.mean(fractions)),
                                                   float(np.mean(own)))
  return out
