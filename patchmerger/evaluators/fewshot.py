"""Few-shot linear probes on frozen pre-logits, as in the ViT papers: k examples
per class, closed-form ridge regression to ±1 targets, accuracy on held-out data."""
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds

from patchmerger.data import input_pipeline
from patchmerger.evaluators import common
from patchmerger.training import sharding


def sample_shots(labels: np.ndarray, shots: int, num_classes: int, seed: int = 0) -> np.ndarray:
  """Indices of `shots` examples of every class (fewer where a class has fewer)."""
  rng = np.random.default_rng(seed)
  picks = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in range(num_classes)]
  return np.concatenate(picks)


def ridge_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                   test_y: np.ndarray, num_classes: int, l2: float = 1.0,
                   chunk: int = 1024) -> float:
  """Fits W = (X^T X + l2 I)^-1 X^T Y on standardised features (with a bias),
  Y = ±1 one-hot; returns the accuracy of argmax(X_test W). Memory grows with
  features x classes, never examples x classes (21,843 classes of ImageNet-21k:
  X^T Y from per-class sums, test scores in chunks of `chunk` examples)."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  def design(x):
    x = (x - mean) / std
    return np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1).astype(np.float64)
  x = design(train_x)
  class_sums = np.zeros((num_classes, x.shape[1]))
  np.add.at(class_sums, train_y, x)
  xty = 2 * class_sums.T - x.sum(0)[:, None]  # X^T (2 one_hot(y) - 1)
  regulariser = l2 * np.eye(x.shape[1])
  regulariser[-1, -1] = 0.  # Do not shrink the bias.
  weights = np.linalg.solve(x.T @ x + regulariser, xty)
  correct = sum(int(np.sum(np.argmax(design(test_x[i:i + chunk]) @ weights, axis=1)
                           == test_y[i:i + chunk])) for i in range(0, len(test_x), chunk))
  return correct / len(test_x)


def fewshot_accuracies(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                       num_classes: int, shots: Sequence[int] = (1, 5, 10, 25),
                       seed: int = 0, l2: float = 1.0,
                       prefix: str = 'fewshot') -> Mapping[str, float]:
  """{'PREFIX/Kshot': accuracy} for each K, probes fitted on K examples per class
  drawn from `train` (features, labels) and scored on all of `test`."""
  results = {}
  for k in shots:
    chosen = sample_shots(train[1], k, num_classes, seed)
    results[f'{prefix}/{k}shot'] = ridge_accuracy(train[0][chosen], train[1][chosen],
                                                  test[0], test[1], num_classes, l2)
  return results


def features_fn(model: Any, params_sharding: Any, data_sharding: Any) -> Callable:
  """Jitted batch -> (pre-logits, the features the head reads; labels; mask), all
  three sharded alike, so that gathering them across hosts keeps them paired
  whatever order the hosts' devices have in the mesh."""
  def features(params, batch):
    _, state = model.apply({'params': params}, batch['image'], mutable=['intermediates'])
    return state['intermediates']['features'][0], batch['label'], batch['mask']
  return jax.jit(sharding.under_mesh(features, data_sharding.mesh),
                 in_shardings=(params_sharding, data_sharding))


def _features(fn, params, builder, split: str, input_config, batch_size: int, data_sharding):
  data, num_batches = input_pipeline.eval_dataset(builder, split, input_config, batch_size)
  outputs, labels = [], []
  for local in input_pipeline.padded_batches(data, num_batches, batch_size):
    out, label, mask = sharding.to_host(fn(params, sharding.global_batch(local, data_sharding)))
    keep = np.asarray(mask).astype(bool)
    outputs.append(np.asarray(out)[keep])
    labels.append(np.asarray(label)[keep])
  return np.concatenate(outputs), np.concatenate(labels)


def _head(builder: tfds.core.DatasetBuilder, split: str, count: int) -> str:
  """The first `count` examples of `split` (all of it when it is smaller). A sliced
  split ('full[51200:]', 'train[:99%]') is narrowed to its first `count` examples;
  a sum of splits ('train+validation') is used whole."""
  if '[' not in split:
    try:
      available = builder.info.splits[split].num_examples
    except KeyError:  # Split sizes unknown (e.g. TFDS mock data): slice by count.
      return f'{split}[:{count}]'
    return split if count >= available else f'{split}[:{count}]'
  try:
    parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
  except (KeyError, ValueError, AssertionError):  # Split sizes unknown: used whole.
    return split
  if len(parts) != 1:
    return split
  name = parts[0].splitname
  start = parts[0].from_ or 0  # TFDS writes None for the split's own ends.
  stop = builder.info.splits[name].num_examples if parts[0].to is None else parts[0].to
  return split if stop - start <= count else f'{name}[{start}:{start + count}]'


class Evaluator(common.Evaluator):
  """{'NAME/Kshot': accuracy}: probes fitted on K train examples per class (from the
  first `pool_examples` of the train split), scored on the first `test_examples` test
  examples. Spec: `every`, `shots`, `pool_examples`, `test_examples`, `l2`."""

  @functools.cached_property
  def _features_fn(self) -> Any:  # Compiled at the first evaluation, kept for the next.
    return features_fn(self.context.model, self.context.params_sharding,
                       self.context.data_sharding)

  def run(self, params: Any) -> dict:
    context, spec = self.context, self.spec
    config = context.config
    get = functools.partial(_features, self._features_fn, params, context.builder,
                            input_config=config.input, batch_size=context.batch_size,
                            data_sharding=context.data_sharding)
    train = get(split=_head(context.builder, config.train_split, spec['pool_examples']))
    test = get(split=_head(context.builder, config.test_split, spec['test_examples']))
    return fewshot_accuracies(train, test, config.num_classes, tuple(spec['shots']),
                              seed=config.seed, l2=spec.get('l2', 1.0), prefix=self.name)
