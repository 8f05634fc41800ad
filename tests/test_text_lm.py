"""The python_text dataset and the transformer language model and sequence rater on it.

Dataset: splits disjoint by document, heldout/test clean prose, every sequence checked against
its source file (clean windows are the file's bytes; each corruption kind has its property), the
pipeline reads the dataset's own record. Models: a float64 numpy re-implementation of the
transformer as the loss oracle, causality, independent examples, ghost products = explicit
per-example gradient products, meta-gradients = central finite differences.
"""
import collections
import math
import os
import platform
import re
import sysconfig
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import text
from datarater import config_checks, pergrad, tasks
from datarater.data import pipeline, python_text
from datarater.data.pipeline import DataInfo
from datarater.errors import UserError
from outer_loop import meta_step
from tests.tiny import assert_meta_gradient_matches_finite_differences, estimator, tiny_problem

pytestmark = pytest.mark.xdist_group('python_text')  # one worker builds the dataset
L = python_text.SEQ_LEN
NEEDS_DOCS = 'needs Debian package python3.11-doc (apt-get install python3.11-doc)'


@pytest.fixture(scope='module')
def data(tfds_dir):
  """The three splits of python_text (built once in the session's TFDS folder), the builder and
  the source files by document id."""
  if not os.path.isdir(python_text.DOC_DIR):
    pytest.skip(NEEDS_DOCS)
  section = text.get_config().data
  section.data_dir = tfds_dir
  splits = {s: pipeline.load_split(section, s) for s in ('train', 'heldout', 'test')}
  return splits, pipeline.builder_of(section), python_text.source_files()


def _docs(split, kind=None, domain=0):
  """{document id: its token rows} of a split's sequences of `kind` (all if None) and `domain`."""
  f = split.features
  sel = f['domain'] == domain
  if kind is not None:
    sel &= split.corruption == split.corruption_kinds.index(kind)
  out = collections.defaultdict(list)
  for doc, tokens in zip(f['document'][sel], f['tokens'][sel]):
    out[int(doc)].append(bytes(tokens.astype(np.uint8)))
  return out


def _read(files, doc):
  with open(files[doc][1], 'rb') as f:
    return f.read()


def _complete_lines(seq: bytes):
  """The lines of a window with both ends inside it (its first and last pieces are cut)."""
  return seq.split(b'\n')[1:-1]


def _entropy(seq: bytes) -> float:
  p = np.bincount(np.frombuffer(seq, np.uint8), minlength=256) / len(seq)
  p = p[p > 0]
  return float(-(p * np.log2(p)).sum())


# ----------------------------------------------------------------------------- the dataset


def test_a_build_records_the_standard_library_it_read(data, tmp_path):
  """The code documents come from this Python's library, so the build names it; the digest
  tells two corpora apart by one changed byte and not by where their files lie."""
  _, builder, files = data
  meta = dict(builder.info.metadata)
  assert meta['stdlib'] == sysconfig.get_paths()['stdlib']
  assert meta['python'] == platform.python_version()
  copies = []
  for i, (domain, path) in enumerate(files[:3] + files[-2:]):
    copy = tmp_path / f'{i}.txt'
    copy.write_bytes(open(path, 'rb').read())
    copies.append((domain, str(copy)))
  assert python_text.sources_digest(copies) == python_text.sources_digest(
      files[:3] + files[-2:])
  with open(copies[-1][1], 'ab') as f:
    f.write(b' ')
  assert python_text.sources_digest(copies) != python_text.sources_digest(files[:3] + files[-2:])


def test_splits_are_disjoint_by_document_and_the_record_is_read(data):
  splits, builder, files = data
  train, heldout, test = splits['train'], splits['heldout'], splits['test']
  assert 20_000 <= len(train) <= 40_000 and all(2_000 <= len(s) <= 4_000 for s in (heldout, test))
  docs = {name: set(s.features['document'].tolist()) for name, s in splits.items()}
  assert not docs['train'] & docs['heldout'] and not docs['train'] & docs['test']
  assert not docs['heldout'] & docs['test']
  rows = lambda split: {t.astype(np.uint8).tobytes() for t in split.features['tokens']}
  assert not rows(heldout) & rows(test)  # no test text in the rater's outer (heldout) loss
  names = builder.info.features['corruption'].names
  assert names[0] == 'clean' and set(names) == {'clean', 'random_bytes', 'shuffled_words',
                                                'boilerplate', 'markup_only', 'truncated'}
  for split in splits.values():
    assert split.corruption_kinds == tuple(names)
    np.testing.assert_array_equal(split.corruption, split.features['corruption'])
    assert split.features['tokens'].dtype == np.int32
    assert split.features['tokens'].min() >= 0 and split.features['tokens'].max() <= 255
  for split in (heldout, test):  # clean prose only
    assert not split.is_corrupted.any() and (split.features['domain'] == 0).all()
  f = train.features
  counts = collections.Counter(train.corruption.tolist())
  assert all(counts[k] >= 500 for k in range(len(names))), counts
  code = f['domain'] == 1
  assert 0.05 < code.mean() < 0.3 and not train.is_corrupted[code].any()
  assert 0.5 < ((f['domain'] == 0) & ~train.is_corrupted).mean() < 0.7
  for doc in np.unique(f['document']):  # one kind and one domain per document
    rows = f['document'] == doc
    assert len(np.unique(train.corruption[rows])) == 1 and len(np.unique(f['domain'][rows])) == 1
    assert files[doc][0] == python_text.DOMAINS[f['domain'][rows][0]]
  for name, split in splits.items():
    assert len(np.unique(split.features['tokens'], axis=0)) >= 0.99 * len(split), name
  again = python_text.assign(files)  # deterministic: the same documents, kinds and sizes
  for (name, domain, kind), docs in again.items():
    split = splits[name]
    rows = ((split.features['domain'] == python_text.DOMAINS.index(domain))
            & (split.corruption == names.index(kind)))
    assert sorted(collections.Counter(split.features['document'][rows].tolist()).items()) == \
        sorted((doc, len(w)) for doc, w in docs), (name, domain, kind)


