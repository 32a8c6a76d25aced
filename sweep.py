r"""Runs a sweep: the cross product of config overrides, one run after another.

  python sweep.py --config=configs/fashion_mnist.py --workdir=workdirs/sweep \
      --sweep=model.width=64,128 --sweep=model.merger.num_tokens=4,8 --config.total_steps=500
  python sweep.py ... --dry_run        # one train.py command per run, for a launcher

Without --sweep, the config file's get_sweep() (a list of override dicts) is used.
Keys `arg.NAME` sweep the config's arg string: --sweep=arg.merger=none,4,8.
Each run trains in WORKDIR/<overrides>; running the same sweep again skips
finished runs and resumes unfinished ones. Results: a Markdown table on stdout,
WORKDIR/results.csv and WORKDIR/results.png.
"""
import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from patchmerger import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (with :arg string).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Root directory; one sub-directory per run.')
_SWEEP = flags.DEFINE_multi_string('sweep', [], 'KEY=VALUE,VALUE,... (repeat for a product).')
_DRY_RUN = flags.DEFINE_boolean('dry_run', False, 'Print the train.py commands, run nothing.')
flags.mark_flags_as_required(['config', 'workdir'])


def _config_module(config_arg: str):
  path = config_arg.partition(':')[0]
  spec = importlib.util.spec_from_file_location('swept_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config_sweep(config_arg: str) -> list:
  path, _, arg = config_arg.partition(':')
  module = _config_module(config_arg)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'Give --sweep=KEY=VALUES, or define get_sweep() in {path}.')
  return module.get_sweep(arg or None)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from patchmerger import sweep

  def run():
    config, root = _CONFIG.value, _WORKDIR.value
    config_arg = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--config='))
    base_flags = [a for a in sys.argv[1:] if a.startswith('--config.')]
    if _SWEEP.value:
      runs = sweep.parse_sweeps(config, _SWEEP.value)
    else:
      runs = _config_sweep(config_arg)
    keys = list(dict.fromkeys(k for r in runs for k in r))
    module = _config_module(config_arg)
    base_overrides = dict(flag[len('--config.'):].split('=', 1) for flag in base_flags)

    def config_for(overrides):  # The config file rebuilt with the run's arg string.
      arg = sweep.with_arg_overrides(config_arg, overrides).partition(':')[2]
      base = module.get_config(arg or None)
      typed = {k: sweep.typed_value(base, k, v) for k, v in base_overrides.items()}
      return sweep.apply_overrides(base, typed)

    for overrides in runs:  # Unknown keys and wrong types fail before anything runs.
      sweep.apply_overrides(config_for(overrides), overrides)
    if _DRY_RUN.value:
      for overrides in runs:
        print(sweep.train_command(config_arg, base_flags,
                                  os.path.join(root, sweep.run_name(overrides)), overrides))
      return
    from patchmerger.data import input_pipeline, local
    from patchmerger.training import loop
    input_pipeline.hide_gpus_from_tensorflow()  # Before TensorFlow makes any tensor.
    builder = local.ensure_prepared(config.dataset, config.data_dir)
    rows = sweep.run_sweep(config, root, runs,
                           train_fn=lambda c, w: loop.train(c, w, builder),
                           validate_fn=loop.validate, config_for=config_for)
    print(sweep.write_results(root, rows, keys))
    print(f'\n{sum(not r["skipped"] for r in rows)} runs trained, '
          f'{sum(r["skipped"] for r in rows)} already finished; table in '
          f'{os.path.join(root, "results.csv")}, plot in {os.path.join(root, "results.png")}.')

  cli.run_reporting_errors(run)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(cli.QuietLibraries())
  app.run(main, flags_parser=cli.parse_flags)
