"""DataRater on Fashion-MNIST with 20% class-conditional label noise (small CNNs).

The data is the Debian package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`,
or DATARATER_IDX_DIR naming a folder of the four idx files), written once into a local TFDS
dataset (`idx_mnist/fashion`, datarater/data/idx_mnist.py). Models train on the first 50,000
training images, whose labels are corrupted; the next 5,000 are the clean held-out split of the
meta loss; the test set is the final evaluation. `train[55000:]` (5,000 more) is left for
validation, e.g. `--config.data.eval_split='train[55000:]'` while tuning.

A corrupted label moves to a class it is easily taken for (`data.confusions`: T-shirt/top and
Shirt, Pullover, Coat and Shirt, Sneaker and Ankle boot, Sandal and Sneaker). Trouser, Dress and
Bag have no partner there: their corrupted labels (3 of 10 classes, so about 30% of the
`label_confusion` examples) move to any other class, as symmetric noise does.
Input corruptions can be added with `--config.data.input_corruption.blur=0.05` and the like.
The CNNs are sized for 2 CPU cores: stride-2 3x3 convolutions, 28 -> 14 -> 7 pixels.
"""
import ml_collections

from configs import digits_cnn

# Fashion-MNIST classes: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal,
# 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot.
CONFUSIONS = ((0, 6), (2, 4), (4, 6), (2, 6), (7, 9), (5, 7))


def get_config() -> ml_collections.ConfigDict:
  c = digits_cnn.get_config()
  c.data.name = 'idx_mnist/fashion'
  c.data.train_split = 'train[:50000]'
  c.data.heldout_split = 'train[50000:55000]'
  c.data.eval_split = 'test'
  c.data.label_noise = 0.2
  c.data.label_noise_kind = 'confusion'
  c.data.confusions = CONFUSIONS

  c.task = digits_cnn.cnn(channels=(16, 32), strides=(2, 2), pool='flatten')
  c.rater = digits_cnn.cnn(name='cnn_rater', channels=(8, 16), strides=(2, 2), temperature=1.0,
                         readout='logit')
  # Selection features (policy 'sae'), chosen with configs/fashion_mnist_bench.py: an MLP's hidden
  # layer and an SAE, each trained for a number of passes over the training split.
  c.features.task = ml_collections.ConfigDict({'name': 'mlp_classifier', 'hidden': (64,),
                                               'activation': 'relu', 'input': '', 'label': '',
                                               'dtype': '', 'param_dtype': ''})
  c.features.train_epochs = 3.84   # 3,000 steps of batch 64 on the 50,000 images
  c.sae.epochs = 6.4               # 2,500 steps of batch 128
  c.sae.batch_size = 128

  c.train.batch_size = 128
  c.train.epochs = 5
  c.train.seeds = (0, 1, 2)
  c.train.checkpoint_every = 1
  return c
