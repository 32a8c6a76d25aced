"""Utilisation: FLOPs from XLA's cost analysis, peaks, MFU, input waits, device summary."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist
from patchmerger import flops
from patchmerger.models import build_model
from patchmerger.training import state as state_lib, step, utilisation


def _config():
  """The default config at a tiny width (tests/tiny.py's, without TensorFlow)."""
  config = fashion_mnist.get_config('merger=4@1')
  config.model.update(width=16, depth=2, mlp_dim=32, num_heads=2, conv_stem=())
  config.batch_size = 16
  return config


def _tiny():
  """tests/tiny.py, or a skip where TensorFlow is missing (GPU machines): the rest
  of this file runs there too."""
  pytest.importorskip('tensorflow_datasets')
  from tests import tiny
  return tiny


def test_mfu_arithmetic_on_a_known_matmul():
  m, k, n = 64, 128, 32
  a, b = jnp.ones((m, k)), jnp.ones((k, n))
  matmul_flops = flops.cost_flops(jax.jit(jnp.matmul).lower(a, b).compile())
  assert matmul_flops == 2 * m * k * n
  # Before compilation, lowered for the host CPU: the same count on any device.
  assert flops.lowered_flops(jnp.matmul, a, b) == matmul_flops
  # 1,000 such matmuls in 0.5 s on a 0.5 TFLOP/s device.
  result = utilisation.utilisation(matmul_flops, steps=1000, seconds=0.5, peak=0.5, input_wait=0.1)
  assert result['train/tflops_per_device'] == pytest.approx(1000 * 2 * m * k * n / 0.5 / 1e12)
  assert result['train/mfu'] == pytest.approx(result['train/tflops_per_device'] / 0.5)
  assert result['train/input_wait_fraction'] == pytest.approx(0.2)


def test_lowered_flops_compile_on_the_device_without_a_cpu_backend(monkeypatch):
  """JAX_PLATFORMS=cuda leaves no host CPU backend to lower for: the count then
  comes from the computation compiled on the device, and is the same."""
  a, b = jnp.ones((64, 128)), jnp.ones((128, 32))
  expected = flops.lowered_flops(jnp.matmul, a, b)
  local_devices = jax.local_devices

  def no_cpu(*args, backend=None, **kwargs):
    if backend == 'cpu':
      raise RuntimeError('Unknown backend cpu')
    return local_devices(*args, backend=backend, **kwargs)

  monkeypatch.setattr(jax, 'local_devices', no_cpu)
  assert flops.lowered_flops(jnp.matmul, a, b) == expected == 2 * 64 * 128 * 32


@pytest.mark.parametrize('kind,peak', [
    ('NVIDIA H100 80GB HBM3', 989.), ('NVIDIA H100 PCIe', 756.), ('NVIDIA H200', 989.),
    ('NVIDIA A100-SXM4-80GB', 312.), ('TPU v4', 275.), ('TPU v5 lite', 197.),
    ('TPU v5p', 459.), ('TPU v5', 459.), ('cpu', None)])
def test_peak_table(kind, peak):
  assert utilisation.table_peak_tflops(kind) == peak


def test_peak_is_the_tables_or_measured_on_cpu():
  peak, source = utilisation.peak_tflops()
  if jax.default_backend() == 'cpu':
    assert source.startswith('measured') and 1e-4 < peak < 100
  else:
    assert source.startswith('table') and peak > 100, source


def test_train_step_flops_are_the_compiled_steps_and_ignore_accumulation():
  config = _config()
  model = build_model(config.model, config.num_classes)
  shape = (config.input.image_size, config.input.image_size, config.input.channels)
  counted = utilisation.train_step_flops(model, config, shape)
  state = jax.eval_shape(functools.partial(state_lib.create_state, model, config,
                                           image_shape=shape), jax.random.key(0))
  with jax.default_device(jax.local_devices(backend='cpu')[0]):  # As train_step_flops.
    batch = {'image': jnp.zeros((config.batch_size, *shape)),
             'label': jnp.zeros((config.batch_size,), jnp.int32)}
    compiled = jax.jit(functools.partial(step.train_step, loss=config.loss, label_smoothing=0.1,
                                         accum_steps=1)).lower(state, batch, jax.random.key(0))
  # Before and after XLA's optimisation: 3% apart at this tiny width, where
  # elementwise work dominates; 0.05% for ViT-S/16, where matmuls do.
  assert counted == pytest.approx(flops.cost_flops(compiled.compile()), rel=5e-2)
  # XLA counts a loop body once; the count must not drop with accumulation.
  config.accum_steps = 4
  assert utilisation.train_step_flops(model, config, shape) == counted


def test_device_summary_and_cpu_warnings():
  summary = utilisation.device_summary()
  assert summary.startswith(f'{jax.default_backend()}: {jax.device_count()} x ')
  config = _config()
  assert utilisation.cpu_warnings(config) == []
  config.model.dtype, config.distributed = 'bfloat16', 'True'
  warnings = utilisation.cpu_warnings(config)
  if jax.default_backend() == 'cpu':
    assert len(warnings) == 2 and 'bfloat16' in warnings[0] and 'cluster' in warnings[1]
  else:
    assert warnings == []


def test_input_timer_counts_time_blocked_in_next():
  import time

  def slow():
    while True:
      time.sleep(0.02)
      yield 1

  timer = utilisation.InputTimer(slow())
  assert [next(timer) for _ in range(3)] == [1, 1, 1]
  assert 0.05 < timer.waited < 1.0


def test_a_tiny_bf16_run_logs_utilisation(tmp_path):
  from patchmerger.training import metrics
  tiny = _tiny()
  config = tiny.tiny_config(total_steps=4, **{'evals.test.every': 4}, checkpoint_every=4)
  config.model.dtype = 'bfloat16'
  config.optim.mu_dtype = 'bfloat16'
  summary = tiny.run(str(tmp_path), config)
  assert np.isfinite(summary['train/loss'])
  records = [r for r in metrics.read_metrics(str(tmp_path)) if 'train/mfu' in r]
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  for record in records[1:]:  # Step 1 compiles and is not timed.
    assert 0 < record['train/mfu'] < 1 and record['train/tflops_per_device'] > 0
    assert 0 <= record['train/input_wait_fraction'] < 1
