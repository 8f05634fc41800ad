"""Config validation: one check per field, one schema per section, unknown fields refused.

`validate(config, sections)` checks the named sections of a config (those a launcher reads)
before anything is written, and raises a one-line `UserError` naming the first bad field and its
value. The `task`, `rater` and `features.task` sections are checked against the schema their
registered task or rater declares (`tasks.registry.schema_of`), and `policy` against the fields
the registered policies declare (`policies.base.policy_schema`), `outer` against its own fields
and those the registered meta-gradient estimators declare (`outer_loop.estimators.outer_schema`).
"""
import copy
import math
from typing import Any, Callable, Optional

import numpy as np

from datarater.data.corruption import INPUT_KINDS, LABEL_KINDS
from datarater.errors import UserError

# The least softmax temperature (rater.temperature, policy.temperature, an exported rater's): below
# ~1e-38 float32 flushes it to 0 (score / 0 is +-inf, the weights NaN); 1e-6 leaves room for scores
# up to ~1e32.
MIN_TEMPERATURE = 1e-6
# The largest outer.ema: float32's largest number below 1 (a decay that rounds to 1 averages
# nothing, and the debiased average is 0 / 0).
MAX_EMA = 1 - 2 ** -24
# The largest seed: models are trained vmapped over int32 seeds (trainer.Trainer).
MAX_SEED = 2 ** 31 - 1
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max
# numpy.finfo(numpy.float32).tiny, float32's least normal number: XLA flushes smaller ones
# (subnormals) to 0 (a learning rate of 1e-45 learnt nothing).
FLOAT32_TINY = 1.1754943508222875e-38
# The largest config integer: steps, sizes and counts meet int32 arithmetic inside jit (a larger
# reset_every or warmup_steps would overflow there).
INT32_MAX = 2 ** 31 - 1

Check = Callable[[Any], Optional[str]]  # value -> what is wrong with it, or None


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def integer(lo: Optional[int] = None, hi: int = INT32_MAX) -> Check:
  def check(v):
    if not _is_int(v):
      return 'must be an integer'
    if lo is not None and v < lo:
      return f'must be >= {lo}'
    if hi is not None and v > hi:
      return f'must be <= {hi}'
    return None
  return check


def number(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
           hi_open: bool = False) -> Check:
  """A finite real number in the interval [lo, hi] ('(' / ')' when open), finite in float32 too
  (the computations' type)."""
  def check(v):
    if not isinstance(v, (int, float)) or isinstance(v, bool):
      return 'must be a number'
    if not math.isfinite(v):
      return 'must be finite'
    if abs(v) > FLOAT32_MAX:
      return f'must be finite in float32 (at most {FLOAT32_MAX:.4g} in size)'
    if lo is not None and (v < lo or (lo_open and v == lo)):
      return f'must be {">" if lo_open else ">="} {lo}'
    if hi is not None and (v > hi or (hi_open and v == hi)):
      return f'must be {"<" if hi_open else "<="} {hi}'
    in_float32 = float(np.float32(v)) if abs(v) >= FLOAT32_TINY else 0.0  # 1e-45 is 0 there
    if lo is not None and lo_open and in_float32 <= lo:
      return (f'must be > {lo} in float32 (the computations\' type, in which a number below '
              f'{FLOAT32_TINY:.4g} is 0)')
    return None
  return check


def one_of(*choices) -> Check:
  def check(v):
    return None if v in choices else f'must be one of {", ".join(map(repr, choices))}'
  return check


def string(nonempty: bool = False) -> Check:
  def check(v):
    if not isinstance(v, str):
      return 'must be a string'
    return 'must not be empty' if nonempty and not v.strip() else None
  return check


def boolean() -> Check:
  return lambda v: None if isinstance(v, bool) else 'must be True or False'


