"""A gradient store: every training example's projected gradient at every checkpoint of a run,
written once, then read by queries instead of recomputing training gradients.

A store is a folder:
- `meta.json`: the projection (`pergrad.FactoredState.describe()`: kind, seed, k_in, k_out, the
  layers and their shapes), the checkpoints (step, learning rate, file), N, D, the dtype, the
  dataset and split names, the ids file's name and digest, a digest of the run's checkpoints
  (queries check they get the same run), the build settings;
- `ids.npy`: [N] int64, the examples' ids (their positions in the split expression: row i is
  example ids[i]); a store written before it holds them in meta.json's `ids` list;
- `grads_<c>.npy`: [N, D] (float32 by default) in `np.lib.format`, so `np.load(mmap_mode='r')`
  reads rows in place: row i is example i's projected gradient at checkpoint c;
- `dvemb.npy` (after `add_dvemb`): [N, D] data value embeddings in the same projection.
A store built with `gradients=False` has no `grads_<c>.npy` (meta `gradients: false`): it holds
only what `add_dvemb` adds, and the queries that read training gradients refuse it.

`build` writes into `.<name>.partial` beside the store: the .npy files are created full size,
blocks of `block_size` examples are computed in order (all checkpoints at once) and written, and
`progress.json` (examples done) is saved after each block. A killed build resumes at its last
saved block (the same meta.json, else it starts over) and ends byte-identical to an uninterrupted
one; the folder is renamed to its name only when complete. One writer per store.

Queries (`GradientStore`) compute only the new side: the test gradients (TracIn scores, top-k
attribution), a held-out mean gradient, Mimic's theta_ref - theta_c, a DVEmb test direction,
all projected with the same factors (`pergrad.project_params`), and read the training side
block by block.
"""
import functools
import json
import os
import shutil
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from datarater import files, pergrad
from datarater.files import digest  # (a store's fingerprint reads it as store.digest)
from datarater.errors import UserError
from datarater.progress import bar as progress_bar
from datarater.tasks import PerExampleLoss, Task
from datarater.valuation import dvemb
from datarater.valuation.base import TrainingRun

FORMAT = 'datarater.gradient_store/1'
META, PROGRESS, DVEMB, IDS = 'meta.json', 'progress.json', 'dvemb.npy', 'ids.npy'


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def checkpoint_lrs(run: TrainingRun) -> np.ndarray:
  """The learning rate in force at each checkpoint (as `Valuation.fit` takes it), [C]."""
  return np.asarray(run.step_lrs)[np.asarray(run.checkpoint_steps)].astype(np.float64)


def _grads_fn(loss_fn: PerExampleLoss, chunk_size: Optional[int]):
  """jit((checkpoints [C, ...], batch, state) -> projected gradients [C, B, D])."""
  return jax.jit(lambda ckpts, batch, state: jax.lax.map(
      lambda p: pergrad.per_example_projected(loss_fn, p, batch, state, chunk_size=chunk_size),
      ckpts))


def _open_partial(partial: str, meta: dict, ids: np.ndarray) -> int:
  """Examples already written to `partial` for this `meta` (0 after starting it afresh)."""
  progress = os.path.join(partial, PROGRESS)
  if os.path.isdir(partial):
    try:
      if _read_json(os.path.join(partial, META)) == meta:
        return int(_read_json(progress)['done'])
    except (OSError, ValueError, KeyError):
      pass
    shutil.rmtree(partial)
  os.makedirs(partial)
  files.write_json(os.path.join(partial, META), meta)
  np.save(os.path.join(partial, IDS), ids)
  for c in meta['checkpoints'] if meta['gradients'] else ():
    files.open_memmap(os.path.join(partial, c['file']), 'w+', np.dtype(meta['dtype']),
                      (meta['num_examples'], meta['dim'])).flush()
  _save_progress(partial, 0)
  return 0


