r"""Evaluates the latest (or a given) checkpoint of a run with every evaluator of its
config (`config.evals`: test accuracy per class, few-shot probes, inference speed,
merge pictures).

  python eval.py --config=configs/fashion_mnist.py --workdir=workdirs/fashion_mnist
  python eval.py --config=configs/fashion_mnist.py --workdir=W --checkpoint=params.npz

Prints the results and writes WORKDIR/eval.json. To export weights: python export.py.
"""
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from patchmerger import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file of the run.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory (holds checkpoints/).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Evaluate this run directory or public-'
                                  'layout .npz instead of WORKDIR\'s checkpoint; results still '
                                  'go to WORKDIR.')
_PICTURES = flags.DEFINE_boolean('merge_pictures', True,
                                 'Draw WORKDIR/merge_pictures.png (models with a merger).')
_EXPORT = flags.DEFINE_string('export_npz', None, 'Moved: use python export.py --workdir=W '
                              '--to=npz --out=PATH.')
flags.mark_flags_as_required(['config', 'workdir'])


def report(results: dict) -> str:
  """One line per result: 'test/accuracy' -> '  test accuracy   0.9012'."""
  examples = (f' on {results["test/examples"]} test examples' if 'test/examples' in results
              else '')
  lines = [f'Checkpoint step {results["step"]}{examples}:']
  for key, value in results.items():
    if key in ('step', 'test/examples'):
      continue
    if isinstance(value, list):
      text = ' '.join(f'{v:.3f}' for v in value)
    elif isinstance(value, float):
      text = f'{value:.0f}' if key.endswith('per_sec') else f'{value:.4f}'
    else:
      text = str(value)
    lines.append(f'  {key.replace("/", " ").replace("_", " "):<24} {text}')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _EXPORT.value:  # A .npz --checkpoint is already an export: name the run directory.
    run_dir = (_CHECKPOINT.value if _CHECKPOINT.value and os.path.isdir(_CHECKPOINT.value)
               else _WORKDIR.value)
    step = f' --step={_STEP.value}' if _STEP.value is not None else ''
    cli.fail(f'--export_npz moved to export.py: python export.py --workdir={run_dir}{step} '
             f'--to=npz --out={_EXPORT.value}')
  import jax
  import tensorflow as tf
  from patchmerger import evaluate, evaluators
  from patchmerger.data import input_pipeline
  from patchmerger.training import config_checks

  def run():
    config = _CONFIG.value
    input_pipeline.hide_gpus_from_tensorflow()  # Before TensorFlow makes any tensor.
    cli.initialize_distributed(config.distributed)
    config_checks.validate(config)  # Bad settings fail before any data work.
    skip = [name for name, spec in (config.get('evals') or {}).items()
            if not _PICTURES.value and evaluators.kind_of(name, spec) == 'merge_pictures']
    results = evaluate.evaluate_checkpoint(config, _WORKDIR.value, step=_STEP.value,
                                           source=_CHECKPOINT.value, skip=skip)
    if jax.process_index() == 0:  # The workdir is made only once evaluation succeeded.
      tf.io.gfile.makedirs(_WORKDIR.value)  # Local or object storage (gs://...).
      with tf.io.gfile.GFile(os.path.join(_WORKDIR.value, 'eval.json'), 'w') as f:
        json.dump(results, f, indent=2)
    print(report(results))

  cli.run_reporting_errors(run, read_only=True)


if __name__ == '__main__':
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=cli.parse_flags)
