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

INNER_OPTIMIZERS = ('sgd', 'momentum', 'adam')
MOMENTUM = 0.9
ADAM_B1, ADAM_B2, ADAM_EPS, ADAM_EPS_ROOT = 0.9, 0.999, 1e-8, 1e-12
ADAM_EXACT_STEPS = 4  # first Adam steps replayed, not undone, by the mixed-mode meta-gradient


def make_inner_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  """An optax optimizer; Adam gets `eps_root` so d sqrt(v) stays finite where v = 0."""
  if name == 'sgd':
    return optax.sgd(learning_rate)
  if name == 'momentum':
    return optax.sgd(learning_rate, momentum=MOMENTUM)
  if name == 'adam':
    return optax.adam(learning_rate, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS, eps_root=ADAM_EPS_ROOT)
  raise UserError(f'unknown inner optimizer {name!r} (choose from {", ".join(INNER_OPTIMIZERS)})')


class StepInverse(NamedTuple):
  """One inner optimizer step run backwards (reversible learning, Maclaurin et al. 2015).

  The step is theta' = theta + u(s') with s' = f(s, g): its update depends on the new state only.
  `params(theta', s')` gives theta; `opt_state(s', g)` gives s once g = grad L(theta) is known.
  Both are exact in real arithmetic; in floats each undone step adds about one ulp of error,
  amplified by 1 / decay per step in the first moment (so checkpoint every few dozen steps).
  `exact_steps`: how many first steps of a fresh optimizer state must not be undone but replayed
  from the exact start (Adam: tiny second moments make its first updates ill-conditioned).
  """
  params: Callable[[Any, Any], Any]
  opt_state: Callable[[Any, Any], Any]
  exact_steps: int = 0


def make_step_inverse(name: str, learning_rate: float) -> Optional[StepInverse]:
  """The inverse of `make_inner_optimizer(name, learning_rate)`'s step; None if it has none.

  Plain SGD has none in closed form (theta = theta' + lr grad L(theta) is implicit in theta).
  """
  sub = lambda a, b: jax.tree.map(jnp.subtract, a, b)
  if name == 'momentum':
    def params(params_next, state_next):
      trace, _ = state_next
      return sub(params_next, jax.tree.map(lambda m: -learning_rate * m, trace.trace))

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
      return sub(params_next, jax.tree.map(update, mu_hat, nu_hat))

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
    # d update / d g ~ 1 / sqrt(eps_root) while v is tiny: undoing the first steps from the end
    # amplifies round-off without bound in float32 (tests/test_invert_float32.py).
    return StepInverse(params, opt_state, exact_steps=ADAM_EXACT_STEPS)
  if name == 'sgd':
    return None
  raise UserError(f'unknown inner optimizer {name!r} (choose from {", ".join(INNER_OPTIMIZERS)})')
