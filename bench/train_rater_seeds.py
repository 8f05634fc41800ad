r"""The README's main command over seeds: what it prints and the figures of its report.

  python -m bench.train_rater_seeds                   # seeds 0, 1, 2 of configs/digits.py
  python -m bench.train_rater_seeds --seeds=0 --config=configs/digits_cnn.py --out=...

Runs `python -m launch.train_rater --config=CONFIG --workdir=TMP --config.seed=S
--config.data.noise_seed=S` per seed, as a user would (noise_seed where the config corrupts
data: launch.train_rater refuses it otherwise), and writes <out>.json: each seed's noise
AUROC, fresh-model held-out losses and test accuracies (rater weights vs uniform; null where the
config trains none, `final_eval.num_models` 0), wall time, and the lines the command printed (the
README quotes seed 0's; tests/test_readme.py checks them).
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from absl import flags

from bench import cli as bench_cli
from bench import provenance
from datarater.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def corrupts(config: str) -> bool:
  """Whether experiment file `config` plants corruption, so reads data.noise_seed; True where it
  does not load (launch.train_rater then says why in its line)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from datarater.data import corruption  # pylint: disable=g-import-not-at-top
  try:
    spec = importlib.util.spec_from_file_location('seeds_bench_config', os.path.join(ROOT, config))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return corruption.from_config(module.get_config().data).describe() is not None
  except Exception:  # pylint: disable=broad-except  (any failure is the launcher's to report)
    return True


def seed_flags(config: str, seed: int) -> list[str]:
  """The seed's config overrides: config.seed, and data.noise_seed where the config corrupts."""
  return [f'--config.seed={seed}', *([f'--config.data.noise_seed={seed}'] if corrupts(config)
                                     else [])]


def run_seed(config: str, seed: int, extra=()) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, '-m', 'launch.train_rater', f'--config={config}',
         f'--workdir={workdir}', *seed_flags(config, seed), *extra], cwd=ROOT,
        capture_output=True, text=True)
    wall = time.time() - t0
    if out.returncode:  # its own error line (e.g. a config it refuses), not a traceback here
      said = [l for l in out.stderr.splitlines() if l.strip()] or [f'exit {out.returncode}']
      raise UserError(f'launch.train_rater --config={config} (seed {seed}) failed: '
                      f'{said[-1].removeprefix("error: ")}')
    with open(os.path.join(workdir, 'report.json')) as f:
      report = json.load(f)
  fresh = report['fresh_models']  # {} with final_eval.num_models 0 (configs/*_bench.py)
  # Printed lines without their clock time, so runs can be compared.
  lines = [re.sub(r'^\d\d:\d\d:\d\d ', '', l) for l in out.stdout.splitlines()]
  num = lambda v: float('nan') if v is None else v  # null: not defined, or a model diverged
  model = lambda name, split, key: num(fresh[name][split][key] if fresh else None)
  return {'noise_auroc': num(report['noise_auroc']),
          'heldout_loss_rater': model('rater', 'heldout', 'loss'),
          'heldout_loss_uniform': model('uniform', 'heldout', 'loss'),
          'test_accuracy_rater': model('rater', 'eval', 'accuracy'),
          'test_accuracy_uniform': model('uniform', 'eval', 'accuracy'),
          'wall_s': wall, 'printed': lines}


_CONFIG = flags.DEFINE_string('config', 'configs/digits.py',
                              'Config file given to launch.train_rater (its overrides are not '
                              'taken: the seeds are set per run).')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'],
                           'Seeds (config.seed, and data.noise_seed where the config corrupts).')
_OUT = flags.DEFINE_string('out', 'bench/results/train_rater_digits_seeds', 'Output prefix.')


def main(argv):
  del argv
  seeds = bench_cli.seeds(_SEEDS.value)
  if not os.path.isfile(os.path.join(ROOT, _CONFIG.value)):
    raise UserError(f'--config {_CONFIG.value!r}: no such file')
  bench_cli.out_folder(_OUT.value)
  results = {}
  for seed in seeds:
    print(f'seed {seed}: launch.train_rater --config={_CONFIG.value} ...', flush=True)
    results[str(seed)] = run_seed(_CONFIG.value, seed)
    r = results[str(seed)]
    print(f'seed {seed}: noise AUROC {r["noise_auroc"]:.4f}, held-out loss rater '
          f'{r["heldout_loss_rater"]:.4f} / uniform {r["heldout_loss_uniform"]:.4f}, test '
          f'accuracy {100 * r["test_accuracy_rater"]:.2f}% / {100 * r["test_accuracy_uniform"]:.2f}%'
          f' ({r["wall_s"]:.0f} s)', flush=True)
  provenance.write_results(_OUT.value, {
      'command': f'python -m launch.train_rater --config={_CONFIG.value} --workdir=DIR '
                 + ' '.join(seed_flags(_CONFIG.value, 'S')),
      'device': f'{os.cpu_count()}-core CPU', 'seeds': results})
  print(f'wrote {_OUT.value}.json')


if __name__ == '__main__':
  bench_cli.run(main, __doc__)
