"""A trained rater as a self-contained folder, and the one way to load a rater.

`export_rater(workdir, out_dir)` copies the rater of a `launch.train_rater` run's latest
checkpoint (its Polyak average when `outer.ema` > 0, as the run reports) into
`out_dir`: `params/` (orbax, restorable on any device layout) and `rater.json` (the rater's
config, the data it reads (`pipeline.DataInfo`), the softmax temperature, the data it was trained
on and the example-gradients its training cost). `load_rater(path)` loads either such a folder or
a rater run directly, onto whatever devices this process has. Scoring runs in fixed per-device
blocks, so every example's score is computed by the same compiled program whatever the number of
devices: scores are bit-identical on 1 or N. Non-finite parameters are never exported or loaded.
"""
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from datarater import checkpointing, config_checks, evaluation, files, multihost, tasks
from datarater.data import pipeline
from datarater.data.pipeline import DataInfo
from datarater.errors import UserError
from datarater.tasks.base import at_least_float32, features_read
from inner_loop.weighting import softmax_weights
from outer_loop import averaging

FORMAT_VERSION = 2
# What exporting or loading the rater of a run reads of its config.json's config.
RUN_FIELDS = ('rater.name', 'rater.temperature', 'inner.population', 'inner.steps',
              'inner.batch_size', 'outer.batch_size', 'data.name', 'data.train_split',
              'data.label_noise', 'data.noise_seed')
META_FIELDS = ('rater', 'rater.name', 'data_info', 'temperature')  # what load_rater reads
INFO_ERRORS = (AttributeError, KeyError, TypeError, ValueError)  # of a malformed DataInfo


def _first_missing(d, fields) -> Optional[str]:
  """The first dotted field of `fields` that JSON object `d` lacks (as far as it lacks it: the
  section when the whole section is missing), or None."""
  for dotted in fields:
    node, parts = d, dotted.split('.')
    for i, part in enumerate(parts):
      if not isinstance(node, dict) or part not in node:
        return '.'.join(parts[:i + 1])
      node = node[part]
  return None


def _info_problem(d: dict) -> Optional[str]:
  """What is wrong with the values of a saved DataInfo `d` (a hand-edited file): its features'
  shapes must hold sizes >= 1, their dtypes be numbers or bool, and its class counts be >= 1;
  else None."""
  for name, spec in d['spec'].items():
    shape = spec['shape']
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in shape):
      return f'data_info.spec.{name}.shape {shape!r}; it must hold sizes >= 1'
    if np.dtype(spec['dtype']).kind not in 'biuf':  # parsed by DataInfo.from_json before
      return f'data_info.spec.{name}.dtype {spec["dtype"]!r}; it must be a number or bool type'
  for name, count in d['num_classes'].items():
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
      return f'data_info.num_classes.{name} {count!r}; it must be an integer >= 1'
  return None


def rater_training_compute(config, steps: int) -> int:
  """Task-model example-gradients of `steps` outer steps of a rater run (a lower bound on its
  cost).

  Each outer step trains K inner models for A + T steps of B examples (A advanced, T unrolled;
  A = 0 where the config has no `inner.advance_steps`)
  and evaluates their loss on a held-out batch, then back-propagates through the last T; we count
  the forward+backward example passes of the inner models, K * ((A + T) * B + B_outer) per outer
  step. The meta-backward through the unroll roughly doubles the T part again; it is not counted
  here, so the figure is conservative.
  """
  inner_steps = config.inner.get('advance_steps', 0) + config.inner.steps
  return int(steps * config.inner.population *
             (inner_steps * config.inner.batch_size + config.outer.batch_size))


def _check_finite(params, where: str) -> None:
  bad = sum(int(np.sum(~np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(params))
  if bad:
    raise UserError(f'{where} holds {bad} non-finite rater parameters (NaN or inf): refusing it')


def _check_fits(rater: tasks.Rater, params, where: str) -> None:
  expected = jax.eval_shape(rater.init, jax.random.PRNGKey(0))
  if jax.tree.structure(expected) != jax.tree.structure(params) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params))):
    raise UserError(f'{where}: its parameters do not fit the architecture it names')


