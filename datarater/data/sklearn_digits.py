"""A TFDS builder for scikit-learn's handwritten digits: real data that ships inside a package.

1,797 8x8 grey-scale digits (UCI optdigits test set, bundled in the scikit-learn wheel), written
once into an array_record TFDS dataset and then read like any other TFDS dataset. The split is a
fixed permutation, so every machine builds the same examples in the same order (and, prepared by
`pipeline.prepare`, which serialises each feature map in key order, the same file bytes).
"""
import numpy as np
import tensorflow_datasets as tfds

_SPLIT_SIZES = {'train': 1197, 'validation': 300, 'test': 300}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn `load_digits()` as a TFDS dataset (image uint8 8x8x1, label 0-9)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        description='scikit-learn handwritten digits (8x8, grey levels 0-16 scaled to 0-255).',
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships inside scikit-learn.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    splits, start = {}, 0
    for name, size in _SPLIT_SIZES.items():
      idx = order[start:start + size]
      start += size
      splits[name] = self._generate_examples(images[idx], labels[idx])
    return splits

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image, 'label': int(label)}
