"""The policy protocol: how training weighs, filters and selects examples, and the registry.

A `Policy` is four pure functions (optax-style) plus its constants:
  init(num_examples, key) -> state                        one state per trained model
  select(aux, state) -> (positions [n], weights [n], state)   the examples of the next epoch
  weigh(aux, state, params, batch, weights) -> weights [B]   per batch: the selection's weights
                                                          (0 = padding) -> the loss weights
                                                          (the trainer keeps 0 where the
                                                          selection has 0, then scales by
                                                          B / the batch's real examples)
  update(aux, state, positions, weights, losses) -> state     after an epoch, with its losses
                                                          and the loss weights used (0: not
                                                          trained on)
A policy whose `weigh` gives weight > 0 to at most a fixed number of a batch's rows declares it,
`kept_rows(B) -> int`: the trainer's step then runs the task (forward and backward) on that many
rows of each batch, those of the largest weights, not on all B; the rows left out are not
computed, and `update` gets loss 0 for them.
`aux` holds the policy's constant arrays (rater parameters, a weight table, SAE statistics); it
is an argument of the compiled functions, shared by every model. Selection policies implement
`select` and `update`; weighting and online filtering implement `weigh`; the defaults below
fill in the rest. `positions` index the training split; an epoch's last batch is padded with
position 0 at weight 0.

Policies are made by name from `POLICIES` (`@register_policy('name')` on a factory
`(ctx: PolicyContext) -> Policy`, or `-> FromScores` for one made from a score of every training
example, which its caller computes: `make_policy` in its process, launch.train shared out over
its processes; `reads=('rater',)` names the launcher inputs it reads, and
`check_inputs` refuses an input given to a policy that would ignore it; `schema` its own
`policy` config fields with their checks and defaults (`with_defaults` fills a config's gaps),
`fields=('valuation.seed',)` those of another section it reads in part; `check_fields` refuses
one set on the command line for a policy that would ignore it, and `unread_fields` lists the
others, which its checkpoints do not compare).
"""
import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from datarater import config_checks
from datarater.errors import UserError


class Policy(NamedTuple):
  name: str
  num_selected: int                 # n: examples drawn per epoch
  init: Callable[[int, jax.Array], Any]
  select: Callable[[Any, Any], tuple]
  weigh: Callable[[Any, Any, Any, dict, jax.Array], jax.Array]
  update: Callable[[Any, Any, jax.Array, jax.Array, jax.Array], Any]
  aux: Any = None
  setup_example_gradients: int = 0  # compute spent once to make the policy (rater, valuation)
  forwards_per_example: float = 0.0  # extra forward passes per example drawn (scoring)
  setup_forwards: int = 0           # forward passes spent once to make the policy (scoring)
  spans_epochs: bool = False        # its choices depend on the total number of epochs
  check_data: Optional[Callable[[dict], None]] = None  # refuses host features it cannot read
  kept_rows: Optional[Callable[[int], int]] = None  # at most this many rows of B weighted > 0


class FromScores(NamedTuple):
  """A policy to be made from `score(batch) -> [B]` of every example of the training split (a
  valuation's values, a rater's scores): `finish(scores [N]) -> Policy`. The factory
  (`start_policy`) fits or loads what scores; the caller scores the split
  (`evaluation.score_split`'s batches)."""
  score: Callable[[dict], jax.Array]
  finish: Callable[[Any], Policy]
  desc: str  # what is scored, for a progress bar


def no_state(num_examples: int, key: jax.Array):
  del num_examples, key
  return ()


def select_all(num_examples: int):
  """`select` of a policy that visits every example once per epoch with weight 1."""
  def select(aux, state):
    del aux
    return jnp.arange(num_examples, dtype=jnp.int32), jnp.ones(num_examples, jnp.float32), state
  return select


def weigh_uniform(aux, state, params, batch, weights) -> jax.Array:
  """The selection's weights as they are (padding 0, every drawn example its weight)."""
  del aux, state, params, batch
  return weights


def keep_state(aux, state, positions, weights, losses):
  del aux, positions, weights, losses
  return state


def weighting_policy(name: str, num_examples: int, weigh=weigh_uniform, aux=None,
                     **cost) -> Policy:
  """A policy that trains on every example each epoch with the per-batch weights of `weigh`."""
  return Policy(name, num_examples, no_state, select_all(num_examples), weigh, keep_state, aux,
                **cost)


@dataclasses.dataclass
class PolicyContext:
  """What a policy factory may read: the data, the task, the config and the launcher's inputs."""
  train: Any                 # pipeline.Split; with train.stream, a data.source.Source (len,
                             # info, take(positions), corruption_of(positions): no features)
  heldout: Any               # pipeline.Split
  task: Any                  # tasks.Task
  config: Any                # the run's config (sections policy, valuation, features, sae, ...)
  rater: str = ''            # an exported rater or rater run (datarater policies)
  scores: str = ''           # a scores file (policy 'scores')


POLICIES: dict[str, Callable[[PolicyContext], Policy]] = {}
INPUTS = ('rater', 'scores')  # the launcher inputs of a PolicyContext (flags of launch.train)
READS: dict[str, tuple[str, ...]] = {}  # policy -> the inputs it reads
SECTIONS: dict[str, tuple[str, ...]] = {}  # policy -> the config sections it reads besides train's
# policy -> the fields of config.policy it reads (not name), and of another section it reads in
# part, dotted ('valuation.seed': every other field of that section is unread)
FIELDS: dict[str, tuple[str, ...]] = {}
SCHEMAS: dict[str, dict] = {}  # policy -> its own config.policy fields: their checks, defaults
VALUATION: dict[str, str] = {}  # policy -> the valuation method it builds (factory.build)
WHOLE_SPLIT: set[str] = set()  # policies that read the training split's features in memory


