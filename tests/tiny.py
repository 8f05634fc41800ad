"""A tiny float-friendly bi-level problem shared by tests (tanh MLPs, so finite differences hold)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from datarater import models
from inner_loop.optimizers import make_inner_optimizer, make_step_inverse
from inner_loop.unroll import init_inner_state
from outer_loop.meta_step import MetaProblem

NUM_CLASSES = 3


def tiny_problem(optimizer='sgd', lr=0.1, temperature=0.7, reset_every=3,
                 meta_gradient='reverse', dim=5, hidden=(6,)):
  task = models.task_model(NUM_CLASSES, hidden, 'tanh')
  rater = models.Rater(NUM_CLASSES, (4,), 'tanh')
  inner_opt = make_inner_optimizer(optimizer, lr)
  example = jnp.zeros((1, dim))

  def task_loss(params, batch):
    return models.per_example_loss(task.apply, params, batch)

  def init_member(key):
    return init_inner_state(task.init(key, example), inner_opt)

  problem = MetaProblem(task_loss=task_loss, rater_apply=rater.apply, init_member=init_member,
                        inner_optimizer=inner_opt,
                        outer_optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
                        temperature=temperature, reset_every=reset_every,
                        meta_gradient=meta_gradient,
                        inner_inverse=make_step_inverse(optimizer, lr))
  return problem, task, rater


def tiny_batches(seed, population, steps, batch, dim=5, dtype=np.float32):
  """Random (inner [K, T, B, dim], outer [K, B, dim]) classification batches."""
  rng = np.random.default_rng(seed)
  inner = {'image': rng.normal(size=(population, steps, batch, dim)).astype(dtype),
           'label': rng.integers(0, NUM_CLASSES, (population, steps, batch)).astype(np.int32)}
  outer = {'image': rng.normal(size=(population, batch, dim)).astype(dtype),
           'label': rng.integers(0, NUM_CLASSES, (population, batch)).astype(np.int32)}
  return inner, outer