def _make_rater(section, info, where: str, saved: dict) -> tasks.Rater:
  """The rater of a saved `rater` config section, checked against its schema (a hand-edited
  file fails in one line naming `where`); the module that registered it (`saved['rater_module']`)
  is imported if need be."""
  name, module = section.get('name'), saved.get('rater_module')
  if 'rater_module' in saved and module is None and name not in tasks.RATERS:
    raise UserError(f'{where!r}: rater {name!r} was registered in a script or a --config file, '
                    'which nothing else imports: register it in a module on PYTHONPATH and train '
                    'with that, or register it in the script that loads this rater first')
  tasks.registry.import_module_of(name, module, where)
  try:
    config_checks.check_model('rater', section)
  except UserError as e:
    raise UserError(f'{where!r}: {e}') from None
  return tasks.make_rater(section, info)


def _read_run(workdir: str):
  """(config, DataInfo, rater, its params on the first local device, outer steps taken) of a
  rater run's latest checkpoint."""
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path) and os.path.exists(os.path.join(workdir, 'rater.json')):
    raise UserError(f'--workdir {workdir!r} is already an exported rater (rater.json), not a '
                    'launch.train_rater run: use it as it is (--rater, datarater.load_rater)')
  if not os.path.exists(config_path):
    raise UserError(f'no rater run in {workdir!r}: {config_path!r} is missing '
                    '(make one with launch.train_rater)')
  try:
    with open(config_path) as f:
      saved = json.load(f)
    config = ml_collections.ConfigDict(saved['config'])
    info = DataInfo.from_json(saved['data_info'])
  except INFO_ERRORS as e:
    raise UserError(f'{config_path!r} is not the config of a launch.train_rater run '
                    f'({type(e).__name__}: {e})') from None
  problem = _info_problem(saved['data_info'])
  if problem:
    raise UserError(f'{config_path!r} has {problem}')
  missing = _first_missing(saved['config'], RUN_FIELDS)
  if missing:
    raise UserError(f'{config_path!r} is not the config of a launch.train_rater run (its '
                    f'config has no {missing})')
  rater = _make_rater(config.rater, info, config_path, saved)  # hand-edited: one line
  restored = checkpointing.restore_latest_on_host(os.path.join(os.path.abspath(workdir),
                                                               'checkpoints'))
  if restored is None:
    raise UserError(f'no checkpoint in {workdir!r}: run launch.train_rater there first')
  state, meta = restored
  # The checkpoint records the config that made it (less the fields a run may change, plus
  # `data_stream`, which config.json does not hold).
  recorded, ours = meta.get('config') or {}, checkpointing.trajectory_fields(config, ())
  diffs = checkpointing.config_differences(recorded, ours, [
      k for k in sorted(recorded) if k in ours or k in checkpointing.ADDED_FIELDS])
  if diffs:
    raise UserError(f'{config_path!r} is not the config of its latest checkpoint '
                    f'({"; ".join(diffs[:3])})')
  _check_fits(rater, state['rater_params'], f'the latest checkpoint of {workdir!r}')
  # The rater of the run: its Polyak average when it kept one (outer.ema > 0), as meta_train
  # reports.
  params = averaging.debiased(state.get('rater_average') or None, state['rater_params'],
                              config.outer.get('ema', 0.0), state['step'] - state['skipped'])
  _check_finite(params, f'the latest checkpoint of {workdir!r}')
  return config, info, rater, params, int(state['step'])


