"""A self-contained exported rater: parameters, architecture, input spec, and a jitted scorer.

`export_rater(workdir, out_dir)` copies the latest rater of a `launch.train_rater` run into
`out_dir`: `params/` (orbax, restorable on any device layout) and `rater.json` (the module's
architecture, the input spec it expects, the softmax temperature, the data it was trained on and
the example-gradients its training cost). `load_rater(out_dir)` rebuilds it on whatever devices
this process has. Scoring runs in fixed per-device blocks, so every example's score is computed by
the same compiled program whatever the number of devices: scores are bit-identical on 1 or N.
"""
import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from datarater import checkpointing, models
from datarater.errors import UserError

FORMAT_VERSION = 1


def rater_training_compute(config) -> int:
  """Task-model example-gradients of a rater run (a lower bound on its cost).

  Each outer step trains K inner models for T steps of B examples and evaluates their loss on a
  held-out batch, then back-propagates through all of it; we count the forward+backward example
  passes of the inner models, K * (T * B + B_outer) per outer step. The meta-backward through the
  unroll roughly doubles that again; it is not counted here, so the figure is conservative.
  """
  return int(config.outer.steps * config.inner.population *
             (config.inner.steps * config.inner.batch_size + config.outer.batch_size))


def export_rater(workdir: str, out_dir: str, overwrite: bool = False) -> dict:
  """Writes the rater of `workdir` to `out_dir` (temp folder, then rename); returns rater.json."""
  if not out_dir:
    raise UserError('--out is required')
  if os.path.exists(out_dir) and not overwrite:
    raise UserError(f'output {out_dir!r} already exists (pass --overwrite to replace it)')
  rater, params, config, spec = checkpointing.load_trained_rater(workdir)
  meta = {
      'format_version': FORMAT_VERSION,
      'rater': {'num_classes': int(rater.num_classes), 'hidden': [int(h) for h in rater.hidden],
                'activation': rater.activation},
      'input_spec': {'image_shape': [int(d) for d in spec['image_shape']],
                     'num_classes': int(spec['num_classes'])},
      'temperature': float(config.rater.temperature),
      'trained_on': {'dataset': config.data.name, 'split': config.data.train_split,
                     'label_noise': float(config.data.label_noise),
                     'noise_seed': int(config.data.noise_seed)},
      'training_example_gradients': rater_training_compute(config),
      'config': json.loads(config.to_json()),
  }
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f'.{os.path.basename(out_dir)}.tmp-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(tmp, 'params'), jax.device_get(params))
  checkpointing.write_json_atomic(os.path.join(tmp, 'rater.json'), meta)
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.rename(tmp, out_dir)
  return meta


@dataclasses.dataclass(frozen=True)
class LoadedRater:
  """An exported rater on this process's devices. `rater(batch)` -> scores [B] (numpy, float32).

  `score` is the jitted per-block function (batch of `block` examples per device -> scores);
  `__call__` pads any batch to whole blocks and splits it over `devices`.
  """
  module: models.Rater
  params: Any
  input_spec: dict
  temperature: float
  meta: dict
  devices: tuple
  block: int
  score: Callable[[dict], jax.Array]

  @property
  def training_example_gradients(self) -> int:
    return int(self.meta.get('training_example_gradients', 0))

  def apply(self, batch: dict) -> jax.Array:
    """Traceable scores of a batch (for use inside other jitted code, e.g. training weights)."""
    return self.module.apply(self.params, {'image': batch['image'], 'label': batch['label']})

  def __call__(self, batch: dict) -> np.ndarray:
    n = len(batch['label'])
    chunk = self.block * len(self.devices)
    out = []
    for start in range(0, n, chunk):
      idx = np.arange(start, start + chunk) % n  # pad the last chunk by wrapping (one shape)
      part = {'image': np.asarray(batch['image'])[idx].astype(np.float32),
              'label': np.asarray(batch['label'])[idx].astype(np.int32)}
      out.append(np.asarray(self.score(part))[:min(chunk, n - start)])
    return np.concatenate(out) if out else np.zeros(0, np.float32)

  def check_matches(self, image_shape, num_classes: int, what: str) -> None:
    """UserError unless examples of `what` have the image shape and classes the rater expects."""
    want = self.input_spec
    if list(image_shape) != list(want['image_shape']) or int(num_classes) != want['num_classes']:
      raise UserError(
          f'the rater expects images {tuple(want["image_shape"])} with {want["num_classes"]} '
          f'classes, but {what} has images {tuple(image_shape)} with {num_classes} classes')


def load_rater(rater_dir: str, devices: Optional[list] = None, block: int = 256) -> LoadedRater:
  """Loads an exported rater onto `devices` (default: all local devices).

  Scores are computed in blocks of `block` examples per device with `jax.shard_map`; each device
  runs the same [block]-shaped program, so results do not depend on the number of devices.
  """
  meta_path = os.path.join(rater_dir, 'rater.json')
  if not os.path.exists(meta_path):
    raise UserError(f'no exported rater in {rater_dir!r}: {meta_path!r} is missing '
                    '(make one with launch.export_rater)')
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get('format_version') != FORMAT_VERSION:
    raise UserError(f'rater {rater_dir!r} has format_version {meta.get("format_version")!r}; '
                    f'this code reads {FORMAT_VERSION}')
  r = meta['rater']
  module = models.Rater(r['num_classes'], tuple(r['hidden']), r['activation'])
  host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    path = os.path.abspath(os.path.join(rater_dir, 'params'))
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host),
                          ckptr.metadata(path).item_metadata.tree)
    params = ckptr.restore(path, target)
  devices = tuple(devices or jax.local_devices())
  mesh = Mesh(np.array(devices), ('batch',))
  params_repl = jax.device_put(params, NamedSharding(mesh, P()))
  data_sharding = NamedSharding(mesh, P('batch'))

  def local(p, batch):
    return module.apply(p, batch)

  sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P('batch')),
                                  out_specs=P('batch')))

  def score(batch: dict) -> jax.Array:
    return sharded(params_repl, jax.device_put(batch, data_sharding))

  return LoadedRater(module=module, params=params, input_spec=meta['input_spec'],
                     temperature=float(meta.get('temperature', 1.0)), meta=meta, devices=devices,
                     block=block, score=score)


def softmax_weight_fn(rater: LoadedRater, temperature: Optional[float] = None):
  """(params, batch) -> B * softmax(score / tau): the rater's online loss weights in training."""
  from inner_loop.weighting import softmax_weights  # pylint: disable=g-import-not-at-top
  tau = rater.temperature if temperature is None else temperature

  def weight_fn(params, batch):
    del params
    return jax.lax.stop_gradient(softmax_weights(rater.apply(batch), tau))
  return weight_fn
