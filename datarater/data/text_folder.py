"""Your own text as a byte-level TFDS dataset folder for the language model (configs/text.py).

`prepare_text(source, out)` reads the files under folder `source` whose names end in one of
`suffixes` (hidden files and folders skipped; sorted by path relative to `source`: a file's
document id is its index there) and writes `out`, a TFDS dataset folder of array_record files
that `data.dataset_dir` reads, with python_text's sequences: `tokens` [SEQ_LEN] int32 (the bytes,
0..255) and `document` int32 (the file's id). Each file is cut as python_text cuts a clean
document (`python_text.windows`: non-overlapping windows of SEQ_LEN bytes from its start, the tail
shorter than a window dropped; at most `max_windows` of it when > 0). No corruption is planted:
every sequence is clean (the pipeline's record is all 0).

Files are assigned whole to the splits `train`, `heldout` and `test`: in a seeded shuffle of the
ids, each file with a window goes to the split furthest below its share of all windows
(`heldout_fraction`, `test_fraction`, train the rest, ties to the first), so every split gets a
file of its own first and none exceeds its share by more than one file's windows. Files whose
windows are the same bytes (copies, links) count as one file there and go to one split, so no
split holds another's document. With `heldout_source`, a folder of trusted text, `source`'s files
all go to train and its own to heldout and test alone (so assigned, in the ratio of the two
fractions; one whose windows are a `source` file's is left out).

Then heldout and test are decontaminated (`decontaminate`): a window of theirs whose bytes are
also a train window is dropped (train keeps all of its windows), and so is a test window whose
bytes are also a heldout window (heldout keeps all of its own: a rater's outer loss on heldout
must not have fitted test text), as where one file is another plus more text (versions of one
document) and the two went to different splits. Windows are compared, not files: grouping files
by any shared window would merge all that share a licence header. They are compared by 16-byte
digests (`window_digests`, held for every file: an eighth of the windows' bytes). The counts
dropped are in the report and `info.metadata`: `dropped_as_in_train` ({'heldout': n, 'test': m})
and `dropped_as_in_heldout` ({'test': k}; a test window in both counts as in train). A heldout or
test split left without a sequence is refused.

A split's sequences are stored by document id, each file's windows in order (less those dropped).
`info.metadata` also records the source folder, suffixes, seed, fractions, `max_windows` and
`sources_sha256` (each file's relative path and bytes, in id order); `out/text_corpus.json` lists
the files by id with their split (a file's assigned split, even if all its windows were dropped).
`out` is written in a temporary folder beside it and renamed into place (`files.atomic_dir`).
"""
import hashlib
import os
import shutil
from typing import Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from datarater import files
from datarater.config_checks import MAX_SEED
from datarater.curation import tfds_writer
from datarater.data import python_text
from datarater.errors import UserError

SPLITS = ('train', 'heldout', 'test')
SUFFIXES = ('.txt', '.md', '.rst')
REPORT = 'text_corpus.json'  # in every output: what --overwrite may replace
SEQ_LEN = python_text.SEQ_LEN


def text_files(source: str, suffixes: Sequence[str]) -> list[str]:
  """Paths relative to `source` of its files ending in one of `suffixes`, sorted; hidden files
  and folders are skipped, and so are pipes, sockets and devices (reading a pipe would wait)."""
  def fail(e: OSError):
    raise UserError(f'cannot read folder {e.filename!r} under --source: '
                    f'{e.strerror or e}') from None
  out = []
  for folder, dirs, names in os.walk(source, onerror=fail):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    out.extend(os.path.relpath(os.path.join(folder, n), source) for n in names
               if not n.startswith('.') and n.endswith(tuple(suffixes)) and not _special(
                   os.path.join(folder, n)))
  return sorted(out)


def _special(path: str) -> bool:
  """Whether `path` exists and is not a regular file (a link is followed; a broken one fails
  when read)."""
  return os.path.exists(path) and not os.path.isfile(path)


def _read(source: str, name: str) -> bytes:
  try:
    with open(os.path.join(source, name), 'rb') as f:
      return f.read()
  except OSError as e:
    raise UserError(f'cannot read {os.path.join(source, name)!r}: {e.strerror or e}') from None


