"""The training loop: config -> data -> model -> sharded steps -> checkpoints/metrics.

After flax's examples/imagenet: small named functions and one `train_and_evaluate`.
"""
import functools
import json
import logging
import os
import time
from typing import Any, Optional

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from clu import parameter_overview, periodic_actions

from patchmerger import evaluators, flops
from patchmerger.checkpoints import loading, manager as checkpoint_manager, model_config
from patchmerger.data import input_pipeline, local
from patchmerger.errors import DivergedError, Preempted
from patchmerger.training import (config_checks, metrics, preemption, setup as setup_lib,
                                  sharding, state as state_lib, step, utilisation,
                                  workdir as workdir_lib)


# --- Start: restore a checkpoint, or initialise (from pretrained weights) ---

def restore_or_initialise(config: Any, workdir: str) -> tuple[setup_lib.Setup, Any, Any, bool]:
  """(setup, state, manager or None, resumed): the latest readable checkpoint of
  `workdir` restored onto an abstract state (no fresh one beside it in memory), else
  the initial state."""
  if not checkpoint_manager.steps(workdir):
    run = setup_lib.setup(config)
    return run, run.state, None, False
  run = setup_lib.setup(config, initialise=False)
  manager = checkpoint_manager.make_manager(workdir, config.keep_checkpoints)
  restored = checkpoint_manager.restore_latest(manager, run.state)
  if restored is None:  # Every checkpoint was unreadable (and set aside): start afresh.
    return run, run.make_state(), manager, False
  return run, restored, manager, True


def load_pretrained(config: Any, run: setup_lib.Setup, state: Any) -> tuple[Any, dict]:
  """`state` with its parameters from `config.init_from`, and the report of what loading
  did (written to WORKDIR/init_report.json)."""
  model_changes = model_config.warn_if_different(config.init_from, config.model)
  params, report = loading.load_and_adapt(  # to_host: FSDP may span hosts.
      config.init_from, sharding.to_host(state.params), has_cls=run.model.classifier == 'token',
      dont_load=tuple(config.get('init_dont_load', ())), strict=config.get('init_strict', True),
      upcycle=config.get('init_upcycle', False))
  state = state.replace(params=jax.device_put(params, run.state_sharding.params))
  return state, {'init_from': config.init_from, 'model_changes': model_changes} | report.as_dict()


def log_model(run: setup_lib.Setup, state: Any, start_step: int) -> tuple[dict, float]:
  """Logs the parameters (on a fresh start) and the model's size; returns the parameter
  counts and GFLOPs per image."""
  moe = run.model.moe
  counts = flops.count_params(state.params, moe.num_selected_experts if moe else 1)
  gflops = flops.measured_gflops(run.model, run.image_shape)
  if start_step == 0:
    # Arrays on several hosts: statistics computed by a jitted collective (all processes).
    addressable = all(x.is_fully_addressable for x in jax.tree.leaves(state.params))
    logging.info('Parameters:\n%s', parameter_overview.get_parameter_overview(
        state.params, include_stats=True if addressable else 'global'))
  logging.info('Model: %s params (%d in mergers, %.3f%%), %.4f GFLOPs/image, mergers %s',
               f'{counts["total"]:,}', counts['merger'],
               100 * counts['merger'] / counts['total'], gflops, run.model.mergers)
  if moe:
    logging.info('Experts (%s, layers %s): %s of the parameters; %s active per token',
                 moe.kind, moe.layers, f'{counts["experts"]:,}', f'{counts["active"]:,}')
  return counts, gflops


def compile_train_step(config: Any, run: setup_lib.Setup) -> Any:
  data_sharding = sharding.batch_sharding(run.mesh)
  return jax.jit(
      sharding.under_mesh(functools.partial(
          step.train_step, loss=config.loss, label_smoothing=config.label_smoothing,
          accum_steps=config.accum_steps), run.mesh),
      in_shardings=(run.state_sharding, data_sharding, sharding.replicated(run.mesh)),
      out_shardings=(run.state_sharding, sharding.replicated(run.mesh)), donate_argnums=0)


def check_finite(host_metrics: list, first_step: int, watched: list, manager: Any,
                 workdir: str) -> None:
  """Stops before a non-finite value can reach a checkpoint."""
  bad = metrics.first_nonfinite(host_metrics, first_step, watched)
  if bad:
    manager.wait_until_finished()
    raise DivergedError(
        f'Non-finite {bad[1]} ({bad[2]}) at step {bad[0]}; stopped without saving it. '
        f'Last good checkpoint: step {manager.latest_step()} in '
        f'{checkpoint_manager.checkpoint_dir(workdir)}.')


def run_evaluators(evals: list, params: Any, step_index: int, last: bool, writer: Any,
                   summary: dict, manager: Any) -> None:
  """Runs the evaluators due at `step_index`; writes and logs their numbers."""
  due = [evaluator for evaluator in evals if evaluator.due(step_index, last)]
  if due:
    # A save still in flight must finish first: with input work beside it, orbax 0.12.8
    # was seen to finalise a step before writing its metadata (tests/test_evaluation.py).
    manager.wait_until_finished()
  for evaluator in due:
    results = evaluator.run(params)
    scalars = metrics.scalars(results)
    if scalars:
      writer.write_scalars(step_index, scalars)
      logging.info('step %d: %s', step_index, ', '.join(
          f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in scalars.items()))
    summary.update(results)


