"""A tiny float-friendly bi-level problem shared by tests (tanh MLPs, so finite differences hold)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from datarater.data.pipeline import DataInfo
from datarater.tasks.classifier import mlp_classifier, mlp_rater
from inner_loop.optimizers import make_inner_optimizer
from jax.flatten_util import ravel_pytree

from outer_loop import meta_step
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


def estimator(name='reverse', optimizer='sgd', lr=0.1, recompute='auto', segment=0, steps=3,
              **fields):
  """The estimator a config with outer.meta_gradient=`name`, its mixed options and its other
  own `outer` `fields` (the rest at their defaults) makes, for `steps` inner steps."""
  outer = ml_collections.ConfigDict({'meta_gradient': name, 'mixed_recompute': recompute,
                                     'mixed_segment': segment, **fields})
  inner = ml_collections.ConfigDict({'optimizer': optimizer, 'learning_rate': lr,
                                     'steps': steps})
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
  """float32 leaves as float64 (converted in numpy: op by op, JAX compiles one per shape)."""
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x, np.float64)) if x.dtype == np.float32
                      else x, tree)


def assert_meta_gradient_matches_finite_differences(problem, est, inner, outer, rtol=1e-5):
  """The meta-gradient of `problem` (float64, call under jax.enable_x64) against central finite
  differences of the outer loss along every rater parameter."""
  state = as_float64(meta_step.init_outer_state(problem, jax.random.PRNGKey(1), 2))
  # As jax arrays: numpy arrays (tiny_batches') closed over by the jitted loss reach mixed
  # mode's custom_vjp as constants, which JAX rejects under vmap ('non-canonical constant').
  inner, outer = jax.tree.map(jnp.asarray, (inner, outer))
  flat_phi, unravel = ravel_pytree(state.rater_params)
  grads = jax.jit(lambda phi: meta_step.meta_gradient(
      problem, est, phi, state.population, inner, outer)[1])(state.rater_params)
  loss_of = jax.jit(lambda flat: meta_step.outer_loss(
      problem, est, unravel(flat), state.population, inner, outer)[0])
  eps = 1e-6
  numeric = jax.vmap(lambda e: (loss_of(flat_phi + eps * e) - loss_of(flat_phi - eps * e))
                     / (2 * eps))(jnp.eye(flat_phi.size, dtype=jnp.float64))
  analytic = ravel_pytree(grads)[0]
  assert float(jnp.linalg.norm(analytic)) > 1e-6
  assert float(jnp.linalg.norm(analytic - numeric) / jnp.linalg.norm(numeric)) < rtol
