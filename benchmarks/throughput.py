r"""Throughput of plain ViTs against PatchMerger ViTs, side by side in one process.

  python benchmarks/throughput.py                                  # Ti/S/B/L-16 @224 + fmnist
  python benchmarks/throughput.py --variants=B/16 --mergers=none,8@1/2 --batch_size=8
  python benchmarks/throughput.py --variants=fmnist --json=/tmp/t.json --plot=/tmp/t.png

For each variant and merger setting: GFLOPs/image (XLA cost analysis), parameters,
inference and training-step images/second (median of --repeats timed runs after
a warm-up; compilation excluded and reported separately), XLA's memory estimate
of each executable, and the speedup against the plain model of the same variant
next to its FLOPs ratio. `fmnist` is the model of configs/fashion_mnist.py.
A merger setting is `none` or `M@FRACTION` (before block round(FRACTION x depth)).
"""
import functools
import json
import os
import statistics
import time
from fractions import Fraction
from typing import Optional, Sequence
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Repo imports.

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import common, fashion_mnist
from patchmerger import flops
from patchmerger.models import build_model, parse_variant
from patchmerger.training import state as state_lib, step

_VARIANTS = flags.DEFINE_list('variants', ['Ti/16', 'S/16', 'B/16', 'L/16', 'fmnist'],
                              'NAME/PATCH variants, or fmnist.')
_MERGERS = flags.DEFINE_list('mergers', ['none', '4@1/2', '8@1/2', '16@1/2', '8@1/4', '8@3/4'],
                             'none or M@FRACTION of the depth.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Image size of the NAME/PATCH variants.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Images per timed call.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats; the median is reported.')
_CALLS = flags.DEFINE_integer('calls', 2, 'Calls per timed repeat.')
_TRAIN = flags.DEFINE_boolean('train', True, 'Also time the training step (AdamW).')
_HF = flags.DEFINE_boolean('hf_reference', True, 'Time Hugging Face transformers\' PyTorch '
                           'ViT on the same weights beside each plain NAME/PATCH model.')
_JSON = flags.DEFINE_string('json', None, 'Write one JSON record per row here.')
_PLOT = flags.DEFINE_string('plot', None, 'Write a PNG (speedup vs FLOPs ratio) here.')


def model_config(variant: str, merger: str, reducer: Optional[dict] = None):
  """(model config, image shape, num classes) of a benchmark row; `reducer`
  updates `model.reducer` (e.g. {'kind': 'tome', 'r': 8})."""
  if variant == 'fmnist':
    config = fashion_mnist.get_config()
    model = config.model
    depth = model.depth
    shape = (config.input.image_size,) * 2 + (config.input.channels,)
    classes = config.num_classes
  else:
    model = common.model_config(variant, 'none', classifier='gap')
    depth = parse_variant(variant)['depth']
    shape, classes = (_IMAGE_SIZE.value, _IMAGE_SIZE.value, 3), 1000
  if merger == 'none':
    model.merger = None
  else:
    tokens, _, fraction = merger.partition('@')
    block = round(Fraction(fraction or '1/2') * depth)
    model.merger = dict(num_tokens=int(tokens), before_block=min(max(block, 0), depth - 1))
  model.reducer.update(reducer or {})
  return model, shape, classes


def _median_rate(fn, batch: int, repeats: int, calls: int) -> float:
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn()
    jax.block_until_ready(out)
    rates.append(calls * batch / (time.perf_counter() - start))
  return statistics.median(rates)


def _memory_mib(compiled) -> float:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return float('nan')
  total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           + analysis.temp_size_in_bytes)
  return total / 2 ** 20


def measure(variant: str, merger: str, batch: int, repeats: int, calls: int,
            train: bool, reducer: Optional[dict] = None,
            hf: Optional[bool] = None) -> dict:
  """One row: cost, size and speed of one model (`hf`: time the transformers
  reference beside a plain model; None: the --hf_reference flag)."""
  model_cfg, shape, classes = model_config(variant, merger, reducer)
  model = build_model(model_cfg, classes)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((batch, *shape), np.float32))
  params = jax.jit(model.init)(jax.random.key(0), images[:1])['params']

  forward = jax.jit(lambda p, x: model.apply({'params': p}, x))
  start = time.perf_counter()
  compiled = forward.lower(params, images).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(params, images))  # Warm-up.
  row = dict(variant=variant, merger=merger, image_size=shape[0], batch_size=batch,
             mergers=list(model.mergers), reducer=model.reducer,
             tome_r=list(model.tome_r), gflops=flops.measured_gflops(model, shape),
             params=flops.count_params(params)['total'], compile_s=compile_s,
             infer_mem_mib=_memory_mib(compiled),
             infer_img_s=_median_rate(lambda: compiled(params, images), batch, repeats, calls))
  plain = merger == 'none' and model.reducer in ('patchmerger', 'none') and not model.tome_r
  if (_HF.value if hf is None else hf) and plain and variant != 'fmnist':
    row.update(hf_reference(model, params, images, batch, repeats, calls))
  if train:
    config = fashion_mnist.get_config()
    state = state_lib.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=state_lib.make_optimizer(config))
    batch_data = {'image': images, 'label': jnp.asarray(rng.integers(0, classes, batch))}
    train_step = jax.jit(functools.partial(step.train_step, loss='softmax_xent',
                                           label_smoothing=0., accum_steps=1))
    compiled_step = train_step.lower(state, batch_data, jax.random.key(1)).compile()
    row['train_mem_mib'] = _memory_mib(compiled_step)
    key = jax.random.key(1)
    jax.block_until_ready(compiled_step(state, batch_data, key))
    # The same state each call: timing the step, not the optimizer's trajectory.
    row['train_img_s'] = _median_rate(lambda: compiled_step(state, batch_data, key), batch,
                                      repeats, calls)
  return row