def integers(lo: int = 1, nonempty: bool = True, hi: int = INT32_MAX,
             distinct: str = '') -> Check:
  """A tuple of integers in [lo, hi]; with `distinct` (what one is called), none twice (a
  repeated seed trains the same model twice)."""
  def check(v):
    if not isinstance(v, (tuple, list)) or (nonempty and not v):
      return f'must be a {"non-empty " if nonempty else ""}tuple of integers'
    if not all(_is_int(x) and x >= lo for x in v):
      return f'must hold integers >= {lo}'
    if hi is not None and not all(x <= hi for x in v):
      return f'must hold integers <= {hi}'
    repeated = [x for i, x in enumerate(v) if x in v[:i]]
    if distinct and repeated:
      return f'repeats {distinct} {repeated[0]}'
    return None
  return check


def seed() -> Check:
  """A seed: an integer that jax.random.PRNGKey takes."""
  return integer(0, MAX_SEED)


def pairs() -> Check:
  """A tuple of pairs of two different integers >= 0 (e.g. confusable class indices)."""
  def check(v):
    if not isinstance(v, (tuple, list)) or not all(
        isinstance(p, (tuple, list)) and len(p) == 2 and all(_is_int(x) and x >= 0 for x in p)
        and p[0] != p[1] for p in v):
      return 'must be a tuple of pairs of two different integers >= 0'
    return None
  return check


def section(name: str, schema: dict[str, Check]) -> Check:
  """A nested section checked against its own schema (its errors name the nested field)."""
  def check(v):
    if not hasattr(v, 'keys'):
      return 'must be a section (a ConfigDict)'
    check_section(name, v, schema)
    return None
  return check


def optional(check: Check) -> Check:
  """`check` for a field a section may leave out."""
  def wrapped(v):
    return check(v)
  wrapped.optional = True
  return wrapped


def default(check: Check, value) -> Check:
  """`check` for a field a section may leave out, which then holds `value` (a policy's or an
  estimator's own fields: the schemas of `policies.register_policy` and
  `estimators.register_estimator`, whose defaults fill a config's gaps: `with_defaults`)."""
  wrapped = optional(check)
  wrapped.default = value
  return wrapped


def check_own_schema(kind: str, name: str, section: str, schema: dict,
                     declared: dict[str, dict]) -> None:
  """A registered `kind` (policy, estimator) `name`'s `schema` of its own fields of `section`:
  each a `default(check, value)` whose value passes, and a field another one in `declared`
  ({name: schema}) declares too the same entry (one field, one entry: one check, one default)."""
  for field, check in schema.items():
    assert '.' not in field and hasattr(check, 'default'), (
        f'{kind} {name}: schema field {field!r} needs config_checks.default(check, value)')
    assert check(check.default) is None, f'{kind} {name}: {field} default {check.default!r}'
  for other, theirs in declared.items():
    for field in set(schema) & set(theirs) if other != name else ():
      if theirs[field] is not schema[field]:  # another check, or another default
        raise ValueError(f'{kind} {name} declares {section}.{field} apart from {kind} {other} '
                         f'(default {schema[field].default!r} here, {theirs[field].default!r} '
                         f'there): one field, one entry (import {kind} {other}\'s entry and '
                         'share it, as the shipped policies share weighting.TEMPERATURE)')


def with_defaults(config, section: str, schema: dict):
  """`config`, or a copy of it whose `section` holds each field of `schema` it lacks at its
  default (a config without that section, or a section itself with section='', as it is)."""
  if section and section not in config:
    return config
  node = config[section] if section else config
  if not hasattr(node, 'keys'):
    return config
  missing = {f: c.default for f, c in schema.items() if f not in node}
  if not missing:
    return config
  config = copy.deepcopy(config)
  with config.unlocked():
    (config[section] if section else config).update(missing)
  return config


def _choices(module_attr: str):
  """The choices a module declares (imported lazily: the checks are leaf-level)."""
  module, attr = module_attr.rsplit('.', 1)
  import importlib  # pylint: disable=g-import-not-at-top
  return getattr(importlib.import_module(module), attr)


def _lazy_one_of(module_attr: str) -> Check:
  return lambda v: one_of(*_choices(module_attr))(v)


