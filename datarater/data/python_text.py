"""A TFDS builder for byte-level text: Python's documentation, its standard library, and bad copies.

Sources (no network): the reStructuredText sources of the Python documentation (Debian package
`python3.11-doc`, English prose with its markup) and the standard library's `.py` files (code).
Every document is cut into non-overlapping windows of `SEQ_LEN` bytes (the tail shorter than a
window is dropped; at most `MAX_WINDOWS` windows of a clean document, `MAX_CORRUPTED_WINDOWS` of
a corrupted one, so each kind comes from many documents), each byte an int32 token 0..255.
Documents are assigned whole, by a seeded shuffle of the sorted file lists, to

- `heldout` and `test`: clean prose, each from its own documents;
- `train`: clean prose, code, and prose documents rewritten into one bad kind each
  (`CORRUPTIONS`): uniform random bytes of the document's length; its words shuffled, joined by
  spaces; navigation and copyright lines (`BOILERPLATE`) repeated to its length; its markup only
  (directive, option and section-underline lines verbatim, then every inline role, link, literal
  and strong emphasis on its own line); every line cut off after a random letter inside a word
  (lines with no such place dropped).

Each document goes to the bucket furthest below its target (`SIZES`), so every split and kind
gets its share. The splits share no document, but their windows are not compared (as
`text_folder`'s are): on Debian's python3.11-doc one heldout window of whatsnew/3.2 is the same
bytes as one of whatsnew/3.1 in train (the two files' maintenance note); no test window is a
heldout or train window. Dropping it would change the splits the stored `bench/results/lm_*`
runs measured, so it stays. Features: `tokens` [SEQ_LEN] int32, `document` (its id: the index in
`source_files()`), `domain` (prose or code) and `corruption` (class 0 = clean, which code is too),
the record `pipeline.read_split` reads.

The code documents are the standard library of the Python that builds the dataset, so installs
with other library files (a pyenv build holds ~1,800 `.py` files, Debian's `/usr/lib/python3.11`
~670) build other corpora: other documents, windows and order. A build records what it read in
its metadata (`info.metadata`: `stdlib`, `python`, `sources_sha256`); results name it by that.
"""
import hashlib
import os
import platform
import re
import sysconfig
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from datarater.errors import UserError

DOC_DIR = '/usr/share/doc/python3.11/html/_sources'
SEQ_LEN = 128
MAX_WINDOWS = 200
MAX_CORRUPTED_WINDOWS = 50
SEED = 0
DOMAINS = ('prose', 'code')
CORRUPTIONS = ('clean', 'random_bytes', 'shuffled_words', 'boilerplate', 'markup_only',
               'truncated')
# Sequences per bucket: (split, domain, corruption kind) -> target.
SIZES = {('heldout', 'prose', 'clean'): 3000, ('test', 'prose', 'clean'): 3000,
         ('train', 'prose', 'clean'): 18000, ('train', 'code', 'clean'): 4500,
         **{('train', 'prose', kind): 1500 for kind in CORRUPTIONS[1:]}}
BOILERPLATE = (
    b'\xc2\xa9 Copyright 2001-2023, Python Software Foundation.',
    b'This page is licensed under the Python Software Foundation License Version 2.',
    b'Navigation: index | modules | next | previous | Python \xc2\xbb 3.11 Documentation \xc2\xbb',
    b'Last updated on Jan 01, 2024. Found a bug? Created using Sphinx.',
    b'Please donate. See History and License for more information.',
    b'Theme: Auto Light Dark | Table of Contents | Report a Bug | Show Source',
)

_MARKUP_LINE = re.compile(
    rb'^(\s*\.\. .*|\s+:[\w -]+:(\s.*)?|([=\-~^"\'`#*+<>_:.])\3{3,}\s*)$')
_INLINE_MARKUP = re.compile(
    rb'(?::[\w:.+-]+:)?`[^`\n]+`_{0,2}|``[^`\n]+``|\*\*[^*\n]+\*\*|\[#?[\w-]*\]_|\|[^|\s][^|\n]*\|')
_MID_WORD = re.compile(rb'(?<=[A-Za-z])(?=[A-Za-z])')


def stdlib_dir() -> str:
  """This Python's standard library folder (the code documents)."""
  return sysconfig.get_paths()['stdlib']


def source_files(doc_dir: str = '', code_dir: str = '') -> list[tuple[str, str]]:
  """(domain, path) of every source document, by document id: prose then code, each sorted."""
  doc_dir, code_dir = doc_dir or DOC_DIR, code_dir or stdlib_dir()
  if not os.path.isdir(doc_dir):
    raise UserError(f'dataset python_text needs the Python documentation sources in {doc_dir} '
                    '(apt-get install python3.11-doc)')
  prose = _walk(doc_dir, '.rst.txt', ())
  code = _walk(code_dir, '.py', ('site-packages', '__pycache__'))
  return [('prose', p) for p in prose] + [('code', p) for p in code]


def sources_digest(files: list[tuple[str, str]]) -> str:
  """sha256 (16 hex digits) of every source document's domain and bytes, in document-id order."""
  h = hashlib.sha256()
  for domain, path in files:
    with open(path, 'rb') as f:
      h.update(domain.encode() + hashlib.sha256(f.read()).digest())
  return h.hexdigest()[:16]


def _walk(root: str, suffix: str, skip: tuple) -> list[str]:
  out = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in skip]
    out.extend(os.path.join(folder, f) for f in files if f.endswith(suffix))
  return sorted(out, key=lambda p: os.path.relpath(p, root))


def random_bytes(text: bytes, rng: np.random.Generator) -> bytes:
  """Uniform random bytes, as many as `text` has."""
  return rng.integers(0, 256, len(text), dtype=np.uint8).tobytes()


