"""Plug-in feature spaces for data selection: any function from a batch to vectors [B, D].

The default extractor is the representation (`Task.embed`) of a task model trained here, briefly,
on the training split with the one trainer, then frozen (`config.features.task` says which task:
any registered one). `pixels` is the batch's float features, flattened. Any other function plugs
in the same way: `extract(feature_fn, split)` runs it over a split in fixed-size chunks.
"""
from typing import Callable

import jax
import numpy as np

from datarater import evaluation, tasks
from datarater.errors import UserError
from datarater.sae import offline_steps
from inner_loop import make_inner_optimizer

FeatureFn = Callable[[dict], jax.Array]  # batch -> features [B, D]
EXTRACTORS = ('penultimate', 'pixels')


def train_feature_model(train, config):
  """A task model (`config.task`) trained with uniform weights for `config.train_steps` steps,
  or `config.train_epochs` passes when that is set (> 0); (task, params, example-grads)."""
  from datarater.policies.base import weighting_policy  # pylint: disable=g-import-not-at-top
  from datarater.trainer import Trainer  # pylint: disable=g-import-not-at-top
  steps = offline_steps(config.train_steps, config.get('train_epochs', 0), len(train),
                        config.batch_size, 'features.train_epochs')
  if steps <= 0:
    raise UserError(f'features.train_steps must be positive, got {config.train_steps}')
  task = tasks.make_task(config.task, train.info, 'features.task')
  if hasattr(train, 'features'):  # e.g. tokens outside features.task.vocab (a streamed split's
    task.check_data(train.features)  # chunks are checked by the trainer)
  trainer = Trainer(task, make_inner_optimizer('adam', config.learning_rate),
                    weighting_policy('uniform', len(train)), config.batch_size,
                    learning_rate_setting=f'features.learning_rate ({config.learning_rate:g})',
                    purpose='features', batch_size_setting='features.batch_size')
  run = trainer.run(train, {}, [config.seed], steps=steps)
  params = jax.tree.map(lambda x: x[0], run.params)
  return task, params, run.example_gradients


def input_features(batch: dict) -> jax.Array:
  """Every float feature of the batch, flattened and concatenated: [B, D]."""
  parts = [x.reshape(x.shape[0], -1) for k, x in sorted(batch.items())
           if k != 'index' and jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]  # bfloat16 too
  if not parts:
    raise UserError('features.extractor=pixels needs float input features')
  return jax.numpy.concatenate(parts, axis=1)


def extract(feature_fn: FeatureFn, split, chunk: int = 512) -> np.ndarray:
  """Features of every example, in order, float32 [N, D]."""
  feats = evaluation.score_split(feature_fn, split, chunk).astype(np.float32)
  if feats.ndim != 2:
    raise UserError(f'feature function must return [batch, dim] vectors, got shape {feats.shape}')
  return feats


def default_features(train, config) -> tuple[np.ndarray, int]:
  """Features of `train` per `config` (a `features` ConfigDict).

  Returns (features [N, D], example-gradients the extractor cost, reported as offline cost).
  """
  if config.extractor == 'pixels':
    return extract(input_features, train), 0
  if config.extractor != 'penultimate':
    raise UserError(f'unknown features.extractor {config.extractor!r} '
                    f'(choose from {", ".join(EXTRACTORS)})')
  task, params, cost = train_feature_model(train, config)
  return extract(lambda b: task.embed(params, b), train), cost
