"""The training loop: config -> data -> model -> sharded steps -> checkpoints/metrics."""
import functools
import json
import logging
import os
import signal
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from clu import parameter_overview, periodic_actions

from patchmerger import flops, merge_pictures
from patchmerger.checkpoints import export, loading, model_config
from patchmerger.data import input_pipeline, local
from patchmerger.models import build_model
from patchmerger.training import (checkpoint, config_checks, evaluators, metrics, sharding,
                                  state as state_lib, step, utilisation)


def _check_config(config: Any) -> None:
  config_checks.check_ranges(config)
  config_checks.check_batch(config)


class Preempted(Exception):
  """Training stopped on a signal after saving a checkpoint at `step`."""

  def __init__(self, step: int, signal_name: str, workdir: str):
    super().__init__(f'Stopped by {signal_name} at step {step}; checkpoint saved in '
                     f'{checkpoint.checkpoint_dir(workdir)}. Run the same command to resume.')
    self.step, self.signal_name = step, signal_name


class StopSignals:
  """Notes SIGTERM/SIGINT instead of dying, so the loop can checkpoint and stop.

  With several processes, jax's preemption service (through orbax's
  `reached_preemption`) picks one step at which all processes stop together.
  """

  def __init__(self, manager: Any, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self._manager, self._signals = manager, signals
    self._previous, self.received = {}, None

  def __enter__(self) -> 'StopSignals':
    if jax.process_count() == 1:
      for sig in self._signals:
        try:
          self._previous[sig] = signal.signal(sig, self._note)
        except ValueError:  # Not the main thread: leave signals alone.
          pass
    return self

  def _note(self, signum, frame):
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc_info) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def should_stop(self, step_index: int) -> bool:
    if jax.process_count() > 1 and self._manager.reached_preemption(step_index):
      self.received = self.received or 'preemption notice'
    return self.received is not None


def ensure_writable(workdir: str) -> None:
  """Fails at start, with one line, when `workdir` could not hold checkpoints; creates
  nothing (the workdir is made only once every check has passed)."""
  if '://' in workdir:  # Remote storage: permissions show only when writing.
    return
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise PermissionError(f'Workdir {workdir} is not writable: {existing} is a file.')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f'Workdir {workdir} is not writable: no write permission on '
                          f'{existing}.')


def make_workdir(workdir: str) -> None:
  """Creates `workdir` and proves that it takes files (remote storage included)."""
  probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
  try:
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(probe, 'w') as f:
      f.write('ok')
    tf.io.gfile.remove(probe)
  except (OSError, tf.errors.OpError) as e:
    reason = getattr(e, 'message', None) or getattr(e, 'strerror', None) or str(e)
    raise PermissionError(f'Workdir {workdir} is not writable: {reason}') from None


def first_nonfinite(step_metrics: Sequence[dict], first_step: int,
                    names: Sequence[str]) -> Optional[tuple[int, str, float]]:
  """(step, metric, value) of the first non-finite value among `names`."""
  for offset, record in enumerate(jax.device_get(list(step_metrics))):
    for name in names:
      if not np.isfinite(record[name]):
        return first_step + offset, name, float(record[name])
  return None


validate = config_checks.validate


def evaluate(eval_fn, params, eval_data, data_sharding, batch_size: int,
             per_class: bool = False) -> dict:
  """Test loss and accuracy over the whole split (padding masked out); with
  `per_class`, also 'test/class_accuracy' (a list) and inference images/s."""
  data, num_batches = eval_data
  totals = None
  start, examples = None, 0
  for local in input_pipeline.padded_batches(data, num_batches, batch_size):
    sums = eval_fn(params, sharding.global_batch(local, data_sharding))
    if start is None:  # The first call compiles: leave it out of the speed.
      jax.block_until_ready(sums)
      start = time.perf_counter()
    else:
      examples += batch_size * jax.process_count()
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  elapsed = time.perf_counter() - start
  results = {'test/loss': float(totals['loss_sum'] / totals['count']),
             'test/accuracy': float(totals['correct'] / totals['count']),
             'test/examples': int(totals['count'])}
  if per_class:
    counts = np.maximum(totals['class_count'], 1)
    results['test/class_accuracy'] = [float(a) for a in totals['class_correct'] / counts]
    results['test/images_per_sec'] = examples / elapsed if examples else float('nan')
  return results


