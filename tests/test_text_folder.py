"""Your own text folder as a dataset for configs/text.py (`launch.prepare_text`).

The prepared splits against the windows cut here from each file's bytes, splits disjoint by file,
the text config's models and the pipeline on it, the output written whole or not at all, and bad
input: exit code 2, one `error:` line naming the value, nothing written.
"""
import contextlib
import hashlib
import io
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import text
from datarater import config_checks, tasks
from datarater.curation import scores_file
from datarater.curation.filter import filter_dataset
from datarater.data import pipeline, python_text, text_folder
from datarater.data import source as source_lib
from datarater.errors import UserError
from launch import cli, prepare_text

L = python_text.SEQ_LEN
# (relative path, length in bytes): the files the default suffixes read, by document id
READ = [('a.txt', 5 * L + 17), ('b.md', 3 * L), ('notes/c.rst', 2 * L + 1), ('notes/d.txt', L - 1),
        ('notes/deep/e.txt', 7 * L + 100), ('z.md', 4 * L + 3)]
SKIPPED = [('f.py', 3 * L), ('.hidden.txt', 3 * L), ('.git/g.txt', 3 * L), ('notes/h.txt~', 3 * L)]


def _make_corpus(root, files=READ + SKIPPED, salt=0):
  for i, (name, size) in enumerate(files):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([salt, i])
    path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
  return root


def _windows(data: bytes) -> list:
  """Non-overlapping L-byte windows from the start, the short tail dropped (independently)."""
  return [data[i:i + L] for i in range(0, len(data) - L + 1, L)]


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('text')
  source = _make_corpus(root / 'corpus')
  report = text_folder.prepare_text(str(source), str(root / 'out'), heldout_fraction=0.25,
                                    test_fraction=0.2, seed=3)
  return source, root / 'out', report


def test_the_splits_are_the_files_windows_each_file_in_one_split(prepared):
  source, out, report = prepared
  builder = tfds.builder_from_directory(str(out))
  splits = {s: pipeline.read_split(builder, s) for s in ('train', 'heldout', 'test')}
  found = {}  # document -> (split, its rows as bytes)
  for name, split in splits.items():
    tokens, docs = split.features['tokens'], split.features['document']
    assert tokens.dtype == np.int32 and tokens.shape[1:] == (L,)
    assert list(docs) == sorted(docs)  # stored by document id, each file's windows in order
    for doc in np.unique(docs):
      assert doc not in found, f'document {doc} in {found[doc][0]} and {name}'
      found[int(doc)] = (name, [bytes(t.astype(np.uint8)) for t in tokens[docs == doc]])
    assert not split.is_corrupted.any() and split.corruption_kinds == ('clean',)
  expected = {i: _windows((source / name).read_bytes()) for i, (name, _) in enumerate(READ)}
  expected = {i: w for i, w in expected.items() if w}  # d.txt is shorter than one window
  assert sorted(found) == sorted(expected)
  for doc, windows in expected.items():
    assert found[doc][1] == windows, READ[doc][0]
  assert report['files'] == [name for name, _ in READ]
  total = sum(map(len, expected.values()))
  biggest = max(map(len, expected.values()))
  for name, share in (('train', 0.55), ('heldout', 0.25), ('test', 0.2)):
    n = len(splits[name])
    assert 0 < n <= share * total + biggest and report['total'][name]['sequences'] == n


def test_metadata_names_the_source_and_digests_its_files(prepared, tmp_path):
  source, out, _ = prepared
  meta = dict(tfds.builder_from_directory(str(out)).info.metadata)
  assert meta['source'] == str(source) and meta['num_files'] == len(READ) and meta['seed'] == 3
  def digest(root):
    h = hashlib.sha256()
    for name, _ in READ:
      h.update(name.encode() + b'\0' + hashlib.sha256((root / name).read_bytes()).digest())
    return h.hexdigest()[:16]
  assert meta['sources_sha256'] == digest(source)
  copy = _make_corpus(tmp_path / 'copy', READ, salt=1)  # other bytes: another digest
  text_folder.prepare_text(str(copy), str(tmp_path / 'out'))
  other = dict(tfds.builder_from_directory(str(tmp_path / 'out')).info.metadata)
  assert other['sources_sha256'] == digest(copy) != meta['sources_sha256']



