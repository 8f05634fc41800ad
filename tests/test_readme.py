"""The README's example output is what its main command prints: the lines it quotes are those
bench/results/train_rater_digits_seeds.json recorded for seed 0 (clock readings aside), and a slow
check reruns the command and compares the figures with that file. The README's own-model example
(my_task.py, my_config.py) meta-learns a rater and trains under it as written. Every repository
path the README and WORKSPACE.md name exists. The figures of the README's curation tables are
those their bench formats from the results files the tables name."""
import glob
import importlib
import json
import os
import re
import subprocess
import sys

import numpy as np

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'bench', 'results', 'train_rater_digits_seeds.json')
TIMING = re.compile(r'\d+(\.\d+)? (steps/s|s\b)')  # rates and durations vary run to run
CLOCK = re.compile(r'^\d\d:\d\d:\d\d ')  # the log's time of day


def _example_output() -> list[str]:
  """The lines of the README's first code block after 'prints' (the example output)."""
  text = open(os.path.join(ROOT, 'README.md')).read()
  block = re.search(r'```\n(.*?)```', text[text.index('prints'):], re.S)
  return [l for l in block.group(1).splitlines() if l.strip()]


def _strip(line: str) -> str:
  return TIMING.sub('<t>', CLOCK.sub('', line))


def test_readme_output_is_the_recorded_output_of_seed_0():
  recorded = [_strip(l) for l in json.load(open(RESULTS))['seeds']['0']['printed']]
  quoted = _example_output()
  assert len(quoted) >= 3
  for line in quoted:
    assert _strip(line) in recorded, line


@pytest.mark.slow
def test_the_main_command_reproduces_its_recorded_figures():
  """A reproducibility check of the README's figures, not a correctness oracle: the main command's
  figures equal those recorded in bench/results (a change that moves them must rerun the bench
  and the README). Run as the README runs it: in a process without the tests' quick-compile XLA
  flags (they change the numerics: held-out loss 0.1111 against 0.1086, measured before the
  components' keys were separated)."""
  want = json.load(open(RESULTS))['seeds']['0']
  code = ('import json\nfrom bench.train_rater_seeds import run_seed\n'
          'print(json.dumps(run_seed("configs/digits.py", 0)))')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=1200, env={**env, 'PYTHONPATH': ROOT})
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  for key in ('noise_auroc', 'heldout_loss_rater', 'heldout_loss_uniform',
              'test_accuracy_rater', 'test_accuracy_uniform'):
    assert got[key] == pytest.approx(want[key], rel=2e-3, abs=2e-3), key


def _python_block(name: str) -> str:
  """The README's code block that starts with the comment `# name`."""
  text = open(os.path.join(ROOT, 'README.md')).read()
  return re.search(rf'```python\n(# {re.escape(name)}\n.*?)```', text, re.S).group(1)


def test_own_model_example_runs(tfds_dir, tmp_path, monkeypatch):
  from datarater import export  # pylint: disable=g-import-not-at-top
  from datarater.meta_train import meta_train  # pylint: disable=g-import-not-at-top
  from datarater.train import train  # pylint: disable=g-import-not-at-top
  for name in ('my_task.py', 'my_config.py'):
    (tmp_path / name).write_text(_python_block(name))
  monkeypatch.syspath_prepend(str(tmp_path))
  for module in ('my_task', 'my_config'):
    sys.modules.pop(module, None)
  config = importlib.import_module('my_config').get_config()
  config.data.data_dir = tfds_dir
  config.outer.steps, config.log_every, config.checkpoint_every = 3, 3, 3
  config.inner.population, config.final_eval.num_models, config.final_eval.train_steps = 2, 1, 5
  meta_train(config, str(tmp_path / 'run'))
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  split = pipeline.load_split(config.data, 'train')
  assert np.isfinite(export.load_rater(str(tmp_path / 'run'))(split.features)).all()
  config.train.epochs, config.train.seeds = 3, (0,)
  report = train(config, 'datarater', rater=str(tmp_path / 'run'), workdir=str(tmp_path / 'fit'))
  assert report['policy'] == 'datarater' and report['num_train'] == len(split)
  assert os.path.exists(tmp_path / 'fit' / 'report.json')


