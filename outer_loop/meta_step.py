"""The bi-level step: K inner models unroll T weighted steps; the rater follows their held-out loss.

`outer_loss(problem, estimator, phi, ...)` is a pure function of the rater parameters;
`outer_step(problem, estimator, state, inner_batches, outer_batches) -> (state, metrics)` resets
due members, advances them A weighted steps outside the meta-gradient (truncated backpropagation:
members age A + T steps per outer step at the cost of A plain steps), takes the meta-gradient
through the next T and one outer optimizer step; `sharding.jit_outer_step` compiles it for a
device mesh.
"""
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from datarater.tasks import Rater, Task, at_least_float32
from inner_loop.unroll import InnerState, init_inner_state, unroll
from inner_loop.weighting import softmax_weights
from outer_loop import averaging
from outer_loop.population import init_population, reset_diverged, staggered_reset


@flax.struct.dataclass
class OuterState:
  step: jax.Array            # int32 scalar: outer steps taken
  rater_params: Any
  opt_state: Any             # outer optimizer state
  population: InnerState     # leaves [K, ...]
  key: jax.Array             # for re-initialising members
  skipped: jax.Array         # int32 scalar: outer steps skipped, their meta-gradient not finite
  skipped_in_a_row: jax.Array  # int32 scalar: of them, the latest consecutive ones
  rater_average: Any = None  # Polyak average of rater_params (outer_loop.averaging); None: off


@dataclasses.dataclass(frozen=True)
class MetaProblem:
  """What is meta-learned: a rater weighting a task's inner training (how: an estimator)."""
  task: Task
  rater: Rater
  inner_optimizer: optax.GradientTransformation
  outer_optimizer: optax.GradientTransformation
  temperature: float
  reset_every: int
  advance_steps: int = 0     # A: weighted inner steps per outer step before the unrolled T
  ema: float = 0.0           # decay of the rater's Polyak average (0: off, the last iterate)

  def weights(self, rater_params, batch) -> jax.Array:
    """Loss weights w = B * softmax(g_phi(batch) / tau), mean 1."""
    return softmax_weights(self.rater.score(rater_params, batch), self.temperature)

  def rater_params_of(self, state: OuterState):
    """The rater a run scores, reports and exports: the debiased Polyak average of the iterates
    when `ema` > 0 (skipped steps add none), else the last iterate."""
    return averaging.debiased(state.rater_average, state.rater_params, self.ema,
                              state.step - state.skipped)

  def init_member(self, key) -> InnerState:
    return init_inner_state(self.task.init(key), self.inner_optimizer)


def outer_loss(problem: MetaProblem, estimator, rater_params, population: InnerState,
               inner_batches: dict, outer_batches: dict):
  """Mean over members of the held-out loss after T weighted inner steps.

  inner_batches leaves are [K, T, B, ...], outer_batches [K, B, ...]. Returns
  (loss, (updated population, inner losses [K, T], weight ESS [K] of each member's first
  unrolled batch, `inner_loop.weighting.weight_ess`)); the mean is taken in float32 at least.
  """
  def member(state, inner, outer):
    state, (inner_losses, ess) = estimator.unroll(problem, rater_params, state, inner)
    losses = at_least_float32(problem.task.per_example_loss(state.params, outer))
    return jnp.mean(losses), (state, inner_losses, ess[0])

  held_out, aux = jax.vmap(member)(population, inner_batches, outer_batches)
  return jnp.mean(held_out), aux


def meta_gradient(problem: MetaProblem, estimator, rater_params, population, inner_batches,
                  outer_batches):
  """((outer loss, aux), d outer / d phi): reverse mode over whatever unroll `estimator` gives."""
  return jax.value_and_grad(outer_loss, argnums=2, has_aux=True)(
      problem, estimator, rater_params, population, inner_batches, outer_batches)


def init_outer_state(problem: MetaProblem, key: jax.Array, population_size: int) -> OuterState:
  rater_key, init_key, reset_key = jax.random.split(key, 3)
  rater_params = problem.rater.init(rater_key)
  zero = jnp.zeros((), jnp.int32)
  return OuterState(step=zero, rater_params=rater_params,
                    opt_state=problem.outer_optimizer.init(rater_params),
                    population=init_population(problem.init_member, init_key, population_size),
                    key=reset_key, skipped=zero, skipped_in_a_row=zero,
                    rater_average=averaging.init(rater_params, problem.ema))


def advance(problem: MetaProblem, rater_params, population: InnerState, batches: dict):
  """Each member takes the weighted steps of `batches` (leaves [K, A, B, ...]), phi held fixed."""
  weight_fn = lambda batch: problem.weights(jax.lax.stop_gradient(rater_params), batch)
  return jax.vmap(lambda state, member_batches: unroll(
      problem.task.per_example_loss, problem.inner_optimizer, weight_fn, state,
      member_batches)[0])(population, batches)


def outer_step(problem: MetaProblem, estimator, state: OuterState, inner_batches: dict,
               outer_batches: dict):
  """Reset due members, advance them, take one meta-gradient step on phi; returns (state, metrics).

  inner_batches leaves are [K, A + T, B, ...]: the first A steps advance the members, the
  meta-gradient goes through the last T.

  A step whose meta-gradient (or outer loss) is not finite leaves the rater and its optimizer
  state as they were and is counted as skipped; inner models whose parameters became
  non-finite start afresh. So the state never holds a non-finite rater.
  """
  population = staggered_reset(state.population, problem.init_member, state.key, state.step,
                               problem.reset_every)
  a = problem.advance_steps
  if a:
    population = advance(problem, state.rater_params, population,
                         jax.tree.map(lambda x: x[:, :a], inner_batches))
    inner_batches = jax.tree.map(lambda x: x[:, a:], inner_batches)
  (loss, (population, inner_losses, ess)), grads = meta_gradient(
      problem, estimator, state.rater_params, population, inner_batches, outer_batches)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
  updates, opt_state = problem.outer_optimizer.update(grads, state.opt_state, state.rater_params)
  keep = lambda new, old: optax.tree.where(finite, new, old)
  population, diverged = reset_diverged(jax.lax.stop_gradient(population), problem.init_member,
                                        state.key, state.step)
  skip = (~finite).astype(jnp.int32)
  rater_params = keep(optax.apply_updates(state.rater_params, updates), state.rater_params)
  new_state = OuterState(
      step=state.step + 1, rater_params=rater_params,
      rater_average=keep(averaging.update(state.rater_average, rater_params, problem.ema),
                         state.rater_average),
      opt_state=keep(opt_state, state.opt_state), population=population, key=state.key,
      skipped=state.skipped + skip, skipped_in_a_row=(state.skipped_in_a_row + skip) * skip)
  only_finite = lambda x: jnp.where(finite, x, 0.0)  # a skipped step adds 0 to the means
  metrics = {'outer_loss': only_finite(loss), 'inner_loss': only_finite(jnp.mean(inner_losses)),
             'meta_grad_norm': only_finite(grad_norm),
             # ESS of each member's first unrolled batch (after the A advance steps), mean over K
             'weight_ess': only_finite(jnp.mean(ess)),
             'skipped_steps': skip.astype(jnp.float32),
             'diverged_members': diverged.astype(jnp.float32),
             'skipped_in_a_row': new_state.skipped_in_a_row}
  return new_state, metrics
