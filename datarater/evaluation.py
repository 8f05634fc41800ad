"""What a user wants to see after training a rater: how it ranks noisy data, and what it buys.

`score_split` runs any score function over a split in fixed-size chunks (one compile);
`noise_auroc` measures how well scores rank corrupted examples below clean ones;
`train_fresh_models` trains new task models with a weighting and reports held-out figures.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from datarater import models
from datarater.data.pipeline import Split, stream_indices
from inner_loop.unroll import init_inner_state, unroll

ScoreFn = Callable[[dict], jax.Array]  # batch -> scores [B]


def score_split(score_fn: ScoreFn, split: Split, batch_size: int = 1024, progress: bool = False,
                desc: str = 'scoring', jit: bool = True) -> np.ndarray:
  """score_fn over every example of `split` in fixed-size padded batches, in order.

  Batches carry `image`, `label` and `index` (the TFDS example id); the last one is padded, so
  one compile serves the whole split. Pass an already-jitted function with `jit=False` when
  scoring repeatedly (e.g. every logging step), so nothing is recompiled.
  """
  fn = jax.jit(score_fn) if jit else score_fn
  n, out = len(split), []
  with tqdm(total=n, desc=desc, unit='ex', disable=not progress) as bar:
    for start in range(0, n, batch_size):
      idx = np.arange(start, start + batch_size) % n
      out.append(np.asarray(fn(split.take(idx)))[:min(batch_size, n - start)])
      bar.update(min(batch_size, n - start))
  return np.concatenate(out)


def noise_auroc(scores: np.ndarray, is_corrupted: np.ndarray) -> float:
  """P(score of a clean example > score of a corrupted one); 0.5 = no separation, 1 = perfect."""
  if is_corrupted.all() or not is_corrupted.any():
    return float('nan')
  return float(roc_auc_score(~is_corrupted, scores))


def train_fresh_models(task, optimizer, weight_fn, train: Split, evals: dict[str, Split], *,
                       steps: int, batch_size: int, num_models: int, seed: int, chunk: int = 100) -> dict:
  """Trains `num_models` fresh task models (vmapped) with `weight_fn`; loss/accuracy per eval split.

  Every weighting compared with the same seed sees the same initialisations and batches.
  """
  image = jnp.asarray(train.image[:1])
  keys = jax.random.split(jax.random.PRNGKey(seed), num_models)
  states = jax.vmap(lambda k: init_inner_state(task.init(k, image), optimizer))(keys)

  def loss_fn(params, batch):
    return models.per_example_loss(task.apply, params, batch)

  @jax.jit
  def run_chunk(states, batches):
    return jax.vmap(lambda s, b: unroll(loss_fn, optimizer, weight_fn, s, b)[0])(states, batches)

  done = 0
  while done < steps:
    n = min(chunk, steps - done)
    idx = np.stack([stream_indices(len(train), done * batch_size, n * batch_size, seed * 1000 + m)
                    .reshape(n, batch_size) for m in range(num_models)])
    states = run_chunk(states, {'image': train.image[idx], 'label': train.label[idx]})
    done += n

  evaluate = jax.jit(jax.vmap(lambda p, b: (jnp.mean(loss_fn(p, b)),
                                            models.accuracy(task.apply, p, b)), in_axes=(0, None)))
  results = {}
  for name, split in evals.items():
    loss, acc = evaluate(states.params, {'image': split.image, 'label': split.label})
    results[name] = {'loss': float(jnp.mean(loss)), 'loss_std': float(jnp.std(loss)),
                     'accuracy': float(jnp.mean(acc)), 'accuracy_std': float(jnp.std(acc))}
  return results
