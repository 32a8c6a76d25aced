"""The training loop on mock data: every config, resume, multi-device equality."""
import importlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from patchmerger import evaluate
from patchmerger.training import loop, metrics, setup as setup_lib, step
from tests import tiny
from tests.test_configs import CONFIG_FILES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
  return {r['step']: r['train/loss'] for r in metrics.read_metrics(workdir) if 'train/loss' in r}


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_one_training_step_for_every_config(name, tmp_path):
  config = importlib.import_module(f'configs.{name}').get_config()
  config.model.update(width=16, depth=2, mlp_dim=32, num_heads=2)
  if config.model.representation_size is not None:
    config.model.representation_size = 16
  if isinstance(config.model.merger, dict) or hasattr(config.model.merger, 'num_tokens'):
    config.model.merger.before_block = 1
  config.input.image_size = min(config.input.image_size, 32)
  # A tiny stem of the config's depth, and the smallest patch that stem allows.
  stem_depth = len(config.model.conv_stem)
  config.model.conv_stem = (8,) * stem_depth
  config.model.variant = config.model.variant.split('/')[0] + f'/{max(4, 2 ** stem_depth)}'
  config.update(batch_size=4, total_steps=1, log_every=1, checkpoint_every=1)
  config.evals.test.every = 1
  config.input.shuffle_buffer = 8
  config.mesh = dict(data=-1, fsdp=1)
  if config.dataset not in tfds.list_builders():  # e.g. imagenet21k, digits, folder:...
    config.dataset = 'mnist' if config.input.channels == 1 else 'imagenet2012'
  with tfds.testing.mock_data(num_examples=8):
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
    config.num_classes = builder.info.features['label'].num_classes  # The look-alike's.
    summary = loop.train_and_evaluate(config, str(tmp_path), builder)
  assert summary['step'] == 1
  assert np.isfinite(summary['train/loss']) and 0 <= summary['test/accuracy'] <= 1
  records = metrics.read_metrics(str(tmp_path))
  assert any('test/accuracy' in r for r in records)
  assert os.path.isdir(tmp_path / 'checkpoints' / '1')


def test_training_reduces_loss_and_writes_metrics(tmp_path):
  config = tiny.tiny_config(total_steps=30, **{'evals.test.every': 30}, checkpoint_every=30)
  config.lr.warmup_steps = 5
  summary = tiny.run(str(tmp_path), config)
  losses = _losses(str(tmp_path))
  assert sorted(losses) == list(range(1, 31))
  # Mock labels are random, so the model can only memorise: loss must still fall.
  assert np.mean([losses[s] for s in range(26, 31)]) < np.mean([losses[s] for s in range(1, 6)])
  assert summary['step'] == 30 and 'test/accuracy' in summary
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path))


def test_resume_continues_and_reproduces_the_uninterrupted_run(tmp_path):
  config = tiny.tiny_config()
  full = tiny.run(str(tmp_path / 'full'), config)
  full_losses = _losses(str(tmp_path / 'full'))
  # Stop after step 3: a run of the same config whose latest checkpoint is step 3.
  stopped = tmp_path / 'stopped'
  tiny.run(str(stopped), config)
  import shutil
  shutil.rmtree(stopped / 'checkpoints' / '6')
  os.remove(stopped / 'metrics.jsonl')
  resumed = tiny.run(str(stopped), config)
  resumed_losses = _losses(str(stopped))
  assert sorted(resumed_losses) == [4, 5, 6]  # It continued at step 4.
  for step in (4, 5, 6):
    assert resumed_losses[step] == full_losses[step], step
  assert resumed['test/accuracy'] == full['test/accuracy']


