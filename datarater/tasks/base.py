"""The two interfaces everything else is written against: a `Task` and a `Rater`.

A batch is a dict of arrays with a leading batch axis [B, ...], holding the features the dataset
provides (see `datarater.data.pipeline`) plus `index`, each example's position in the split being
read (its TFDS id for a split read whole, not for a `Split.subset`). Only a task or rater knows
what its features mean; the bi-level step, the trainer, the per-example gradient layer, the
valuations, selection and curation see these methods and nothing else.

- `Task.init(key) -> params`, `Task.per_example_loss(params, batch) -> [B]`,
  `Task.metrics(params, batch) -> {name: [B]}` (per-example; callers average), `Task.spec`.
  Optional capabilities raise `UserError` unless a task has them: `embed` (a representation,
  for selection features), and for classifiers `labels` and `with_labels` (class-conditional
  selection, the Gauss-Newton curvature of data value embedding); a classifier's field
  `num_classes` is read with `num_classes(task)`, None for other tasks.
- `Rater.init(key) -> phi`, `Rater.score(phi, batch) -> [B]`, `Rater.spec`.

The contract of both: `init` returns only what is trained (the inner optimizer, the meta-gradient
and per-example gradients take every leaf as a parameter; no flax collection such as
`batch_stats` is ever updated, so `make_task` / `make_rater` refuse any beside `params`), and a
loss or score is a deterministic function of (params, batch) in which each row reads its own
example alone: no PRNG key and no mutable state are passed (batch norm: use `nn.GroupNorm` or
`nn.LayerNorm`; dropout: a key per example from `batch['index']`, one fixed mask per example).
"""
import abc
import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np

from datarater.errors import UserError

Batch = Mapping[str, jax.Array]
Params = Any
FeatureSpec = Mapping[str, jax.ShapeDtypeStruct]  # the features of ONE example (no batch axis)
PerExampleLoss = Callable[[Params, Batch], jax.Array]  # (params, batch) -> [B]


