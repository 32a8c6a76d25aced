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
import functools
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from patchmerger import cli, sweep

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (with :arg string).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Root directory; one sub-directory per run.')
_SWEEP = flags.DEFINE_multi_string('sweep', [], 'KEY=VALUE,VALUE,... (repeat for a product).')
_DRY_RUN = flags.DEFINE_boolean('dry_run', False, 'Print the train.py commands, run nothing.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')

  def run():
    config, root = _CONFIG.value, _WORKDIR.value
    # The flags as typed: the config file is loaded again per run, and the dry run's
    # train.py commands repeat them.
    config_arg = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--config='))
    base_flags = [a for a in sys.argv[1:] if a.startswith('--config.')]
    module = sweep.config_module(config_arg)
    if _SWEEP.value:
      runs = sweep.parse_sweeps(config, _SWEEP.value)
    else:
      runs = sweep.config_sweep(module, config_arg)
    keys = list(dict.fromkeys(k for r in runs for k in r))
    config_for = functools.partial(sweep.config_for, module, config_arg,
                                   sweep.flag_overrides(base_flags))
    sweep.run_configs(runs, config_for)  # Bad keys and values fail before anything runs.
    if _DRY_RUN.value:
      for overrides in runs:
        print(sweep.train_command(config_arg, base_flags,
                                  os.path.join(root, sweep.run_name(overrides)), overrides))
      return
    from patchmerger.data import input_pipeline, local
    from patchmerger.training import config_checks, loop
    input_pipeline.hide_gpus_from_tensorflow()  # Before TensorFlow makes any tensor.
    builder = local.ensure_prepared(config.dataset, config.data_dir)
    rows = sweep.run_sweep(config, root, runs,
                           train_fn=lambda c, w: loop.train_and_evaluate(c, w, builder),
                           validate_fn=config_checks.validate, config_for=config_for)
    print(sweep.write_results(root, rows, keys))
    print(f'\n{sum(not r["skipped"] for r in rows)} runs trained, '
          f'{sum(r["skipped"] for r in rows)} already finished; table in '
          f'{os.path.join(root, "results.csv")}, plot in {os.path.join(root, "results.png")}.')

  cli.run_reporting_errors(run)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(cli.QuietLibraries())
  app.run(main, flags_parser=cli.parse_flags)
