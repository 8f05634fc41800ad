"""Mixed-mode meta-gradients (MixFlow-MG style): a custom backward pass through the inner unroll.

`make_mixed_unroll(...)` returns an unroll of the same T weighted inner steps as
`inner_loop.unroll.unroll`, under a `jax.custom_vjp` whose backward pass never differentiates a
gradient in reverse mode:

* Forward: only inner-state carries (params, opt_state) are kept, no activations, and only at
  segment starts (every S steps; S = round(sqrt(T)) by default), so stored state grows like T / S.
* Backward: segments are walked in reverse (`lax.scan(reverse=True)`); inside a segment, each
  step's carry is recomputed from the segment start (replay, the default) or the segment's S
  carries are recomputed once and kept. Each step
  theta' = theta + u(g, s, theta), s' = ... with g = grad_theta L(theta, w), w = w(phi), L the
  weighted loss, pulls the cotangent back as:
    - (g, s, theta) <- (theta', s'): `jax.vjp` of the optimizer update (elementwise, any optax),
    - theta <- g: H v = jvp(grad_theta L, theta; v)  (forward-over-reverse, H symmetric),
    - w <- g: d/dw <grad_theta L, v> = the w-part of the same jvp of grad_(theta, w) L
      (mixed partials commute), so one forward-over-reverse call gives both terms,
    - phi <- w: `jax.vjp` of the rater weights (a first-order product).
  Memory per step is one step's activations (live only while that step is processed), not T.

The meta-gradient equals plain reverse mode up to float round-off (tests/test_meta_modes.py).
"""
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from inner_loop.unroll import InnerState, PerExampleLoss, inner_step, weighted_loss

WeightsFn = Callable[[Any, dict], jax.Array]  # (phi, batch) -> weights [B]


def default_segment(steps: int) -> int:
  """Steps between stored carries: round(sqrt(T)) minimises T / S stored + S recomputed."""
  return max(1, int(round(math.sqrt(steps))))


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _to_carry(ct, like):
  """Cotangent tree -> scan-carriable tree: float0 leaves (of integer primals) become 0."""
  return jax.tree.map(lambda c, p: c if _is_float(p) else jnp.zeros((), jnp.float32), ct, like)


def _to_cotangent(carry, like):
  """Scan carry -> cotangent tree for `vjp`: integer primals get float0 zeros."""
  return jax.tree.map(lambda c, p: c if _is_float(p) else np.zeros(np.shape(p), jax.dtypes.float0),
                      carry, like)