def test_clean_sequences_are_windows_of_their_source_files(data):
  splits, _, files = data
  for split, domain in ((splits['train'], 0), (splits['train'], 1), (splits['heldout'], 0),
                        (splits['test'], 0)):
    for doc, seqs in _docs(split, 'clean', domain).items():
      source = _read(files, doc)
      first = [source[i * L:(i + 1) * L] for i in range(len(seqs))]
      assert collections.Counter(seqs) == collections.Counter(first), doc  # its first windows
  assert files[0][0] == 'prose' and files[0][1].endswith('.rst.txt')


def test_random_bytes_are_uniform_and_unlike_prose(data):
  splits, _, files = data
  noise = [s for seqs in _docs(splits['train'], 'random_bytes').values() for s in seqs]
  prose = [s for seqs in _docs(splits['train'], 'clean').values() for s in seqs]
  assert min(map(_entropy, noise)) > 6.0 > max(map(_entropy, prose))
  counts = np.bincount(np.frombuffer(b''.join(noise), np.uint8), minlength=256)
  expected = counts.sum() / 256
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  assert chi2 < 255 + 6 * math.sqrt(2 * 255), chi2  # 255 degrees of freedom
  for doc, seqs in list(_docs(splits['train'], 'random_bytes').items())[:10]:
    source = _read(files, doc)
    assert len(seqs) <= len(source) // L and not any(s in source for s in seqs)


def test_shuffled_words_are_the_source_words_out_of_order(data):
  splits, _, files = data
  pairs_kept = {}
  for kind in ('shuffled_words', 'clean'):
    kept = total = 0
    for doc, seqs in list(_docs(splits['train'], kind).items())[:20]:
      words = _read(files, doc).split()
      bigrams = set(zip(words, words[1:]))
      seen = collections.Counter()
      for s in seqs:
        inner = s.split()[1:-1]  # the first and last words may be cut by the window
        seen.update(inner)
        kept += sum(pair in bigrams for pair in zip(inner, inner[1:]))
        total += max(len(inner) - 1, 0)
      if kind == 'shuffled_words':  # a sub-multiset of the source document's words
        assert not seen - collections.Counter(words), doc
        assert all(b' '.join(s.split()) == s.strip() for s in seqs)  # single spaces, no newlines
    pairs_kept[kind] = kept / total
  assert pairs_kept['clean'] > 0.95 and pairs_kept['shuffled_words'] < 0.3, pairs_kept


