"""Multi-process start-up: `jax.distributed` from flags or from the cluster's environment.

On a Cloud TPU VM pod, or under SLURM / Open MPI, `jax.distributed.initialize()` reads everything
it needs from the environment (`--distributed`); elsewhere name the coordinator and this process
(`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`). After it, `jax.devices()`
lists every process's devices and one mesh spans them all.
"""
from absl import flags
import jax


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The multi-process flags, for an entry point to define before `app.run`."""
  flags.DEFINE_bool('distributed', False,
                    'Call jax.distributed.initialize() from the environment (TPU pod, SLURM).',
                    flag_values=fv)
  flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0.', flag_values=fv)
  flags.DEFINE_integer('num_processes', None, 'Processes in the job.', flag_values=fv)
  flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.', flag_values=fv)


def initialize_from_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  if fv.coordinator_address:
    jax.distributed.initialize(coordinator_address=fv.coordinator_address,
                               num_processes=fv.num_processes, process_id=fv.process_id)
  elif fv.distributed:
    jax.distributed.initialize()
