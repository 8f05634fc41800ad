"""Orbax checkpoints of a run, tied to the config that made them.

A workdir holds `config.json` (the run's config) and `checkpoints/<step>/` (orbax: the whole
training state plus a JSON record of the data position and the config fingerprint). A run started
on a workdir whose checkpoint came from a different config stops with a one-line error before it
writes anything. Fields that do not change the training trajectory (run length, logging, paths)
may differ, so a finished run can be extended; a run's own checkpointer may narrow them. A
checkpoint that cannot be read (truncated, flipped bits, garbled metadata) is passed over with a
one-line warning for the newest intact one.
"""
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from datarater import multihost
from datarater.errors import UserError

log = logging.getLogger('datarater')

# Config fields a resumed run may change: they do not alter the state at a given step.
# Fields added to the configs after checkpoints were written without them, at the value that
# behaves as their absence did: such a checkpoint still matches.
ADDED_FIELDS = {f'{section}.{name}': '' for section in ('task', 'rater', 'features.task')
                for name in ('input', 'label')}
ADDED_FIELDS.update({'task.token_weights': '', 'rater.causal': False})
NON_TRAJECTORY_FIELDS = ('outer.steps', 'log_every', 'checkpoint_every', 'final_eval',
                         'data.data_dir')


def _flatten(d: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def trajectory_fields(config: ml_collections.ConfigDict,
                      free_fields: tuple[str, ...] = NON_TRAJECTORY_FIELDS) -> dict[str, Any]:
  """The flattened config minus `free_fields` (JSON-normalised: tuples become lists)."""
  flat = _flatten(json.loads(config.to_json()))
  return {k: v for k, v in flat.items()
          if not any(k == f or k.startswith(f + '.') for f in free_fields)}


def _drop_empty(tree):
  """Zero-size leaves -> None: orbax cannot save them, and they carry nothing."""
  return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


def _empty_like(like):
  """The zero-size array `like` (a ShapeDtypeStruct) describes, placed as it says."""
  empty = np.zeros(like.shape, like.dtype)
  sharding = getattr(like, 'sharding', None)
  return jax.device_put(empty, sharding) if sharding is not None else jax.numpy.asarray(empty)


class RunCheckpointer:
  """Saves and restores (state, data position, JSON extras) in `workdir/checkpoints` with orbax.

  `free_fields`: config fields a resumed run may change (default NON_TRAJECTORY_FIELDS).
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, max_to_keep: int = 2,
               free_fields: tuple[str, ...] = NON_TRAJECTORY_FIELDS):
    self.workdir = workdir
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.config = config
    self.free_fields = free_fields
    self._manager = None
    self._max_to_keep = max_to_keep
    self._unreadable = set()

  def _open(self, create: bool):
    if self._manager is None and (create or os.path.isdir(self.directory)):
      self._manager = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(
              max_to_keep=self._max_to_keep, create=create))
    return self._manager

  def _steps(self) -> list[int]:
    """Saved steps, newest first (none if the folder holds no checkpoint)."""
    try:
      manager = self._open(create=False)
    except Exception as e:  # pylint: disable=broad-except  (a garbled checkpoint folder)
      raise UserError(f'cannot read the checkpoints in {self.directory!r}: '
                      f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
    return [] if manager is None else sorted(manager.all_steps(), reverse=True)

  def _warn_unreadable(self, step: int, error: Exception) -> None:
    if step not in self._unreadable:
      what = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
      log.warning('warning: checkpoint %s is unreadable (%s); using an earlier one',
                  os.path.join(self.directory, str(step)), what)
    self._unreadable.add(step)

  def _set_aside_unreadable(self) -> None:
    """Renames unreadable checkpoints to `unreadable-<step>` (kept for inspection; not steps to
    orbax), so the run can save those steps again."""
    if not self._unreadable:
      return
    self.close()
    if jax.process_index() == 0:  # one process renames; the others wait for it
      for step in sorted(self._unreadable):
        path = os.path.join(self.directory, str(step))
        if os.path.isdir(path):
          os.rename(path, os.path.join(self.directory, f'unreadable-{step}-{os.getpid()}'))
    multihost.barrier('datarater.checkpointing: unreadable set aside')
    self._unreadable = set()

  def _readable_everywhere(self, step: int, read):
    """(read(step), True) if it works on every process (each reads its own shards), else
    (None, False), warned."""
    try:
      value, error = read(step), None
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore/JSON errors)
      value, error = None, e
    if multihost.agree(error is None):
      return value, True
    self._warn_unreadable(step, error or RuntimeError('unreadable on another process'))
    return None, False

  def latest_step(self) -> int | None:
    """The newest step whose record can be read (unreadable ones are passed over, warned)."""
    for step in self._steps():
      if self._readable_everywhere(step, self.meta)[1]:
        return step
    return None

  def check_compatible(self) -> int | None:
    """Raises UserError if the latest checkpoint was made with another config; returns its step."""
    step = self.latest_step()
    if step is None:
      return None
    meta = self.meta(step)
    theirs, ours = meta['config'], trajectory_fields(self.config, self.free_fields)
    shown = lambda fields, k: repr(fields[k]) if k in fields else '(not recorded)'  # free, or older
    value = lambda fields, k: fields.get(k, ADDED_FIELDS.get(k))
    diffs = [f'{k}={shown(theirs, k)} there, {shown(ours, k)} here'
             for k in sorted(set(theirs) | set(ours)) if value(theirs, k) != value(ours, k)]
    if diffs:
      raise UserError(f'workdir {self.workdir!r} holds a checkpoint of a different config '
                      f'({"; ".join(diffs[:3])}); use a new --workdir')
    return step

  def restore_latest(self, abstract_state):
    """(state, meta) of the newest checkpoint that restores on every process; unreadable ones
    are passed over (and renamed, by process 0)."""
    for step in self._steps():
      restored, ok = self._readable_everywhere(step, lambda s: self.restore(s, abstract_state))
      if ok:
        self._set_aside_unreadable()
        return restored
    raise UserError(f'no readable checkpoint in {self.directory!r}')

  def meta(self, step: int) -> dict:
    """The JSON record saved with checkpoint `step` (config, data position, step, extra)."""
    self._open(create=False)
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def save(self, step: int, state, data_position: dict[str, int], extra: Any = None) -> None:
    """`extra`: JSON-serialisable progress kept beside the state (e.g. the metrics so far)."""
    manager = self._open(create=True)
    meta = {'config': trajectory_fields(self.config, self.free_fields),
            'data_position': data_position, 'step': int(step), 'extra': extra}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_drop_empty(state)),
                                               meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state):
    """(state placed as `abstract_state`'s shardings say, meta dict).

    Each process reads its own shards through the handler, not the manager, whose restore ends
    in a barrier: a process that fails to read would otherwise leave the others waiting there.
    """
    meta = self.meta(step)
    handler = ocp.StandardCheckpointHandler()
    try:
      restored = handler.restore(epath.Path(self.directory) / str(step) / 'state',
                                 args=ocp.args.StandardRestore(_drop_empty(abstract_state)))
    finally:
      handler.close()
    state = jax.tree.map(lambda like, x: _empty_like(like) if x is None else x,
                         abstract_state, restored)
    return state, meta

  def close(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None


def abstract_of(tree):
  """ShapeDtypeStructs of a tree of placed arrays, keeping each array's sharding."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restoring onto any device count."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def restore_latest_on_host(directory: str):
  """The newest readable checkpoint's state on this process's first device, whatever mesh saved
  it (unreadable ones are passed over with a warning); None if there is none."""
  if not os.path.isdir(directory):
    return None
  try:
    manager = ocp.CheckpointManager(directory, item_handlers={
        'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()})
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'cannot read the checkpoints in {directory!r}: {str(e).splitlines()[0]}')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              manager.item_metadata(step)['state'])
        return manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))['state']
      except Exception as e:  # pylint: disable=broad-except
        log.warning('warning: checkpoint %s is unreadable (%s); using an earlier one',
                    os.path.join(directory, str(step)), str(e).splitlines()[0][:200])
  finally:
    manager.close()
  return None