def test_boilerplate_is_a_few_lines_repeated(data):
  splits, _, files = data
  docs = _docs(splits['train'], 'boilerplate')
  lines = collections.Counter(l for seqs in docs.values() for s in seqs
                              for l in _complete_lines(s))
  assert len(lines) <= 10 and min(lines.values()) >= 100, lines.most_common()
  assert set(lines) <= set(python_text.BOILERPLATE)
  squeeze = lambda seqs: len(zlib.compress(b''.join(seqs))) / len(b''.join(seqs))
  prose = _docs(splits['train'], 'clean')
  assert squeeze([s for seqs in docs.values() for s in seqs]) < 0.05
  assert squeeze([s for seqs in prose.values() for s in seqs]) > 0.2
  cap = python_text.MAX_CORRUPTED_WINDOWS
  short = [doc for doc, seqs in docs.items()  # each as long as its source document ...
           if len(seqs) < min(cap, len(_read(files, doc)) // L)]
  assert len(short) <= 1  # ... but the kind's last one, cut at its target size
  assert all(len(seqs) <= min(cap, len(_read(files, doc)) // L + 1) for doc, seqs in docs.items())


MARKUP = re.compile(rb'^\s*\.\. |^\s+:[\w -]+:|^([=\-~^"\'`#*+<>_:.])\1{3,}\s*$|`|\*\*|\]_|\|')


def test_markup_only_keeps_markup_verbatim_and_drops_prose(data):
  splits, _, files = data
  checked = 0
  for doc, seqs in _docs(splits['train'], 'markup_only').items():
    source = _read(files, doc)
    for s in seqs:
      for line in _complete_lines(s):
        assert line in source and MARKUP.search(line), (doc, line)
        checked += 1
  assert checked > 1000
  density = lambda kind: np.median([np.isin(np.frombuffer(s, np.uint8), list(b'`:_=-*<>|[]#.'))
                                    .mean() for seqs in _docs(splits['train'], kind).values()
                                    for s in seqs])
  assert density('markup_only') > 2.5 * density('clean')


def test_truncated_lines_end_mid_word(data):
  splits, _, files = data
  checked = 0
  for doc, seqs in _docs(splits['train'], 'truncated').items():
    cuts = set()  # every prefix of a source line that ends between two letters
    for line in _read(files, doc).split(b'\n'):
      cuts.update(line[:i] for i in range(1, len(line))
                  if chr(line[i - 1]).isalpha() and chr(line[i]).isalpha())
    for s in seqs:
      for line in _complete_lines(s):
        assert line in cuts, (doc, line)
        checked += 1
  assert checked > 1000


def test_every_bucket_holds_exactly_its_target_number_of_windows(data):
  """Each (split, domain, kind) bucket of the built dataset has exactly SIZES[bucket] sequences,
  counted from the splits' own rows (domain and corruption columns), never more: a document is
  cut to the room its bucket has left. Per split: train 18000 clean prose + 4500 code + 5 kinds
  x 1500 corrupted prose = 30000; heldout and test 3000 each."""
  splits, builder, _ = data
  names = builder.info.features['corruption'].names
  counted = collections.Counter()
  for name, split in splits.items():
    for domain, kind in zip(split.features['domain'].tolist(), split.corruption.tolist()):
      counted[(name, python_text.DOMAINS[domain], names[kind])] += 1
  assert dict(counted) == python_text.SIZES
  assert {name: len(split) for name, split in splits.items()} == \
      {'train': 30_000, 'heldout': 3_000, 'test': 3_000}
  assert {s.name: s.num_examples for s in builder.info.splits.values()} == \
      {'train': 30_000, 'heldout': 3_000, 'test': 3_000}


def test_missing_documentation_is_one_user_error(monkeypatch):
  monkeypatch.setattr(python_text, 'DOC_DIR', '/nonexistent/python-doc/_sources')
  with pytest.raises(UserError) as e:
    python_text.source_files()
  message = str(e.value)
  assert '\n' not in message and '/nonexistent/python-doc/_sources' in message
  assert 'apt-get install python3.11-doc' in message


@pytest.mark.parametrize('documents', [0, 1])
def test_documentation_too_short_for_every_split_is_one_user_error(monkeypatch, tmp_path,
                                                                   documents):
  """A documentation folder that exists but holds no .rst.txt file (what installing the package
  gives where /usr/share/doc is excluded), or one document (heldout takes it, test gets none):
  building python_text stops in one line naming the folder, not on TFDS's assertion that a split
  yielded no examples."""
  docs = tmp_path / 'docs'
  docs.mkdir()
  for i in range(documents):
    (docs / f'{i}.rst.txt').write_bytes(b'Some prose. ' * L)
  monkeypatch.setattr(python_text, 'DOC_DIR', str(docs))
  section = text.get_config().data
  section.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(UserError) as e:
    pipeline.load_split(section, 'train')
  message = str(e.value)
  assert '\n' not in message and str(docs) in message and f'holds {documents} .rst.txt' in message
  assert f"split {'heldout' if documents == 0 else 'test'!r} would hold no sequence" in message


def test_text_config_is_valid_and_its_models_read_the_dataset(data):
  splits, _, _ = data
  c = text.get_config()
  config_checks.validate(c, [*list(config_checks.SECTIONS)[1:], 'task', 'rater', 'features.task'])
  info = splits['train'].info
  task, rater = tasks.make_task(c.task, info), tasks.make_rater(c.rater, info)
  params, phi = task.init(jax.random.key(0)), rater.init(jax.random.key(1))
  batch = splits['train'].take(np.arange(4))
  metrics, scores, embedded = jax.jit(lambda p, phi, b: (  # one program, not three
      task.metrics(p, b), rater.score(phi, b), task.embed(p, b)))(params, phi, batch)
  assert metrics['loss'].shape == (4,) and scores.shape == (4,)
  assert np.all(np.abs(metrics['loss'] - math.log(256)) < 1.0)  # near-uniform at init
  np.testing.assert_allclose(metrics['bits_per_byte'], metrics['loss'] / math.log(2), rtol=1e-6)
  assert embedded.shape == (4, c.task.d_model)
  assert pergrad.ghost_covers(task.per_example_loss, params, batch)
  assert pergrad.ghost_covers(rater.score, phi, batch)
  for field, value, error in (('max_len', L - 1, 'more than task.max_len'),
                              ('num_heads', 3, 'multiple of task.num_heads'),
                              ('input', 'domain', 'token feature')):
    bad = text.transformer(**{field: value})
    with pytest.raises(UserError, match=error):
      tasks.make_task(bad, info)
  with pytest.raises(UserError, match='more than rater.max_len'):  # (which section's)
    tasks.make_rater(text.transformer('sequence_rater', max_len=L - 1), info)


# ----------------------------------------------------------------------------- the models


def _info(length=12, weights=False):
  spec = {'tokens': jax.ShapeDtypeStruct((length,), np.int32)}
  if weights:
    spec['weights'] = jax.ShapeDtypeStruct((length,), np.float32)
  return DataInfo('text', spec, {}, None)


def _model(name='transformer_lm', **fields):
  c = {'name': name, 'vocab': 16, 'd_model': 8, 'num_heads': 2, 'num_layers': 2, 'd_mlp': 12,
       'max_len': 16, 'activation': 'gelu'}
  c.update(fields)
  return ml_collections.ConfigDict(c)


def _tokens(n=4, length=12, vocab=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (n, length)), jnp.int32)


def test_the_feature_models_errors_name_its_section_features_task():
  """The SAE policy's feature model is built from `features.task`: its errors name that section
  (they named task.max_len and task.num_heads, giving this section's values as the task's); a
  task's own still name `task`, a rater's `rater` (vocab: test_a_feature_model_that_cannot...)."""
  from datarater import features  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  split = pipeline.Split({'tokens': np.full((2, 12), 3)}, np.arange(2), np.zeros(2, np.int8),
                         ('clean',), _info())
  for fields, error in (({'max_len': 8}, 'more than features.task.max_len 8'),
                        ({'num_heads': 3}, 'features.task.d_model 8 must be a multiple of '
                                           'features.task.num_heads 3')):
    config = ml_collections.ConfigDict({'task': _model(**fields), 'train_steps': 1,
                                        'train_epochs': 0, 'batch_size': 2,
                                        'learning_rate': 1e-3, 'seed': 0})
    with pytest.raises(UserError, match=re.escape(error)):
      features.train_feature_model(split, config)
  with pytest.raises(UserError, match=re.escape('more than task.max_len 8')):
    tasks.make_task(_model(max_len=8), _info())
  with pytest.raises(UserError, match=re.escape('more than rater.max_len 8')):
    tasks.make_rater(_model('sequence_rater', max_len=8), _info())


def _f64(tree):
  """Float64 leaves, converted in numpy (op by op, JAX compiles one program per leaf shape)."""
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x, np.float64)), tree)


