"""What every valuation shares: a recorded training run, the fit-then-score API, split scoring.

A `TrainingRun` is one training trajectory with a fixed data order (batches [T, B, ...], each with
the examples' `index` in the split), its learning rates and parameter checkpoints, produced by
`record_run` from `inner_loop.unroll` (one `lax.scan` of unrolls, a checkpoint before each segment).
A `Valuation` takes checkpoints one by one (`accumulate`, or `fit` over a run) and then `score`s
batches; `value` orients the score so that higher means a more useful example.
"""
import abc
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from datarater import evaluation
from datarater.data.pipeline import Split, stream_indices
from datarater.errors import UserError
from inner_loop.optimizers import make_inner_optimizer
from inner_loop.unroll import init_inner_state, unroll
from inner_loop.weighting import uniform_weights

PerExampleLoss = Callable[[Any, dict], jax.Array]


@flax.struct.dataclass
class TrainingRun:
  """A recorded run: checkpoints[c] are the params before step checkpoint_steps[c]."""
  batches: dict                # leaves [T, B, ...]; batches['index'] = positions in the split
  step_lrs: jax.Array          # [T] learning rate of each step
  checkpoints: Any             # params pytree, leaves [C, ...]
  checkpoint_steps: jax.Array  # [C]
  final_params: Any
  losses: jax.Array            # [T] (weighted) mean training loss of each step

  @property
  def num_steps(self) -> int:
    return self.step_lrs.shape[0]

  @property
  def num_checkpoints(self) -> int:
    return self.checkpoint_steps.shape[0]

  def checkpoint(self, c: int):
    return jax.tree.map(lambda x: x[c], self.checkpoints)


def fixed_order_batches(split: Split, steps: int, batch_size: int, seed: int) -> dict:
  """[steps, batch_size] batches of the split in a deterministic shuffled-epoch order."""
  order = stream_indices(len(split), 0, steps * batch_size, seed).reshape(steps, batch_size)
  return split.take(order)


def record_run(loss_fn: PerExampleLoss, params, batches: dict, learning_rate: float,
               checkpoint_every: int, optimizer: str = 'sgd',
               weights: Optional[jax.Array] = None) -> TrainingRun:
  """Trains on `batches` (leaves [T, B, ...]) with `inner_loop.unroll`, keeping checkpoints.

  `weights` [T, B] (default all ones) multiply each example's loss in the mean of its step; a 0
  removes that example from that step only (how leave-one-out retraining is done). Pure and
  traceable: vmap it over `weights` to retrain many variants at once.
  """
  steps = jax.tree.leaves(batches)[0].shape[0]
  if checkpoint_every < 1 or steps % checkpoint_every:
    raise UserError(f'checkpoint_every={checkpoint_every} must be >= 1 and divide the {steps} steps')
  opt = make_inner_optimizer(optimizer, learning_rate)
  batches = {k: v for k, v in batches.items()}
  if weights is None:
    weight_fn = uniform_weights
  else:
    batches['weight'] = weights
    weight_fn = lambda b: b['weight']
  num = steps // checkpoint_every
  segments = jax.tree.map(lambda x: jnp.reshape(x, (num, checkpoint_every, *x.shape[1:])), batches)

  def segment(state, seg):
    new, losses = unroll(loss_fn, opt, weight_fn, state, seg)
    return new, (state.params, losses)

  final, (checkpoints, losses) = jax.lax.scan(segment, init_inner_state(params, opt), segments)
  batches.pop('weight', None)
  return TrainingRun(batches=batches, step_lrs=jnp.full((steps,), learning_rate),
                     checkpoints=checkpoints,
                     checkpoint_steps=jnp.arange(num) * checkpoint_every,
                     final_params=final.params, losses=losses.reshape(steps))


class Valuation(abc.ABC):
  """fit/accumulate over training, then score. `higher_is_better` orients `score` into `value`."""
  name: str = 'valuation'
  higher_is_better: bool = True

  def __init__(self):
    self._params, self._lrs = [], []

  def accumulate(self, params, learning_rate: float) -> 'Valuation':
    """Takes one checkpoint of training (params and the learning rate in force there)."""
    self._params.append(params)
    self._lrs.append(learning_rate)
    return self

  def fit(self, run: TrainingRun) -> 'Valuation':
    """Accumulates every checkpoint of a recorded run."""
    for c in range(run.num_checkpoints):
      self.accumulate(run.checkpoint(c), float(run.step_lrs[int(run.checkpoint_steps[c])]))
    return self

  def stacked(self):
    """(checkpoints with a leading [C] axis, learning rates [C])."""
    if not self._params:
      raise UserError(f'{self.name}: no checkpoint accumulated (call fit or accumulate first)')
    return jax.tree.map(lambda *x: jnp.stack(x), *self._params), jnp.asarray(self._lrs)

  @abc.abstractmethod
  def score(self, batch: dict) -> jax.Array:
    """One score per example of the batch, [B]."""

  def value(self, batch: dict) -> jax.Array:
    s = self.score(batch)
    return s if self.higher_is_better else -s


def score_split(score_fn: Callable[[dict], jax.Array], split: Split, batch_size: int = 256,
                progress: bool = True, desc: str = 'scoring') -> np.ndarray:
  """`datarater.evaluation.score_split` with a progress bar by default (valuations are slow)."""
  return evaluation.score_split(score_fn, split, batch_size, progress=progress, desc=desc)
