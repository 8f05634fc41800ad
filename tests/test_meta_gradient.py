"""d(outer loss)/d(phi) through T unrolled inner steps equals central finite differences (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from outer_loop import meta_step
from tests.tiny import as_float64, estimator, tiny_batches, tiny_problem


def _fd_check(name, optimizer, steps, **kw):
  lr = 0.3 if optimizer == 'sgd' else 0.05
  problem = tiny_problem(optimizer=optimizer, lr=lr)
  est = estimator(name, optimizer, lr, **kw)
  inner, outer = jax.tree.map(jnp.asarray, tiny_batches(0, population=2, steps=steps, batch=8,
                                                        dtype=np.float64))
  state = as_float64(meta_step.init_outer_state(problem, jax.random.PRNGKey(1), 2))
  flat_phi, unravel = ravel_pytree(state.rater_params)
  assert flat_phi.dtype == jnp.float64
  (_, _), grads = jax.jit(lambda phi: meta_step.meta_gradient(
      problem, est, phi, state.population, inner, outer))(state.rater_params)
  analytic = ravel_pytree(grads)[0]
  loss_of = jax.jit(lambda flat: meta_step.outer_loss(
      problem, est, unravel(flat), state.population, inner, outer)[0])
  eps = 1e-6
  basis = jnp.eye(flat_phi.size, dtype=jnp.float64)
  numeric = jax.vmap(lambda e: (loss_of(flat_phi + eps * e) - loss_of(flat_phi - eps * e))
                     / (2 * eps))(basis)
  assert float(jnp.linalg.norm(analytic)) > 1e-6  # the weights really change the outcome
  rel = float(jnp.linalg.norm(analytic - numeric) / jnp.linalg.norm(numeric))
  assert rel < 1e-5, rel


@pytest.mark.parametrize('optimizer,steps', [('sgd', 1), ('sgd', 3), ('adam', 3)])
def test_reverse_meta_gradient_matches_finite_differences(optimizer, steps):
  with jax.enable_x64():
    _fd_check('reverse', optimizer, steps)


@pytest.mark.parametrize('optimizer', ['sgd', 'adam'])
def test_mixed_meta_gradient_matches_finite_differences(optimizer):
  """T = 3: replay splits it into a 1-step head and one 2-step segment; Adam is undone."""
  with jax.enable_x64():
    _fd_check('mixed', optimizer, 3)


def test_outer_step_uses_the_meta_gradient():
  """The outer step's logged meta-gradient norm is the norm of d outer / d phi after resets."""
  problem, est = tiny_problem(), estimator()
  inner, outer = tiny_batches(1, population=2, steps=2, batch=8)
  state = meta_step.init_outer_state(problem, jax.random.PRNGKey(1), 2)
  (_, _), grads = jax.jit(lambda s: meta_step.meta_gradient(
      problem, est, s.rater_params, s.population, inner, outer))(state)
  new_state, metrics = jax.jit(lambda s: meta_step.outer_step(problem, est, s, inner, outer))(state)
  np.testing.assert_allclose(metrics['meta_grad_norm'],
                             jnp.linalg.norm(ravel_pytree(grads)[0]), rtol=1e-5)
  assert int(new_state.step) == 1
  moved = ravel_pytree(new_state.rater_params)[0] - ravel_pytree(state.rater_params)[0]
  assert float(jnp.linalg.norm(moved)) > 0
