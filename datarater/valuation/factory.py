"""From a config (its `valuation` section) to a fitted valuation of a task on a split.

Shared by `datarater.valuation.run` (launch.valuate), the policies and the benchmarks, so all
value the same thing. Each fitted valuation carries `example_gradients`, what making it cost.
"""
from typing import Optional

from absl import logging as absl_logging
import jax
import ml_collections
import numpy as np

from datarater import pergrad, tasks
from datarater.data import corruption
from datarater.errors import UserError
from datarater.trainer import initial_params
from datarater.valuation.base import Valuation, record_run
from datarater.valuation.dvemb import DataValueEmbedding
from datarater.valuation.mimic import Mimic, resolve_layers
from datarater.valuation.rater import RaterValuation
from datarater.valuation.tracin import TracIn

METHODS = ('tracin', 'mimic', 'dvemb', 'datarater')
PROJECTIONS = ('none', 'kronecker', 'gaussian')
# The valuation fields that some methods alone read, and those methods: launch.valuate refuses a
# command-line override of one that its --method does not read (the scores would not change).
READ_BY = {'tracin_mode': ('tracin',), 'tracin_project': ('tracin',), 'tracin_ghost': ('tracin',),
           'mimic_layers': ('mimic',), 'mimic_cosine': ('mimic',),
           'mimic_keep_fraction': ('mimic',), 'reference_steps': ('mimic',),
           'dvemb_curvature': ('dvemb',), 'dvemb_steps': ('dvemb',), 'rater': ('datarater',),
           # Mimic projects nothing and reads mimic_layers (dvemb refuses layers itself).
           **{f: ('tracin', 'dvemb') for f in ('layers', 'projection', 'projection_dim')},
           # The gradient store's projection (the rater scores without a store).
           **{f: ('tracin', 'mimic', 'dvemb') for f in ('projection_seed', 'store_k')}}
# The recorded training run's fields (`record_for`), read by every method in METHODS but these,
# so a new method that values a recorded run reads them without being listed (dvemb's run is
# dvemb_steps long, a checkpoint per step; the rater records none).
UNREAD_BY = {'train_steps': ('dvemb', 'datarater'), 'checkpoint_every': ('dvemb', 'datarater'),
             **{f: ('datarater',) for f in (
                 'batch_size', 'optimizer', 'learning_rate', 'seed', 'chunk_size')}}
# DVEmb keeps a k x k curvature and decomposes it every step: above this k it warns before the fit.
DVEMB_WARN_DIM = 4096


def parse_layers(spec: str, field: str = 'valuation.layers'):
  """'' -> None (all parameters); 'last' stays 'last'; 'a,b' -> ['a', 'b']; commas alone (no
  name) are refused, naming config field `field`."""
  if not spec.strip():
    return None
  if spec.strip() == 'last':
    return 'last'
  layers = [s.strip() for s in spec.split(',') if s.strip()]
  if not layers:
    raise UserError(f'{field}={spec!r} names no layer')
  return layers


def make_projection(v: ml_collections.ConfigDict) -> Optional[pergrad.GradTransform]:
  if v.projection == 'none':
    return None
  if v.projection == 'kronecker':
    return pergrad.kronecker_projection(v.projection_dim, v.projection_dim, v.projection_seed)
  if v.projection == 'gaussian':
    return pergrad.gaussian_projection(v.projection_dim, v.projection_seed)
  raise UserError(f'unknown valuation.projection {v.projection!r} '
                  f'(choose from {", ".join(PROJECTIONS)})')


def record(config, task, split, steps: int, every: int, cache=None, name: str = 'run'):
  """The config's recorded run of `task` on `split` (`valuation.optimizer`; dvemb refuses all
  but sgd): (TrainingRun, example-gradients).

  With `cache` (e.g. `valuation.run.RunCache`), a run made before is read back instead."""
  v = config.valuation
  make = lambda: record_run(task, split, steps=steps, batch_size=v.batch_size,
                            learning_rate=v.learning_rate, checkpoint_every=every,
                            optimizer=v.optimizer, seed=v.seed)
  return make() if cache is None else cache.get(name, make)


def run_length(method: str, v: ml_collections.ConfigDict) -> tuple[int, int]:
  """(steps, checkpoint_every) of the training run gradient `method` values from: the data value
  embedding's is `dvemb_steps` long with a checkpoint at every step, the others' `train_steps`
  long with one every `checkpoint_every`."""
  return (v.dvemb_steps, 1) if method == 'dvemb' else (v.train_steps, v.checkpoint_every)