SECTIONS: dict[str, dict[str, Check]] = {
    '': {'seed': seed(), 'log_every': integer(1), 'checkpoint_every': integer(1)},
    'data': {'name': string(nonempty=True), 'data_dir': string(), 'dataset_dir': string(),
             'train_split': string(nonempty=True), 'heldout_split': string(nonempty=True),
             'eval_split': string(nonempty=True), 'label_noise': number(0, 1, hi_open=True),
             'label_noise_kind': one_of(*LABEL_KINDS), 'confusions': pairs(),
             'noise_seed': seed(),
             'input_corruption': section('data.input_corruption', {
                 kind: optional(number(0, 1, hi_open=True)) for kind in INPUT_KINDS})},
    'inner': {'steps': integer(1), 'population': integer(1), 'batch_size': integer(1),
              'optimizer': _lazy_one_of('inner_loop.optimizers.INNER_OPTIMIZERS'),
              'learning_rate': number(0, lo_open=True), 'reset_every': integer(1),
              'advance_steps': integer(0)},
    'outer': {'steps': integer(0), 'batch_size': integer(1),
              'learning_rate': number(0, lo_open=True), 'warmup_steps': integer(0),
              'schedule': _lazy_one_of('outer_loop.setup.SCHEDULES'),
              'clip_norm': number(0, lo_open=True),
              'ema': number(0, MAX_EMA),
              'meta_gradient': _lazy_one_of('outer_loop.estimators.META_GRADIENTS'),
              'max_skipped_steps': integer(1)},
    # and the fields the registered estimators declare (`outer_loop.estimators.outer_schema`)
    'final_eval': {'train_steps': integer(1), 'num_models': integer(0)},
    'train': {'epochs': integer(1), 'checkpoint_every': integer(1), 'batch_size': integer(1),
              'optimizer': _lazy_one_of('inner_loop.optimizers.INNER_OPTIMIZERS'),
              'learning_rate': number(0, lo_open=True),
              'seeds': integers(0, hi=MAX_SEED, distinct='seed'),
              'stream': optional(boolean())},
    # and the fields the registered policies declare (`policies.base.policy_schema`)
    'policy': {'name': string(nonempty=True)},
    'valuation': {
        'train_steps': integer(1), 'batch_size': integer(1),
        'optimizer': _lazy_one_of('inner_loop.optimizers.INNER_OPTIMIZERS'),
        'learning_rate': number(0, lo_open=True), 'checkpoint_every': integer(1),
        'seed': seed(), 'layers': string(),
        'projection': _lazy_one_of('datarater.valuation.factory.PROJECTIONS'),
        'projection_dim': integer(1), 'projection_seed': seed(), 'chunk_size': integer(1),
        'score_batch_size': integer(1),
        'tracin_mode': _lazy_one_of('datarater.valuation.tracin.MODES'),
        'tracin_project': boolean(), 'tracin_ghost': boolean(), 'mimic_layers': string(),
        'mimic_cosine': boolean(), 'mimic_keep_fraction': number(0, 1, hi_open=True),
        'reference_steps': integer(1),
        'dvemb_curvature': _lazy_one_of('datarater.valuation.dvemb.CURVATURES'),
        'dvemb_steps': integer(1), 'rater': string(), 'store': boolean(),
        'store_k': integer(1), 'topk': integer(0), 'topk_split': string(nonempty=True)},
    'features': {'extractor': _lazy_one_of('datarater.features.EXTRACTORS'),
                 'train_steps': integer(1), 'train_epochs': number(0), 'batch_size': integer(1),
                 'learning_rate': number(0, lo_open=True), 'seed': seed()},
    'sae': {'sparsity': _lazy_one_of('datarater.sae.SPARSITIES'), 'num_factors': integer(1),
            'k': integer(1), 'l1_coef': number(0), 'steps': integer(1), 'epochs': number(0),
            'batch_size': integer(1), 'learning_rate': number(0, lo_open=True)},
    'sae_scores': {'class_conditional': boolean(),
                   'high_freq_fraction': number(0, 1, lo_open=True, hi_open=True),
                   'gate_width': number(0, 1, lo_open=True), 'rep_weight_start': number(),
                   'rep_weight_end': number(), 'div_weight_start': number(),
                   'div_weight_end': number(), 'usage_penalty': number(0),
                   'temperature': number(0),
                   'mislabel_guard': _lazy_one_of('datarater.policies.sae_scores.GUARDS'),
                   'mislabel_rule': _lazy_one_of('datarater.policies.sae_scores.SUSPECT_RULES'),
                   'mislabel_margin': number(0), 'mislabel_knn': integer(1),
                   'mislabel_knn_reference': integer(0),
                   'mislabel_penalty': number(0)},
}
MODEL_SECTIONS = {'task': 'task', 'rater': 'rater', 'features.task': 'task'}  # registry-checked
# The top-level fields a rater run (a config checked with its `outer` section) reads, so requires:
# a config without one would pass its checks and stop with a traceback at the first logged step.
RATER_RUN_FIELDS = ('seed', 'log_every', 'checkpoint_every')


