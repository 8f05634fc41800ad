"""The one training loop: task models trained from scratch under a policy, evaluated as they go.

`Trainer(task, optimizer, policy, batch_size).run(train, evals, seeds, epochs=E | steps=S)` trains
one model per seed at once (vmapped: each seed has its own initialisation, data order and policy
state). One epoch:
  1. the policy selects its examples and weights (`Policy.select`; all of them, weight 1, for a
     weighting policy); they are shuffled by (seed, epoch) and cut into batches of `batch_size`,
     the last one padded with weight-0 entries;
  2. a `lax.scan` takes one optimizer step per batch on the weighted loss, the selection
     weights times the policy's per-batch weights (`Policy.weigh`; 0 filters an example out),
     averaged over the batch's real examples (a padded last batch is not a smaller step; a batch
     with no weight > 0 is no step; padding rows stay 0 whatever `weigh` gives);
  3. the per-example losses of those steps go back to the policy (`Policy.update`);
  4. every split in `evals` is evaluated (`Task.metrics`, averaged), `evals_per_epoch` times
     (at most once per step).
Compute is counted in example-gradients: (example, step) pairs with a weight > 0. A policy that
weighs at most N rows of a batch > 0 (`Policy.kept_rows`, the batch filter's) has each step run
the task on those N rows alone.
Every random choice is keyed by (seed, epoch) (a seed's keys fold 0, 1, 2 into its root key
`seeding.root_key(seed, purpose)`: initialisation, data order, policy), so a run resumed from a
checkpoint (`checkpointer`, a `RunCheckpointer`) equals an uninterrupted one. `record_every=k`
keeps the parameters before every k-th step and the batches of every step (a `Recording`, what
valuations replay).
The training data is a `pipeline.Split` (held on the devices, batches gathered inside the
compiled steps) or a streaming `source.Source` (batches read on the host, at most `STREAM_CHUNK`
steps and `STREAM_EXAMPLES` examples at a time, or one step when its batches alone are more, so
memory does not grow with the dataset; each chunk is read, in a thread, while the steps of the
one before run: two chunks in memory; over several processes each reads the whole chunk and
places the rows its devices hold); both give the same steps.
A run is placed on every device of its process (`Trainer(devices=...)` picks others: `launch.train`
gives every device of a `jax.distributed` job, each process placing the rows its devices hold, and
the processes stopping together: `_stopping_together`): the seeds'
axis (models, policy states, recordings) over gcd(#seeds, #devices) of them, the rest splitting
every batch and evaluation block (`seeds_mesh`, `datarater.mesh`); the steps are written for one
device and compiled with these shardings, so N devices give one device's run up to float32
summation order (one device: the same program).

The history is a list of records, one per evaluation, all of one format:
  {'epoch': float, 'step': int, 'example_gradients': int, 'scoring_forwards': int,
   'wall_s': float, 'train': {'loss': [one value per seed]}, <split>: {<metric>: [...]}};
'train' is the running training loss: the unweighted mean loss of the examples trained on (weight
> 0) since the record before, each at the parameters its step started from. An evaluation split
named as one of these fields (`RECORD_FIELDS`) is refused.
"""
import contextlib
import dataclasses
import functools
import itertools
import math
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from datarater import files, multihost, seeding
from datarater.checkpointing import RunCheckpointer, abstract_of
from datarater.data import source as source_lib
from datarater.errors import UserError
from datarater.mesh import (BATCH, POP, check_batch_sizes, from_host, gathered, make_mesh,
                            replicated, spans_processes)

from datarater.tasks import Task
from inner_loop.unroll import InnerState, init_inner_state, inner_step

EVAL_BLOCK = 512  # examples evaluated per compiled block
# A history record's own fields; its other entries are the evaluation splits, by their names.
RECORD_FIELDS = ('epoch', 'step', 'example_gradients', 'scoring_forwards', 'wall_s', 'train')
STREAM_CHUNK = 32  # steps whose batches a streaming run reads at a time, at most
STREAM_EXAMPLES = 1 << 14  # ... and at most this many examples (all models' batches) at a time


@flax.struct.dataclass
class TrainState:
  models: InnerState           # leaves [M, ...], one model per seed
  policy: Any                  # the policy's per-model states, leaves [M, ...]
  example_gradients: jax.Array  # int32 [M]
  drawn: jax.Array             # int32 [M]: examples drawn (scored, for scoring policies)


@dataclasses.dataclass
class Recording:
  """Parameters before steps 0, k, 2k, ... (leaves [M, C, ...]) and every step's batch:
  positions in the training split and weights, [M, T, B]."""
  checkpoints: Any
  positions: np.ndarray
  weights: np.ndarray


