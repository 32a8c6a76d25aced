"""No lost work: hard kills, preemption signals, corrupted checkpoints, NaNs,
mismatched checkpoints and unwritable workdirs."""
import functools
import glob
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
import pytest

from patchmerger.models import build_model
from patchmerger.checkpoints import manager as checkpoint
from patchmerger.training import (loop, metrics, setup as setup_lib, state as state_lib, step,
                                  workdir as workdir_lib)
from tests import test_cli, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _saved_state(workdir, step_number=None):
  """The checkpointed train state as a flat {path: numpy array}, read as saved."""
  manager = checkpoint.make_manager(str(workdir), 100)
  step_number = manager.latest_step() if step_number is None else step_number
  restored = manager.restore(step_number, args=ocp.args.StandardRestore())
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}


def _assert_identical(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _start_tiny(workdir, **overrides):
  env = dict(os.environ, PYTHONPATH=ROOT)
  args = [f'{k}={v}' for k, v in overrides.items()]
  return subprocess.Popen([sys.executable, '-m', 'tests.tiny', str(workdir), *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(process, workdir, step_number, timeout=300):
  """Polls metrics.jsonl until the run has logged `step_number`."""
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert process.poll() is None, process.communicate()[1][-3000:]
    if os.path.exists(path):
      steps = [r['step'] for r in metrics.read_metrics(str(workdir)) if 'train/loss' in r]
      if steps and max(steps) >= step_number:
        return max(steps)
    time.sleep(0.01)
  raise TimeoutError(f'step {step_number} not reached')


# Slow steps (checkpoint every 4 steps, log every step) so a kill lands mid-run.
KILL_RUN = dict(total_steps=60, checkpoint_every=4, log_every=1, **{'evals.test.every': 60},
                keep_checkpoints=2)


def test_hard_kill_then_rerun_gives_bit_identical_parameters(tmp_path):
  reference = tmp_path / 'reference'
  tiny.run(str(reference), tiny.tiny_config(**KILL_RUN))

  killed = tmp_path / 'killed'
  kill_at = random.Random().randint(5, 50)
  process = _start_tiny(killed, **KILL_RUN)
  reached = _wait_for_step(process, killed, kill_at)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL
  resumed = checkpoint.make_manager(str(killed), 2).latest_step()
  assert resumed is None or resumed <= reached  # Nothing past the kill was saved.

  summary = tiny.run(str(killed), tiny.tiny_config(**KILL_RUN))
  assert summary['step'] == 60, f'killed at step {reached}'
  _assert_identical(_saved_state(killed), _saved_state(reference))


def test_sigterm_saves_at_the_current_step_and_resume_starts_there(tmp_path):
  workdir = tmp_path / 'run'
  # Far more steps than the test waits for; no periodic checkpoint.
  settings = dict(total_steps=100_000, checkpoint_every=100_000, log_every=1,
                  **{'evals.test.every': 100_000})
  process = _start_tiny(workdir, **settings)
  _wait_for_step(process, workdir, 5)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 143, stderr[-3000:]
  stopped_line = [l for l in stderr.splitlines() if l.startswith('Stopped by SIGTERM at step')]
  assert stopped_line, stderr[-3000:]
  stopped_at = int(stopped_line[0].split()[5].rstrip(';'))
  assert checkpoint.make_manager(str(workdir), 2).all_steps() == [stopped_at]
  records_before = metrics.read_metrics(str(workdir))
  logged = [r['step'] for r in records_before if 'train/loss' in r]
  assert max(logged) == stopped_at  # Every trained step is in the checkpoint.

  summary = tiny.run(str(workdir), tiny.tiny_config(**{**settings,
                                                       'total_steps': stopped_at + 2}))
  records = metrics.read_metrics(str(workdir))
  resumed = [r['step'] for r in records[len(records_before):] if 'train/loss' in r]
  assert resumed == [stopped_at + 1, stopped_at + 2]
  assert summary['step'] == stopped_at + 2


def _corrupt(step_dir):
  data_files = [f for f in glob.glob(os.path.join(step_dir, '**', 'd', '*'), recursive=True)
                if os.path.isfile(f)]
  assert data_files
  for path in data_files:
    with open(path, 'r+b') as f:
      f.truncate(7)


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  config = tiny.tiny_config(total_steps=6, checkpoint_every=3, **{'evals.test.every': 6})
  tiny.run(str(tmp_path), config)
  good_final = _saved_state(tmp_path, 6)
  losses = {r['step']: r['train/loss'] for r in metrics.read_metrics(str(tmp_path))
            if 'train/loss' in r}
  _corrupt(tmp_path / 'checkpoints' / '6')

  summary = tiny.run(str(tmp_path), config)
  assert 'Checkpoint at step 6 is unreadable' in caplog.text
  assert os.path.isdir(tmp_path / 'checkpoints_unreadable' / '6')  # Kept, not deleted.
  assert summary['step'] == 6
  records = [r for r in metrics.read_metrics(str(tmp_path)) if 'train/loss' in r]
  assert [r['step'] for r in records[-3:]] == [4, 5, 6]  # Resumed from step 3.
  assert all(r['train/loss'] == losses[r['step']] for r in records[-3:])
  _assert_identical(_saved_state(tmp_path, 6), good_final)


def test_every_checkpoint_unreadable_starts_afresh_and_keeps_them(tmp_path, caplog):
  config = tiny.tiny_config(total_steps=3, checkpoint_every=3, **{'evals.test.every': 3})
  first = tiny.run(str(tmp_path / 'first'), config)
  tiny.run(str(tmp_path), config)
  _corrupt(tmp_path / 'checkpoints' / '3')
  summary = tiny.run(str(tmp_path), config)  # Resume finds nothing readable.
  assert 'Checkpoint at step 3 is unreadable' in caplog.text
  assert os.path.isdir(tmp_path / 'checkpoints_unreadable' / '3')
  assert summary['step'] == 3 and summary['test/accuracy'] == first['test/accuracy']


def test_out_of_memory_on_resume_keeps_every_checkpoint(tmp_path, monkeypatch):
  """Running out of memory says nothing about the checkpoint: nothing is set aside
  and the run does not restart from step 0."""
  config = tiny.tiny_config(total_steps=3, checkpoint_every=3, **{'evals.test.every': 3})
  tiny.run(str(tmp_path), config)

  def out_of_memory(*args, **kwargs):
    raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB')

  monkeypatch.setattr(checkpoint, 'restore', out_of_memory)
  with pytest.raises(checkpoint.OutOfMemoryOnRestore,
                     match=r'checkpoints/3 ran out of memory \(RuntimeError: RESOURCE_EXHAUSTED'):
    tiny.run(str(tmp_path), tiny.tiny_config(total_steps=6, checkpoint_every=3, **{'evals.test.every': 3}))
  assert not os.path.exists(tmp_path / 'checkpoints_unreadable')
  assert os.path.isdir(tmp_path / 'checkpoints' / '3')


def test_workdirs_on_object_storage_keep_their_scheme():
  assert checkpoint.checkpoint_dir('gs://bucket/run/') == 'gs://bucket/run/checkpoints'
  assert checkpoint.checkpoint_dir('runs/a') == os.path.abspath('runs/a/checkpoints')


def test_metrics_jsonl_is_written_through_tf_io_gfile():
  """TensorFlow's in-memory file system stands in for a bucket: not a local path."""
  tf.io.gfile.makedirs('ram://bucket/run')
  for step in (1, 2):  # A resumed run appends.
    writer = metrics.JsonlWriter('ram://bucket/run/metrics.jsonl')
    writer.write_scalars(step, {'train/loss': 0.5})
    writer.close()
  assert metrics.read_metrics('ram://bucket/run') == [
      {'step': 1, 'train/loss': 0.5}, {'step': 2, 'train/loss': 0.5}]


def test_nonfinite_loss_stops_naming_step_and_keeps_good_checkpoints(tmp_path):
  # A huge learning rate without clipping overflows within a few steps.
  config = tiny.tiny_config(total_steps=20, checkpoint_every=1, log_every=5, **{'evals.test.every': 20})
  config.lr.update(base=1e18, warmup_steps=0)
  config.optim.clip_norm = 0.
  with pytest.raises(FloatingPointError) as error:
    tiny.run(str(tmp_path), config)
  message = str(error.value)
  assert message.startswith('Non-finite train/')
  bad_step = int(message.split(' at step ')[1].split(';')[0])
  saved = checkpoint.make_manager(str(tmp_path), 5).all_steps()
  assert saved == list(range(max(1, bad_step - 5), bad_step)), (message, saved)
  assert f'Last good checkpoint: step {bad_step - 1}' in message or bad_step == 1
  for step_number in saved:  # What was kept is finite.
    assert all(np.isfinite(v).all() for v in _saved_state(tmp_path, step_number).values())


def test_skip_nonfinite_updates_leaves_the_state_untouched():
  config = tiny.tiny_config(skip_nonfinite_updates=3)
  config.lr.warmup_steps = 0  # A non-zero learning rate at the first update.
  model = build_model(config.model, config.num_classes)
  state = state_lib.create_state(model, config, jax.random.key(0), (32, 32, 1))
  train = jax.jit(functools.partial(step.train_step, loss='softmax_xent', label_smoothing=0.,
                                    accum_steps=1))
  images = np.zeros((4, 32, 32, 1), np.float32)
  bad = {'image': images.copy(), 'label': np.zeros(4, np.int32)}
  bad['image'][0, 0, 0, 0] = np.nan
  skipped, step_metrics = train(state, bad, jax.random.key(1))
  assert float(step_metrics['train/update_skipped']) == 1.
  assert int(skipped.step) == 1
  jax.tree.map(np.testing.assert_array_equal, skipped.params, state.params)
  good = {'image': images, 'label': np.zeros(4, np.int32)}
  updated, step_metrics = train(skipped, good, jax.random.key(1))
  assert float(step_metrics['train/update_skipped']) == 0.
  assert not np.array_equal(updated.params['head']['bias'], state.params['head']['bias'])


def test_checkpoint_of_another_model_fails_clearly_and_keeps_the_workdir(tmp_path):
  tiny.run(str(tmp_path), tiny.tiny_config(total_steps=3))
  before = {p: os.path.getsize(p) for p in glob.glob(f'{tmp_path}/**', recursive=True)
            if os.path.isfile(p)}
  wider = tiny.tiny_config(total_steps=3)
  wider.model.width = 24
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'checkpoints/3 does not fit this config: params/\S+ has shape'):
    tiny.run(str(tmp_path), wider)
  after = {p: os.path.getsize(p) for p in glob.glob(f'{tmp_path}/**', recursive=True)
           if os.path.isfile(p)}
  assert after == before


def test_unwritable_workdir_fails_at_start(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(PermissionError, match='is not writable'):
    workdir_lib.ensure_writable(str(blocker / 'run'))


def test_checkpoints_restore_without_pickle(tmp_path, monkeypatch):
  config = tiny.tiny_config()
  state = setup_lib.setup(config).state
  manager = checkpoint.make_manager(str(tmp_path), 1)
  checkpoint.save(manager, 1, state)
  manager.wait_until_finished()

  def refuse(*args, **kwargs):
    raise AssertionError('pickle used')
  for name in ('load', 'loads', 'Unpickler'):
    monkeypatch.setattr(pickle, name, refuse)
  restored = checkpoint.restore(checkpoint.make_manager(str(tmp_path), 1), 1, state)
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)


def _flip_a_byte(step_dir):
  """One flipped byte in the OCDBT data file of the checkpoint's root (tensorstore reads
  it for every array, so the damage is always detected)."""
  path, = glob.glob(os.path.join(step_dir, 'default', 'd', '*'))
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.slow
def test_eval_of_a_damaged_checkpoint_names_the_readable_steps(tmp_path):
  tiny.run(str(tmp_path), tiny.tiny_config(total_steps=6, checkpoint_every=3, **{'evals.test.every': 6}))
  _flip_a_byte(tmp_path / 'checkpoints' / '6')
  files_before = sorted(glob.glob(f'{tmp_path}/**', recursive=True))
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, '-m', 'tests.tiny', '--eval', str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = test_cli.error_lines(result.stderr)
  errors = [l for l in lines if l.startswith('error: ')]
  assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
  # Nothing follows the error line. (A failed tensorstore read can still make orbax's threads
  # print "Event loop is closed" tracebacks before it, depending on timing.)
  assert errors[0].startswith('error: Checkpoint step 6 (')
  assert 'is unreadable (' in errors[0]
  assert errors[0].endswith('readable steps: 3 (choose one with --step=N).')
  assert sorted(glob.glob(f'{tmp_path}/**', recursive=True)) == files_before  # Only read.
