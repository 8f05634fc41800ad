"""A seconds-long variant of the default experiment for launcher tests, and configs overridden
field by field for any launcher run."""
import contextlib
import io

from configs.digits import get_config


def small_config(data_dir: str, steps: int = 6):
  c = get_config()
  c.data.data_dir = data_dir
  c.outer.steps = steps
  c.inner.population = 2
  c.inner.batch_size = 16
  c.outer.batch_size = 16
  c.inner.reset_every = 4
  c.task.hidden = (16,)
  c.rater.hidden = (16,)
  c.log_every = 2
  c.checkpoint_every = 2
  c.final_eval.train_steps = 5
  c.final_eval.num_models = 0  # no end-of-run fresh models (test_default_run checks them)
  return c


def as_flags(c, sections=None) -> list[str]:
  """The command-line overrides that turn configs/digits.py into `c` (only those of the config
  sections `sections`, if given, and no top-level field: launch.valuate and launch.train refuse
  the others)."""
  flags = [f'--config.data.data_dir={c.data.data_dir}', f'--config.outer.steps={c.outer.steps}',
          f'--config.inner.population={c.inner.population}',
          f'--config.inner.batch_size={c.inner.batch_size}',
          f'--config.outer.batch_size={c.outer.batch_size}',
          f'--config.inner.reset_every={c.inner.reset_every}',
          f'--config.task.hidden={tuple(c.task.hidden)}',
          f'--config.rater.hidden={tuple(c.rater.hidden)}', f'--config.log_every={c.log_every}',
          f'--config.checkpoint_every={c.checkpoint_every}',
          f'--config.final_eval.train_steps={c.final_eval.train_steps}',
          f'--config.final_eval.num_models={c.final_eval.num_models}',
          f'--config.outer.ema={c.outer.ema}',
          f'--config.outer.warmup_steps={c.outer.warmup_steps}']
  section = lambda f: f.split('=')[0].split('.')[1] if f.split('=')[0].count('.') > 1 else ''
  return [f for f in flags if sections is None or section(f) in sections]


def overridden(c, overrides: dict):
  """Config `c` with each dotted field of `overrides` ('inner.batch_size': 4, ...) set."""
  for path, value in overrides.items():
    *parents, field = path.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[field] = value
  return c


def launch_train_rater(config_file: str, overrides: dict, *extra) -> str:
  """`launch.train_rater --config=config_file` with `overrides` as --config.* flags, in this
  process; asserts exit code 0 and returns what it printed."""
  from launch import cli, train_rater  # pylint: disable=g-import-not-at-top
  argv = ['train_rater', f'--config={config_file}', *extra,
          *(f'--config.{k}={v}' for k, v in overrides.items())]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = cli.invoke(train_rater, argv)
  assert code == 0, out.getvalue()[-2000:]
  return out.getvalue()


def stopped_and_resumed(launch, workdir) -> None:
  """`launch(workdir, *flags)` (a run on all 4 devices) stopped after outer step 2, then resumed
  to the end from its checkpoint."""
  first = launch(workdir, '--stop_after=2')
  assert 'on 4 device(s)' in first and 'stopped after outer step 2' in first
  assert not (workdir / 'report.json').exists()
  second = launch(workdir)
  assert 'resumed from the checkpoint at outer step 2' in second
  assert (workdir / 'report.json').exists()