def test_a_file_name_not_in_utf8_is_read_and_digested_by_its_bytes(tmp_path):
  """A file whose name is not UTF-8 (Latin-1 'café.txt'; Python gives it as a str holding a
  surrogate) is a document like any other, its name's bytes in the digest (it stopped with a
  UnicodeEncodeError traceback)."""
  source = _make_corpus(tmp_path / 'corpus', READ[:3])
  latin1 = os.path.join(os.fsencode(source), b'caf\xe9.txt')
  with open(latin1, 'wb') as f:
    f.write(bytes(range(256)) * 3)
  report = text_folder.prepare_text(str(source), str(tmp_path / 'out'))
  names = [n.encode() for n, _ in READ[:3]] + [b'caf\xe9.txt']
  order = sorted(range(4), key=lambda i: os.fsdecode(names[i]))
  assert [os.fsencode(n) for n in report['files']] == [names[i] for i in order]
  h = hashlib.sha256()
  for i in order:
    with open(os.path.join(os.fsencode(source), names[i]), 'rb') as f:
      h.update(names[i] + b'\0' + hashlib.sha256(f.read()).digest())
  meta = dict(tfds.builder_from_directory(str(tmp_path / 'out')).info.metadata)
  assert meta['sources_sha256'] == h.hexdigest()[:16]
  doc = [os.fsencode(n) for n in report['files']].index(b'caf\xe9.txt')
  split = pipeline.read_split(tfds.builder_from_directory(str(tmp_path / 'out')),
                              report['splits'][doc])
  rows = split.features['tokens'][split.features['document'] == doc]
  assert [bytes(r.astype(np.uint8)) for r in rows] == _windows(bytes(range(256)) * 3)


def test_pipes_and_sockets_named_as_text_are_not_documents(tmp_path):
  """A named pipe (or socket) ending in .txt is no document: reading it would wait for a writer
  (prepare_text hung)."""
  source = _make_corpus(tmp_path / 'corpus', READ[:2])
  os.mkfifo(source / 'pipe.txt')
  os.symlink(source / 'pipe.txt', source / 'link_to_pipe.md')
  assert text_folder.text_files(str(source), text_folder.SUFFIXES) == sorted(n for n, _ in READ[:2])


def _split_of_each_document(out):
  """document id -> the one split holding its rows, read from the dataset folder."""
  builder, found = tfds.builder_from_directory(str(out)), {}
  for split in ('train', 'heldout', 'test'):
    for doc in np.unique(pipeline.read_split(builder, split).features['document']):
      assert int(doc) not in found
      found[int(doc)] = split
  return found


def test_copies_of_a_file_go_to_one_split_and_trusted_copies_of_train_to_none(tmp_path):
  """Files whose windows are the same bytes (copies, a link, one differing only in its dropped
  tail) go to one split, each still a document: no split holds another's text (a copy in train
  and one in heldout put training text in the outer loss). With --heldout_source, a trusted file
  whose windows a --source file holds is in no split."""
  source = _make_corpus(tmp_path / 'corpus', READ)
  e = (source / 'notes/deep/e.txt').read_bytes()
  for i in range(4):
    (source / f'copies/b{i}.md').parent.mkdir(exist_ok=True)
    (source / f'copies/b{i}.md').write_bytes((source / 'b.md').read_bytes())
    (source / f'copies/e{i}.txt').write_bytes(e[:7 * L] + bytes([i]) * (i + 1))
  os.symlink('../z.md', source / 'copies' / 'link.md')
  report = text_folder.prepare_text(str(source), str(tmp_path / 'out'), heldout_fraction=0.25,
                                    test_fraction=0.2, seed=3)
  found = _split_of_each_document(tmp_path / 'out')
  groups = {}  # the windows' bytes -> the splits of the files holding them
  for doc, name in enumerate(report['files']):
    windows = _windows((source / name).read_bytes())
    assert (doc in found) == bool(windows), name  # every file with a window is a document
    if windows:
      groups.setdefault(b''.join(windows), set()).add(found[doc])
  assert len(groups) == 5 and all(len(s) == 1 for s in groups.values()), groups
  assert len(set(found.values())) == 3
  trusted = _make_corpus(tmp_path / 'trusted', salt=1)
  (trusted / 'a_copy.txt').write_bytes((source / 'a.txt').read_bytes())
  report = text_folder.prepare_text(str(source), str(tmp_path / 'out2'), seed=3,
                                    heldout_source=str(trusted))
  found = _split_of_each_document(tmp_path / 'out2')
  copy = report['files'].index('a_copy.txt', report['heldout_files_from'])
  assert copy not in found and report['splits'][copy] is None
  assert {'heldout', 'test'} <= {found[d] for d in range(report['heldout_files_from'], len(
      report['files'])) if d in found}