def _repository_top() -> set[str]:
  """The top-level entries git tracks (a run's outputs, e.g. workdirs/, are not checked)."""
  listed = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
  return {line.split('/')[0] for line in listed.splitlines()}


def _named_paths(text: str) -> list[str]:
  """The repository paths in `text`'s code spans (a `{a,b}` part names each of a and b)."""
  tops = '|'.join(re.escape(d) for d in sorted(_repository_top()))
  paths = []
  for span in re.findall(r'`([^`\s]+)`', text):
    span = span.split('::')[0].rstrip('/')  # file::symbol, folder/
    if re.match(rf'({tops})(/|$)', span) and '<' not in span and '*' not in span:
      alternatives = re.search(r'\{([^}]*)\}', span)
      paths += ([span.replace(alternatives.group(0), a) for a in alternatives.group(1).split(',')]
                if alternatives else [span])
  return paths


def test_every_path_the_docs_name_exists():
  for name in ('README.md', 'WORKSPACE.md'):
    paths = _named_paths(open(os.path.join(ROOT, name)).read())
    assert len(paths) > 20, name
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f'{name} names paths that do not exist: {missing}'


def _config_fields() -> set[str]:
  """Every section and field (dotted) of every config in configs/, its named parts included, and
  the fields of every registered task's and rater's schema (optional ones a config leaves out)."""
  from datarater.tasks import registry  # pylint: disable=g-import-not-at-top
  fields = {f'{kind}.{field}' for (kind, _), schema in registry.SCHEMAS.items()
            for field in schema}

  def add(config, prefix=''):
    for key, value in config.items():
      fields.add(prefix + key)
      if hasattr(value, 'items'):
        add(value, f'{prefix}{key}.')
  for path in glob.glob(os.path.join(ROOT, 'configs', '*.py')):
    module = importlib.import_module(f'configs.{os.path.basename(path)[:-3]}')
    add(module.get_config())
    if module.__name__ == 'configs.text_bench':
      add(module.get_config('bench'))
  return fields


def _is_module(name: str) -> bool:
  """Whether dotted `name` starts with a module of the library ('valuation.base.Valuation')."""
  parts = name.split('.')
  return any(os.path.exists(os.path.join(ROOT, 'datarater', *parts[:i]) + '.py')
             for i in range(1, len(parts) + 1))


def test_every_config_field_the_docs_name_exists():
  """A dotted name in a code span that starts with a config section ('outer.schedule',
  '--config.valuation.store=True') must be a field of some config."""
  fields = _config_fields()
  sections = sorted({f.split('.')[0] for f in fields if '.' in f})
  name = re.compile(r'(?<![\w./])((?:%s)(?:\.\w+)+)' % '|'.join(sections))  # not a.b.outer
  for doc in ('README.md', 'WORKSPACE.md'):
    text = open(os.path.join(ROOT, doc)).read()
    blocks = re.findall(r'```[a-z]*\n(.*?)```', text, re.S)
    spans = blocks + re.findall(r'`([^`]+)`', re.sub(r'```[a-z]*\n.*?```', '', text, flags=re.S))
    named = {m for span in spans for m in name.findall(re.sub(r'(--)?config\.', ' ', span))}
    named = {n for n in named if not re.search(r'\.(py|md|json|jsonl|png|parquet|log)$', n)}
    assert len(named) > 5, doc
    unknown = sorted(n for n in named - fields if not _is_module(n))
    assert not unknown, f'{doc} names config fields no config has: {unknown}'


def test_the_count_of_bad_inputs_the_readme_gives_is_the_tests(tmp_path):
  from tests.test_bad_input import NUM_CASES  # pylint: disable=g-import-not-at-top
  from tests.test_text_folder import _bad_cases  # pylint: disable=g-import-not-at-top
  readme = ' '.join(open(os.path.join(ROOT, 'README.md')).read().split())
  assert f'`tests/test_bad_input.py` runs {NUM_CASES} bad inputs' in readme
  text_cases = len(_bad_cases(tmp_path / 'source', tmp_path))
  assert f'`tests/test_text_folder.py` {text_cases} of `launch.prepare_text`' in readme