def export_rater(workdir: str, out_dir: str, overwrite: bool = False) -> dict:
  """Writes the rater of `workdir` to `out_dir` (temp folder, then rename); returns rater.json."""
  if not workdir:
    raise UserError('--workdir is required')
  if not out_dir:
    raise UserError('--out is required')
  files.check_apart(out_dir, '--out', workdir=workdir)
  checkpointing.check_writable_path(out_dir, '--out')
  files.check_replaceable(out_dir, overwrite, 'rater.json')
  files.check_not_in_dataset(out_dir, '--out')
  config, info, _, params, steps = _read_run(workdir)
  meta = {
      'format_version': FORMAT_VERSION,
      'rater': json.loads(config.rater.to_json()),
      'data_info': info.to_json(),
      'temperature': float(config.rater.temperature),
      'trained_on': {'dataset': pipeline.dataset_name(config.data),
                     'split': config.data.train_split,
                     'label_noise': float(config.data.label_noise),
                     'noise_seed': int(config.data.noise_seed)},
      'outer_steps': steps,
      'training_example_gradients': rater_training_compute(config, steps),
      'config': json.loads(config.to_json()),
      'rater_module': tasks.registry.module_of(config.rater.name),
  }
  with files.atomic_dir(out_dir, overwrite, marker='rater.json') as tmp:
    # A Ctrl-C or SIGTERM (with launch.interrupts) while orbax writes stops the export once the
    # write is done: orbax's threads stopped mid-write print tracebacks, write on into the removed
    # folder or hang at exit. A write that fails there (a full disk) is one line, not orbax's
    # logged tracebacks.
    checkpointing.drop_background_save_reports()
    with multihost.StopVote(jax.local_devices(), 0), ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, 'params'), jax.device_get(params))
    files.write_json(os.path.join(tmp, 'rater.json'), meta)
  return meta


