r"""Writes the classes of an image dataset (`image_sources`) as a TFDS dataset.

`prepare_data.py` is its command line. Afterwards `tfds.builder(NAME, data_dir=D)`
reads it (TFRecord shards, TFDS metadata). Two stages, both over all cores:
  1. chunks of classes are streamed (a tar member at a time), each image checked
     (corrupt: skipped; CMYK, PNG or other formats under JPEG: re-encoded as
     JPEG), serialised, and spilled to the chunk's file grouped by output shard
     (a hash of split/class/file picks the shard);
  2. each shard gathers its records from every chunk, orders them by that hash
     (a global shuffle that is independent of workers and chunking) and is
     written to a temporary name, then renamed.
A rerun after a kill skips the chunks and shards already finished, so the
result equals an uninterrupted run. Memory is bounded by a shard and a spill
buffer, not by the number of images.
"""
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import struct
import time
from typing import Iterator, Optional, Sequence

import numpy as np

# folder_dataset_name and list_sources are also this module's API: the name a folder
# is prepared under, and what a preparation would read.
from patchmerger.data.image_sources import (ClassSource, clean_image, folder_dataset_name,
                                            iter_images, list_sources, read_class_list)
from patchmerger.errors import DataError

SHARD_BYTES = 256 * 2 ** 20          # Target size of an output shard (auto --num_shards).
CHUNK_BYTES = 8 * 2 ** 30            # Source bytes per stage-1 task.
SPILL_BUFFER_BYTES = 128 * 2 ** 20   # Per-worker spill buffer before it is written.
VERSION = '1.0.0'
_FRAME = struct.Struct('>QI')        # Spill record header: sort hash, record length.


def features(labels: Sequence[str]):
  import tensorflow_datasets as tfds
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
      'label': tfds.features.ClassLabel(names=list(labels)),
      'file_name': tfds.features.Text()})


def sort_hash(split: str, key: str) -> int:
  return int.from_bytes(hashlib.blake2b(f'{split}/{key}'.encode(), digest_size=8).digest(), 'big')


# Stage 1: a chunk of classes -> one spill file with records grouped by shard.

def write_chunk(work_dir: str, split: str, chunk_id: int, sources: Sequence[ClassSource],
                labels: Sequence[str], num_shards: int, keep_png: bool) -> None:
  label_ids = {name: i for i, name in enumerate(labels)}
  serializer = features(labels)
  stem = os.path.join(work_dir, split, f'chunk-{chunk_id:05d}')
  index, stats, skipped = [], collections.Counter(), []  # index: (shard, offset, length)
  buffers, buffered = collections.defaultdict(list), 0
  with open(stem + '.spill', 'wb') as spill:

    def flush():
      for shard in sorted(buffers):
        data = b''.join(buffers[shard])
        index.append((shard, spill.tell(), len(data)))
        spill.write(data)
      buffers.clear()

    for source in sources:
      for name, data in iter_images(source):
        key = f'{source.label}/{name}'
        image, outcome = clean_image(data, keep_png)
        stats[outcome] += 1
        if image is None:
          skipped.append(key)
          continue
        record = serializer.serialize_example(
            {'image': image, 'label': label_ids[source.label], 'file_name': key})
        digest = sort_hash(split, key)
        buffers[digest % num_shards].append(_FRAME.pack(digest, len(record)) + record)
        buffered += len(record)
        if buffered > SPILL_BUFFER_BYTES:
          flush()
          buffered = 0
    flush()
  # Sorted by shard, so that each shard finds its pieces with a binary search.
  rows = np.array(sorted(index), np.int64).reshape(-1, 3)
  with open(stem + '.index.npy', 'wb') as f:
    np.save(f, rows)
  _write_json(stem + '.json', dict(stats=stats, skipped=skipped))  # Marks the chunk done.


def _write_json(path: str, value) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f)
  os.replace(path + '.tmp', path)


# Stage 2: one output shard from every chunk's records for it.

