"""Inference speed: images per second through the eval step on test batches."""
import time
from typing import Any

import jax

from patchmerger.data import input_pipeline
from patchmerger.evaluators import common
from patchmerger.training import sharding


class Evaluator(common.Evaluator):
  """{'PREFIX/images_per_sec'} over the first `batches` batches of the test split,
  compilation and the first batch left out. Spec: `every`, `batches`, `prefix`
  (default: the evaluator's name)."""

  def run(self, params: Any) -> dict:
    context = self.context
    data, num_batches = context.eval_data()
    # Every process runs the same number of batches: the step is a collective.
    num_batches = min(num_batches, int(self.spec.get('batches', 10)) + 1)
    start, examples, sums = None, 0, None
    for local in input_pipeline.padded_batches(data, num_batches, context.batch_size):
      sums = context.eval_fn(params, sharding.global_batch(local, context.data_sharding))
      if start is None:  # The first call may compile: leave it out of the speed.
        jax.block_until_ready(sums)
        start = time.perf_counter()
      else:
        examples += context.batch_size * jax.process_count()
    rate = float('nan')
    if examples:  # A split of one batch times nothing.
      jax.block_until_ready(sums)
      rate = examples / (time.perf_counter() - start)
    prefix = self.spec.get('prefix') or self.name
    return {f'{prefix}/images_per_sec': rate}
