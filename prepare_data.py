r"""Writes image classes (per-class tars or folders) as a TFDS dataset.

  python prepare_data.py --dataset=imagenet21k --source=DIR --data_dir=D
  python prepare_data.py --dataset=folder:PATH --data_dir=D

`imagenet21k`: DIR holds one tar per class named by WordNet id (`n01440764.tar`,
as in the fall11 and winter21 releases) or one folder per class; all of it is
the split `full`. `folder:PATH`: PATH/<split>/<class>/*.{jpg,jpeg,png}. Labels
are the class names sorted, or the order of `--class_list` (one name a line,
e.g. the 21,843 WordNet ids of the ViT checkpoints).

Afterwards `tfds.builder(NAME, data_dir=D)` reads it. All cores work on it; a rerun
after a kill continues where it stopped (patchmerger/data/prepare.py says how).
Ends with a report that counts each kind of file and names the skipped ones.
"""
import os

from absl import app, flags

from patchmerger import cli
from patchmerger.data import prepare

_DATASET = flags.DEFINE_string('dataset', None, 'imagenet21k or folder:PATH.', required=True)
_SOURCE = flags.DEFINE_string('source', None, 'imagenet21k: per-class tars or class folders.')
_DATA_DIR = flags.DEFINE_string('data_dir',
                                os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'),
                                'TFDS data dir to write to.')
_CLASS_LIST = flags.DEFINE_string('class_list', None, 'Label order: one class name a line '
                                  '(default: sorted names).')
_WORKERS = flags.DEFINE_integer('workers', 0, 'Processes (0: all cores).')
_NUM_SHARDS = flags.DEFINE_integer('num_shards', 0, 'Output shards per split (0: ~256 MiB '
                                   'each).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')

  def run():
    report = prepare.prepare(_DATASET.value, os.path.expanduser(_DATA_DIR.value),
                             _SOURCE.value, _CLASS_LIST.value, _WORKERS.value,
                             _NUM_SHARDS.value)
    print('\n'.join(report.lines()))

  cli.run_reporting_errors(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
