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
Each is made by name from the registry `META_GRADIENTS` (`outer.meta_gradient`):
`@register_estimator('name', schema={field: config_checks.default(check, value)})` on a factory
`(outer, inner, params) -> estimator` (the config sections, the inner model's parameters or
their shapes, or None), `schema` the `outer` fields it alone reads (`outer_schema`: checked with
the section; a config without one holds its default, `with_defaults`; refused on the command
line under another estimator, `unread_while`; a checkpoint recorded without one matches at the
default, `defaults`).
"""
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from datarater import config_checks
from datarater.errors import UserError
from inner_loop import optimizers
from inner_loop.optimizers import StepInverse, make_step_inverse
from inner_loop.unroll import unroll
from outer_loop import mixed_mode

# name -> factory(outer, inner, params) -> estimator; and its own `outer` fields: checks, defaults
META_GRADIENTS: dict[str, Callable[[Any, Any, Any], Any]] = {}
SCHEMAS: dict[str, dict] = {}
MIXED_RECOMPUTE = ('auto',) + mixed_mode.RECOMPUTE  # auto: invert if the optimizer can


def register_estimator(name: str, schema: Optional[dict] = None):
  """Registers an estimator factory `(outer, inner, params) -> estimator` as
  outer.meta_gradient=`name`; `schema`: the `outer` fields it reads besides those of every rater
  run, each `config_checks.default(check, value)` (a field another estimator declares too is
  that estimator's entry, as `MIXED_SCHEMA`'s would be)."""
  schema = dict(schema or {})
  shared = set(schema) & set(config_checks.SECTIONS['outer'])
  assert not shared, f'estimator {name}: outer.{shared} is every rater run\'s'
  def add(factory):
    config_checks.check_own_schema('estimator', name, 'outer', schema, SCHEMAS)
    META_GRADIENTS[name], SCHEMAS[name] = factory, schema
    return factory
  return add


def outer_schema() -> dict:
  """The fields of config.outer the registered estimators declare, with their checks."""
  return {field: check for schema in SCHEMAS.values() for field, check in schema.items()}


def defaults() -> dict[str, Any]:
  """{'outer.field': default} of every registered estimator's own fields: what a config (or a
  checkpoint's record) without one holds."""
  return {f'outer.{field}': check.default for field, check in outer_schema().items()}


def with_defaults(config):
  """`config`, or a copy of it with each field a registered estimator declares that its `outer`
  section lacks set to its default (a config of another launcher, with none, as it is)."""
  return config_checks.with_defaults(config, 'outer', outer_schema())


def unread_fields(name: str, config) -> tuple[str, ...]:
  """The estimators' own fields of `config.outer` that estimator `name` does not read, dotted:
  a run of it ignores them (so may its resume)."""
  return tuple(f'outer.{f}' for f in sorted(outer_schema())
               if f in config.outer and f not in SCHEMAS.get(name, {}))


def unread_while() -> list[tuple]:
  """`config_checks.UNREAD_WHILE` rows of the estimators' own fields: each read only while
  outer.meta_gradient is an estimator that declares it."""
  readers = {f: tuple(n for n, s in SCHEMAS.items() if f in s) for f in outer_schema()}
  return [config_checks.only_at(
      f'outer.{f}', 'outer.meta_gradient', names,
      f'a setting of meta_gradient={" or ".join(map(repr, names))}')
          for f, names in readers.items()]


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
  """The estimator of config sections `outer` (meta_gradient and its estimator's own fields, at
  their defaults where `outer` lacks them) and `inner`; `params`, the inner model's parameters
  or their shapes, if known (e.g. steps in parameters below float32 cannot be undone)."""
  name = outer.meta_gradient
  if name not in META_GRADIENTS:
    raise UserError(f'unknown outer.meta_gradient {name!r} (choose from '
                    f'{", ".join(META_GRADIENTS)})')
  schema = SCHEMAS[name]
  outer = config_checks.with_defaults(outer, '', schema)
  config_checks.check_section('outer', {f: outer[f] for f in schema}, schema)
  return META_GRADIENTS[name](outer, inner, params)


@register_estimator('remat')
@register_estimator('reverse')
def _reverse(outer, inner, params):
  del inner, params
  return Reverse(remat=outer.meta_gradient == 'remat')


MIXED_SCHEMA = {'mixed_recompute': config_checks.default(config_checks.one_of(*MIXED_RECOMPUTE),
                                                         'auto'),
                'mixed_segment': config_checks.default(config_checks.integer(0), 0)}


@register_estimator('mixed', schema=MIXED_SCHEMA)
def _mixed(outer, inner, params):
  """`Mixed`, refusing combinations whose meta-gradient would be wrong: 'invert' in parameters
  below float32 or for an optimizer without an inverse, 'invert' segments over
  `mixed_mode.INVERT_SEGMENT` steps."""
  recompute = outer.mixed_recompute
  narrow = narrow_floats(params) if params is not None else []
  inverse = make_step_inverse(inner.optimizer, inner.learning_rate)
  if recompute == 'invert' and narrow:
    # A step's update below half an ulp of a parameter is rounded away (theta' = theta), which
    # the inverse theta = theta' - u cannot know: the states it recovers, and the meta-gradient,
    # drift from the true ones.
    raise UserError(f"outer.mixed_recompute='invert' undoes inner steps in the task's "
                    f"{'/'.join(narrow)} parameters, whose round-off it cannot undo (the "
                    "meta-gradient would be wrong): use 'replay' (what 'auto' picks for them)")
  if recompute == 'invert' and inverse is None:
    invertible = [o for o in optimizers.INNER_OPTIMIZERS if make_step_inverse(o, 1.0) is not None]
    raise UserError(f"outer.mixed_recompute='invert' needs an inner optimizer that can be run "
                    f"backwards ({', '.join(invertible)}), got inner.optimizer={inner.optimizer!r}")
  limit = mixed_mode.INVERT_SEGMENT
  if (outer.mixed_segment > limit
      and (recompute == 'invert' or (recompute == 'auto' and inverse is not None and
                                     not narrow))):
    raise UserError(f'outer.mixed_segment={outer.mixed_segment} undoes more than {limit} inner '
                    f'steps of {inner.optimizer} from one exact state, where float32 round-off '
                    f'grows (the meta-gradient can be wrong or NaN): use at most {limit}, or '
                    "outer.mixed_recompute='replay'")
  if recompute == 'auto':
    recompute = 'invert' if inverse is not None and not narrow else 'replay'
  return Mixed(recompute, int(outer.mixed_segment), inverse)  # replay: its closed-form VJP