def test_windows_an_earlier_split_holds_are_dropped_and_counted(tmp_path):
  """Files and their extensions (more windows), a chapter two files share and a licence-like
  header window that every file starts with, assigned apart, put the same sequences in two
  splits: a heldout window whose bytes are a train window's is dropped, and so is a test window
  whose bytes are a train or a heldout window's (counted as train's if both); train and heldout
  keep theirs, nothing else is dropped. Expected sequences and counts come from sets of the
  windows' bytes cut here from the files; the counts are in the metadata and the summary line."""
  header = (b'Licensed under the Apache License, Version 2.0; see LICENSE. ' * 3)[:L]
  rng = np.random.default_rng(0)
  body = lambda n: rng.integers(0, 256, n * L + 7, dtype=np.uint8).tobytes()
  source = tmp_path / 'corpus'
  source.mkdir()
  for i, n in enumerate([2, 7, 3, 5, 1, 6]):
    (source / f'doc{i}.txt').write_bytes(header + body(n))
  v1 = header + body(4)[:4 * L]
  (source / 'v1.txt').write_bytes(v1)
  (source / 'v2.txt').write_bytes(v1 + body(1))
  chapter = body(2)[:2 * L]
  for i, n in enumerate([1, 3]):
    (source / f'ch{i}.txt').write_bytes(header + body(n)[:n * L] + chapter + body(1))
  w1 = header + body(3)[:3 * L]
  (source / 'w1.txt').write_bytes(w1)
  (source / 'w2.txt').write_bytes(w1 + body(2))
  out = tmp_path / 'out'
  code, err, printed = _invoke([f'--source={source}', f'--out={out}', '--heldout_fraction=0.2',
                                '--test_fraction=0.2', '--seed=1'])
  assert code == 0 and not err, err
  report = json.loads((out / text_folder.REPORT).read_text())
  split_of = dict(zip(report['files'], report['splits']))
  windows = {name: _windows((source / name).read_bytes()) for name in report['files']}
  held = {s: {w for n, ws in windows.items() if split_of[n] == s for w in ws}
          for s in text_folder.SPLITS}  # each split's windows' bytes, before any is dropped
  builder = tfds.builder_from_directory(str(out))
  counts = {}  # (split, the first earlier split holding the window) -> windows dropped
  for i, split in enumerate(text_folder.SPLITS):
    want = []
    for name in sorted(n for n in windows if split_of[n] == split):
      for w in windows[name]:
        earlier = [s for s in text_folder.SPLITS[:i] if w in held[s]]
        if earlier:
          counts[split, earlier[0]] = counts.get((split, earlier[0]), 0) + 1
        else:
          want.append((report['files'].index(name), w))
    got = pipeline.read_split(builder, split).features
    assert [(int(d), bytes(t.astype(np.uint8))) for d, t in zip(
        got['document'], got['tokens'])] == sorted(want, key=lambda x: x[0]), split
    dropped = [(r, counts.get((split, r), 0)) for r in text_folder.SPLITS[:i]]
    for r, n in dropped:
      key = f'dropped_as_in_{r}'
      assert builder.info.metadata[key][split] == report['total'][split][key] == n
    line = ', '.join(f'{n} dropped: also in {r}' for r, n in dropped)
    assert f'{split}: {len(want)} sequences from {len({d for d, _ in want})} files' + (
        f' ({line})' if line else '') in printed.splitlines()
  # the cases planted, each met: heldout windows in train; test windows in train alone, in
  # heldout alone and in both
  test = [w for n, ws in windows.items() if split_of[n] == 'test' for w in ws]
  for in_train, in_heldout in ((True, False), (False, True), (True, True)):
    assert any((w in held['train'], w in held['heldout']) == (in_train, in_heldout) for w in test)
  assert counts['heldout', 'train']


