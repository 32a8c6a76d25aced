r"""Trains a ViT (+ PatchMerger) from a config; resumes if WORKDIR holds a checkpoint.

  python train.py --config=configs/fashion_mnist.py --workdir=workdirs/fmnist
  python train.py --config=configs/fashion_mnist.py:merger=none --workdir=workdirs/plain
  python train.py --config=configs/imagenet21k.py:variant=B/16 \
      --config.model.merger.num_tokens=16 --workdir=...
  python train.py --config=configs/transfer.py:dataset=cifar10 --check_data   # data only
"""
from absl import app, flags, logging
from ml_collections import config_flags

from patchmerger import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (with :arg string).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_CHECK_DATA = flags.DEFINE_boolean('check_data', False, 'Only say whether the config\'s '
                                   'dataset is ready (exit 0) or what is missing (exit 2).')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported here so that --help and flag errors do not pay for jax/tf start-up.
  from patchmerger.data import local
  from patchmerger.training import loop

  if _CHECK_DATA.value:
    cli.run_reporting_errors(lambda: print(local.check_data(_CONFIG.value), flush=True))
    return
  if not _WORKDIR.value:
    cli.fail('--workdir is required (except with --check_data).')

  def run():
    cli.initialize_distributed(_CONFIG.value.distributed)
    summary = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    accuracy = (f'Final test accuracy: {summary["test/accuracy"]:.4f} '
                f'(test loss {summary["test/loss"]:.4f})' if 'test/accuracy' in summary
                else 'Finished')
    print(f'{accuracy} after {summary["step"]} steps; training '
          f'{summary.get("train/images_per_sec", float("nan")):.0f} images/s; '
          f'{summary["gflops_per_image"]:.4f} GFLOPs/image.', flush=True)

  cli.run_reporting_errors(run)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(cli.QuietLibraries())
  app.run(main, flags_parser=cli.parse_flags)
