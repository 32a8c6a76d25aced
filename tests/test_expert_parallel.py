"""Experts split over the mesh's `expert` axis, on eight forced CPU devices: weights
sharded by expert, buffers moved by all-to-all, the same numbers as one device, and
checkpoints that restore across expert-axis sizes."""
import os
import shutil
import subprocess
import sys

import pytest

from patchmerger.training import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARSE = {'model.moe.kind': 'sparse', 'model.moe.num_experts': 8, 'model.moe.layers': 'every1',
          'model.moe.group_images': 2}

_COMPILED_STEP = """
import jax, re
from jax.sharding import PartitionSpec as P
from patchmerger.training import loop, setup as setup_lib, sharding
from tests import tiny
for kind, expert in (('sparse', 4), ('soft', 8)):
  config = tiny.tiny_config(**{'model.moe.kind': kind, 'model.moe.num_experts': 8,
                               'model.moe.layers': 'every1', 'model.moe.group_images': 2})
  config.mesh = dict(data=-1, fsdp=1, expert=expert)
  run = setup_lib.setup(config, initialise=False)
  for path, leaf in jax.tree_util.tree_flatten_with_path(run.state.params)[0]:
    if sharding.is_expert_weight(path):
      assert leaf.sharding.spec[0] == 'expert', (path, leaf.sharding.spec)
      print('sharded', kind, jax.tree_util.keystr(path))
  data = sharding.batch_sharding(run.mesh)
  batch = {'image': jax.ShapeDtypeStruct((16, *run.image_shape), 'float32', sharding=data),
           'label': jax.ShapeDtypeStruct((16,), 'int32', sharding=data)}
  text = loop.compile_train_step(config, run).lower(
      run.state, batch, jax.random.key(0)).compile().as_text()
  print(kind, expert, 'all-to-all', len(re.findall(r' all-to-all\\(', text)),
        'all-gather', len(re.findall(r' all-gather(-start)?\\(', text)))
"""


def _env(devices):
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              PYTHONPATH=ROOT)


def _train(workdir, devices, **overrides):
  args = [f'{k}={v}' for k, v in (SPARSE | overrides).items()]
  result = subprocess.run([sys.executable, '-m', 'tests.tiny', str(workdir), *args], cwd=ROOT,
                          env=_env(devices), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  records = metrics.read_metrics(str(workdir))
  losses = {r['step']: r['train/loss'] for r in records if 'train/loss' in r}
  tests = {r['step']: r['test/accuracy'] for r in records if 'test/accuracy' in r}
  return losses, tests


@pytest.mark.slow
def test_compiled_step_moves_buffers_by_all_to_all_and_gathers_nothing():
  result = subprocess.run([sys.executable, '-c', _COMPILED_STEP], cwd=ROOT, env=_env(8),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  # Both MoE blocks' Dense_{0,1} kernels and biases, for each kind.
  assert sum(line.startswith('sharded sparse') for line in lines) == 8
  assert sum(line.startswith('sharded soft') for line in lines) == 8
  for kind, expert in (('sparse', 4), ('soft', 8)):
    counts = next(line.split() for line in lines if line.startswith(f'{kind} {expert} '))
    # Two MoE layers, each: dispatch and combine forward and again in the backward pass.
    assert int(counts[3]) >= 4, counts
    assert int(counts[5]) == 0, counts  # No all-gather of tokens, gates or experts.


@pytest.mark.slow
def test_expert_axes_train_like_one_device_and_restore_across_sizes(tmp_path):
  one, one_tests = _train(tmp_path / 'one', 1)
  eight, eight_tests = _train(tmp_path / 'eight', 8, **{'mesh.expert': 8})
  assert sorted(one) == sorted(eight) == list(range(1, 7))
  for step in one:  # Same batches and routing noise; only reduction order differs.
    assert abs(one[step] - eight[step]) < 1e-4, (step, one[step], eight[step])
  assert one_tests.keys() == eight_tests.keys() and one_tests
  for step in one_tests:
    assert abs(one_tests[step] - eight_tests[step]) <= 1 / 96, step  # One mock example.
  # Experts split 4 ways (data 2 ways); then, from its checkpoint of step 3, 8 ways.
  split = tmp_path / 'split'
  four, _ = _train(split, 8, **{'mesh.expert': 4})
  for step in one:
    assert abs(one[step] - four[step]) < 1e-4, (step, one[step], four[step])
  shutil.rmtree(split / 'checkpoints' / '6')
  os.remove(split / 'metrics.jsonl')
  resumed, _ = _train(split, 8, **{'mesh.expert': 8})
  assert sorted(resumed) == [4, 5, 6]  # It continued from the checkpoint of step 3.
  for step in resumed:
    assert abs(resumed[step] - eight[step]) < 1e-4, (step, resumed[step], eight[step])
