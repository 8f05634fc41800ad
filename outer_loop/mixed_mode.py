"""Mixed-mode meta-gradients (MixFlow-MG style): a custom backward pass through the inner unroll.

`make_mixed_unroll(...)` returns an unroll of the same T weighted inner steps as
`inner_loop.unroll.unroll`, under a `jax.custom_vjp` whose backward pass never differentiates a
gradient in reverse mode. Each step
theta' = theta + u(g, s, theta), s' = ... with g = grad_theta L(theta, w), w = w(phi), L the
weighted loss, pulls the cotangent back as:
  - (g, s, theta) <- (theta', s'): `jax.vjp` of the optimizer update (elementwise, any optax),
  - theta <- g: H v = jvp(grad_theta L, theta; v)  (forward-over-reverse, H symmetric),
  - w <- g: d/dw <grad_theta L, v> = the w-part of the same jvp of grad_(theta, w) L
    (mixed partials commute), so one forward-over-reverse call gives both terms,
  - phi <- w: `jax.vjp` of the rater weights (a first-order product).
No step's activations outlive that step. What differs is how the backward pass gets each step's
inner state (params, optimizer state) back, `recompute`:
  - 'invert': run the optimizer backwards (`inner_loop.optimizers.StepInverse`; momentum, Adam):
    theta_t from state t+1, then s_t from g_t, which the jvp above computes anyway. Each segment
    of S steps (default 16, to bound round-off drift) is undone from an exact end state:
    `boundaries='replay'` recomputes it from the input state when the backward pass reaches it
    (nothing stored, so memory does not depend on T; the end state at step t costs t extra
    steps: none for T <= S + 4, 16 at T = 32, ~T^2 / 2S for long unrolls), 'keep' stores the
    T / S of them in the forward pass (no extra steps, memory grows with T). The optimizer's
    first `inverse.exact_steps` steps are replayed from the exact input state instead (Adam: 4,
    i.e. 6 extra steps; momentum: none): a fresh Adam state cannot be undone accurately in
    float32. Where the optimizer has a closed-form step VJP (`StepInverse.step_vjp`: Adam), it
    replaces `jax.vjp` of the update.
  - 'replay': exact states kept every S = round(sqrt(T)) steps; a step's state is recomputed
    from its segment start when needed (S(S-1)/2 extra steps per segment, T / S carries).
  - 'store': as 'replay', but a segment's S states are recomputed once and kept (S extra steps
    per segment, T / S + S carries).
'replay' and 'store' equal plain reverse mode up to float round-off; 'invert' adds round-off of
the undone steps (tests/test_meta_modes.py; bench/meta_memory.py measures it in float32).
"""
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from inner_loop.optimizers import StepInverse
from inner_loop.unroll import InnerState, PerExampleLoss, inner_step, weighted_loss

WeightsFn = Callable[[Any, dict], jax.Array]  # (phi, batch) -> weights [B]
RECOMPUTE = ('invert', 'replay', 'store')
BOUNDARIES = ('replay', 'keep')  # invert: how the exact segment ends are had (see module doc)
INVERT_CHECKPOINT_EVERY = 16  # invert: segments undone from an exact end every S steps (drift)


def default_segment(steps: int, recompute: str = 'replay') -> int:
  """Steps between stored exact states.

  'replay' / 'store': round(sqrt(T)), which balances T / S stored states against the S steps
  recomputed per segment. 'invert' recomputes nothing, so S only bounds round-off drift.
  """
  if recompute == 'invert':
    return min(steps, INVERT_CHECKPOINT_EVERY)
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


def _after(tree, dep):
  """`tree` made to depend on `dep` (value unchanged unless `dep` is not finite).

  XLA schedules work as early as its inputs allow: a boundary state replayed from the input would
  be computed before the segment after it is undone, and kept live meanwhile (as much memory as
  storing it). Tying it to that segment's cotangents keeps it where it is used.
  """
  zero = 0 * jax.tree.leaves(dep)[0].ravel()[0]
  return jax.tree.map(lambda x: x + zero.astype(x.dtype) if _is_float(x) else x, tree)


