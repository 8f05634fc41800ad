"""The one per-example gradient layer every valuation uses (TracIn, Mimic, data value embedding).

A per-example loss `loss_fn(params, batch) -> [B]` (e.g. `Task.per_example_loss`) is turned into:
- `per_example(...)`: each example's gradient passed through a `GradTransform` (select layers,
  flatten, project, norm, dot, normalise), vmapped in chunks of `chunk_size` examples inside a
  `lax.scan`, so at most `chunk_size` full gradients are alive at once however large the batch;
- `jvp_dots(...)`: all B dot products <grad l_i, v> with a fixed vector v from ONE forward-mode JVP,
  never forming a per-example gradient;
- `ghost_dots(...)` / `ghost_sq_norms(...)`: pairwise gradient dot products of Dense layers from
  their inputs a_i and output-gradients g_i, since grad_i(kernel) = a_i g_i^T gives <grad_i, grad_j>
  = (a_i.a_j)(g_i.g_j); the factors are captured with `flax.linen.intercept_methods` (a zero
  perturbation added to each Dense output, as `Module.perturb` does, without editing models),
  and likewise from the nnx.Linear calls of a `tasks.NnxModel` (`tasks.nnx.tapping`);
- `per_example_projected(...)`: a `factored_projection` of Dense-layer gradients (LoGra): per layer
  sum_t (x_it P_in)^T (g_it P_out) from the same captured factors, [B, D], no gradient formed;
  `project_params` maps a parameter-space vector into the same space.

Transforms follow optax's init/apply pattern: `t.init(grads_like) -> state` (shapes suffice, so it
can be built from `jax.eval_shape`), `t.apply(grads_of_one_example, state) -> output`; `chain`
composes them. Random projections are seeded and never hold a P x k matrix: `gaussian_projection`
generates it block by block from the seed inside a scan, `kronecker_projection` projects each
matrix-shaped leaf G [d_in, d_out] as A^T G B with small per-layer factors.
"""
import contextlib
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import optax

from datarater.errors import UserError
from datarater.tasks import PerExampleLoss, at_least_float32, batch_size_of
from datarater.tasks import nnx as nnx_tasks



class GradTransform(NamedTuple):
  """init(grads or their shapes) -> state; apply(one example's grads, state) -> output."""
  init: Callable[[Any], Any]
  apply: Callable[[Any, Any], Any]


# ----------------------------------------------------------------------------- transforms


def identity() -> GradTransform:
  return GradTransform(lambda g: (), lambda g, s: g)


def chain(*transforms: GradTransform) -> GradTransform:
  """Applies transforms in order; each one's init sees the shapes the previous one outputs."""

  def init(grads):
    states, x = [], grads
    for t in transforms:
      state = t.init(x)
      states.append(state)
      x = jax.eval_shape(t.apply, x, state)
    return tuple(states)

  def apply(grads, states):
    for t, s in zip(transforms, states):
      grads = t.apply(grads, s)
    return grads

  return GradTransform(init, apply)


def _path_name(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))))
  return '/'.join(parts)


def _module_path(path) -> str:
  """A parameter's path as its module's names give it, without flax's 'params' collection:
  'block_0/attention/kernel'."""
  name = _path_name(path)
  return name[len('params/'):] if name.startswith('params/') else name


def _in_layer(path: str, layer: str, parameter: bool = False) -> bool:
  """Whether module path 'a/b/c' (or, with `parameter`, the path of parameter 'c' of module 'a/b';
  no 'params/') lies in `layer`: a module's name ('b'; not a parameter's, such as 'kernel') or a
  leading path ('a/b', 'a/b/c': a top-level parameter by its own name). The one rule for a layer
  name, wherever one is taken."""
  modules = path.split('/')[:-1] if parameter else path.split('/')
  return layer in modules or path == layer or path.startswith(layer + '/')


def layer_mask(tree, layers: Optional[Sequence[str]]):
  """A bool pytree: True on leaves in one of `layers` (`_in_layer`; None: all)."""
  if layers is None:
    return jax.tree.map(lambda _: True, tree)
  layers = [layers] if isinstance(layers, str) else list(layers)
  paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  found = {l: False for l in layers}

  def keep(path):
    name = _module_path(path)
    hit = [l for l in layers if _in_layer(name, l, parameter=True)]
    for l in hit:
      found[l] = True
    return bool(hit)

  mask = jax.tree_util.tree_map_with_path(lambda p, _: keep(p), tree)
  missing = [l for l, ok in found.items() if not ok]
  if missing:
    names = sorted({_module_path(p).rsplit('/', 1)[0] for p, _ in paths})
    raise UserError(f'layer {missing[0]!r} not found in the parameters '
                    f'(layers: {", ".join(names)})')
  return mask


