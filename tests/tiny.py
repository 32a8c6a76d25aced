"""A tiny training run on TFDS mock data, for tests; also runnable as a script so
that tests can start it in a subprocess with other device counts:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.tiny WORKDIR [KEY=VALUE ...]
  python -m tests.tiny --eval WORKDIR [KEY=VALUE ...]     # eval.py's evaluation of WORKDIR
"""
import sys

import ml_collections
import tensorflow_datasets as tfds

from configs import fashion_mnist

MOCK_EXAMPLES = 96


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The default config at a tiny width, with a few steps and frequent logs."""
  config = fashion_mnist.get_config('merger=4@1')
  config.model.update(width=16, depth=2, mlp_dim=32, num_heads=2, conv_stem=())
  config.update(batch_size=16, total_steps=6, log_every=1, checkpoint_every=3,
                keep_checkpoints=5)
  config.evals.test.every = 3
  config.input.shuffle_buffer = MOCK_EXAMPLES
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def run(workdir: str, config: ml_collections.ConfigDict) -> dict:
  from patchmerger.training import loop
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
    return loop.train_and_evaluate(config, workdir, builder)


def evaluate(workdir: str, config: ml_collections.ConfigDict) -> dict:
  from patchmerger import evaluate as evaluate_lib
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
    return evaluate_lib.evaluate_checkpoint(config, workdir, builder,
                                            skip=('fewshot', 'merge_pictures'))


if __name__ == '__main__':
  action = evaluate if sys.argv[1] == '--eval' else run
  args = sys.argv[2:] if action is evaluate else sys.argv[1:]
  overrides = dict(arg.split('=', 1) for arg in args[1:])
  typed = {k: int(v) if v.lstrip('-').isdigit() else v for k, v in overrides.items()}
  from patchmerger import cli  # Errors and signals end the run as train.py's do.
  cli.run_reporting_errors(lambda: action(args[0], tiny_config(**typed)),
                           read_only=action is evaluate)