def only_at(field: str, other: str, value, what: str) -> tuple:
  """An UNREAD_WHILE row: `field` (`what` it is) is read only while `other` is `value` (or, a
  tuple, one of its values)."""
  values = value if isinstance(value, tuple) else (value,)
  return (field, other, lambda v: v not in values,
          f' ({what}); give --config.{{other}}={" or ".join(values)} too')


# (field, other, unread(other's value), why): `field` (a section: any field of it) is not read
# while `unread` holds of field `other` (`unread_while` adds the estimators' own fields);
# launch.cli refuses a command-line override of it there, which would change nothing. `other`
# may be a tuple of names, `unread` then taking their values in order; a name is a dotted config
# field or METHOD: the valuation method the launcher's run computes (launch.valuate's --method,
# launch.train's policy's, e.g. tracin for tracin_curriculum; None in a run of none:
# `launch.cli.define_valuation_method`).
METHOD = 'method'
_PASSES = (' > 0 (passes over the data size the stage); give --config.{other}=0 too to train '
           'that many steps')
_PIXELS = " (no extractor is trained); give --config.{other}=penultimate too"
_GUARD_OFF = " (no example is suspected); give --config.{other} too"
_STORES = ('valuation.store', 'valuation.topk')
_NO_STORE = (' (no gradient store is written; launch.valuate writes one with '
             '--config.valuation.store=True)')
