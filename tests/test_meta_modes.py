"""The meta-gradient modes (reverse, remat, mixed) give the same d(outer)/d(phi); float64.

Mixed mode is also checked against central finite differences, and its custom VJP against plain
reverse mode for every input (rater params and initial inner state) and every output (final
state and the inner losses), with uneven segmentations of the unroll.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from inner_loop.optimizers import make_inner_optimizer
from inner_loop.unroll import unroll
from outer_loop import meta_step, mixed_mode
from tests.tiny import tiny_batches, tiny_problem

LEARNING_RATES = {'sgd': 0.3, 'momentum': 0.1, 'adam': 0.05}


def _jit(fn):
  """jax.jit with cheap XLA passes: these programs are tiny and compiling dominates the test."""
  return jax.jit(fn, compiler_options={'xla_backend_optimization_level': 0,
                                       'xla_llvm_disable_expensive_passes': True})


def _setup(optimizer, steps, population=2, batch=8):
  """A float64 tiny problem, its outer state and batches (K members, T steps)."""
  problem, _, rater = tiny_problem(optimizer=optimizer, lr=LEARNING_RATES[optimizer])
  inner, outer = tiny_batches(0, population=population, steps=steps, batch=batch,
                              dtype=np.float64)
  state = meta_step.init_outer_state(
      problem, rater.init(jax.random.PRNGKey(1), jax.tree.map(lambda x: x[0, 0], inner)),
      jax.random.PRNGKey(2), population_size=population)
  state = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, state)
  assert ravel_pytree(state.rater_params)[0].dtype == jnp.float64
  # jax arrays, not numpy: a jit that closes over float64 numpy batches and vmaps a custom_vjp
  # fails inside JAX 0.10 ('non-canonical constant'); real runs pass device arrays anyway.
  return problem, state, jax.tree.map(jnp.asarray, inner), jax.tree.map(jnp.asarray, outer)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize('optimizer', ['sgd', 'adam'])
@pytest.mark.parametrize('steps', [1, 4])
def test_modes_agree(optimizer, steps):
  with jax.enable_x64():
    problem, state, inner, outer = _setup(optimizer, steps)
    results = {}
    for mode in meta_step.META_GRADIENT_MODES:
      p = dataclasses.replace(problem, meta_gradient=mode)
      (loss, (population, inner_losses)), grads = _jit(
          lambda phi, pop, i, o, p=p: meta_step.meta_gradient(p, phi, pop, i, o))(
              state.rater_params, state.population, inner, outer)
      results[mode] = (loss, ravel_pytree(population)[0], inner_losses, ravel_pytree(grads)[0])
    assert set(results) == {'reverse', 'remat', 'mixed'}
    ref_loss, ref_pop, ref_losses, ref_grad = results['reverse']
    chex_shape = ref_losses.shape
    assert chex_shape == (2, steps)
    assert float(jnp.linalg.norm(ref_grad)) > 1e-6  # the rater weights matter
    for mode, (loss, pop, losses, grad) in results.items():
      np.testing.assert_allclose(loss, ref_loss, rtol=1e-12, err_msg=mode)
      np.testing.assert_allclose(pop, ref_pop, rtol=1e-12, atol=1e-14, err_msg=mode)
      np.testing.assert_allclose(losses, ref_losses, rtol=1e-12, err_msg=mode)
      assert _rel(grad, ref_grad) < 1e-9, (mode, _rel(grad, ref_grad))
      np.testing.assert_allclose(grad, ref_grad, rtol=1e-7, atol=1e-12 * np.abs(ref_grad).max())


@pytest.mark.parametrize('optimizer', ['sgd', 'adam'])
def test_mixed_matches_finite_differences(optimizer):
  """T = 3 splits into a 1-step head and one 2-step segment (S = round(sqrt(3)) = 2)."""
  with jax.enable_x64():
    problem, state, inner, outer = _setup(optimizer, steps=3)
    problem = dataclasses.replace(problem, meta_gradient='mixed')
    assert mixed_mode.default_segment(3) == 2
    (_, _), grads = _jit(lambda phi: meta_step.meta_gradient(
        problem, phi, state.population, inner, outer))(state.rater_params)
    analytic = ravel_pytree(grads)[0]
    flat_phi, unravel = ravel_pytree(state.rater_params)
    loss_of = _jit(lambda flat: meta_step.outer_loss(
        problem, unravel(flat), state.population, inner, outer)[0])
    eps = 1e-6
    basis = jnp.eye(flat_phi.size, dtype=jnp.float64)
    numeric = jax.vmap(lambda e: (loss_of(flat_phi + eps * e) - loss_of(flat_phi - eps * e))
                       / (2 * eps))(basis)
    assert float(jnp.linalg.norm(analytic)) > 1e-6
    assert _rel(analytic, numeric) < 1e-5, _rel(analytic, numeric)


@pytest.mark.parametrize('optimizer,segment,replay',
                         [('momentum', 1, True), ('adam', 2, False), ('adam', 2, True)])
def test_mixed_vjp_of_every_input_and_output(optimizer, segment, replay):
  """Custom VJP = jax.vjp of the plain unroll, for d/d(phi, initial state) of (state, losses).

  T = 5: segment 1 stores every carry; segment 2 runs a 1-step head, then two 2-step segments,
  whose carries are kept (replay=False) or recomputed from the segment start (replay=True).
  """
  with jax.enable_x64():
    problem, state, inner, _ = _setup(optimizer, steps=5, population=1)
    member = jax.tree.map(lambda x: x[0], state.population)
    batches = jax.tree.map(lambda x: x[0], inner)
    opt = make_inner_optimizer(optimizer, LEARNING_RATES[optimizer])
    weights_fn = lambda phi, batch: problem.weight_fn(phi)(batch)
    mixed = mixed_mode.make_mixed_unroll(problem.task_loss, opt, weights_fn, segment=segment,
                                         replay=replay)
    plain = lambda phi, s: unroll(problem.task_loss, opt, problem.weight_fn(phi), s, batches)

    out_ref = jax.eval_shape(plain, state.rater_params, member)
    rng = np.random.default_rng(segment)
    def random_cotangent(x):
      if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.asarray(rng.normal(size=x.shape))
      return np.zeros(x.shape, jax.dtypes.float0)
    ct = jax.tree.map(random_cotangent, out_ref)  # on final params, opt state and all T losses

    @_jit
    def both(phi, s, ct):
      out_r, vjp_r = jax.vjp(plain, phi, s)
      out_m, vjp_m = jax.vjp(lambda phi, s: mixed(phi, s, batches), phi, s)
      return out_r, out_m, vjp_r(ct), vjp_m(ct)
    out_r, out_m, ref, got = both(state.rater_params, member, ct)
    np.testing.assert_allclose(ravel_pytree(out_m)[0], ravel_pytree(out_r)[0], rtol=1e-12)
    for name, r, g in zip(('phi', 'initial state'), ref, got):
      r_flat = ravel_pytree(jax.tree.map(
          lambda x: x if jnp.issubdtype(x.dtype, jnp.inexact) else None, r))[0]
      g_flat = ravel_pytree(jax.tree.map(
          lambda x: x if jnp.issubdtype(x.dtype, jnp.inexact) else None, g))[0]
      assert r_flat.size > 0 and float(jnp.linalg.norm(r_flat)) > 1e-6, name
      assert _rel(g_flat, r_flat) < 1e-10, (name, _rel(g_flat, r_flat))


def test_unknown_mode_is_refused():
  problem, _, _ = tiny_problem(meta_gradient='forward')
  with pytest.raises(ValueError, match='meta_gradient'):
    meta_step.meta_gradient(problem, None, None, None, None)
