"""Plug-in feature spaces for data selection: any function from a batch of images to vectors.

The default extractor is the penultimate layer of a task model (MLP) trained here, briefly, on the
training split and then frozen. Any other `FeatureFn` (a pretrained encoder, raw pixels, ...) plugs
in the same way: `extract(feature_fn, images)` runs it over a split in fixed-size chunks.
"""
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from datarater import models
from datarater.data.pipeline import Split, stream_indices
from datarater.errors import UserError
from inner_loop import make_inner_optimizer, uniform_weights
from inner_loop.unroll import init_inner_state, unroll

FeatureFn = Callable[[jax.Array], jax.Array]  # images [B, ...] -> features [B, D]


def penultimate_fn(hidden: Sequence[int], activation: str, params) -> FeatureFn:
  """The last hidden activation of a `models.task_model(_, hidden, activation)` with `params`.

  The hidden layers of that MLP are `dense_0..dense_{L-1}`; an MLP over exactly those layers,
  followed by the activation, is the penultimate representation (no new weights).
  """
  trunk = models.MLP(features=tuple(hidden), activation=activation)
  trunk_params = {'params': {f'dense_{i}': params['params'][f'dense_{i}'] for i in range(len(hidden))}}
  act = models.ACTIVATIONS[activation]
  return lambda images: act(trunk.apply(trunk_params, images))


def train_feature_model(train: Split, *, hidden: Sequence[int], activation: str = 'relu',
                        steps: int = 300, batch_size: int = 64, learning_rate: float = 1e-3,
                        seed: int = 0):
  """Trains a task model with plain uniform weights; returns (params, example-gradients spent)."""
  if steps <= 0:
    raise UserError(f'features.train_steps must be positive, got {steps}')
  task = models.task_model(train.num_classes, hidden, activation)
  optimizer = make_inner_optimizer('adam', learning_rate)
  state = init_inner_state(task.init(jax.random.PRNGKey(seed), jnp.asarray(train.image[:1])),
                           optimizer)
  idx = stream_indices(len(train), 0, steps * batch_size, seed).reshape(steps, batch_size)

  def loss_fn(params, batch):
    return models.per_example_loss(task.apply, params, batch)

  run = jax.jit(lambda s, b: unroll(loss_fn, optimizer, uniform_weights, s, b)[0])
  state = run(state, {'image': train.image[idx], 'label': train.label[idx]})
  return state.params, steps * batch_size


def extract(feature_fn: FeatureFn, images: np.ndarray, chunk: int = 512) -> np.ndarray:
  """Features of every image, in order, float32 [N, D]; the last chunk is padded (one compile)."""
  jitted = jax.jit(feature_fn)
  out = []
  n = len(images)
  for start in range(0, n, chunk):
    idx = np.arange(start, start + chunk) % n
    out.append(np.asarray(jitted(jnp.asarray(images[idx])))[:min(chunk, n - start)])
  feats = np.concatenate(out).astype(np.float32)
  if feats.ndim != 2:
    raise UserError(f'feature function must return [batch, dim] vectors, got shape {feats.shape}')
  return feats


def default_features(train: Split, config) -> tuple[np.ndarray, int]:
  """Penultimate features of a model trained per `config` (a `features` ConfigDict) on `train`.

  Returns (features [N, D], example-gradients the extractor cost, reported as offline cost).
  """
  if config.extractor == 'pixels':
    return train.image.reshape(len(train), -1).astype(np.float32), 0
  if config.extractor != 'penultimate':
    raise UserError(f"unknown features.extractor {config.extractor!r} (choose 'penultimate' or 'pixels')")
  params, cost = train_feature_model(train, hidden=config.hidden, activation=config.activation,
                                     steps=config.train_steps, batch_size=config.batch_size,
                                     learning_rate=config.learning_rate, seed=config.seed)
  return extract(penultimate_fn(config.hidden, config.activation, params), train.image), cost