def select(layers: Optional[Sequence[str]]) -> GradTransform:
  """Keeps the leaves of the named layers (e.g. ['dense_2']) as a dict path -> array."""

  def pick(grads):
    if layers is None:
      return grads
    mask = layer_mask(grads, layers)
    leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    flags = jax.tree.leaves(mask)
    return {_path_name(p): x for (p, x), f in zip(leaves, flags) if f}

  return GradTransform(lambda g: (), lambda g, s: pick(g))


def flatten() -> GradTransform:
  """The gradient as one vector [P] (leaf order of `jax.tree.leaves`, each leaf row-major)."""
  return GradTransform(lambda g: (), lambda g, s: ravel_pytree(g)[0])


def sq_norm() -> GradTransform:
  return GradTransform(lambda g: (), lambda g, s: optax.tree.norm(g, squared=True))


def normalize(eps: float = 1e-12) -> GradTransform:
  """g / ||g|| (over all leaves): dot products become cosines ("Grad-Cos")."""

  def apply(g, s):
    norm = optax.tree.norm(g)
    return jax.tree.map(lambda x: x / jnp.maximum(norm, eps), g)

  return GradTransform(lambda g: (), apply)


def dot(vector) -> GradTransform:
  """<g, vector> per example by an explicit contraction (see `jvp_dots` for the no-gradient way)."""

  def apply(g, v):
    return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))

  return GradTransform(lambda g: vector, apply)


def _gaussian_block(key, block: int, rows: int, cols: int, dtype) -> jax.Array:
  return jax.random.normal(jax.random.fold_in(key, block), (rows, cols), dtype) / math.sqrt(cols)