@dataclasses.dataclass(frozen=True)
class LoadedRater:
  """A rater and its parameters (on the first local device).

  `loaded(batch)` scores any batch of numpy arrays (the features by their TFDS names, raw as
  TFDS reads them or decoded as the pipeline gives them, and `index`, their positions in the
  split, if known) in blocks of `block` examples per device, split over `devices`, and returns
  numpy float32 scores. `scores(batch)` and `weights(batch, mask)` (the loss weights of the
  `datarater` policy) read the same batches and are traceable, for one's own training loop;
  `rater.score(params, batch)` reads decoded features only.
  """
  rater: tasks.Rater
  params: Any
  info: DataInfo
  temperature: float
  meta: dict
  devices: tuple
  block: int
  scorer: Callable[[dict], jax.Array]

  @property
  def training_example_gradients(self) -> int:
    return int(self.meta.get('training_example_gradients', 0))

  @functools.cached_property
  def reads(self) -> tuple:
    """The features of its training data the rater reads: those without which scoring an
    example fails (traced, not run); other features of that data may be absent elsewhere."""
    return features_read(self.rater.score, self.params, self.info.spec)

  def check_batch(self, batch) -> int:
    """The number of examples of `batch`; UserError (one line) unless it is a dict holding
    every feature the rater reads (`reads`) as numbers of shape [n, *the feature's shape], one
    n for them all (and `index`, if given). Reads only shapes and dtypes (traced arrays too)."""
    if not isinstance(batch, Mapping):
      raise UserError(f'a batch to score is a dict of features, not a {type(batch).__name__}')
    missing = [k for k in self.reads if k not in batch]
    if missing or not batch:
      what = f'has no feature {missing[0]!r}' if missing else 'is empty'
      raise UserError(f'the batch {what} (the rater reads {", ".join(self.reads)}; it holds '
                      f'{", ".join(map(str, batch)) or "nothing"})')
    sizes = {}
    for k in [k for k in (*self.reads, 'index') if k in batch] or [next(iter(batch))]:
      x = batch[k] if hasattr(batch[k], 'dtype') else np.asarray(batch[k])
      spec = self.info.spec.get(k)
      shape, want = tuple(np.shape(x)), () if spec is None else tuple(spec.shape)
      if shape[1:] != want or len(shape) != len(want) + 1:
        raise UserError(f'feature {k!r} of the batch has shape {shape}; the rater reads '
                        f'[{", ".join(["n", *map(str, want)])}] (n examples)')
      if np.dtype(x.dtype).kind not in 'biuf':
        raise UserError(f'feature {k!r} of the batch holds {x.dtype}, not numbers')
      sizes[k] = shape[0]
    if len(set(sizes.values())) > 1:
      raise UserError(f'the batch\'s features hold different numbers of examples: {sizes}')
    return next(iter(sizes.values()))

  def scores(self, batch: dict) -> jax.Array:
    """Scores [n] of a batch as `loaded(batch)` reads it, traceable (inside your own `jax.jit`,
    `jax.vmap` or sharded computation; the parameters are a constant of it): uint8 pixels are
    decoded as the pipeline decodes them, other features cast to the dtypes the rater was
    trained on. Pixels given as integers other than uint8 are refused; float pixels must be in
    [0, 1] (checked only when the batch is not traced, as are the classes). Float32 at least (a
    bfloat16 rater's scores too)."""
    n = self.check_batch(batch)
    part = pipeline.decode(self.info, {k: batch[k] for k in self.reads})
    part['index'] = jnp.asarray(batch['index'] if 'index' in batch else jnp.arange(n), jnp.int32)
    if not any(isinstance(v, jax.core.Tracer) for v in part.values()):
      self.rater.check_data(part)  # classes outside the rater's, tokens outside its vocabulary
    return at_least_float32(self.rater.score(self.params, part))

  def weights(self, batch: dict, mask: Optional[jax.Array] = None) -> jax.Array:
    """Loss weights [n] n * softmax(score / temperature), averaging 1 (the rater's own
    temperature), as `launch.train --policy=datarater` weighs a batch; traceable like `scores`.
    `mask` (1: a real example, 0: padding): the softmax runs over the real examples, which
    average 1, and padding weighs 0 (as that policy's `weigh`)."""
    return softmax_weights(self.scores(batch), self.temperature,
                           None if mask is None else jnp.asarray(mask))

  def __call__(self, batch: dict) -> np.ndarray:
    n = self.check_batch(batch)
    chunk = self.block * len(self.devices)
    out = []
    for start in range(0, n, chunk):
      idx = np.arange(start, start + chunk) % n  # pad the last chunk by wrapping (one shape)
      # Raw TFDS features (uint8 pixels) are decoded as the pipeline decodes them; decoded
      # ones pass through.
      part = pipeline.decode(self.info, {k: np.asarray(batch[k])[idx] for k in self.reads})
      # Every batch a rater sees holds `index` (a rater may key its dropout on it): the batch's,
      # else the examples' positions in it.
      part['index'] = np.asarray(batch['index'] if 'index' in batch else np.arange(n),
                                 np.int32)[idx]
      self.rater.check_data(part)  # e.g. tokens outside its vocabulary
      out.append(at_least_float32(np.asarray(self.scorer(part)))[:min(chunk, n - start)])
    return np.concatenate(out) if out else np.zeros(0, np.float32)

  def check_matches(self, info: DataInfo, what: str, corruption=None) -> None:
    """UserError unless `info` has the features (shapes, dtypes, classes) the rater reads, and
    `corruption` (a `Corruption` planted in that data, if given) is planted where it reads."""
    if not self.info.matches(info, self.reads):
      want = {k: (tuple(self.info.spec[k].shape),
                  self.info.stored.get(k, np.dtype(self.info.spec[k].dtype).name))
              for k in self.reads}
      got = {k: (tuple(s.shape), info.stored.get(k, np.dtype(s.dtype).name))
             for k, s in info.spec.items()}
      raise UserError(f'the rater reads features {want} (classes {dict(self.info.num_classes)}), '
                      f'but {what} has {got} (classes {dict(info.num_classes)})')
    if corruption is not None:
      corruption.check_targets(info, self.rater)


