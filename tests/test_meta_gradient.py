"""d(outer loss)/d(phi) through T unrolled inner steps equals central finite differences (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from outer_loop import meta_step
from tests.tiny import tiny_batches, tiny_problem


@pytest.mark.parametrize('optimizer', ['sgd', 'adam'])
@pytest.mark.parametrize('steps', [1, 3])
def test_meta_gradient_matches_finite_differences(optimizer, steps):
  with jax.enable_x64():
    problem, _, rater = tiny_problem(optimizer=optimizer, lr=0.3 if optimizer == 'sgd' else 0.05)
    inner, outer = tiny_batches(0, population=2, steps=steps, batch=8, dtype=np.float64)
    state = meta_step.init_outer_state(
        problem, rater.init(jax.random.PRNGKey(1), jax.tree.map(lambda x: x[0, 0], inner)),
        jax.random.PRNGKey(2), population_size=2)
    state = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, state)
    flat_phi, unravel = ravel_pytree(state.rater_params)
    assert flat_phi.dtype == jnp.float64

    (_, _), grads = meta_step.meta_gradient(problem, state.rater_params, state.population,
                                            inner, outer)
    analytic = ravel_pytree(grads)[0]

    loss_of = jax.jit(lambda flat: meta_step.outer_loss(
        problem, unravel(flat), state.population, inner, outer)[0])
    eps = 1e-6
    basis = jnp.eye(flat_phi.size, dtype=jnp.float64)
    numeric = jax.vmap(lambda e: (loss_of(flat_phi + eps * e) - loss_of(flat_phi - eps * e))
                       / (2 * eps))(basis)
    assert float(jnp.linalg.norm(analytic)) > 1e-6  # the weights really change the outcome
    rel = float(jnp.linalg.norm(analytic - numeric) / jnp.linalg.norm(numeric))
    assert rel < 1e-4, rel


def test_outer_step_uses_the_meta_gradient():
  """The outer step's logged meta-gradient norm is the norm of d outer / d phi after resets."""
  problem, _, rater = tiny_problem()
  inner, outer = tiny_batches(1, population=2, steps=2, batch=8)
  state = meta_step.init_outer_state(
      problem, rater.init(jax.random.PRNGKey(1), jax.tree.map(lambda x: x[0, 0], inner)),
      jax.random.PRNGKey(2), population_size=2)
  (_, _), grads = meta_step.meta_gradient(problem, state.rater_params, state.population,
                                          inner, outer)
  new_state, metrics = meta_step.outer_step(problem, state, inner, outer)
  np.testing.assert_allclose(metrics['meta_grad_norm'],
                             jnp.linalg.norm(ravel_pytree(grads)[0]), rtol=1e-5)
  assert int(new_state.step) == 1
  moved = ravel_pytree(new_state.rater_params)[0] - ravel_pytree(state.rater_params)[0]
  assert float(jnp.linalg.norm(moved)) > 0
