"""Planted corruption of a training split, recorded per example with its kind.

A `Corruption` decides, from its seed and the split's size N alone, which examples get which
kind (`record`: exactly round(rate * N) examples per kind (Python's round: halves to even),
disjoint, consecutive runs of one seeded permutation of the split in the order of `kinds`), and
rewrites the raw (undecoded) features of any block of examples given their ids (`apply`). Every
random choice is a function of (seed, N) or of (seed, kind, example id), so a split read whole and
one streamed in blocks are corrupted identically, and detection can be measured per kind.

Kinds: label noise on the supervised target, 'label_symmetric' (another class, uniformly) or
'label_confusion' (a confusable class from a list of pairs), and input corruptions of the
supervised input, a uint8 image [H, W] or [H, W, C]: 'blur' (Gaussian, sigma 2-3 px),
'pixel_noise' (Gaussian, std 30% of the range), 'occlusion' (a grey rectangle over about 40-60%
of the image), 'duplicate' (a shifted, slightly noisy copy of a clean example of the split, with
its label) and 'ood' (a scikit-learn 8x8 digit resized to the image, under a random label).
"""
import dataclasses
import fractions
import functools
from typing import Callable, Optional

import numpy as np

from datarater.errors import UserError

CLEAN = 'clean'
LABEL_KINDS = {'symmetric': 'label_symmetric', 'confusion': 'label_confusion'}
INPUT_KINDS = ('blur', 'pixel_noise', 'occlusion', 'duplicate', 'ood')
# A fixed number per kind, for the kind's own random streams (not its place in `kinds`).
_CODES = {'label_symmetric': 1, 'label_confusion': 2, 'blur': 3, 'pixel_noise': 4,
          'occlusion': 5, 'duplicate': 6, 'ood': 7}
BLUR_SIGMA = (2.0, 3.0)       # pixels, uniform per example
PIXEL_NOISE_STD = 0.3         # of the 0-255 range
OCCLUSION_AREA = (0.4, 0.6)   # fraction of the image, uniform per example
OCCLUSION_VALUE = 128
DUPLICATE_NOISE_STD = 3.0     # grey levels, on top of a one-pixel shift

ReadRaw = Callable[[np.ndarray], dict]  # ids -> raw features of those examples of the split


