"""Multi-process start-up: `jax.distributed` from flags or from the cluster's environment.

On a Cloud TPU VM pod, or under SLURM / Open MPI, `jax.distributed.initialize()` reads everything
it needs from the environment (`--distributed`); elsewhere name the coordinator and this process
(`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`). After it, `jax.devices()`
lists every process's devices and one mesh spans them all.
"""
import collections
import contextlib
import errno
import json
import os
import socket
import sys
import threading

from absl import flags
import jax
import ml_collections
import numpy as np

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
  flags.DEFINE_integer('start_timeout', 300, 'Seconds a process waits for every other to join '
                       'the job before it stops.', flag_values=fv)


def initialize_from_flags(fv: flags.FlagValues = flags.FLAGS, flags_read: bool = True) -> None:
  """Starts `jax.distributed` as the flags say (nothing without them); bad values, a coordinator
  port another program listens on (`refuse_busy_port`), a failed start and a job that not every
  process joined within --start_timeout seconds (`_wait_for`) are one `UserError` line, and so
  is, on every process, a process that could not read its own flags (`flags_read=False`: see
  `stop_job_after_flag_error`)."""
  if fv.start_timeout < 1:
    raise UserError(f'--start_timeout must be >= 1 (seconds), got {fv.start_timeout}')
  # JAX's own timeout, the later: it aborts the process with a C++ trace.
  timeout = {'initialization_timeout': fv.start_timeout + 60}
  if fv.coordinator_address:
    host, _, port = fv.coordinator_address.rpartition(':')
    if not host or not port.isdigit():
      raise UserError(f'--coordinator_address must be HOST:PORT, got {fv.coordinator_address!r}')
    if not 0 < int(port) < 65536:  # (process 0's port check would crash; the others wait it out)
      raise UserError(f'--coordinator_address {fv.coordinator_address!r}: PORT must be in '
                      f'1..65535, got {port}')
    if fv.num_processes is None or fv.num_processes < 1:
      raise UserError(f'--num_processes must be >= 1 with --coordinator_address, got '
                      f'{fv.num_processes}')
    if fv.process_id is None or not 0 <= fv.process_id < fv.num_processes:
      raise UserError(f'--process_id must be in 0..{fv.num_processes - 1}, got {fv.process_id}')
    if fv.process_id == 0:
      refuse_busy_port(fv.coordinator_address)
    start = lambda: jax.distributed.initialize(coordinator_address=fv.coordinator_address,
                                               num_processes=fv.num_processes,
                                               process_id=fv.process_id, **timeout)
  elif fv.num_processes is not None or fv.process_id is not None:
    raise UserError('--num_processes and --process_id need --coordinator_address')
  elif fv.distributed:
    start = lambda: jax.distributed.initialize(**timeout)
  else:
    return
  try:
    _wait_for(start, fv.start_timeout)
  except UserError:
    raise
  except (ValueError, RuntimeError) as e:
    raise UserError(f'cannot start jax.distributed: {str(e).splitlines()[0]}') from None
  _in_process_collectives_if_alone()
  # jax.distributed's preemption notifier takes SIGTERM over (it only logs it, and the run goes
  # on): this process's handlers go back in, so that SIGTERM stops it as it stops one process.
  interrupts.install()
  counts = collections.Counter(d.process_index for d in jax.devices())  # (all processes' list)
  if len(set(counts.values())) > 1:  # (the exchanges between processes assume as many: tracebacks)
    held = ', '.join(f'process {p}: {n}' for p, n in sorted(counts.items()))
    raise UserError(f'the processes of this job hold different numbers of devices ({held}): give '
                    'every process as many (CUDA_VISIBLE_DEVICES, XLA_FLAGS)')
  if jax.process_count() > 1:
    read = multihost.allgather(np.asarray([flags_read], np.int32))[:, 0]
    if not read.all():
      failed = ', '.join(map(str, np.flatnonzero(read == 0)))
      raise UserError(f'process {failed} of this job could not read its flags (its error line '
                      'says why)')
  multihost.check_same_settings(settings(fv))


def _in_process_collectives_if_alone() -> None:
  """In a job of one process, the CPU collectives between this process's devices in-process:
  with jax.distributed started, JAX's CPU client sends every collective through gloo's TCP, even
  between devices of one process (a 2-device all-reduce ~20x slower). With more processes gloo
  stays: JAX has no setting that keeps the local ones in-process and crosses processes by gloo.
  (Read when JAX creates its CPU backend, after `jax.distributed.initialize`.)"""
  if jax._src.distributed.global_state.num_processes == 1:  # pylint: disable=protected-access
    jax.config.update('jax_cpu_collectives_implementation', None)


def stop_job_after_flag_error(argv, fv: flags.FlagValues = flags.FLAGS) -> None:
  """For a launcher whose flags or config override (its error line printed) did not read, if it
  takes these flags (defined in `fv`, first: before a config file's overrides can fail) and
  `argv` names a job: joins the job as far as its own flags here read, so that every process
  stops at once (the others waited --start_timeout, 300 s, for this one); nothing otherwise."""
  if 'coordinator_address' not in fv:
    return
  own = flags.FlagValues()
  define_flags(own)
  try:
    own(list(argv), known_only=True)
  except (flags.Error, ValueError):  # a bad value of these flags, a --flagfile not text: no job
    return
  if own.coordinator_address or own.distributed:
    with contextlib.suppress(UserError):  # (this process's own line is already out)
      initialize_from_flags(own, flags_read=False)


def refuse_busy_port(address: str) -> None:
  """UserError if the port that process 0's coordinator is to listen on (every address: JAX
  binds [::]:PORT, or JAX_COORDINATOR_BIND_ADDRESS) is another program's. jaxlib then crashes
  (a segmentation fault) or, where that program is another job's coordinator (gRPC shares a
  port between servers that ask to), binds it too and lets the other job take this one's
  processes. Tried as gRPC binds it (SO_REUSEADDR: connections of a coordinator that ended, in
  TIME_WAIT, do not count); any other error is left to JAX, and so is a program that takes the
  port after the check."""
  bind = os.environ.get('JAX_COORDINATOR_BIND_ADDRESS') or f'[::]:{address.rpartition(":")[2]}'
  host, _, port = bind.rpartition(':')
  host = host.strip('[]')
  try:
    with socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      if ':' in host:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # and IPv4, as gRPC's
      s.bind((host, int(port)))
  except OSError as e:
    if e.errno == errno.EADDRINUSE:
      raise UserError(f'--coordinator_address {address!r}: port {port} is in use (another job\'s '
                      'coordinator?); give every process of this job a free port') from None


def _wait_for(start, seconds: int) -> None:
  """Runs `start` (jax.distributed's, which returns once every process has joined) in a thread
  and waits for it here: a UserError if it has not returned within `seconds`. (Waiting in JAX's
  call itself, Ctrl-C and SIGTERM would not be handled before it returned, and it ends its timeout
  by aborting the process with a C++ trace.)"""
  done, raised = threading.Event(), []

  def run():
    try:
      start()
    except BaseException as e:  # pylint: disable=broad-except  (raised below, in this thread)
      raised.append(e)
    finally:
      done.set()
  threading.Thread(target=run, name='jax.distributed start', daemon=True).start()
  if not done.wait(seconds):
    raise UserError(f'not every process of this job joined it within --start_timeout={seconds} '
                    's (one that failed to start says why in its own error line)')
  if raised:
    raise raised[0]


LOCAL = ('--process_id', '--data_dir', '--config.data.data_dir', '--start_timeout')  # may differ


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