class Setup(NamedTuple):
  model: Any
  mesh: Any
  image_shape: tuple[int, ...]
  state: Any  # The initial train state, or its abstract shapes and shardings.
  state_sharding: Any
  make_state: Callable[[], Any]  # Makes the initial state (in its shardings).


def _setup(config: Any, initialise: bool = True) -> Setup:
  """Model, mesh, image shape, the initial train state, its shardings and a function
  that makes the initial state. With `initialise=False` the state is abstract
  (shapes, dtypes and shardings only): a checkpoint restores onto it without a
  fresh state beside it in device memory."""
  mesh = sharding.make_mesh(config.mesh)
  image_shape = (config.input.image_size, config.input.image_size, config.input.channels)
  model = build_model(config.model, config.num_classes)
  init_rng = jax.random.split(jax.random.key(config.seed))[0]
  create = functools.partial(state_lib.create_state, model, config, image_shape=image_shape)
  abstract = jax.eval_shape(create, init_rng)
  state_sharding = sharding.fsdp_sharding(abstract, mesh,
                                          config.mesh.get('fsdp_min_size', 2 ** 12))

  def make_state():  # The same `create`: jit reuses the trace the shardings came from.
    return jax.jit(create, out_shardings=state_sharding)(init_rng)

  if initialise:
    state = make_state()
  else:
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         abstract, state_sharding)
  return Setup(model, mesh, image_shape, state, state_sharding, make_state)


def evaluate_checkpoint(config: Any, workdir: str, builder: tfds.core.DatasetBuilder,
                        step_number: int = None, fewshot: bool = True,
                        pictures_path: Optional[str] = None,
                        export_path: Optional[str] = None, source: Optional[str] = None) -> dict:
  """Restores a checkpoint of `workdir` (or of `source`: another run directory or a
  public-layout `.npz`) and evaluates it on the test split: loss,
  accuracy, per-class accuracy, inference images/s and (when the config has a
  `fewshot` section) few-shot probes. Optionally draws the merge pictures of the
  first test images and exports the parameters as a public-layout `.npz`.
  Checkpoints are only read; every model parameter must come from them."""
  _check_config(config)
  model_config.warn_if_different(source or workdir, config.model)
  from_npz = bool(source) and tf.io.gfile.exists(source) and not tf.io.gfile.isdir(source)
  model, mesh, image_shape, state, state_sharding, _ = _setup(config, initialise=from_npz)
  if from_npz:  # Public-layout weights, fitted to the config.
    flat, layout = loading.load(source)
    params, report = loading.adapt(flat, sharding.to_host(state.params),
                                   has_cls=model.classifier == 'token',
                                   layout=layout.describe())
    report.log()
    if report.new or report.reinitialised:
      raise loading.PretrainedMismatchError(
          f'{source} ({layout.describe()}) lacks parameters this model needs for evaluation: '
          f'{", ".join((report.new + report.reinitialised)[:3])}.')
    state = state.replace(params=jax.device_put(params, state_sharding.params), step=0)
  else:
    run_dir = source or workdir
    manager = checkpoint.make_manager(run_dir, config.keep_checkpoints, read_only=True)
    try:  # Closed on every path: its background threads must not outlive an error.
      steps = manager.all_steps()
      step_number = max(steps, default=None) if step_number is None else step_number
      if step_number is None:
        raise FileNotFoundError(f'No checkpoint in {checkpoint.checkpoint_dir(run_dir)}')
      if step_number not in steps:
        raise FileNotFoundError(f'No checkpoint at step {step_number} in '
                                f'{checkpoint.checkpoint_dir(run_dir)}; steps: {sorted(steps)}.')
      state = checkpoint.restore_step(manager, step_number, state)
    finally:
      manager.close()
  data_sharding = sharding.batch_sharding(mesh)
  local_batch = config.batch_size // jax.process_count()
  eval_fn = jax.jit(functools.partial(step.eval_step, apply_fn=model.apply, loss=config.loss),
                    in_shardings=(state_sharding.params, data_sharding))
  eval_data = input_pipeline.eval_dataset(builder, config.test_split, config.input, local_batch)
  results = {'step': int(state.step),
             **evaluate(eval_fn, state.params, eval_data, data_sharding, local_batch,
                        per_class=True)}
  if fewshot and config.get('fewshot'):
    results.update(evaluators.fewshot_eval(model, state.params, state_sharding.params, mesh,
                                           builder, config, local_batch))
  if pictures_path or export_path:  # On every process: a collective when FSDP spans hosts.
    params = sharding.to_host(state.params)
  if pictures_path and jax.process_index() == 0:
    images = input_pipeline.first_images(builder, config.test_split, config.input, 4)
    weights = merge_pictures.merge_weights(model, params, images)
    merge_pictures.draw(images, weights, pictures_path, config.input.mean, config.input.std)
  if export_path and jax.process_index() == 0:
    export.export(params, 'npz', export_path, model_config=config.model)
  return results


