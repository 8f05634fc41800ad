"""Data value embedding (Wang et al. 2024): trajectory-specific leave-one-out in one dot product.

Plain SGD on weighted mean batch losses, theta_{t+1} = theta_t - (lr_t/B) sum_j w_j g_j(theta_t)
(w_j as the run recorded them: 1, or B/real for the real examples of an epoch's short last batch
and 0 for its padding). Removing example i from step s adds (lr_s/B) w_i g_i(theta_s)
to theta_{s+1}; to first order that change reaches the final parameters as
    e_{s,i} = (lr_s/B) w_i K_{s+1} g_i(theta_s),   K_{s+1} = prod_{t=T-1..s+1} (I - lr_t H_t),
so the change of any test loss is <grad l_test(theta_T), e_{s,i}>: e is the data value
embedding. H_t, the batch Hessian, is approximated from per-example gradients: by default the
Gauss-Newton matrix (1/B) sum_j w_j sum_c p_jc g_jc g_jc^T (gradients for every label c, weighted
by the model's probabilities: exact Fisher of softmax cross-entropy; needs a classification task),
or the cheaper empirical Fisher (1/B) sum_j w_j g_j g_j^T of the observed labels, or exactly by
Hessian-vector products (unprojected gradients only), or not at all. Otherwise everything is kept
in a k-dim random projection of the gradients (pergrad transforms), so K is k x k and the backward
recursion K_t = K_{t+1} (I - lr_t H_t) is one `lax.scan` in reverse. An example's embedding sums its
occurrences; summing only the steps of one phase (early/middle/late) gives value by phase.
"""
from typing import Optional

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

from jax.flatten_util import ravel_pytree

from datarater import pergrad, tasks
from datarater.errors import UserError
from datarater.tasks import Task
from datarater.valuation.base import TrainingRun, Valuation

CURVATURES = ('gauss_newton', 'empirical_fisher', 'exact', 'none')