def at_least_float32(x):
  """Floats of `x` (a jax or numpy array) in float32, or wider if they are (other dtypes as they
  are): the library sums, softmaxes, ranks and writes a low-precision model's (bfloat16,
  float16) losses and scores in float32."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def example_batch(spec: FeatureSpec, size: int = 1) -> dict:
  """Zeros shaped like `size` examples of `spec` (for `init` and shape checks)."""
  return {k: jnp.zeros((size, *s.shape), s.dtype) for k, s in spec.items()}


@functools.partial(jax.jit, static_argnums=0)
def init_module(module, key: jax.Array, x: jax.Array) -> Params:
  """`module.init(key, x)` as one compiled program (a module is a static argument, so each module
  and input shape compiles once; an eager init compiles every layer's operations one by one).
  The module must be hashable: its fields tuples, not lists (`nn.Sequential((a, b))`)."""
  return module.init(key, x)


def features_read(fn: Callable[[Params, Batch], jax.Array], params: Params,
                  spec: FeatureSpec) -> tuple:
  """The features of `spec` that `fn(params, batch)` reads: those without which it fails
  (traced by `jax.eval_shape`, not run); `params` may be shapes (`jax.eval_shape` of an init).
  The traced batch also holds `index`, as the trainer's batches do (e.g. for dropout keys)."""
  example = {**example_batch(spec), 'index': jnp.zeros((1,), jnp.int32)}
  out = []
  for name in spec:
    rest = {k: v for k, v in example.items() if k != name}
    try:
      jax.eval_shape(fn, params, rest)
    except Exception:  # pylint: disable=broad-except  (missing, or its shape was needed)
      out.append(name)
  return tuple(out)


def model_reads(model: 'Task | Rater', spec: FeatureSpec) -> tuple:
  """The features of `spec` a task's loss or a rater's score reads."""
  fn = model.score if isinstance(model, Rater) else model.per_example_loss
  return features_read(fn, jax.eval_shape(model.init, jax.random.key(0)), spec)


def check_per_example(model: 'Task | Rater', params: Params, batch: Batch) -> None:
  """UserError unless every example's loss (a rater's score) in `batch` is its loss alone:
  per-example gradients (the valuations) read one example at a time, and raters score a split
  in blocks of any size, so a loss or score that depends on the example's batch-mates (batch
  norm in training mode) or its place in the batch (dropout with one key for the batch) would
  give every valuation another model's gradients, and a filter's choice would follow its
  batch size. Compared: the values and their derivatives along a random direction of the
  parameters (one JVP), so a loss whose values alone agree at `params` is still caught."""
  rater = isinstance(model, Rater)
  fn = model.score if rater else model.per_example_loss
  # Values and their derivatives along a random direction: at a degenerate point such as a
  # zero-initialised last layer the values can be the same alone and in a batch while the
  # gradients (what is trained and valued) still read the batch-mates.
  def random_direction(params):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), max(1, len(leaves)))
    return jax.tree.unflatten(treedef, [
        jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else
        np.zeros(jnp.shape(x), jax.dtypes.float0) for k, x in zip(keys, leaves)])

  def rows(params, batch):  # one program (a compilation cache holds it), not op by op
    tangent = random_direction(params)
    def one(example):
      return jax.jvp(lambda p: fn(p, jax.tree.map(lambda x: x[None], example))[0], (params,),
                     (tangent,))
    return jax.jvp(lambda p: fn(p, batch), (params,), (tangent,)), jax.vmap(one)(batch)
  with jax.default_matmul_precision('highest'):  # (not TF32: batch sizes would round apart)
    (together, d_together), (alone, d_alone) = jax.jit(rows)(params, batch)
  # A loss or parameters below float32 round apart alone and in a batch where the matmul
  # kernels differ by shape (a GPU's), by ulps of the terms summed (the logits of a loss): 4 of
  # their ulps (float16 4e-3, bfloat16 3e-2) of the largest value and derivative are allowed,
  # as float32's 1e-4 allows hundreds of its own.
  eps = max([float(jnp.finfo(x.dtype).eps) for x in (together, *jax.tree.leaves(params))
             if jnp.issubdtype(x.dtype, jnp.floating)], default=0.0)
  narrow = 4 * eps if eps > float(jnp.finfo(jnp.float32).eps) else 0.0
  together, alone, d_together, d_alone = (at_least_float32(np.asarray(x))
                                          for x in (together, alone, d_together, d_alone))
  top = lambda x: float(np.abs(np.where(np.isfinite(x), x, 0)).max()) if x.size else 0.0
  if not (np.allclose(together, alone, rtol=max(1e-4, narrow), atol=narrow * top(alone) + 1e-6)
          and np.allclose(d_together, d_alone, rtol=max(1e-3, narrow),
                          atol=max(1e-4, narrow) * top(d_alone) + 1e-6)):
    nan = [np.isnan(np.asarray(x)) for x in (together, alone, d_together, d_alone)]
    if any(x.any() for x in nan):  # NaN != NaN: not a sign of batch-mates read
      nan_rows = int(np.sum(nan[0] | nan[1] | nan[2] | nan[3]))
      raise UserError(f'{"rater" if rater else "task"} {type(model).__name__}: its '
                      f'{"score" if rater else "per_example_loss"} or its derivative is NaN on '
                      f'{nan_rows} of {len(nan[0])} examples at its initial parameters: data it '
                      "cannot read, such as tokens outside an embedding's vocabulary (flax's "
                      'nn.Embed reads NaN for them)? Its check_data can refuse such data in one '
                      'line')
    raise UserError(f'{"rater" if rater else "task"} {type(model).__name__}: an example\'s '
                    f'{"score" if rater else "loss"} depends on the rest of its batch or its place '
                    'in it (batch norm in training mode? dropout with one key for the batch?): '
                    f'{"score" if rater else "per_example_loss"} must read each example alone '
                    "(nn.GroupNorm or nn.LayerNorm for batch norm; a dropout key per example from "
                    "batch['index'])")


def check_initial_loss(task: 'Task', params: Params, batches: Mapping[str, Batch],
                       models: Sequence[str] = (), per_model: bool = False) -> None:
  """UserError unless `task`'s loss is finite on every example of `batches` ({its examples, in
  words: batch}) at `params`, its initial parameters: a loss not finite before any update (a
  model with fewer classes than the labels indexes its logits out of range; tokens outside an
  embedding's vocabulary) makes every update and meta-gradient non-finite. With `models` (each
  model's name in words), `params` stacks one model per name on its leaves' leading axis, and
  every model reads each batch whole, or, `per_model`, its own row of each batch's leading axis.
  One forward pass (one compiled program), before a launcher compiles its training step, placed
  as `params` and `batches` are (launchers place them on this process's devices as their run
  does: no device holds more than in the run)."""
  def losses_of(p, bs):
    return {k: at_least_float32(task.per_example_loss(p, b)) for k, b in bs.items()}
  if models:
    losses_of = jax.vmap(losses_of, in_axes=(0, 0 if per_model else None))
  losses = {k: np.asarray(v) for k, v in jax.jit(losses_of)(params, batches).items()}
  for m, model in enumerate(models or ['']):
    for where, loss in losses.items():
      bad = int(np.sum(~np.isfinite(loss[m] if models else loss)))
      if bad:
        raise UserError(f'task {type(task).__name__}: its per_example_loss is not finite on '
                        f'{bad} of {where} at its initial parameters'
                        f'{f" ({model})" if models else ""}, before any update: the model '
                        'cannot read the data (labels beyond the classes of its output? tokens '
                        "outside an embedding's vocabulary? its check_data can refuse such data "
                        'in one line)')


