r"""Exports the parameters of a run's checkpoint in a public layout.

  python -m patchmerger.export --workdir=W --to=npz           # W/export/params.npz
  python -m patchmerger.export --workdir=W --to=big_vision    # W/export/big_vision.npz
  python -m patchmerger.export --workdir=W --to=transformers  # W/export/transformers/

`transformers` writes a directory that `ViTForImageClassification.from_pretrained` opens;
it takes plain class-token ViTs only (transformers has no token merging).
"""
import os

from absl import app, flags

from patchmerger import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory (holds checkpoints/).')
_TO = flags.DEFINE_enum('to', 'npz', ['npz', 'big_vision', 'transformers'], 'Output layout.')
_OUT = flags.DEFINE_string('out', None, 'Output path; default: WORKDIR/export/<layout>.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
flags.mark_flags_as_required(['workdir'])

DEFAULT_NAMES = {'npz': 'params.npz', 'big_vision': 'big_vision.npz',
                 'transformers': 'transformers'}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from patchmerger.checkpoints import export, loading

  def run():
    params = loading.load_orbax_params(_WORKDIR.value, _STEP.value)
    out = _OUT.value or os.path.join(_WORKDIR.value, 'export', DEFAULT_NAMES[_TO.value])
    export.export(params, _TO.value, out)
    print(f'Exported {len(params)} parameters ({_TO.value} layout) to {out}')

  cli.run_reporting_errors(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