def test_a_heldout_source_gives_heldout_and_test_and_source_only_train(prepared, tmp_path):
  """--heldout_source: the held-out (outer) and test sequences are its files' windows alone, in
  the ratio of the two fractions, and every file of --source with a window is in train."""
  source, _, _ = prepared
  trusted = _make_corpus(tmp_path / 'trusted', salt=1)
  report = text_folder.prepare_text(str(source), str(tmp_path / 'out'), heldout_fraction=0.3,
                                    test_fraction=0.3, seed=1, heldout_source=str(trusted))
  builder = tfds.builder_from_directory(str(tmp_path / 'out'))
  rows = {}  # split -> {document: its rows as bytes}
  for split in ('train', 'heldout', 'test'):
    got = pipeline.read_split(builder, split)
    docs = got.features['document']
    rows[split] = {int(d): [bytes(t.astype(np.uint8)) for t in got.features['tokens'][docs == d]]
                   for d in np.unique(docs)}
  n = len(READ)
  files = [(source, name) for name, _ in READ] + [(trusted, name) for name, _ in READ]
  want = {i: _windows((root / name).read_bytes()) for i, (root, name) in enumerate(files)}
  assert rows['train'] == {i: w for i, w in want.items() if i < n and w}
  held = {**rows['heldout'], **rows['test']}
  assert held == {i: w for i, w in want.items() if i >= n and w}
  assert rows['heldout'] and rows['test'] and not set(rows['heldout']) & set(rows['test'])
  assert report['files'] == [name for name, _ in READ] * 2
  assert builder.info.metadata['heldout_source'] == str(trusted)


def test_the_text_config_and_its_models_read_it(prepared):
  _, out, _ = prepared
  c = text.get_config()
  c.data.dataset_dir = str(out)
  config_checks.validate(c, [*list(config_checks.SECTIONS)[1:], 'task', 'rater', 'features.task'])
  splits = {s: pipeline.load_split(c.data, s) for s in (c.data.train_split,
                                                        c.data.heldout_split, c.data.eval_split)}
  info = splits['train'].info
  ref = pipeline.data_info(python_text.PythonText(data_dir=str(out.parent / 'unbuilt')))
  for name in ('tokens', 'document'):  # python_text's features, as the text models read them
    assert info.spec[name] == ref.spec[name] and info.stored[name] == ref.stored[name]
  task, rater = tasks.make_task(c.task, info), tasks.make_rater(c.rater, info)
  for split in splits.values():
    task.check_data(split.features)
    rater.check_data(split.features)
  params = jax.eval_shape(task.init, jax.random.key(0))
  batch = splits['train'].take(np.arange(4))
  assert jax.eval_shape(task.per_example_loss, params, batch).shape == (4,)
  phi = jax.eval_shape(rater.init, jax.random.key(1))
  assert jax.eval_shape(rater.score, phi, batch).shape == (4,)


