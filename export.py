r"""Exports the parameters of a run's checkpoint in a public layout.

  python export.py --workdir=W --to=npz           # W/export/params.npz
  python export.py --workdir=W --to=big_vision    # W/export/big_vision.npz
  python export.py --workdir=W --to=vmoe          # W/export/vmoe.npz
  python export.py --workdir=W --to=transformers  # W/export/transformers/

`transformers` writes a directory that transformers opens: plain class-token ViTs as its
stock `ViTForImageClassification`; PatchMergers, TokenLearner, pooling, ToMe, GAP/MAP heads,
pre-logits, sincos2d and conv stems with our own code, opened by
`AutoModelForImageClassification.from_pretrained(DIR, trust_remote_code=True)`.
`--image_size=N` exports for another resolution.

The export knows the run's model from WORKDIR/config.json, which train.py writes (for
runs without one, pass the run's --config=configs/X.py:ARGS and overrides); it refuses
what the layout cannot compute, and writes the model config beside the weights
(`<name>.model.json`, or `patchmerger_model.json` in the transformers directory).
"""
import os

from absl import app, flags
from ml_collections import config_flags

from patchmerger import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory (holds checkpoints/).')
_TO = flags.DEFINE_enum('to', 'npz', ['npz', 'big_vision', 'vmoe', 'transformers'],
                        'Output layout.')
_OUT = flags.DEFINE_string('out', None, 'Output path; default: WORKDIR/export/<layout>.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', None, 'Export for this resolution (default: '
                                   'the run\'s); a learned position embedding is resized as '
                                   'fine-tuning resizes it.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'The run\'s config, for runs without WORKDIR/config.json.')
flags.mark_flags_as_required(['workdir'])

DEFAULT_NAMES = {'npz': 'params.npz', 'big_vision': 'big_vision.npz', 'vmoe': 'vmoe.npz',
                 'transformers': 'transformers'}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from patchmerger.checkpoints import export, loading, model_config

  def run():
    model = _CONFIG.value.model if _CONFIG.value else model_config.saved(_WORKDIR.value)
    if model is None:
      raise FileNotFoundError(
          f'{os.path.join(_WORKDIR.value, model_config.RUN_CONFIG)} does not exist: pass the '
          f'run\'s config, e.g. --config=configs/fashion_mnist.py:ARGS plus its overrides.')
    params = loading.load_orbax_params(_WORKDIR.value, _STEP.value)
    out = _OUT.value or os.path.join(_WORKDIR.value, 'export', DEFAULT_NAMES[_TO.value])
    export.export(params, _TO.value, out, model_config=model, image_size=_IMAGE_SIZE.value)
    print(f'Exported {len(params)} parameters ({_TO.value} layout) to {out}, with its '
          f'model config in {model_config.sidecar(out, _TO.value)}')

  cli.run_reporting_errors(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