def write_shard(work_dir: str, out_dir: str, name: str, split: str, shard: int,
                num_shards: int, num_chunks: int) -> None:
  import tensorflow as tf
  records = []
  for chunk_id in range(num_chunks):
    stem = os.path.join(work_dir, split, f'chunk-{chunk_id:05d}')
    index = np.load(stem + '.index.npy', mmap_mode='r')
    first, end = np.searchsorted(index[:, 0], [shard, shard + 1])
    with open(stem + '.spill', 'rb') as spill:
      for offset, length in index[first:end, 1:].tolist():
        spill.seek(offset)
        data, position = spill.read(length), 0
        while position < length:
          digest, size = _FRAME.unpack_from(data, position)
          position += _FRAME.size
          records.append((digest, data[position:position + size]))
          position += size
  records.sort()
  path = os.path.join(out_dir, shard_file_name(name, split, shard, num_shards))
  with tf.io.TFRecordWriter(path + '.tmp') as writer:
    for _, record in records:
      writer.write(record)
  _write_json(os.path.join(work_dir, split, f'shard-{shard:05d}.json'),
              dict(num_examples=len(records), num_bytes=sum(len(r) for _, r in records)))
  os.replace(path + '.tmp', path)  # The finished shard appears whole, or not at all.


def shard_file_name(name: str, split: str, shard: int, num_shards: int) -> str:
  return f'{name}-{split}.tfrecord-{shard:05d}-of-{num_shards:05d}'


# The plan, fixed at the first run so that reruns continue the same work.