def _read_exported(path: str):
  """(rater, DataInfo, params on the first local device, temperature, rater.json) of a folder
  `launch.export_rater` wrote, each part checked (a hand-edited file fails in one line)."""
  meta_path = os.path.join(path, 'rater.json')
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'rater {path!r}: {meta_path!r} is not readable JSON ({e})') from None
  if not isinstance(meta, dict):
    raise UserError(f'rater {path!r}: {meta_path!r} holds a JSON {type(meta).__name__}, not '
                    'the object launch.export_rater writes')
  if meta.get('format_version') != FORMAT_VERSION:
    raise UserError(f'rater {path!r} has format_version {meta.get("format_version")!r}; '
                    f'this code reads {FORMAT_VERSION}')
  missing = _first_missing(meta, META_FIELDS)
  if missing:
    raise UserError(f'rater {path!r}: {meta_path!r} has no {missing}')
  temperature = meta['temperature']
  problem = config_checks.number(config_checks.MIN_TEMPERATURE)(temperature)
  if problem:  # 0, NaN or < 0 would weigh every example by NaN, or the worst ones up
    raise UserError(f'rater {path!r}: {meta_path!r} has temperature {temperature!r}; it '
                    f'{problem}')
  try:
    info = DataInfo.from_json(meta['data_info'])
  except INFO_ERRORS as e:
    raise UserError(f'rater {path!r}: {meta_path!r} has a malformed data_info '
                    f'({type(e).__name__}: {e})') from None
  problem = _info_problem(meta['data_info'])
  if problem:
    raise UserError(f'rater {path!r}: {meta_path!r} has {problem}')
  rater = _make_rater(ml_collections.ConfigDict(meta['rater']), info, meta_path, meta)
  host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params_path = os.path.abspath(os.path.join(path, 'params'))
  if not os.path.isdir(params_path):
    raise UserError(f'rater {path!r} has no params/ folder')
  try:  # a signal as orbax reads is held until it is done (interrupted, it says 'unreadable')
    with multihost.StopVote(jax.local_devices(), 0), checkpointing.quiet_orbax(), \
        ocp.StandardCheckpointer(
            multiprocessing_options=checkpointing.this_process_alone()) as ckptr:
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host),
                            ckptr.metadata(params_path).item_metadata.tree)
      params = ckptr.restore(params_path, target)
  except Exception as e:  # pylint: disable=broad-except  (orbax's errors of damaged files)
    why = ' '.join(str(e).split())[:200]
    raise UserError(f'rater {path!r}: its params/ folder is unreadable ({type(e).__name__}: '
                    f'{why})') from None
  _check_finite(params, f'rater {path!r}')
  return rater, info, params, float(temperature), meta


def load_rater(path: str, devices: Optional[list] = None,
               block: int = evaluation.SCORE_BLOCK) -> LoadedRater:
  """Loads the rater of an exported folder or of a `launch.train_rater` run onto `devices`.

  Scores are computed in blocks of `block` examples per device with `jax.shard_map`; each device
  runs the same [block]-shaped program, so results do not depend on the number of devices, and
  are those of the rater run (it scores its split in blocks of `evaluation.SCORE_BLOCK`).
  Reading with orbax wraps `sys.unraisablehook` (once per process) to drop tensorstore's 'Event
  loop is closed' reports of a damaged folder (`checkpointing.quiet_orbax`).
  """
  if os.path.exists(os.path.join(path, 'rater.json')):
    rater, info, params, temperature, meta = _read_exported(path)
  elif os.path.exists(os.path.join(path, 'config.json')):
    config, info, rater, params, steps = _read_run(path)
    temperature = float(config.rater.temperature)
    meta = {'training_example_gradients': rater_training_compute(config, steps),
            'config': json.loads(config.to_json())}
  else:
    raise UserError(f'no rater in {path!r}: neither an exported rater (rater.json, from '
                    'launch.export_rater) nor a launch.train_rater run (config.json)')
  _check_fits(rater, params, f'rater {path!r}')
  devices = tuple(devices or jax.local_devices())
  mesh = Mesh(np.array(devices), ('batch',))
  params_repl = jax.device_put(params, NamedSharding(mesh, P()))
  data_sharding = NamedSharding(mesh, P('batch'))
  sharded = jax.jit(jax.shard_map(rater.score, mesh=mesh, in_specs=(P(), P('batch')),
                                  out_specs=P('batch')))

  def scorer(batch: dict) -> jax.Array:
    return sharded(params_repl, jax.device_put(batch, data_sharding))

  return LoadedRater(rater=rater, params=params, info=info, temperature=temperature, meta=meta,
                     devices=devices, block=block, scorer=scorer)