def gaussian_projection(dim: int, seed: int = 0, block_size: int = 4096) -> GradTransform:
  """x -> x @ R with R [P, dim] i.i.d. N(0, 1/dim) (so E <xR, yR> = <x, y>), input flattened.

  R is never held: rows [b*block_size, (b+1)*block_size) are drawn from fold_in(seed, b) inside a
  scan, so memory is block_size x dim.
  """
  if dim < 1:
    raise UserError(f'projection dim must be >= 1, got {dim}')

  def apply(g, key):
    x = ravel_pytree(g)[0]
    p = x.shape[0]
    bs = min(block_size, p)
    nblocks = -(-p // bs)
    x = jnp.pad(x, (0, nblocks * bs - p)).reshape(nblocks, bs)

    def body(acc, b):
      return acc + x[b] @ _gaussian_block(key, b, bs, dim, x.dtype), None

    out, _ = jax.lax.scan(body, jnp.zeros((dim,), x.dtype), jnp.arange(nblocks))
    return out

  return GradTransform(lambda g: jax.random.key(seed), apply)


def kronecker_projection(dim_in: int, dim_out: int, seed: int = 0) -> GradTransform:
  """Per-layer structured projection to a vector of sum over leaves of their projected sizes.

  A leaf reshaped to G [d_in, d_out] (last axis = outputs) with d_in*d_out > dim_in*dim_out is
  mapped to A^T G B, A [d_in, dim_in] ~ N(0, 1/dim_in), B [d_out, dim_out] ~ N(0, 1/dim_out): the
  dense equivalent is kron(A, B) on the row-major flattened leaf, never formed. Other leaves
  (one axis, e.g. biases, at any size; or at most dim_in*dim_out entries) are kept exactly.
  Factors are drawn from fold_in(seed, leaf index) in `init`.
  """
  if dim_in < 1 or dim_out < 1:
    raise UserError(f'kronecker projection dims must be >= 1, got ({dim_in}, {dim_out})')

  def init(grads):
    key = jax.random.key(seed)
    factors = []
    for i, leaf in enumerate(jax.tree.leaves(grads)):
      size = math.prod(leaf.shape)
      if len(leaf.shape) < 2 or size <= dim_in * dim_out:
        factors.append(None)
        continue
      d_in, d_out = size // leaf.shape[-1], leaf.shape[-1]
      ka, kb = jax.random.split(jax.random.fold_in(key, i))
      dtype = jnp.promote_types(leaf.dtype, jnp.float32)  # as `per_example`'s gradients
      factors.append((jax.random.normal(ka, (d_in, dim_in), dtype) / math.sqrt(dim_in),
                      jax.random.normal(kb, (d_out, dim_out), dtype) / math.sqrt(dim_out)))
    return factors

  def apply(grads, factors):
    outs = []
    for leaf, f in zip(jax.tree.leaves(grads), factors):
      if f is None:
        outs.append(leaf.reshape(-1))
      else:
        a, b = f
        outs.append((a.T @ leaf.reshape(a.shape[0], b.shape[0]) @ b).reshape(-1))
    return jnp.concatenate(outs)

  return GradTransform(init, apply)


# ----------------------------------------------------------------------------- per-example maps


def single_example_loss(loss_fn: PerExampleLoss) -> Callable[[Any, dict], jax.Array]:
  """The scalar loss of one example (no batch axis) from a per-example batch loss."""

  def loss(params, example):
    return loss_fn(params, jax.tree.map(lambda x: x[None], example))[0]

  return loss


def per_example(loss_fn: PerExampleLoss, params, batch: dict,
                transform: Optional[GradTransform] = None, state: Any = None,
                chunk_size: Optional[int] = 64):
  """transform.apply(grad l_i, state) for every example i, stacked on a leading axis [B, ...].

  Gradients are vmapped over chunks of `chunk_size` examples, chunk after chunk in a `lax.scan`:
  peak memory holds `chunk_size` per-example gradients, not B. `chunk_size=None` vmaps all B.
  `state` defaults to `transform.init(params)`; pass it to reuse e.g. projection factors.
  Gradients of parameters below float32 (bfloat16) are transformed in float32.
  """
  transform = transform or identity()
  if state is None:
    state = transform.init(jax.eval_shape(lambda: params))
  grad_fn = jax.grad(single_example_loss(loss_fn))

  def one(example):
    return transform.apply(jax.tree.map(at_least_float32, grad_fn(params, example)), state)

  return chunked_vmap(one, batch, chunk_size)


def chunked_vmap(fn: Callable, batch, chunk_size: Optional[int]):
  """vmap(fn)(batch) computed `chunk_size` examples at a time in a `lax.scan`.

  Like `lax.map(fn, batch, batch_size=...)`, but chunks are read with `dynamic_slice` from the
  batch in place, so the inputs are not copied into a [chunks, chunk_size, ...] layout (which
  would grow temporary memory with B); the last B % chunk_size examples get one more vmap.
  """
  return chunked_batches(jax.vmap(fn), batch, chunk_size)


def chunked_batches(fn: Callable, batch, chunk_size: Optional[int]):
  """fn(batch) for a row-wise `fn` (output row i depends on example i only), computed on
  `chunk_size` examples at a time in a `lax.scan` (as `chunked_vmap`, with fn taking a batch)."""
  if chunk_size is None:
    return fn(batch)
  if chunk_size < 1:
    raise UserError(f'chunk_size must be >= 1, got {chunk_size}')
  n = batch_size_of(batch)
  size = min(chunk_size, n)
  full, rest = divmod(n, size)

  def body(_, i):
    part = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i * size, size), batch)
    return None, fn(part)

  _, out = jax.lax.scan(body, None, jnp.arange(full))
  out = jax.tree.map(lambda y: y.reshape(full * size, *y.shape[2:]), out)
  if rest:
    tail = fn(jax.tree.map(lambda x: x[full * size:], batch))
    out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)
  return out


def per_example_grads(loss_fn: PerExampleLoss, params, batch: dict,
                      chunk_size: Optional[int] = None):
  """Each example's gradient as a params-shaped pytree with a leading [B] axis."""
  return per_example(loss_fn, params, batch, identity(), (), chunk_size)


def mean_grad(loss_fn: PerExampleLoss, params, batch: dict):
  """The gradient of the mean loss over the batch (e.g. a held-out set's direction)."""
  return jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)