def window_count(size: int, max_windows: int = 0) -> int:
  """How many windows a file of `size` bytes gives (at most `max_windows` if > 0)."""
  return min(size // SEQ_LEN, max_windows) if max_windows > 0 else size // SEQ_LEN


def file_windows(text: bytes, max_windows: int = 0):
  """The windows of one file, each int32 [SEQ_LEN], one at a time (python_text.windows' rows;
  the file's int32 array at once would take 4 times its size)."""
  data = np.frombuffer(text, np.uint8)
  for i in range(window_count(len(text), max_windows)):
    yield data[i * SEQ_LEN:(i + 1) * SEQ_LEN].astype(np.int32)


def window_digests(text: bytes, max_windows: int = 0) -> np.ndarray:
  """A 16-byte blake2b digest of each of `text`'s windows (`file_windows`), as numpy 'V16' [n]:
  what decontamination compares, 16 bytes a window where the windows take 128."""
  view = memoryview(text)
  return np.frombuffer(b''.join(
      hashlib.blake2b(view[i * SEQ_LEN:(i + 1) * SEQ_LEN], digest_size=16).digest()
      for i in range(window_count(len(text), max_windows))), 'V16')


def also_in(splits: Sequence, digests: Sequence[np.ndarray], reference: str,
            held: Sequence[str]) -> dict:
  """document -> the indices of its windows that a document of split `reference` also holds (by
  digest), for each document of the splits `held` with one; `digests`: each document's
  `window_digests`."""
  ref = [digests[d] for d, s in enumerate(splits) if s == reference]
  docs = [d for d, s in enumerate(splits) if s in held]
  if not ref or not docs:
    return {}
  found = np.isin(np.concatenate([digests[d] for d in docs]), np.concatenate(ref))
  ends = np.cumsum([len(digests[d]) for d in docs])
  return {d: np.flatnonzero(f).tolist() for d, f in zip(docs, np.split(found, ends[:-1]))
          if f.any()}


def decontaminate(splits: Sequence, digests: Sequence[np.ndarray]) -> tuple[dict, dict]:
  """The windows dropped: each window of a later split (`SPLITS`' order) that an earlier one also
  holds (`also_in`), counted under the first that does (a test window in train and heldout:
  train). Returns document -> the indices of all its windows dropped, and split (train, heldout)
  -> {document: the indices of its windows dropped as that split holds them}."""
  dropped, by_split = {}, {}
  for i, reference in enumerate(SPLITS[:-1]):
    by_split[reference] = {}
    for d, found in also_in(splits, digests, reference, SPLITS[i + 1:]).items():
      new = [w for w in found if w not in dropped.get(d, ())]
      if new:
        by_split[reference][d] = new
        dropped[d] = sorted({*dropped.get(d, ()), *new})
  return dropped, by_split


def assign(counts: Sequence[int], fractions: dict, seed: int,
           same: Optional[Sequence] = None) -> list:
  """The split of each document (None for one of no windows), from its window count: in a
  seeded shuffle of the ids, each to the split of `fractions` least filled against its share.
  Documents of one key in `same` (the same windows) all go where the first of them goes, their
  windows counted there at once."""
  same = range(len(counts)) if same is None else same
  windows = {}  # key -> its documents' windows
  for doc, key in enumerate(same):
    windows[key] = windows.get(key, 0) + counts[doc]
  target = {s: f * sum(counts) for s, f in fractions.items()}
  filled = dict.fromkeys(fractions, 0)
  placed = {}  # key -> split
  out = [None] * len(counts)
  for doc in np.random.default_rng(seed).permutation(len(counts)):
    if counts[doc]:
      key = same[doc]
      if key not in placed:
        placed[key] = min(fractions, key=lambda s: filled[s] / target[s])  # ties: the first
        filled[placed[key]] += windows[key]
      out[doc] = placed[key]
  return out


def _check_folder(flag: str, path: str) -> None:
  if not os.path.isdir(path):
    raise UserError(f'{flag} {path!r} ' + ('is not a folder' if os.path.exists(path)
                                           else 'does not exist'))


def _check(source, out, suffixes, heldout_fraction, test_fraction, seed, max_windows, overwrite,
           heldout_source):
  if not source:
    raise UserError('--source is required')
  _check_folder('--source', source)
  if heldout_source:
    _check_folder('--heldout_source', heldout_source)
    a, b = os.path.realpath(source), os.path.realpath(heldout_source)
    if os.path.commonpath([a, b]) in (a, b):
      raise UserError(f'--heldout_source {heldout_source!r} and --source {source!r} overlap (one '
                      'is or holds the other): give the held-out text a folder of its own')
  if not suffixes or not all(suffixes):
    raise UserError(f'--suffixes must be one or more file name endings, got {list(suffixes)}')
  for flag, value in (('--heldout_fraction', heldout_fraction),
                      ('--test_fraction', test_fraction)):
    if not 0 < value < 1:
      raise UserError(f'{flag} must be in (0, 1), got {value}')
  if heldout_fraction + test_fraction >= 1:
    raise UserError(f'--heldout_fraction + --test_fraction must be < 1 (train gets the rest), '
                    f'got {heldout_fraction} + {test_fraction}')
  if not 0 <= seed <= MAX_SEED:
    raise UserError(f'--seed must be in [0, {MAX_SEED}], got {seed}')
  if max_windows < 0:
    raise UserError(f'--max_windows must be >= 0 (0: all), got {max_windows}')
  if not out:
    raise UserError('--out is required')
  files.check_apart(out, '--out', source=source, heldout_source=heldout_source)
  files.check_not_in_dataset(out, '--out', itself=False)
  files.check_replaceable(out, overwrite, REPORT)
  files.check_can_create(out)


class TextFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Byte sequences of a folder's text files, as `plan` (made by `prepare_text`) says."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  name = 'text_folder'

  def __init__(self, plan: dict, **kwargs):
    self.plan = plan  # first: TFDS reads the info (its metadata) as the builder is made
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'tokens': tfds.features.Tensor(shape=(SEQ_LEN,), dtype=np.int32),
            'document': tfds.features.Tensor(shape=(), dtype=np.int32),
        }),
        description=f'Byte-token sequences of {SEQ_LEN} bytes of the text files of a folder.',
        metadata=tfds.core.MetadataDict(self.plan['metadata']),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the files are local.
    return {s: self._generate_examples(s) for s in SPLITS}

  def _generate_examples(self, split):
    p = self.plan
    key = 0
    for doc, (root, name) in enumerate(zip(p['roots'], p['files'])):
      if p['splits'][doc] != split:
        continue
      text = _read(root, name)
      if hashlib.sha256(text).hexdigest() != p['sha256'][doc]:
        raise UserError(f'{os.path.join(root, name)!r} changed while it was prepared')
      dropped = set(p['dropped'].get(doc, ()))
      for i, tokens in enumerate(file_windows(text, p['max_windows'])):
        if i not in dropped:
          yield key, {'tokens': tokens, 'document': doc}
          key += 1