def _collections(params: Params) -> list:
  """The flax collections besides 'params' in what an init returned (flax's `init` returns every
  collection its module made, e.g. {'params': ..., 'batch_stats': ...})."""
  if isinstance(params, Mapping) and 'params' in params:
    return sorted(str(k) for k in params if k != 'params')
  return []


# flax's errors for a module applied without the PRNG key or the collections besides `params` it
# needs (dropout, batch norm): the interface passes neither.
_STATE_ERRORS = (flax.errors.InvalidRngError, flax.errors.ModifyScopeVariableError,
                 flax.errors.ScopeCollectionNotFound)


CHECK_BATCH = 3  # examples in the batch `check_outputs` traces


def _trace(model: 'Task | Rater', method: str, params: Params = None):
  """`model.method` traced by `jax.eval_shape`: of (`params`, or its init's shapes, and a batch
  of `CHECK_BATCH` examples of its spec and `index`), or of a key for `init`."""
  if method == 'init' or params is None:
    params = jax.eval_shape(model.init, jax.random.key(0))
  if method == 'init':
    return params
  b = CHECK_BATCH
  batch = {'index': jax.ShapeDtypeStruct((b,), jnp.int32),
           **{k: jax.ShapeDtypeStruct((b, *s.shape), s.dtype) for k, s in model.spec.items()}}
  return jax.eval_shape(getattr(model, method), params, batch)


def _missing_feature(model: 'Task | Rater', method: str, error: KeyError) -> Optional[str]:
  """The feature `model.method` looks up and its spec lacks, if that is what raised `error`:
  the KeyError of that name goes away once the spec holds it; else None."""
  key = error.args[0] if len(error.args) == 1 else None
  if not isinstance(key, str) or key in model.spec or key == 'index':
    return None
  try:
    more = dataclasses.replace(model, spec={**model.spec,
                                            key: jax.ShapeDtypeStruct((), jnp.float32)})
  except Exception:  # pylint: disable=broad-except  (not a dataclass with a `spec` field)
    return None
  try:
    _trace(more, method)
  except KeyError as e:
    return None if e.args[:1] == (key,) else key
  except Exception:  # pylint: disable=broad-except  (read, then failed on its dummy shape)
    return key
  return key


def check_outputs(model: 'Task | Rater', info=None) -> None:
  """UserError unless a task's `per_example_loss` gives one loss per example ([B]), its
  `metrics` a dict of [B] arrays holding `loss` and its `embed`, if it defines one, a vector per
  example ([B, D], what `features.extract` takes), or a rater's `score` one score per example,
  losses and scores floats (an integer one has zero gradient: nothing would be trained).
  Traced by `jax.eval_shape` on a batch of `CHECK_BATCH` examples, not run: a loss of shape
  [] or [B, 1] would otherwise train (weights times losses broadcast) and learn nothing, and a
  wrong `embed` fail only once selection's feature model has trained. Also
  refused: an `init` returning flax collections besides `params` (`batch_stats` would be trained
  as parameters), a method that needs a PRNG key or a mutable collection (flax's errors), and one
  that reads a feature the data (`info`, a `pipeline.DataInfo`, if given) does not have."""
  b, name = CHECK_BATCH, type(model).__name__

  def traced(method, params=None, optional=False):  # optional: None if it raises a UserError
    try:  # (as a capability the task lacks does, e.g. Task.embed)
      return _trace(model, method, params)
    except UserError:
      if optional:
        return None
      raise
    except _STATE_ERRORS as e:
      first = str(e).splitlines()[0].split(' (https')[0]
      raise UserError(f'{name}.{method} asks flax for what the interface does not pass '
                      f'({type(e).__name__}: {first}): no PRNG key is passed and no collection '
                      "but 'params' is kept, so it must be a function of (params, batch) alone "
                      '(batch norm: nn.GroupNorm or nn.LayerNorm; dropout: a key per example from '
                      "batch['index'])") from None
    except KeyError as e:
      key = _missing_feature(model, method, e)
      if key is None:
        raise
      data = f'dataset {info.name!r}' if info is not None else 'the data'
      why = info.why_not(key) if info is not None else ''
      raise UserError(f'{name}.{method} reads feature {key!r}, which {data} does not have '
                      f'(features, decoded: {", ".join(sorted(model.spec))}; and index){why}: '
                      'is a feature name in the config misspelt?') from None
  params = traced('init')
  extra = _collections(params)
  if extra:
    what = 'score' if isinstance(model, Rater) else 'per_example_loss'
    raise UserError(f'{name}.init returned flax collections {extra} beside \'params\': all it '
                    'returns is trained as parameters and no collection is ever updated (batch '
                    "norm: nn.GroupNorm or nn.LayerNorm); return {'params': variables['params']} "
                    f'and make {what} a function of (params, batch) alone')

  def shape(x):
    return tuple(x.shape) if hasattr(x, 'shape') else type(x).__name__
  for method in ('score',) if isinstance(model, Rater) else ('per_example_loss',):
    out = traced(method, params)
    if shape(out) != (b,):
      raise UserError(f'{name}.{method} must return one value per example, shape (B,): on a '
                      f'batch of {b} it returned shape {shape(out)}')
    if not jnp.issubdtype(out.dtype, jnp.floating):  # an integer loss has zero gradients
      raise UserError(f'{name}.{method} must return floats: it is differentiated, and its '
                      f'{out.dtype} values have zero gradient (nothing would be trained)')
  if isinstance(model, Task):
    metrics = traced('metrics', params)
    if not isinstance(metrics, Mapping) or 'loss' not in metrics:
      got = sorted(metrics) if isinstance(metrics, Mapping) else type(metrics).__name__
      raise UserError(f'{name}.metrics must return a dict {{name: [B]}} holding the per-example '
                      f"'loss'; it returned {got}")
    bad = {k: shape(v) for k, v in metrics.items() if shape(v) != (b,)}
    if bad:
      raise UserError(f'{name}.metrics must return one value per example for each name, shape '
                      f'(B,): on a batch of {b} it returned {bad}')
    # Features for selection, if it has them: [B, D] of any dtype (features.extract casts them
    # to float32 and refuses other shapes).
    out = traced('embed', params, optional=True)
    got = shape(out)
    if out is not None and not (isinstance(got, tuple) and len(got) == 2 and got[0] == b):
      raise UserError(f'{name}.embed must return one vector per example, shape (B, D): on a '
                      f'batch of {b} it returned shape {got}')