def jvp_dots(loss_fn: PerExampleLoss, params, batch: dict, vector,
             chunk_size: Optional[int] = None,
             layers: Optional[Sequence[str]] = None) -> jax.Array:
  """<grad l_i(params), vector> for all i from one JVP of the loss vector along `vector`.

  d/de l_i(params + e v) at e = 0 is exactly the dot product, for every i at the cost of about
  one forward pass, and no per-example gradient is formed. `chunk_size` bounds activation memory.
  `layers`: only `vector`'s entries in them are read (the rest count as zero), so the tangent
  starts there (the layers before carry none: with the last layer only, the JVP costs little
  more than the forward pass).
  """
  leaves, treedef = jax.tree.flatten(params)
  chosen = [i for i, keep in enumerate(jax.tree.leaves(layer_mask(params, layers))) if keep]
  tangents = jax.tree.leaves(vector)

  def dots(b):
    def loss_of(selected):
      full = list(leaves)
      for i, x in zip(chosen, selected):
        full[i] = x
      return loss_fn(jax.tree.unflatten(treedef, full), b)
    return jax.jvp(loss_of, ([leaves[i] for i in chosen],), ([tangents[i] for i in chosen],))[1]

  if chunk_size is None:
    return dots(batch)
  return chunked_vmap(lambda ex: dots(jax.tree.map(lambda x: x[None], ex))[0], batch, chunk_size)


def masked(tree, layers: Optional[Sequence[str]]):
  """`tree` with every leaf outside `layers` set to zero (None keeps all)."""
  if layers is None:
    return tree
  return jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), tree, layer_mask(tree, layers))


# ----------------------------------------------------------------------------- ghost dot products


def _is_dense_call(context) -> bool:
  """A call of nn.Dense's own x W + b: a subclass that overrides `__call__` may compute
  another function of its kernel, which the products of its inputs and output gradients would
  not be the gradients of (it is differentiated exactly, as any other layer)."""
  return (isinstance(context.module, nn.Dense) and context.method_name == '__call__'
          and type(context.module).__call__ is nn.Dense.__call__)


def _dense_name(context) -> str:
  return '/'.join(context.module.path)


@contextlib.contextmanager
def _tapping_dense(tap):
  """Within it, every Dense call (nn.Dense's own x W + b, `_is_dense_call`; an nnx.Linear of a
  `tasks.NnxModel`) returns `tap(its module path, inputs, output, use_bias)` in its place."""

  def linen(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if not _is_dense_call(context):
      return out
    x = args[0] if args else kwargs['inputs']
    return tap(_dense_name(context), x, out, context.module.use_bias)

  with nn.intercept_methods(linen), nnx_tasks.tapping(tap):
    yield


def _dense_calls(loss_fn: PerExampleLoss, params, batch: dict, layers=None):
  """{Dense name: (output shape, kernel size, use_bias)} of the Dense calls `loss_fn` makes
  (`_tapping_dense`: nn.Dense, an `NnxModel`'s nnx.Linear).
  Raises ValueError where ghost products cannot follow a call of a layer in `layers` (None:
  any): a layer called twice, called inside a transformation of the loss (nn.remat, nn.jit,
  nn.scan, jax.vmap: its inputs and output gradients cannot be taken out of it), or applied to
  inputs whose first axis is not the examples."""
  calls, bad, size = {}, {}, jax.tree.leaves(batch)[0].shape[0]
  loss_trace = []  # the trace the loss runs in

  def record(name, x, out, use_bias):
    if flax.core.tracers.current_trace() != loss_trace[0]:
      bad[name] = (f'Dense layer {name!r} is called inside a transformation of the loss '
                   '(nn.remat, nn.jit, nn.scan, jax.vmap, nnx.remat): ghost products need its '
                   "call in the loss's own trace")
    elif name in calls:
      bad[name] = f'Dense layer {name!r} is called twice: ghost products need one call'
    elif x.ndim < 2 or x.shape[0] != size:
      bad[name] = (f'Dense layer {name!r} takes inputs of shape {tuple(x.shape)}, whose first '
                   f'axis is not the batch of {size} examples: ghost products need it to be')
    if name not in calls:
      calls[name] = (jax.ShapeDtypeStruct(out.shape, out.dtype), x.shape[-1] * out.shape[-1],
                     use_bias)
    return out

  def traced(p, b):  # a fresh function: eval_shape caches traces
    loss_trace.append(flax.core.tracers.current_trace())
    return loss_fn(p, b)

  with _tapping_dense(record):
    jax.eval_shape(traced, params, batch)
  for name in _named_dense(calls, layers):
    if name in bad:
      raise ValueError(bad[name])
  return calls


def _dense_params(calls) -> int:
  return sum(size + (shape.shape[-1] if bias else 0) for shape, size, bias in calls.values())


def param_owners(params) -> set[str]:
  """Module paths of the parameters' modules, the top module ('') left out."""
  return {_module_path(path).rpartition('/')[0]
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]} - {''}


