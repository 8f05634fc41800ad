"""Meta-gradient estimators: how d(held-out loss)/d(phi) is taken through the inner unroll.

The problem (`meta_step.MetaProblem`) says what is unrolled; an estimator says how it is
differentiated, by the unroll it gives: `estimator.unroll(problem, phi, state, batches) ->
(final state, (losses [T], weight ESS [T]))` (`inner_loop.unroll.unroll`'s outputs),
differentiable in phi. All give the same value; memory and time differ.
  - `Reverse()`: plain reverse mode, every inner step's activations kept (memory grows with T);
    `Reverse(remat=True)`: each inner step under `jax.checkpoint`, recomputed on the way back.
  - `Mixed(recompute, segment)`: a custom backward pass (`outer_loop.mixed_mode`), Hessian terms
    by forward-over-reverse, inner states recovered by running the optimizer backwards
    ('invert': momentum, Adam) or replayed from kept states ('replay': any optimizer).
To add one, write a class with that `unroll`, add its name to `META_GRADIENTS` (the config
check's choices) and build it in `make_estimator` (WORKSPACE.md: its settings).
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from datarater.errors import UserError
from inner_loop import optimizers
from inner_loop.optimizers import StepInverse, make_step_inverse
from inner_loop.unroll import unroll
from outer_loop import mixed_mode

META_GRADIENTS = ('reverse', 'remat', 'mixed')
MIXED_RECOMPUTE = ('auto',) + mixed_mode.RECOMPUTE  # auto: invert if the optimizer can


@dataclasses.dataclass(frozen=True)
class Reverse:
  remat: bool = False

  def unroll(self, problem, phi, state, batches):
    return unroll(problem.task.per_example_loss, problem.inner_optimizer,
                  lambda batch: problem.weights(phi, batch), state, batches, remat=self.remat)


@dataclasses.dataclass(frozen=True)
class Mixed:
  recompute: str = 'replay'         # 'invert' or 'replay' (see outer_loop.mixed_mode)
  segment: int = 0                  # steps per segment; 0: the mode's default
  inverse: Optional[StepInverse] = None  # the inner optimizer run backwards ('invert')

  def unroll(self, problem, phi, state, batches):
    inner = mixed_mode.InnerProblem(problem.task.per_example_loss, problem.inner_optimizer,
                                    problem.weights, self.inverse)
    return mixed_mode.mixed_unroll(inner, self.recompute, self.segment)(phi, state, batches)


def narrow_floats(params) -> list:
  """The float dtypes below float32 (bfloat16, float16) among `params`' leaves (or shapes)."""
  return sorted({str(x.dtype) for x in jax.tree.leaves(params)
                 if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32})


def make_estimator(outer, inner, params=None):
  """The estimator of config sections `outer` (meta_gradient, mixed_*) and `inner` (optimizer);
  `params`, the inner model's parameters or their shapes, if known: steps in parameters below
  float32 are replayed, not undone ('auto'), and 'invert' is refused for them."""
  name, recompute = outer.meta_gradient, outer.mixed_recompute
  narrow = narrow_floats(params) if params is not None else []
  if name not in META_GRADIENTS:
    raise UserError(f'unknown outer.meta_gradient {name!r} (choose from '
                    f'{", ".join(META_GRADIENTS)})')
  if recompute not in MIXED_RECOMPUTE:
    raise UserError(f'unknown outer.mixed_recompute {recompute!r} '
                    f'(choose from {", ".join(MIXED_RECOMPUTE)})')
  if outer.mixed_segment < 0:
    raise UserError(f'outer.mixed_segment must be >= 0 (0: default), got {outer.mixed_segment}')
  inverse = make_step_inverse(inner.optimizer, inner.learning_rate)
  if name == 'mixed' and recompute == 'invert' and narrow:
    # A step's update below half an ulp of a parameter is rounded away (theta' = theta), which
    # the inverse theta = theta' - u cannot know: the states it recovers, and the meta-gradient,
    # drift from the true ones.
    raise UserError(f"outer.mixed_recompute='invert' undoes inner steps in the task's "
                    f"{'/'.join(narrow)} parameters, whose round-off it cannot undo (the "
                    "meta-gradient would be wrong): use 'replay' (what 'auto' picks for them)")
  if name == 'mixed' and recompute == 'invert' and inverse is None:  # others never read it
    invertible = [o for o in optimizers.INNER_OPTIMIZERS if make_step_inverse(o, 1.0) is not None]
    raise UserError(f"outer.mixed_recompute='invert' needs an inner optimizer that can be run "
                    f"backwards ({', '.join(invertible)}), got inner.optimizer={inner.optimizer!r}")
  limit = mixed_mode.INVERT_SEGMENT
  if (name == 'mixed' and outer.mixed_segment > limit
      and (recompute == 'invert' or (recompute == 'auto' and inverse is not None and
                                     not narrow))):
    raise UserError(f'outer.mixed_segment={outer.mixed_segment} undoes more than {limit} inner '
                    f'steps of {inner.optimizer} from one exact state, where float32 round-off '
                    f'grows (the meta-gradient can be wrong or NaN): use at most {limit}, or '
                    "outer.mixed_recompute='replay'")
  if name in ('reverse', 'remat'):
    return Reverse(remat=name == 'remat')
  if name == 'mixed':
    if recompute == 'auto':
      recompute = 'invert' if inverse is not None and not narrow else 'replay'
    return Mixed(recompute, int(outer.mixed_segment), inverse)  # replay: its closed-form VJP
  raise NotImplementedError(f'outer.meta_gradient {name!r} is in META_GRADIENTS but '
                            'make_estimator does not build it')
