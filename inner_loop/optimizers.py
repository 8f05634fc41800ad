"""Inner optimizers that can be differentiated through (meta-gradients flow through their updates).

Momentum and Adam can also be run backwards (`make_step_inverse`): from the state after a step
and that step's gradient, the state before it is recovered exactly up to float round-off, which
lets the mixed-mode meta-gradient walk the unroll in reverse without storing it.
"""
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from datarater.errors import UserError
from datarater.tasks.base import at_least_float32

INNER_OPTIMIZERS = ('sgd', 'momentum', 'adam')
MOMENTUM = 0.9
ADAM_B1, ADAM_B2, ADAM_EPS, ADAM_EPS_ROOT = 0.9, 0.999, 1e-8, 1e-12
ADAM_EXACT_STEPS = 4  # first Adam steps replayed, not undone, by the mixed-mode meta-gradient


def make_inner_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  """An optax optimizer (`in_float32`); Adam gets `eps_root` so d sqrt(v) stays finite where
  v = 0."""
  if name == 'sgd':
    return in_float32(optax.sgd(learning_rate))
  if name == 'momentum':
    return in_float32(optax.sgd(learning_rate, momentum=MOMENTUM))
  if name == 'adam':
    return in_float32(optax.adam(learning_rate, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS,
                                 eps_root=ADAM_EPS_ROOT))
  raise _unknown(name)