@pytest.mark.parametrize('size', [0, 1 << 16])
def test_a_record_file_cut_short_is_one_error_naming_the_folder(prepared, tmp_path, size):
  """A small split's record file cut to below its first 64 KiB chunk (array_record: 'should
  be at least 64KB big'; an empty file from a failed copy) or to exactly that chunk (its records
  read, without an error, as examples of None values) is a UserError naming the dataset folder,
  read whole (`load_split`) or streamed (`Source`), as a file cut elsewhere already was."""
  _, out, _ = prepared
  cut = tmp_path / 'cut'
  shutil.copytree(out, cut)
  records = next(cut.glob('*-train.array_record*'))
  assert records.stat().st_size > size  # the cut shortens it
  with open(records, 'r+b') as f:
    f.truncate(size)
  c = text.get_config()
  c.data.dataset_dir = str(cut)
  want = f'the record files of {str(cut)!r} are damaged or missing'
  with pytest.raises(UserError, match=re.escape(want)):
    pipeline.load_split(c.data, 'train')
  with pytest.raises(UserError, match=re.escape(want)):
    source_lib.Source(pipeline.builder_of(c.data), 'train').take(np.arange(2))
  pipeline.load_split(c.data, 'heldout')  # the other splits' files still read
  # launch.filter copies a split it does not filter record by record (`tfds_writer`): the same
  # line, where it raised array_record's RuntimeError or TFDS's TypeError on None, and nothing
  # is written.
  scores, n = str(tmp_path / 'scores.parquet'), len(pipeline.load_split(c.data, 'heldout'))
  scores_file.write(scores, np.arange(n), np.zeros(n), np.zeros(n), dataset=str(cut),
                    split='heldout', planted=None)
  with pytest.raises(UserError, match=re.escape(want)):
    filter_dataset(str(cut), str(tmp_path / 'filtered'), ['heldout'], scores=scores, keep=0.5)
  assert not (tmp_path / 'filtered').exists()


def _invoke(argv):
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as printed:
    code = cli.invoke(prepare_text, ['prepare_text', *argv])
  return code, [l for l in err.getvalue().splitlines() if l.strip()], printed.getvalue()


def _snapshot(root):
  return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
          for p in sorted(root.rglob('*'))}


def test_the_launcher_writes_it_again_byte_for_byte_only_with_overwrite(prepared, tmp_path):
  source, out, _ = prepared
  argv = [f'--source={source}', f'--out={tmp_path / "out"}', '--heldout_fraction=0.25',
          '--test_fraction=0.2', '--seed=3']
  code, err, printed = _invoke(argv)
  assert code == 0 and not err and 'train: ' in printed
  assert _snapshot(tmp_path / 'out') == _snapshot(out)
  assert _invoke(argv)[0] == 2
  assert _invoke([*argv, '--overwrite', '--seed=4'])[0] == 0  # another assignment
  assert _snapshot(tmp_path / 'out') != _snapshot(out)
  assert sorted(os.listdir(tmp_path)) == ['out']  # no temporary folder left


def test_scores_of_the_folder_before_it_was_prepared_again_are_refused(tmp_path):
  """A scores file (launch.valuate's, launch.filter's) names a dataset folder by path: prepared
  again from the same text (the same bytes, new files) its scores still hold; from edited text
  (here one file's bytes, not its length: every split keeps its size and ids) the folder holds
  other sequences under the same ids, and the old scores are refused."""
  source = _make_corpus(tmp_path / 'corpus')
  c = text.get_config()
  c.data.dataset_dir = str(tmp_path / 'out')
  def score_train():  # one value per train sequence: its first byte
    text_folder.prepare_text(str(source), c.data.dataset_dir, overwrite=True)
    tokens = pipeline.load_split(c.data, 'train').features['tokens']
    return len(tokens), tokens[:, 0].astype(np.float64)
  n, first = score_train()
  path = str(tmp_path / 'scores.parquet')
  scores_file.write(path, np.arange(n), first, first, dataset=pipeline.dataset_name(c.data),
                    split='train')
  read = lambda: scores_file.read_values(path, n, 'train', pipeline.dataset_name(c.data))
  np.testing.assert_array_equal(read(), first)
  score_train()
  np.testing.assert_array_equal(read(), first)
  (source / 'a.txt').write_bytes(bytes(255 - b for b in (source / 'a.txt').read_bytes()))
  n_again, first_again = score_train()
  assert n_again == n and not np.array_equal(first_again, first)  # same ids, other sequences
  with pytest.raises(UserError, match='as it was before it was written again'):
    read()


