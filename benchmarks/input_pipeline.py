r"""Input speed on synthetic ImageNet-like JPEGs: the prepare tool and the training pipeline.

  python -m benchmarks.input_pipeline                       # 2,000 images, 1 and 2 threads
  python -m benchmarks.input_pipeline --images=200 --seconds=5 --json=/tmp/input.json

Makes --images JPEGs of 500 x 375 pixels and about 110 KB (a smooth random field
plus noise, quality 90; ImageNet's average is ~110 KB at ~400 x 350), in 10 class
folders; prepares them with patchmerger.data.prepare (one worker: images/s per
core), then reads them through `input_pipeline.train_batches` as the ImageNet
configs do (inception crop decoded from the JPEG, flip, 224px, shuffle buffer of
encoded bytes) and prints training images/s with tf.data limited to 1 and to 2
threads (--threads). It also times the floor under the pipeline: one core
decoding the same JPEGs whole (`decode_jpeg`) and decoding only an inception-crop
window (`decode_and_crop_jpeg`), nothing else. Nothing else should run on the
machine meanwhile.
"""
import io
import json
import os
import shutil
import tempfile
import time


import numpy as np
from absl import app, flags

_IMAGES = flags.DEFINE_integer('images', 2000, 'Synthetic JPEGs to make.')
_THREADS = flags.DEFINE_list('threads', ['1', '2'], 'tf.data thread counts to time.')
_SECONDS = flags.DEFINE_float('seconds', 20.0, 'Timed seconds per thread count.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Batch size of the training pipeline.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Model input size.')
_PREPARE_WORKERS = flags.DEFINE_list('prepare_workers', ['1'], 'Worker counts to time prepare.')
_JSON = flags.DEFINE_string('json', None, 'Also write the results here.')
_KEEP = flags.DEFINE_string('dir', None, 'Work here (default: a temporary directory).')


def make_jpegs(root: str, count: int, seed: int = 0) -> int:
  """`count` ~110 KB 500x375 JPEGs in root/train/class_K/; returns their total bytes."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  total = 0
  for index in range(count):
    folder = os.path.join(root, 'train', f'class_{index % 10}')
    os.makedirs(folder, exist_ok=True)
    low = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((500, 375), Image.BICUBIC), np.int16)
    pixels = np.clip(smooth + rng.normal(0, 22, smooth.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format='JPEG', quality=90)
    with open(os.path.join(folder, f'{index:06d}.jpg'), 'wb') as f:
      f.write(out.getvalue())
    total += out.tell()
  return total


def time_pipeline(builder, threads: int, seconds: float) -> dict:
  from patchmerger.data import input_pipeline
  config = dict(image_size=_IMAGE_SIZE.value, channels=3, augment='inception_crop_flip',
                shuffle_buffer=min(1000, _IMAGES.value), mean=0.5, std=0.5,
                data_threads=threads)
  batches = input_pipeline.train_batches(builder, 'train', config, _BATCH.value, seed=0)
  for _ in range(3):  # Warm-up: graph building, the first cache fill.
    next(batches)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    count += len(next(batches)['label'])
  elapsed = time.perf_counter() - start
  return dict(threads=threads, images=count, seconds=elapsed, images_per_sec=count / elapsed)


def time_decode(source: str, seconds: float) -> dict:
  """Images/s of one tf.data thread decoding the JPEGs under `source`: whole, and
  only an inception-crop window, with no resize, batching or shuffle."""
  import tensorflow as tf
  from patchmerger.data import input_pipeline
  files = sorted(os.path.join(d, f) for d, _, names in os.walk(source) for f in names)
  encoded = tf.constant([open(path, 'rb').read() for path in files])
  decoders = {
      'whole': lambda index, jpeg: tf.io.decode_jpeg(jpeg, channels=3),
      'crop_window': lambda index, jpeg: input_pipeline.inception_crop(
          jpeg, tf.stack([tf.constant(0, tf.int64), index]), 3)}
  rates = {}
  for name, decode in decoders.items():
    # Reduce every image to one number so that variable shapes need no batching.
    data = tf.data.Dataset.from_tensor_slices(encoded).repeat().enumerate().map(
        lambda index, jpeg: tf.reduce_sum(tf.cast(decode(index, jpeg)[0, 0], tf.int32)))
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    iterator = iter(data.with_options(options).batch(16))
    next(iterator)  # Warm-up.
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      count += len(next(iterator))
    rates[name] = count / (time.perf_counter() - start)
  return rates


def main(argv):
  del argv
  from patchmerger.data import prepare
  import tensorflow as tf
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], 'GPU')
  work = _KEEP.value or tempfile.mkdtemp(prefix='input_benchmark_')
  source = os.path.join(work, 'images')
  try:
    start = time.perf_counter()
    source_bytes = make_jpegs(source, _IMAGES.value)
    print(f'Made {_IMAGES.value} JPEGs, {source_bytes / _IMAGES.value / 1000:.0f} KB each on '
          f'average, in {time.perf_counter() - start:.1f} s.', flush=True)
    results = dict(images=_IMAGES.value, mean_jpeg_kb=source_bytes / _IMAGES.value / 1000,
                   cpu_count=os.cpu_count(), prepare=[], pipeline=[])
    builder = None
    for workers in map(int, _PREPARE_WORKERS.value):
      data_dir = os.path.join(work, f'tfds_{workers}')
      report = prepare.prepare(f'folder:{source}', data_dir, workers=workers)
      written = sum(report.examples.values())
      size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(data_dir)
                 for f in files)
      row = dict(workers=workers, seconds=report.seconds, images_per_sec=written / report.seconds,
                 dataset_bytes=size)
      results['prepare'].append(row)
      print(f'prepare, {workers} worker(s): {row["images_per_sec"]:.0f} images/s '
            f'({written} images in {report.seconds:.1f} s), dataset {size / 2 ** 20:.1f} MiB',
            flush=True)
      builder = builder or tfds.builder(prepare.folder_dataset_name(source), data_dir=data_dir)
    for threads in map(int, _THREADS.value):
      row = time_pipeline(builder, threads, _SECONDS.value)
      results['pipeline'].append(row)
      print(f'training pipeline, {threads} thread(s): {row["images_per_sec"]:.0f} images/s '
            f'({row["images"]} images in {row["seconds"]:.1f} s)', flush=True)
    results['decode_one_thread'] = time_decode(source, _SECONDS.value / 2)
    print('decode floor, 1 thread: whole JPEG {whole:.0f} images/s, inception-crop window '
          '{crop_window:.0f} images/s'.format(**results['decode_one_thread']), flush=True)
    if _JSON.value:
      with open(_JSON.value, 'w') as f:
        json.dump(results, f, indent=2)
  finally:
    if not _KEEP.value:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
