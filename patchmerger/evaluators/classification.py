"""Test loss, accuracy and accuracy per class over a whole split."""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from patchmerger.data import input_pipeline
from patchmerger.evaluators import common
from patchmerger.training import sharding


def evaluate(eval_fn: Any, params: Any, eval_data: tuple, data_sharding: Any,
             batch_size: int, prefix: str = 'test') -> dict:
  """Loss, accuracy and per-class accuracy (a list) over the whole split; padding is
  masked out. With experts, their metrics (e.g. `PREFIX/moe/encoderblock_N/
  dropped_fraction`) averaged over the batches."""
  data, num_batches = eval_data
  totals, batches = None, 0
  for local in input_pipeline.padded_batches(data, num_batches, batch_size):
    sums = eval_fn(params, sharding.global_batch(local, data_sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    batches += 1
  totals = jax.device_get(totals)
  counts = np.maximum(totals['class_count'], 1)
  moe = {f'{prefix}/{name}': float(value / batches) for name, value in totals['moe'].items()}
  return moe | {f'{prefix}/loss': float(totals['loss_sum'] / totals['count']),
          f'{prefix}/accuracy': float(totals['correct'] / totals['count']),
          f'{prefix}/examples': int(totals['count']),
          f'{prefix}/class_accuracy': [float(a) for a in totals['class_correct'] / counts]}


class Evaluator(common.Evaluator):
  """Spec: `every`, `split` (default: config.test_split)."""

  @property
  def split(self) -> str:
    return self.spec.get('split') or self.context.config.test_split

  def run(self, params: Any) -> dict:
    context = self.context
    return evaluate(context.eval_fn, params, context.eval_data(self.split),
                    context.data_sharding, context.batch_size, prefix=self.name)
