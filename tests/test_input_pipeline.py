"""The input pipeline at ImageNet scale: crops from the original image, aspect-
preserving evaluation, encoded images in the shuffle buffer."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from patchmerger.data import input_pipeline
from tests.image_files import encode, random_image

INPUT = dict(image_size=32, channels=3, augment='inception_crop_flip', shuffle_buffer=8,
             mean=0.0, std=1.0)  # identity normalisation: model input = pixels / 255


def _store(tmp_path, name, images, fmt):
  """A TFDS dataset `name` (split train) of equal-shape uint8 images, stored in `fmt`."""
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format=fmt),
      'label': tfds.features.ClassLabel(num_classes=2)})
  data = tf.data.Dataset.from_tensor_slices(
      {'image': np.stack(images), 'label': np.arange(len(images)) % 2})
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version='1.0.0', features=features, split_datasets={'train': data},
      data_dir=str(tmp_path))
  return tfds.builder(name, data_dir=str(tmp_path))


def _stripes(height, width):
  """Black and white columns one pixel wide: detail that only full resolution has."""
  row = np.where(np.arange(width) % 2, 255, 0).astype(np.uint8)
  return np.repeat(np.broadcast_to(row[None, :, None], (height, width, 1)), 3, axis=2).copy()


@pytest.mark.parametrize('fmt', ['png', 'jpeg'])
def test_inception_crop_keeps_the_detail_of_the_original_image(tmp_path, fmt):
  image = _stripes(256, 256)
  # Resizing first, as the pipeline once did, leaves nothing of the stripes: flat grey.
  resized_first = tf.image.resize(image, (32, 32)).numpy()
  assert resized_first.std() < 1.0
  builder = _store(tmp_path, f'stripes_{fmt}', [image] * 8, fmt)
  batches = input_pipeline.train_batches(builder, 'train', INPUT, 8, seed=0)
  crops = np.concatenate([next(batches)['image'] for _ in range(2)]) * 255
  # Crops of 5-100% of the original, resized to 32: stripes (aliased) survive.
  stds = crops.reshape(len(crops), -1).std(axis=1)
  assert np.median(stds) > 40, stds


def _find(haystack, needle):
  """(top, left) where `needle` is a sub-array of `haystack`, or None."""
  height, width = needle.shape[:2]
  for top in range(haystack.shape[0] - height + 1):
    for left in range(haystack.shape[1] - width + 1):
      if np.array_equal(haystack[top:top + height, left:left + width], needle):
        return top, left
  return None


def test_inception_crop_is_a_window_of_the_original_pixels_for_png_and_jpeg():
  image = random_image(np.random.default_rng(0), 60, 80)
  png = encode(image, 'PNG')
  jpeg = encode(image, 'JPEG', quality=95)
  decoded_jpeg = tf.io.decode_jpeg(jpeg, channels=3).numpy()
  sizes = set()
  for index in range(6):
    seed = tf.constant([7, index], tf.int64)
    crop = input_pipeline.inception_crop(tf.constant(png), seed, 3).numpy()
    where = _find(image, crop)  # Exact pixels of the original, never resampled.
    assert where is not None
    sizes.add(crop.shape[:2])
    # The JPEG path decodes only that window (same shape, same seed, same window).
    jpeg_crop = input_pipeline.inception_crop(tf.constant(jpeg), seed, 3).numpy()
    assert jpeg_crop.shape == crop.shape
    top, left = where
    window = decoded_jpeg[top:top + crop.shape[0], left:left + crop.shape[1]].astype(int)
    assert np.abs(jpeg_crop.astype(int) - window).mean() < 2.0
  assert len(sizes) > 1  # Random windows.


def test_evaluation_keeps_the_aspect_ratio_and_crops_the_centre():
  # 64 high x 32 wide: top quarter red, middle half green, bottom quarter blue.
  image = np.zeros((64, 32, 3), np.uint8)
  image[:16, :, 0] = image[16:48, :, 1] = image[48:, :, 2] = 255
  config = dict(INPUT, image_size=16)
  out = input_pipeline.eval_image(tf.constant(encode(image, 'PNG')), config).numpy()
  assert out.shape == (16, 16, 3)
  np.testing.assert_allclose(out[..., 1], 1.0)  # Only the green middle: no squashing.
  np.testing.assert_allclose(out[..., [0, 2]], 0.0)
  # A crop ratio < 1 takes the central part of the short-side-resized image.
  square = np.zeros((64, 64, 3), np.uint8)
  square[16:48, 16:48] = 255  # A white centre half the side.
  centre = input_pipeline.eval_image(tf.constant(encode(square, 'PNG')),
                                     dict(config, eval_crop_ratio=0.5)).numpy()
  whole = input_pipeline.eval_image(tf.constant(encode(square, 'PNG')), config).numpy()
  np.testing.assert_allclose(centre, 1.0)
  assert whole.min() == 0.0 and whole.max() == 1.0


def _rss_bytes():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * 4096


def test_the_shuffle_buffer_holds_encoded_images(tmp_path):
  """48 images of 1500 x 1500: 324 MB decoded, ~1.5 MB as JPEGs. Filling the
  shuffle buffer (and the cache) with them must not cost their decoded size."""
  rng = np.random.default_rng(0)
  base = np.kron(random_image(rng, 15, 15), np.ones((100, 100, 1), np.uint8))  # Compressible.
  builder = _store(tmp_path, 'large', [np.roll(base, i, axis=1) for i in range(48)], 'jpeg')
  assert input_pipeline.encoded_examples(builder, 'train').element_spec['image'].dtype == tf.string
  decoded_bytes = 48 * 1500 * 1500 * 3
  before = _rss_bytes()
  batches = input_pipeline.train_batches(
      builder, 'train', dict(INPUT, augment='none', shuffle_buffer=48, data_threads=1), 2, 0)
  for _ in range(3):  # The first batch fills the 48-image buffer.
    next(batches)
  growth = _rss_bytes() - before
  assert growth < decoded_bytes / 3, f'{growth / 2 ** 20:.0f} MiB'


def test_resume_is_exact_with_the_inception_crop_on_encoded_images(tmp_path):
  rng = np.random.default_rng(1)
  builder = _store(tmp_path, 'photos', [random_image(rng, 40, 56) for _ in range(12)], 'jpeg')
  config = dict(INPUT, shuffle_buffer=12)
  run = input_pipeline.train_batches(builder, 'train', config, 4, seed=5)
  batches = [next(run) for _ in range(7)]  # 28 examples: into the third epoch
  resumed = input_pipeline.train_batches(builder, 'train', config, 4, seed=5, start_step=4)
  for expected in batches[4:]:
    got = next(resumed)
    np.testing.assert_array_equal(got['image'], expected['image'])
    np.testing.assert_array_equal(got['label'], expected['label'])