def make_mixed_unroll(loss_fn: PerExampleLoss, optimizer: optax.GradientTransformation,
                      weights_fn: WeightsFn, segment: Optional[int] = None,
                      recompute: str = 'replay', inverse: Optional[StepInverse] = None,
                      boundaries: str = 'replay'):
  """Returns `unroll(phi, state, batches) -> (final state, losses [T])` with the mixed-mode VJP.

  `weights_fn(phi, batch)` gives the loss weights of a batch; `batches` leaves are [T, B, ...].
  `recompute` is how a step's inner state is recovered on the way back (see the module doc);
  'invert' needs `inverse`, the optimizer's `StepInverse`. `segment` is S, the steps between
  stored exact states (None: `default_segment(T, recompute)`).
  """
  if recompute not in RECOMPUTE:
    raise ValueError(f'unknown recompute {recompute!r} (choose from {", ".join(RECOMPUTE)})')
  if recompute == 'invert' and inverse is None:
    raise ValueError("recompute='invert' needs the inner optimizer's StepInverse")
  if boundaries not in BOUNDARIES:
    raise ValueError(f'unknown boundaries {boundaries!r} (choose from {", ".join(BOUNDARIES)})')

  def step(phi, state, batches, t):
    batch = _at(batches, t)
    return inner_step(loss_fn, optimizer, state, batch, weights_fn(phi, batch))

  def run_steps(phi, state, batches, first, length):
    """Steps first .. first + length - 1; returns (state, losses [length])."""
    return jax.lax.scan(lambda s, i: step(phi, s, batches, first + i), state,
                        jnp.arange(length))

  def run(phi, state, batches):
    return run_steps(phi, state, batches, 0, jax.tree.leaves(batches)[0].shape[0])

  def replay(phi, state, batches, first, length):
    """Steps first .. first + length - 1 (`length` may be traced) rerun from `state`."""
    return jax.lax.fori_loop(0, length, lambda k, s: step(phi, s, batches, first + k)[0], state)

  replay_boundaries = recompute == 'invert' and boundaries == 'replay'

  def plan(batches):
    """(head, part, S, n): the unroll is head + part + n * S steps.

    The head is replayed from the exact initial state: all of T % S for replay/store; for invert
    the optimizer's first `inverse.exact_steps` steps, where a fresh state is too ill-conditioned
    to undo in float32 (Adam: tiny v makes d update / d g ~ 1 / sqrt(eps_root)). An invert part
    of fewer than S steps is undone from its exact end, like the n segments of S steps.
    """
    steps = jax.tree.leaves(batches)[0].shape[0]
    if recompute != 'invert':
      seg = min(segment or default_segment(steps, recompute), steps)
      return steps % seg, 0, seg, steps // seg
    head = min(steps, inverse.exact_steps)
    seg = max(1, min(segment or default_segment(steps, recompute), steps - head))
    n = (steps - head) // seg
    return head, steps - head - n * seg, seg, n

  def fwd(phi, state, batches):
    """Runs the unroll; keeps the exact states the backward pass starts its segments from."""
    head, part, seg, n = plan(batches)
    losses = []
    s = state
    for first, length in ((0, head), (head, part)):
      if length:
        s, piece = run_steps(phi, s, batches, first, length)
        losses.append(piece)
    state_p = s  # exact end of the invert part (start of the n segments)
    first = head + part
    # replay/store walk a segment forward from its start; invert walks it back from its end.
    keep = (lambda s, s_next: s) if recompute != 'invert' else (lambda s, s_next: s_next)

    def segment_fwd(s, j):
      s_next, piece = run_steps(phi, s, batches, first + j * seg, seg)
      return s_next, (keep(s, s_next), piece)
    # invert: the last segment's end is the output itself, so it is not stacked a second time;
    # with boundaries replayed none is.
    stacked = n if recompute != 'invert' else 0 if replay_boundaries else max(n - 1, 0)
    s, (kept, pieces) = jax.lax.scan(segment_fwd, s, jnp.arange(stacked))
    losses.append(pieces.reshape(-1))
    if stacked < n:
      s, piece = run_steps(phi, s, batches, first + stacked * seg, (n - stacked) * seg)
      losses.append(piece)
    final = s
    boundary_needed = n > 1 or (part and n)
    residuals = (phi, state if head or (replay_boundaries and boundary_needed) else None,
                 state_p if part and n and not replay_boundaries else None, kept, final, batches)
    return (final, jnp.concatenate(losses)), residuals

  def update_vjp(g, state, opt_next, ct_next):
    """(d/dg, d/d opt_state, d/d params) of the optimizer update, from d/d(state after it).

    The optimizer's closed form (`StepInverse.step_vjp`) when it has one: written on the state
    after the step, elementwise, so XLA updates the cotangents in place without intermediates;
    otherwise `jax.vjp` of the optax update. `opt_next` is the state after the step, if known.
    """
    if inverse is not None and inverse.step_vjp is not None:
      if opt_next is None:
        opt_next = optimizer.update(g, state.opt_state, state.params)[1]
      return inverse.step_vjp(opt_next, g, ct_next)

    def update(g, opt_state, params):
      updates, opt_state = optimizer.update(g, opt_state, params)
      return InnerState(optax.apply_updates(params, updates), opt_state)
    _, vjp = jax.vjp(update, g, state.opt_state, state.params)
    return vjp(_to_cotangent(ct_next, state))

  def step_bwd(phi, batch, ct_next, ct_loss, state=None, state_next=None):
    """Pulls (d/d state', d/d loss) back through one step: (d/d state, d/d phi, state).

    Given the step's input `state`, or (invert) its output `state_next`, from which the input
    is recovered with the gradient the forward-over-reverse product computes anyway.
    """
    weights, weights_vjp = jax.vjp(lambda p: weights_fn(p, batch), phi)
    params = state.params if state is not None else inverse.params(state_next.params,
                                                                    state_next.opt_state)
    grads_fn = lambda theta: jax.grad(weighted_loss, argnums=(1, 3))(  # (d/dtheta, d/dw) of L
        loss_fn, theta, batch, weights)
    (g, g_w), hvp = jax.linearize(grads_fn, params)
    opt_next = None
    if state is None:
      opt_next = state_next.opt_state
      state = InnerState(params, inverse.opt_state(opt_next, g))
    ct_g, ct_opt, ct_params = update_vjp(g, state, opt_next, ct_next)
    h_v, cross_v = hvp(ct_g)  # forward-over-reverse: (H ct_g, d/dw <grad_theta L, ct_g>)
    ct_params = jax.tree.map(lambda a, b, c: a + b + ct_loss * c, ct_params, h_v, g)
    ct_phi, = weights_vjp(cross_v + ct_loss * g_w)
    return _to_carry(InnerState(ct_params, ct_opt), state), ct_phi, state

  def segment_bwd(phi, exact, batches, ct_losses, first, length, carry, how=recompute):
    """Steps first .. first + length - 1 in reverse. `exact` is the segment's exact start state
    (how = replay, store) or end state (invert)."""
    add = lambda a, b: jax.tree.map(jnp.add, a, b)
    if how == 'invert':
      def backward(c, i):
        (ct_state, ct_phi), state_next = c
        t = first + i
        ct_state, ct_phi_t, state = step_bwd(phi, _at(batches, t), ct_state, ct_losses[t],
                                             state_next=state_next)
        return ((ct_state, add(ct_phi, ct_phi_t)), state), None
      (carry, _), _ = jax.lax.scan(backward, (carry, exact), jnp.arange(length), reverse=True)
      return carry

    if how == 'replay':
      state_at = lambda i, states: replay(phi, exact, batches, first, i)
      states = None
    else:
      # All `length` steps, though the last one's result is unused (no concatenated copy).
      _, states = jax.lax.scan(lambda s, i: (step(phi, s, batches, first + i)[0], s), exact,
                               jnp.arange(length))
      state_at = lambda i, states: _at(states, i)

    def backward(carry, i):
      ct_state, ct_phi = carry
      t = first + i
      ct_state, ct_phi_t, _ = step_bwd(phi, _at(batches, t), ct_state, ct_losses[t],
                                       state=state_at(i, states))
      return (ct_state, add(ct_phi, ct_phi_t)), None
    carry, _ = jax.lax.scan(backward, carry, jnp.arange(length), reverse=True)
    return carry

  def bwd(res, cts):
    phi, state0, state_p, kept, final, batches = res
    ct_final, ct_losses = cts
    head, part, seg, n = plan(batches)
    first = head + part
    carry = (_to_carry(ct_final, final), jax.tree.map(jnp.zeros_like, phi))
    segments = n
    if recompute == 'invert' and n:
      # Segment n-1 ends at the output; segment j < n-1 ends at kept state j (or replayed).
      carry = segment_bwd(phi, final, batches, ct_losses, first + (n - 1) * seg, seg, carry)
      segments = n - 1

    def over_segments(carry, j):
      if replay_boundaries:
        exact = replay(phi, _after(state0, carry), batches, 0, first + (j + 1) * seg)
      else:
        exact = jax.tree.map(lambda x: x[j], kept)
      return segment_bwd(phi, exact, batches, ct_losses, first + j * seg, seg, carry), None
    if segments:
      carry, _ = jax.lax.scan(over_segments, carry, jnp.arange(segments), reverse=True)
    if part:
      if n and replay_boundaries:
        state_p = replay(phi, _after(state0, carry), batches, 0, first)
      carry = segment_bwd(phi, state_p if n else final, batches, ct_losses, head, part, carry)
    if head:
      carry = segment_bwd(phi, state0, batches, ct_losses, 0, head, carry, how='replay')
    ct_state, ct_phi = carry
    return ct_phi, _to_cotangent(ct_state, final), None  # None: zero cotangent for batches

  unroll = jax.custom_vjp(run)
  unroll.defvjp(fwd, bwd)
  return unroll