UNREAD_WHILE = (
    *((f'features.{f}', 'features.extractor', lambda v: v == 'pixels', _PIXELS) for f in (
        'task', 'train_steps', 'train_epochs', 'batch_size', 'learning_rate')),
    ('features.train_steps', 'features.train_epochs', lambda v: v > 0, _PASSES),
    ('sae.steps', 'sae.epochs', lambda v: v > 0, _PASSES),
    *((f'data.{f}', 'data.label_noise', lambda v: v == 0,
       ' (no label is corrupted); give --config.{other} > 0 too')
      for f in ('label_noise_kind', 'confusions')),
    only_at('data.confusions', 'data.label_noise_kind', 'confusion',
             "the partners of label_noise_kind='confusion'"),
    only_at('sae.k', 'sae.sparsity', 'top_k', "the active factors of sparsity='top_k'"),
    only_at('sae.l1_coef', 'sae.sparsity', 'l1', "the penalty of sparsity='l1'"),
    only_at('sae_scores.mislabel_penalty', 'sae_scores.mislabel_guard', 'penalty',
             "what guard 'penalty' subtracts"),
    *((f'sae_scores.mislabel_{f}', 'sae_scores.mislabel_guard', lambda v: v == 'off', _GUARD_OFF)
      for f in ('rule', 'margin', 'knn', 'knn_reference')),
    only_at('sae_scores.mislabel_margin', 'sae_scores.mislabel_rule', 'margin',
             "a setting of rule 'margin'"),
    *(only_at(f'sae_scores.mislabel_{f}', 'sae_scores.mislabel_rule', 'knn',
               "a setting of rule 'knn'") for f in ('knn', 'knn_reference')),
    ('valuation.topk_split', 'valuation.topk', lambda v: v == 0,
     ' (the split whose examples valuation.topk > 0 ranks); give --config.{other} too'),
    # Nothing corrupted: no draw of the corruption seed is used.
    ('data.noise_seed', ('data.label_noise', 'data.input_corruption'),
     lambda rate, inputs: rate == 0 and not any(inputs.values()),
     ' (nothing is corrupted); give --config.data.label_noise > 0 or a data.input_corruption '
     'rate > 0 too'),
    # The gradient store's projection (valuation.store_k, projection_seed) exists with
    # valuation.store or topk alone; without one, TracIn projects with valuation.projection only
    # under tracin_project, Mimic projects nothing, and no method (dvemb) projects under 'none'
    # (whose size, projection_dim, no method reads either).
    ('valuation.store_k', _STORES, lambda store, topk: not (store or topk), _NO_STORE),
    ('valuation.projection_seed', (*_STORES, METHOD),
     lambda store, topk, method: method == 'mimic' and not (store or topk), _NO_STORE),
    ('valuation.projection_seed', (*_STORES, 'valuation.tracin_project', METHOD),
     lambda store, topk, project, method: method == 'tracin' and not (store or topk or project),
     ' (TracIn takes exact gradients); give --config.valuation.tracin_project=True (or, to '
     'launch.valuate, valuation.store=True) too'),
    ('valuation.projection_seed', (*_STORES, 'valuation.projection'),
     lambda store, topk, projection: not (store or topk) and projection == 'none',
     ' (nothing is projected); give a --config.valuation.projection (or, to launch.valuate, '
     'valuation.store=True) too'),
    ('valuation.projection_dim', 'valuation.projection', lambda v: v == 'none',
     ' (nothing is projected); give --config.{other}=kronecker or gaussian too'),
    *((f'valuation.{f}', ('valuation.tracin_project', METHOD),
       lambda project, method: method == 'tracin' and not project,
       ' (TracIn takes exact gradients); give --config.valuation.tracin_project=True too')
      for f in ('projection', 'projection_dim')),
    # TracIn with a store or top-k table: launch.valuate's scores come from the gradient store
    # (its own projection and ghost norms unused); a policy that values the split itself
    # (tracin_curriculum) refuses both (`policies.weighting.refuse_valuate_outputs`).
    *((f'valuation.{f}', (*_STORES, METHOD),
       lambda store, topk, method: method == 'tracin' and (store or topk),
       " (a gradient store or top-k table is launch.valuate's, whose TracIn scores then come "
       'from the store, projected by valuation.store_k; a policy that values the split itself '
       'refuses both); give --config.valuation.store=False and valuation.topk=0 too')
      for f in ('projection', 'projection_dim', 'tracin_project', 'tracin_ghost')),
    # Ghost norms replace the per-example gradients of self-influence (unprojected) and
    # heldout_cos's norms; 'heldout' takes no norm.
    ('valuation.tracin_ghost', 'valuation.tracin_mode', lambda v: v == 'heldout',
     " (plain held-out influence takes no gradient norm); give --config.{other}=self or "
     'heldout_cos too'),
    ('valuation.tracin_ghost', 'valuation.tracin_project', lambda v: v,
     ' (projected gradients are formed); give --config.{other}=False too'),
    # No row for final_eval.train_steps while final_eval.num_models is 0, though no fresh model
    # is trained then: report.json records final_eval whole, and a finished run whose record
    # differs from its config writes its report again (`meta_train._finished_report`: the same
    # figures, the new record) instead of printing it. Nothing else reads it.
)


def unread_while() -> tuple:
  """UNREAD_WHILE and a row per `outer` field the registered meta-gradient estimators declare,
  read only while outer.meta_gradient is one of those declaring it
  (`outer_loop.estimators.unread_while`)."""
  return UNREAD_WHILE + tuple(_choices('outer_loop.estimators.unread_while')())


def _fail(name: str, value, problem: str):
  raise UserError(f'{name} {problem}, got {value!r}')


