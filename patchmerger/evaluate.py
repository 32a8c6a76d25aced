"""Evaluating saved weights, as eval.py does: a checkpoint of a run (or of another run
directory, or a public-layout `.npz`) restored read-only, then every evaluator of
`config.evals` run once."""
from typing import Any, Iterable, Optional

import jax
import tensorflow as tf
import tensorflow_datasets as tfds

from patchmerger import evaluators
from patchmerger.checkpoints import loading, manager as checkpoint_manager, model_config
from patchmerger.data import input_pipeline, local
from patchmerger.training import config_checks, setup as setup_lib, sharding


def _is_file(source: Optional[str]) -> bool:
  return bool(source) and tf.io.gfile.exists(source) and not tf.io.gfile.isdir(source)


def restore_params(run: setup_lib.Setup, workdir: str, step: Optional[int],
                   source: Optional[str], from_file: bool) -> tuple[Any, int]:
  """(params, step) of checkpoint `step` of `source or workdir`, or of a `.npz` source
  (`from_file`); every model parameter must come from the checkpoint."""
  if from_file:
    params, report = loading.load_and_adapt(source, sharding.to_host(run.state.params),
                                            has_cls=run.model.classifier == 'token')
    if report.new or report.reinitialised:
      raise loading.PretrainedMismatchError(
          f'{source} ({report.layout}) lacks parameters this model needs for evaluation: '
          f'{", ".join((report.new + report.reinitialised)[:3])}.')
    return jax.device_put(params, run.state_sharding.params), 0
  state = checkpoint_manager.restore_for_eval(source or workdir, step, run.state)
  return state.params, int(state.step)


def evaluate_checkpoint(config: Any, workdir: str,
                        builder: Optional[tfds.core.DatasetBuilder] = None,
                        step: Optional[int] = None, source: Optional[str] = None,
                        skip: Iterable[str] = ()) -> dict:
  """{'step': N, metrics of every evaluator of `config.evals` except those named in
  `skip`}. Checkpoints are only read; outputs (merge pictures) go to `workdir`. Checks
  the config's numbers; eval.py also runs `config_checks.validate` (which refuses, for
  example, a ToMe schedule that merges nothing) before any data work."""
  input_pipeline.hide_gpus_from_tensorflow()
  config_checks.check_ranges(config)
  config_checks.check_batch(config)
  model_config.warn_if_different(source or workdir, config.model)
  builder = builder or local.ensure_prepared(config.dataset, config.data_dir)
  local.check_splits(builder, (config.train_split, config.test_split))
  # A checkpoint restores onto abstract shapes; a .npz is fitted onto initial ones.
  from_file = _is_file(source)
  run = setup_lib.setup(config, initialise=from_file)
  params, step = restore_params(run, workdir, step, source, from_file)
  context = evaluators.Context(config, run.model, run.mesh, run.state_sharding.params,
                               builder, workdir)
  results = {'step': step}
  for evaluator in evaluators.from_config(config, context, skip):
    results.update(evaluator.run(params))
  return results
