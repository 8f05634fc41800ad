"""Inner optimizers that can be differentiated through (meta-gradients flow through their updates)."""
import optax

from datarater.errors import UserError

INNER_OPTIMIZERS = ('sgd', 'momentum', 'adam')


def make_inner_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  """An optax optimizer; Adam gets `eps_root` so d sqrt(v) stays finite where v = 0."""
  if name == 'sgd':
    return optax.sgd(learning_rate)
  if name == 'momentum':
    return optax.sgd(learning_rate, momentum=0.9)
  if name == 'adam':
    return optax.adam(learning_rate, eps_root=1e-12)
  raise UserError(f'unknown inner optimizer {name!r} (choose from {", ".join(INNER_OPTIMIZERS)})')