# --- The loop ---

def train_and_evaluate(config: Any, workdir: str,
                       builder: Optional[tfds.core.DatasetBuilder] = None) -> dict:
  """Trains (or resumes) `config` in `workdir`; returns the final metrics."""
  input_pipeline.hide_gpus_from_tensorflow()
  config_checks.validate(config)  # Bad settings fail with one line before any data work.
  workdir_lib.ensure_writable(workdir)  # Checks only; nothing is created yet.
  is_main = jax.process_index() == 0
  logging.info('JAX %s on %s: %d devices (%d local), process %d of %d', jax.__version__,
               jax.default_backend(), jax.device_count(), jax.local_device_count(),
               jax.process_index(), jax.process_count())
  peak_tflops = utilisation.log_start(config)
  builder = builder or local.ensure_prepared(config.dataset, config.data_dir)
  local.check_num_classes(builder, config.num_classes)
  local.check_splits(builder, (config.train_split, config.test_split))

  run, state, manager, resumed = restore_or_initialise(config, workdir)
  start_step = int(state.step)
  init_report = None
  if not resumed and config.get('init_from'):  # Fine-tuning: start from weights.
    state, init_report = load_pretrained(config, run, state)
  # Only now, with every check passed and the weights known to fit, does the run
  # create its workdir and add files to it.
  workdir_lib.make_workdir(workdir)
  manager = manager or checkpoint_manager.make_manager(workdir, config.keep_checkpoints)
  if is_main:
    model_config.write_run_config(workdir, config)
  if init_report and is_main:
    with tf.io.gfile.GFile(os.path.join(workdir, 'init_report.json'), 'w') as f:
      json.dump(init_report, f, indent=1)
  writer = metrics.create_writer(workdir, is_main)
  state_mib = sharding.bytes_per_device(state) / 2 ** 20
  logging.info('Train state (params + optimizer): %.2f MiB per device, mesh %s', state_mib,
               dict(run.mesh.shape))
  writer.write_scalars(start_step, {'memory/state_mib_per_device': state_mib})
  counts, gflops = log_model(run, state, start_step)
  step_flops = utilisation.train_step_flops(run.model, config, run.image_shape)

  train_fn = compile_train_step(config, run)
  evals = evaluators.from_config(config, evaluators.Context(
      config, run.model, run.mesh, run.state_sharding.params, builder, workdir))
  data_sharding = sharding.batch_sharding(run.mesh)
  train_iter = utilisation.InputTimer(sharding.prefetch_to_device(input_pipeline.train_batches(
      builder, config.train_split, config.input, config.batch_size, config.seed, start_step),
      data_sharding))
  dropout_rng = jax.random.split(jax.random.key(config.seed))[1]
  schedule = state_lib.learning_rate_schedule(config.lr, config.total_steps)
  progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_secs=None, every_steps=config.log_every)
  # When skipping bad updates is allowed, only the parameters themselves must stay finite.
  watched = (['train/param_norm'] if config.skip_nonfinite_updates else
             ['train/loss', 'train/grad_norm', 'train/param_norm'])

  summary = {'train/skipped_updates': 0}
  pending = []
  timer_start, excluded, timed_steps = None, 0.0, 0
  with preemption.StopSignals(manager) as stop:
    for step_index in range(start_step + 1, config.total_steps + 1):
      state, step_metrics = train_fn(state, next(train_iter), dropout_rng)
      pending.append(step_metrics)
      if timer_start is None:  # Leave compilation out of the speed.
        jax.block_until_ready(state)
        timer_start, train_iter.waited = time.perf_counter(), 0.0
      else:
        timed_steps += 1
      progress(step_index)
      stopping = stop.should_stop(step_index)
      last = step_index == config.total_steps
      saving = step_index % config.checkpoint_every == 0 or last or stopping
      logging_now = step_index % config.log_every == 0 or last or stopping
      if saving or logging_now:
        host = jax.device_get(pending)  # One transfer serves the check and the log.
        check_finite(host, step_index - len(pending) + 1, watched, manager, workdir)
      if logging_now:
        means = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        summary['train/skipped_updates'] += int(sum(m['train/update_skipped'] for m in host))
        pending = []
        means['train/lr'] = float(schedule(step_index - 1))
        elapsed = time.perf_counter() - timer_start - excluded
        means['train/images_per_sec'] = timed_steps * config.batch_size / max(elapsed, 1e-9)
        means.update(utilisation.utilisation(step_flops, timed_steps, elapsed, peak_tflops,
                                             train_iter.waited))
        writer.write_scalars(step_index, means)
        summary.update(means)
      t0 = time.perf_counter()  # Evaluation and checkpoints are not training time.
      run_evaluators(evals, state.params, step_index, last, writer, summary, manager)
      if saving:
        checkpoint_manager.save(manager, step_index, state)
      excluded += time.perf_counter() - t0
      if stopping:
        manager.wait_until_finished()
        writer.flush()
        raise Preempted(step_index, stop.received, checkpoint_manager.checkpoint_dir(workdir))
  if start_step >= config.total_steps:  # Resumed a finished run: report its result.
    for evaluator in evals:
      if isinstance(evaluator, evaluators.classification.Evaluator):
        summary.update(evaluator.run(state.params))
  manager.wait_until_finished()
  writer.flush()
  summary.update(step=int(state.step), gflops_per_image=gflops, params=counts['total'])
  return summary