@flax.struct.dataclass
class Embeddings:
  """Rows only for the examples the run trained on (`ids`), so memory follows the run, not the
  split; every other example's embedding is 0."""
  step: jax.Array    # [T, B, k]: e_{t,j}, removing the j-th example of step t
  ids: jax.Array     # [R] int, R = min(T * B, N): the run's examples, sorted, then N (unused)
  example: jax.Array  # [R, k]: example ids[r]'s embedding, summed over its occurrences
  phase: jax.Array    # [P, R, k]: the same sum restricted to each of P equal phases

  def rows(self, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(row of each example in `index`, whether it has one): its embedding is example[row]."""
    row = jnp.clip(jnp.searchsorted(self.ids, index), 0, self.ids.shape[0] - 1)
    return row, self.ids[row] == index


def _curvature(task, params, batch, weights, grads, transform, state, curvature, chunk_size):
  """H_t [k, k], the weighted batch-mean loss's curvature in the projection, approximated as
  `curvature` ('gauss_newton' or 'empirical_fisher') says."""
  loss_fn = task.per_example_loss
  b = grads.shape[0]
  if curvature == 'empirical_fisher':  # (1/B) sum_j w_j g_j g_j^T with the observed labels
    return (grads.T * weights[None, :]) @ grads / b
  # For softmax cross-entropy the Gauss-Newton matrix is the model's Fisher:
  # (1/B) sum_j w_j sum_c p_jc g_jc g_jc^T, g_jc the gradient had the label been c,
  # p_jc = e^-l_jc.
  def per_class(acc, c):
    labels = task.labels(batch)
    relabelled = task.with_labels(batch, jnp.full_like(labels, c))
    g = pergrad.per_example(loss_fn, params, relabelled, transform, state, chunk_size)
    p = jnp.exp(-loss_fn(params, relabelled)) * weights
    return acc + (g.T * p[None, :]) @ g / b, None
  k = grads.shape[1]
  return jax.lax.scan(per_class, jnp.zeros((k, k), grads.dtype), jnp.arange(task.num_classes))[0]


def _k_times_exact_hessian(task, params, batch, weights, kmat):
  """K H_t, H_t the exact Hessian of the weighted batch-mean loss at `params`: rows of K are
  parameter-space vectors (unprojected), (K H)_r = H K_r by a Hessian-vector product."""
  loss_fn = task.per_example_loss
  flat, unravel = ravel_pytree(params)
  grad_fn = jax.grad(lambda v: jnp.mean(weights * loss_fn(unravel(v), batch)))
  hvp = lambda r: jax.jvp(grad_fn, (flat,), (r.astype(flat.dtype),))[1]  # K's rows: float32
  return jax.lax.map(hvp, kmat, batch_size=min(64, kmat.shape[0]))


def _step_map(h: jax.Array, lr, psd) -> jax.Array:
  """I - lr H for a k x k curvature H, with lr * eigenvalue clipped to [0, 2]: equal to it
  wherever the linearised step is stable (lr lambda <= 2), and never amplifying elsewhere. In a
  k-dim projection H's trace is packed into k directions, so its top eigenvalues exceed the full
  Hessian's, and without the clip K blows up over long runs (a CNN at lr 0.1: inf after ~120 steps
  back).

  The eigendecomposition is skipped when no clip can act: |lambda| <= ||H||_F, so
  lr ||H||_F <= 2 bounds lr lambda above by 2; `psd` (a bool, may be traced) says H is positive
  semi-definite by construction (a Gauss-Newton or empirical Fisher matrix with weights >= 0),
  so with lr >= 0 the clip at 0 would only remove round-off (eigenvalues ~ -eps ||H||), and
  I - lr H is the clipped map up to that round-off."""
  h = (h + h.T) / 2
  eye = jnp.eye(h.shape[0], dtype=h.dtype)

  def clipped(h):
    lam, u = jnp.linalg.eigh(h)
    return eye - (u * jnp.clip(lr * lam, 0.0, 2.0)) @ u.T

  cheap = jnp.logical_and(psd, jnp.logical_and(lr >= 0, lr * jnp.linalg.norm(h) <= 2.0))
  return jax.lax.cond(cheap, lambda h: eye - lr * h, clipped, h)


def embed(task: Task, run: TrainingRun, num_examples: int,
          transform: Optional[pergrad.GradTransform] = None, curvature: str = 'gauss_newton',
          phases: int = 3, chunk_size: Optional[int] = 64) -> Embeddings:
  """Data value embeddings of a recorded run that has a checkpoint before every step.

  One reverse `lax.scan` over the steps: at step t, the (transformed) per-example gradients g_t
  at theta_t give e_t = (lr_t/B) w_t g_t K^T, then K <- K (I - lr_t H_t) (projected curvatures:
  with lr_t times each eigenvalue clipped to [0, 2], `_step_map`). curvature:
  'gauss_newton' (default; a classification task: exact Fisher of a softmax cross-entropy),
  'empirical_fisher' (observed-label g g^T, cheapest), 'exact' (Hessian-vector products;
  unprojected gradients only, K is P x P: tiny models), 'none' (K = I: a first-order value).
  """
  if curvature not in CURVATURES:
    raise UserError(f'unknown curvature {curvature!r} (choose from {", ".join(CURVATURES)})')
  if curvature == 'gauss_newton' and not tasks.num_classes(task):
    raise UserError("curvature 'gauss_newton' needs a classification task (use empirical_fisher)")
  loss_fn = task.per_example_loss
  if run.num_checkpoints != run.num_steps:
    raise UserError(f'data value embedding needs checkpoint_every=1 (the run has '
                    f'{run.num_checkpoints} checkpoints for {run.num_steps} steps)')
  exact = transform is None
  transform = transform or pergrad.flatten()
  if curvature == 'exact' and not exact:
    raise UserError("curvature 'exact' works on unprojected gradients only (transform=None)")
  state = transform.init(jax.eval_shape(lambda: run.final_params))
  k = jax.eval_shape(lambda p: transform.apply(p, state), run.final_params).shape[0]
  # float32 at least: K is a product of up to thousands of steps' maps
  dtype = jnp.promote_types(jnp.result_type(*jax.tree.leaves(run.final_params)), jnp.float32)

  def body(kmat, step):
    params, batch, weights, lr = step
    g = pergrad.per_example(loss_fn, params, batch, transform, state, chunk_size)
    chex.assert_shape(g, (weights.shape[0], k))
    emb = (lr / g.shape[0]) * weights[:, None] * (g @ kmat.T)
    if curvature == 'exact':
      kmat = kmat - lr * _k_times_exact_hessian(task, params, batch, weights, kmat)
    elif curvature != 'none':
      hessian = _curvature(task, params, batch, weights, g, transform, state, curvature,
                           chunk_size)
      kmat = kmat @ _step_map(hessian, lr, jnp.all(weights >= 0))
    return kmat, emb

  _, step = jax.lax.scan(body, jnp.eye(k, dtype=dtype),
                         (run.checkpoints, run.batches, run.weights.astype(dtype), run.step_lrs),
                         reverse=True)
  t, b, _ = step.shape
  index = run.batches['index'].reshape(-1)
  rows = min(t * b, num_examples)  # examples the run can have trained on
  ids = jnp.unique(index, size=rows, fill_value=num_examples)
  row = jnp.searchsorted(ids, index)
  example = jax.ops.segment_sum(step.reshape(t * b, k), row, rows)
  phase_of = jnp.repeat(jnp.arange(t) * phases // t, b)
  phase = jax.ops.segment_sum(step.reshape(t * b, k), phase_of * rows + row,
                              phases * rows).reshape(phases, rows, k)
  return Embeddings(step=step, ids=ids, example=example, phase=phase)


def test_direction(loss_fn, params, test_batch: dict,
                   transform: Optional[pergrad.GradTransform] = None) -> jax.Array:
  """The transformed gradient of the mean test loss at the final params, [k] (linear transforms)."""
  transform = transform or pergrad.flatten()
  state = transform.init(jax.eval_shape(lambda: params))
  return transform.apply(pergrad.mean_grad(loss_fn, params, test_batch), state)


class DataValueEmbedding(Valuation):
  """value(z) = predicted rise of the test loss if z were removed from every step it was in."""
  name = 'dvemb'
  higher_is_better = True

  def __init__(self, task: Task, num_examples: int, test_batch: dict,
               transform: Optional[pergrad.GradTransform] = None,
               curvature: str = 'gauss_newton', phases: int = 3, chunk_size: int = 64):
    super().__init__()
    self.task, self.num_examples, self.test_batch = task, num_examples, test_batch
    self.transform = transform
    self.curvature, self.phases, self.chunk_size = curvature, phases, chunk_size
    self.embeddings: Optional[Embeddings] = None
    self.direction = None
    self._values = None  # [R]: <embedding, direction> of each row of the embeddings

  def accumulate(self, params, learning_rate):
    raise UserError('data value embedding needs the whole recorded run: call fit(run)')

  def fit(self, run: TrainingRun) -> 'DataValueEmbedding':
    def fitted(r, test_batch):  # one program (op by op, each test-direction op compiles alone)
      emb = embed(self.task, r, self.num_examples, self.transform, self.curvature, self.phases,
                  self.chunk_size)
      direction = test_direction(self.task.per_example_loss, r.final_params, test_batch,
                                 self.transform)
      return emb, direction, emb.example @ direction
    self.embeddings, self.direction, self._values = jax.jit(fitted)(run, self.test_batch)
    return self

  def _check(self):
    if self.embeddings is None:
      raise UserError('dvemb: call fit(run) before scoring')

  def score(self, batch: dict) -> jax.Array:
    self._check()
    row, found = self.embeddings.rows(batch['index'])
    return jnp.where(found, self._values[row], 0.0)

  def phase_values(self) -> np.ndarray:
    """[phases, N]: each example's value from the steps of each training phase."""
    self._check()
    ids = np.asarray(self.embeddings.ids)
    real = ids < self.num_examples
    out = np.zeros((self.phases, self.num_examples), np.asarray(self._values).dtype)
    out[:, ids[real]] = np.asarray(self.embeddings.phase @ self.direction)[:, real]
    return out