def record_for(method: str, config, task, split, cache=None):
  """`record` of the run gradient `method` values from (`run_length`), cached under its name."""
  steps, every = run_length(method, config.valuation)
  return record(config, task, split, steps, every, cache,
                'dvemb_run' if method == 'dvemb' else 'run')


def check_per_example(config, task, split) -> None:
  """Refuses a loss that reads other examples of its batch (`tasks.check_per_example`, on the
  valuation seed's recorded run's initial parameters and the first examples of `split`)."""
  start = initial_params(task, [config.valuation.seed], 'valuation')
  tasks.check_per_example(task, jax.tree.map(lambda x: x[0], start),
                          split.take(np.arange(min(4, len(split)))))


def mimic_reference(config, task, heldout, cache=None):
  """Grad-Mimic's reference model: trained on the trusted split. (params, example-gradients)."""
  steps = config.valuation.reference_steps
  run, cost = record(config, task, heldout, steps, steps, cache, 'reference')
  return run.final_params, cost


def mimic_layers(config, task, params, split):
  return resolve_layers(task.per_example_loss, params, split.take([0, 1]),
                        parse_layers(config.valuation.mimic_layers, 'valuation.mimic_layers'))


def check_mimic_layers(config, task, split):
  """`valuation.mimic_layers` resolved on the task's parameter shapes (nothing trained): a name
  that holds no parameter is refused in one line; returns the layers (None: all)."""
  params = jax.eval_shape(task.init, jax.random.PRNGKey(0))
  layers = mimic_layers(config, task, params, split)
  if layers is not None:
    pergrad.layer_mask(params, layers)
  return layers


def rater_for(config, train):
  """The rater of `valuation.rater`, checked against the training data."""
  from datarater.export import load_rater  # pylint: disable=g-import-not-at-top
  if not config.valuation.rater:
    raise UserError('method datarater needs valuation.rater (an exported rater or a '
                    'launch.train_rater workdir)')
  loaded = load_rater(config.valuation.rater)
  loaded.check_matches(train.info, 'the training data', corruption.from_config(config.data))
  return loaded


def check_fields(method: str, overridden) -> None:
  """UserError if a `valuation` field among `overridden` (dotted paths set on the command line)
  is one `method` does not read (`reads`)."""
  for path in overridden:
    section, _, field = path.partition('.')
    if section == 'valuation' and not reads(method, field):
      raise UserError(f'--config.{path} is not read by method {method} (it is read by '
                      f'{", ".join(m for m in METHODS if reads(m, field))} alone)')


def reads(method: str, field: str) -> bool:
  """Whether `method` reads `valuation.<field>` (`READ_BY`, `UNREAD_BY`; else every method)."""
  if field in READ_BY:
    return method in READ_BY[field]
  return method not in UNREAD_BY.get(field, ())


def check(method: str, config, task, train) -> None:
  """What `build` would refuse, found without fitting (layer names, run lengths)."""
  v = config.valuation
  if method not in METHODS:
    raise UserError(f'unknown method {method!r} (choose from {", ".join(METHODS)})')
  if (v.store or v.topk) and method not in ('tracin', 'mimic', 'dvemb'):
    raise UserError('valuation.store and valuation.topk work with tracin, mimic and dvemb, not '
                    f'{method!r}')
  if v.topk and method != 'tracin':
    raise UserError('valuation.topk attributes with TracIn: use --method=tracin')
  if method == 'datarater':
    rater_for(config, train)
    return
  check_settings(method, config, task)
  check_per_example(config, task, train)  # before the workdir is made
  params = jax.eval_shape(task.init, jax.random.PRNGKey(0))
  if parse_layers(v.layers) is not None:
    pergrad.layer_mask(params, parse_layers(v.layers))
  layers = parse_layers(v.layers) if method == 'tracin' else None  # dvemb: every parameter
  if method == 'dvemb':
    warn_dvemb_dim(v, params)
  if method == 'mimic':
    layers = check_mimic_layers(config, task, train)
  if v.store or v.topk:  # layers the store's projection cannot follow fail now, not after a fit
    pergrad.factored_projection(1, 1, layers=layers).init(task.per_example_loss, params,
                                                          train.take([0, 1]))


