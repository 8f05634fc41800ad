"""A `flax.nnx` module as the pure function of its parameters that a `Task` or `Rater` needs.

`NnxModel.of(make)` takes a constructor `make(rngs) -> nnx.Module`; its `init(key)` returns the
module's `nnx.Param` values as `{'params': {module path: ...}}`, the layout (and layer names:
`l1`, `layers/0`) a linen init gives, and `bind(params)` is the module holding them
(`nnx.merge`), to call in a loss or score. The graph is held in the model (static: a task closes
over it). What the interface cannot pass is refused in one line when it is made: variables other
than `nnx.Param` (`nnx.BatchStat` of batch norm, an `nnx.Rngs` held by dropout), which would be
mutable state or trained as parameters.

The graph's `nnx.Linear` layers (computing its own x W + b: no `dot_general` of the caller's)
are made `TappedLinear`s, the same layer whose calls `tapping` shows the per-example gradient
layer (`datarater.pergrad`: ghost products, factored projections), as linen's nn.Dense calls.
"""
import contextlib
import dataclasses
import threading
from typing import Any, Callable

import jax
from flax import nnx

from datarater.errors import UserError


def _str_keys(tree):
  """A pure dict with its keys as strings (`nnx.Sequential` numbers its layers: checkpoints and
  layer names take strings; `nnx.replace_by_pure_dict` reads them back as numbers)."""
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


class _Taps(threading.local):
  fns: list  # tap(name, inputs, output, use_bias) -> output, in the order entered

  def __init__(self):
    super().__init__()
    self.fns = []


_TAPS = _Taps()


@contextlib.contextmanager
def tapping(tap: Callable):
  """Within it, every `TappedLinear` call returns `tap(its module path, inputs, output,
  use_bias)` in place of its output (in this thread; nested taps see their outputs in the
  order entered, as flax's interceptors do)."""
  _TAPS.fns.append(tap)
  try:
    yield
  finally:
    _TAPS.fns.pop()


class TappedLinear(nnx.Linear):
  """nnx.Linear, its calls shown to `tapping`; `path` (static) is its module path."""
  path: str

  def __call__(self, inputs, out_sharding=None):
    out = super().__call__(inputs, out_sharding)
    for tap in _TAPS.fns:
      out = tap(self.path, inputs, out, self.use_bias)
    return out


def _tap_linears(module: nnx.Module) -> None:
  """Makes the module's own-computing nnx.Linear nodes `TappedLinear`s, in place (the same
  attributes and variables: only the class and its path are added)."""
  for path, node in nnx.iter_graph(module):
    own = type(node) is nnx.Linear  # pylint: disable=unidiomatic-typecheck
    if own and node.dot_general is jax.lax.dot_general:
      object.__setattr__(node, '__class__', TappedLinear)  # not an attribute nnx records
      node.path = '/'.join(map(str, path))


@dataclasses.dataclass(frozen=True)
class NnxModel:
  """An nnx module's graph and constructor; its parameters are passed in (see the module doc)."""
  make: Callable[[nnx.Rngs], nnx.Module]
  graphdef: Any
  abstract: Any  # the module's Param state, shapes only (what `bind` fills in)

  @classmethod
  def of(cls, make: Callable[[nnx.Rngs], nnx.Module]) -> 'NnxModel':
    """UserError naming them if the module holds variables other than `nnx.Param`."""
    module = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    _tap_linears(module)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    others = [('/'.join(map(str, path)), type(v).__name__) for path, v in nnx.to_flat_state(rest)]
    if others:
      path, kind = others[0]
      raise UserError(
          f'nnx module {type(nnx.merge(graphdef, params, rest)).__name__} holds {kind} '
          f'variable {path!r} ({len(others)} besides nnx.Param): only parameters are passed '
          'and none is updated, so a loss must be a function of (params, batch) alone (batch '
          'norm: nnx.LayerNorm or nnx.GroupNorm; dropout: no rngs in the module, a key per '
          "example from batch['index'] passed at the call)")
    return cls(make, graphdef, params)

  def init(self, key: jax.Array) -> dict:
    """Fresh parameters {'params': {module path: ...}}, from `make(nnx.Rngs(key))`."""
    params = nnx.split(self.make(nnx.Rngs(key)), nnx.Param, ...)[1]
    return {'params': _str_keys(params.to_pure_dict())}

  def bind(self, params: dict) -> nnx.Module:
    """The module holding `params` (an `init`'s, or arrays traced from them)."""
    state = jax.tree.map(lambda x: x, self.abstract)  # a fresh copy: the update below is in place
    nnx.replace_by_pure_dict(state, params['params'])
    return nnx.merge(self.graphdef, state)