def batch_size_of(batch: Batch) -> int:
  return jax.tree.leaves(batch)[0].shape[0]


class Task(abc.ABC):
  """A model and the data it reads. Subclasses are frozen dataclasses (immutable; not hashable,
  as `spec` is a dict, so a task is closed over by a jitted function, not a static argument) with
  a field `spec`; classifiers also a field `num_classes` (read with `num_classes(task)`: None for
  other tasks). No field here has a default, which would be inherited by a subclass's field of
  that name and make every field after it need one too."""
  spec: FeatureSpec

  @abc.abstractmethod
  def init(self, key: jax.Array) -> Params:
    """Fresh parameters."""

  @abc.abstractmethod
  def per_example_loss(self, params: Params, batch: Batch) -> jax.Array:
    """The loss of every example, [B]; training minimises a weighted mean of it."""

  def metrics(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
    """Per-example evaluation metrics {name: [B]}; `loss` is always one of them."""
    return {'loss': self.per_example_loss(params, batch)}

  def embed(self, params: Params, batch: Batch) -> jax.Array:
    """A representation of every example, [B, D] (selection's feature space)."""
    raise UserError(f'task {type(self).__name__} has no representation (embed) for features')

  def labels(self, batch: Batch) -> jax.Array:
    """Every example's class, int32 [B] (classifiers only)."""
    raise UserError(f'task {type(self).__name__} has no class labels')

  def with_labels(self, batch: Batch, labels: jax.Array) -> dict:
    """The batch with its classes replaced by `labels` (classifiers only)."""
    raise UserError(f'task {type(self).__name__} has no class labels')

  def check_data(self, features: Batch) -> None:
    """Raises a UserError if host `features` (a split's, [N, ...]) cannot be this task's input,
    e.g. tokens outside its vocabulary; runs check their in-memory splits with it."""


def num_classes(task: Task) -> Optional[int]:
  """The classes of a classifier task, None for any other."""
  return getattr(task, 'num_classes', None)


def require_labels(task: Task, what: str, otherwise: str) -> None:
  """UserError unless `task` defines `labels` and `with_labels`, which `what` (a setting) needs;
  `otherwise` says what to set instead."""
  if type(task).labels is Task.labels or type(task).with_labels is Task.with_labels:
    raise UserError(f'{what} needs class labels: task {type(task).__name__} defines no '
                    f'labels(batch) / with_labels(batch, labels); define them, or {otherwise}')


class Rater(abc.ABC):
  """g_phi: one score per example (higher = worth more training). Frozen dataclasses."""
  spec: FeatureSpec

  @abc.abstractmethod
  def init(self, key: jax.Array) -> Params:
    """Fresh parameters phi."""

  @abc.abstractmethod
  def score(self, params: Params, batch: Batch) -> jax.Array:
    """Scores [B]."""

  def check_data(self, features: Batch) -> None:
    """As `Task.check_data`, for the rater's input."""