def param_layers(loss_fn: PerExampleLoss, params, batch: dict) -> list[str]:
  """Module paths of the layers that hold parameters, in the order their calls made by
  `loss_fn` return: linen modules' calls of any method but `setup` (`nn.Embed.attend`, a tied
  output layer, too), and an `NnxModel`'s nnx.Linear calls; the last is the model's last layer.
  ValueError where an nnx.Linear call is seen and a layer holding parameters is not (an nnx
  module of another kind, whose calls are not seen: which is last is not known)."""
  owners = param_owners(params)
  order, nnx_seen = [], []

  def note(name):
    if name in owners:
      if name in order:
        order.remove(name)
      order.append(name)

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != 'setup':
      note('/'.join(context.module.path))
    return out

  def record_nnx(name, x, out, use_bias):
    nnx_seen.append(name)
    note(name)
    return out

  with nn.intercept_methods(record), nnx_tasks.tapping(record_nnx):
    jax.eval_shape(lambda p, b: loss_fn(p, b), params, batch)
  unseen = sorted(owners - set(order))
  if nnx_seen and unseen:
    raise ValueError(f'of an nnx model only nnx.Linear calls are seen, not those of '
                     f'{", ".join(unseen)}, so which layer is last is not known')
  return order


def _check_covers(calls, params, layers) -> list[str]:
  """The Dense layers in `layers` (None: all); raises ValueError unless they hold every
  parameter in `layers` (ghost and factored products then see the gradients `select` keeps)."""
  names = _named_dense(calls, layers)
  if layers is not None:
    layers = [layers] if isinstance(layers, str) else list(layers)
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  mask = jax.tree.leaves(layer_mask(params, layers))
  inside = sum(x.size for (_, x), m in zip(paths, mask) if m)
  # Every taken Dense layer's parameters lie in `layers`, so equal counts mean equal sets.
  covered = _dense_params({n: calls[n] for n in names})
  if covered != inside:
    where = 'the model' if layers is None else f'layers {", ".join(layers)}'
    others = sorted({_module_path(p).rpartition('/')[0] or _module_path(p)
                     for (p, _), m in zip(paths, mask) if m} - set(names))
    raise ValueError(f'Dense layers hold {covered} of the {inside} parameters of {where} (not '
                     f'{", ".join(others[:6])}{", ..." if len(others) > 6 else ""}): ghost and '
                     'factored products cover Dense layers only')
  return names


def ghost_covers(loss_fn: PerExampleLoss, params, batch: dict,
                 layers: Optional[Sequence[str]] = None) -> bool:
  """Whether the Dense layers in `layers` (None: all) hold every parameter in `layers`, each
  called once on the batch's examples, and their calls make the whole gradient (ghost products
  over `layers` are then exact: the same gradients `select(layers)` keeps).

  The last is checked on the batch: ghost squared norms against exact ones, which differ where
  the loss also reads a Dense layer's weights outside its call (a weight penalty, tied weights)
  or a layer's first axis only happens to have the batch's size; to 1e-3, or 4 ulps of a layer
  computing in lower precision (bfloat16: 3%; the two round apart there)."""
  layers = [layers] if isinstance(layers, str) else layers
  try:
    calls = _dense_calls(loss_fn, params, batch, layers)
    names = _check_covers(calls, params, layers)
  except (ValueError, UserError):  # a Dense layer called twice, or a layer that is not Dense
    return False
  rtol = max([1e-3] + [4 * float(jnp.finfo(calls[n][0].dtype).eps) for n in names
                       if jnp.issubdtype(calls[n][0].dtype, jnp.floating)])
  # One compiled program (op by op, its dozens of primitives each compiled alone took seconds).
  ghost, exact = jax.jit(lambda p, b: (
      ghost_sq_norms(loss_fn, p, b, layers),
      per_example(loss_fn, p, b, chain(select(layers), sq_norm()))))(params, batch)
  ghost, exact = np.asarray(ghost, np.float64), np.asarray(exact, np.float64)
  if not (np.isfinite(ghost).all() and np.isfinite(exact).all()):  # diverged params: no answer
    return False  # (and no numpy warning of a NaN tolerance on the way to its error)
  return bool(np.allclose(ghost, exact, rtol=rtol, atol=1e-6 * np.abs(exact).max()))


def dense_positions(loss_fn: PerExampleLoss, params, batch: dict,
                    layers: Optional[Sequence[str]] = None) -> int:
  """The most positions per example any Dense layer in `layers` (None: all) is applied at: 1 for
  an MLP, patches for a CNN, tokens for a sequence model."""
  calls = _dense_calls(loss_fn, params, batch, layers)
  names = _named_dense(calls, layers)
  return max((math.prod(calls[n][0].shape[1:-1]) for n in names), default=1)