def _moved(tree, seed=0):
  """Float64 parameters moved off their initial values (biases start at 0, LayerNorm scales at
  1: at init the reference would not test how they are applied); in numpy, as _f64."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [
      jax.device_put(np.asarray(x, np.float64) + 0.1 * rng.normal(size=x.shape)) for x in leaves])


def _reference_logits(p, tokens, num_heads, causal=True):
  """The transformer in float64 numpy from its parameters: [B, L, vocab]."""
  p = jax.tree.map(np.asarray, p['params'])
  vocab, d = p['embed']['kernel'].shape
  x = np.eye(vocab)[np.asarray(tokens)] @ p['embed']['kernel']
  pos = np.arange(tokens.shape[1])[:, None]
  angle = pos / 10000.0 ** (2 * (np.arange(d) // 2) / d)
  x = x + np.where(np.arange(d) % 2 == 0, np.sin(angle), np.cos(angle))
  norm = lambda y: (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-6)
  dense = lambda y, q: y @ q['kernel'] + q['bias']
  b, n = tokens.shape
  h = d // num_heads
  blocks = sorted((k for k in p if k.startswith('block_')), key=lambda k: int(k[6:]))
  for name in blocks:
    a = p[name]['attention']
    y = norm(x)
    q, k, v = (dense(y, a[m]).reshape(b, n, num_heads, h) for m in ('query', 'key', 'value'))
    s = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(h)
    if causal:
      s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    x = x + dense(np.einsum('bhqk,bkhd->bqhd', w, v).reshape(b, n, d), a['out'])
    g = dense(norm(x), p[name]['mlp_in'])
    g = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))  # gelu (tanh)
    x = x + dense(g, p[name]['mlp_out'])
  x = norm(x)
  return x, x @ p['head']['kernel'] + p['head']['bias']


def _reference_nll(p, tokens, num_heads):
  """The reference's negative log-likelihood of each next token, [B, L-1]."""
  _, logits = _reference_logits(p, tokens[:, :-1], num_heads)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1)[..., 0]


def test_loss_equals_a_float64_reference_transformer():
  with jax.enable_x64():
    task = tasks.make_task(_model(token_weights='weights'), _info(weights=True))
    params = _moved(task.init(jax.random.key(0)))
    plain = tasks.make_task(_model(), _info())
    rater = tasks.make_rater(_model('sequence_rater', num_layers=1), _info())
    phi = _moved(rater.init(jax.random.key(2)), 1)
    tokens = _tokens()
    w = np.random.default_rng(1).uniform(0, 1, tokens.shape)
    # One compiled program for every model output checked here (each jitted alone compiled the
    # same transformer five times over).
    per_token, per_example, metrics, embedded, scores = jax.jit(lambda p, phi, t, w: (
        task.per_token_loss(p, {'tokens': t}),
        task.per_example_loss(p, {'tokens': t, 'weights': w}),
        plain.metrics(p, {'tokens': t}), plain.embed(p, {'tokens': t}),
        rater.score(phi, {'tokens': t})))(params, phi, tokens, jnp.asarray(w))
    nll = _reference_nll(params, tokens, 2)
    np.testing.assert_allclose(per_token, nll, rtol=1e-10)
    np.testing.assert_allclose(per_example, (w[:, 1:] * nll).sum(1) / w[:, 1:].sum(1), rtol=1e-10)
    np.testing.assert_allclose(metrics['loss'], nll.mean(1), rtol=1e-10)
    assert 'bits_per_byte' not in metrics  # a vocabulary of 16, not bytes
    np.testing.assert_allclose(metrics['bits_per_token'], nll.mean(1) / math.log(2), rtol=1e-10)
    full_states, _ = _reference_logits(params, tokens, 2)
    np.testing.assert_allclose(embedded, full_states.mean(1), rtol=1e-10, atol=1e-12)
    states, _ = _reference_logits(phi, tokens, 2, causal=False)
    head = phi['params']['head']
    np.testing.assert_allclose(scores, (states.mean(1) @ head['kernel'] + head['bias'])[:, 0],
                               rtol=1e-10)


def test_a_bfloat16_language_model_is_within_its_rounding_of_the_float64_reference():
  """`dtype` bfloat16, float32 parameters (task and rater): every matrix product takes bfloat16
  operands, while the softmaxes (attention, vocabulary), layer norms' statistics and the means
  take float32 ones and the residual stream (after the float32 positional encoding) is float32;
  the per-example loss, float32, is within 0.5% of the float64 reference transformer's
  (measured: 0.05%; 0.3% for weights near init's)."""
  from tests.test_low_precision import operand_dtypes  # pylint: disable=g-import-not-at-top
  task = tasks.make_task(_model(dtype='bfloat16'), _info())
  rater = tasks.make_rater(_model('sequence_rater', num_layers=1, dtype='bfloat16'), _info())
  rng = np.random.default_rng(0)  # weights of a trained model's scale (not init's: 0 biases)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) / math.sqrt(x.shape[0]),
                                               x.dtype),
                        jax.eval_shape(task.init, jax.random.key(0)))
  tokens = _tokens(seed=2)
  batch = {'tokens': tokens}
  float32, bfloat16 = {jnp.dtype(jnp.float32)}, {jnp.dtype(jnp.bfloat16)}
  for fn, p in ((task.per_example_loss, params),
                (rater.score, jax.eval_shape(rater.init, jax.random.key(1)))):
    assert {x.dtype for x in jax.tree.leaves(p)} == float32
    assert operand_dtypes(fn, p, batch) == bfloat16
    assert operand_dtypes(fn, p, batch, primitives=(
        'exp', 'log', 'rsqrt', 'reduce_sum', 'reduce_max')) == float32
  _, captured = jax.eval_shape(lambda p: task.module.apply(
      p, tokens, capture_intermediates=True, mutable=['intermediates']), params)
  assert {captured['intermediates'][f'block_{i}']['__call__'][0].dtype
          for i in range(2)} == float32  # the residual stream
  loss = jax.jit(task.per_example_loss)(params, batch)
  want = _reference_nll(jax.tree.map(lambda x: np.asarray(x, np.float64), params), tokens,
                        2).mean(1)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, want, rtol=5e-3)
  assert np.abs(loss / want - 1).max() > 1e-5  # it rounds: bfloat16, not float32 (1e-7)


