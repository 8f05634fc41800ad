"""Multi-process start-up: `jax.distributed` from flags or from the cluster's environment.

On a Cloud TPU VM pod, or under SLURM / Open MPI, `jax.distributed.initialize()` reads everything
it needs from the environment (`--distributed`); elsewhere name the coordinator and this process
(`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`). After it, `jax.devices()`
lists every process's devices and one mesh spans them all.
"""
import json
import sys

from absl import flags
import jax
import ml_collections

from datarater import multihost
from datarater.errors import UserError
from launch import interrupts


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The multi-process flags, for an entry point to define before `app.run`."""
  flags.DEFINE_bool('distributed', False,
                    'Call jax.distributed.initialize() from the environment (TPU pod, SLURM).',
                    flag_values=fv)
  flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0.', flag_values=fv)
  flags.DEFINE_integer('num_processes', None, 'Processes in the job.', flag_values=fv)
  flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.', flag_values=fv)


def initialize_from_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Starts `jax.distributed` as the flags say (nothing without them); bad values and a failed
  start are one `UserError` line in this process (processes that did start wait out JAX's
  start-up timeout for it, then abort: JAX gives no error to catch there)."""
  if fv.coordinator_address:
    host, _, port = fv.coordinator_address.rpartition(':')
    if not host or not port.isdigit():
      raise UserError(f'--coordinator_address must be HOST:PORT, got {fv.coordinator_address!r}')
    if fv.num_processes is None or fv.num_processes < 1:
      raise UserError(f'--num_processes must be >= 1 with --coordinator_address, got '
                      f'{fv.num_processes}')
    if fv.process_id is None or not 0 <= fv.process_id < fv.num_processes:
      raise UserError(f'--process_id must be in 0..{fv.num_processes - 1}, got {fv.process_id}')
    start = lambda: jax.distributed.initialize(coordinator_address=fv.coordinator_address,
                                               num_processes=fv.num_processes,
                                               process_id=fv.process_id)
  elif fv.num_processes is not None or fv.process_id is not None:
    raise UserError('--num_processes and --process_id need --coordinator_address')
  elif fv.distributed:
    start = jax.distributed.initialize
  else:
    return
  try:
    start()
  except (ValueError, RuntimeError) as e:
    raise UserError(f'cannot start jax.distributed: {str(e).splitlines()[0]}') from None
  # jax.distributed's preemption notifier took SIGTERM over (it only logs it, and the run went
  # on): this process's handlers go back in, so that SIGTERM stops it as it stops one process.
  interrupts.install()
  multihost.check_same_settings(settings(fv))


LOCAL = ('--process_id', '--data_dir', '--config.data.data_dir')  # may differ per process


def settings(fv: flags.FlagValues) -> dict:
  """The launcher's own flags by name (a config flag field by field), but those of `LOCAL`
  (where this process keeps its prepared TFDS data may differ): every process of a job must hold
  the same."""
  out = {}
  for module, module_flags in fv.flags_by_module_dict().items():
    # The program's own (absl names them by its path) and our modules', not other packages'.
    if module != sys.argv[0] and not module.startswith(('launch', 'bench')):
      continue
    for flag in module_flags:
      if isinstance(flag.value, ml_collections.ConfigDict):
        out.update(_flat(json.loads(flag.value.to_json_best_effort()), f'--{flag.name}.'))
      else:
        out[f'--{flag.name}'] = flag.value
  return {k: v for k, v in out.items() if k not in LOCAL}


def _flat(tree: dict, prefix: str) -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out