def _save_progress(partial: str, done: int) -> None:
  files.write_json(os.path.join(partial, PROGRESS), {'done': done})


def build(path: str, loss_fn: PerExampleLoss, run: TrainingRun, split,
          projection: pergrad.FactoredProjection, *, split_name: str = '',
          block_size: int = 1024, chunk_size: Optional[int] = 64, dtype: str = 'float32',
          overwrite: bool = False, progress: bool = False,
          gradients: bool = True) -> 'GradientStore':
  """Projects every example of `split` (a `pipeline.Split` or a streamed `source.Source`) at
  every checkpoint of `run` and writes the store at `path` (resuming a killed build of the same
  store); returns it opened. `gradients=False` writes no gradients: a store for `add_dvemb`."""
  path = os.path.abspath(path)
  parent, name = os.path.dirname(path), os.path.basename(path)
  if os.path.exists(path) and not overwrite:
    raise UserError(f'gradient store {path!r} already exists (pass overwrite=True to replace it)')
  n = len(split)
  if n < 1 or block_size < 1:
    raise UserError(f'a gradient store needs examples and block_size >= 1, got {n}, {block_size}')
  if np.dtype(dtype) not in (np.float32, np.float64):
    raise UserError(f'gradient store dtype must be float32 or float64, got {dtype!r}')
  state = projection.init(loss_fn, run.final_params, split.take(np.arange(1)))
  if not pergrad.ghost_covers(loss_fn, run.final_params, split.take(np.arange(min(8, n))),
                              projection.layers):
    raise UserError(f'gradient store: the Dense layers {list(state.names)} called on each example '
                    'do not make its whole gradient of them (the loss reads their weights '
                    'outside their calls, e.g. tied weights or a weight penalty, or the '
                    'gradients are not finite); store other layers (valuation.layers)')
  lrs = checkpoint_lrs(run)
  ids = np.asarray(split.ids, np.int64)
  meta = {'format': FORMAT, 'projection': state.describe(), 'num_examples': n, 'dim': state.dim,
          'dtype': np.dtype(dtype).name, 'dataset': split.info.name, 'split': split_name,
          'ids': {'file': IDS, 'digest': digest(ids)},
          'checkpoints': [{'step': int(s), 'learning_rate': float(lr), 'file': f'grads_{c}.npy'}
                          for c, (s, lr) in enumerate(zip(np.asarray(run.checkpoint_steps), lrs))],
          'checkpoints_digest': digest(run.checkpoints),
          'build': {'block_size': block_size, 'chunk_size': chunk_size},
          'gradients': bool(gradients)}
  meta = json.loads(json.dumps(files.json_safe(meta)))  # as read back: compared with a partial's
  try:
    os.makedirs(parent, exist_ok=True)
    files.recover_dir(path)  # an old store a killed overwrite had moved aside goes back
    partial = os.path.join(parent, f'.{name}.partial')
    done = _open_partial(partial, meta, ids)
  except OSError as e:
    raise UserError(f'cannot write gradient store {path!r}: {files.why_not(path, e)}') from None
  arrays = [files.open_memmap(os.path.join(partial, c['file']), 'r+')
            for c in meta['checkpoints']] if gradients else []
  fn, size = _grads_fn(loss_fn, chunk_size), min(block_size, n)
  with progress_bar(total=n, initial=done, desc='gradient store', unit='ex',
                    disable=not progress or not gradients) as bar:
    for start in range(done, n, size) if gradients else ():
      out = np.asarray(fn(run.checkpoints, split.take(np.arange(start, start + size) % n), state))
      rows = min(size, n - start)
      for array, g in zip(arrays, out):
        array[start:start + rows] = g[:rows]
        array.flush()
      _save_progress(partial, start + rows)
      bar.update(rows)
  del arrays
  os.remove(os.path.join(partial, PROGRESS))
  files.replace_dir(partial, path)
  return GradientStore(path)


