"""The bi-level step: K inner models unroll T weighted steps; the rater follows d(held-out loss)/d(phi).

`outer_loss` is a pure function of the rater parameters; `make_outer_step` closes it over the models
and optimizers and returns `outer_step(state, batches) -> (state, metrics)`, ready for `jax.jit`.
"""
import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from inner_loop.optimizers import StepInverse
from inner_loop.unroll import InnerState, PerExampleLoss, unroll
from inner_loop.weighting import softmax_weights
from outer_loop import mixed_mode
from outer_loop.population import InitMember, init_population, staggered_reset

# How d(outer)/d(phi) is computed through the unroll; all give the same value.
#   reverse: plain reverse mode, every inner step's activations kept (memory grows with T);
#   remat:   reverse mode with each inner step under jax.checkpoint (recomputed on the way back);
#   mixed:   custom backward pass (outer_loop.mixed_mode): Hessian terms by forward-over-reverse
#            (jvp of grad); inner states recovered by running the optimizer backwards ('invert',
#            momentum and Adam) or recomputed from states kept every ~sqrt(T) steps ('replay').
META_GRADIENT_MODES = ('reverse', 'remat', 'mixed')
MIXED_RECOMPUTE = ('auto',) + mixed_mode.RECOMPUTE  # auto: invert if the optimizer can, else replay


@flax.struct.dataclass
class OuterState:
  step: jax.Array            # int32 scalar: outer steps taken
  rater_params: Any
  opt_state: Any             # outer optimizer state
  population: InnerState     # leaves [K, ...]
  key: jax.Array             # for re-initialising members


@dataclasses.dataclass(frozen=True)
class MetaProblem:
  """Everything static about the bi-level problem (functions and hyper-parameters)."""
  task_loss: PerExampleLoss                # (theta, batch) -> [B]
  rater_apply: Callable[[Any, dict], jax.Array]  # (phi, batch) -> scores [B]
  init_member: InitMember                  # key -> fresh InnerState
  inner_optimizer: optax.GradientTransformation
  outer_optimizer: optax.GradientTransformation
  temperature: float
  reset_every: int
  meta_gradient: str = 'reverse'          # see META_GRADIENT_MODES
  mixed_recompute: str = 'auto'           # see MIXED_RECOMPUTE (mode 'mixed' only)
  mixed_segment: int = 0                  # steps between exact states kept (0: mode default)
  mixed_boundaries: str = 'replay'        # invert: segment ends replayed or kept (mixed_mode)
  inner_inverse: Optional[StepInverse] = None  # the inner optimizer run backwards, if it can be

  def recompute(self) -> str:
    """How mode 'mixed' recovers inner states on the way back ('auto' resolved)."""
    if self.mixed_recompute == 'auto':
      return 'invert' if self.inner_inverse is not None else 'replay'
    return self.mixed_recompute

  def weight_fn(self, rater_params):
    return lambda batch: softmax_weights(self.rater_apply(rater_params, batch), self.temperature)


def outer_loss(problem: MetaProblem, rater_params, population: InnerState,
               inner_batches: dict, outer_batches: dict):
  """Mean over members of the held-out loss after T weighted inner steps.

  inner_batches leaves are [K, T, B, ...], outer_batches [K, B, ...]. Returns
  (loss, (updated population, inner losses [K, T])).
  """
  if problem.meta_gradient == 'mixed':
    mixed_unroll = mixed_mode.make_mixed_unroll(
        problem.task_loss, problem.inner_optimizer, lambda phi, batch: problem.weight_fn(phi)(batch),
        segment=problem.mixed_segment or None, recompute=problem.recompute(),
        inverse=problem.inner_inverse, boundaries=problem.mixed_boundaries)
    run = lambda state, inner: mixed_unroll(rater_params, state, inner)
  else:
    run = functools.partial(unroll, problem.task_loss, problem.inner_optimizer,
                            problem.weight_fn(rater_params),
                            remat=problem.meta_gradient == 'remat')

  def member(state, inner, outer):
    state, inner_losses = run(state, inner)
    return jnp.mean(problem.task_loss(state.params, outer)), (state, inner_losses)

  held_out, aux = jax.vmap(member)(population, inner_batches, outer_batches)
  return jnp.mean(held_out), aux


def meta_gradient(problem: MetaProblem, rater_params, population, inner_batches, outer_batches):
  """((outer loss, aux), d outer / d phi) through the unroll, by `problem.meta_gradient`.

  Every mode is this one reverse-mode call: `outer_loss` picks the unroll ('mixed' carries its own
  custom VJP), so the value is the same and only memory and time differ.
  """
  if problem.meta_gradient not in META_GRADIENT_MODES:
    raise ValueError(f'unknown meta_gradient mode {problem.meta_gradient!r} '
                     f'(choose from {", ".join(META_GRADIENT_MODES)})')
  return jax.value_and_grad(outer_loss, argnums=1, has_aux=True)(
      problem, rater_params, population, inner_batches, outer_batches)


def init_outer_state(problem: MetaProblem, rater_params, key: jax.Array,
                     population_size: int) -> OuterState:
  init_key, reset_key = jax.random.split(key)
  return OuterState(step=jnp.zeros((), jnp.int32), rater_params=rater_params,
                    opt_state=problem.outer_optimizer.init(rater_params),
                    population=init_population(problem.init_member, init_key, population_size),
                    key=reset_key)


def outer_step(problem: MetaProblem, state: OuterState, inner_batches: dict, outer_batches: dict):
  """Reset due members, take one meta-gradient step on phi; returns (state, metrics)."""
  population = staggered_reset(state.population, problem.init_member, state.key, state.step,
                               problem.reset_every)
  (loss, (population, inner_losses)), grads = meta_gradient(
      problem, state.rater_params, population, inner_batches, outer_batches)
  updates, opt_state = problem.outer_optimizer.update(grads, state.opt_state, state.rater_params)
  new_state = OuterState(step=state.step + 1,
                         rater_params=optax.apply_updates(state.rater_params, updates),
                         opt_state=opt_state, population=jax.lax.stop_gradient(population),
                         key=state.key)
  metrics = {'outer_loss': loss, 'inner_loss': jnp.mean(inner_losses),
             'meta_grad_norm': optax.tree.norm(grads)}
  return new_state, metrics