def register_policy(name: str, reads: tuple[str, ...] = (), whole_split: bool = False,
                    sections: tuple[str, ...] = (), schema: Optional[dict] = None,
                    fields: tuple[str, ...] = (), valuation: Optional[str] = None):
  """Registers a policy factory; `reads`: the launcher inputs it reads (`INPUTS`);
  `whole_split`: it reads `ctx.train`'s features in memory (a Split), so `train.stream=True` is
  refused for it; `sections`: the config sections it reads besides those of every training run
  (e.g. 'valuation'), checked with them before any work; `schema`: the fields of `config.policy`
  it reads besides `name`, each with its check and default (`config_checks.default(check,
  value)`; a field another policy declares too is that policy's entry, e.g.
  `weighting.TEMPERATURE`); `fields`: dotted, the fields of a section it reads in part (e.g.
  'valuation.seed'); `valuation`: the method of
  `valuation.factory.build` it values the split with (as launch.valuate --method does:
  `config_checks.UNREAD_WHILE`'s rows of it hold)."""
  assert set(reads) <= set(INPUTS), reads
  assert all('.' in f for f in fields), f'{fields}: own policy fields go in the schema'
  schema = dict(schema or {})
  assert 'name' not in schema, f'policy {name}: policy.name is every policy\'s'
  def add(factory):
    config_checks.check_own_schema('policy', name, 'policy', schema, SCHEMAS)
    POLICIES[name], READS[name], SECTIONS[name] = factory, tuple(reads), tuple(sections)
    FIELDS[name], SCHEMAS[name] = (*schema, *fields), schema
    if valuation is not None:
      VALUATION[name] = valuation
    if whole_split:
      WHOLE_SPLIT.add(name)
    return factory
  return add


def policy_schema() -> dict:
  """The fields of config.policy the registered policies declare, with their checks."""
  return {field: check for schema in SCHEMAS.values() for field, check in schema.items()}


def defaults(name: str) -> dict[str, Any]:
  """{'policy.field': default} of policy `name`'s own fields: what a config (or a checkpoint's
  record) without one holds."""
  return {f'policy.{field}': check.default for field, check in SCHEMAS.get(name, {}).items()}


def with_defaults(config):
  """`config`, or a copy of it with each field a registered policy declares that its `policy`
  section lacks set to its default (a config of another launcher, with none, as it is)."""
  return config_checks.with_defaults(config, 'policy', policy_schema())


def check_inputs(name: str, **given: str) -> None:
  """UserError if an input (rater=..., scores=...) is given to policy `name`, which ignores it."""
  for field, value in given.items():
    if value and field not in READS.get(name, ()):
      readers = [p for p, reads in READS.items() if field in reads]
      raise UserError(f'--{field} is read only by polic{"ies" if len(readers) > 1 else "y"} '
                      f'{", ".join(readers)} (policy is {name!r})')


def _dotted(name: str) -> tuple[str, ...]:
  """The fields policy `name` reads (`FIELDS`), each as section.field."""
  return tuple(f if '.' in f else f'policy.{f}' for f in FIELDS.get(name, ()))


def _read_in_part(name: str) -> set[str]:
  """The config sections policy `name` reads in part: `policy`, and those of its dotted FIELDS."""
  return {'policy', *(f.split('.')[0] for f in _dotted(name))}


def unread_fields(name: str, config) -> tuple[str, ...]:
  """The fields of `config`'s sections that policy `name` reads in part (`_read_in_part`) which
  it does not read, each as section.field: a run of it ignores them (so may its resume)."""
  own = ('policy.name', *_dotted(name))
  return tuple(f'{s}.{k}' for s in sorted(_read_in_part(name) & set(config.keys()))
               for k in sorted(config[s].keys()) if f'{s}.{k}' not in own)


def check_fields(name: str, overridden) -> None:
  """UserError if a config field among `overridden` (dotted paths set on the command line) is one
  policy `name` does not read: of `policy`, or of a section it reads in part (`FIELDS`: e.g. of
  `valuation`, which tracin_curriculum and mimic read as their method does, in part); the run
  would ignore it."""
  own, checked = _dotted(name), _read_in_part(name)
  for path in overridden:
    section, _, field = path.partition('.')
    if section not in checked or path in ('policy.name', *own):
      continue
    reads = ', '.join(f for f in own if f.startswith(f'{section}.')) or f'no other {section} field'
    readers = ', '.join(p for p in FIELDS if path in _dotted(p)) or 'no policy'
    raise UserError(f'--config.{path} is not read by policy {name} (it reads {reads}; {field} '
                    f'is read by {readers})')


def start_policy(name: str, ctx: PolicyContext):
  """Policy `name` (its factory's `Policy`), or the `FromScores` it is made from; its own fields
  the config lacks hold their defaults (`with_defaults`: a config built in Python)."""
  if name not in POLICIES:
    raise UserError(f'unknown policy {name!r} (choose from {", ".join(sorted(POLICIES))})')
  return POLICIES[name](dataclasses.replace(ctx, config=with_defaults(ctx.config)))


def make_policy(name: str, ctx: PolicyContext) -> Policy:
  """Policy `name`; one made from scores of the split (`FromScores`) scored in this process."""
  made = start_policy(name, ctx)
  if isinstance(made, FromScores):
    from datarater import evaluation  # pylint: disable=g-import-not-at-top
    made = made.finish(evaluation.score_split(made.score, ctx.train, desc=made.desc))
  return made