@dataclasses.dataclass(frozen=True)
class Corruption:
  """Label noise at rate `label_noise` (`label_noise_kind` 'symmetric': a corrupted label moves
  to another class, uniformly; 'confusion': to a partner in `confusions`, pairs of class indices,
  uniformly among its partners, or to any other class if it has none) and input corruptions at
  rates `blur`, `pixel_noise`, `occlusion`, `duplicate`, `ood`, drawn from `seed`."""
  label_noise: float = 0.0
  seed: int = 0
  label_noise_kind: str = 'symmetric'
  confusions: tuple = ()
  blur: float = 0.0
  pixel_noise: float = 0.0
  occlusion: float = 0.0
  duplicate: float = 0.0
  ood: float = 0.0

  def __post_init__(self):
    if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
      raise UserError(f'the corruption seed (data.noise_seed) must be an integer >= 0, got '
                      f'{self.seed!r}')
    if not 0.0 <= self.label_noise < 1.0:
      raise UserError(f'data.label_noise must be in [0, 1), got {self.label_noise}')
    if self.label_noise_kind not in LABEL_KINDS:
      raise UserError(f'data.label_noise_kind must be one of {", ".join(LABEL_KINDS)}, got '
                      f'{self.label_noise_kind!r}')
    for kind in INPUT_KINDS:
      if not 0.0 <= getattr(self, kind) < 1.0:
        raise UserError(f'data.input_corruption.{kind} must be in [0, 1), got '
                        f'{getattr(self, kind)}')
    # The rates as the decimals written (0.7 + 0.2 + 0.1 is 1; as floats 0.9999999999999999).
    total = sum(fractions.Fraction(repr(rate)) for _, rate in self._rates())
    if total >= 1:
      raise UserError(f'the corruption rates add up to {float(total):g}; they must add up to < 1 '
                      '(data.label_noise + data.input_corruption.*)')
    try:
      pairs = tuple((int(a), int(b)) for a, b in self.confusions)
    except (TypeError, ValueError):
      pairs = None
    if pairs is None or any(a == b or min(a, b) < 0 for a, b in pairs):
      raise UserError('data.confusions must be pairs of two different class indices >= 0, got '
                      f'{self.confusions!r}')
    object.__setattr__(self, 'confusions', pairs)  # hashable, whatever sequences came in

  def _rates(self) -> tuple:
    """((kind name, rate), ...) of the kinds with a positive rate, in record order."""
    out = ((LABEL_KINDS[self.label_noise_kind], self.label_noise),)
    out += tuple((kind, getattr(self, kind)) for kind in INPUT_KINDS)
    return tuple((k, float(r)) for k, r in out if r)

  def describe(self) -> Optional[dict]:
    """What decides every example's corruption (kinds and rates, seed, partners), as JSON;
    None when nothing is planted. Equal descriptions corrupt a split identically."""
    rates = dict(self._rates())
    if not rates:
      return None
    out = {'rates': rates, 'seed': int(self.seed)}
    if 'label_confusion' in rates:
      out['confusions'] = [list(p) for p in self.confusions]
    return out

  def check_targets(self, info, *models) -> None:
    """Refuses planted corruption aimed away from what `models` (tasks or raters) read: label
    noise changes the dataset's supervised label and input corruption its supervised input, so
    a model reading another feature of that kind (class label or not) instead would see clean
    data while the record calls it corrupted. What a model reads is traced (`model_reads`)."""
    keys = info.supervised_keys or (None, None)
    planted = [(target, what) for target, on, what in (
        (keys[1], self.label_noise > 0, 'label noise'),
        (keys[0], any(getattr(self, k) > 0 for k in INPUT_KINDS), 'input corruption'))
               if on and target is not None]
    if not planted:
      return
    from datarater.tasks.base import model_reads  # pylint: disable=g-import-not-at-top
    labels = set(info.num_classes)
    for model in models:
      read = model_reads(model, info.spec)
      for target, what in planted:
        other = [k for k in read if (k in labels) == (target in labels)]
        if target not in read and other:
          raise UserError(f'{what} is planted in the dataset\'s supervised feature {target!r}, '
                          f'but {type(model).__name__} reads {other[0]!r}: read {target!r} or '
                          'plant none')

  @property
  def kinds(self) -> tuple:
    """Kind names; the record stores their index (0 = clean)."""
    return (CLEAN, *(k for k, _ in self._rates()))

  def record(self, n: int) -> np.ndarray:
    """int8 [n]: the kind index of every example of a split of n."""
    return self._record(n).copy()

  @functools.lru_cache(maxsize=8)
  def _record(self, n: int) -> np.ndarray:
    order = np.random.default_rng(self.seed).permutation(n)
    counts = [int(round(rate * n)) for _, rate in self._rates()]
    if sum(counts) >= max(n, 1):
      raise UserError(f'the corruption rates ask for {sum(counts)} of a split of {n} examples: '
                      'none would be left clean')
    record, start = np.zeros(n, np.int8), 0
    for k, count in enumerate(counts, 1):
      record[order[start:start + count]] = k
      start += count
    return record

  @functools.lru_cache(maxsize=8)
  def _draw(self, n: int, num_classes: int) -> dict:
    """The split-wide random choices of a split of n with `num_classes` classes."""
    rng = np.random.default_rng(self.seed)
    rng.permutation(n)  # `record`'s permutation: the class shift continues its stream
    draw = {'shift': rng.integers(1, num_classes, size=n)}  # never 0: a flipped label changes
    kind = lambda name: np.random.default_rng([self.seed, _CODES[name]])
    if self.label_noise_kind == 'confusion':
      draw['partner'] = kind('label_confusion').random(n)
    if self.duplicate:
      clean = np.flatnonzero(self._record(n) == 0)
      if not len(clean):
        raise UserError(f'near-duplicates need clean examples to copy; a split of {n} has none')
      draw['source'] = clean[kind('duplicate').integers(len(clean), size=n)]
    if self.ood:
      rng = kind('ood')
      draw['digit'] = rng.integers(len(_digits()), size=n)
      draw['ood_label'] = rng.integers(num_classes, size=n)
    return draw

  def apply(self, info, raw: dict, ids: np.ndarray, n: int,
            source: Optional[ReadRaw] = None) -> tuple[dict, dict]:
    """(raw features of examples `ids` of a split of n, corrupted; original values changed).

    Near-duplicates copy clean examples of the split that may lie outside the block: those are
    read from `raw` when the block holds them, else from `source(ids)`, the raw (uncorrupted)
    features of those examples of the split (needed only with near-duplicates).
    """
    rates = dict(self._rates())
    if not rates:
      return raw, {}
    ids = np.asarray(ids, np.int64)
    kind_of = self._record(n)[ids]
    kinds = self.kinds
    changes_label = set(rates) - set(IMAGE_TRANSFORMS)
    label = label_feature(info) if changes_label else None
    image = image_feature(info, raw) if set(rates) & set(INPUT_KINDS) else None
    num_classes = info.num_classes[label] if label else 2
    if label and num_classes < 2:
      raise UserError(f'label noise needs two classes or more; {label!r} has {num_classes}')
    draw = self._draw(n, num_classes)
    if 'label_confusion' in rates:
      self._partners(num_classes)  # checked whatever the block holds
    out, clean = dict(raw), {}
    if label:
      labels = np.asarray(raw[label])
      new_labels = labels.copy()
      clean[label] = labels
    if image:
      images = np.asarray(raw[image])
      new_images = images.copy()
      clean[image] = images
    for k, name in enumerate(kinds[1:], 1):
      at = np.flatnonzero(kind_of == k)
      if not len(at):
        continue
      who = ids[at]
      if name == 'label_symmetric':
        new_labels[at] = (labels[at] + draw['shift'][who]) % num_classes
      elif name == 'label_confusion':
        new_labels[at] = self._confuse(labels[at], draw['partner'][who], num_classes)
      elif name == 'duplicate':
        src = draw['source'][who]
        src_images, src_labels = _lookup(raw, ids, src, (image, label), source)
        for j, i in enumerate(who):
          new_images[at[j]] = _near_copy(src_images[j], self._rng(name, i))
        new_labels[at] = src_labels
      elif name == 'ood':
        new_images[at] = ood_images(images.shape[1:])[draw['digit'][who]]
        new_labels[at] = draw['ood_label'][who]
      else:
        transform = IMAGE_TRANSFORMS[name]
        for j, i in enumerate(who):
          new_images[at[j]] = transform(images[at[j]], self._rng(name, i))
    if label:
      out[label] = new_labels
    if image:
      out[image] = new_images
    return out, clean

  def _rng(self, kind: str, example: int) -> np.random.Generator:
    """The random stream of one example's corruption of one kind."""
    return np.random.default_rng([self.seed, _CODES[kind], int(example)])

  @functools.lru_cache(maxsize=8)
  def _partners(self, num_classes: int) -> tuple:
    """Each class's partners in `confusions` (sorted), checked against the classes there are."""
    partners = [set() for _ in range(num_classes)]
    for a, b in self.confusions:
      if max(a, b) >= num_classes:
        raise UserError(f'data.confusions names class {max(a, b)}, but the dataset has '
                        f'{num_classes} classes')
      partners[a].add(b)
      partners[b].add(a)
    return tuple(tuple(sorted(p)) for p in partners)

  def _confuse(self, labels: np.ndarray, u: np.ndarray, num_classes: int) -> np.ndarray:
    """Each label moved to one of its partners in `confusions`, chosen by u in [0, 1), or to
    another class if it has none."""
    partners = self._partners(num_classes)
    out = np.empty_like(labels)
    for j, (y, v) in enumerate(zip(labels, u)):
      p = partners[int(y)]
      if p:
        out[j] = p[int(v * len(p))]
      else:  # uniformly one of the other classes
        out[j] = (int(y) + 1 + int(v * (num_classes - 1))) % num_classes
    return out


