"""Trains a task model from scratch under a selection policy, one jitted call per epoch.

Each epoch: the policy selects n examples (+ weights); they are shuffled, padded with weight-0
entries to whole batches, and trained on with `inner_loop.inner_step` inside a `lax.scan`; the
per-example losses of that forward pass go back to the policy's `update`. Example-gradients spent
= number of (example, step) pairs with weight > 0. Wall time excludes compilation.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from datarater import models
from datarater.checkpointing import abstract_of
from datarater.data.pipeline import Split
from datarater.errors import UserError
from datarater.selection.base import SelectionPolicy, gini
from inner_loop import make_inner_optimizer
from inner_loop.unroll import init_inner_state, inner_step


def train_with_selection(policy: SelectionPolicy, train: Split, evals: dict[str, Split], *,
                         hidden, activation: str = 'relu', optimizer: str = 'adam',
                         learning_rate: float = 1e-3, epochs: int = 30, batch_size: int = 64,
                         seed: int = 0, log_fn=None, restore=None, on_epoch_end=None) -> dict:
  """Returns final loss/accuracy per eval split, per-epoch history, gradients spent, wall time.

  Resuming: `restore(abstract_state)` returns None or (state, progress) from a checkpoint, where
  state = (train state, selection state) and progress = {'history', 'example_grads', 'wall_s'};
  training goes on after its len(history) epochs. `on_epoch_end(epoch, state, progress)` is
  called after every epoch (to checkpoint); if it returns True, training stops there and the
  result is {'stopped_after': epoch}.
  """
  if epochs <= 0 or batch_size <= 0:
    raise UserError(f'epochs and batch_size must be positive, got {epochs} and {batch_size}')
  num = len(train)
  task = models.task_model(train.num_classes, hidden, activation)
  opt = make_inner_optimizer(optimizer, learning_rate)
  k_init, k_sel, k_shuffle = jax.random.split(jax.random.PRNGKey(seed), 3)
  train_state = init_inner_state(task.init(k_init, jnp.asarray(train.image[:1])), opt)
  sel_state = policy.init(num, k_sel)
  steps = -(-policy.num_selected // batch_size)
  pad = steps * batch_size - policy.num_selected
  data = {'image': jnp.asarray(train.image), 'label': jnp.asarray(train.label)}

  def loss_fn(params, batch):
    return models.per_example_loss(task.apply, params, batch)

  def epoch_fn(train_state, sel_state, key, data):  # data is an argument: no baked-in constants
    idx, weights, sel_state = policy.select(sel_state)
    order = jax.random.permutation(key, idx.shape[0])
    idx = jnp.concatenate([idx[order], jnp.full(pad, num, jnp.int32)]).reshape(steps, batch_size)
    weights = jnp.concatenate([weights[order], jnp.zeros(pad)]).reshape(steps, batch_size)

    def step(state, xs):
      i, w = xs
      batch = {k: jnp.take(v, i, axis=0, mode='clip') for k, v in data.items()}
      losses = loss_fn(state.params, batch)
      state, _ = inner_step(loss_fn, opt, state, batch, w)
      return state, losses
    train_state, losses = jax.lax.scan(step, train_state, (idx, weights))
    sel_state = policy.update(sel_state, idx.ravel(), weights.ravel(), losses.ravel())
    return train_state, sel_state, jnp.sum(weights > 0)

  keys = jax.random.split(k_shuffle, epochs)
  t0 = time.perf_counter()
  compiled = jax.jit(epoch_fn).lower(train_state, sel_state, keys[0], data).compile()
  compile_s = time.perf_counter() - t0

  evaluate = jax.jit(lambda p, b: (jnp.mean(loss_fn(p, b)), models.accuracy(task.apply, p, b)))
  eval_batches = {k: {'image': jnp.asarray(s.image), 'label': jnp.asarray(s.label)}
                  for k, s in evals.items()}
  history, grads, wall = [], 0, 0.0
  if restore is not None and (resumed := restore(abstract_of((train_state, sel_state)))):
    (train_state, sel_state), progress = resumed
    history, grads, wall = progress['history'], progress['example_grads'], progress['wall_s']
  for epoch in range(len(history), epochs):
    t0 = time.perf_counter()
    train_state, sel_state, spent = compiled(train_state, sel_state, keys[epoch], data)
    jax.block_until_ready(train_state)
    wall += time.perf_counter() - t0
    grads += int(spent)
    record = {'epoch': epoch + 1, 'example_grads': grads, 'steps': (epoch + 1) * steps}
    for name, batch in eval_batches.items():
      loss, acc = evaluate(train_state.params, batch)
      record[name] = {'loss': float(loss), 'accuracy': float(acc)}
    history.append(record)
    if log_fn is not None:
      log_fn(record)
    if on_epoch_end is not None and on_epoch_end(
        epoch + 1, (train_state, sel_state),
        {'history': history, 'example_grads': grads, 'wall_s': wall}):
      return {'stopped_after': epoch + 1}
  counts = np.asarray(sel_state.counts)
  noisy = train.is_corrupted
  return {'final': {k: v for k, v in history[-1].items() if k in evals},
          'history': history, 'example_grads': grads,
          'example_grads_full': epochs * num, 'wall_s': wall, 'compile_s': compile_s,
          'count_gini': gini(counts),
          'noisy_share_of_grads': (float(counts[noisy].sum() / max(counts.sum(), 1))
                                   if noisy.any() else 0.0),
          'params': train_state.params}