def _at(tree, t):
  """Leaves x -> x[t]; indexing (not scanning over xs) avoids transposed copies under vmap."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, t, keepdims=False), tree)


def make_mixed_unroll(loss_fn: PerExampleLoss, optimizer: optax.GradientTransformation,
                      weights_fn: WeightsFn, segment: Optional[int] = None,
                      replay: bool = True):
  """Returns `unroll(phi, state, batches) -> (final state, losses [T])` with the mixed-mode VJP.

  `weights_fn(phi, batch)` gives the loss weights of a batch; `batches` leaves are [T, B, ...].
  `segment` is S, the steps between stored carries (None: `default_segment(T)`).
  `replay=True` (default) keeps no per-segment buffer: step k of a segment is recomputed from
  the segment start when the backward pass reaches it (S(S-1)/2 extra steps per segment, T/S
  stored carries). `replay=False` recomputes a segment once and keeps its S carries (S extra
  steps, T/S + S carries).
  """
  def step(phi, state, batches, t):
    batch = _at(batches, t)
    return inner_step(loss_fn, optimizer, state, batch, weights_fn(phi, batch))

  def run_steps(phi, state, batches, first, length):
    """Steps first .. first + length - 1; returns (state, losses [length])."""
    return jax.lax.scan(lambda s, i: step(phi, s, batches, first + i), state,
                        jnp.arange(length))

  def run(phi, state, batches):
    return run_steps(phi, state, batches, 0, jax.tree.leaves(batches)[0].shape[0])

  def plan(batches):
    steps = jax.tree.leaves(batches)[0].shape[0]
    seg = min(segment or default_segment(steps), steps)
    return steps % seg, seg, steps // seg  # (head steps before the segments, S, n segments)

  def fwd(phi, state, batches):
    head, seg, n = plan(batches)
    state_h, losses_h = run_steps(phi, state, batches, 0, head) if head else (state, None)

    def segment_fwd(s, j):
      s_next, losses = run_steps(phi, s, batches, head + j * seg, seg)
      return s_next, (s, losses)           # keep only the segment's starting carry
    final, (starts, losses_s) = jax.lax.scan(segment_fwd, state_h, jnp.arange(n))
    losses = losses_s.reshape(-1)
    if head:
      losses = jnp.concatenate([losses_h, losses])
    return (final, losses), (phi, state, state_h, starts, batches)

  def step_bwd(phi, state, batch, ct_next, ct_loss):
    """Pulls (d/d state', d/d loss) back through one step: (d/d state, d/d phi)."""
    weights, weights_vjp = jax.vjp(lambda p: weights_fn(p, batch), phi)
    grads_fn = lambda theta: jax.grad(weighted_loss, argnums=(1, 3))(  # (d/dtheta, d/dw) of L
        loss_fn, theta, batch, weights)
    (g, g_w), hvp = jax.linearize(grads_fn, state.params)

    def update(g, opt_state, params):
      updates, opt_state = optimizer.update(g, opt_state, params)
      return InnerState(optax.apply_updates(params, updates), opt_state)
    _, update_vjp = jax.vjp(update, g, state.opt_state, state.params)
    ct_g, ct_opt, ct_params = update_vjp(_to_cotangent(ct_next, state))
    h_v, cross_v = hvp(ct_g)  # forward-over-reverse: (H ct_g, d/dw <grad_theta L, ct_g>)
    ct_params = jax.tree.map(lambda a, b, c: a + b + ct_loss * c, ct_params, h_v, g)
    ct_phi, = weights_vjp(cross_v + ct_loss * g_w)
    return _to_carry(InnerState(ct_params, ct_opt), state), ct_phi

  def segment_bwd(phi, start, batches, ct_losses, first, length, carry):
    """Steps first .. first + length - 1 in reverse, their carries recomputed from `start`."""
    if replay:
      carry_at = lambda i, states: jax.lax.fori_loop(
          0, i, lambda k, s: step(phi, s, batches, first + k)[0], start)
      states = None
    else:
      # All `length` steps, though the last one's result is unused (no concatenated copy).
      _, states = jax.lax.scan(lambda s, i: (step(phi, s, batches, first + i)[0], s), start,
                               jnp.arange(length))
      carry_at = lambda i, states: _at(states, i)

    def backward(carry, i):
      ct_state, ct_phi = carry
      t = first + i
      ct_state, ct_phi_t = step_bwd(phi, carry_at(i, states), _at(batches, t), ct_state,
                                    ct_losses[t])
      return (ct_state, jax.tree.map(jnp.add, ct_phi, ct_phi_t)), None
    carry, _ = jax.lax.scan(backward, carry, jnp.arange(length), reverse=True)
    return carry

  def bwd(res, cts):
    phi, state0, state_h, starts, batches = res
    ct_final, ct_losses = cts
    head, seg, n = plan(batches)
    carry = (_to_carry(ct_final, state0), jax.tree.map(jnp.zeros_like, phi))

    def over_segments(carry, j):
      start = jax.tree.map(lambda x: x[j], starts)
      return segment_bwd(phi, start, batches, ct_losses, head + j * seg, seg, carry), None
    carry, _ = jax.lax.scan(over_segments, carry, jnp.arange(n), reverse=True)
    if head:
      carry = segment_bwd(phi, state0, batches, ct_losses, 0, head, carry)
    ct_state, ct_phi = carry
    return ct_phi, _to_cotangent(ct_state, state0), None  # None: zero cotangent for batches

  unroll = jax.custom_vjp(run)
  unroll.defvjp(fwd, bwd)
  return unroll