def check_settings(method: str, config, task) -> None:
  """The settings a gradient `method` cannot compute its definition with, refused by `check`
  and again by `build` (which benchmarks call directly)."""
  v = config.valuation
  if method == 'dvemb':
    if v.optimizer != 'sgd':  # its recursion is the SGD step's
      raise UserError(f"method dvemb needs valuation.optimizer='sgd', got {v.optimizer!r}")
    if v.dvemb_curvature == 'gauss_newton' and not tasks.num_classes(task):
      raise UserError("valuation.dvemb_curvature='gauss_newton' needs a classification task: "
                      f'task {type(task).__name__} has no classes; set '
                      '--config.valuation.dvemb_curvature to exact (a small model, with '
                      'valuation.projection=none) or empirical_fisher')
    if v.dvemb_curvature == 'gauss_newton':  # before any fit
      tasks.require_labels(task, "valuation.dvemb_curvature='gauss_newton'",
                           "set --config.valuation.dvemb_curvature=empirical_fisher")
    if v.dvemb_curvature == 'exact' and v.projection != 'none':
      raise UserError("valuation.dvemb_curvature='exact' works on unprojected gradients: set "
                      f"valuation.projection='none' (got {v.projection!r})")
  # Every gradient method but dvemb (a checkpoint per step) records train_steps with a checkpoint
  # every checkpoint_every (`run_length`): a new method too, refused here before a workdir is made.
  if method not in ('dvemb', 'datarater') and v.train_steps % v.checkpoint_every:
    raise UserError(f'valuation.checkpoint_every={v.checkpoint_every} must be >= 1 and divide '
                    f'valuation.train_steps={v.train_steps}')
  if method == 'tracin' and v.tracin_project and v.tracin_mode != 'self':  # it would be ignored
    raise UserError("valuation.tracin_project projects tracin_mode='self' alone (the held-out "
                    f'modes take exact products), got tracin_mode={v.tracin_mode!r}')
  if method == 'dvemb' and parse_layers(v.layers) is not None:  # it would be ignored
    raise UserError(f'valuation.layers={v.layers!r} chooses TracIn layers; the data value '
                    "embedding values every parameter (set valuation.layers='')")


def projected_dim(v: ml_collections.ConfigDict, params) -> tuple[int, list[str]]:
  """(k, the leaves the projection keeps whole that are larger than projection_dim**2): k is the
  length of an example's gradient under the projection of `v`, traced (`jax.eval_shape`) from
  the projection itself."""
  projection = make_projection(v)
  if projection is None:
    return sum(x.size for x in jax.tree.leaves(params)), []
  k = jax.eval_shape(lambda p: projection.apply(p, projection.init(p)), params).shape[0]
  if v.projection != 'kronecker':
    return k, []
  factors = jax.eval_shape(projection.init, params)  # None: a leaf kept whole
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  whole = [(x.size, jax.tree_util.keystr(path)) for (path, x), f in zip(flat, factors)
           if f is None and x.size > v.projection_dim ** 2]
  return k, [f'{name} ({size})' for size, name in sorted(whole, reverse=True)]


def warn_dvemb_dim(v: ml_collections.ConfigDict, params) -> None:
  """A warning line when DVEmb's k x k curvature is large (memory, and an eigendecomposition
  of it at every recorded step): what makes k large and how to bound it."""
  k, whole = projected_dim(v, params)
  if k <= DVEMB_WARN_DIM or jax.process_index() > 0:  # (one line a job)
    return
  why = (f"; the Kronecker projection keeps leaves with one axis whole: {', '.join(whole[:3])}"
         if whole else '')
  absl_logging.warning(
      'method dvemb: %d projected gradient entries per example (a %.1f GiB k x k curvature, '
      "decomposed at each of valuation.dvemb_steps=%d steps)%s; valuation.projection='gaussian' "
      'bounds k by valuation.projection_dim', k, k * k * 4 / 2**30, v.dvemb_steps, why)


