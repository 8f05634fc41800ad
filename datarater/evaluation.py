"""Scoring a split and measuring how scores separate corrupted examples from clean ones.

`score_split` runs any per-example function over a split in fixed-size padded batches (one
compile), `score_split_shared` the same batches shared out over the processes of a
`jax.distributed` job (`shared_pass`: each its own blocks, then exchanged); `noise_auroc`
measures how well scores rank corrupted examples below clean ones, and `auroc_by_kind` does so
for each recorded kind of corruption against the clean examples.
"""
import contextlib
from typing import Callable

import jax
import numpy as np

from datarater import multihost
from datarater.data import pipeline
from datarater.progress import bar as progress_bar
from datarater.tasks.base import at_least_float32

ScoreFn = Callable[[dict], jax.Array]  # batch -> [B, ...]
# Examples per scoring call: a rater run's scores of its split, and an exported rater's per
# device (`load_rater`'s block). XLA's CPU kernels round by batch shape (a CNN rater's scores in
# blocks of 1024 differ from those in 256 in the last bit), so one shape gives the same bits.
SCORE_BLOCK = 256


def score_split(score_fn: ScoreFn, split, batch_size: int = SCORE_BLOCK, progress: bool = False,
                desc: str = 'scoring', jit: bool = True) -> np.ndarray:
  """score_fn over every example of `split` in fixed-size padded batches, in order: [N, ...].

  Batches carry the split's features and `index` (positions); the last one is padded, so one
  compile serves the whole split. Pass an already-jitted function with `jit=False` when scoring
  repeatedly (e.g. every logging step), so nothing is recompiled. Floats come out in float32 at
  least (a bfloat16 rater's scores too: sklearn's AUROC refuses bfloat16).
  """
  fn = jax.jit(score_fn) if jit else score_fn
  n, out = len(split), []
  with progress_bar(total=n, desc=desc, unit='ex', disable=not progress) as bar:
    for start in range(0, n, batch_size):
      idx = np.arange(start, start + batch_size) % n
      out.append(at_least_float32(np.asarray(fn(split.take(idx))))[:min(batch_size, n - start)])
      bar.update(min(batch_size, n - start))
  return np.concatenate(out)


def score_split_shared(score_fn: ScoreFn, split, desc: str = 'scoring',
                       progress: bool = False) -> np.ndarray:
  """`score_split(score_fn, split)` in float64 [N] (the same padded batches of SCORE_BLOCK
  examples, so the same bits), each process of a `jax.distributed` job scoring every P-th batch
  (`shared_pass`), every process ending with all of them."""
  fn, n = jax.jit(score_fn), len(split)
  scores = np.zeros(n, np.float64)

  def fill(positions, batch):
    if len(positions) < SCORE_BLOCK:  # the split's last block: padded as score_split pads it
      batch = split.take(np.arange(positions[0], positions[0] + SCORE_BLOCK) % n)
    scores[positions] = at_least_float32(np.asarray(fn(batch)))[:len(positions)]
  return shared_pass(split, SCORE_BLOCK, fill, (scores,), desc, progress)[0]


def shared_pass(split, block: int, fill: Callable[[np.ndarray, dict], None], arrays: tuple,
                desc: str, progress: bool = True) -> tuple:
  """One pass over `split` (a `pipeline.Split`, or a streamed `data.source.Source`) shared by the
  processes of a `jax.distributed` job: each calls `fill(positions, batch)` on its own blocks of
  `block` examples (`pipeline.block_starts`), which writes those rows of `arrays` (each [N, ...]),
  then every process gets the arrays whole (`multihost.exchange_blocks`). Ctrl-C or SIGTERM to
  any process, or an error in `fill` on any, stops every process after the block it is in
  (`multihost.StopVote`; the arrays are not exchanged). Process 0 shows its bar (its blocks)."""
  p, num = jax.process_index(), jax.process_count()
  count = len(pipeline.block_starts(len(split), block, p, num))
  desc += " (process 0's batches)" if num > 1 else ''
  with multihost.StopVote(jax.devices(), 0) as vote, progress_bar(
      total=count, desc=desc, unit='batch', leave=False, disable=p > 0 or not progress) as bar:
    # The blocks' read thread ends with the loop, however it is left (`contextlib.closing`).
    with contextlib.closing(split.blocks(block, p, num)) as blocks:
      for done, item in enumerate(multihost.in_rounds(blocks, count), 1):
        if item is not None:
          fill(*item)
          bar.update(1)
        if vote.after(done):
          break
    if num > 1 and vote.stopped_at is None:  # every process gets every block's rows
      arrays = multihost.exchange_blocks(len(split), block, arrays)
  return arrays


def noise_auroc(scores: np.ndarray, is_corrupted: np.ndarray) -> float:
  """P(score of a clean example > score of a corrupted one); 0.5 = no separation, 1 = perfect.
  NaN when either group is empty or a score is not finite."""
  scores, is_corrupted = np.asarray(scores), np.asarray(is_corrupted)
  if is_corrupted.all() or not is_corrupted.any():
    return float('nan')
  if not np.all(np.isfinite(scores)):
    return float('nan')
  # Imported here: load_rater (SCORE_BLOCK) imports this module, and need not import sklearn.
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  return float(roc_auc_score(~is_corrupted, scores))


def auroc_by_kind(scores: np.ndarray, record: np.ndarray, kinds) -> dict[str, float]:
  """{kind: AUROC of the clean examples (record 0) against those of that corruption kind}."""
  scores, record = np.asarray(scores), np.asarray(record)
  out = {}
  for k, kind in enumerate(kinds):
    if k == 0 or not (record == k).any():
      continue
    keep = (record == 0) | (record == k)
    out[kind] = noise_auroc(scores[keep], record[keep] == k)
  return out