def dense_factors(loss_fn: PerExampleLoss, params, batch: dict,
                  layers: Optional[Sequence[str]] = None, check_coverage: bool = True):
  """{Dense name: (inputs a [B, ..., d_in], output-grads g [B, ..., d_out], use_bias)}.

  g_i = d l_i / d(output of the layer for example i), all from one backward pass of sum_i l_i
  through zero perturbations added to the Dense outputs. With `check_coverage`, raises if the
  Dense layers taken do not hold every parameter (ghost products would then miss a part).
  """
  if isinstance(layers, str):
    layers = [layers]
  calls = _dense_calls(loss_fn, params, batch, layers)
  names = _check_covers(calls, params, layers) if check_coverage else _named_dense(calls, layers)

  def total_loss(eps):
    acts = {}

    def perturb(name, x, out, use_bias):
      if name in eps:
        acts[name] = x
        out = out + eps[name]
      return out

    with _tapping_dense(perturb):
      loss = loss_fn(params, batch)
    return jnp.sum(loss), acts

  eps = {n: jnp.zeros(calls[n][0].shape, calls[n][0].dtype) for n in names}
  out_grads, acts = jax.grad(total_loss, has_aux=True)(eps)
  return {n: (acts[n], out_grads[n], calls[n][2]) for n in names}


def _as_3d(x):
  """[B, T, d] (T positions share the layer), in float32 at least: a bfloat16 layer's inputs and
  output gradients are multiplied and summed in float32, as its parameters' gradients are."""
  return at_least_float32(x.reshape(x.shape[0], -1, x.shape[-1]))


def _layer_grads(x, g):
  """Per-example kernel gradients sum_t x_it^T g_it of 3-d factors, flattened [B, d_in * d_out]:
  over many positions T and narrow layers, fewer flops than ghost products' T x T position
  products (for norms, when (T + 1) d_in d_out < T^2 (d_in + d_out))."""
  return jnp.einsum('btd,bte->bde', x, g).reshape(x.shape[0], -1)


def ghost_dots(loss_fn: PerExampleLoss, params, batch_a: dict, batch_b: Optional[dict] = None,
               layers: Optional[Sequence[str]] = None) -> jax.Array:
  """[A, B] matrix of <grad l(a_i), grad l(b_j)> over Dense layers, no whole per-example gradient.

  Kernel: sum_{t,s} (x_it . x_js)(g_it . g_js) (one position: (x_i.x_j)(g_i.g_j)); bias:
  (sum_t g_it) . (sum_s g_js). `batch_b=None` means batch_a against itself. A layer whose
  per-example kernel gradients x_i^T g_i [d_in, d_out] take fewer flops to form and dot (a
  convolution's, over many positions) is contracted that way (`_layer_grads`).
  """
  fa = dense_factors(loss_fn, params, batch_a, layers)
  fb = fa if batch_b is None else dense_factors(loss_fn, params, batch_b, layers)
  total = 0.0
  for name, (xa, ga, has_bias) in fa.items():
    xb, gb, _ = fb[name]
    xa, ga, xb, gb = map(_as_3d, (xa, ga, xb, gb))
    (a, t, d), (b, s, e) = xa.shape, gb.shape
    if (a * t + b * s + a * b) * d * e < a * b * t * s * (d + e):
      ma = _layer_grads(xa, ga)
      total = total + ma @ (ma if batch_b is None else _layer_grads(xb, gb)).T
    elif t == 1 and s == 1:
      total = total + (xa[:, 0] @ xb[:, 0].T) * (ga[:, 0] @ gb[:, 0].T)
    else:
      total = total + jnp.einsum('atd,bsd,ate,bse->ab', xa, xb, ga, gb)
    if has_bias:
      total = total + ga.sum(1) @ gb.sum(1).T
  return total


def ghost_sq_norms(loss_fn: PerExampleLoss, params, batch: dict,
                   layers: Optional[Sequence[str]] = None) -> jax.Array:
  """||grad l_i||^2 over Dense layers for every i, [B], from activations and output-gradients
  (or, where fewer flops, each layer's per-example kernel gradients: `ghost_dots`)."""
  total = 0.0
  for x, g, has_bias in dense_factors(loss_fn, params, batch, layers).values():
    x, g = _as_3d(x), _as_3d(g)
    (_, t, d), e = x.shape, g.shape[-1]
    if (t + 1) * d * e < t * t * (d + e):
      total = total + jnp.sum(_layer_grads(x, g) ** 2, -1)
    elif t == 1:
      total = total + jnp.sum(x[:, 0] ** 2, -1) * jnp.sum(g[:, 0] ** 2, -1)
    else:
      total = total + jnp.einsum('btd,bsd,bte,bse->b', x, x, g, g)
    if has_bias:
      total = total + jnp.sum(g.sum(1) ** 2, -1)
  return total