@dataclasses.dataclass
class TrainResult:
  history: list
  params: Any                   # final parameters, leaves [M, ...]
  policy_state: Any
  seeds: list
  steps: int
  example_gradients: int        # per model
  scoring_forwards: int         # per model
  setup_example_gradients: int
  setup_forwards: int           # e.g. the acceptance filter's scoring of the split, once
  wall_s: float                 # training (selection, steps, policy updates); no compile, eval
  compile_s: float
  recording: Optional[Recording] = None
  stopped_after: Optional[int] = None  # epochs done, if `stop_after` ended the run early

  @property
  def final(self) -> dict:
    return self.history[-1]

  def report(self) -> dict:
    """JSON-ready summary: the history, totals, and the final mean and std of every metric."""
    return {'seeds': list(self.seeds), 'history': self.history, 'final': summarize(self.final),
            'steps': self.steps, 'example_gradients': self.example_gradients,
            'scoring_forwards': self.scoring_forwards,
            'setup_example_gradients': self.setup_example_gradients,
            'setup_forwards': self.setup_forwards,
            'total_example_gradients': self.example_gradients + self.setup_example_gradients,
            'wall_s': self.wall_s, 'compile_s': self.compile_s}


def summarize(record: dict) -> dict:
  """A history record with every per-seed list replaced by {'mean', 'std', 'per_seed'}."""
  out = {}
  for k, v in record.items():
    if isinstance(v, dict):
      out[k] = {m: {'mean': float(np.mean(x)), 'std': float(np.std(x)), 'per_seed': list(x)}
                for m, x in v.items()}
    else:
      out[k] = v
  return out


def _eval_cuts(steps: int, evals: int) -> np.ndarray:
  """The steps of an epoch of `steps` after which its `evals` evaluations come: [0, ..., steps]."""
  return np.linspace(0, steps, evals + 1).round().astype(int)


def _chunks(cuts, size):
  """Step ranges [a, b) between consecutive `cuts`, each split into pieces of at most `size`."""
  for a, b in zip(cuts[:-1], cuts[1:]):
    for start in range(a, b, size or max(b - a, 1)):
      yield start, min(b, start + (size or b - a))


def _pad(x: np.ndarray, length: int, a: int, b: int) -> np.ndarray:
  """x [M, b - a, ...] (steps a..b of a chunk) padded along its steps to `length`."""
  return np.pad(x, [(0, 0), (0, length - (b - a))] + [(0, 0)] * (x.ndim - 2))


