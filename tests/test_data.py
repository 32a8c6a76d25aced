"""Offline dataset preparation and the tf.data input pipeline."""
import gzip
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from patchmerger import errors
from patchmerger.data import input_pipeline, local


def _write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
      int(n).to_bytes(4, 'big') for n in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_source(directory, sizes, seed=0, random_labels=False):
  """Random idx files in the Debian package's layout; labels cycle 0-9 unless random."""
  rng = np.random.default_rng(seed)
  for split, n in sizes.items():
    images_file, labels_file = local.FASHION_MNIST_FILES[split]
    _write_idx(directory / images_file, rng.integers(0, 256, (n, 28, 28)))
    labels = rng.integers(0, 10, n) if random_labels else np.arange(n) % 10
    _write_idx(directory / labels_file, labels)


@pytest.fixture(scope='module')
def small_fashion_source(tmp_path_factory):
  """Idx files with 40 train / 20 test images."""
  source = tmp_path_factory.mktemp('fashion-mnist')
  write_fashion_source(source, {'train': 40, 'test': 20})
  return source


@pytest.fixture(scope='module')
def prepared(small_fashion_source, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  local.LOCAL_SOURCES['fashion_mnist'] = (local.prepare_fashion_mnist, str(small_fashion_source))
  try:
    builder = local.ensure_prepared('fashion_mnist', str(data_dir))
  finally:
    local.LOCAL_SOURCES['fashion_mnist'] = (local.prepare_fashion_mnist, local.FASHION_MNIST_DIR)
  return builder, data_dir


def test_read_idx_round_trip(tmp_path):
  array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
  _write_idx(tmp_path / 'a.gz', array)
  np.testing.assert_array_equal(local.read_idx(str(tmp_path / 'a.gz')), array)


def test_read_idx_rejects_truncated_file(tmp_path):
  _write_idx(tmp_path / 'a.gz', np.zeros((4, 5)))
  data = gzip.open(tmp_path / 'a.gz').read()
  with gzip.open(tmp_path / 'b.gz', 'wb') as f:
    f.write(data[:-3])
  with pytest.raises(ValueError, match='truncated'):
    local.read_idx(str(tmp_path / 'b.gz'))


def test_prepared_dataset_is_tfds_own_fashion_mnist(prepared, small_fashion_source):
  builder, data_dir = prepared
  assert builder.is_prepared()
  assert type(builder).__name__ == 'FashionMNIST'
  assert builder.info.splits['train'].num_examples == 40
  assert builder.info.splits['test'].num_examples == 20
  # tfds.load, as any user would call it, reads it offline.
  test = list(tfds.load('fashion_mnist', split='test', data_dir=str(data_dir)).as_numpy_iterator())
  assert sorted(int(ex['label']) for ex in test) == sorted(np.arange(20) % 10)
  expected = local.read_idx(os.path.join(small_fashion_source, 't10k-images-idx3-ubyte.gz'))
  assert {ex['image'].tobytes() for ex in test} == {im[..., None].tobytes() for im in expected}


def _offline_download(self, *args, **kwargs):
  raise ConnectionError('Failed to resolve storage.googleapis.com\nmore lines')


def test_unprepared_dataset_fails_with_how_to_get_it(tmp_path, monkeypatch):
  with pytest.raises(errors.DataError, match='tfds build imagenet2012'):
    local.ensure_prepared('imagenet2012', str(tmp_path))
  with pytest.raises(errors.DataError, match='not a TFDS dataset'):
    local.ensure_prepared('imagenet21k', str(tmp_path))
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', _offline_download)
  local.LOCAL_SOURCES['fashion_mnist'] = (local.prepare_fashion_mnist, str(tmp_path / 'absent'))
  try:
    with pytest.raises(errors.DataError, match='apt-get install dataset-fashion-mnist'):
      local.ensure_prepared('fashion_mnist', str(tmp_path))
  finally:
    local.LOCAL_SOURCES['fashion_mnist'] = (local.prepare_fashion_mnist, local.FASHION_MNIST_DIR)


def test_fashion_mnist_without_the_debian_package_comes_from_tfds_download(tmp_path,
                                                                          monkeypatch):
  calls = []
  def download(builder, *args, **kwargs):
    calls.append((builder.name, builder.data_dir))
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', download)
  monkeypatch.setitem(local.LOCAL_SOURCES, 'fashion_mnist',
                      (local.prepare_fashion_mnist, str(tmp_path / 'absent')))
  builder = local.ensure_prepared('fashion_mnist', str(tmp_path))
  assert builder.name == 'fashion_mnist'
  assert [name for name, _ in calls] == ['fashion_mnist']
  assert calls[0][1].startswith(str(tmp_path))
  # Offline too: one line that names both sources and the download's reason.
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', _offline_download)
  with pytest.raises(errors.DataError) as error:
    local.ensure_prepared('fashion_mnist', str(tmp_path))
  message = str(error.value)
  assert '\n' not in message
  assert f'{tmp_path / "absent"} is absent (apt-get install dataset-fashion-mnist' in message
  assert "TFDS's download failed (ConnectionError: Failed to resolve" in message


INPUT = dict(image_size=28, channels=1, augment='none', shuffle_buffer=40, mean=0.5, std=0.5)


def _take(builder, steps, start_step=0, **input_overrides):
  batches = input_pipeline.train_batches(builder, 'train', INPUT | input_overrides, 8, seed=3,
                                         start_step=start_step)
  return [next(batches) for _ in range(steps)]


def test_train_batches_shapes_and_normalisation(prepared):
  batch = _take(prepared[0], 1)[0]
  assert batch['image'].shape == (8, 28, 28, 1) and batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0


def test_epochs_are_permutations_and_resume_is_exact(prepared):
  builder = prepared[0]
  batches = _take(builder, 10, augment='flip_crop')  # 80 examples: two epochs of 40
  labels = np.concatenate([b['label'] for b in batches])
  assert sorted(labels[:40]) == sorted(labels[40:]) == sorted(np.arange(40) % 10)
  assert not np.array_equal(labels[:40], labels[40:])  # reshuffled each epoch
  resumed = _take(builder, 3, start_step=7, augment='flip_crop')  # mid-epoch resume
  for a, b in zip(batches[7:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def _process_streams(builder, input_config, start_step):
  single = input_pipeline.train_batches(builder, 'train', input_config, 8, seed=3,
                                        start_step=start_step)
  parts = [input_pipeline.train_batches(builder, 'train', input_config, 8, seed=3,
                                        start_step=start_step, process_index=i, process_count=2)
           for i in (0, 1)]
  return single, parts


def test_two_processes_read_disjoint_shards_that_make_the_single_process_batches(prepared):
  builder = prepared[0]
  # Mid-epoch, with augmentation: one process reading both shards = two processes.
  single, parts = _process_streams(builder, INPUT | dict(num_shards=2, augment='flip'), 2)
  for _ in range(6):
    whole, halves = next(single), [next(p) for p in parts]
    assert all(h['label'].shape == (4,) for h in halves)
    for key in whole:
      np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
  # One epoch (5 steps x 4 examples of each 20-example shard): disjoint halves.
  _, parts = _process_streams(builder, INPUT | dict(num_shards=2), 0)
  rows = [{tuple(image.ravel()[:16]) for _ in range(5) for image in next(p)['image']}
          for p in parts]
  assert len(rows[0]) == len(rows[1]) == 20 and not rows[0] & rows[1]


@pytest.mark.parametrize('num_shards,processes,batch,message', [
    (3, 2, 12, 'not a multiple of the 2 processes'), (4, 1, 6, 'not divisible by')])
def test_bad_shard_counts_fail_clearly(num_shards, processes, batch, message):
  with pytest.raises(ValueError, match=message):
    input_pipeline.check_shards(dict(num_shards=num_shards), batch, processes)


def test_grayscale_to_rgb_and_resize(prepared):
  batch = _take(prepared[0], 1, image_size=32, channels=3, augment='inception_crop_flip')[0]
  assert batch['image'].shape == (8, 32, 32, 3)


def test_eval_batches_cover_the_split_once_with_padding(prepared):
  data, num_batches = input_pipeline.eval_dataset(prepared[0], 'test', INPUT, 8)
  batches = list(input_pipeline.padded_batches(data, num_batches, 8))
  assert num_batches == 3 and all(len(b['label']) == 8 for b in batches)
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.sum() == 20 and list(masks[20:]) == [0] * 4


@pytest.mark.parametrize('max_decoded_bytes,decodes', [(2 ** 30, 20), (0, 40)])
def test_eval_split_is_cached_decoded_only_when_small(prepared, monkeypatch, max_decoded_bytes,
                                                      decodes):
  """Small splits are kept decoded in host memory: two passes decode the 20 images
  once. Big ones (ImageNet's validation set would take 30 GB decoded) are kept
  encoded and decoded at every pass. The images are the same either way."""
  reference, _ = input_pipeline.eval_dataset(prepared[0], 'test', INPUT, 8)
  count = []
  eval_image = input_pipeline.eval_image

  def counted(encoded, input_config):
    tf.py_function(lambda: count.append(1) or 0, [], tf.int32)
    return eval_image(encoded, input_config)

  monkeypatch.setattr(input_pipeline, 'eval_image', counted)
  monkeypatch.setattr(input_pipeline, 'MAX_DECODED_CACHE_BYTES', max_decoded_bytes)
  data, _ = input_pipeline.eval_dataset(prepared[0], 'test', INPUT, 8)
  for _ in range(2):
    for a, b in zip(reference.as_numpy_iterator(), data.as_numpy_iterator(), strict=True):
      np.testing.assert_array_equal(a['image'], b['image'])
  assert len(count) == decodes


def test_first_images_take_any_split_spec(prepared):
  """Merge pictures read the first test images: a sliced test split (imagenet21k's
  'full[:51200]', 'train[99%:]') cannot be sliced again by appending '[:4]'."""
  data, _ = input_pipeline.eval_dataset(prepared[0], 'test', INPUT, 4)
  first = next(data.as_numpy_iterator())['image']
  np.testing.assert_array_equal(input_pipeline.first_images(prepared[0], 'test', INPUT, 4), first)
  np.testing.assert_array_equal(
      input_pipeline.first_images(prepared[0], 'test[:50%]', INPUT, 4), first)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(local.FASHION_MNIST_DIR),
                    reason='needs Debian package dataset-fashion-mnist (.ci/run installs it)')
def test_real_fashion_mnist_offline(tmp_path):
  builder = local.ensure_prepared('fashion_mnist', str(tmp_path))
  assert builder.info.splits['train'].num_examples == 60000
  assert builder.info.splits['test'].num_examples == 10000
  batch = next(input_pipeline.train_batches(builder, 'test', INPUT, 1000, seed=0))
  assert batch['image'].shape == (1000, 28, 28, 1)
  assert set(np.unique(batch['label'])) == set(range(10))


def test_check_data_says_fashion_mnist_will_be_downloaded_without_the_package(tmp_path,
                                                                             monkeypatch):
  from configs import fashion_mnist
  monkeypatch.setitem(local.LOCAL_SOURCES, 'fashion_mnist',
                      (local.prepare_fashion_mnist, str(tmp_path / 'absent')))
  config = fashion_mnist.get_config()
  config.data_dir = str(tmp_path / 'data')
  line = local.check_data(config)
  assert line.startswith(f'fashion_mnist: {tmp_path / "absent"} is absent, so TFDS downloads')
  assert 'apt-get install dataset-fashion-mnist' in line
  assert not (tmp_path / 'data').exists()  # Checking writes nothing.