def _run_tiny_subprocess(workdir, devices, **overrides):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             PYTHONPATH=ROOT)
  args = [f'{k}={v}' for k, v in overrides.items()]
  result = subprocess.run([sys.executable, '-m', 'tests.tiny', str(workdir), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return _losses(str(workdir))


@pytest.mark.slow
def test_eight_devices_match_one_device(tmp_path):
  one = _run_tiny_subprocess(tmp_path / 'one', 1)
  eight = _run_tiny_subprocess(tmp_path / 'eight', 8)
  fsdp = _run_tiny_subprocess(tmp_path / 'fsdp', 8, **{'mesh.data': 2, 'mesh.fsdp': 4,
                                                        'mesh.fsdp_min_size': 64})
  assert sorted(one) == sorted(eight) == sorted(fsdp) == list(range(1, 7))
  # Same global batch; only the order of floating-point reductions differs.
  for step in one:
    assert abs(one[step] - eight[step]) < 1e-4, (step, one[step], eight[step])
    assert abs(one[step] - fsdp[step]) < 1e-4, (step, one[step], fsdp[step])
  # Sharding parameters 4 ways shrinks each device's train state.
  memory = {name: [r['memory/state_mib_per_device'] for r in metrics.read_metrics(
      str(tmp_path / name)) if 'memory/state_mib_per_device' in r][0] for name in ('eight', 'fsdp')}
  assert memory['fsdp'] < 0.5 * memory['eight'], memory
  # A checkpoint written by 8 devices, parameters sharded 4 ways, loads as weights
  # (init_from, export) in this 1-device process.
  from patchmerger.checkpoints import loading
  sharded, _ = loading.load(str(tmp_path / 'fsdp'))
  replicated, _ = loading.load(str(tmp_path / 'eight'))
  assert sharded.keys() == replicated.keys()
  for key, value in sharded.items():  # The runs trained alike (losses within 1e-4).
    np.testing.assert_allclose(value, replicated[key], rtol=1e-3, atol=1e-4, err_msg=key)


def test_micro_batches_are_strided_so_every_device_feeds_each():
  batch = {'image': np.arange(8 * 2).reshape(8, 2), 'label': np.arange(8)}
  micro = step.split_micro_batches(batch, 4)
  assert micro['label'].tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
  np.testing.assert_array_equal(micro['image'][1], batch['image'][1::4])


_ACCUMULATION_HLO = """
import functools, sys, jax
from patchmerger.training import setup as setup_lib, sharding, step
from tests import tiny
config = tiny.tiny_config(batch_size=64, accum_steps=4)  # 8 rows per device, 2 per micro-batch.
model, mesh, shape, state, state_sharding, _ = setup_lib.setup(config, initialise=False)
data = sharding.batch_sharding(mesh)
batch = {'image': jax.ShapeDtypeStruct((64, *shape), 'float32', sharding=data),
         'label': jax.ShapeDtypeStruct((64,), 'int32', sharding=data)}
train_fn = jax.jit(functools.partial(step.train_step, loss='softmax_xent', label_smoothing=0.,
                                     accum_steps=4))
print(train_fn.lower(state, batch, jax.random.key(0)).compile().as_text())
"""


@pytest.mark.slow
def test_accumulation_on_eight_devices_gathers_no_batch():
  """Strided micro-batches: every device works on its own rows of each micro-batch.
  Contiguous ones made XLA all-gather the batch and repeat each micro-step 4 times."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, '-c', _ACCUMULATION_HLO], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'ENTRY' in result.stdout and 'all-gather' not in result.stdout


def test_gradient_accumulation_matches_full_batch(tmp_path):
  plain = tiny.run(str(tmp_path / 'plain'), tiny.tiny_config(total_steps=3))
  accum = tiny.run(str(tmp_path / 'accum'), tiny.tiny_config(total_steps=3, accum_steps=4))
  a, b = _losses(str(tmp_path / 'plain')), _losses(str(tmp_path / 'accum'))
  for step in a:
    assert abs(a[step] - b[step]) < 1e-5, step
  assert abs(plain['train/param_norm'] - accum['train/param_norm']) < 1e-4


@pytest.mark.parametrize('overrides,message', [
    (dict(batch_size=15, accum_steps=2), 'not divisible by accum_steps'),
    (dict(accum_steps=32), 'not divisible by accum_steps'),
    (dict(total_steps=0), 'config.total_steps must be an integer >= 1, got 0'),
    ({'mesh.data': 3}, 'does not fit'),
])
def test_bad_training_settings_fail_before_training(overrides, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    tiny.run(str(tmp_path), tiny.tiny_config(**overrides))


def test_evaluate_checkpoint_reproduces_final_test_metrics(tmp_path):
  config = tiny.tiny_config(total_steps=3)
  summary = tiny.run(str(tmp_path), config)
  with tfds.testing.mock_data(num_examples=tiny.MOCK_EXAMPLES):
    builder = tfds.builder(config.dataset)
    results = evaluate.evaluate_checkpoint(config, str(tmp_path), builder,
                                           skip=('merge_pictures',))
  assert results['step'] == 3 and results['test/examples'] == tiny.MOCK_EXAMPLES
  assert results['test/accuracy'] == summary['test/accuracy']
  assert abs(results['test/loss'] - summary['test/loss']) < 1e-6


@pytest.mark.slow
def test_train_py_with_bf16_scan_and_remat_logs_utilisation(tmp_path):
  from patchmerger.data import local
  from tests.test_data import write_fashion_source
  source, data_dir, workdir = tmp_path / 'idx', tmp_path / 'tfds', tmp_path / 'run'
  source.mkdir()
  write_fashion_source(source, {'train': 64, 'test': 32}, seed=1, random_labels=True)
  local.prepare_fashion_mnist(str(data_dir), str(source))
  result = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/fashion_mnist.py:merger=4@2,steps=20',
       '--config.model.width=16', '--config.model.depth=4', '--config.model.mlp_dim=32',
       '--config.model.num_heads=2', '--config.batch_size=16', '--config.log_every=5',
       '--config.evals.test.every=20', '--config.checkpoint_every=20', '--config.input.shuffle_buffer=64',
       '--config.model.dtype=bfloat16', '--config.model.scan=True',
       '--config.model.remat_policy=full', '--config.optim.mu_dtype=bfloat16',
       f'--config.data_dir={data_dir}', f'--workdir={workdir}'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'JAX IS RUNNING ON CPU: model.dtype=bfloat16' in result.stderr  # The loud warning.
  assert 'Devices: cpu: 1 x cpu' in result.stderr
  records = [r for r in metrics.read_metrics(str(workdir)) if 'train/mfu' in r]
  assert [r['step'] for r in records] == [5, 10, 15, 20]
  for record in records:
    assert 0 < record['train/mfu'] < 1 and record['train/tflops_per_device'] > 0
    assert 0 <= record['train/input_wait_fraction'] < 1 and np.isfinite(record['train/loss'])
  # The checkpoint holds the scanned layout: two runs of blocks around the merger.
  from patchmerger.checkpoints import layouts, loading
  assert layouts.scanned_runs(loading.load_orbax_params(str(workdir))) == {0: 2, 2: 2}


def test_device_prefetch_keeps_order_and_reads_ahead():
  from patchmerger.training import sharding
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1})
  pulled = []

  def local_batches():
    for i in range(5):
      pulled.append(i)
      yield {'x': np.full((2, 3), i, np.float32)}
  batches = sharding.prefetch_to_device(local_batches(), sharding.batch_sharding(mesh), size=2)
  first = next(batches)
  assert pulled == [0, 1, 2]  # Two batches are on their way while the first is used.
  assert isinstance(first['x'], jax.Array) and float(first['x'][0, 0]) == 0
  assert [float(b['x'][0, 0]) for b in batches] == [1, 2, 3, 4]
