"""Offline preparation of datasets shipped by packages, as real TFDS datasets.

Debian's `dataset-fashion-mnist` ships the real Fashion-MNIST idx files. We
store them as TFDS's own `fashion_mnist` (same name, version, features and
splits), so training reads them through exactly the code path ImageNet uses.
"""
import gzip
import logging
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from patchmerger.data import prepare
from patchmerger.errors import DataError

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


def read_idx(path: str) -> np.ndarray:
  """Reads a (gzipped) idx file, the MNIST family's format."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if data[:2] != b'\x00\x00' or data[2] != 0x08:
    raise DataError(f'{path} is not an unsigned-byte idx file')
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise DataError(f'{path} is truncated: expected {shape}, got {array.size} values')
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
      raise DataError(f'{split}: {len(images)} images but {len(labels)} labels')
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
    'fashion_mnist': 'apt-get install dataset-fashion-mnist (Debian)',
    'digits': 'pip install scikit-learn, then run again',
    'imagenet2012': ('download ILSVRC2012_img_{train,val}.tar into DATA_DIR/downloads/manual, '
                     'then: tfds build imagenet2012 --data_dir=DATA_DIR'),
    'imagenet21k': ('download the per-class tars (fall11 or winter21 release) into DIR, '
                    'then: python prepare_data.py --dataset=imagenet21k '
                    '--source=DIR --data_dir=DATA_DIR'),
}


def _prepare_folder(name: str, data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  """`folder:PATH`: PATH/<split>/<class>/*.{jpg,png} as a TFDS dataset, written to
  the data dir on first use (delete DATA_DIR/folder_* to read a changed folder again)."""
  path = name.split(':', 1)[1]
  if not os.path.isdir(path):
    raise FileNotFoundError(f'Image folder {path} does not exist.')
  tfds_name = prepare.folder_dataset_name(path)
  where = data_dir or tfds.core.constants.DATA_DIR
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    if builder.is_prepared():
      return builder
  except tfds.core.registered.DatasetNotFoundError:
    pass
  small = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
              for f in files) < 64 * 2 ** 20
  report = prepare.prepare(name, where, workers=1 if small else 0)
  for line in report.lines():
    logging.info('%s', line)
  return tfds.builder(tfds_name, data_dir=data_dir)


def needs_manual_download(builder: tfds.core.DatasetBuilder) -> bool:
  return bool(getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None))


def check_num_classes(builder: tfds.core.DatasetBuilder, num_classes: int) -> None:
  """Fails with one line when the dataset's label count is not `num_classes`."""
  features = builder.info.features
  label = features['label'] if 'label' in features.keys() else None
  found = getattr(label, 'num_classes', None)
  if found is not None and found != num_classes:
    raise DataError(f'Dataset {builder.name} has {found} classes but num_classes is '
                    f'{num_classes}; set --config.num_classes={found}.')


def ensure_prepared(name: str, data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  """The dataset's builder, preparing it offline where we can (and letting TFDS
  download the datasets that download by themselves); else one clear error.

  With several processes, process 0 prepares first while the others wait: TFDS
  preparation is not safe for several writers of one directory. Then the others
  find it prepared (shared storage) or prepare their own copy (local disks)."""
  if jax.process_count() == 1:
    return _ensure_prepared(name, data_dir)
  from jax.experimental import multihost_utils
  builder = _ensure_prepared(name, data_dir) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f'dataset {name} prepared')
  return builder if builder is not None else _ensure_prepared(name, data_dir)


# Local sources whose TFDS builder can also download them, where the package is absent.
DOWNLOADABLE = ('fashion_mnist',)


def _download(builder: tfds.core.DatasetBuilder, where: str,
              local_source: str) -> tfds.core.DatasetBuilder:
  """TFDS's own download of a dataset whose local source is missing; one error line
  naming both sources when the download fails too (offline, say)."""
  logging.info('Downloading and preparing TFDS %s in %s (%s)', builder.name, where,
               local_source)
  try:
    builder.download_and_prepare()
  except Exception as e:  # Network, proxy, checksum: any of them means "cannot download".
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(
        f'Dataset {builder.name!r} cannot be prepared in {where}: the local source '
        f'{local_source}, and TFDS\'s download failed ({type(e).__name__}: '
        f'{reason[:200]}).') from None
  return builder


def _ensure_prepared(name: str, data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  if name.startswith('folder:'):
    return _prepare_folder(name, data_dir)
  where = data_dir or tfds.core.constants.DATA_DIR
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:  # Neither registered nor in data_dir.
    if name in LOCAL_SOURCES and os.path.isdir(LOCAL_SOURCES[name][1]):
      prepare, source_dir = LOCAL_SOURCES[name]
      return prepare(data_dir, source_dir)
    raise DataError(
        f'Dataset {name!r} is not a TFDS dataset and not prepared in {where}. '
        f'To get it: {HOW_TO_GET.get(name, "prepare it in TFDS format in DATA_DIR")}.') from None
  if builder.is_prepared():
    return builder
  if name in LOCAL_SOURCES:
    prepare, source_dir = LOCAL_SOURCES[name]
    if os.path.isdir(source_dir):
      return prepare(data_dir, source_dir)
    if name in DOWNLOADABLE:  # No package here (macOS, Fedora, ...): TFDS's own download.
      return _download(builder, where, f'{source_dir} is absent ({HOW_TO_GET[name]})')
  elif not needs_manual_download(builder):  # e.g. cifar10: TFDS fetches it.
    logging.info('Downloading and preparing TFDS %s in %s', name, where)
    builder.download_and_prepare()
    return builder
  how = HOW_TO_GET.get(name, f'tfds build {name} --data_dir={where}')
  raise DataError(
      f'Dataset {name!r} is not prepared in {where}. To get it: {how}.')


def check_splits(builder: tfds.core.DatasetBuilder, splits: Sequence[str]) -> list[str]:
  """'SPLIT: N examples' for each of `splits`; DataError naming the splits the dataset
  has when one cannot be read. Builders without split sizes (TFDS mock data) pass."""
  if not builder.info.splits:
    return []
  sizes = []
  for split in splits:
    try:
      sizes.append(f'{split}: {builder.info.splits[split].num_examples:,} examples')
    except (KeyError, ValueError, AssertionError) as e:
      have = ', '.join(f'{n} ({i.num_examples:,})' for n, i in builder.info.splits.items())
      raise DataError(f'Dataset {builder.name} cannot give split {split!r} (it has '
                      f'{have}): {e}') from None
  return sizes


def check_data(config: Any) -> str:
  """One line saying that the config's dataset is ready (prepared, or prepared or
  downloaded by itself on first use); raises DataError saying what is missing."""
  name, data_dir = config.dataset, config.data_dir
  where = data_dir or tfds.core.constants.DATA_DIR
  splits = (config.train_split, config.test_split)
  if name.startswith('folder:'):
    path = name.split(':', 1)[1]
    try:
      _, sources = prepare.list_sources(name, None)
    except FileNotFoundError as e:
      raise DataError(str(e)) from None
    try:
      builder = tfds.builder(prepare.folder_dataset_name(path), data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      builder = None
    if builder is not None and builder.is_prepared():
      check_num_classes(builder, config.num_classes)
      return f'{name}: prepared as {builder.name} in {where} ({"; ".join(check_splits(builder, splits))}).'
    classes = {s.label for s in sources}
    if len(classes) != config.num_classes:
      raise DataError(f'{path} has {len(classes)} classes but num_classes is '
                      f'{config.num_classes}; set --config.num_classes={len(classes)}.')
    found = {s.split for s in sources}
    missing = [s for s in splits if s.split('[')[0] not in found]  # 'train[:90%]' -> train
    if missing:
      raise DataError(f'{path} has no split folder for {", ".join(missing)} '
                      f'(it has {", ".join(sorted(found))}).')
    return f'{name}: {len(classes)} classes; prepared into {where} on first use.'
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    if name in LOCAL_SOURCES and os.path.isdir(LOCAL_SOURCES[name][1]):
      return f'{name}: prepared into {where} from {LOCAL_SOURCES[name][1]} on first use.'
    raise DataError(f'Dataset {name!r} is not prepared in {where}. To get it: '
                    f'{HOW_TO_GET.get(name, "prepare it in TFDS format in DATA_DIR")}.') from None
  if builder.is_prepared():
    check_num_classes(builder, config.num_classes)
    return f'{name}: prepared in {where} ({"; ".join(check_splits(builder, splits))}).'
  if name in LOCAL_SOURCES and os.path.isdir(LOCAL_SOURCES[name][1]):
    return f'{name}: prepared into {where} from {LOCAL_SOURCES[name][1]} on first use.'
  if name in DOWNLOADABLE:
    return (f'{name}: {LOCAL_SOURCES[name][1]} is absent, so TFDS downloads and prepares it '
            f'into {where} on first use (needs network; or {HOW_TO_GET[name]}).')
  if name not in LOCAL_SOURCES and not needs_manual_download(builder):
    return f'{name}: TFDS downloads and prepares it into {where} on first use (needs network).'
  how = HOW_TO_GET.get(name, f'tfds build {name} --data_dir={where}')
  raise DataError(f'Dataset {name!r} is not prepared in {where}. To get it: {how}.')
