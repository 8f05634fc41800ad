"""Mixed-mode meta-gradients (MixFlow-MG style): a custom backward pass through the inner unroll.

`mixed_unroll(inner, recompute, segment)` returns an unroll of the same T weighted inner steps as
`inner_loop.unroll.unroll`, under a `jax.custom_vjp` whose backward pass never differentiates a
gradient in reverse mode. Each step theta' = theta + u(g, s, theta), s' = ... with
g = grad_theta L(theta, w), w = w(phi), L the weighted loss, pulls the cotangent back as:
  - (g, s, theta) <- (theta', s'): the optimizer update's VJP (`update_vjp`),
  - theta <- g: H v = jvp(grad_theta L, theta; v)  (forward-over-reverse, H symmetric),
  - w <- g: d/dw <grad_theta L, v> = the w-part of the same jvp of grad_(theta, w) L
    (mixed partials commute), so one forward-over-reverse call gives both terms,
  - phi <- w: `jax.vjp` of the rater weights (a first-order product).
No step's activations outlive that step. `recompute` is how the backward pass gets each step's
inner state back:
  - 'invert': run the optimizer backwards (`inner_loop.optimizers.StepInverse`; momentum, Adam):
    theta_t from state t+1, then s_t from g_t, which the jvp above computes anyway. Each segment
    of S steps (default 16, to bound round-off drift) is undone from its exact end state, which
    is replayed from the unroll's input when the backward pass reaches it: nothing is stored, so
    memory does not depend on T; the end state at step t costs t extra steps (none while
    T <= S + E: S for momentum, S + 4 for Adam; 16 at T = 32; ~T^2 / 2S for long unrolls). The
    optimizer's first E = `inverse.exact_steps` steps (Adam: 4) are replayed from the exact
    input state instead (E(E-1)/2 extra steps, 6 for Adam): a fresh Adam state cannot be undone
    accurately in float32.
  - 'replay': the start state of every segment of S = round(sqrt(T)) steps is kept; a step's
    state is recomputed from its segment's start when needed (S(S-1)/2 extra steps per segment,
    T / S states kept). Exact up to float round-off; works for any optimizer.
The unroll is split as a `Plan`: `head` steps replayed from the input, a `part` of fewer than S
steps undone from its own exact end (invert only), then `count` segments of `segment` steps.
"""
import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from inner_loop.optimizers import StepInverse
from inner_loop.unroll import InnerState, weighted_loss, weighted_step
from datarater.tasks.base import PerExampleLoss

RECOMPUTE = ('invert', 'replay')
INVERT_SEGMENT = 16  # invert: steps undone from one exact end state (bounds round-off drift)


@dataclasses.dataclass(frozen=True)
class InnerProblem:
  """What one inner step needs: the loss, the optimizer (and its inverse), the weights."""
  loss_fn: PerExampleLoss
  optimizer: optax.GradientTransformation
  weights: Callable[[Any, dict], jax.Array]  # (phi, batch) -> weights [B]: `MetaProblem.weights`
  inverse: Optional[StepInverse] = None


class Plan(NamedTuple):
  """The unroll is head + part + count * segment steps (see the module docstring)."""
  head: int
  part: int
  segment: int
  count: int


