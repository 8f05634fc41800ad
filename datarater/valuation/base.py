"""What every valuation shares: a recorded training run and the fit-then-score API.

A `TrainingRun` is one training trajectory: every step's batch (leaves [T, B, ...], with the
examples' positions in the split under `index`) and loss weights [T, B] (0 for the padding of an
epoch's last batch), the learning rate of every step, and the parameters before steps
`checkpoint_steps` (leaves [C, ...]). `record_run` makes one with the one trainer
(`datarater.trainer`, `record_every`). A `Valuation` takes checkpoints one by one
(`accumulate`, or `fit` over a run) and then `score`s batches; `value` orients the score so that
higher means a more useful example, and `values(split)` values a whole split.
"""
import abc
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from datarater import evaluation
from datarater.errors import UserError
from inner_loop.optimizers import make_inner_optimizer


@flax.struct.dataclass
class TrainingRun:
  """A recorded run: checkpoints[c] are the params before step checkpoint_steps[c]."""
  batches: dict                # leaves [T, B, ...]; batches['index'] = positions in the split
  weights: jax.Array           # [T, B] loss weights of every step's examples
  step_lrs: jax.Array          # [T] learning rate of each step
  checkpoints: Any             # params pytree, leaves [C, ...]
  checkpoint_steps: jax.Array  # [C]
  final_params: Any

  @property
  def num_steps(self) -> int:
    return self.step_lrs.shape[0]

  @property
  def num_checkpoints(self) -> int:
    return self.checkpoint_steps.shape[0]

  def checkpoint(self, c: int):
    return jax.tree.map(lambda x: x[c], self.checkpoints)


def record_run(task, split, *, steps: int, batch_size: int, learning_rate: float,
               checkpoint_every: int, optimizer: str = 'sgd', seed: int = 0):
  """Trains a fresh `task` model on `split` with uniform weights, recorded for valuations.

  Returns (TrainingRun, example-gradients spent). The data order and initialisation are those of
  the trainer's `seed` under purpose 'valuation' (`seeding.root_key`).
  """
  from datarater.policies.base import weighting_policy  # pylint: disable=g-import-not-at-top
  from datarater.trainer import Trainer  # pylint: disable=g-import-not-at-top
  if steps < 1 or batch_size < 1:
    raise UserError(f'valuation steps and batch_size must be >= 1, got {steps}, {batch_size}')
  if checkpoint_every < 1 or steps % checkpoint_every:
    raise UserError(f'checkpoint_every={checkpoint_every} must be >= 1 and divide the {steps} '
                    'steps')
  if learning_rate <= 0:
    raise UserError(f'valuation.learning_rate must be > 0, got {learning_rate}')
  trainer = Trainer(task, make_inner_optimizer(optimizer, learning_rate),
                    weighting_policy('uniform', len(split)), batch_size,
                    record_every=checkpoint_every,
                    learning_rate_setting=f'valuation.learning_rate ({learning_rate:g})',
                    purpose='valuation', batch_size_setting='valuation.batch_size')
  result = trainer.run(split, {}, [seed], steps=steps)
  rec = result.recording
  one = jax.jit(lambda tree: jax.tree.map(lambda x: x[0], tree))  # one program, not one per leaf
  # Each example is read once (a streamed split decodes it from its files), then repeated.
  unique, where = np.unique(rec.positions[0], return_inverse=True)
  run = TrainingRun(
      batches=jax.tree.map(lambda x: jnp.asarray(x[where.reshape(rec.positions[0].shape)]),
                           split.take(unique)),
      weights=jnp.asarray(rec.weights[0]), step_lrs=jnp.full((steps,), learning_rate),
      checkpoints=one(rec.checkpoints),
      checkpoint_steps=jnp.arange(steps // checkpoint_every) * checkpoint_every,
      final_params=one(result.params))
  return run, result.example_gradients


class Valuation(abc.ABC):
  """fit/accumulate over training, then score. `higher_is_better` orients `score` into `value`."""
  name: str = 'valuation'
  higher_is_better: bool = True
  example_gradients: int = 0   # what making it cost (its recorded runs), for compute accounting

  def __init__(self):
    self._params, self._lrs = [], []

  def accumulate(self, params, learning_rate: float) -> 'Valuation':
    """Takes one checkpoint of training (params and the learning rate in force there)."""
    self._params.append(params)
    self._lrs.append(learning_rate)
    return self

  def fit(self, run: TrainingRun) -> 'Valuation':
    """Accumulates every checkpoint of a recorded run."""
    lrs = np.asarray(run.step_lrs)[np.asarray(run.checkpoint_steps)]
    for c, params in enumerate(_unstack(run.checkpoints)):
      self.accumulate(params, float(lrs[c]))
    return self

  def stacked(self):
    """(checkpoints with a leading [C] axis, learning rates [C])."""
    if not self._params:
      raise UserError(f'{self.name}: no checkpoint accumulated (call fit or accumulate first)')
    return stack_trees(self._params), jnp.asarray(self._lrs)

  @abc.abstractmethod
  def score(self, batch: dict) -> jax.Array:
    """One score per example of the batch, [B]."""

  def value(self, batch: dict) -> jax.Array:
    s = self.score(batch)
    return s if self.higher_is_better else -s

  def values(self, split, batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """`value` of every example of `split`, in order, [N]."""
    return evaluation.score_split(self.value, split, batch_size, progress=progress,
                                  desc=f'{self.name} values')


@jax.jit
def _unstack(tree) -> list:
  """The pytrees tree[c] along the leading axis (one program; op by op, each leaf of each
  checkpoint would be a slice dispatched, and compiled per shape, alone)."""
  return [jax.tree.map(lambda x, c=c: x[c], tree)
          for c in range(jax.tree.leaves(tree)[0].shape[0])]


@jax.jit
def stack_trees(trees: list):
  """Pytrees of equal structure stacked leaf by leaf along a new leading axis (one program)."""
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)