def check_section(name: str, section, schema: dict[str, Check]) -> None:
  """Every field of `section` known and valid; every field of `schema` present."""
  prefix = f'{name}.' if name else ''
  for field in section.keys():
    if field not in schema and f'{prefix}{field}' not in MODEL_SECTIONS:
      raise UserError(f'unknown config field {prefix}{field} (the fields of '
                      f'{name or "the config"}: {", ".join(sorted(schema))})')
  for field, check in schema.items():
    if field not in section:
      if getattr(check, 'optional', False):
        continue
      raise UserError(f'the config has no field {prefix}{field}')
    problem = check(section[field])
    if problem:
      _fail(f'{prefix}{field}', section[field], problem)


def _get(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    if part not in node:
      raise UserError(f'the config has no section {dotted} (is it the right --config?)')
    node = node[part]
  return node


def validate(config, sections) -> None:
  """Checks the config's top-level fields and `sections` (names as in `SECTIONS`, or `task`,
  `rater`, `features.task`, checked against their registered schema)."""
  known = set(SECTIONS) | {'task', 'rater'}
  for key in config.keys():
    if key not in SECTIONS[''] and key not in known:
      raise UserError(f'unknown config field {key} (top-level fields: '
                      f'{", ".join(sorted(SECTIONS[""]))}; sections: '
                      f'{", ".join(sorted(known - {""}))})')
  top = {k: config[k] for k in config.keys() if k in SECTIONS['']}
  required = RATER_RUN_FIELDS if 'outer' in sections else ('seed',)
  check_section('', top, {k: v for k, v in SECTIONS[''].items() if k in top or k in required})
  for name in sections:
    section = _get(config, name)
    if name in MODEL_SECTIONS:
      check_model(name, section)
    elif name in ('policy', 'outer'):
      declared = {'policy': 'datarater.policies.base.policy_schema',
                  'outer': 'outer_loop.estimators.outer_schema'}[name]
      check_section(name, section, {**SECTIONS[name], **_choices(declared)()})
    else:
      check_section(name, section, SECTIONS[name])
  if 'final_eval' in sections:  # the report's fresh models take seeds seed * n + m, m < n
    n = config.final_eval.num_models
    if config.seed * n + n - 1 > MAX_SEED:
      raise UserError(f'seed={config.seed} is too large for final_eval.num_models={n}: the '
                      f'fresh models take seeds up to seed * {n} + {n - 1}, at most {MAX_SEED}')


def check_model(name: str, section) -> None:
  """A task or rater section (`name` in MODEL_SECTIONS) against its model's registered schema."""
  from datarater.tasks import registry  # pylint: disable=g-import-not-at-top
  kind = MODEL_SECTIONS[name]
  registered = registry.TASKS if kind == 'task' else registry.RATERS
  if section.get('name') not in registered:
    raise UserError(f'{name}.name must be a registered {kind} ({", ".join(sorted(registered))}; '
                    f'one of your own is known where its module is imported), got '
                    f'{section.get("name")!r}')
  schema = {'name': string(), **registry.schema_of(kind, section.name)}
  if kind == 'rater':
    schema['temperature'] = number(MIN_TEMPERATURE)
  others = {f for (k, _), fields in registry.SCHEMAS.items() if k == kind for f in fields}
  switched = [f for f in section.keys() if f not in schema and f in others]
  missing = [f for f, check in schema.items()
             if f not in section and not getattr(check, 'optional', False)]
  if switched or missing:  # e.g. --config.rater.name set to a rater that reads other fields
    problem = (f'unknown config field {name}.{switched[0]}' if switched else
               f'the config has no field {name}.{missing[0]}')
    raise UserError(f'{problem}: {kind} {section.name!r} reads {", ".join(sorted(schema))}; '
                    f'a config file sets its {name} section to those (c.{name} = '
                    "ml_collections.ConfigDict({...}), as the README's own-model example does): "
                    f'--config.{name}.name cannot switch to a {kind} that reads other fields')
  check_section(name, section, schema)
