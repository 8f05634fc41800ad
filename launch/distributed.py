"""Multi-process start-up: `jax.distributed` from flags or from the cluster's environment.

On a Cloud TPU VM pod, or under SLURM / Open MPI, `jax.distributed.initialize()` reads everything
it needs from the environment (`--distributed`); elsewhere name the coordinator and this process
(`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`). After it, `jax.devices()`
lists every process's devices and one mesh spans them all.
"""
from absl import flags
import jax

_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() from the environment (TPU pod, SLURM).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')


def initialize_from_flags() -> None:
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def is_primary() -> bool:
  """Process 0 writes logs, metrics, configs and reports; every process writes its checkpoint shards."""
  return jax.process_index() == 0