def hf_reference(model, params, images, batch: int, repeats: int, calls: int) -> dict:
  """The same forward pass in transformers' ViTForImageClassification (PyTorch,
  CPU threads = cores), on the same weights; {} when torch is not installed."""
  try:
    import torch
    from patchmerger.checkpoints import export
  except ImportError:
    return {}
  if model.classifier != 'token' or model.conv_stem or model.representation_size:
    token_model = model.clone(classifier='token')  # HF's ViT reads the class token.
    params = jax.jit(token_model.init)(jax.random.key(0), images[:1])['params']
    model = token_model
  reference = export.transformers_model(params)
  pixels = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
  ours = jax.jit(lambda p, x: model.apply({'params': p}, x))
  jax.block_until_ready(ours(params, images))
  torch.set_num_threads(os.cpu_count())
  with torch.inference_mode():
    reference(pixel_values=pixels)  # Warm-up.
    hf_rate = _median_rate(lambda: reference(pixel_values=pixels).logits, batch, repeats, calls)
  ours_rate = _median_rate(lambda: ours(params, images), batch, repeats, calls)
  return {'hf_infer_img_s': hf_rate, 'ours_token_infer_img_s': ours_rate,
          'ours_vs_hf': ours_rate / hf_rate}


def add_ratios(rows: list[dict]) -> list[dict]:
  """Speedups and FLOPs ratios against the plain (`none`) row of each variant."""
  plain = {r['variant']: r for r in rows if r['merger'] == 'none'}
  for row in rows:
    base = plain.get(row['variant'])
    row['flops_ratio'] = base['gflops'] / row['gflops'] if base else None
    row['speedup_infer'] = row['infer_img_s'] / base['infer_img_s'] if base else None
    if base and 'train_img_s' in row:
      row['speedup_train'] = row['train_img_s'] / base['train_img_s']
  return rows


COLUMNS = ('variant', 'merger', 'gflops', 'params', 'flops_ratio', 'infer_img_s',
           'speedup_infer', 'train_img_s', 'speedup_train', 'compile_s', 'infer_mem_mib',
           'hf_infer_img_s', 'ours_vs_hf')


def markdown(rows: list[dict], columns: Sequence[str] = COLUMNS) -> str:
  def cell(value):
    if value is None:
      return '-'
    if isinstance(value, float):
      return f'{value:.3g}' if abs(value) < 1000 else f'{value:,.0f}'
    return f'{value:,}' if isinstance(value, int) else str(value)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(r.get(c)) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  merged = [r for r in rows if r['merger'] != 'none' and r['flops_ratio']]
  for variant in dict.fromkeys(r['variant'] for r in rows):
    mine = [r for r in merged if r['variant'] == variant]
    left.scatter([r['flops_ratio'] for r in mine], [r['speedup_infer'] for r in mine],
                 label=variant)
    ours = [r for r in rows if r['variant'] == variant]
    right.plot([r['merger'] for r in ours], [r['infer_img_s'] for r in ours], 'o-',
               label=variant)
  top = max([r['flops_ratio'] for r in merged] + [1.0])
  left.plot([1, top], [1, top], 'k--', lw=0.8, label='speedup = FLOPs ratio')
  left.set(xlabel='FLOPs ratio (plain / merger)', ylabel='inference speedup')
  right.set(xlabel='merger', ylabel='inference images / second', yscale='log')
  for axis in (left, right):
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
  fig.suptitle(f'{jax.devices()[0].device_kind}, batch {rows[0]["batch_size"]}')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  print(f'JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, '
        f'batch {_BATCH.value}', flush=True)
  rows = []
  for variant in _VARIANTS.value:
    for merger in _MERGERS.value:
      rows.append(measure(variant, merger, _BATCH.value, _REPEATS.value, _CALLS.value,
                          _TRAIN.value))
      print(f'  {variant} {merger}: {rows[-1]["infer_img_s"]:.1f} img/s', flush=True)
  add_ratios(rows)
  print(markdown(rows))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(rows, f, indent=2)
  if _PLOT.value:
    plot(rows, _PLOT.value)


if __name__ == '__main__':
  app.run(main)
