"""What the valuation, curation and selection benchmarks share: a config corrupted and seeded for
one (corruption rate, seed) pair, a DataRater meta-trained for it (or read back from a folder of
finished raters, so that benchmarks run on the same pairs share their raters); the seconds spent
compiling (or loading from the process's compilation cache, `launch.cli.run`), so that wall
times can leave them out. (How a benchmark writes its results: `provenance.write_results`.)"""
import os
from typing import Optional

import jax

from datarater import tasks
from datarater.data import pipeline
from datarater.meta_train import meta_train


def corrupted(config, noise: float):
  """A copy of `config` whose training split is corrupted at rate `noise`: label noise `noise`
  (of the config's kind) plus the config's input corruptions; `noise` 0 means clean data (the
  input corruptions are switched off too)."""
  c = config.copy_and_resolve_references()
  c.data.label_noise = noise
  if not noise:
    for kind in c.data.input_corruption:
      c.data.input_corruption[kind] = 0.0
  return c


def seeded(config, noise: float, seed: int, valuation_overrides: Optional[dict] = None):
  """`corrupted(config, noise)` with the corruption draw, initialisations, data order and
  valuation run all seeded by `seed`."""
  c = corrupted(config, noise)
  c.seed = c.data.noise_seed = c.valuation.seed = seed
  c.valuation.update(valuation_overrides or {})
  return c


def splits_and_task(config):
  """(train with its corruption planted, held-out, test, task) of `config`: what a bench's runs
  of one (noise, seed) read."""
  d = config.data
  train = pipeline.load_split(d, d.train_split, corrupt=True)
  return (train, pipeline.load_split(d, d.heldout_split), pipeline.load_split(d, d.eval_split),
          tasks.make_task(config.task, train.info))


def rater_workdir(folder: str, noise: float, seed: int, steps: int) -> str:
  """Where the rater of (noise, seed) trained for `steps` outer steps lives in `folder`."""
  return os.path.join(folder, f'noise{noise:g}_seed{seed}_steps{steps}')


def train_rater(config, steps: int, workdir: str) -> str:
  """Meta-trains the rater of `config` (a `seeded` one) for `steps` outer steps in `workdir`, or
  reads back the finished run there (`meta_train` resumes; a folder made by another config is
  refused); returns `workdir`."""
  c = config.copy_and_resolve_references()
  c.outer.steps, c.log_every, c.checkpoint_every = (steps,) * 3
  c.final_eval.num_models = 0
  meta_train(c, workdir)
  return workdir


# JAX's own timings of tracing, lowering and backend compilation (a persistent-cache load included).
COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                  '/jax/core/compile/jaxpr_to_mlir_module_duration',
                  '/jax/core/compile/backend_compile_duration')
_compile_total = [0.0, False]  # seconds so far, listener registered


def _on_duration(event: str, seconds: float, **_) -> None:
  if event in COMPILE_EVENTS:
    _compile_total[0] += seconds


def compile_seconds() -> float:
  """Seconds JAX has spent compiling in this process since the first call: the difference of two
  calls is the compilation inside the code between them (eager ops' compiles included)."""
  if not _compile_total[1]:
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _compile_total[1] = True
  return _compile_total[0]
