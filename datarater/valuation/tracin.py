"""TracIn / TracInCP (Pruthi et al. 2020) on the shared per-example gradient layer.

TracInCP(z, z') = sum_c lr_c <grad l(z; theta_c), grad l(z'; theta_c)> over saved checkpoints c
(lr_c the nominal learning rate: exact for plain SGD, the paper's heuristic for other optimizers).
- self-influence (z = z'): large for mislabelled / noisy examples (their gradients stay large);
- held-out influence: z' ranges over a held-out set, i.e. <g(z), mean held-out gradient>, one JVP
  per checkpoint for all examples; `cosine=True` divides by both norms ("Grad-Cos"), so a few large
  mislabelled gradients do not dominate every ranking;
- `layers` restricts gradients to chosen layers, `projection` to a random k-dim sketch.
"""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from datarater import pergrad
from datarater.errors import UserError
from datarater.tasks import PerExampleLoss, batch_size_of
from datarater.valuation.base import Valuation, stack_trees

MODES = ('self', 'heldout', 'heldout_cos')


def _prefix(layers, projection):
  ts = [pergrad.select(layers)] if layers is not None else []
  if projection is not None:
    ts.append(projection)
  return ts


def self_influence(loss_fn: PerExampleLoss, checkpoints, lrs: jax.Array, batch: dict,
                   layers: Optional[Sequence[str]] = None,
                   projection: Optional[pergrad.GradTransform] = None,
                   chunk_size: Optional[int] = 64, ghost: bool = False) -> jax.Array:
  """sum_c lr_c ||grad l(z_i; theta_c)||^2 (over `layers`, after `projection`), [B].

  `ghost=True` takes the norms of Dense-layer gradients from activations and output gradients
  (exact, no per-example gradient formed; no projection).
  """
  if ghost and projection is not None:
    raise UserError('ghost self-influence is exact: it takes no projection')
  t = pergrad.chain(*_prefix(layers, projection), pergrad.sq_norm())

  def body(acc, c):
    params, lr = c
    if ghost:
      return acc + lr * pergrad.ghost_sq_norms(loss_fn, params, batch, layers), None
    return acc + lr * pergrad.per_example(loss_fn, params, batch, t, chunk_size=chunk_size), None

  init = jnp.zeros(batch_size_of(batch), lrs.dtype)
  return jax.lax.scan(body, init, (checkpoints, lrs))[0]


def heldout_direction(loss_fn: PerExampleLoss, params, heldout: dict,
                      layers: Optional[Sequence[str]] = None):
  """v = the mean held-out gradient at `params` (restricted to `layers`)."""
  return pergrad.masked(pergrad.mean_grad(loss_fn, params, heldout), layers)


def heldout_influence(loss_fn: PerExampleLoss, checkpoints, lrs: jax.Array, batch: dict,
                      heldout: dict, layers: Optional[Sequence[str]] = None, cosine: bool = False,
                      chunk_size: Optional[int] = 64, directions=None,
                      ghost: bool = False) -> jax.Array:
  """sum_c lr_c <g_i, v_c> (or cos(g_i, v_c)), v_c = mean held-out gradient at theta_c, [B].

  Positive: a step on z_i lowers the held-out loss (a proponent). Dots come from one JVP each.
  `directions`: the v_c stacked [C, ...] if already computed (else from `heldout` here).
  `ghost=True` (Dense `layers`: `pergrad.ghost_covers`) takes the cosine's norms ||g_i|| from
  activations and output gradients (exact, no per-example gradient formed).
  """
  norm_t = pergrad.chain(*_prefix(layers, None), pergrad.sq_norm())
  if directions is None:
    directions = jax.lax.map(lambda p: heldout_direction(loss_fn, p, heldout, layers), checkpoints)

  def body(acc, c):
    params, lr, v = c
    d = pergrad.jvp_dots(loss_fn, params, batch, v, chunk_size, layers)
    if cosine:
      if ghost:
        n = jnp.sqrt(pergrad.ghost_sq_norms(loss_fn, params, batch, layers))
      else:
        n = jnp.sqrt(pergrad.per_example(loss_fn, params, batch, norm_t, chunk_size=chunk_size))
      d = d / jnp.maximum(n * optax.tree.norm(v), 1e-30)
    return acc + lr * d, None

  init = jnp.zeros(batch_size_of(batch), lrs.dtype)
  return jax.lax.scan(body, init, (checkpoints, lrs, directions))[0]


class TracIn(Valuation):
  """TracIn over accumulated checkpoints. mode: 'self' (self-influence; high = suspicious, so
  `value` is its negative), 'heldout' or 'heldout_cos' (influence on `heldout`; high = useful).
  `ghost=True` where Dense layers hold the parameters of `layers` (`pergrad.ghost_covers`) skips
  per-example gradients: self-influence and the norms of 'heldout_cos' come from activations and
  output gradients."""
  name = 'tracin'

  def __init__(self, loss_fn: PerExampleLoss, mode: str = 'self', heldout: Optional[dict] = None,
               layers: Optional[Sequence[str]] = None,
               projection: Optional[pergrad.GradTransform] = None, chunk_size: int = 64,
               ghost: bool = False):
    super().__init__()
    if mode not in MODES:
      raise UserError(f'unknown TracIn mode {mode!r} (choose from {", ".join(MODES)})')
    if mode != 'self' and heldout is None:
      raise UserError(f'TracIn mode {mode!r} needs a held-out batch')
    self.loss_fn, self.mode, self.heldout = loss_fn, mode, heldout
    self.layers, self.projection, self.chunk_size = layers, projection, chunk_size
    self.ghost = ghost
    self.higher_is_better = mode != 'self'
    self.name = f'tracin_{mode}'
    self._directions = []  # held-out modes: v_c of each checkpoint, computed once when taken
    self._direction = jax.jit(lambda p, h: heldout_direction(loss_fn, p, h, layers))

  def accumulate(self, params, learning_rate: float) -> 'TracIn':
    if self.mode != 'self':
      self._directions.append(self._direction(params, self.heldout))
    return super().accumulate(params, learning_rate)

  def score(self, batch: dict) -> jax.Array:
    ckpts, lrs = self.stacked()
    if self.mode == 'self':
      return self_influence(self.loss_fn, ckpts, lrs, batch, self.layers, self.projection,
                            self.chunk_size, self.ghost)
    directions = stack_trees(self._directions)
    return heldout_influence(self.loss_fn, ckpts, lrs, batch, self.heldout, self.layers,
                             self.mode == 'heldout_cos', self.chunk_size, directions, self.ghost)