def test_every_registered_policy_is_named_where_the_policies_are_listed():
  """WORKSPACE's policy recipe: a new policy is named in the README's `launch.train` paragraph,
  launch/train.py's docstring and WORKSPACE's layout row of datarater/policies/."""
  from datarater import policies  # pylint: disable=g-import-not-at-top
  readme = open(os.path.join(ROOT, 'README.md')).read()
  start = readme.index('`launch.train --policy=NAME` trains')
  workspace = open(os.path.join(ROOT, 'WORKSPACE.md')).read()
  row = re.search(r'^\| `datarater/policies/` \|.*$', workspace, re.M).group(0)
  lists = {'README': readme[start:readme.index('\n\n', start)], 'WORKSPACE': row,
           'launch/train.py': importlib.import_module('launch.train').__doc__}
  for where, text in lists.items():
    named = set(re.findall(r'[a-z_]+', text))
    missing = sorted(set(policies.POLICIES) - named)
    assert not missing, f'{where} does not name policies {missing}'


def _launcher_commands(text: str):
  """(launcher, flag names) of each `python -m launch.X ...` command and `launch.X --flag` span
  in `text` (continuation lines joined, a blank line ends one; config overrides left out)."""
  flat = re.sub(r'\\\n\s*', ' ', text)
  flag = r'(?=\s)[ \t]*\n?[ \t]*--[^\s`]+'  # after spaces and at most one line break
  for match in re.finditer(rf'(?:python -m |`)launch\.(\w+)((?:{flag})+)', flat):
    names = re.findall(r'--(\w+)', match.group(2))
    yield match.group(1), [n for n in names if n not in ('config', 'help')]


def test_every_launcher_flag_the_docs_give_is_one_the_launcher_defines():
  from absl import flags  # pylint: disable=g-import-not-at-top
  texts = [open(os.path.join(ROOT, name)).read() for name in ('README.md', 'WORKSPACE.md')]
  texts += [open(p).read() for p in glob.glob(os.path.join(ROOT, 'launch', '*.py'))]
  checked = 0
  for text in texts:
    for launcher, names in _launcher_commands(text):
      fv = flags.FlagValues()
      importlib.import_module(f'launch.{launcher}').define_flags(fv)
      unknown = [n for n in names if n not in fv]
      assert not unknown, f'launch.{launcher} has no flags {unknown}'
      checked += bool(names)
  assert checked >= 20, checked


def _default_out(module: str):
  """The output prefix bench script `module` writes without --out (its flag's default), or None
  where the default is not a literal path (bench.selection derives its own)."""
  source = open(os.path.join(ROOT, 'bench', f'{module}.py')).read()
  found = re.search(r"DEFINE_string\(\s*'out',\s*(?:os\.path\.join\(([^)]*)\)|'([^']*)')", source)
  if not found:
    return None
  if found.group(1):
    return '/'.join(re.findall(r"'([^']*)'", found.group(1)))
  return found.group(2) or None


def test_each_bench_command_writes_the_results_the_readme_names_with_it():
  """A `python -m bench.X ...` command the README gives, followed in its sentence by the results
  files it made (`bench/results/NAME.{md,json,png}`), writes NAME: its --out, else its default.
  (Three commands had lost their --out: as written they wrote valuation_noise and curation, the
  latter over the digits results, not the files named.)"""
  text = open(os.path.join(ROOT, 'README.md')).read()
  flat = re.sub(r'\\\n\s*', ' ', text).replace('\n\n', '\0').replace('\n', ' ')
  arg = r'''\s+--[\w.]+(?:=(?:'[^']*'|"[^"]*"|[^\s`]*))?'''
  commands = list(re.finditer(rf'python -m bench\.(\w+)((?:{arg})*)', flat))
  checked = 0
  for i, command in enumerate(commands):
    end = commands[i + 1].start() if i + 1 < len(commands) else len(flat)
    after = flat[command.end():min(end, command.end() + 200)].split('\0')[0]
    named = re.findall(r'bench/results/(\w+)\.(?:\{|md|json|png|log)', after)
    given = re.search(r'--out=(\S+)', command.group(2))
    out = given.group(1) if given else _default_out(command.group(1))
    if named and out:
      checked += 1
      assert os.path.basename(out) in named, (command.group(0), named)
  assert checked >= 10, checked


