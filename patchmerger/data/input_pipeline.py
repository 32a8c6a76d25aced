"""TFDS -> tf.data -> per-process numpy batches.

Training data is a pure function of (seed, step): each epoch is shuffled with
its own seed, augmentation uses stateless ops keyed by the example's position
in the stream, so resuming at step k reproduces the uninterrupted stream.

Images stay encoded (TFDS `SkipDecoding`) through the cache, the shuffle buffer
and the resume `skip`: a 250,000-image buffer holds ~110 KB JPEGs, not decoded
full-size images, and skipped images are never decoded. Decoding comes last;
the inception crop is decoded straight from the JPEG at its original
resolution (`decode_and_crop_jpeg`), then resized.
"""
import logging
from typing import Any, Iterator, Mapping, Optional

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from patchmerger.errors import ConfigError, DataError

AUGMENTATIONS = ('none', 'flip', 'flip_crop', 'inception_crop_flip')


def hide_gpus_from_tensorflow() -> None:
  """tf.data runs on the host: a GPU build of TensorFlow must not take accelerator
  memory from JAX. Call it before TensorFlow makes any tensor (the training loop, the
  evaluation and eval.py do, first); later, TensorFlow refuses, and that is only worth
  a warning."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError as e:
    if tf.config.get_visible_devices('GPU'):
      logging.warning('TensorFlow sees a GPU and can no longer be kept off it (%s); '
                      'tf.data may take accelerator memory.', e)


def _decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
  """JPEG/PNG/GIF/BMP bytes -> uint8 [H, W, channels] (gray <-> RGB converted)."""
  image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
  image.set_shape([None, None, channels])
  return image


def _to_model_input(image: tf.Tensor, input_config: Mapping[str, Any]) -> tf.Tensor:
  """The whole image resized to image_size x image_size, normalised."""
  size = input_config['image_size']
  image = tf.image.convert_image_dtype(image, tf.float32)  # uint8 -> [0, 1]
  image = tf.image.resize(image, (size, size))
  return (image - input_config['mean']) / input_config['std']


def inception_crop(encoded: tf.Tensor, seed: tf.Tensor, channels: int) -> tf.Tensor:
  """A random crop of 5-100% of the area, aspect 3/4-4/3, at the original resolution.

  JPEGs decode only the crop window; other formats decode whole, then crop. Both
  paths sample the same window for the same image shape and `seed`.
  """
  def window(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), seed, area_range=(0.05, 1.0),
        min_object_covered=0.0, use_image_if_no_bounding_boxes=True)
    return begin, size

  def from_jpeg():
    begin, size = window(tf.image.extract_jpeg_shape(encoded))
    crop_window = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.image.decode_and_crop_jpeg(encoded, crop_window, channels=channels)

  def from_other():
    image = _decode(encoded, channels)
    begin, size = window(tf.shape(image))
    return tf.slice(image, tf.stack([begin[0], begin[1], 0]), tf.stack([size[0], size[1], -1]))

  crop = tf.cond(tf.io.is_jpeg(encoded), from_jpeg, from_other)
  crop.set_shape([None, None, channels])
  return crop


def central_crop(image: tf.Tensor, size: int, crop_ratio: float) -> tf.Tensor:
  """Short side resized to size / crop_ratio, then the central size x size square
  (the aspect ratio is kept). Float in, float out."""
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = size / crop_ratio / tf.minimum(height, width)
  new_height = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), size)
  new_width = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), size)
  image = tf.image.resize(image, tf.stack([new_height, new_width]))
  top, left = (new_height - size) // 2, (new_width - size) // 2
  image = tf.slice(image, tf.stack([top, left, 0]), tf.stack([size, size, -1]))
  image.set_shape([size, size, None])
  return image


def _augment(image: tf.Tensor, seed: tf.Tensor, kind: str, size: int) -> tf.Tensor:
  """Random crop (per `kind`) and flip with stateless ops; `seed` is a [2] int tensor."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  if kind == 'flip_crop':  # Pad by 1/8 of the size, crop back (CIFAR-style).
    pad = max(1, size // 8)
    image = tf.image.resize_with_crop_or_pad(image, size + 2 * pad, size + 2 * pad)
    image = tf.image.stateless_random_crop(image, (size, size, image.shape[-1]), seeds[0])
  return tf.image.stateless_random_flip_left_right(image, seeds[1])


def train_image(encoded: tf.Tensor, seed: tf.Tensor,
                input_config: Mapping[str, Any]) -> tf.Tensor:
  """Encoded image -> augmented, normalised float32 [size, size, channels]."""
  kind, size, channels = (input_config['augment'], input_config['image_size'],
                          input_config['channels'])
  if kind == 'inception_crop_flip':  # Crop the original image, then resize the crop.
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.resize(inception_crop(encoded, crop_seed, channels), (size, size))
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return (image / 255.0 - input_config['mean']) / input_config['std']
  image = _to_model_input(_decode(encoded, channels), input_config)
  return image if kind == 'none' else _augment(image, seed, kind, size)


def eval_image(encoded: tf.Tensor, input_config: Mapping[str, Any]) -> tf.Tensor:
  """Encoded image -> short side resized, central crop (`input.eval_crop_ratio`,
  default 1: the largest central square), normalised float32."""
  size, channels = input_config['image_size'], input_config['channels']
  image = tf.image.convert_image_dtype(_decode(encoded, channels), tf.float32)
  image = central_crop(image, size, input_config.get('eval_crop_ratio', 1.0))
  return (image - input_config['mean']) / input_config['std']


def encoded_examples(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
  """{'image': encoded bytes (tf.string), 'label'} of `split`, in file order."""
  feature = builder.info.features['image']
  if not isinstance(feature, tfds.features.Image):
    raise DataError(f'Dataset {builder.name}: feature image is a {type(feature).__name__}, '
                    'not an encoded tfds.features.Image.')
  data = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
  return data.map(lambda ex: {'image': ex['image'], 'label': ex['label']})


def train_batches(builder: tfds.core.DatasetBuilder, split: str,
                  input_config: Mapping[str, Any], global_batch_size: int, seed: int,
                  start_step: int = 0, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Iterator[dict]:
  """Endless numpy batches of this process's part of the global batch, from `start_step`.

  The split is cut into `input.num_shards` shards (default: one per process), each
  with its own shuffled stream; a global batch is the concatenation of one batch
  of every shard, and each process reads only its own shards. The global stream
  therefore depends on (seed, num_shards), not on the number of processes: one
  process reading 2 shards yields exactly what 2 processes yield together.
  """
  kind = input_config['augment']
  if kind not in AUGMENTATIONS:
    raise ConfigError(f'input.augment must be one of {AUGMENTATIONS}, got {kind!r}')
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  num_shards = check_shards(input_config, global_batch_size, process_count)
  per_process = num_shards // process_count
  shards = range(process_index * per_process, (process_index + 1) * per_process)
  shard_splits = tfds.even_splits(split, num_shards) if num_shards > 1 else [split]
  streams = [_shard_stream(builder, shard_splits[shard], input_config,
                           global_batch_size // num_shards, seed, shard, start_step)
             for shard in shards]
  if len(streams) == 1:
    stream = streams[0]
  else:
    stream = tf.data.Dataset.zip(tuple(streams)).map(
        lambda *parts: {k: tf.concat([p[k] for p in parts], 0) for k in parts[0]})
  stream = stream.prefetch(2)
  threads = input_config.get('data_threads')
  if threads:  # On a small host, tf.data's threads would compete with the step.
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.autotune.enabled = False
    stream = stream.with_options(options)
  return stream.as_numpy_iterator()


def check_shards(input_config: Mapping[str, Any], global_batch_size: int,
                 process_count: int) -> int:
  """The number of data shards, checked against processes and batch size."""
  num_shards = input_config.get('num_shards') or process_count
  if num_shards % process_count:
    raise ConfigError(f'input.num_shards={num_shards} is not a multiple of the '
                      f'{process_count} processes.')
  if global_batch_size % num_shards:
    raise ConfigError(f'batch_size {global_batch_size} is not divisible by '
                      f'input.num_shards={num_shards}.')
  return num_shards


def _shard_stream(builder: tfds.core.DatasetBuilder, split: str,
                  input_config: Mapping[str, Any], batch_size: int, seed: int, shard: int,
                  start_step: int) -> tf.data.Dataset:
  """Batches of one shard: per-epoch shuffles, stateless augmentation, from `start_step`."""
  data = encoded_examples(builder, split)
  num_examples = int(data.cardinality())
  if num_examples <= 0:
    raise DataError(f'Split {split!r} of {builder.name} has no examples')
  if num_examples <= 200_000:  # Small datasets live in memory (encoded) after one read.
    data = data.cache()
  first_example = start_step * batch_size
  first_epoch, offset = divmod(first_example, num_examples)
  buffer = min(input_config['shuffle_buffer'], num_examples)
  shard_seed = seed + 7_919 * shard  # Shard 0 keeps the single-shard stream.

  def epoch(index):  # Each epoch has its own, fixed, shuffle order.
    return data.shuffle(buffer, seed=shard_seed * 1_000_003 + index,
                        reshuffle_each_iteration=False)

  stream = tf.data.Dataset.range(first_epoch, 2 ** 40).flat_map(epoch).skip(offset)
  stream = stream.enumerate(start=first_example)

  def preprocess(index, example):
    seed = tf.stack([tf.cast(shard_seed, tf.int64), index])
    return {'image': train_image(example['image'], seed, input_config),
            'label': tf.cast(example['label'], tf.int32)}

  stream = stream.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return stream.batch(batch_size, drop_remainder=True)


MAX_DECODED_CACHE_BYTES = 2 ** 30  # Per process.


def eval_dataset(builder: tfds.core.DatasetBuilder, split: str,
                 input_config: Mapping[str, Any], batch_size: int) -> tuple[tf.data.Dataset, int]:
  """This process's share of `split`, batched, and the number of batches that
  every process must run (the largest share decides, so that the sharded
  evaluation step runs in lockstep across hosts)."""
  data = encoded_examples(builder, tfds.split_for_jax_process(split))
  num_examples = int(data.cardinality())
  # Evaluated again and again during training: kept in host memory after one read,
  # decoded when that is small (Fashion-MNIST: 40 MB), else encoded (ImageNet's
  # validation set decoded at 224px would take 30 GB).
  size, channels = input_config['image_size'], input_config['channels']
  decoded_bytes = num_examples * size * size * channels * 4
  if num_examples <= 50_000 and decoded_bytes > MAX_DECODED_CACHE_BYTES:
    data = data.cache()
  data = data.map(lambda ex: {'image': eval_image(ex['image'], input_config),
                              'label': tf.cast(ex['label'], tf.int32)},
                  num_parallel_calls=tf.data.AUTOTUNE)
  if decoded_bytes <= MAX_DECODED_CACHE_BYTES:
    data = data.cache()
  local_batches = -(-num_examples // batch_size)
  return data.batch(batch_size).prefetch(tf.data.AUTOTUNE), _max_over_processes(local_batches)


def first_images(builder: tfds.core.DatasetBuilder, split: str,
                 input_config: Mapping[str, Any], count: int) -> np.ndarray:
  """The first `count` images of `split` as evaluated, read by this process alone
  (no collective: for pictures drawn on one host; any split spec, sliced or not)."""
  data = encoded_examples(builder, split).take(count)
  data = data.map(lambda ex: eval_image(ex['image'], input_config)).batch(count)
  return next(data.as_numpy_iterator())


def padded_batches(data: tf.data.Dataset, num_batches: int, batch_size: int) -> Iterator[dict]:
  """Exactly `num_batches` full-size batches with a 0/1 'mask' for padding."""
  template = None
  iterator = data.as_numpy_iterator()
  for _ in range(num_batches):
    batch = next(iterator, None)
    if batch is None:  # This process ran out: padding only.
      batch = {k: v[:0] for k, v in template.items()}
    template = batch
    n = len(batch['label'])
    pad = lambda v: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)])
    yield {'image': pad(batch['image']), 'label': pad(batch['label']),
           'mask': pad(np.ones((n,), np.float32))}


def _max_over_processes(value: int) -> int:
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # Only needed on several hosts.
  return int(np.max(multihost_utils.process_allgather(np.asarray(value))))