def test_the_language_model_is_causal_and_examples_are_independent():
  with jax.enable_x64():
    task = tasks.make_task(_model(), _info())
    params = _f64(task.init(jax.random.key(0)))
    rater = tasks.make_rater(_model('sequence_rater'), _info())
    phi = _f64(rater.init(jax.random.key(1)))
    tokens = _tokens()
    # One program per batch shape for the per-token loss, the per-example loss and the score.
    run = jax.jit(lambda p, phi, t: (task.per_token_loss(p, {'tokens': t}),
                                     task.per_example_loss(p, {'tokens': t}),
                                     rater.score(phi, {'tokens': t})))
    base, together, scores = run(params, phi, tokens)
    for t in (1, 5, 11):  # new tokens at positions >= t
      changed = tokens.at[:, t:].set((tokens[:, t:] + 3) % 16)
      after = run(params, phi, changed)[0]
      np.testing.assert_array_equal(after[:, :t - 1], base[:, :t - 1])  # predictions of < t
      assert not np.allclose(after[:, t - 1:], base[:, t - 1:])
    alone = [run(params, phi, tokens[i:i + 1]) for i in range(len(tokens))]
    np.testing.assert_allclose(together, [a[1][0] for a in alone], rtol=1e-12)
    np.testing.assert_allclose(scores, [a[2][0] for a in alone], rtol=1e-12)


def test_a_causal_sequence_rater_equals_the_causal_reference_and_pools_its_states():
  """rater.causal=True: the score equals the float64 reference transformer with causal attention,
  mean-pooled through the head (and differs from the bidirectional reference); changing only the
  last token leaves every earlier state unchanged, so the score moves by exactly the head of the
  last state's change over L, as the reference says."""
  with jax.enable_x64():
    length = 6
    rater = tasks.make_rater(_model('sequence_rater', num_layers=1, causal=True), _info(length))
    phi = _moved(rater.init(jax.random.key(3)), 2)
    head = phi['params']['head']
    pooled = lambda states: (states.mean(1) @ head['kernel'] + head['bias'])[:, 0]
    tokens = _tokens(n=3, length=length, seed=4)
    score = jax.jit(rater.score)
    got = score(phi, {'tokens': tokens})
    states, _ = _reference_logits(phi, tokens, 2, causal=True)
    np.testing.assert_allclose(got, pooled(states), rtol=1e-10)
    bidirectional, _ = _reference_logits(phi, tokens, 2, causal=False)
    assert np.abs(pooled(bidirectional) - pooled(states)).min() > 1e-6  # the check can tell
    changed = tokens.at[:, -1].set((tokens[:, -1] + 5) % 16)
    states2, _ = _reference_logits(phi, changed, 2, causal=True)
    np.testing.assert_array_equal(states2[:, :-1], states[:, :-1])
    moved = score(phi, {'tokens': changed}) - got
    want = ((states2[:, -1] - states[:, -1]) @ head['kernel'])[:, 0] / length
    assert np.abs(want).min() > 1e-6
    np.testing.assert_allclose(moved, want, rtol=1e-8, atol=1e-13)


# The fast suite checks the transformers' ghost norms exact on the shipped text config's task
# and rater (test_text_config_is_valid_...: ghost_covers), and the LM's ghost dots, within a
# batch and across two, against a loop (test_model_oracles.py, the token-weighted LM).
@pytest.mark.slow
@pytest.mark.parametrize('kind', ['task', 'rater'])
def test_ghost_products_cover_the_model_and_equal_per_example_gradients(kind):
  with jax.enable_x64():
    if kind == 'task':
      model = tasks.make_task(_model(), _info())
      fn = model.per_example_loss
    else:
      model = tasks.make_rater(_model('sequence_rater', num_layers=1), _info())
      fn = model.score
    params = _f64(model.init(jax.random.key(0)))
    batch = {'tokens': _tokens(5)}
    assert pergrad.ghost_covers(fn, params, batch)
    grad = jax.jit(jax.grad(lambda p, one: fn(p, one)[0]))
    tokens = np.asarray(batch['tokens'])  # rows sliced in numpy, gradients raveled in numpy
    flat = np.stack([np.concatenate([np.ravel(x) for x in jax.tree.leaves(
        grad(params, {'tokens': tokens[i:i + 1]}))]) for i in range(5)])
    dots, sq_norms = jax.jit(lambda p, b: (pergrad.ghost_dots(fn, p, b),
                                           pergrad.ghost_sq_norms(fn, p, b)))(params, batch)
    np.testing.assert_allclose(dots, flat @ flat.T, rtol=1e-9)
    np.testing.assert_allclose(sq_norms, (flat ** 2).sum(1), rtol=1e-9)