def train(config: Any, workdir: str, builder: tfds.core.DatasetBuilder = None) -> dict:
  """Trains (or resumes) `config` in `workdir`; returns the final metrics."""
  input_pipeline.hide_gpus_from_tensorflow()
  _check_config(config)
  ensure_writable(workdir)  # Checks only; nothing is created before the weights fit.
  is_main = jax.process_index() == 0
  logging.info('JAX %s on %s: %d devices (%d local), process %d of %d', jax.__version__,
               jax.default_backend(), jax.device_count(), jax.local_device_count(),
               jax.process_index(), jax.process_count())
  peak_tflops = utilisation.log_start(config)

  resume = bool(loading.checkpoint_steps(workdir))
  # Resuming restores onto an abstract state: a fresh one is made only if needed.
  model, mesh, image_shape, state, state_sharding, make_state = _setup(
      config, initialise=not resume)
  data_sharding = sharding.batch_sharding(mesh)
  builder = builder or tfds.builder(config.dataset, data_dir=config.data_dir)
  local.check_num_classes(builder, config.num_classes)
  local_batch = config.batch_size // jax.process_count()
  dropout_rng = jax.random.split(jax.random.key(config.seed))[1]

  manager, restored, init_report = None, None, None
  if resume:
    manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
    restored = checkpoint.restore_latest(manager, state)
    if restored is None:  # Every checkpoint was unreadable (and set aside): start afresh.
      state = make_state()
  state = restored if restored is not None else state
  start_step = int(state.step)
  if restored is None and config.get('init_from'):  # Fine-tuning: start from weights.
    flat, layout = loading.load(config.init_from)
    model_changes = model_config.warn_if_different(config.init_from, config.model)
    params, init_report = loading.adapt(  # to_host: FSDP may span hosts.
        flat, sharding.to_host(state.params), has_cls=model.classifier == 'token',
        dont_load=tuple(config.get('init_dont_load', ())),
        strict=config.get('init_strict', True), layout=layout.describe())
    init_report.log()
    state = state.replace(params=jax.device_put(params, state_sharding.params))
  # Only now, with every check passed and the weights known to fit, does the run
  # create its workdir and add files to it.
  make_workdir(workdir)
  manager = manager or checkpoint.make_manager(workdir, config.keep_checkpoints)
  if is_main:
    model_config.write_run_config(workdir, config)
  if init_report and is_main:
    with tf.io.gfile.GFile(os.path.join(workdir, 'init_report.json'), 'w') as f:
      json.dump({'init_from': config.init_from, 'model_changes': model_changes}
                | init_report.as_dict(), f, indent=1)
  writer = metrics.create_writer(workdir, is_main)
  state_mib = sharding.bytes_per_device(state) / 2 ** 20
  logging.info('Train state (params + optimizer): %.2f MiB per device, mesh %s', state_mib,
               dict(mesh.shape))
  writer.write_scalars(start_step, {'memory/state_mib_per_device': state_mib})

  counts = flops.count_params(state.params)
  gflops = flops.measured_gflops(model, image_shape)
  if start_step == 0:
    # Arrays on several hosts: statistics computed by a jitted collective (all processes).
    addressable = all(x.is_fully_addressable for x in jax.tree.leaves(state.params))
    logging.info('Parameters:\n%s', parameter_overview.get_parameter_overview(
        state.params, include_stats=True if addressable else 'global'))
  logging.info('Model: %s params (%d in mergers, %.3f%%), %.4f GFLOPs/image, mergers %s',
               f'{counts["total"]:,}', counts['merger'],
               100 * counts['merger'] / counts['total'], gflops, model.mergers)
  step_flops = utilisation.train_step_flops(model, config, image_shape)

  train_fn = jax.jit(
      functools.partial(step.train_step, loss=config.loss,
                        label_smoothing=config.label_smoothing, accum_steps=config.accum_steps),
      in_shardings=(state_sharding, data_sharding, sharding.replicated(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(step.eval_step, apply_fn=model.apply, loss=config.loss),
                    in_shardings=(state_sharding.params, data_sharding))
  train_iter = utilisation.InputTimer(sharding.prefetch_to_device(input_pipeline.train_batches(
      builder, config.train_split, config.input, config.batch_size, config.seed, start_step),
      data_sharding))
  eval_data = input_pipeline.eval_dataset(builder, config.test_split, config.input, local_batch)

  schedule = state_lib.learning_rate_schedule(config.lr, config.total_steps)
  progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_secs=None, every_steps=config.log_every)
  # Stop on a non-finite value before it can reach a checkpoint. When skipping
  # bad updates is allowed, only the parameters themselves must stay finite.
  watched = (['train/param_norm'] if config.skip_nonfinite_updates else
             ['train/loss', 'train/grad_norm', 'train/param_norm'])

  def check_finite(pending, first_step):
    bad = first_nonfinite(pending, first_step, watched)
    if bad:
      manager.wait_until_finished()
      raise FloatingPointError(
          f'Non-finite {bad[1]} ({bad[2]}) at step {bad[0]}; stopped without saving it. '
          f'Last good checkpoint: step {manager.latest_step()} in '
          f'{checkpoint.checkpoint_dir(workdir)}.')

  fewshot_every = config.fewshot.every if config.get('fewshot') else 0
  summary = {'train/skipped_updates': 0}
  pending = []
  timer_start, excluded, timed_steps = None, 0.0, 0
  with StopSignals(manager) as stop:
    for step_index in range(start_step + 1, config.total_steps + 1):
      batch = next(train_iter)
      state, step_metrics = train_fn(state, batch, dropout_rng)
      pending.append(step_metrics)
      if timer_start is None:  # Leave compilation out of the speed.
        jax.block_until_ready(state)
        timer_start, train_iter.waited = time.perf_counter(), 0.0
      else:
        timed_steps += 1
      progress(step_index)
      first_pending = step_index - len(pending) + 1
      stopping = stop.should_stop(step_index)
      last = step_index == config.total_steps
      saving = step_index % config.checkpoint_every == 0 or last or stopping
      logging_now = step_index % config.log_every == 0 or last or stopping
      if saving or logging_now:
        host = jax.device_get(pending)  # One transfer serves the check and the log.
        check_finite(host, first_pending)
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
      if step_index % config.eval_every == 0 or step_index == config.total_steps:
        test_metrics = evaluate(eval_fn, state.params, eval_data, data_sharding, local_batch)
        writer.write_scalars(step_index, test_metrics)
        summary.update(test_metrics)
        logging.info('step %d: test accuracy %.4f, loss %.4f', step_index,
                     test_metrics['test/accuracy'], test_metrics['test/loss'])
      if fewshot_every and (step_index % fewshot_every == 0 or last):
        fewshot_metrics = evaluators.fewshot_eval(
            model, state.params, state_sharding.params, mesh, builder, config, local_batch)
        writer.write_scalars(step_index, fewshot_metrics)
        summary.update(fewshot_metrics)
      if saving:
        checkpoint.save(manager, step_index, state)
      excluded += time.perf_counter() - t0
      if stopping:
        manager.wait_until_finished()
        writer.flush()
        raise Preempted(step_index, stop.received, workdir)
  if 'test/accuracy' not in summary:  # Resumed a finished run: report its result.
    summary.update(evaluate(eval_fn, state.params, eval_data, data_sharding, local_batch))
  manager.wait_until_finished()
  writer.flush()
  summary.update(step=int(state.step), gflops_per_image=gflops, params=counts['total'])
  return summary