def test_a_failure_while_writing_leaves_no_output(prepared, tmp_path, monkeypatch):
  source, _, _ = prepared
  read = text_folder._read
  calls = []
  def changed(folder, name):  # the files change after they were planned
    calls.append(name)
    data = read(folder, name)
    return data if len(calls) <= len(READ) else data + b'!'
  monkeypatch.setattr(text_folder, '_read', changed)
  with pytest.raises(UserError, match='changed while it was prepared'):
    text_folder.prepare_text(str(source), str(tmp_path / 'out'))
  assert os.listdir(tmp_path) == []


def _bad_cases(source, root):
  ok = [f'--source={source}', f'--out={root / "new"}']
  small = _make_corpus(root / 'small', READ[:2] + SKIPPED)
  one = _make_corpus(root / 'one', READ[:1])  # one file: heldout or test would get none
  same = root / 'same'  # whichever file train gets holds both windows: heldout and test none
  same.mkdir()
  for name, content in (('a.txt', b'x' * L + b'y' * L), ('b.txt', b'y' * L + b'x' * L),
                        ('c.txt', b'x' * 2 * L + b'y' * L)):
    (same / name).write_bytes(content)
  apart = root / 'apart'  # heldout and test one file each, test's windows all heldout's
  apart.mkdir()
  for name, content in (('a.txt', b'x' * L + b'y' * L), ('b.txt', b'y' * L + b'x' * L)):
    (apart / name).write_bytes(content)
  (root / 'a_file').write_text('x')
  (root / 'taken').mkdir()
  return [
      ([f'--out={root / "new"}'], '--source is required'),
      ([f'--source={root / "nowhere"}', f'--out={root / "new"}'], 'nowhere'),
      ([f'--source={root / "a_file"}', f'--out={root / "new"}'], 'a_file'),
      ([*ok, '--suffixes=.tex'], '.tex'),
      ([f'--source={small}', f'--out={root / "new"}'], 'too little text'),
      ([*ok, '--heldout_fraction=0'], '--heldout_fraction'),
      ([*ok, '--test_fraction=1'], '--test_fraction'),
      ([*ok, '--heldout_fraction=0.5', '--test_fraction=0.5'], '0.5 + 0.5'),
      ([*ok, '--seed=-1'], '--seed'),
      ([*ok, '--max_windows=-2'], '--max_windows'),
      ([*ok, '--suffixes=.txt,'], '--suffixes'),
      ([f'--source={source}'], '--out is required'),
      ([f'--source={source}', f'--out={root / "taken"}'], 'already exists'),
      ([f'--source={source}', f'--out={root / "taken"}', '--overwrite'], 'text_corpus.json'),
      ([f'--source={source}', f'--out={source}', '--overwrite'], 'would replace --source'),
      ([f'--source={source}', f'--out={source / "notes" / "out"}'], 'inside --source'),
      ([f'--source={source}', f'--out={root / "a_file" / "out"}'], 'a_file'),
      ([*ok, f'--heldout_source={root / "nowhere"}'], '--heldout_source'),
      ([*ok, f'--heldout_source={source}'], 'overlap'),
      ([*ok, f'--heldout_source={source / "notes"}'], 'overlap'),
      ([*ok, f'--heldout_source={one}'], 'heldout and test need one each'),
      ([f'--source={same}', f'--out={root / "new"}'], 'also a train window'),
      ([*ok, f'--heldout_source={apart}'], 'every test window is also a train or heldout window'),
  ]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(prepared, tmp_path):
  source, _, _ = prepared
  cases = _bad_cases(source, tmp_path)
  before, sources = _snapshot(tmp_path), _snapshot(source)
  for argv, named in cases:
    code, err, _ = _invoke(argv)
    assert code == 2 and len(err) == 1 and err[0].startswith('error: '), (argv, err)
    assert named in err[0], (named, err[0])
  assert _snapshot(tmp_path) == before and _snapshot(source) == sources
