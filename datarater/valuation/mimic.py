"""Grad-Mimic's Mimic score (Huang et al. 2025) on the shared per-example gradient layer.

A reference model theta_ref (same architecture, trained on trusted data) gives at training step t
the direction v = theta_ref - theta_t over chosen layers (default: the model's last layer, as
the authors do). A sample's Mimic score is its negative gradient projected on the unit vector v,
<-g_i, v/||v||> (one JVP for the whole batch); `cosine=True` also divides by ||g_i||.
Online: per-batch weights = B * softmax(scores / temperature) at each training step (the
`mimic` policy, `datarater.policies.weighting`).
Offline: scores averaged over training checkpoints, then a keep/drop filter whose threshold is set
by a two-component Gaussian mixture on the scores or by a keep fraction.
"""
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from datarater import pergrad
from datarater.curation import select
from datarater.errors import UserError
from datarater.tasks import PerExampleLoss, batch_size_of
from datarater.valuation.base import Valuation

Layers = Union[str, Sequence[str], None]  # 'last', a list of layer names, or None for all


def resolve_layers(loss_fn: PerExampleLoss, params, batch: dict, layers: Layers):
  """'last' -> [the model's last layer: of the modules holding parameters, the last whose call
  returns (`pergrad.param_layers`)], or None (all) when the model's top module holds every
  parameter itself (a one-layer model); other values unchanged."""
  if layers == 'last':
    if not pergrad.param_owners(params):  # the top module holds them all: it is the last layer
      return None
    owners = ', '.join(sorted(pergrad.param_owners(params)))
    try:
      names = pergrad.param_layers(loss_fn, params, batch)
    except ValueError as e:
      raise UserError(f"layers='last': {e}; name them in valuation.mimic_layers (layers: "
                      f'{owners})') from None
    if not names:  # plain JAX, or an nnx model of no nnx.Linear: no layer calls to see
      raise UserError("layers='last' found no layer called with parameters (a flax.linen "
                      "module's or an NnxModel's nnx.Linear: a plain JAX model's calls are not "
                      f'seen); name them in valuation.mimic_layers (layers: {owners})')
    return [names[-1]]
  if isinstance(layers, str):
    return [layers]
  return layers


def mimic_scores(loss_fn: PerExampleLoss, params, ref_params, batch: dict,
                 layers: Optional[Sequence[str]], cosine: bool = False,
                 chunk_size: Optional[int] = 64, ghost: bool = False) -> jax.Array:
  """<-grad l_i(theta), u>, u = (theta_ref - theta)/||.|| over `layers`; / ||g_i|| if cosine.
  [B]. `ghost=True` (Dense `layers`: `pergrad.ghost_covers`) takes ||g_i|| from activations and
  output gradients (exact, no per-example gradient formed)."""
  v = pergrad.masked(jax.tree.map(jnp.subtract, ref_params, params), layers)
  u = jax.tree.map(lambda x: x / jnp.maximum(optax.tree.norm(v), 1e-30), v)
  s = -pergrad.jvp_dots(loss_fn, params, batch, u, chunk_size, layers)
  if cosine:
    if ghost:
      sq = pergrad.ghost_sq_norms(loss_fn, params, batch, layers)
    else:
      t = pergrad.chain(pergrad.select(layers), pergrad.sq_norm()) if layers else pergrad.sq_norm()
      sq = pergrad.per_example(loss_fn, params, batch, t, chunk_size=chunk_size)
    s = s / jnp.maximum(jnp.sqrt(sq), 1e-30)
  return s


class Mimic(Valuation):
  """Offline Mimic score: the mean over accumulated checkpoints of each example's score
  (`ghost`: the cosine's norms without per-example gradients, `mimic_scores`)."""
  name = 'mimic'
  higher_is_better = True

  def __init__(self, loss_fn: PerExampleLoss, ref_params, layers: Layers = 'last',
               cosine: bool = False, chunk_size: int = 64, ghost: bool = False):
    super().__init__()
    self.loss_fn, self.ref_params, self.layers = loss_fn, ref_params, layers
    self.cosine, self.chunk_size, self.ghost = cosine, chunk_size, ghost
    self.name = 'mimic_cos' if cosine else 'mimic'

  def score(self, batch: dict) -> jax.Array:
    ckpts, _ = self.stacked()
    layers = resolve_layers(self.loss_fn, self.ref_params, batch, self.layers)

    def body(acc, params):
      return acc + mimic_scores(self.loss_fn, params, self.ref_params, batch, layers, self.cosine,
                                self.chunk_size, self.ghost), None

    init = jnp.zeros(batch_size_of(batch), jnp.result_type(*jax.tree.leaves(ckpts)))
    total = jax.lax.scan(body, init, ckpts)[0]
    return total / len(self._params)


def mimic_filter(scores: np.ndarray, keep_fraction: Optional[float] = None, seed: int = 0,
                 ids: Optional[np.ndarray] = None):
  """(keep mask [N], threshold: the lowest kept score).

  With `keep_fraction`, the top fraction as `launch.filter --keep` keeps it (`select.select_top`:
  exactly round(keep * N), ties broken by id); otherwise every score >= a threshold where a
  two-component Gaussian mixture fitted to the scores makes its higher-mean component the more
  probable one: the start of the unbroken run of such scores (in score order) that holds the first
  of them at or above the lower component's mean. (With unequal widths the wider component is
  also the more probable far out beyond the narrow one; those scores do not set the threshold.)
  """
  scores = np.asarray(scores, np.float64)
  if keep_fraction is not None:
    keep = select.select_top(scores, keep_fraction, ids)
    return keep, float(scores[keep].min())
  # Imported here: every launcher imports this module (policies), most never fit a mixture, and
  # sklearn takes seconds to import on a loaded CPU.
  from sklearn.mixture import GaussianMixture  # pylint: disable=g-import-not-at-top
  gm = GaussianMixture(2, random_state=seed).fit(scores[:, None])
  good = int(np.argmax(gm.means_[:, 0]))
  ordered = np.sort(scores)
  is_good = gm.predict_proba(ordered[:, None])[:, good] >= 0.5
  upper = np.flatnonzero(is_good & (ordered >= gm.means_[:, 0].min()))
  if not upper.size:
    return np.ones(len(scores), bool), float(ordered[0])
  bad_below = np.flatnonzero(~is_good[:upper[0]])
  threshold = float(ordered[bad_below[-1] + 1 if bad_below.size else 0])
  return scores >= threshold, threshold