def _lookup(raw: dict, ids: np.ndarray, wanted: np.ndarray, features: tuple,
            source: Optional[ReadRaw]) -> tuple:
  """The raw `features` of examples `wanted`: from the block (`raw`, examples `ids`) where it
  holds them, else from `source`."""
  order = np.argsort(ids, kind='stable')
  pos = np.searchsorted(ids[order], wanted).clip(0, len(ids) - 1)
  inside = ids[order][pos] == wanted
  rows = order[pos]
  out = [np.asarray(raw[f])[rows].copy() for f in features]
  if not inside.all():
    missing = np.unique(wanted[~inside])
    if source is None:
      raise UserError(f'near-duplicates of this block copy examples outside it (e.g. id '
                      f'{int(missing[0])}): pass the split to Corruption.apply as `source`')
    got = source(missing)
    where = np.searchsorted(missing, wanted[~inside])
    for x, f in zip(out, features):
      x[~inside] = np.asarray(got[f])[where]
  return tuple(out)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  sigma = rng.uniform(*BLUR_SIGMA)
  sigmas = (sigma, sigma) + (0,) * (image.ndim - 2)
  return _to_uint8(ndimage.gaussian_filter(image.astype(np.float32), sigmas, mode='nearest'))


def _pixel_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return _to_uint8(image + rng.normal(0.0, 255.0 * PIXEL_NOISE_STD, image.shape))


