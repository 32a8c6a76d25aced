"""Two real processes on localhost (jax.distributed + gloo), each with its own two
CPU devices and its own data shard, train together through train.py."""
import glob
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from patchmerger.data import local
from patchmerger.training import metrics
from tests.test_data import write_fashion_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = ['--config=configs/fashion_mnist.py:merger=4@1,steps=6', '--config.model.width=16',
              '--config.model.depth=2', '--config.model.mlp_dim=32', '--config.model.num_heads=2',
              '--config.batch_size=16', '--config.log_every=1', '--config.evals.test.every=6',
              '--config.checkpoint_every=3', '--config.keep_checkpoints=5',
              '--config.input.shuffle_buffer=64', '--config.input.num_shards=2']
# What makes train.py join a cluster; each run below sets its own, or none.
DISTRIBUTED_SETTINGS = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')
LOGGED_LOSS = re.compile(r'\[(\d+)\] .*train/loss=([-+\d.e]+)')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A small Fashion-MNIST look-alike prepared as TFDS `fashion_mnist`."""
  source = tmp_path_factory.mktemp('idx')
  write_fashion_source(source, {'train': 64, 'test': 32}, seed=1, random_labels=True)
  data_dir = tmp_path_factory.mktemp('tfds')
  local.prepare_fashion_mnist(str(data_dir), str(source))
  return str(data_dir)


def _env(devices, **extra):
  env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_SETTINGS}
  return dict(env, PYTHONPATH=ROOT,
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', **extra)


def _single(script, workdir, data_dir):
  result = subprocess.run([sys.executable, script, *TINY_FLAGS, f'--workdir={workdir}',
                           f'--config.data_dir={data_dir}'], cwd=ROOT, env=_env(1),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _two_processes(workdir, data_dir):
  """Runs train.py as processes 0 and 1; returns each one's logged losses."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  processes = [subprocess.Popen(
      [sys.executable, 'train.py', *TINY_FLAGS, f'--workdir={workdir}',
       f'--config.data_dir={data_dir}'], cwd=ROOT, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      env=_env(2, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(i))) for i in (0, 1)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  for _, stderr in outputs:
    assert 'process 0 of 2' in stderr or 'process 1 of 2' in stderr
  return [{int(s): float(v) for s, v in LOGGED_LOSS.findall(stderr)} for _, stderr in outputs]


def _losses(workdir):
  return {r['step']: r['train/loss'] for r in metrics.read_metrics(str(workdir))
          if 'train/loss' in r}


@pytest.mark.slow
def test_two_processes_train_like_one_and_share_checkpoints(tmp_path, data_dir):
  single = tmp_path / 'single'
  _single('train.py', single, data_dir)
  reference = _losses(single)
  assert sorted(reference) == list(range(1, 7))

  # Two processes x 2 devices, same global batch and data shards.
  together = tmp_path / 'together'
  logged = _two_processes(together, data_dir)
  assert logged[0] == logged[1] and sorted(logged[0]) == list(range(1, 7))
  # Only process 0 writes metrics: one TensorBoard file, each step logged once.
  assert len(glob.glob(str(together / 'events.out.tfevents*'))) == 1
  train_steps = [r['step'] for r in metrics.read_metrics(str(together)) if 'train/loss' in r]
  assert train_steps == list(range(1, 7))
  both = _losses(together)
  for step in reference:  # Same batch; only the order of reductions differs.
    assert abs(both[step] - reference[step]) < 1e-4, (step, both[step], reference[step])

  # Their checkpoint restores in one process ...
  stdout = _single('eval.py', together, data_dir)
  final = [r for r in metrics.read_metrics(str(together)) if 'test/accuracy' in r][-1]
  assert re.search(rf'test accuracy +{final["test/accuracy"]:.4f}', stdout), stdout

  # ... and two processes resume a single-process checkpoint.
  resumed = tmp_path / 'resumed'
  shutil.copytree(single, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '6')
  logged = _two_processes(resumed, data_dir)
  assert sorted(logged[0]) == sorted(logged[1]) == [4, 5, 6]
  for step in (4, 5, 6):
    assert abs(_losses(resumed)[step] - reference[step]) < 1e-4, step