def test_text_meta_gradient_matches_finite_differences():
  """The bi-level problem with a tiny transformer LM and sequence rater, float64, T = 2 SGD."""
  with jax.enable_x64():
    length, vocab = 6, 8
    info = _info(length)
    base = tiny_problem(optimizer='sgd', lr=0.3)
    problem = meta_step.MetaProblem(
        task=tasks.make_task(_model(vocab=vocab, d_model=4, num_layers=1, d_mlp=6), info),
        rater=tasks.make_rater(_model('sequence_rater', vocab=vocab, d_model=4, num_heads=1,
                                      num_layers=1, d_mlp=4), info),
        inner_optimizer=base.inner_optimizer, outer_optimizer=base.outer_optimizer,
        temperature=0.7, reset_every=3)
    est = estimator('reverse', 'sgd', 0.3)
    rng = np.random.default_rng(0)
    inner = {'tokens': jnp.asarray(rng.integers(0, vocab, (2, 2, 6, length)), jnp.int32)}
    outer = {'tokens': jnp.asarray(rng.integers(0, vocab, (2, 6, length)), jnp.int32)}
    assert_meta_gradient_matches_finite_differences(problem, est, inner, outer)


def test_tokens_outside_the_vocabulary_are_refused_at_its_edges():
  """Tokens 0..vocab-1 are read; a token equal to vocab (one past the last embedding row) or
  below 0 is one UserError line naming the smallest vocab that would hold them, for the task and
  for the rater."""
  task = tasks.make_task(_model(), _info())
  rater = tasks.make_rater(_model('sequence_rater'), _info())
  ok = np.arange(12)[None, :] + np.array([[0], [4]])  # 0..15: every row of the embedding
  assert ok.max() == 15
  for model in (task, rater):
    model.check_data({'tokens': ok})
    for bad, hint in ((16, 'at least 17'), (-1, '[-1, 15]: tokens must be >= 0 (padding')):
      tokens = ok.copy()
      tokens[1, 7] = bad
      with pytest.raises(UserError) as e:
        model.check_data({'tokens': tokens})
      assert '\n' not in str(e.value) and hint in str(e.value), str(e.value)


def test_token_weights_below_0_or_not_finite_and_one_token_sequences_are_refused():
  """A weighted mean over weights summing to 0 or less was finite garbage (a row [0, 1, -1]: loss
  -1e38); a sequence of one token has no prediction (NaN losses): each one UserError line."""
  task = tasks.make_task(_model(token_weights='weights'), _info(weights=True))
  tokens = np.zeros((2, 12), np.int32)
  ok = np.ones((2, 12), np.float32)
  ok[0, :5] = 0.0  # padding: weight 0
  task.check_data({'tokens': tokens, 'weights': ok})
  for bad in (-1.0, np.nan, np.inf):
    w = ok.copy()
    w[1, 3] = bad
    with pytest.raises(UserError, match=f'holds 1 weights that are negative or not finite '
                       rf'\(e.g. {bad}\)') as e:
      task.check_data({'tokens': tokens, 'weights': w})
    assert '\n' not in str(e.value)
  with pytest.raises(UserError, match="the sequences of 'tokens' need at least 2 tokens, got 1"):
    tasks.make_task(_model(), _info(length=1))
  assert tasks.make_rater(_model('sequence_rater'), _info(length=1))  # a rater reads one token


def test_a_feature_model_that_cannot_read_the_tokens_is_refused():
  """features.task with a vocabulary below the data's bytes trained on all-zero inputs for
  them (NaN losses) and gave finite, meaningless SAE features: refused as launch.train refuses
  such a task (naming features.task.vocab, not the task's)."""
  from datarater import features  # pylint: disable=g-import-not-at-top
  from datarater.data import pipeline  # pylint: disable=g-import-not-at-top
  tokens = np.arange(24).reshape(2, 12) * 10  # up to 230
  split = pipeline.Split({'tokens': tokens}, np.arange(2), np.zeros(2, np.int8), ('clean',),
                         _info())
  config = ml_collections.ConfigDict({'task': _model(), 'train_steps': 1, 'train_epochs': 0,
                                      'batch_size': 2, 'learning_rate': 1e-3, 'seed': 0})
  with pytest.raises(UserError, match='outside the vocabulary of features.task.vocab=16'):
    features.train_feature_model(split, config)


def test_small_token_weights_give_the_weighted_mean_token_by_token():
  """The weighted loss is sum_t w_t nll_t / sum_t w_t whatever the weights' scale: weights that
  sum below 1 (and weights x 1e-3 of others) give the same mean, token 0's weight is unused, and
  all-zero weights give 0, not NaN. The nll is recomputed token by token in float64 numpy."""
  with jax.enable_x64():
    task = tasks.make_task(_model(token_weights='weights'), _info(weights=True))
    params = _f64(task.init(jax.random.key(5)))
    tokens = _tokens(n=3, seed=6)
    _, logits = _reference_logits(params, tokens[:, :-1], 2)
    toks = np.asarray(tokens)
    nll = np.zeros((3, 11))
    for b in range(3):
      for t in range(11):
        row = logits[b, t]
        nll[b, t] = np.log(np.exp(row - row.max()).sum()) + row.max() - row[toks[b, t + 1]]
    w = np.random.default_rng(7).uniform(0.1, 1.0, (3, 12)) * np.array([[1e-3], [0.05], [1.0]])
    w[:, 0] = 1e3  # token 0 is never predicted
    want = [sum(w[b, t + 1] * nll[b, t] for t in range(11)) / sum(w[b, 1:]) for b in range(3)]
    loss = jax.jit(task.per_example_loss)
    np.testing.assert_allclose(loss(params, {'tokens': tokens, 'weights': jnp.asarray(w)}), want,
                               rtol=1e-10)
    zero = loss(params, {'tokens': tokens, 'weights': jnp.zeros((3, 12))})
    np.testing.assert_array_equal(zero, np.zeros(3))