def _occlude(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A rectangle over OCCLUSION_AREA of the image (random aspect and place) set to grey."""
  h, w = image.shape[:2]
  area = rng.uniform(*OCCLUSION_AREA) * h * w
  aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
  rh = int(np.clip(round(np.sqrt(area * aspect)), 1, h))
  rw = int(np.clip(round(area / rh), 1, w))
  top, left = rng.integers(h - rh + 1), rng.integers(w - rw + 1)
  out = image.copy()
  out[top:top + rh, left:left + rw] = OCCLUSION_VALUE
  return out


# Input kinds that rewrite each image alone, keeping its label: (image, rng) -> image.
IMAGE_TRANSFORMS = {'blur': _blur, 'pixel_noise': _pixel_noise, 'occlusion': _occlude}


def _near_copy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """`image` shifted by one pixel (one of 8 directions, edges repeated) plus small noise."""
  dy, dx = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if a or b][rng.integers(8)]
  h, w = image.shape[:2]
  pad = np.pad(image, ((1, 1), (1, 1)) + ((0, 0),) * (image.ndim - 2), mode='edge')
  shifted = pad[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
  return _to_uint8(shifted + rng.normal(0.0, DUPLICATE_NOISE_STD, image.shape))


@functools.lru_cache(maxsize=1)
def _digits() -> np.ndarray:
  """scikit-learn's 1,797 8x8 digits, grey levels 0-255 (float64 [1797, 8, 8])."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  return load_digits().images * (255.0 / 16.0)


def resize_bilinear(images: np.ndarray, h: int, w: int) -> np.ndarray:
  """Arrays [..., H0, W0] resized to [..., h, w] by bilinear interpolation (pixel centres
  aligned, edges repeated)."""
  def axis(n_in, n_out):
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    return lo, np.minimum(lo + 1, n_in - 1), x - lo
  y0, y1, wy = axis(images.shape[-2], h)
  x0, x1, wx = axis(images.shape[-1], w)
  rows = images[..., y0, :] * (1 - wy)[:, None] + images[..., y1, :] * wy[:, None]
  return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


@functools.lru_cache(maxsize=4)
def ood_images(shape: tuple) -> np.ndarray:
  """scikit-learn's digits resized to images of `shape` ([H, W] or [H, W, C]): uint8 [1797, ...]."""
  out = _to_uint8(resize_bilinear(_digits(), shape[0], shape[1]))
  out = np.broadcast_to(out.reshape(out.shape + (1,) * (len(shape) - 2)), (len(out), *shape))
  out = np.ascontiguousarray(out)
  out.flags.writeable = False  # cached: shared by every caller
  return out


def label_feature(info) -> str:
  """The class-label target of a dataset (its supervised keys' second name)."""
  keys = info.supervised_keys
  if not keys or keys[1] not in info.num_classes:
    raise UserError(f'label noise needs a class-label target: dataset {info.name!r} has no '
                    'supervised (input, label) keys with a class label (plant none: '
                    'data.label_noise = 0; launch.filter: --label_noise=0)')
  return keys[1]


def image_feature(info, raw: dict) -> str:
  """The supervised input of a dataset, checked to be a uint8 image [H, W] or [H, W, C]."""
  keys = info.supervised_keys
  name = keys[0] if keys else None
  if name is None or name not in raw:
    raise UserError(f'input corruption needs a supervised input: dataset {info.name!r} has no '
                    'supervised (input, label) keys' if name is None else
                    f'input corruption needs uint8 images [H, W] or [H, W, C]: the supervised '
                    f'input {name!r} of dataset {info.name!r} is not read as an array'
                    f'{info.why_not(name)}')
  x = np.asarray(raw[name])
  if x.dtype != np.uint8 or x.ndim not in (3, 4):
    raise UserError(f'input corruption needs uint8 images [H, W] or [H, W, C]: feature {name!r} '
                    f'of dataset {info.name!r} is {x.dtype} {x.shape[1:]}')
  return name


def from_config(data) -> Corruption:
  """The corruption of a `data` config section (label_noise, label_noise_kind, confusions,
  noise_seed, input_corruption.{blur, pixel_noise, occlusion, duplicate, ood}; a kind left
  out is 0)."""
  rates = {kind: float(data.input_corruption.get(kind, 0.0)) for kind in INPUT_KINDS}
  return Corruption(label_noise=float(data.label_noise), seed=int(data.noise_seed),
                    label_noise_kind=str(data.label_noise_kind),
                    confusions=tuple(tuple(p) for p in data.confusions), **rates)