def shuffled_words(text: bytes, rng: np.random.Generator) -> bytes:
  """The whitespace-separated words of `text` in random order, joined by single spaces."""
  words = text.split()
  return b' '.join(words[i] for i in rng.permutation(len(words)))


def boilerplate(text: bytes, rng: np.random.Generator) -> bytes:
  """Random `BOILERPLATE` lines until the result is as long as `text`."""
  lines, size = [], -1  # size: the length of b'\n'.join(lines)
  while size < len(text):
    lines.append(BOILERPLATE[rng.integers(len(BOILERPLATE))])
    size += len(lines[-1]) + 1
  return b'\n'.join(lines)


def markup_only(text: bytes, rng: np.random.Generator) -> bytes:
  """Directive, option and underline lines verbatim; of other lines, each inline markup item
  (role, link, literal, strong emphasis, footnote reference, substitution) on a line."""
  del rng
  out = []
  for line in text.split(b'\n'):
    if _MARKUP_LINE.match(line):
      out.append(line)
    else:
      out.extend(m.group(0) for m in _INLINE_MARKUP.finditer(line))
  return b'\n'.join(out)


def truncated(text: bytes, rng: np.random.Generator) -> bytes:
  """Every line cut between two letters at a random such place; lines without one dropped."""
  out = []
  for line in text.split(b'\n'):
    cuts = [m.start() for m in _MID_WORD.finditer(line)]
    if cuts:
      out.append(line[:cuts[rng.integers(len(cuts))]])
  return b'\n'.join(out)


REWRITE = {'random_bytes': random_bytes, 'shuffled_words': shuffled_words,
           'boilerplate': boilerplate, 'markup_only': markup_only, 'truncated': truncated}


def windows(text: bytes, limit: int) -> np.ndarray:
  """The first min(limit, len // SEQ_LEN) windows of `text`, int32 [n, SEQ_LEN]."""
  n = min(limit, len(text) // SEQ_LEN)
  return np.frombuffer(text[:n * SEQ_LEN], np.uint8).reshape(n, SEQ_LEN).astype(np.int32)


def assign(files: list[tuple[str, str]], sizes: Optional[dict] = None, seed: int = SEED) -> dict:
  """bucket (split, domain, kind) -> [(document id, windows [n, SEQ_LEN])], filled in the order
  of a seeded shuffle of each domain's documents, each to the bucket least filled."""
  sizes = sizes or SIZES
  rng = np.random.default_rng(seed)
  out = {bucket: [] for bucket in sizes}
  count = dict.fromkeys(sizes, 0)
  for domain in DOMAINS:
    ids = [i for i, (d, _) in enumerate(files) if d == domain]
    buckets = [b for b in sizes if b[1] == domain]
    for doc in rng.permutation(ids):
      open_ = [b for b in buckets if count[b] < sizes[b]]
      if not open_:
        break
      bucket = min(open_, key=lambda b: count[b] / sizes[b])
      with open(files[doc][1], 'rb') as f:
        text = f.read()
      kind = bucket[2]
      if kind != 'clean':
        text = REWRITE[kind](text, np.random.default_rng([seed, int(doc)]))
      cap = MAX_WINDOWS if kind == 'clean' else MAX_CORRUPTED_WINDOWS
      w = windows(text, min(cap, sizes[bucket] - count[bucket]))
      if len(w):
        out[bucket].append((int(doc), w))
        count[bucket] += len(w)
  return out


def check_splits(buckets: dict, files: list[tuple[str, str]]) -> None:
  """Refuses documents that leave a split of `assign`'s `buckets` without a sequence (TFDS would
  stop on an assertion): e.g. a documentation folder holding no `.rst.txt` file, as where
  /usr/share/doc is excluded from installed packages (Docker's slim Debian images)."""
  for split in ('train', 'heldout', 'test'):
    if not any(docs for (name, _, _), docs in buckets.items() if name == split):
      prose = sum(domain == 'prose' for domain, _ in files)
      raise UserError(f'dataset python_text: split {split!r} would hold no sequence of '
                      f'{SEQ_LEN} bytes: {DOC_DIR} holds {prose} .rst.txt documents (heldout and '
                      'test need one each; apt-get install --reinstall python3.11-doc, where '
                      '/usr/share/doc is not excluded)')


class PythonText(tfds.core.GeneratorBasedBuilder):
  """Byte sequences of Python's docs (prose), its standard library (code) and corrupted prose."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'tokens': tfds.features.Tensor(shape=(SEQ_LEN,), dtype=np.int32),
            'document': tfds.features.Tensor(shape=(), dtype=np.int32),
            'domain': tfds.features.ClassLabel(names=DOMAINS),
            'corruption': tfds.features.ClassLabel(names=CORRUPTIONS),
        }),
        description=('Byte-token sequences of the Python 3.11 documentation sources (prose), '
                     'standard library modules (code) and prose documents corrupted in one of '
                     f'{len(CORRUPTIONS) - 1} recorded ways (train only).'),
        homepage='https://docs.python.org/3.11/',
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the sources are installed files.
    files = source_files()
    self.info.metadata.update(stdlib=stdlib_dir(), python=platform.python_version(),
                              sources_sha256=sources_digest(files))
    buckets = assign(files)
    check_splits(buckets, files)
    return {split: self._generate_examples(
        {b: docs for b, docs in buckets.items() if b[0] == split})
        for split in ('train', 'heldout', 'test')}

  def _generate_examples(self, buckets):
    for (_, domain, kind), docs in buckets.items():
      for doc, w in docs:
        for i, tokens in enumerate(w):
          yield f'{doc}-{i}', {'tokens': tokens, 'document': doc, 'domain': domain,
                               'corruption': kind}
