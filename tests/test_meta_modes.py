"""The meta-gradient modes (reverse, remat, mixed) give the same d(outer)/d(phi); float64.

Mixed mode is also checked against central finite differences, and its custom VJP against plain
reverse mode for every input (rater params and initial inner state) and every output (final
state and the inner losses), with uneven segmentations of the unroll and each way of recovering
inner states (optimizer run backwards, replay, store). The optimizer inverses are checked alone.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from inner_loop.optimizers import make_inner_optimizer, make_step_inverse
from inner_loop.unroll import InnerState, unroll
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


@pytest.mark.parametrize('optimizer,steps', [('sgd', 1), ('sgd', 4), ('adam', 1), ('adam', 4),
                                             ('adam', 9), ('momentum', 9)])
def test_modes_agree(optimizer, steps):
  """Every mode; mixed both by running the optimizer backwards (auto for adam, momentum: the
  first 4 steps replayed, the rest undone when T = 9) and by replay."""
  with jax.enable_x64():
    problem, state, inner, outer = _setup(optimizer, steps)
    results = {}
    variants = [(mode, 'auto') for mode in meta_step.META_GRADIENT_MODES]
    if optimizer != 'sgd':
      assert problem.inner_inverse is not None
      variants.append(('mixed', 'replay'))
    for mode, recompute in variants:
      p = dataclasses.replace(problem, meta_gradient=mode, mixed_recompute=recompute)
      (loss, (population, inner_losses)), grads = _jit(
          lambda phi, pop, i, o, p=p: meta_step.meta_gradient(p, phi, pop, i, o))(
              state.rater_params, state.population, inner, outer)
      results[mode, recompute] = (loss, ravel_pytree(population)[0], inner_losses,
                                  ravel_pytree(grads)[0])
    assert {m for m, _ in results} == {'reverse', 'remat', 'mixed'}
    ref_loss, ref_pop, ref_losses, ref_grad = results['reverse', 'auto']
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


@pytest.mark.parametrize('optimizer,segment,recompute,boundaries',
                         [('momentum', 1, 'replay', None), ('adam', 2, 'store', None),
                          ('adam', 2, 'replay', None), ('adam', None, 'invert', 'replay'),
                          ('momentum', 2, 'invert', 'replay'), ('momentum', 2, 'invert', 'keep'),
                          ('adam', 2, 'invert', 'replay'), ('adam', 2, 'invert', 'keep'),
                          ('adam', 3, 'invert', 'replay')])
def test_mixed_vjp_of_every_input_and_output(optimizer, segment, recompute, boundaries):
  """Custom VJP = jax.vjp of the plain unroll, for d/d(phi, initial state) of (state, losses).

  replay/store, T = 5: segment 1 keeps every state; segment 2 runs a 1-step head, then two
  2-step segments, whose states are kept (store) or recomputed from the segment start (replay).
  invert, T = 9 (momentum: no head; adam: 4 steps replayed from the initial state), the rest
  recovered by running the optimizer backwards from exact ends, which are replayed from the
  input or kept: adam with one 5-step segment (None), a 1-step part and two 2-step segments (2),
  or a 2-step part and one 3-step segment (3).
  """
  with jax.enable_x64():
    steps = 9 if recompute == 'invert' else 5
    problem, state, inner, _ = _setup(optimizer, steps=steps, population=1)
    member = jax.tree.map(lambda x: x[0], state.population)
    batches = jax.tree.map(lambda x: x[0], inner)
    opt = make_inner_optimizer(optimizer, LEARNING_RATES[optimizer])
    weights_fn = lambda phi, batch: problem.weight_fn(phi)(batch)
    mixed = mixed_mode.make_mixed_unroll(problem.task_loss, opt, weights_fn, segment=segment,
                                         recompute=recompute, boundaries=boundaries or 'replay',
                                         inverse=make_step_inverse(optimizer,
                                                                   LEARNING_RATES[optimizer]))
    plain = lambda phi, s: unroll(problem.task_loss, opt, problem.weight_fn(phi), s, batches)

    out_ref = jax.eval_shape(plain, state.rater_params, member)
    rng = np.random.default_rng(segment or 0)
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


@pytest.mark.parametrize('optimizer', ['momentum', 'adam'])
def test_step_inverse_undoes_the_optax_step(optimizer):
  """theta, s from (theta', s') and g, for the optax optimizer itself (its state layout too)."""
  with jax.enable_x64():
    opt = make_inner_optimizer(optimizer, 0.05)
    inverse = make_step_inverse(optimizer, 0.05)
    rng = np.random.default_rng(0)
    params = {'w': jnp.asarray(rng.normal(size=(4, 3))), 'b': jnp.asarray(rng.normal(size=3))}
    state = opt.init(params)
    for _ in range(3):
      grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
      updates, state_next = opt.update(grads, state, params)
      params_next = optax.apply_updates(params, updates)
      back = (inverse.params(params_next, state_next), inverse.opt_state(state_next, grads))
      assert jax.tree.structure(back) == jax.tree.structure((params, state))
      for got, want in zip(jax.tree.leaves(back), jax.tree.leaves((params, state))):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
      params, state = params_next, state_next


def test_adam_step_vjp_is_the_vjp_of_the_optax_step():
  """The closed-form backward step (from the state after it) = jax.vjp of optax's Adam update,
  for the gradient, the moments and the params, at the first step (count 1) and later ones."""
  with jax.enable_x64():
    opt, inverse = make_inner_optimizer('adam', 0.05), make_step_inverse('adam', 0.05)
    rng = np.random.default_rng(0)
    normal = lambda tree: jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), tree)
    params = normal({'w': np.zeros((4, 3)), 'b': np.zeros(3)})
    state = opt.init(params)

    def update(g, opt_state, params):
      updates, opt_state = opt.update(g, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    for _ in range(3):
      grads = normal(params)
      out, vjp = jax.vjp(update, grads, state, params)
      ct = (normal(params), jax.tree.map(
          lambda x: normal(x) if jnp.issubdtype(x.dtype, jnp.inexact)
          else np.zeros(x.shape, jax.dtypes.float0), out[1]))
      want = vjp(ct)
      ct_carry = mixed_mode._to_carry(InnerState(*ct), InnerState(*out))
      got = inverse.step_vjp(out[1], grads, ct_carry)
      want = mixed_mode._to_carry(want, want)  # the count's float0 cotangent -> 0.
      assert jax.tree.structure(got) == jax.tree.structure(want)
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)
      params, state = out


def test_sgd_has_no_inverse_and_invert_is_refused():
  assert make_step_inverse('sgd', 0.1) is None
  with pytest.raises(ValueError, match='invert'):
    mixed_mode.make_mixed_unroll(lambda p, b: b, make_inner_optimizer('sgd', 0.1),
                                 lambda p, b: b, recompute='invert')
