r"""Outer-step time and compiled peak memory against the unroll length T, per meta-gradient mode.

  python -m bench.meta_step                      # T in {1, 4, 16}, every mode, default model
  python -m bench.meta_step --unrolls=1,4 --repeats=5

Times are medians over `--repeats` calls after a warm-up, all measured in one run (compare
ratios, not absolute numbers, on a shared machine). Memory is XLA's compiled
`memory_analysis()`: temporaries (activations kept for the backward pass live here) plus
arguments and outputs. Writes bench/results/meta_step.json and .png.
"""
from launch import interrupts

if __name__ == '__main__':  # first: a Ctrl-C while JAX loads (in its gc callback) stops it
  interrupts.install()
# pylint: disable=wrong-import-position
import platform
import time

from absl import flags
import jax
import numpy as np

from configs.digits import get_config
from bench import cli as bench_cli
from bench import provenance
from bench.meta_memory import compile_step, plot_modes
from datarater import files
from outer_loop.estimators import META_GRADIENTS

_UNROLLS = flags.DEFINE_list('unrolls', ['1', '4', '16'], 'Values of T (inner.steps).')
_MODES = flags.DEFINE_list('modes', list(META_GRADIENTS), 'Meta-gradient estimators.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed calls per setting (median reported).')
_HIDDEN = flags.DEFINE_list('hidden', ['128', '128'], 'Task-model and rater hidden widths '
                            '(empty: no hidden layer, linear models).')
_OUT = flags.DEFINE_string('out', 'bench/results/meta_step', 'Output path prefix (.json, .png).')


def measure(config, repeats=10) -> dict:
  """One outer step for `config` on random data: compiled memory and median step time."""
  compiled, args, figures, _ = compile_step(config)
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  peak = figures['temp_bytes'] + figures['argument_bytes'] + figures['output_bytes']
  return {**figures, 'peak_bytes': peak, 'step_ms': 1e3 * float(np.median(times))}


def plot(results: list[dict], path: str, device: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
  plot_modes(ax_mem, ax_time, results)
  fig.suptitle(f'DataRater outer step on {device}')
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  results = []
  hidden = tuple(bench_cli.numbers('hidden', _HIDDEN.value, int, lambda x: x > 0, '> 0',
                                  empty_ok=True))  # no hidden layer: a linear model
  unrolls = bench_cli.numbers('unrolls', _UNROLLS.value, int, lambda x: x > 0, '> 0')
  bench_cli.at_least('repeats', _REPEATS.value, 1)
  bench_cli.names('modes', _MODES.value, META_GRADIENTS)
  bench_cli.out_folder(_OUT.value)
  print(f'{"mode":>8} {"T":>4} {"temp MiB":>10} {"peak MiB":>10} {"step ms":>9} {"compile s":>9}')
  for mode in _MODES.value:
    for t in unrolls:
      config = get_config()
      config.inner.steps, config.outer.meta_gradient = t, mode
      config.task.hidden = config.rater.hidden = hidden
      r = {'mode': mode, 'T': t, **measure(config, repeats=_REPEATS.value)}
      results.append(r)
      print(f'{mode:>8} {t:>4} {r["temp_bytes"] / 2**20:>10.2f} {r["peak_bytes"] / 2**20:>10.2f} '
            f'{r["step_ms"]:>9.2f} {r["compile_s"]:>9.1f}', flush=True)
  c = get_config()
  record = {'device': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
            'num_devices': 1, 'host': platform.node(), 'hidden': hidden,
            'population': c.inner.population, 'batch_size': c.inner.batch_size,
            'results': results}
  provenance.write_results(_OUT.value, record,
                           plot=lambda path: plot(results, path, record['device']))
  print(f'wrote {_OUT.value}.json and {_OUT.value}.png')


if __name__ == '__main__':
  bench_cli.run(main, __doc__)