# ----------------------------------------------------------------------------- the rewrites, one
# document at a time (no build): each checked against its definition on a hand-made text


PROSE = (b'The quick brown fox jumps over the lazy dog while seven wizards quietly hex\n'
         b'  every jovial bishop; a mazy pack of jumbled liquor bottles waits beside them.\n'
         b'Sphinx of black quartz judge my vow, then fly away to the distant northern hills.\n')


def test_shuffled_words_keeps_every_word_once_and_reorders_them():
  words = PROSE.split()
  orders = set()
  for seed in range(5):
    out = python_text.shuffled_words(PROSE, np.random.default_rng(seed))
    assert collections.Counter(out.split()) == collections.Counter(words)  # every word, once
    assert out == b' '.join(out.split())  # single spaces, no newlines
    orders.add(out)
  assert len(orders) == 5 and b' '.join(words) not in orders


def test_truncated_cuts_each_line_at_a_random_place_between_two_letters():
  """Each line is cut at one of the places with a letter on both sides, each place about as
  likely (counted over seeds, by brute force over the line's characters); lines with no such place
  are dropped."""
  lines = PROSE.split(b'\n') + [b'1 2 3 + 4;', b'']
  places = [[i for i in range(1, len(l)) if chr(l[i - 1]).isalpha() and chr(l[i]).isalpha()]
            for l in lines]
  counts = [collections.Counter() for _ in lines]
  for seed in range(300):
    out = python_text.truncated(PROSE + b'\n1 2 3 + 4;\n', np.random.default_rng(seed))
    got = out.split(b'\n')
    assert len(got) == sum(map(bool, places))  # the line of digits is dropped
    for i, line in zip([i for i, p in enumerate(places) if p], got):
      assert lines[i].startswith(line) and len(line) in places[i], (i, line)
      counts[i][len(line)] += 1
  for i, p in enumerate(places):
    if p:  # a uniform choice among ~50 places: most seen in 300 draws, none far too often
      assert len(counts[i]) > 0.8 * len(p) and max(counts[i].values()) < 25, (i, counts[i])


def test_boilerplate_uses_every_line_until_the_text_is_covered():
  text = PROSE * 300
  out = python_text.boilerplate(text, np.random.default_rng(0))
  lines = out.split(b'\n')
  assert set(lines) == set(python_text.BOILERPLATE)  # every line, the last one too
  assert len(text) <= len(out) < len(text) + max(map(len, python_text.BOILERPLATE)) + 1
  assert len(out) - len(lines[-1]) - 1 < len(text)  # no line more than needed
  shares = collections.Counter(lines)
  assert min(shares.values()) > len(lines) / len(python_text.BOILERPLATE) / 2, shares
  for size in range(1, 400):  # every length: covered, and no line more than needed
    for seed in range(4):
      out = python_text.boilerplate(b'x' * size, np.random.default_rng(seed))
      assert len(out) >= size and len(out) - len(out.split(b'\n')[-1]) - 1 < size, (size, seed)


def test_markup_only_puts_each_inline_item_on_a_line_and_keeps_markup_lines():
  text = (b'See :func:`len` and ``x`` and **bold** or a link `Python <https://x>`_ and |sub| '
          b'here [#f1]_.\n.. note::\n   :class: x\nplain prose line\n====\nTitle\n')
  assert python_text.markup_only(text, None).split(b'\n') == [
      b':func:`len`', b'``x``', b'**bold**', b'`Python <https://x>`_', b'|sub|', b'[#f1]_',
      b'.. note::', b'   :class: x', b'====']


@pytest.mark.parametrize('length', [0, 1, L - 1, L, L + 1, 2 * L, 5 * L + 17])
def test_windows_are_the_consecutive_whole_windows_of_the_text(length):
  text = bytes(np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8))
  for limit in (0, 1, 2, 100):
    got = python_text.windows(text, limit)
    want = []
    start = 0
    while start + L <= len(text) and len(want) < limit:  # recounted, one window at a time
      want.append(list(text[start:start + L]))
      start += L
    assert got.dtype == np.int32 and got.shape == (len(want), L)
    assert got.tolist() == want, (length, limit)


def test_source_files_are_every_rst_source_and_library_module_recounted():
  """Prose = every .rst.txt under the documentation sources, code = every .py of the standard
  library outside site-packages and __pycache__ (found here with pathlib), each sorted by its
  path under its root, prose first; a document's domain is part of the corpus digest."""
  import pathlib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(python_text.DOC_DIR):
    pytest.skip(NEEDS_DOCS)
  root = pathlib.Path(python_text.stdlib_dir())
  code = sorted((p for p in root.rglob('*.py')
                 if not {'site-packages', '__pycache__'} & set(p.relative_to(root).parts[:-1])),
                key=lambda p: str(p.relative_to(root)).split(os.sep))
  docs = pathlib.Path(python_text.DOC_DIR)
  prose = sorted(docs.rglob('*.rst.txt'), key=lambda p: str(p.relative_to(docs)).split(os.sep))
  files = python_text.source_files()
  assert [d for d, _ in files] == ['prose'] * len(prose) + ['code'] * len(code)
  assert sorted(p for _, p in files[:len(prose)]) == sorted(map(str, prose))
  assert sorted(p for _, p in files[len(prose):]) == sorted(map(str, code))
  one = files[:1]
  assert python_text.sources_digest(one) != python_text.sources_digest([('code', one[0][1])])