def warn_dvemb_unvalued(v: ml_collections.ConfigDict, num_examples: int) -> int:
  """Examples the data value embedding's run draws in none of its `valuation.dvemb_steps` steps
  (each epoch draws every example once, in ceil(N / batch_size) steps): their removal changes
  nothing in that run, so they score 0. Said in a warning line when there are any; returned."""
  drawn = min(num_examples, v.dvemb_steps * v.batch_size)
  unvalued = num_examples - drawn
  if unvalued and jax.process_index() == 0:  # (one line a job)
    absl_logging.warning(
        'method dvemb: its valuation.dvemb_steps=%d-step run (batch %d) draws %d of the %d '
        'training examples; the other %d are in no step and score 0 (valuation.dvemb_steps >= %d '
        'draws every one)', v.dvemb_steps, v.batch_size, drawn, num_examples, unvalued,
        -(-num_examples // v.batch_size))
  return unvalued


def ghost_norms_pay(task, run, train, layers) -> bool:
  """Whether a cosine's per-example gradient norms over `layers` come from ghost norms: exact
  where Dense layers hold those parameters (`pergrad.ghost_covers`), and taken where each Dense
  layer sees one position per example (MLPs). Over positions (patches, tokens) they are no faster
  than forming the gradients (`bench/results/valuation_scale.md`), which those keep doing."""
  loss, batch = task.per_example_loss, train.take([0, 1])
  return (pergrad.ghost_covers(loss, run.final_params, batch, layers) and
          pergrad.dense_positions(loss, run.final_params, batch, layers) == 1)


def build(method: str, config, task, train, heldout, cache=None, fit: bool = True,
          checked: bool = False) -> Valuation:
  """The valuation `method`, fitted to the config's training run of `task` on `train` (runs
  read from `cache` when it has them). `fit=False` leaves the data value embedding unfitted (its
  name, orientation and cost only: a gradient store computes the embeddings itself).
  `checked=True`: `check` passed for this method, config and task (its per-example probe, which
  compiles the loss twice, is not run again)."""
  if method not in METHODS:
    raise UserError(f'unknown method {method!r} (choose from {", ".join(METHODS)})')
  v = config.valuation
  if method == 'datarater':
    loaded = rater_for(config, train)
    valuation = RaterValuation(loaded.rater, loaded.params)
    valuation.example_gradients = loaded.training_example_gradients
    return valuation
  check_settings(method, config, task)
  layers, chunk = parse_layers(v.layers), v.chunk_size
  heldout_batch = heldout.take(range(len(heldout)))
  if not checked:
    check_per_example(config, task, heldout)
  if method == 'dvemb':
    warn_dvemb_unvalued(v, len(train))  # before the run is recorded
    run, cost = record_for(method, config, task, train, cache)
    valuation = DataValueEmbedding(task, len(train), heldout_batch, make_projection(v),
                                   v.dvemb_curvature, chunk_size=chunk)
    if fit:
      valuation = valuation.fit(run)
    # The run, then per-example gradients at every step (once per class for Gauss-Newton).
    per_step = tasks.num_classes(task) if v.dvemb_curvature == 'gauss_newton' else 0
    valuation.example_gradients = cost * (2 + per_step)
    return valuation
  run, cost = record_for(method, config, task, train, cache)
  if method == 'tracin':
    # Ghost norms where Dense layers hold the parameters read: self-influence (unprojected) and
    # heldout_cos's norms (its dots are JVPs; 'heldout' forms no gradient).
    ghost = v.tracin_ghost and (
        (v.tracin_mode == 'self' and not v.tracin_project and
         pergrad.ghost_covers(task.per_example_loss, run.final_params, train.take([0, 1]),
                              layers)) or
        (v.tracin_mode == 'heldout_cos' and ghost_norms_pay(task, run, train, layers)))
    valuation = TracIn(task.per_example_loss, v.tracin_mode, heldout_batch, layers,
                       make_projection(v) if v.tracin_project else None, chunk,
                       ghost=ghost).fit(run)
    valuation.example_gradients = cost + len(train) * run.num_checkpoints
    return valuation
  if method == 'mimic':
    reference, ref_cost = mimic_reference(config, task, heldout, cache)
    layers = mimic_layers(config, task, run.final_params, train)
    ghost = v.mimic_cosine and ghost_norms_pay(task, run, train, layers)
    valuation = Mimic(task.per_example_loss, reference, layers, v.mimic_cosine, chunk,
                      ghost).fit(run)
    # The runs, then one Jacobian-vector product per example at every checkpoint (as TracIn).
    valuation.example_gradients = cost + ref_cost + len(train) * run.num_checkpoints
    return valuation
  # A method listed in METHODS without a branch above: refused, not valued as another method.
  raise NotImplementedError(f'valuation method {method!r} is in METHODS but factory.build does '
                            'not build it')