# ----------------------------------------------------------------------------- factored projection


@flax.struct.dataclass
class FactoredState:
  """The factors of a factored projection: Dense layer names[l] gets P_in [d_in + bias[l], k_in]
  (its last row, with a bias, projects the bias as a constant-1 input) and P_out [d_out, k_out]."""
  factors: tuple                                            # ((P_in, P_out), ...) in names order
  names: tuple = flax.struct.field(pytree_node=False)       # Dense module paths, call order
  bias: tuple = flax.struct.field(pytree_node=False)        # whether each layer has a bias
  k_in: int = flax.struct.field(pytree_node=False)
  k_out: int = flax.struct.field(pytree_node=False)
  seed: int = flax.struct.field(pytree_node=False)
  layers: Optional[tuple] = flax.struct.field(pytree_node=False)  # the selection (None: all)

  @property
  def dim(self) -> int:
    """D, the length of a projected gradient: sum over layers of k_in * k_out."""
    return len(self.names) * self.k_in * self.k_out

  def describe(self) -> dict:
    """What fixes the projection (JSON-able): kind, seed, k_in, k_out, the layers and shapes."""
    return {'kind': 'factored_gaussian', 'seed': self.seed, 'k_in': self.k_in,
            'k_out': self.k_out, 'layers': None if self.layers is None else list(self.layers),
            'names': list(self.names), 'bias': list(self.bias), 'bias_handling': 'input_column',
            'shapes': [[int(a.shape[0]), int(b.shape[0])] for a, b in self.factors],
            'dim': self.dim}


