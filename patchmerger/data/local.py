"""Offline preparation of datasets shipped by packages, as real TFDS datasets.

Debian's `dataset-fashion-mnist` ships the real Fashion-MNIST idx files. We
store them as TFDS's own `fashion_mnist` (same name, version, features and
splits), so training reads them through exactly the code path ImageNet uses.
"""
import gzip
import logging
import os
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


class DatasetNotPreparedError(RuntimeError):
  """The dataset is neither prepared in the data dir nor preparable offline."""


def read_idx(path: str) -> np.ndarray:
  """Reads a (gzipped) idx file, the MNIST family's format."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if data[:2] != b'\x00\x00' or data[2] != 0x08:
    raise ValueError(f'{path} is not an unsigned-byte idx file')
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(f'{path} is truncated: expected {shape}, got {array.size} values')
  return array.reshape(shape)


def prepare_fashion_mnist(data_dir: Optional[str],
                          source_dir: str = FASHION_MNIST_DIR) -> tfds.core.DatasetBuilder:
  """Stores the idx files in `source_dir` as TFDS `fashion_mnist` in `data_dir`."""
  official = tfds.builder('fashion_mnist', data_dir=data_dir)
  splits = {}
  for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
    images = read_idx(os.path.join(source_dir, images_file))[..., None]
    labels = read_idx(os.path.join(source_dir, labels_file)).astype(np.int64)
    if len(images) != len(labels):
      raise ValueError(f'{split}: {len(images)} images but {len(labels)} labels')
    splits[split] = tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
  logging.info('Preparing TFDS fashion_mnist %s from %s', official.version, source_dir)
  tfds.dataset_builders.store_as_tfds_dataset(
      name='fashion_mnist', version=str(official.version), features=official.info.features,
      split_datasets=splits, data_dir=data_dir or tfds.core.constants.DATA_DIR,
      description='Fashion-MNIST, prepared offline from the dataset-fashion-mnist package.',
      homepage=official.info.homepage, citation=official.info.citation)
  return tfds.builder('fashion_mnist', data_dir=data_dir)


def _sklearn_data_dir() -> str:
  try:
    import sklearn.datasets
  except ImportError:
    return '/nonexistent/sklearn'
  return os.path.join(os.path.dirname(sklearn.datasets.__file__), 'data')


DIGITS_TEST_EXAMPLES = 360  # A fixed 20% of the 1,797 images.


def prepare_digits(data_dir: Optional[str], source_dir: str = '') -> tfds.core.DatasetBuilder:
  """scikit-learn's real 8x8 handwritten digits as a TFDS dataset `digits`
  (uint8 images [8, 8, 1] scaled from 0..16, labels 0-9; a fixed train/test split)."""
  del source_dir  # scikit-learn knows where its copy lives.
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  order = np.random.default_rng(0).permutation(len(labels))
  test, train = order[:DIGITS_TEST_EXAMPLES], order[DIGITS_TEST_EXAMPLES:]
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(8, 8, 1)),
      'label': tfds.features.ClassLabel(num_classes=10)})
  splits = {name: tf.data.Dataset.from_tensor_slices({'image': images[idx], 'label': labels[idx]})
            for name, idx in (('train', train), ('test', test))}
  logging.info('Preparing TFDS digits from scikit-learn')
  tfds.dataset_builders.store_as_tfds_dataset(
      name='digits', version='1.0.0', features=features, split_datasets=splits,
      data_dir=data_dir or tfds.core.constants.DATA_DIR,
      description='scikit-learn load_digits(): 1,797 real 8x8 handwritten digits.')
  return tfds.builder('digits', data_dir=data_dir)


# Datasets we can prepare without network: name -> (preparer, its source dir).
LOCAL_SOURCES = {'fashion_mnist': (prepare_fashion_mnist, FASHION_MNIST_DIR),
                 'digits': (prepare_digits, _sklearn_data_dir())}
HOW_TO_GET = {
    'fashion_mnist': 'apt-get install dataset-fashion-mnist (Debian), then run again',
    'digits': 'pip install scikit-learn, then run again',
    'imagenet2012': ('download ILSVRC2012_img_{train,val}.tar into DATA_DIR/downloads/manual, '
                     'then: tfds build imagenet2012 --data_dir=DATA_DIR'),
    'imagenet21k': ('TFDS 4.9 has no ImageNet-21k builder: write the images as a TFDS '
                    'dataset named imagenet21k (features image, label; split full) with '
                    'tfds.dataset_builders.store_as_tfds_dataset into DATA_DIR'),
}


def ensure_prepared(name: str, data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  """The dataset's builder, preparing it offline where we can; else one clear error."""
  where = data_dir or tfds.core.constants.DATA_DIR
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:  # Neither registered nor in data_dir.
    if name in LOCAL_SOURCES and os.path.isdir(LOCAL_SOURCES[name][1]):
      prepare, source_dir = LOCAL_SOURCES[name]
      return prepare(data_dir, source_dir)
    raise DatasetNotPreparedError(
        f'Dataset {name!r} is not a TFDS dataset and not prepared in {where}. '
        f'To get it: {HOW_TO_GET.get(name, "prepare it in TFDS format in DATA_DIR")}.') from None
  if builder.is_prepared():
    return builder
  if name in LOCAL_SOURCES:
    prepare, source_dir = LOCAL_SOURCES[name]
    if os.path.isdir(source_dir):
      return prepare(data_dir, source_dir)
  how = HOW_TO_GET.get(name, f'tfds build {name} --data_dir={where}')
  raise DatasetNotPreparedError(
      f'Dataset {name!r} is not prepared in {where}. To get it: {how}.')