def in_float32(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """`optimizer` with its state and updates in float32 at least, each update rounded to its
  parameter's dtype (float32 parameters: `optimizer` itself). Parameters below float32 would
  keep them in their own dtype, where float16 rounds Adam's eps (1e-8) and squared gradients
  below 2.4e-4 to 0 (a NaN step) and a global norm above 256 overflows."""
  wide = lambda tree: jax.tree.map(at_least_float32, tree)

  def update(updates, state, params=None):
    new, state = optimizer.update(wide(updates), state, None if params is None else wide(params))
    return jax.tree.map(lambda u, g: u.astype(g.dtype), new, updates), state
  return optax.GradientTransformation(lambda params: optimizer.init(wide(params)), update)


def check_meta_differentiable(name: str, optimizer: optax.GradientTransformation) -> None:
  """Refuses an inner optimizer whose updates do not change with the gradient over three steps
  (a sign, as optax.lion's): the meta-gradient through its steps would be exactly 0."""
  def tangents():  # of the three updates along the gradient, one program (eager took ~1 s)
    params, out = {'w': jnp.array([0.5, -1.0, 2.0])}, []
    state = optimizer.init(params)
    for g in ([0.3, -0.2, 0.5], [-0.1, 0.4, 0.25], [0.2, 0.1, -0.3]):
      g = {'w': jnp.array(g)}
      updates, tangent = jax.jvp(lambda g: optimizer.update(g, state, params)[0], (g,),
                                 ({'w': jnp.ones(3)},))
      out.append(tangent)
      state = optimizer.update(g, state, params)[1]
      params = optax.apply_updates(params, updates)
    return out
  if not any(bool(jnp.any(t != 0)) for t in jax.tree.leaves(jax.jit(tangents)())):
    raise UserError(f'inner.optimizer={name!r}: its update does not change with the gradient '
                    '(a sign?), so the meta-gradient through it is 0 and the rater cannot learn')


def _unknown(name: str) -> UserError:
  return UserError(f'unknown inner optimizer {name!r} (choose from {", ".join(INNER_OPTIMIZERS)})')


class StepInverse(NamedTuple):
  """One inner optimizer step run backwards (reversible learning, Maclaurin et al. 2015).

  The step is theta' = theta + u(s') with s' = f(s, g): its update depends on the new state only.
  `params(theta', s')` gives theta; `opt_state(s', g)` gives s once g = grad L(theta) is known.
  Both are exact in real arithmetic; in floats each undone step adds about one ulp of error,
  amplified by 1 / decay per step in the first moment (so mixed mode undoes at most
  `outer_loop.mixed_mode.INVERT_SEGMENT` = 16 steps from one exact state).
  `exact_steps`: how many first steps of a fresh optimizer state must not be undone but replayed
  from the exact start (Adam: tiny second moments make its first updates ill-conditioned).
  `step_vjp(s', g, ct_next) -> (ct_g, ct_s, ct_theta)`, optional: the step's VJP in closed form
  from the optimizer state s' after it; `ct_next` is the cotangent of the whole inner state
  after it (an `InnerState` of d/d theta', d/d s'; scan carries: 0. for integer leaves).
  Elementwise and free of shared intermediates, it lets XLA update the backward pass's carries
  in place, where `jax.vjp` of the optax update stores a few parameter-sized intermediates per
  step.
  """
  params: Callable[[Any, Any], Any]
  opt_state: Callable[[Any, Any], Any]
  exact_steps: int = 0
  step_vjp: Optional[Callable[[Any, Any, Any], Any]] = None


def make_step_inverse(name: str, learning_rate: float) -> Optional[StepInverse]:
  """The inverse of `make_inner_optimizer(name, learning_rate)`'s step; None if it has none.

  Plain SGD has none in closed form (theta = theta' + lr grad L(theta) is implicit in theta).
  """
  if name == 'momentum':
    def params(params_next, state_next):
      trace, _ = state_next
      return optax.tree.sub(params_next, jax.tree.map(lambda m: -learning_rate * m, trace.trace))

    def opt_state(state_next, grads):
      trace, rest = state_next
      undo = lambda m, g: (m - g) / MOMENTUM                    # m' = g + decay m
      return (trace._replace(trace=jax.tree.map(undo, trace.trace, grads)), rest)
    return StepInverse(params, opt_state, exact_steps=0)
  if name == 'adam':
    def params(params_next, state_next):
      adam, _ = state_next
      mu_hat = optax.tree.bias_correction(adam.mu, ADAM_B1, adam.count)
      nu_hat = optax.tree.bias_correction(adam.nu, ADAM_B2, adam.count)
      update = lambda m, v: -learning_rate * (m / (jnp.sqrt(v + ADAM_EPS_ROOT) + ADAM_EPS))
      return optax.tree.sub(params_next, jax.tree.map(update, mu_hat, nu_hat))

    def opt_state(state_next, grads):
      adam, rest = state_next
      # Before the first step the moments are exactly optax's zeros; recovering them by
      # subtraction would leave round-off where Adam's derivatives are ~1/sqrt(eps_root) large.
      first = adam.count == 1
      mu = jax.tree.map(lambda m, g: jnp.where(first, 0, (m - (1 - ADAM_B1) * g) / ADAM_B1),
                        adam.mu, grads)
      # nu >= 0 always; round-off could take the difference just below 0 where nu ~ 0.
      nu = jax.tree.map(
          lambda v, g: jnp.where(first, 0, jnp.maximum((v - (1 - ADAM_B2) * g * g) / ADAM_B2, 0)),
          adam.nu, grads)
      return (adam._replace(count=adam.count - 1, mu=mu, nu=nu), rest)
    def step_vjp(state_next, grads, ct_next):
      # theta' = theta - lr m'/(c1 d), d = sqrt(v'/c2 + eps_root) + eps, m' = b1 m + (1 - b1) g,
      # v' = b2 v + (1 - b2) g^2, with c1 = 1 - b1^count', c2 = 1 - b2^count'.
      adam, _ = state_next
      ct_adam, ct_rest = ct_next.opt_state

      def moments(m, v, ct_theta, ct_m, ct_v):
        # Two separate expressions (no shared divided intermediate XLA would have to store).
        # In float32 at least: in bfloat16, b2 = 0.999 rounds to 1 and c2 to 0 (a NaN VJP).
        dtype = m.dtype
        m, v, ct_theta, ct_m, ct_v = map(at_least_float32, (m, v, ct_theta, ct_m, ct_v))
        c1 = 1 - ADAM_B1 ** adam.count.astype(m.dtype)
        c2 = 1 - ADAM_B2 ** adam.count.astype(m.dtype)
        s = jnp.sqrt(v / c2 + ADAM_EPS_ROOT)
        d = s + ADAM_EPS
        return ((ADAM_B1 * ct_m - ct_theta * (ADAM_B1 * learning_rate / c1) / d).astype(dtype),
                (ADAM_B2 * ct_v + (ct_theta * m) * (ADAM_B2 * learning_rate / (2 * c1 * c2))
                 / (s * d * d)).astype(dtype))
      both = jax.tree.map(moments, adam.mu, adam.nu, ct_next.params, ct_adam.mu, ct_adam.nu)
      ct_mu = jax.tree.map(lambda _, c: c[0], grads, both)  # d/d m = b1 d/d m'
      ct_nu = jax.tree.map(lambda _, c: c[1], grads, both)  # d/d v = b2 d/d v'
      # (1 - b1) d/d m' + 2 (1 - b2) g d/d v' in float32 (a float16 g times 2 (1 - b2) / b2
      # rounded to 0 below 3e-5), given back in the gradient's dtype
      ct_g = jax.tree.map(
          lambda g, a, b: ((1 - ADAM_B1) / ADAM_B1 * a + 2 * (1 - ADAM_B2) / ADAM_B2
                           * at_least_float32(g) * b).astype(g.dtype), grads, ct_mu, ct_nu)
      return ct_g, (ct_adam._replace(mu=ct_mu, nu=ct_nu), ct_rest), ct_next.params
    # d update / d g ~ 1 / sqrt(eps_root) while v is tiny: undoing the first steps from the end
    # amplifies round-off without bound in float32 (tests/test_invert_float32.py).
    return StepInverse(params, opt_state, exact_steps=ADAM_EXACT_STEPS, step_vjp=step_vjp)
  if name not in INNER_OPTIMIZERS:
    raise _unknown(name)
  return None  # sgd, or an optimizer without an inverse here: mixed mode replays its states