class TopK(NamedTuple):
  """Per test example [M, k]: the most supporting (highest score first) and most opposing
  (lowest first) training examples, by id; ties go to the lower row of the store."""
  support_ids: np.ndarray
  support_scores: np.ndarray
  oppose_ids: np.ndarray
  oppose_scores: np.ndarray


def _normalized(x, axis=-1):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-30)


def _weighted(test, weights, unit: bool) -> jax.Array:
  """[C, M, D] -> [M, C * D]: checkpoint c's rows times weights[c] (unit vectors first)."""
  test = jnp.asarray(test)
  if unit:
    test = _normalized(test)
  return jnp.concatenate(list(test * jnp.asarray(weights, test.dtype)[:, None, None]), 1)


def _float_key(t: jax.Array) -> jax.Array:
  """t with -0.0 made +0.0 and NaN made -inf: `lax.top_k` orders floats totally (+0.0 above
  -0.0, NaN first), numpy's sort ties the zeros and puts NaN last."""
  t = jnp.where(t == 0, jnp.zeros_like(t), t)
  return jnp.where(jnp.isnan(t), -jnp.inf, t)


def _int_key(t: jax.Array) -> jax.Array:
  """Integers in the order numpy's sort gives the floats t, NaN below -inf too (negative floats'
  bits, read as integers, run backwards: their magnitude bits flip)."""
  itype = jnp.dtype(f'int{8 * t.dtype.itemsize}')
  bits = jax.lax.bitcast_convert_type(jnp.where(t == 0, jnp.zeros_like(t), t), itype)
  bits = jnp.where(bits < 0, bits ^ jnp.iinfo(itype).max, bits)
  return jnp.where(jnp.isnan(t), jnp.iinfo(itype).min, bits)


def _merge(best_s, best_i, s, i, k: int, sign: int):
  """The k best of (running, new) candidates by sign * score, on the device. `lax.top_k` puts
  the lower position first on ties, so, as a stable sort, lower rows win (running rows precede
  the block's, and are themselves in that order). With a NaN among the scores, integer keys
  rank it below -inf (top_k of integers is a full sort on CPU, far slower than of floats)."""
  s, i = jnp.concatenate([best_s, s], 1), jnp.concatenate([best_i, i], 1)
  t, k = sign * s, min(k, s.shape[1])
  order = jax.lax.cond(jnp.any(jnp.isnan(t)), lambda t: jax.lax.top_k(_int_key(t), k)[1],
                       lambda t: jax.lax.top_k(_float_key(t), k)[1], t)
  return jnp.take_along_axis(s, order, 1), jnp.take_along_axis(i, order, 1)


@functools.partial(jax.jit, static_argnums=4)
def _merge_block(sup, opp, s, start, k: int):
  """Running (scores, rows) [M, <=k] of the most supporting and most opposing training
  examples, merged with a block's scores s [M, rows start...]."""
  i = jnp.broadcast_to(start + jnp.arange(s.shape[1], dtype=jnp.int32), s.shape)
  return _merge(*sup, s, i, k, 1), _merge(*opp, s, i, k, -1)