def test_a_streamed_split_reads_the_recorded_kind_at_any_positions(data):
  """source.Source of python_text: corruption_of(positions), in any order and shape, is the
  `corruption` feature of the examples at those positions (read in blocks of RECORD_BLOCK)."""
  from datarater.data import source as source_lib  # pylint: disable=g-import-not-at-top
  splits, builder, _ = data
  train = splits['train']
  src = source_lib.Source(builder, 'train')
  assert src.corruption_record is None and src.corruption_kinds == train.corruption_kinds
  rng = np.random.default_rng(0)
  positions = rng.permutation(len(train))[:6000]
  got = src.corruption_of(positions)
  np.testing.assert_array_equal(got, [train.features['corruption'][p] for p in positions])
  np.testing.assert_array_equal(src.corruption_of(positions[:10].reshape(2, 5)),
                                train.corruption[positions[:10]].reshape(2, 5))


def _corpus(tmp_path, prose=40, code=12, lengths=(40, 500)):
  """Made-up source documents: prose of random words, some as literals (a few hundred bytes to
  ~4 kB), and code."""
  rng = np.random.default_rng(0)
  vocab = [bytes(rng.integers(97, 123, rng.integers(2, 9), dtype=np.uint8)) for _ in range(300)]
  files = []
  for i in range(prose + code):
    domain = 'prose' if i < prose else 'code'
    words = [vocab[j] for j in rng.integers(0, len(vocab), rng.integers(*lengths))]
    text = b''.join((b'``%s``' % w if k % 4 == 0 else w) + (b'\n' if k % 9 == 8 else b' ')
                    for k, w in enumerate(words))  # with inline literals for markup_only
    path = tmp_path / f'{i:03d}.{"rst.txt" if domain == "prose" else "py"}'
    path.write_bytes(text if domain == 'prose' else b'def f():\n    return ' + text)
    files.append((domain, str(path)))
  return files


def test_assign_fills_each_bucket_from_its_own_shuffled_documents(tmp_path):
  """On made-up documents and small targets: every bucket holds exactly its target of windows,
  no document in two buckets, clean windows are the file's first windows (recounted), corrupted
  ones its rewrite's (seeded by the document); which document goes where follows the seed."""
  files = _corpus(tmp_path)
  sizes = {('heldout', 'prose', 'clean'): 8, ('test', 'prose', 'clean'): 8,
           ('train', 'prose', 'clean'): 30, ('train', 'code', 'clean'): 10,
           **{('train', 'prose', kind): 6 for kind in python_text.CORRUPTIONS[1:]}}
  owner = {}
  for seed in (0, 1, 2):
    got = python_text.assign(files, sizes, seed)
    assert set(got) == set(sizes)
    where = {}
    for bucket, docs in got.items():
      assert sum(len(w) for _, w in docs) == sizes[bucket], bucket
      for doc, w in docs:
        assert doc not in where and files[doc][0] == bucket[1], (doc, bucket)
        where[doc] = bucket
        text = open(files[doc][1], 'rb').read()
        if bucket[2] != 'clean':
          text = python_text.REWRITE[bucket[2]](text, np.random.default_rng([seed, doc]))
        want = [list(text[i * L:(i + 1) * L]) for i in range(len(w))]
        assert w.tolist() == want, (doc, bucket)
    owner[seed] = where
  assert owner[0] != owner[1] and owner[1] != owner[2]  # the shuffle follows the seed
  again = python_text.assign(files, sizes, 1)
  assert {doc: b for b, docs in again.items() for doc, _ in docs} == owner[1]


def test_assign_short_of_documents_fills_every_bucket_to_the_same_share(tmp_path):
  """Targets far beyond the documents: each document goes to the bucket furthest below its
  target in proportion, so every prose bucket ends at about the same fraction of its target
  (within a few documents' windows), the large train bucket as much as the small ones."""
  files = _corpus(tmp_path, prose=200, code=0, lengths=(30, 150))
  sizes = {('heldout', 'prose', 'clean'): 100, ('test', 'prose', 'clean'): 100,
           ('train', 'prose', 'clean'): 400,
           **{('train', 'prose', kind): 100 for kind in python_text.CORRUPTIONS[1:]}}
  got = python_text.assign(files, sizes)
  fill = {b: sum(len(w) for _, w in docs) / sizes[b] for b, docs in got.items()}
  assert 0.2 < min(fill.values()) and max(fill.values()) < 0.9, fill
  assert max(fill.values()) - min(fill.values()) < 0.15, fill


def test_bits_are_per_byte_only_for_a_vocabulary_of_bytes():
  """vocab 256 (the text builder's bytes) reports bits_per_byte; any other vocabulary, larger or
  smaller, bits_per_token (a token of a larger vocabulary is not a byte)."""
  for vocab, name in ((256, 'bits_per_byte'), (257, 'bits_per_token'), (512, 'bits_per_token'),
                      (255, 'bits_per_token')):
    task = tasks.make_task(_model(vocab=vocab), _info())
    params = jax.eval_shape(task.init, jax.random.key(0))
    metrics = jax.eval_shape(task.metrics, params, {'tokens': _tokens(vocab=vocab)})
    assert sorted(metrics) == sorted(['loss', name]), (vocab, sorted(metrics))


def test_token_weights_must_be_a_float_feature_of_one_weight_per_token():
  """An integer feature (the tokens themselves, a document id) would weigh each prediction by its
  value: refused in one line; a feature of another length too."""
  info = _info(weights=True)
  info = DataInfo('text', {**info.spec, 'ids': jax.ShapeDtypeStruct((12,), np.int32),
                           'short': jax.ShapeDtypeStruct((11,), np.float32)}, {}, None)
  assert tasks.make_task(_model(token_weights='weights'), info).weight_key == 'weights'
  for name in ('tokens', 'ids', 'short', 'nope'):
    with pytest.raises(UserError, match=f"token_weights '{name}' must be a float feature of "
                       r'shape \(12,\)'):
      tasks.make_task(_model(token_weights=name), info)