def prepare_text(source: str, out: str, suffixes: Sequence[str] = SUFFIXES,
                 heldout_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                 max_windows: int = 0, overwrite: bool = False,
                 heldout_source: str = '') -> dict:
  """Writes the dataset folder `out` (see the module docstring); returns its report (also in
  out/text_corpus.json): per split its documents and sequences (those with a sequence left) and
  the windows dropped as an earlier split also holds them (`dropped_as_in_train`, and for test
  `dropped_as_in_heldout`). Checks everything first.

  With `heldout_source` (a folder of trusted text), every file of `source` goes to train and the
  files of `heldout_source` to heldout and test, in the ratio of the two fractions; their
  document ids follow `source`'s."""
  suffixes = list(suffixes)
  _check(source, out, suffixes, heldout_fraction, test_fraction, seed, max_windows, overwrite,
         heldout_source)
  source, out = os.path.abspath(source), os.path.abspath(out)
  folders = [('--source', source)]
  if heldout_source:
    heldout_source = os.path.abspath(heldout_source)
    folders.append(('--heldout_source', heldout_source))
  roots, names = [], []
  for flag, folder in folders:
    found = text_files(folder, suffixes)
    if not found:
      raise UserError(f'{flag} {folder!r} holds no files ending in {", ".join(suffixes)} '
                      '(hidden files and folders are skipped)')
    roots += [folder] * len(found)
    names += found
  digest, sha, counts, same, digests = hashlib.sha256(), [], [], [], []
  for root, name in zip(roots, names):
    text = _read(root, name)
    sha.append(hashlib.sha256(text).hexdigest())
    tag = b'' if root == source else b'heldout_source\0'  # a name may be in both folders
    digest.update(tag + os.fsencode(name) + b'\0' + bytes.fromhex(sha[-1]))  # any name's bytes
    counts.append(window_count(len(text), max_windows))
    same.append(hashlib.sha256(text[:counts[-1] * SEQ_LEN]).digest())  # the windows' bytes
    digests.append(window_digests(text, max_windows))
  if heldout_source:
    n = roots.count(source)
    held = heldout_fraction + test_fraction
    trained = set(same[:n])  # a trusted file whose windows train holds is left out
    splits = ['train' if c else None for c in counts[:n]] + assign(
        [0 if h in trained else c for c, h in zip(counts[n:], same[n:])],
        {'heldout': heldout_fraction / held, 'test': test_fraction / held}, seed, same[n:])
  else:
    fractions = {'train': 1 - heldout_fraction - test_fraction, 'heldout': heldout_fraction,
                 'test': test_fraction}
    splits = assign(counts, fractions, seed, same)
  report = {'source': source, 'files': names, 'splits': splits, 'total': {}}
  if heldout_source:
    report.update(heldout_source=heldout_source, heldout_files_from=roots.count(source))
  empty = [s for s in SPLITS if s not in splits]
  if heldout_source and empty:
    flag, folder, need = (('--source', source, 'train needs a file') if 'train' in empty else
                          ('--heldout_source', heldout_source, 'heldout and test need one each'))
    raise UserError(f'{flag} {folder!r} has too little text: {need} holding a window of '
                    f'{SEQ_LEN} bytes' + ('' if flag == '--source' else
                                          ' (and not a copy of a --source file)'))
  if empty:
    used = [h for h, c in zip(same, counts) if c]  # the windows of each file with one
    copies = f' ({len(set(used))} distinct: copies go to one split)' if len(set(used)) < len(
        used) else ''
    raise UserError(f'--source {source!r} has too little text: {len(used)} of its {len(names)} '
                    f'matching files hold a window of {SEQ_LEN} bytes{copies}, and train, heldout '
                    'and test each need a file of their own (at least 3)')
  dropped, by_split = decontaminate(splits, digests)
  for i, s in enumerate(SPLITS):
    docs = [d for d, x in enumerate(splits) if x == s]
    report['total'][s] = {
        'documents': sum(counts[d] > len(dropped.get(d, ())) for d in docs),
        'sequences': sum(counts[d] - len(dropped.get(d, ())) for d in docs),
        **{f'dropped_as_in_{r}': sum(len(by_split[r].get(d, ())) for d in docs)
           for r in SPLITS[:i]}}
  for i, s in enumerate(SPLITS[1:], 1):
    if not report['total'][s]['sequences']:
      flag, folder = ('--heldout_source', heldout_source) if heldout_source else ('--source',
                                                                                    source)
      earlier = ' or '.join(SPLITS[:i])
      raise UserError(f'{flag} {folder!r} has too little text of its own for {s}: every {s} '
                      f'window is also a {earlier} window (its files\' text is in {earlier} '
                      'files; another --seed may assign them otherwise)')
  metadata = {'source': source, **({'heldout_source': heldout_source} if heldout_source else {}),
              'suffixes': suffixes, 'seed': seed, 'max_windows': max_windows,
              'heldout_fraction': heldout_fraction, 'test_fraction': test_fraction,
              'num_files': len(names), 'sources_sha256': digest.hexdigest()[:16],
              **{f'dropped_as_in_{r}': {s: report['total'][s][f'dropped_as_in_{r}']
                                        for s in SPLITS[i + 1:]}
                 for i, r in enumerate(SPLITS[:-1])}}
  with files.atomic_dir(out, overwrite, marker=REPORT) as tmp:
    plan = {'roots': roots, 'files': names, 'splits': splits, 'sha256': sha,
            'max_windows': max_windows, 'metadata': metadata, 'dropped': dropped}
    builder = TextFolder(plan, data_dir=os.path.join(tmp, 'tfds'), file_format='array_record')
    tfds_writer.prepare_unshuffled(builder)
    folder = str(builder.data_dir)
    for entry in os.listdir(folder):  # the dataset folder itself becomes `out`
      os.rename(os.path.join(folder, entry), os.path.join(tmp, entry))
    shutil.rmtree(os.path.join(tmp, 'tfds'))
    files.write_json(os.path.join(tmp, REPORT), {**report, 'metadata': metadata})
  return report