class GradientStore:
  """A built store, opened read-only (its gradients memory-mapped); queries read it in blocks."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    if not os.path.exists(os.path.join(self.path, META)):
      partial = os.path.join(os.path.dirname(self.path), f'.{os.path.basename(self.path)}.partial')
      hint = ' (a build is unfinished: run build again to resume it)' if os.path.isdir(
          partial) else ''
      raise UserError(f'no gradient store at {path!r}{hint}')
    try:
      self.meta = _read_json(os.path.join(self.path, META))
      if self.meta.get('format') != FORMAT:
        raise UserError(f'{path!r} is not a gradient store of format {FORMAT}')
      self.has_gradients = self.meta.get('gradients', True)
      self._grads = [np.load(os.path.join(self.path, c['file']), mmap_mode='r')
                     for c in self.meta['checkpoints']] if self.has_gradients else None
      ids = self.meta['ids']  # a list in a store written before ids.npy
      self.ids = (np.load(os.path.join(self.path, ids['file']), mmap_mode='r')
                  if isinstance(ids, dict) else np.asarray(ids, np.int64))
    except (OSError, ValueError) as e:
      raise UserError(f'cannot read gradient store {path!r}: {e}') from None
    self.steps = np.asarray([c['step'] for c in self.meta['checkpoints']], np.int64)
    self.lrs = np.asarray([c['learning_rate'] for c in self.meta['checkpoints']], np.float64)
    self._fns = {}

  @property
  def num_examples(self) -> int:
    return int(self.meta['num_examples'])

  @property
  def dim(self) -> int:
    return int(self.meta['dim'])

  def grads(self, c: int) -> np.ndarray:
    """Checkpoint c's projected training gradients [N, D], memory-mapped."""
    return self._gradients()[c]

  def _gradients(self) -> list:
    if not self.has_gradients:
      raise UserError(f'gradient store {self.path!r} was built without training gradients (for '
                      'data value embeddings only): build it with gradients=True')
    return self._grads

  def projection_state(self, loss_fn: PerExampleLoss, params, batch: dict) -> pergrad.FactoredState:
    """The store's factors drawn again for this model (checked against the recorded ones)."""
    p = self.meta['projection']
    state = pergrad.factored_projection(p['k_in'], p['k_out'], p['seed'], p['layers']).init(
        loss_fn, params, jax.tree.map(lambda x: x[:1], batch))
    if json.loads(json.dumps(files.json_safe(state.describe()))) != p:
      raise UserError(f'the model does not match the gradient store {self.path!r}: its projection '
                      f'covers {p["names"]} with shapes {p["shapes"]}, the model gives '
                      f'{list(state.names)} with {state.describe()["shapes"]}')
    return state

  def _check_run(self, run: TrainingRun) -> None:
    """Refuses another run than the store's, or a store without gradients (before any work)."""
    self._gradients()
    if not np.array_equal(np.asarray(run.checkpoint_steps), self.steps) or digest(
        run.checkpoints) != self.meta['checkpoints_digest']:
      raise UserError(f'this run is not the one the gradient store {self.path!r} was built from '
                      f'(its checkpoints are at steps {self.steps.tolist()})')

  def _test_grads(self, loss_fn, run, batch, chunk_size) -> jax.Array:
    """The store's projection of every test example's gradient at every checkpoint, [C, M, D]."""
    state = self.projection_state(loss_fn, run.final_params, batch)
    key = (loss_fn, chunk_size)
    if key not in self._fns:
      self._fns[key] = _grads_fn(loss_fn, chunk_size)
    return self._fns[key](run.checkpoints, batch, state)

  def _blocks(self, block_size: int, dtype, normalize: bool = False):
    """(start, stop, [rows, C * D]) blocks of the store, checkpoints side by side."""
    for start in range(0, self.num_examples, block_size):
      stop = min(start + block_size, self.num_examples)
      parts = [jnp.asarray(np.asarray(g[start:stop]), dtype) for g in self._gradients()]
      if normalize:
        parts = [_normalized(x) for x in parts]
      yield start, stop, jnp.concatenate(parts, 1)

  def _contract(self, test, weights, block_size, unit_train=False, unit_test=False):
    """sum_c weights_c <train_ic, test_jc> for all i, j: [N, M] (each side made unit vectors
    per checkpoint with `unit_train`, `unit_test`)."""
    w = _weighted(test, weights, unit_test)
    out = np.zeros((self.num_examples, w.shape[0]), w.dtype)
    for start, stop, g in self._blocks(block_size, w.dtype, unit_train):
      out[start:stop] = np.asarray(g @ w.T)
    return out

  def self_influence(self, block_size: int = 65536) -> np.ndarray:
    """TracIn self-influence sum_c lr_c ||g_ic||^2 of every stored example, [N] (float64)."""
    out, grads = np.zeros(self.num_examples), self._gradients()
    for start in range(0, self.num_examples, block_size):
      for lr, g in zip(self.lrs, grads):
        x = np.asarray(g[start:start + block_size], np.float64)
        out[start:start + len(x)] += lr * np.sum(x * x, 1)
    return out

  def tracin(self, loss_fn: PerExampleLoss, run: TrainingRun, test_batch: dict,
             cosine: bool = False, block_size: int = 4096, chunk_size: Optional[int] = 64):
    """TracInCP train x test, [N, M]: sum_c lr_c <g_ic, g_test_jc> (cosines with `cosine`);
    only the M test gradients are computed."""
    self._check_run(run)
    test = self._test_grads(loss_fn, run, test_batch, chunk_size)
    return self._contract(test, self.lrs, block_size, cosine, cosine)

  def heldout_influence(self, loss_fn: PerExampleLoss, run: TrainingRun, heldout: dict,
                        cosine: bool = False, block_size: int = 4096) -> np.ndarray:
    """sum_c lr_c <g_ic, v_c>, v_c = the projected mean held-out gradient at theta_c (one
    backward pass each), [N]; `cosine` divides by both projected norms (TracIn 'heldout_cos')."""
    self._check_run(run)
    state = self.projection_state(loss_fn, run.final_params, heldout)
    v = jax.jit(jax.vmap(lambda p: pergrad.project_params(
        state, pergrad.mean_grad(loss_fn, p, heldout))))(run.checkpoints)
    return self._contract(v[:, None], self.lrs, block_size, cosine, cosine)[:, 0]

  def mimic(self, loss_fn: PerExampleLoss, run: TrainingRun, ref_params, cosine: bool = False,
            block_size: int = 4096) -> np.ndarray:
    """Offline Mimic scores against a (new) reference model: mean over checkpoints of
    <-g_ic, P(theta_ref - theta_c)> / ||theta_ref - theta_c|| over the projected layers (the
    norm exact, the dot product projected); `cosine` also divides by the projected ||g_ic||, [N]."""
    self._check_run(run)
    batch = jax.tree.map(lambda x: x[0, :1], run.batches)
    state = self.projection_state(loss_fn, run.final_params, batch)

    def direction(p):
      diff = jax.tree.map(jnp.subtract, ref_params, p)
      norm = optax.tree.norm(pergrad.dense_matrices(state, diff))
      return -pergrad.project_params(state, diff) / jnp.maximum(norm, 1e-30)

    v = jax.jit(jax.vmap(direction))(run.checkpoints)[:, None]
    weights = np.full(len(self.lrs), 1.0 / len(self.lrs))
    return self._contract(v, weights, block_size, unit_train=cosine)[:, 0]

  def top_k(self, loss_fn: PerExampleLoss, run: TrainingRun, test_batch: dict, k: int,
            cosine: bool = False, block_size: int = 4096, test_block_size: int = 1024,
            chunk_size: Optional[int] = 64) -> TopK:
    """For each test example its k most supporting and k most opposing training examples by
    TracInCP score, keeping a running top-k over training blocks on the device: memory is
    [test_block_size, block_size + k], never [M, N]."""
    if k < 1:
      raise UserError(f'top_k needs k >= 1, got {k}')
    self._check_run(run)
    k = min(k, self.num_examples)
    m = jax.tree.leaves(test_batch)[0].shape[0]
    parts = []
    for t0 in range(0, m, test_block_size):
      tb = jax.tree.map(lambda x: x[t0:t0 + test_block_size], test_batch)
      w = _weighted(self._test_grads(loss_fn, run, tb, chunk_size), self.lrs, cosine)
      rows = w.shape[0]
      sup = (jnp.zeros((rows, 0), w.dtype), jnp.zeros((rows, 0), jnp.int32))
      opp = sup
      for start, _, g in self._blocks(block_size, w.dtype, cosine):
        sup, opp = _merge_block(sup, opp, w @ g.T, np.int32(start), k)
      parts.append(jax.device_get((sup, opp)))
    cat = lambda xs: np.concatenate(xs, 0)
    return TopK(self.ids[cat([p[0][1] for p in parts])], cat([p[0][0] for p in parts]),
                self.ids[cat([p[1][1] for p in parts])], cat([p[1][0] for p in parts]))

  # --------------------------------------------------------------------------- data value embedding

  def add_dvemb(self, task: Task, run: TrainingRun, curvature: str = 'gauss_newton',
                chunk_size: Optional[int] = 64) -> 'GradientStore':
    """Stores data value embeddings [N, D] of `run` (a run with a checkpoint before every step;
    its batches' `index` = store rows) in the store's projection (per-example gradients formed,
    then projected: `pergrad.factored_transform`), so a test set costs one test direction."""
    batch = jax.tree.map(lambda x: x[0, :1], run.batches)
    state = self.projection_state(task.per_example_loss, run.final_params, batch)
    emb = jax.jit(lambda r: dvemb.embed(task, r, self.num_examples,
                                        pergrad.factored_transform(state), curvature, 1,
                                        chunk_size))(run)
    ids, rows = np.asarray(emb.ids), np.asarray(emb.example)
    real = ids < self.num_examples
    if self.meta.pop('dvemb', None) is not None:  # while the file is replaced, no meta.json
      files.write_json(os.path.join(self.path, META), self.meta)  # says it is another run's
    with files.atomic_path(os.path.join(self.path, DVEMB)) as tmp:  # zeros, then the run's rows
      out = files.open_memmap(tmp, 'w+', np.dtype(self.meta['dtype']),
                              (self.num_examples, rows.shape[1]))
      out[ids[real]] = rows[real]
      out.flush()
      del out
    self.meta['dvemb'] = {'file': DVEMB, 'curvature': curvature, 'steps': int(run.num_steps),
                          'final_params_digest': digest(run.final_params)}
    files.write_json(os.path.join(self.path, META), self.meta)
    return self

  def dvemb_values(self, loss_fn: PerExampleLoss, final_params, test_batch: dict,
                   block_size: int = 65536) -> np.ndarray:
    """<e_i, P(grad of the mean test loss at the embedding run's final params)>, [N]: the
    predicted rise of the test loss were example i removed (higher = more useful)."""
    info = self.meta.get('dvemb')
    if info is None:
      raise UserError(f'gradient store {self.path!r} has no data value embeddings (add_dvemb)')
    if digest(final_params) != info['final_params_digest']:
      raise UserError('these are not the final parameters of the run the embeddings were made from')
    state = self.projection_state(loss_fn, final_params, test_batch)
    d = jax.jit(lambda p: pergrad.project_params(
        state, pergrad.mean_grad(loss_fn, p, test_batch)))(final_params)
    emb_path = os.path.join(self.path, info['file'])
    try:
      emb = np.load(emb_path, mmap_mode='r')
    except (OSError, ValueError) as e:  # (cut short, or not a .npy file)
      raise UserError(f'cannot read gradient store {self.path!r}: {emb_path!r}: {e}') from None
    if emb.shape != (self.num_examples, *d.shape):
      raise UserError(f'cannot read gradient store {self.path!r}: {emb_path!r} holds an array of '
                      f'shape {emb.shape}, not its {self.num_examples} embeddings of {d.shape}')
    out = np.zeros(self.num_examples, d.dtype)
    for start in range(0, self.num_examples, block_size):
      out[start:start + block_size] = np.asarray(
          jnp.asarray(np.asarray(emb[start:start + block_size]), d.dtype) @ d)
    return out