def make_plan(name: str, sources: Sequence[ClassSource], labels: Sequence[str],
              num_shards: int, workers: int) -> dict:
  """Chunks of whole classes (at least 4 per worker, at most CHUNK_BYTES each) and
  the shard count of every split. The chunking does not change the result."""
  splits = {}
  for split in sorted({s.split for s in sources}):
    members = [s for s in sources if s.split == split]
    total = sum(s.size for s in members)
    chunk_bytes = max(1, min(CHUNK_BYTES, total // (4 * workers)))
    chunks, current, current_bytes = [], [], 0
    for source in members:
      current.append(dataclasses.asdict(source))
      current_bytes += source.size
      if current_bytes >= chunk_bytes:
        chunks.append(current)
        current, current_bytes = [], 0
    if current:
      chunks.append(current)
    shards = num_shards or max(1, -(-total // SHARD_BYTES))
    splits[split] = dict(num_shards=shards, chunks=chunks)
  return dict(name=name, version=VERSION, labels=list(labels), splits=splits)


@dataclasses.dataclass
class Report:
  counts: collections.Counter
  skipped: list
  examples: dict
  seconds: float

  def lines(self) -> list[str]:
    total = sum(self.counts.values())
    per_split = ', '.join(f'{s}: {n:,}' for s, n in sorted(self.examples.items()))
    lines = [f'{sum(self.examples.values()):,} examples written ({per_split}) '
             f'from {total:,} files in {self.seconds:.1f} s.']
    for outcome in sorted(k for k in self.counts if k != 'ok'):
      lines.append(f'  {outcome}: {self.counts[outcome]:,}')
    if self.skipped:
      lines.append(f'  skipped files: {", ".join(self.skipped[:20])}'
                   + (' ...' if len(self.skipped) > 20 else ''))
    return lines


def prepare(dataset: str, data_dir: str, source: Optional[str] = None,
            class_list: Optional[str] = None, workers: int = 0, num_shards: int = 0,
            shard_done=None) -> Report:
  """Prepares `dataset` in `data_dir`; resumes an unfinished run. `shard_done`
  (tests) is called after each shard finishes."""
  start = time.perf_counter()
  name, sources = list_sources(dataset, source)
  out_dir = os.path.join(data_dir, name, VERSION)
  work_dir = os.path.join(data_dir, name, '_prepare')
  plan_path = os.path.join(work_dir, 'plan.json')
  if os.path.exists(plan_path):
    with open(plan_path) as f:
      plan = json.load(f)
    wanted = {s: p['num_shards'] for s, p in plan['splits'].items()}
    if num_shards and set(wanted.values()) != {num_shards}:
      raise DataError(f'{work_dir} holds a preparation with {wanted} shards; rerun '
                      f'without --num_shards, or delete it to start over.')
  else:
    present = sorted({s.label for s in sources})
    labels = read_class_list(class_list) if class_list else present
    unknown = sorted(set(present) - set(labels))
    if unknown:
      raise DataError(f'{len(unknown)} classes of the source are not in {class_list}: '
                      f'{", ".join(unknown[:5])}')
    plan = make_plan(name, sources, labels, num_shards, workers or os.cpu_count() or 1)
    for split in plan['splits']:
      os.makedirs(os.path.join(work_dir, split), exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    _write_json(plan_path, plan)
  keep_png = dataset.startswith('folder:')
  workers = workers or os.cpu_count() or 1
  chunks = [(write_chunk, (work_dir, split, chunk_id, [ClassSource(**c) for c in chunk],
                           plan['labels'], split_plan['num_shards'], keep_png))
            for split, split_plan in plan['splits'].items()
            for chunk_id, chunk in enumerate(split_plan['chunks'])
            if not os.path.exists(os.path.join(work_dir, split, f'chunk-{chunk_id:05d}.json'))]
  for _ in _run_all(workers, chunks):
    pass
  shards = [((split, shard), (write_shard, (work_dir, out_dir, name, split, shard, count,
                                            len(split_plan['chunks']))))
            for split, split_plan in plan['splits'].items()
            for count in [split_plan['num_shards']] for shard in range(count)
            if not os.path.exists(os.path.join(out_dir, shard_file_name(name, split, shard,
                                                                        count)))]
  for (split, shard), _ in zip([k for k, _ in shards], _run_all(workers, [c for _, c in shards])):
    if shard_done:
      shard_done(split, shard)
  report = _finish(plan, name, out_dir, work_dir)
  report.seconds = time.perf_counter() - start
  return report


def _run_all(workers: int, calls: Sequence[tuple]) -> Iterator:
  """Results of `fn(*args)` for each call, in order; one worker runs them here."""
  if workers == 1 or len(calls) <= 1:
    for fn, args in calls:
      yield fn(*args)
    return
  context = multiprocessing.get_context('spawn')  # TF in the workers: never fork it.
  with concurrent.futures.ProcessPoolExecutor(min(workers, len(calls)), context) as pool:
    futures = [pool.submit(fn, *args) for fn, args in calls]
    for future in futures:
      yield future.result()


def _finish(plan: dict, name: str, out_dir: str, work_dir: str) -> Report:
  """TFDS metadata over the finished shards; the report; spill files removed."""
  import tensorflow_datasets as tfds
  counts, skipped, examples, split_infos = collections.Counter(), [], {}, []
  template = tfds.core.ShardedFileTemplate(
      data_dir=out_dir, dataset_name=name, template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
      filetype_suffix='tfrecord')
  for split, split_plan in plan['splits'].items():
    for chunk_id in range(len(split_plan['chunks'])):
      with open(os.path.join(work_dir, split, f'chunk-{chunk_id:05d}.json')) as f:
        chunk = json.load(f)
      counts.update(chunk['stats'])
      skipped.extend(f'{split}/{key}' for key in chunk['skipped'])
    shards = []
    for shard in range(split_plan['num_shards']):
      with open(os.path.join(work_dir, split, f'shard-{shard:05d}.json')) as f:
        shards.append(json.load(f))
    examples[split] = sum(s['num_examples'] for s in shards)
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[s['num_examples'] for s in shards],
        num_bytes=sum(s['num_bytes'] for s in shards), filename_template=template))
  tfds.folder_dataset.write_metadata(
      data_dir=out_dir, features=features(plan['labels']), split_infos=split_infos,
      version=VERSION, filename_template=template, check_data=False,
      description=f'{name}, written by patchmerger.data.prepare.')
  report = Report(counts, skipped, examples, 0.0)
  _write_json(os.path.join(work_dir, 'report.json'),
              dict(counts=counts, skipped=skipped, examples=examples))
  for split in plan['splits']:  # The spill files are as large as the dataset.
    for entry in os.scandir(os.path.join(work_dir, split)):
      if entry.name.endswith(('.spill', '.index.npy')):
        os.remove(entry.path)
  return report