class FactoredProjection(NamedTuple):
  """A seeded per-Dense-layer Kronecker projection; `init` draws its factors for a model."""
  k_in: int
  k_out: int
  seed: int
  layers: Optional[tuple]

  def init(self, loss_fn: PerExampleLoss, params, batch: dict) -> FactoredState:
    """Factors for the Dense layers `loss_fn` calls (shapes suffice for params and batch).

    Layer i of the model's Dense call order (counting all of them, so a layer's factors do not
    depend on which others are selected) gets P_in, P_out ~ N(0, 1/k_in), N(0, 1/k_out) from
    the two halves of split(fold_in(key(seed), i)). Every parameter of `layers` (None: of the
    model) must sit in a Dense layer called once on the batch's examples.
    """
    try:
      calls = _dense_calls(loss_fn, params, batch, self.layers)
      names = _check_covers(calls, params, self.layers)
    except ValueError as e:
      raise UserError(f'factored projection: {e} (project named Dense layers only: the gradient '
                      'store, which valuation.topk always uses, projects this way)') from None
    if not names:
      raise UserError('factored projection: the model calls no nn.Dense or nnx.Linear layer')
    key = jax.random.key(self.seed)
    factors, bias = [], []
    for i, (name, (out, size, has_bias)) in enumerate(calls.items()):
      if name not in names:
        continue
      d_out = out.shape[-1]
      dtype = jnp.promote_types(out.dtype, jnp.float32)  # a bfloat16 layer's: float32
      ka, kb = jax.random.split(jax.random.fold_in(key, i))
      factors.append((
          jax.random.normal(ka, (size // d_out + has_bias, self.k_in), dtype)
          / math.sqrt(self.k_in),
          jax.random.normal(kb, (d_out, self.k_out), dtype) / math.sqrt(self.k_out)))
      bias.append(bool(has_bias))
    return FactoredState(tuple(factors), tuple(names), tuple(bias), self.k_in, self.k_out,
                         self.seed, self.layers)


def factored_projection(k_in: int, k_out: int, seed: int = 0,
                        layers: Optional[Sequence[str]] = None) -> FactoredProjection:
  """LoGra-style projection of Dense-layer gradients without forming them.

  A Dense layer y = x W + b has per-example gradient [W; b] -> sum_t [x_it, 1]^T g_it over its
  positions t (x: inputs, g: output gradients). Projected with P_in, P_out it is
  sum_t ([x_it, 1] P_in)^T (g_it P_out), a [k_in, k_out] block equal to the row-major
  vec([dW; db]) times kron(P_in, P_out): the kernel and bias are one [(d_in + 1), d_out] matrix.
  A projected gradient [D] is the row-major blocks of the layers in call order. `layers` selects
  Dense layers by a path component or leading path (e.g. ['head'], ['conv_0']); None takes all.
  """
  if k_in < 1 or k_out < 1:
    raise UserError(f'factored projection dims must be >= 1, got ({k_in}, {k_out})')
  if layers is not None:
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
  return FactoredProjection(int(k_in), int(k_out), int(seed), layers)


def _named_dense(calls, layers) -> list[str]:
  """The Dense calls in `layers` (a name, names, or None: all of them), in call order."""
  if layers is None:
    return list(calls)
  layers = [layers] if isinstance(layers, str) else layers
  names = [n for n in calls if any(_in_layer(n, l) for l in layers)]
  for l in layers:
    if not any(_in_layer(n, l) for n in calls):
      raise UserError(f'no Dense layer {l!r} (Dense layers: {", ".join(calls)})')
  return names


def _project_captured(state: FactoredState, captured) -> jax.Array:
  """[B, D] projected gradients from `dense_factors` output (inputs, output gradients)."""
  outs = []
  for name, has_bias, (p_in, p_out) in zip(state.names, state.bias, state.factors):
    x, g, _ = captured[name]
    x, g = _as_3d(x), _as_3d(g)
    xp = x @ p_in[:x.shape[-1]]
    if has_bias:
      xp = xp + p_in[-1]
    outs.append(jnp.einsum('btk,btl->bkl', xp, g @ p_out).reshape(x.shape[0], -1))
  return jnp.concatenate(outs, 1)


def per_example_projected(loss_fn: PerExampleLoss, params, batch: dict,
                          projection, then: Optional[GradTransform] = None,
                          chunk_size: Optional[int] = 64) -> jax.Array:
  """then.apply(projected grad l_i [D]) for every example i, stacked [B, ...].

  `projection`: a `FactoredProjection` (initialised here) or its `FactoredState`. Each chunk of
  `chunk_size` examples takes one forward/backward pass (`dense_factors`: the Dense inputs and
  output gradients), then per layer two small matmuls and a contraction over positions; no
  per-example gradient is formed. `then` (default identity) sees one example's [D] vector, e.g.
  `normalize()`, `sq_norm()` or `dot(project_params(state, v))`.
  """
  state = projection.init(loss_fn, params, batch) if isinstance(
      projection, FactoredProjection) else projection
  then = then or identity()
  dtype = state.factors[0][0].dtype
  then_state = then.init(jax.ShapeDtypeStruct((state.dim,), dtype))

  def block(b):
    captured = dense_factors(loss_fn, params, b, list(state.names), check_coverage=False)
    return jax.vmap(lambda v: then.apply(v, then_state))(_project_captured(state, captured))

  return chunked_batches(block, batch, chunk_size)


def dense_matrices(state: FactoredState, tree) -> list[jax.Array]:
  """Each projected layer's [kernel; bias] [(d_in + 1), d_out] (or kernel) read from a
  params-shaped `tree` (e.g. a gradient or theta_ref - theta), in the projection's order."""
  leaves = {_path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  out = []
  for name, has_bias in zip(state.names, state.bias):
    prefix = next((p for p in (f'params/{name}/', f'{name}/') if p + 'kernel' in leaves), None)
    if prefix is None:
      raise UserError(f'no kernel of Dense layer {name!r} in the parameters')
    m = leaves[prefix + 'kernel']
    out.append(jnp.concatenate([m, leaves[prefix + 'bias'][None]]) if has_bias else m)
  return out


def project_params(state: FactoredState, tree) -> jax.Array:
  """A params-shaped vector projected like a gradient: P_in^T [W; b] P_out per layer, [D].

  The same linear map as `per_example_projected`, so <projected g, projected v> estimates
  <g, v> over the projected layers (unbiased: E kron(P_in, P_out) kron(P_in, P_out)^T = I).
  """
  return jnp.concatenate([(a.T @ m @ b).reshape(-1) for m, (a, b)
                          in zip(dense_matrices(state, tree), state.factors)])


def factored_transform(state: FactoredState) -> GradTransform:
  """The factored projection as a GradTransform of formed gradients (e.g. for `per_example`
  and data value embeddings): apply(g) = project_params(state, g)."""
  return GradTransform(lambda g: state, lambda g, s: project_params(s, g))
