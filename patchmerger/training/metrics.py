"""Metric writers: TensorBoard (clu) plus a machine-readable metrics.jsonl."""
import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per write: {"step": N, "name": value, ...}. Through
  tf.io.gfile, so that a workdir on object storage (gs://...) works too."""

  def __init__(self, path: str):
    self._file = tf.io.gfile.GFile(path, 'a')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {'step': int(step)} | {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def create_writer(workdir: str, is_main_process: bool) -> metric_writers.MetricWriter:
  """TensorBoard + console logging + metrics.jsonl on process 0; logging elsewhere."""
  if not is_main_process:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, 'metrics.jsonl')),
  ])


def read_metrics(workdir: str) -> list[dict]:
  """The records of DIR/metrics.jsonl, in order. A resumed run appends the steps
  after its checkpoint again (later records win); a line cut short by a hard
  kill is skipped."""
  records = []
  with tf.io.gfile.GFile(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def scalars(results: Mapping[str, Any]) -> dict[str, float]:
  """The numbers of `results` (lists, such as per-class accuracies, and paths left out)."""
  return {k: v for k, v in results.items()
          if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


def first_nonfinite(step_metrics: Sequence[dict], first_step: int,
                    names: Sequence[str]) -> Optional[tuple[int, str, float]]:
  """(step, metric, value) of the first non-finite value among `names`."""
  for offset, record in enumerate(jax.device_get(list(step_metrics))):
    for name in names:
      if not np.isfinite(record[name]):
        return first_step + offset, name, float(record[name])
  return None