def make_plan(steps: int, recompute: str, segment: int = 0, exact_steps: int = 0) -> Plan:
  """How T = `steps` steps are split; `segment` 0 means the mode's default S."""
  if recompute == 'replay':
    seg = min(segment or max(1, int(round(math.sqrt(steps)))), steps)
    return Plan(head=steps % seg, part=0, segment=seg, count=steps // seg)
  head = min(steps, exact_steps)
  seg = max(1, min(segment or min(steps, INVERT_SEGMENT), steps - head))
  count = (steps - head) // seg
  return Plan(head=head, part=steps - head - count * seg, segment=seg, count=count)


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


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _after(tree, dep):
  """`tree` made to depend on `dep` (value unchanged unless `dep` is not finite).

  XLA schedules work as early as its inputs allow: a boundary state replayed from the input would
  be computed before the segment after it is undone, and kept live meanwhile (as much memory as
  storing it). Tying it to that segment's cotangents keeps it where it is used.
  """
  zero = 0 * jax.tree.leaves(dep)[0].ravel()[0]
  return jax.tree.map(lambda x: x + zero.astype(x.dtype) if _is_float(x) else x, tree)


def _num_steps(batches) -> int:
  return jax.tree.leaves(batches)[0].shape[0]


# --------------------------------------------------------------------------------- forward


def step(inner: InnerProblem, phi, state: InnerState, batches, t):
  """Inner step t: (new state, (weighted loss before it, weight ESS)), as `weighted_step`."""
  return weighted_step(inner.loss_fn, inner.optimizer, functools.partial(inner.weights, phi),
                       state, _at(batches, t))


def run_steps(inner: InnerProblem, phi, state, batches, first: int, length: int):
  """Steps first .. first + length - 1; returns (state, (losses, weight ESS), each [length])."""
  return jax.lax.scan(lambda s, i: step(inner, phi, s, batches, first + i), state,
                      jnp.arange(length))


def replay(inner: InnerProblem, phi, state, batches, first, length):
  """The state after steps first .. first + length - 1 (`length` may be traced)."""
  return jax.lax.fori_loop(0, length, lambda k, s: step(inner, phi, s, batches, first + k)[0],
                           state)


class Residuals(NamedTuple):
  phi: Any
  start: Any    # the unroll's input state, if the backward pass replays from it (else None)
  kept: Any     # replay: every segment's start state, leaves [count, ...] (else None)
  final: Any
  batches: Any


def forward(inner: InnerProblem, recompute: str, segment: int, phi, state, batches):
  """Runs the unroll; keeps what the backward pass starts from (see `Residuals`)."""
  plan = make_plan(_num_steps(batches), recompute, segment,
                   inner.inverse.exact_steps if recompute == 'invert' else 0)
  outs, s = [], state  # (losses, weight ESS) of each run of steps
  for first, length in ((0, plan.head), (plan.head, plan.part)):
    if length:
      s, piece = run_steps(inner, phi, s, batches, first, length)
      outs.append(piece)
  first = plan.head + plan.part
  kept = None
  if recompute == 'replay':
    def segment_fwd(s, j):
      s_next, piece = run_steps(inner, phi, s, batches, first + j * plan.segment, plan.segment)
      return s_next, (s, piece)
    s, (kept, pieces) = jax.lax.scan(segment_fwd, s, jnp.arange(plan.count))
    outs.append(jax.tree.map(lambda x: x.reshape(-1), pieces))
  elif plan.count:
    s, piece = run_steps(inner, phi, s, batches, first, plan.count * plan.segment)
    outs.append(piece)
  # invert replays segment ends from the input when there is an end before the last segment's.
  needs_start = plan.head or (recompute == 'invert' and (plan.count > 1 or
                                                         (plan.part and plan.count)))
  residuals = Residuals(phi, state if needs_start else None, kept, s, batches)
  return (s, jax.tree.map(lambda *x: jnp.concatenate(x), *outs)), residuals


# --------------------------------------------------------------------------------- backward


def update_vjp(inner: InnerProblem, g, state: InnerState, opt_next, ct_next):
  """(d/dg, d/d opt_state, d/d params) of the optimizer update, from d/d(state after it).

  The optimizer's closed form (`StepInverse.step_vjp`) when it has one: written on the state
  after the step, elementwise, so XLA updates the cotangents in place without intermediates;
  otherwise `jax.vjp` of the optax update. `opt_next` is the state after the step, if known.
  """
  if inner.inverse is not None and inner.inverse.step_vjp is not None:
    if opt_next is None:
      opt_next = inner.optimizer.update(g, state.opt_state, state.params)[1]
    return inner.inverse.step_vjp(opt_next, g, ct_next)

  def update(g, opt_state, params):
    updates, opt_state = inner.optimizer.update(g, opt_state, params)
    return InnerState(optax.apply_updates(params, updates), opt_state)
  _, vjp = jax.vjp(update, g, state.opt_state, state.params)
  return vjp(_to_cotangent(ct_next, state))


def step_bwd(inner: InnerProblem, phi, batch, ct_next, ct_loss, state=None, state_next=None):
  """Pulls (d/d state', d/d loss) back through one step: (d/d state, d/d phi, state).

  Given the step's input `state`, or (invert) its output `state_next`, from which the input
  is recovered with the gradient the forward-over-reverse product computes anyway.
  """
  weights, weights_vjp = jax.vjp(lambda p: inner.weights(p, batch), phi)
  params = (state.params if state is not None
            else inner.inverse.params(state_next.params, state_next.opt_state))
  # (d/dtheta, d/dw) of the weighted loss L, and its linearisation in theta.
  grads_fn = lambda theta: jax.grad(lambda t, w: weighted_loss(inner.loss_fn, t, batch, w)[0],
                                    argnums=(0, 1))(theta, weights)
  (g, g_w), hvp = jax.linearize(grads_fn, params)
  opt_next = None
  if state is None:
    opt_next = state_next.opt_state
    state = InnerState(params, inner.inverse.opt_state(opt_next, g))
  ct_g, ct_opt, ct_params = update_vjp(inner, g, state, opt_next, ct_next)
  h_v, cross_v = hvp(ct_g)  # forward-over-reverse: (H ct_g, d/dw <grad_theta L, ct_g>)
  # In the params' dtype, the scan carry's (a float32 ct_loss would widen bfloat16 params').
  ct_params = jax.tree.map(lambda a, b, c, p: (a + b + ct_loss * c).astype(p.dtype), ct_params,
                           h_v, g, params)
  ct_phi, = weights_vjp(cross_v + ct_loss * g_w)
  return _to_carry(InnerState(ct_params, ct_opt), state), ct_phi, state


def invert_segment_bwd(inner: InnerProblem, phi, end, batches, ct_losses, first, length, carry):
  """Steps first .. first + length - 1 in reverse, undone from their exact `end` state."""
  def backward(c, i):
    (ct_state, ct_phi), state_next = c
    t = first + i
    ct_state, ct_phi_t, state = step_bwd(inner, phi, _at(batches, t), ct_state, ct_losses[t],
                                         state_next=state_next)
    return ((ct_state, _add(ct_phi, ct_phi_t)), state), None
  (carry, _), _ = jax.lax.scan(backward, (carry, end), jnp.arange(length), reverse=True)
  return carry


def replay_segment_bwd(inner: InnerProblem, phi, start, batches, ct_losses, first, length,
                       carry):
  """Steps first .. first + length - 1 in reverse, each state replayed from the exact `start`."""
  def backward(c, i):
    ct_state, ct_phi = c
    t = first + i
    state = replay(inner, phi, start, batches, first, i)
    ct_state, ct_phi_t, _ = step_bwd(inner, phi, _at(batches, t), ct_state, ct_losses[t],
                                     state=state)
    return (ct_state, _add(ct_phi, ct_phi_t)), None
  carry, _ = jax.lax.scan(backward, carry, jnp.arange(length), reverse=True)
  return carry


def backward(inner: InnerProblem, recompute: str, segment: int, res: Residuals, cts):
  """The custom VJP: (d/d phi, d/d input state, None for the batches)."""
  ct_final, (ct_losses, _) = cts  # the weight ESS is not differentiated
  phi, batches = res.phi, res.batches
  plan = make_plan(_num_steps(batches), recompute, segment,
                   inner.inverse.exact_steps if recompute == 'invert' else 0)
  first, seg = plan.head + plan.part, plan.segment
  carry = (_to_carry(ct_final, res.final), jax.tree.map(jnp.zeros_like, phi))
  if recompute == 'invert':
    if plan.count:  # the last segment ends at the output itself
      carry = invert_segment_bwd(inner, phi, res.final, batches, ct_losses,
                                 first + (plan.count - 1) * seg, seg, carry)

    def over_segments(carry, j):  # segment j ends where segment j + 1 starts: replay to it
      end = replay(inner, phi, _after(res.start, carry), batches, 0, first + (j + 1) * seg)
      return invert_segment_bwd(inner, phi, end, batches, ct_losses, first + j * seg, seg,
                                carry), None
    if plan.count > 1:
      carry, _ = jax.lax.scan(over_segments, carry, jnp.arange(plan.count - 1), reverse=True)
    if plan.part:
      end = (replay(inner, phi, _after(res.start, carry), batches, 0, first) if plan.count
             else res.final)
      carry = invert_segment_bwd(inner, phi, end, batches, ct_losses, plan.head, plan.part,
                                 carry)
  else:
    def over_segments(carry, j):
      start = jax.tree.map(lambda x: x[j], res.kept)
      return replay_segment_bwd(inner, phi, start, batches, ct_losses, first + j * seg, seg,
                                carry), None
    carry, _ = jax.lax.scan(over_segments, carry, jnp.arange(plan.count), reverse=True)
  if plan.head:
    carry = replay_segment_bwd(inner, phi, res.start, batches, ct_losses, 0, plan.head, carry)
  ct_state, ct_phi = carry
  return ct_phi, _to_cotangent(ct_state, res.final), None  # None: zero cotangent for batches


def mixed_unroll(inner: InnerProblem, recompute: str = 'replay', segment: int = 0):
  """`unroll(phi, state, batches) -> (final state, (losses [T], weight ESS [T]))` with the
  mixed-mode VJP.

  `batches` leaves are [T, B, ...]; 'invert' needs `inner.inverse`. `segment` is S (0: default).
  """
  if recompute not in RECOMPUTE:
    raise ValueError(f'unknown recompute {recompute!r} (choose from {", ".join(RECOMPUTE)})')
  if recompute == 'invert' and inner.inverse is None:
    raise ValueError("recompute='invert' needs the inner optimizer's StepInverse")

  def unroll(phi, state, batches):
    return run_steps(inner, phi, state, batches, 0, _num_steps(batches))
  unroll = jax.custom_vjp(unroll)
  unroll.defvjp(functools.partial(forward, inner, recompute, segment),
                functools.partial(backward, inner, recompute, segment))
  return unroll
