"""A tiny float-friendly bi-level problem shared by tests (tanh MLPs, so finite differences hold)."""
import jax
import ml_collections
import numpy as np
import optax

from datarater.data.pipeline import DataInfo
from datarater.tasks.classifier import mlp_classifier, mlp_rater
from inner_loop.optimizers import make_inner_optimizer
from outer_loop.estimators import make_estimator
from outer_loop.meta_step import MetaProblem

NUM_CLASSES = 3


def tiny_info(dim: int = 5) -> DataInfo:
  spec = {'image': jax.ShapeDtypeStruct((dim,), np.float32),
          'label': jax.ShapeDtypeStruct((), np.int32)}
  return DataInfo('tiny', spec, {'label': NUM_CLASSES}, ('image', 'label'))


def tiny_problem(optimizer='sgd', lr=0.1, temperature=0.7, reset_every=3, dim=5, hidden=(6,)):
  info = tiny_info(dim)
  task = mlp_classifier(ml_collections.ConfigDict({'hidden': hidden, 'activation': 'tanh'}), info)
  rater = mlp_rater(ml_collections.ConfigDict({'hidden': (4,), 'activation': 'tanh'}), info)
  return MetaProblem(task=task, rater=rater, inner_optimizer=make_inner_optimizer(optimizer, lr),
                     outer_optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
                     temperature=temperature, reset_every=reset_every)


def estimator(name='reverse', optimizer='sgd', lr=0.1, recompute='auto', segment=0):
  """The estimator a config with outer.meta_gradient=`name` (and mixed options) makes."""
  outer = ml_collections.ConfigDict({'meta_gradient': name, 'mixed_recompute': recompute,
                                     'mixed_segment': segment})
  inner = ml_collections.ConfigDict({'optimizer': optimizer, 'learning_rate': lr})
  return make_estimator(outer, inner)


def tiny_batches(seed, population, steps, batch, dim=5, dtype=np.float32):
  """Random (inner [K, T, B, dim], outer [K, B, dim]) classification batches."""
  rng = np.random.default_rng(seed)
  inner = {'image': rng.normal(size=(population, steps, batch, dim)).astype(dtype),
           'label': rng.integers(0, NUM_CLASSES, (population, steps, batch)).astype(np.int32)}
  outer = {'image': rng.normal(size=(population, batch, dim)).astype(dtype),
           'label': rng.integers(0, NUM_CLASSES, (population, batch)).astype(np.int32)}
  return inner, outer


def as_float64(tree):
  return jax.tree.map(lambda x: x.astype(np.float64) if x.dtype == np.float32 else x, tree)
