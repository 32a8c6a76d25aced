"""How well a run uses its hardware: device summary, peak FLOP/s, MFU, input waits.

MFU = the model FLOPs of one train step per device (XLA's cost analysis of the
step, `train_step_flops`) x steps per second / the device's peak.
Peaks are the vendors' dense bfloat16 figures per chip; on CPU, where no table
entry makes sense, the peak is a float32 matmul measured once at start.
"""
import functools
import logging
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp

from patchmerger import flops
from patchmerger.training import sharding, state as state_lib, step

# Dense bfloat16 TFLOP/s per chip, matched against jax's `device_kind` (lower
# case) in this order: the first matching entry wins.
PEAK_TFLOPS = (
    ('h100 pcie', 756.),
    ('h100', 989.),       # SXM (device_kind 'NVIDIA H100 80GB HBM3') and NVL-class
    ('h200', 989.),       # Same tensor cores as the H100 SXM, more and faster memory
    ('a100', 312.),
    ('tpu v4', 275.),
    ('tpu v5 lite', 197.),  # v5e
    ('tpu v5e', 197.),
    ('tpu v5p', 459.),
    ('tpu v5', 459.),     # v5p reports itself as 'TPU v5' on older runtimes
    ('tpu v6 lite', 918.),  # v6e (Trillium)
)


def table_peak_tflops(device_kind: str) -> Optional[float]:
  """The table's peak for a device kind, or None when it has no entry."""
  kind = device_kind.lower()
  return next((peak for key, peak in PEAK_TFLOPS if key in kind), None)


@functools.lru_cache(maxsize=None)
def measured_peak_tflops(size: int = 1024, repeats: int = 5) -> float:
  """Best float32 matmul rate of the default device, in TFLOP/s (about 0.1 s on CPU)."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best / 1e12


def peak_tflops(device: Optional[jax.Device] = None) -> tuple[float, str]:
  """(peak TFLOP/s per device, where it comes from) of `device` (default: the first local one)."""
  device = device or jax.local_devices()[0]
  peak = table_peak_tflops(device.device_kind)
  if peak is not None:
    return peak, f'table: {device.device_kind} dense bf16'
  return measured_peak_tflops(), f'measured: f32 matmul on {device.device_kind}'


def train_step_flops(model: Any, config: Any, image_shape: tuple[int, ...]) -> float:
  """Model FLOPs of one train step per device: XLA's cost analysis of the step
  on the whole batch, lowered (not compiled) for the host CPU
  (`flops.lowered_flops`), divided by the device count.

  Counted without gradient accumulation and on `flops.counted_model(model)`: the
  FLOPs the model needs, not those a loop hides or a recomputation adds (MFU,
  not hardware FLOPs utilisation). For a loop-free step this is the compiled
  step's count (ViT-S/16 at batch 8: 115.61 against 115.67 GFLOPs).
  """
  model = flops.counted_model(model)
  create = functools.partial(state_lib.create_state, model, config, image_shape=image_shape)
  state = jax.eval_shape(create, jax.random.key(0))
  batch = {'image': jax.ShapeDtypeStruct((config.batch_size, *image_shape), jnp.float32),
           'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
  train_step = functools.partial(step.train_step, loss=config.loss,
                                 label_smoothing=config.label_smoothing, accum_steps=1)
  return flops.lowered_flops(train_step, state, batch, jax.random.key(0)) / jax.device_count()


def utilisation(flops_per_step: float, steps: int, seconds: float, peak: float,
                input_wait: float = 0.0) -> dict:
  """`train/tflops_per_device` and `train/mfu` of `steps` steps of `flops_per_step`
  FLOPs per device in `seconds`, against `peak` TFLOP/s; `train/input_wait_fraction`:
  the share of those seconds spent waiting for input."""
  seconds = max(seconds, 1e-9)
  achieved = flops_per_step * steps / seconds / 1e12
  return {'train/tflops_per_device': achieved, 'train/mfu': achieved / peak,
          'train/input_wait_fraction': input_wait / seconds}


def device_summary() -> str:
  """One line: backend, device kind and count, memory per device where known."""
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  Some backends do not report it.
    stats = {}
  limit = stats.get('bytes_limit')
  memory = f', {limit / 2 ** 30:.1f} GiB per device' if limit else ''
  return (f'{jax.default_backend()}: {jax.device_count()} x {device.device_kind} '
          f'({jax.local_device_count()} local, {jax.process_count()} processes){memory}')


def cpu_warnings(config: Any) -> list[str]:
  """What the config asks for that a CPU-only JAX cannot give."""
  if jax.default_backend() != 'cpu':
    return []
  warnings = []
  if config.model.get('dtype', 'float32') != 'float32':
    warnings.append(f'model.dtype={config.model.dtype} runs emulated and slow on CPU')
  if sharding.parse_distributed(config.get('distributed', 'auto')) is True:
    warnings.append('distributed=True asks for a cluster of accelerators')
  return warnings


def log_start(config: Any) -> float:
  """Logs the device summary and the peak, warns loudly about accelerator settings
  on a CPU; returns the peak TFLOP/s per device used for `train/mfu`."""
  logging.info('Devices: %s', device_summary())
  for warning in cpu_warnings(config):
    banner = '!' * 78
    logging.warning('\n%s\nJAX IS RUNNING ON CPU: %s. Install the CUDA or TPU jax '
                    '(README, "GPUs and TPUs") or use a CPU config.\n%s', banner, warning,
                    banner)
  if config.model.get('remat_policy', 'none') != 'none' and not config.model.get('scan'):
    logging.warning('model.remat_policy=%s without model.scan: XLA may place the recomputed '
                    'blocks together and save no memory (README, "GPUs and TPUs"); set '
                    'model.scan=True too.', config.model.remat_policy)
  peak, source = peak_tflops()
  logging.info('Peak %.1f TFLOP/s per device (%s)', peak, source)
  return peak


class InputTimer:
  """Seconds spent blocked on the input iterator, as a share of wall time."""

  def __init__(self, iterator: Any):
    self._iterator, self.waited = iterator, 0.0

  def __iter__(self) -> 'InputTimer':
    return self

  def __next__(self) -> Any:
    start = time.perf_counter()
    try:
      return next(self._iterator)
    finally:
      self.waited += time.perf_counter() - start