def _results_tables() -> list[tuple[str, list[str]]]:
  """(text, rows) of each table under the README's `## Results`: its rows, and the text before it
  back to the previous heading or table (where the table names its results files)."""
  text = open(os.path.join(ROOT, 'README.md')).read()
  section = text[text.index('\n## Results\n'):text.index('\n## Layout\n')]
  tables, before, rows = [], [], []
  for line in section.splitlines():
    if line.lstrip().startswith('|'):
      rows.append(line.strip())
      continue
    if rows:
      tables.append(('\n'.join(before), rows))
      before, rows = [], []
    if line.startswith('#'):
      before = []
    before.append(line)
  return tables


def _curation_markdown(d: dict) -> str:
  from bench import curation  # pylint: disable=g-import-not-at-top
  keyed = lambda by_keep: {float(k): v for k, v in by_keep.items()}  # JSON keys are strings
  runs = {p: {s: {**r, 'random': keyed(r['random']),
                  'filtered': {m: keyed(f) for m, f in r['filtered'].items()}}
              for s, r in by_seed.items()} for p, by_seed in d['runs'].items()}
  summary = curation.summarize(runs, d['noise'], d['keep'], d['methods'])
  return curation.markdown(summary, d['keep'], d['methods'], d['epochs'],
                           d['config']['data']['name'])


def _lm_curation_markdown(d: dict) -> str:
  import ml_collections  # pylint: disable=g-import-not-at-top
  from bench import lm_curation  # pylint: disable=g-import-not-at-top
  bench, stored = ml_collections.ConfigDict(d['bench']), d['summary']  # stored: the sizes only
  tokens = stored['budget_tokens'] // (bench.transfer.steps * bench.transfer.batch_size)
  summary = lm_curation.summarize(d['seeds'], bench, tokens,
                                  stored['param_ratio_small_to_large'])
  return lm_curation.markdown(summary, bench, ml_collections.ConfigDict(d['config']),
                              d['seconds'])


# {bench: the .md it writes from a JSON of its own}, for bench/results/NAME.json where NAME starts
# with the bench's name; the figures recomputed from the per-seed records (the run's sizes as
# recorded). Not here: bench.selection (its 4.7 MB digits JSON takes 0.4 s to read) and
# bench.valuation_noise (it defines its flags on import).
_MARKDOWN = {'curation': _curation_markdown, 'lm_curation': _lm_curation_markdown}


def test_the_results_tables_quote_the_figures_their_files_hold():
  """Every `mean +- spread` (or `difference +- paired s.e.`) in a Results table whose text names
  a results set of a bench in `_MARKDOWN` with its .md is in that .md as the bench writes it now
  from the set's JSON, through the bench's own summary and formatting (a column headed `before`
  quotes an older code version's results, not a stored file)."""
  checked = 0
  for before, rows in _results_tables():
    names = {m.group(1) for m in re.finditer(r'bench/results/(\w+)\.(?:\{([^}]*)\}|md\b)', before)
             if m.group(2) is None or 'md' in m.group(2).split(',')}
    markdown = []
    for name in sorted(names):
      path = os.path.join(ROOT, 'bench', 'results', name + '.json')
      bench = next((b for b in _MARKDOWN if name.startswith(b)), None)
      if bench and os.path.exists(path):
        with open(path) as f:
          markdown.append(_MARKDOWN[bench](json.load(f)))
    if not markdown:
      continue
    header = [c.strip() for c in rows[0].strip('|').split('|')]
    for row in rows[2:]:
      for column, cell in zip(header, row.strip('|').split('|')):
        for mean, spread in re.findall(r'([-+]?\d+\.\d+) \+- (\d+\.\d+)', cell):
          if column != 'before':
            checked += 1
            assert any(f'{mean} ± {spread}' in m for m in markdown), (sorted(names), row)
  assert checked >= 50, checked
