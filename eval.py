r"""Evaluates the latest (or a given) checkpoint of a run on its test split.

  python eval.py --config=configs/fashion_mnist.py --workdir=workdirs/fashion_mnist
  python eval.py --config=configs/fashion_mnist.py --workdir=W --checkpoint=params.npz

Prints test accuracy and loss and writes WORKDIR/eval.json.
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
_EXPORT = flags.DEFINE_string('export_npz', None, 'Also export the parameters to this .npz '
                              '(google-research/vision_transformer layout).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax
  import tensorflow as tf
  from patchmerger.data import input_pipeline, local
  from patchmerger.training import loop

  def run():
    config = _CONFIG.value
    input_pipeline.hide_gpus_from_tensorflow()  # Before TensorFlow makes any tensor.
    cli.initialize_distributed(config.distributed)
    loop.validate(config)
    builder = local.ensure_prepared(config.dataset, config.data_dir)
    # Merge pictures need weights over the patches: a reducer between blocks.
    has_merger = (config.model.merger is not None and config.model.get('reducer', {}).get(
        'kind', 'patchmerger') in ('patchmerger', 'tokenlearner', 'pool'))
    pictures = os.path.join(_WORKDIR.value, 'merge_pictures.png')
    results = loop.evaluate_checkpoint(config, _WORKDIR.value, builder, _STEP.value,
                                       pictures_path=pictures if _PICTURES.value and has_merger
                                       else None, export_path=_EXPORT.value,
                                       source=_CHECKPOINT.value)
    if jax.process_index() == 0:  # The workdir is made only once evaluation succeeded.
      tf.io.gfile.makedirs(_WORKDIR.value)  # Local or object storage (gs://...).
      with tf.io.gfile.GFile(os.path.join(_WORKDIR.value, 'eval.json'), 'w') as f:
        json.dump(results, f, indent=2)
    print(f'Checkpoint step {results["step"]} on {results["test/examples"]} test examples:')
    print(f'  test accuracy      {results["test/accuracy"]:.4f}')
    print(f'  test loss          {results["test/loss"]:.4f}')
    print(f'  inference          {results["test/images_per_sec"]:.0f} images/s')
    for key in sorted((k for k in results if k.startswith('fewshot/')),
                      key=lambda k: int(k.split('/')[1].removesuffix('shot'))):
      print(f'  {key:<18} {results[key]:.4f}')
    print('  per class          ' + ' '.join(f'{a:.3f}' for a in results['test/class_accuracy']))
    if _PICTURES.value and has_merger:
      print(f'Merge pictures: {pictures}')
    if _EXPORT.value:
      print(f'Exported parameters: {_EXPORT.value}')

  cli.run_reporting_errors(run, read_only=True)


if __name__ == '__main__':
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=cli.parse_flags)
