"""What every evaluator shares: the context it runs in and the interface it offers."""
import abc
import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import tensorflow_datasets as tfds

from patchmerger.data import input_pipeline
from patchmerger.training import sharding, step


@dataclasses.dataclass
class Context:
  """The run an evaluator belongs to: its config, model, mesh, data and workdir; it
  caches what several evaluators share (datasets, the compiled eval step)."""
  config: Any
  model: Any
  mesh: Any
  params_sharding: Any
  builder: tfds.core.DatasetBuilder
  workdir: str
  _datasets: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  @property
  def batch_size(self) -> int:
    """Examples per batch on this process."""
    return self.config.batch_size // jax.process_count()

  @property
  def data_sharding(self) -> Any:
    return sharding.batch_sharding(self.mesh)

  def eval_data(self, split: Optional[str] = None) -> tuple[Any, int]:
    """(batched dataset, batches per process) of `split` (default: the config's test
    split), built once: its examples stay cached in host memory between evaluations."""
    split = split or self.config.test_split
    if split not in self._datasets:
      self._datasets[split] = input_pipeline.eval_dataset(
          self.builder, split, self.config.input, self.batch_size)
    return self._datasets[split]

  @functools.cached_property
  def eval_fn(self) -> Any:
    """The jitted eval step (per-batch sums), compiled once for every evaluator."""
    return jax.jit(sharding.under_mesh(functools.partial(
                       step.eval_step, apply_fn=self.model.apply, loss=self.config.loss),
                       self.data_sharding.mesh),
                   in_shardings=(self.params_sharding, self.data_sharding))


class Evaluator(abc.ABC):
  """One evaluation of the parameters. `every` > 0: every that many training steps
  and at the last one; 0: only in eval.py. Subclasses implement `run`."""

  def __init__(self, name: str, spec: Mapping[str, Any], context: Context):
    self.name, self.spec, self.context = name, spec, context
    self.every = int(spec.get('every', 0))

  def due(self, step_index: int, last: bool) -> bool:
    return self.every > 0 and (step_index % self.every == 0 or last)

  @abc.abstractmethod
  def run(self, params: Any) -> dict:
    """{metric name: value}; names start with the evaluator's name (throughput's with
    its `prefix`, so that its figure sits beside the test metrics)."""
