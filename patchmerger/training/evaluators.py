"""Evaluations beyond test accuracy: few-shot linear probes on the pre-logits."""
import functools
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds

from patchmerger import fewshot
from patchmerger.data import input_pipeline
from patchmerger.training import sharding


def features_fn(model: Any, params_sharding: Any, data_sharding: Any):
  """Jitted batch -> (pre-logits, the features the head reads; labels; mask), all
  three sharded alike, so that gathering them across hosts keeps them paired
  whatever order the hosts' devices have in the mesh."""
  def features(params, batch):
    _, state = model.apply({'params': params}, batch['image'], mutable=['intermediates'])
    return state['intermediates']['features'][0], batch['label'], batch['mask']
  return jax.jit(features, in_shardings=(params_sharding, data_sharding))


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


def fewshot_eval(model: Any, params: Any, params_sharding: Any, mesh: Any,
                 builder: tfds.core.DatasetBuilder, config: Any, batch_size: int) -> dict:
  """{'fewshot/Kshot': accuracy}: probes fitted on K train examples per class
  (from the first `fewshot.pool_examples` of the train split), scored on the
  first `fewshot.test_examples` test examples."""
  settings = config.fewshot
  data_sharding = sharding.batch_sharding(mesh)
  fn = features_fn(model, params_sharding, data_sharding)
  get = functools.partial(_features, fn, params, builder, input_config=config.input,
                          batch_size=batch_size, data_sharding=data_sharding)
  train = get(split=_head(builder, config.train_split, settings.pool_examples))
  test = get(split=_head(builder, config.test_split, settings.test_examples))
  return fewshot.fewshot_accuracies(train, test, config.num_classes, tuple(settings.shots),
                                    seed=config.seed, l2=settings.l2)