def _blocks(split, mesh: Mesh):
  """The split's features and `index` (the task's batches hold it) as device blocks
  [nb, size, ...], each split over the mesh's batch axis, and a validity mask [nb, size]: blocks
  of `EVAL_BLOCK` examples, or of the whole split where it is smaller, rounded up to a multiple
  of the batch axis."""
  n, devices = len(split), mesh.shape[BATCH]
  size = -(-min(EVAL_BLOCK, max(n, 1)) // devices) * devices
  nb = max(1, math.ceil(n / size))
  idx = np.arange(nb * size) % max(n, 1)
  mask = (np.arange(nb * size) < n).astype(np.float32).reshape(nb, size)
  data = {k: v.reshape(nb, size, *v.shape[1:]) for k, v in split.take(idx).items()}
  return _on_mesh((data, mask), NamedSharding(mesh, P(None, BATCH)))


def _check_weights(policy_name: str, used: np.ndarray, seeds, first_step: int,
                   kept_rows: int) -> None:
  """Refuses loss weights [M, L, B] that are not finite (a rater whose scores overflow): the
  steps would train on nothing and report NaN losses. More than `kept_rows` weights > 0 in a
  batch (a policy breaking its `Policy.kept_rows`: its steps left some out) is a bug."""
  most = int(np.max(np.sum(used > 0, -1), initial=0))
  assert most <= kept_rows, (f'policy {policy_name} declares kept_rows={kept_rows} but weighed '
                             f'{most} rows of a batch > 0')
  bad = np.argwhere(~np.isfinite(used))
  if len(bad):
    m, t, _ = bad[0]
    raise UserError(f'policy {policy_name} gave loss weights that are not finite at step '
                    f'{first_step + t + 1} (model seed {seeds[m]}, {len(bad)} weights in '
                    f'{used.shape[1]} steps)')


def _check_losses(losses: np.ndarray, seeds, first_step: int, setting: str) -> None:
  """Refuses training losses [M, L, B] that are not finite: the models diverged (or, at step 1,
  before any update, the model cannot read the data), and every later step, evaluation and
  checkpoint would hold NaN."""
  bad = np.argwhere(~np.isfinite(losses))
  if len(bad):
    m, t, _ = bad[0]
    where = f'at step {first_step + t + 1} (model seed {seeds[m]})'
    if first_step + t == 0:  # the initial parameters' loss: no step has diverged yet
      raise UserError(f'the training loss is not finite {where}, before any update: the model '
                      "cannot read the data (tokens outside an embedding's vocabulary? a task's "
                      'check_data can refuse such data in one line)')
    raise UserError(f'the training loss is not finite {where}: the models diverged; lower '
                    f'{setting}')


def seeds_mesh(num_seeds: int, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The mesh a run of `num_seeds` seeds is placed on: the seeds' axis over gcd(#seeds,
  #devices) of `devices` (by default every device of this process), the rest splitting every
  batch (`datarater.mesh`)."""
  return make_mesh(num_seeds, jax.local_devices() if devices is None else devices)


def check_batch_splits(batch_size: int, num_seeds: int, setting: str = 'batch_size',
                      devices: Optional[Sequence[jax.Device]] = None) -> None:
  """One line naming `setting` if a run's batches do not split over its mesh's batch axis."""
  check_batch_sizes(seeds_mesh(num_seeds, devices), **{setting: batch_size})


@functools.partial(jax.jit, static_argnums=1)
def _empty_recording(params, count: int):
  """Zeros for `count` recorded copies of each member's parameters, [members, count, ...]: one
  program (compiled once per shapes and count), not a zeros per leaf."""
  return jax.tree.map(lambda p: jnp.zeros((p.shape[0], count, *p.shape[1:]), p.dtype), params)


def seed_keys(seeds: jax.Array, purpose: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each seed's keys (leaves [M]) for its model's initialisation, its data order and its policy
  state: fold_in(seeding.root_key(seed, purpose), 0 / 1 / 2)."""
  keys = jax.vmap(lambda s: seeding.root_key(s, purpose))(seeds)
  return tuple(jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys) for i in range(3))


def initial_params(task: Task, seeds: Sequence[int], purpose: str = 'train',
                   devices: Optional[Sequence[jax.Device]] = None):
  """The parameters a Trainer's models of `seeds` (rooted at `purpose`) start from, leaves
  [M, ...], without building one (its policy): what a launcher checks before the policy's
  set-up. Each model comes from `task.init` called alone (a task's init, compiled once per
  process, is not compiled again for every run a process makes) and goes through the host to
  the devices a Trainer of `devices` places it on (`seeds_mesh`; each process its devices' own
  models, `from_host`): no device holds more models than in the run."""
  init_keys = seed_keys(jnp.asarray(seeds, jnp.int32), purpose)[0]
  models = [jax.device_get(task.init(k)) for k in init_keys]
  return from_host(jax.tree.map(lambda *p: np.stack(p), *models),
                   NamedSharding(seeds_mesh(len(seeds), devices), P(POP)))


class Trainer:
  """Trains task models under `policy`; its steps compile once per run (chunks padded to one
  length)."""

  def __init__(self, task: Task, optimizer: optax.GradientTransformation, policy,
               batch_size: int, record_every: int = 0,
               learning_rate_setting: str = "the optimizer's learning rate",
               purpose: str = 'train', devices: Optional[Sequence[jax.Device]] = None,
               batch_size_setting: str = 'batch_size'):
    """`learning_rate_setting` names the setting to lower where the models diverge (a config
    field and its value), `batch_size_setting` the config field of `batch_size` (named where it
    does not split over the devices). `purpose` (`seeding.PURPOSES`) roots the seeds' keys: a
    valuation's or a feature extractor's model of seed s is not the trained model of seed s.
    `devices`: those a run is placed on (`mesh`), by default every device of this process."""
    if batch_size < 1:
      raise UserError(f'batch_size must be >= 1, got {batch_size}')
    self.task, self.optimizer, self.policy = task, optimizer, policy
    self.learning_rate_setting, self.purpose = learning_rate_setting, purpose
    self.batch_size_setting = batch_size_setting
    self.batch_size, self.record_every = batch_size, record_every
    self.steps_per_epoch = math.ceil(policy.num_selected / batch_size)
    # the rows of a batch a step computes: all, or the bound the policy declares
    self.kept_rows = min(batch_size, policy.kept_rows(batch_size) if policy.kept_rows
                         else batch_size)
    self.devices = devices
    self._compiled_for = {}  # mesh -> its programs (`_programs`)

  def mesh(self, num_seeds: int) -> Mesh:
    """The mesh a run of `num_seeds` seeds is placed on (`seeds_mesh` of `devices`)."""
    return seeds_mesh(num_seeds, self.devices)

  def _programs(self, mesh: Mesh) -> dict:
    """The run's programs (the vmapped one-model functions below) jitted for `mesh` (GSPMD):
    what has a seeds' axis (models, policy states, recordings, counts) split over its population
    axis, the steps' batches [M, L, B, ...] and the evaluation blocks over its batch axis too,
    what the seeds share (the split's features, the policy's aux, step numbers) replicated."""
    if mesh not in self._compiled_for:
      rep, pop = replicated(mesh), NamedSharding(mesh, P(POP))
      steps, blocks = NamedSharding(mesh, P(POP, None, BATCH)), NamedSharding(mesh, P(None, BATCH))

      def program(fn, in_shardings, **kw):
        return _Program(jax.jit(fn, in_shardings=in_shardings, **kw), in_shardings)

      def chunk(read):
        # The models and the recording buffer are donated: run() replaces them by the outputs,
        # so the steps update them in place (no copy of the [M, C, ...] buffer per chunk).
        return program(jax.vmap(functools.partial(self._chunk_one, read=read),
                                in_axes=(0, 0, None, 0 if read else None, 0, 0, None, None, 0)),
                       (pop, pop, rep, steps if read else rep, steps, steps, rep, rep, pop),
                       out_shardings=(pop, pop, steps, steps, pop), donate_argnums=(0, 8))
      self._compiled_for[mesh] = {
          'plan': program(jax.vmap(self._plan_one, in_axes=(None, 0, 0, None)),
                          (rep, pop, pop, rep), out_shardings=pop),
          'chunk': chunk(read=False), 'chunk_read': chunk(read=True),
          'update': program(jax.vmap(self.policy.update, in_axes=(None, 0, 0, 0, 0)),
                            (rep, pop, pop, pop, pop), out_shardings=pop),
          'evaluate': jax.jit(self._evaluate_all, in_shardings=(pop, blocks, blocks),
                              out_shardings=pop),
          # compiled once per seed count; the models' parameters come from `initial_params`
          'init': jax.jit(self._init_all, static_argnums=2, in_shardings=pop, out_shardings=pop)}
    return self._compiled_for[mesh]

  # ------------------------------------------------------------------------- compiled pieces

  def _plan_one(self, aux, policy_state, key, epoch):
    """One model's epoch: positions and weights [steps, B] in shuffled order, new policy state."""
    positions, weights, policy_state = self.policy.select(aux, policy_state)
    n = positions.shape[0]
    order = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    pad = self.steps_per_epoch * self.batch_size - n
    positions = jnp.concatenate([positions[order], jnp.zeros(pad, jnp.int32)])
    weights = jnp.concatenate([weights[order], jnp.zeros(pad, jnp.float32)])
    shape = (self.steps_per_epoch, self.batch_size)
    return positions.reshape(shape), weights.reshape(shape), policy_state

  def _chunk_one(self, model, policy_state, aux, data, positions, weights, first_step, length,
                 buffer, read: bool):
    """The first `length` steps over `positions`/`weights` [L, B] for one model (the rest is
    padding); records into `buffer`. Returns
    (model, buffer, losses [L, B], weights used [L, B], (example-gradients, examples drawn)).
    `data` is the whole split's features (batches gathered here) or, `read`, the chunk's batches
    [L, B, ...] already read (streaming)."""
    every = self.record_every

    def step(carry, xs):
      model, buffer = carry
      pos, w, t, i = xs
      if read:
        batch = {k: v[i] for k, v in data.items()}
      else:
        batch = {k: jnp.take(v, pos, axis=0, mode='clip') for k, v in data.items()}
      batch['index'] = pos
      # A batch's loss is the mean over its real (non-padding) examples: the weights are scaled
      # by B / (real examples), so an epoch's short last batch takes a full-sized step.
      real = jnp.maximum(jnp.sum(w > 0), 1)
      # Rows the selection weighs 0 (padding: copies of position 0) stay 0 whatever `weigh` gives.
      w = jnp.where(w > 0, self.policy.weigh(aux, policy_state, model.params, batch, w), 0.0)
      w = w * (w.shape[0] / real)
      if every:  # the parameters before step t, at slot t / every (other steps are dropped)
        slot = jnp.where(t % every == 0, t // every, jax.tree.leaves(buffer)[0].shape[0])
        buffer = jax.tree.map(lambda b, p: b.at[slot].set(p, mode='drop'), buffer, model.params)
      stepped, losses = self._step(model, batch, w)
      # A batch with no weight > 0 (a selection's or filter's zero weights) trains on nothing:
      # no step, though its gradient is 0 (Adam's momentum would still move the parameters).
      model = jax.tree.map(lambda new, old: jnp.where(jnp.any(w > 0), new, old), stepped, model)
      return (model, buffer), (losses, w)

    def step_or_skip(carry, xs):
      # Steps past `length` only pad the chunk to its fixed length: they change nothing. The
      # predicate is the same for every model, so under vmap this stays a branch, not a select.
      outputs = jax.eval_shape(step, carry, xs)[1]
      skip = lambda carry, xs: (carry, jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), outputs))
      return jax.lax.cond(xs[3] < length, step, skip, carry, xs)

    steps = first_step + jnp.arange(positions.shape[0])
    (model, buffer), (losses, used) = jax.lax.scan(
        step_or_skip, (model, buffer), (positions, weights, steps, jnp.arange(positions.shape[0])))
    counts = jnp.stack([jnp.sum(used > 0), jnp.sum(weights > 0)]).astype(jnp.int32)
    return model, buffer, losses, used, counts

  def _step(self, model, batch: dict, w: jax.Array):
    """`inner_step` on `batch` with loss weights `w` [B]: (new model, losses [B]). A policy
    whose weights > 0 are at most `kept_rows` of B (`Policy.kept_rows`) has the step run on the
    rows of the `kept_rows` largest weights alone, weighted by kept_rows / B (the loss stays
    sum(w_i l_i) / B); the rows left out are not computed and get loss 0."""
    rows, loss = self.kept_rows, self.task.per_example_loss
    if rows >= w.shape[0]:
      return inner_step(loss, self.optimizer, model, batch, w)
    kept = jax.lax.top_k(w, rows)[1]
    model, part = inner_step(loss, self.optimizer, model,
                             jax.tree.map(lambda v: v[kept], batch), w[kept] * (rows / w.shape[0]))
    return model, jnp.zeros(w.shape, part.dtype).at[kept].set(part)

  def _evaluate_all(self, params, data, mask):
    """Mean of every task metric over the valid examples, per model: {name: [M]}."""
    def block(totals, xs):
      batch, m = xs
      metrics = jax.vmap(lambda p: self.task.metrics(p, batch))(params)
      return {k: totals[k] + jnp.sum(v * m, -1) for k, v in metrics.items()}, None

    first = jax.tree.map(lambda x: x[0], data)
    shapes = jax.eval_shape(jax.vmap(lambda p: self.task.metrics(p, first)), params)
    zeros = {k: jnp.zeros(s.shape[:1], jnp.float32) for k, s in shapes.items()}
    totals, _ = jax.lax.scan(block, zeros, (data, mask))
    return {k: v / jnp.sum(mask) for k, v in totals.items()}

  # ------------------------------------------------------------------------- the loop

  def _init_all(self, params, seeds, num_examples: int):
    """The models' optimizer states over `params` (leaves [M, ...]), the policy states and each
    seed's data-order key."""
    _, order_keys, policy_keys = seed_keys(seeds, self.purpose)
    models = jax.vmap(lambda p: init_inner_state(p, self.optimizer))(params)
    policy = jax.vmap(lambda k: self.policy.init(num_examples, k))(policy_keys)
    zeros = jnp.zeros(len(seeds), jnp.int32)
    return TrainState(models, policy, zeros, zeros), order_keys

  def init(self, seeds: Sequence[int], num_examples: int) -> tuple[TrainState, jax.Array]:
    """Fresh models and policy states for `seeds`, and each seed's data-order key, placed on
    `mesh(len(seeds))`. The parameters are `initial_params`': the task's init, compiled once
    per process, not again (vmapped) in each Trainer's program (seconds per run on CPU)."""
    mesh = self.mesh(len(seeds))
    params = initial_params(self.task, seeds, self.purpose, self.devices)
    seeds = _on_mesh(np.asarray(seeds, np.int32), NamedSharding(mesh, P(POP)))
    return self._programs(mesh)['init'](params, seeds, num_examples)

  def run(self, train, evals: dict, seeds: Sequence[int], *, epochs: Optional[int] = None,
          steps: Optional[int] = None, evals_per_epoch: int = 1,
          log: Optional[Callable[[dict], None]] = None,
          checkpointer: Optional[RunCheckpointer] = None, checkpoint_every: int = 1,
          stop_after: Optional[int] = None,
          on_start: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Trains for `epochs` epochs or `steps` optimizer steps; see the module docstring.

    With `checkpointer`, the state and history are saved every `checkpoint_every` epochs and at
    the end, and a run finds its latest readable checkpoint and goes on from there; `on_start`
    is called with the epoch it starts from (0 when fresh) before any record. `stop_after`:
    checkpoint and return after that many epochs (a preemption drill). `wall_s` counts the
    training (selection, steps, policy updates), not compilation or evaluation.
    """
    seeds = [int(s) for s in seeds]
    self._check_run(train, evals, seeds, epochs, steps, evals_per_epoch, checkpointer)
    spe = self.steps_per_epoch
    total = steps if steps is not None else epochs * spe
    num_epochs = math.ceil(total / spe)
    streaming = not hasattr(train, 'features')
    mesh = self.mesh(len(seeds))
    programs = self._programs(mesh)
    data = None if streaming else _on_mesh(dict(train.features), replicated(mesh))
    eval_data = {name: _blocks(split, mesh) for name, split in evals.items()}
    state, order_keys = self.init(seeds, len(train))
    aux = _shared(self.policy.aux, mesh)
    recorder = jnp.zeros(len(seeds))  # carried through the steps; parameters if recording
    if self.record_every:
      count = math.ceil(total / self.record_every)
      recorder = _empty_recording(state.models.params, count)
    positions_log, weights_log = [], []

    history, train_s, compile_s, start_epoch, done_steps = [], 0.0, 0.0, 0, 0
    with _stopping_together(mesh, checkpointer) as stop_here:
      if checkpointer is not None and checkpointer.latest_step() is not None:
        state, history, train_s, compile_s, start_epoch, done_steps = _restore(checkpointer, state)
      if on_start is not None:
        on_start(start_epoch)
      stopped = stop_here(start_epoch)  # (process 0 alone may have failed to start recording)
      state = state.replace(example_gradients=gathered(state.example_gradients),  # host counters
                            drawn=gathered(state.drawn))
      last_epoch = (num_epochs if stop_after is None
                    else max(start_epoch, min(stop_after, num_epochs)))

      # Every chunk of steps is padded to one length, so the steps compile once per run.
      chunk_size = (max(1, min(STREAM_CHUNK, STREAM_EXAMPLES // (len(seeds) * self.batch_size)))
                    if streaming else None)
      length = max(b - a for a, b in _chunks(_eval_cuts(min(spe, total), evals_per_epoch),
                                             chunk_size))
      compiled = _AheadOfTime(compile_s)

      for epoch in range(start_epoch, start_epoch if stopped else last_epoch):
        tick, compile_before = time.perf_counter(), compiled.seconds
        positions, weights, policy_state = compiled('plan', programs['plan'], aux, state.policy,
                                                    order_keys, np.int32(epoch))
        positions, weights = gathered(positions), gathered(weights)
        epoch_steps = min(spe, total - done_steps)
        cuts = _eval_cuts(epoch_steps, evals_per_epoch)
        losses, used = [], []
        spans = list(_chunks(cuts, chunk_size))
        trained = np.zeros((2, len(seeds)))  # summed loss and count since the record before

        def read(span, positions=positions):  # streaming: a chunk's batches [M, L, B, ...]
          part = self._read(train, positions[:, span[0]:span[1]])
          return {k: _pad(v, length, *span) for k, v in part.items()}
        # Streaming, each chunk is read (in a thread) while the steps of the one before run; the
        # thread ends with the loop, however it is left (not when `reads` is collected).
        reads = (contextlib.closing(source_lib.read_ahead(read, spans)) if streaming
                 else contextlib.nullcontext(itertools.repeat(data)))
        name = 'chunk_read' if streaming else 'chunk'
        with reads as chunks:
          if streaming and spans_processes(mesh):
            chunks = _read_together(chunks, [(done_steps + a, done_steps + b) for a, b in spans])
          for (a, b), chunk_data in zip(spans, chunks):
            pad = lambda x: _pad(x, length, a, b)
            models, recorder, part_losses, part_used, counts = compiled(
                name, programs[name], state.models, policy_state, aux, chunk_data,
                pad(positions[:, a:b]), pad(weights[:, a:b]), np.int32(done_steps + a),
                np.int32(b - a), recorder)
            losses.append(gathered(part_losses)[:, :b - a])  # the padding steps dropped
            used.append(gathered(part_used)[:, :b - a])
            _check_weights(self.policy.name, used[-1], seeds, done_steps + a, self.kept_rows)
            _check_losses(losses[-1], seeds, done_steps + a, self.learning_rate_setting)
            on = used[-1] > 0
            trained += [np.sum(losses[-1] * on, (1, 2), np.float64), np.sum(on, (1, 2))]
            counts = gathered(counts)
            state = state.replace(models=models,
                                  example_gradients=state.example_gradients + counts[:, 0],
                                  drawn=state.drawn + counts[:, 1])
            if self.record_every:
              positions_log.append(positions[:, a:b])
              weights_log.append(used[-1])
            if b == epoch_steps:  # the epoch is over: the policy sees its losses
              flat = lambda x: np.concatenate(x, axis=1).reshape(len(seeds), -1)
              policy_state = compiled(
                  'update', programs['update'], aux, policy_state,
                  positions[:, :epoch_steps].reshape(len(seeds), -1), flat(used), flat(losses))
              state = state.replace(policy=policy_state)
            if b in cuts:  # the end of an evaluation interval
              jax.block_until_ready(state)
              train_s += time.perf_counter() - tick - (compiled.seconds - compile_before)
              with np.errstate(invalid='ignore'):  # nothing trained on: NaN (null in JSON)
                train_loss = [float(x) for x in trained[0] / trained[1]]
              trained[:] = 0
              record = {'epoch': round(epoch + b / spe, 6), 'step': done_steps + int(b),
                        'train': {'loss': train_loss},
                        **self._evaluate_splits(programs['evaluate'], state, eval_data),
                        **self._compute_spent(state), 'wall_s': round(train_s, 4)}
              history.append(record)
              if log is not None:
                log(record)
              tick, compile_before = time.perf_counter(), compiled.seconds
            if stop_here(done_steps + b):
              stopped = True
              break
        if stopped and b < epoch_steps:  # stopped inside the epoch: its last checkpoint stands
          break
        done_steps += epoch_steps
        if checkpointer is not None and ((epoch + 1) % checkpoint_every == 0
                                        or epoch + 1 == last_epoch or stopped):
          # A Ctrl-C or SIGTERM (with launch.interrupts) while a checkpoint is written stops the
          # run once it is written: orbax stopped mid-write prints tracebacks or hangs at exit.
          with multihost.StopVote(mesh.devices, epoch + 1):
            checkpointer.save(epoch + 1, state, {'epoch': epoch + 1},
                              extra={'history': history, 'wall_s': train_s,
                                     'compile_s': compiled.seconds, 'steps': done_steps})
        if stopped:
          break
    recording = None
    if self.record_every:
      recording = Recording(recorder, np.concatenate(positions_log, 1),
                            np.concatenate(weights_log, 1))
    spent = self._compute_spent(state)
    return TrainResult(
        history=history, params=state.models.params, policy_state=state.policy, seeds=seeds,
        steps=done_steps, example_gradients=spent['example_gradients'],
        scoring_forwards=spent['scoring_forwards'],
        setup_example_gradients=int(self.policy.setup_example_gradients),
        setup_forwards=int(self.policy.setup_forwards), wall_s=train_s,
        compile_s=compiled.seconds, recording=recording,
        stopped_after=last_epoch if last_epoch < num_epochs else None)

  def _check_run(self, train, evals: dict, seeds: list, epochs, steps, evals_per_epoch: int,
                 checkpointer) -> None:
    """UserError for a run that cannot start: no seeds, no length, no data, no evaluations, an
    evaluation split named as a field of the history's records (`RECORD_FIELDS`)."""
    taken = [name for name in evals if name in RECORD_FIELDS]
    if taken:
      raise UserError(f'an evaluation split may not be named {taken[0]!r}: a history record holds '
                      f'{", ".join(RECORD_FIELDS)} under those names (name it e.g. '
                      f"'{taken[0]}_split')")
    if not seeds:
      raise UserError('no seeds to train (train.seeds is empty)')
    if (epochs is None) == (steps is None) or (epochs if steps is None else steps) < 1:
      raise UserError(f'give a positive number of epochs or steps, got epochs={epochs}, '
                      f'steps={steps}')
    if len(train) == 0:
      raise UserError('the training split is empty')
    if evals_per_epoch < 1:
      raise UserError(f'evals_per_epoch must be >= 1, got {evals_per_epoch}')
    if self.record_every and checkpointer is not None:
      raise UserError('a recorded run is not checkpointed (record_every with a checkpointer)')
    check_batch_splits(self.batch_size, len(seeds), self.batch_size_setting, self.devices)

  def _read(self, train, positions: np.ndarray) -> dict:
    """The batches of `positions` [M, L, B] read from a streamed split, checked by the task and
    the policy (e.g. tokens outside a vocabulary): features [M, L, B, ...]."""
    read = {k: v for k, v in train.take(positions).items() if k != 'index'}
    self.task.check_data(read)
    if self.policy.check_data:
      self.policy.check_data(read)
    return read

  def _evaluate_splits(self, evaluate, state: TrainState, eval_data: dict) -> dict:
    """{split: {metric: [one mean per model]}} of the evaluation splits' device blocks."""
    out = {}
    for name, (blocks, mask) in eval_data.items():
      metrics = evaluate(state.models.params, blocks, mask)
      out[name] = {k: [float(x) for x in gathered(v)] for k, v in metrics.items()}
    return out

  def _compute_spent(self, state: TrainState) -> dict:
    """Example-gradients and scoring forward passes so far, means over the models."""
    return {'example_gradients': int(np.mean(state.example_gradients)),
            'scoring_forwards': int(self.policy.forwards_per_example * np.mean(state.drawn))}


@contextlib.contextmanager
def _stopping_together(mesh: Mesh, checkpointer: Optional[RunCheckpointer]):
  """Yields `stop_here(step)`, called after each chunk of steps (and once before the first): True
  if the run stops there. Where `mesh` spans processes, a Ctrl-C or SIGTERM to any of them stops
  every one after the same chunk (`multihost.StopVote`: the block's end sends the agreed signal
  again; an epoch's last chunk is checkpointed first), and an error of one process (process 0
  alone records the history; this process's part of a checkpoint save) stops the others at that
  vote; else it is always False (a signal stops the run at once). Pending checkpoint writes
  finish however the block is left, after the vote's end (a process leaving by its error votes
  so first, where the others wait in their next `stop_here`, not in the closing's votes)."""
  try:
    voting = multihost.StopVote(mesh.devices, 0) if spans_processes(mesh) else None
    with voting or contextlib.nullcontext() as vote:
      def stop_here(step: int) -> bool:
        if vote is None:
          return False
        if checkpointer is not None:
          checkpointer.check()
        return vote.after(step)
      yield stop_here
  finally:
    if checkpointer is not None:
      with multihost.StopVote(mesh.devices, 0):
        checkpointer.close()


class _Program(NamedTuple):
  """A jitted function and the shardings its arguments are placed with before a call."""
  fn: Any
  in_shardings: tuple


class _AheadOfTime:
  """`compiled(name, program, *args)` is `program.fn(*args)` through an executable compiled ahead
  for these argument shapes (once per shapes), the arguments first placed as it takes them
  (`_placed`: a policy's parameters on one device; those placed so already are passed as they
  are, donated); `seconds` adds up the compile time, apart from the calls."""

  def __init__(self, seconds: float = 0.0):
    self.seconds, self._executables = seconds, {}

  def __call__(self, name: str, program: _Program, *args):
    args = tuple(jax.tree.map(lambda x, s=s: _placed(x, s), a)
                 for a, s in zip(args, program.in_shardings))
    key = (name,) + tuple(jax.tree.map(lambda x: getattr(x, 'shape', ()),
                                       jax.tree.leaves(args)))
    if key not in self._executables:
      t = time.perf_counter()
      self._executables[key] = program.fn.lower(*args).compile()
      self.seconds += time.perf_counter() - t
    return self._executables[key](*args)


def _on_mesh(tree, sharding):
  """Host arrays that every process holds alike, placed on `sharding`: `jax.device_put` where
  this process holds all its devices; where they span processes, `from_host` (each process its
  own devices' shards; `jax.device_put` would first gather every process's whole copy onto
  every device to compare them). `launch.train` compares the processes' splits once at start-up
  (`train.check_same_contents`), a streamed one chunk by chunk (`_read_together`); a chunk's
  positions and weights, computed on the host from the same keys by the same programs on every
  process, need no check."""
  if not spans_processes(sharding):
    return jax.device_put(tree, sharding)
  return from_host(tree, sharding)


def _placed(x, sharding):
  """`x` as a compiled program with input `sharding` takes it: a device array placed otherwise
  is moved (one on this process's devices alone, e.g. zeros made here, through the host where
  `sharding` spans processes); a host array is passed as it is in one process (the executable
  places it, ~10x quicker than `jax.device_put` here: a chunk of small steps' calls took ~2x
  their time), placed first across processes (`_on_mesh`)."""
  if isinstance(x, jax.Array):
    if x.sharding == sharding:
      return x
    if not spans_processes(x) and spans_processes(sharding):
      return _on_mesh(np.asarray(x), sharding)
    return jax.device_put(x, sharding)
  return x if jax.process_count() == 1 else _on_mesh(x, sharding)


def _shared(aux, mesh: Mesh):
  """The policy's `aux` as the run's programs take it (replicated): where `mesh` spans processes,
  placed once from each process's host copy (`_on_mesh`: an array on this process's devices, a
  loaded rater's parameters, cannot move to another process's; `launch.train` checks every
  process made the same aux); in one process as it is (each program places it)."""
  if not spans_processes(mesh):
    return aux
  return _on_mesh(jax.tree.map(np.asarray, aux), replicated(mesh))


def _read_together(chunks, spans):
  """The chunks of steps `spans` ([a, b) each) a streaming run reads, each once every process
  has read its own: a read that fails on one process stops every process there, each with its
  line (the others would run the chunk's steps, whose collectives wait for it for good); a chunk
  whose examples (sha256) differ between the processes' copies of the data stops every process
  in one line (each places its own copy: `_on_mesh`)."""
  for a, b in spans:
    with multihost.together('reading the training split'):
      chunk = next(chunks)
      digest = files.digest(chunk)
    if not multihost.same_everywhere(digest):
      raise UserError(f'the processes of this job read different examples of the training split '
                      f'for steps {a + 1}-{b} (this process, {jax.process_index()}: sha256 '
                      f'{digest[:16]}): give every process the same prepared data')
    yield chunk


def _restore(checkpointer: RunCheckpointer, state: TrainState):
  """(state, history, wall_s, compile_s, epoch, steps) of the latest readable checkpoint."""
  state, meta = checkpointer.restore_latest(abstract_of(state))
  extra = meta['extra']
  return (state, extra['history'], extra['wall_s'],
          extra.get('compile_s', 0.0),  # 0 where a checkpoint does not hold it
          int(meta['step']), int(extra['steps']))
