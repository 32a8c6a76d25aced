r"""Throughput of plain ViTs against PatchMerger ViTs, side by side in one process.

  python -m benchmarks.throughput                                  # Ti/S/B/L-16 @224 + fmnist
  python -m benchmarks.throughput --variants=B/16 --mergers=none,8@1/2 --batch_sizes=8
  python -m benchmarks.throughput --variants=B/16 --dtype=bfloat16 --batch_sizes=64,128,256 \
      --merger_batches=best --json=/tmp/t.json --markdown=/tmp/t.md  # on a GPU
  python -m benchmarks.throughput --report=/tmp/a.json,/tmp/b.json  # tables of saved rows

For each variant, merger setting and batch size: GFLOPs/image (XLA cost analysis),
parameters, inference and training-step images/second (median of --repeats timed
runs after a warm-up; compilation excluded and reported separately), XLA's memory
estimate of each executable, MFU against the device's peak, and the speedup
against the plain model of the same variant and batch next to its FLOPs ratio.
`fmnist` is the model of configs/fashion_mnist.py. A merger setting is `none` or
`M@FRACTION` (before block round(FRACTION x depth)). Needs no TensorFlow.
"""
import functools
import itertools
import json
import os
import statistics
import time
from fractions import Fraction
from typing import Optional, Sequence


import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from configs import common, fashion_mnist
from patchmerger import flops
from patchmerger.models import build_model, parse_variant
from patchmerger.training import state as state_lib, step, utilisation

_VARIANTS = flags.DEFINE_list('variants', ['Ti/16', 'S/16', 'B/16', 'L/16', 'fmnist'],
                              'NAME/PATCH variants, or fmnist.')
_MERGERS = flags.DEFINE_list('mergers', ['none', '4@1/2', '8@1/2', '16@1/2', '8@1/4', '8@3/4'],
                             'none or M@FRACTION of the depth.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Image size of the NAME/PATCH variants.')
_BATCHES = flags.DEFINE_list('batch_sizes', ['8'], 'Images per timed call; one row each.')
flags.DEFINE_alias('batch_size', 'batch_sizes')
_MERGER_BATCHES = flags.DEFINE_enum(
    'merger_batches', 'all', ['all', 'best'],
    'best: time merger models only at the batch where the plain model trained fastest.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Compute dtype (parameters stay float32).')
_ATTENTION = flags.DEFINE_list('attention', [], "Attention implementations, one row each: "
                                'xla, cudnn or auto (empty: the model default).')
_REMAT = flags.DEFINE_string('remat', None, "Rematerialisation policy of the blocks: none, "
                             "full or a jax.checkpoint_policies name (default: the model's).")
_SCAN = flags.DEFINE_boolean('scan', None, "Scan runs of blocks (default: the model's).")
_CLASSIFIER = flags.DEFINE_enum('classifier', 'gap', ['gap', 'token'],
                                'Head of the NAME/PATCH variants.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats; the median is reported.')
_CALLS = flags.DEFINE_integer('calls', 2, 'Calls per timed repeat.')
_TRAIN = flags.DEFINE_boolean('train', True, 'Also time the training step (AdamW).')
_HF = flags.DEFINE_boolean('hf_reference', True, 'Time Hugging Face transformers\' PyTorch '
                           'ViT on the same weights beside each plain NAME/PATCH model.')
_HF_ONLY = flags.DEFINE_boolean('hf_only', False, 'Time only transformers\' models (run it in '
                                'its own process on a GPU, with JAX_PLATFORMS=cpu).')
_BUDGET = flags.DEFINE_float('budget_s', 0, 'Start no new row after this many seconds (0: none).')
_JSON = flags.DEFINE_string('json', None, 'Write one JSON record per row here (after every row).')
_MARKDOWN = flags.DEFINE_string('markdown', None, 'Write the Markdown tables here.')
_REPORT = flags.DEFINE_list('report', [], 'Only print the tables of these JSON files.')
_PLOT = flags.DEFINE_string('plot', None, 'Write a PNG (speedup vs FLOPs ratio) here.')


def model_config(variant: str, merger: str, reducer: Optional[dict] = None,
                 attention: Optional[str] = None):
  """(model config, image shape, num classes) of a benchmark row; `reducer`
  updates `model.reducer` (e.g. {'kind': 'tome', 'r': 8})."""
  if variant == 'fmnist':
    config = fashion_mnist.get_config()
    model = config.model
    depth = model.depth
    shape = (config.input.image_size,) * 2 + (config.input.channels,)
    classes = config.num_classes
  else:
    model = common.model_config(variant, 'none', classifier=_CLASSIFIER.value)
    depth = parse_variant(variant)['depth']
    shape, classes = (_IMAGE_SIZE.value, _IMAGE_SIZE.value, 3), 1000
  if merger == 'none':
    model.merger = None
  else:
    tokens, _, fraction = merger.partition('@')
    block = round(Fraction(fraction or '1/2') * depth)
    model.merger = dict(num_tokens=int(tokens), before_block=min(max(block, 0), depth - 1))
  model.reducer.update(reducer or {})
  model.dtype = _DTYPE.value
  options = dict(attention=attention, remat_policy=_REMAT.value, scan=_SCAN.value)
  for key, value in options.items():
    if value is not None:
      model[key] = value
  return model, shape, classes


def _check_options(model, model_cfg) -> None:
  """A row must not claim an option that this model does not have."""
  for key in ('attention', 'remat_policy', 'scan'):
    if key in model_cfg and getattr(model, key, None) != model_cfg[key]:
      raise ValueError(f'this model has no option {key}={model_cfg[key]!r}')


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


def _step_config(batch: int):
  """The optimizer and loss of the timed training step: AdamW, softmax xent."""
  config = fashion_mnist.get_config()
  config.update(batch_size=batch, loss='softmax_xent', label_smoothing=0.)
  return config


_COMPILED = {}  # (model, batch, shape) -> compiled_forward's result, for round-robin reuse.


def compiled_forward(model, batch: int, shape: Sequence[int], keep: bool = False) -> tuple:
  """(compiled forward pass, params, images, compile seconds) of `model` on a fixed
  batch of random images; the first call (warm-up) is done. With `keep`, the result
  is kept for the next call with the same model, batch and shape (flax modules are
  frozen dataclasses: equal configurations are equal keys)."""
  key = (model, batch, tuple(shape))
  if key in _COMPILED:
    return _COMPILED[key]
  images = jnp.asarray(np.random.default_rng(0).standard_normal((batch, *shape), np.float32))
  params = jax.jit(model.init)(jax.random.key(0), images[:1])['params']
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x))
  start = time.perf_counter()
  compiled = forward.lower(params, images).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(params, images))  # Warm-up.
  if keep:
    _COMPILED[key] = compiled, params, images, compile_s
  return compiled, params, images, compile_s


def measure(variant: str, merger: str, batch: int, repeats: int, calls: int,
            train: bool, reducer: Optional[dict] = None, hf: Optional[bool] = None,
            peak: Optional[float] = None, attention: Optional[str] = None,
            keep_compiled: bool = False) -> dict:
  """One row: cost, size and speed of one model at one batch size (`hf`: time the
  transformers reference beside a plain model; None: the --hf_reference flag;
  `peak`: TFLOP/s for the MFU columns, None: the device's; `keep_compiled`: keep the
  compiled forward pass for a later round-robin timing of the same model)."""
  peak = peak or utilisation.peak_tflops()[0]
  model_cfg, shape, classes = model_config(variant, merger, reducer, attention)
  model = build_model(model_cfg, classes)
  _check_options(model, model_cfg)
  compiled, params, images, compile_s = compiled_forward(model, batch, shape, keep_compiled)
  gflops = flops.forward_flops(model, shape) / 1e9
  infer = _median_rate(lambda: compiled(params, images), batch, repeats, calls)
  row = dict(variant=variant, merger=merger, image_size=shape[0], batch_size=batch,
             dtype=model_cfg.dtype, mergers=[list(m) for m in model.mergers],
             reducer=model.reducer, tome_r=list(model.tome_r), attention=model.attention,
             scan=model.scan, remat=model.remat_policy, gflops=gflops,
             params=flops.count_params(params)['total'], compile_s=compile_s,
             infer_mem_mib=_memory_mib(compiled), infer_img_s=infer,
             infer_mfu=infer * gflops / 1e3 / peak)
  del compiled
  if train:
    config = _step_config(batch)
    state = state_lib.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=state_lib.make_optimizer(config))
    labels = np.random.default_rng(0).integers(0, classes, batch)
    batch_data = {'image': images, 'label': jnp.asarray(labels)}
    train_step = jax.jit(functools.partial(step.train_step, loss='softmax_xent',
                                           label_smoothing=0., accum_steps=1))
    compiled_step = train_step.lower(state, batch_data, jax.random.key(1)).compile()
    row['train_mem_mib'] = _memory_mib(compiled_step)
    key = jax.random.key(1)
    jax.block_until_ready(compiled_step(state, batch_data, key))
    # The same state each call: timing the step, not the optimizer's trajectory.
    row['train_img_s'] = _median_rate(lambda: compiled_step(state, batch_data, key), batch,
                                      repeats, calls)
    row['train_gflops'] = utilisation.train_step_flops(model, config, shape) / batch / 1e9
    row['train_mfu'] = row['train_img_s'] * row['train_gflops'] / 1e3 / peak
    del compiled_step, state
  plain = merger == 'none' and model.reducer in ('patchmerger', 'none') and not model.tome_r
  if (_HF.value if hf is None else hf) and plain and variant != 'fmnist':
    row.update(hf_reference(model, params, images, batch, repeats, calls))
  return row


def _torch_matmul_tflops(size: int = 1024, repeats: int = 5) -> float:
  """Best float32 matmul rate of PyTorch on the CPU, as utilisation.measured_peak_tflops."""
  import torch
  a = torch.ones(size, size)
  a @ a
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best / 1e12


def hf_reference(model, params, images, batch: int, repeats: int, calls: int) -> dict:
  """transformers' ViTForImageClassification (PyTorch, SDPA attention) on the same
  weights and images: inference, and an AdamW training step when --train. On a
  CUDA device when torch sees one (bfloat16 autocast with --dtype=bfloat16, as
  ours: float32 parameters), else on all CPU threads; {} without torch."""
  try:
    import torch
    from patchmerger.checkpoints import export
  except ImportError:
    return {}
  # HF's ViT reads the class token; other heads are timed on a token twin of ours.
  twin = model.classifier != 'token' or model.conv_stem or model.representation_size
  if twin:
    model = model.clone(classifier='token', conv_stem=(), representation_size=None)
    params = jax.jit(model.init)(jax.random.key(0), images[:1])['params']
  reference = export.transformers_model(jax.device_get(params))
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  reference = reference.to(device)
  pixels = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy()).to(device)
  autocast = torch.autocast(device, dtype=torch.bfloat16,
                            enabled=_DTYPE.value == 'bfloat16')
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  torch.set_num_threads(os.cpu_count())

  def timed(fn):
    fn()  # Warm-up.
    sync()
    return _median_rate(lambda: (fn(), sync()), batch, repeats, calls)

  with torch.inference_mode(), autocast:
    hf_rate = timed(lambda: reference(pixel_values=pixels).logits)
  row = {'hf_device': device, 'hf_attention': reference.config._attn_implementation,
         'hf_infer_img_s': hf_rate}
  if device == 'cpu':  # Each library's own float32 matmul rate: most of a ViT's time.
    row.update(xla_matmul_tflops=utilisation.measured_peak_tflops(),
               torch_matmul_tflops=_torch_matmul_tflops())
  if twin:  # Ours, as a token model, for the same work.
    ours = jax.jit(lambda p, x: model.apply({'params': p}, x))
    jax.block_until_ready(ours(params, images))
    ours_rate = _median_rate(lambda: ours(params, images), batch, repeats, calls)
    row.update(ours_token_infer_img_s=ours_rate, ours_vs_hf=ours_rate / hf_rate)
  if _TRAIN.value:
    reference.train()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-4,
                                  **({'fused': True} if device == 'cuda' else {}))
    labels = torch.from_numpy(np.arange(batch) % reference.config.num_labels).to(device)

    def train_step():
      with autocast:
        loss = torch.nn.functional.cross_entropy(reference(pixel_values=pixels).logits, labels)
      loss.backward()
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)
      return loss

    row['hf_train_img_s'] = timed(train_step)
  return row


def add_ratios(rows: list[dict]) -> list[dict]:
  """Speedups and FLOPs ratios against the plain (`none`) row of each variant at the
  same batch size; ours against transformers' where both were timed."""
  plain = {(r['variant'], r['batch_size'], r.get('attention')): r for r in rows
           if r['merger'] == 'none' and 'infer_img_s' in r}
  for row in rows:
    if 'infer_img_s' not in row:
      continue
    base = plain.get((row['variant'], row['batch_size'], row.get('attention')))
    row['flops_ratio'] = base['gflops'] / row['gflops'] if base else None
    row['speedup_infer'] = row['infer_img_s'] / base['infer_img_s'] if base else None
    if base and 'train_img_s' in row and 'train_img_s' in base:
      row['speedup_train'] = row['train_img_s'] / base['train_img_s']
    hf = next((r for r in rows if r.get('hf_infer_img_s') and r['variant'] == row['variant']
               and r['batch_size'] == row['batch_size'] and r['merger'] == 'none'), None)
    if hf and row['merger'] == 'none':
      row.setdefault('ours_vs_hf', row['infer_img_s'] / hf['hf_infer_img_s'])
      if hf.get('hf_train_img_s') and 'train_img_s' in row:
        row['ours_vs_hf_train'] = row['train_img_s'] / hf['hf_train_img_s']
  return rows


def best_rows(rows: list[dict]) -> list[dict]:
  """Per variant and merger, the row of the batch size that trained fastest (or,
  without training, ran inference fastest)."""
  best = {}
  for row in rows:
    if 'infer_img_s' not in row:
      continue
    key = (row['variant'], row['merger'], row.get('attention'))
    rate = row.get('train_img_s', row['infer_img_s'])
    if key not in best or rate > best[key].get('train_img_s', best[key]['infer_img_s']):
      best[key] = row
  return list(best.values())


COLUMNS = ['variant', 'merger', 'attention', 'scan', 'remat', 'batch_size', 'dtype', 'gflops',
           'params', 'flops_ratio', 'infer_img_s', 'speedup_infer', 'infer_mfu', 'train_img_s',
           'speedup_train', 'train_mfu', 'compile_s', 'infer_mem_mib', 'train_mem_mib', 'hf_infer_img_s',
           'hf_train_img_s', 'ours_vs_hf', 'ours_vs_hf_train', 'error']


def markdown(rows: list[dict], columns: Sequence[str] = COLUMNS) -> str:
  columns = [c for c in columns if any(r.get(c) is not None for r in rows)]
  def cell(value):
    if value is None:
      return '-'
    if isinstance(value, bool):
      return str(value)
    if isinstance(value, float):
      return f'{value:.3g}' if abs(value) < 1000 else f'{value:,.0f}'
    return f'{value:,}' if isinstance(value, int) else str(value)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(r.get(c)) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines)


def tables(rows: list[dict]) -> str:
  """All rows, then (when there are several batch sizes) each model at its best batch."""
  text = markdown(rows)
  if len({r.get('batch_size') for r in rows}) > 1:
    text += '\n\nAt the best batch size of each model:\n\n' + markdown(best_rows(rows))
  return text


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


def _measure_safely(*args) -> dict:
  """A row, or a row naming the error (out of memory on a GPU, say), so that one
  failure does not end a benchmark run."""
  try:
    return measure(*args)
  except Exception as e:  # pylint: disable=broad-except
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    return {'error': 'out of memory' if 'RESOURCE_EXHAUSTED' in str(e) else message[:200]}


def main(argv):
  del argv
  if _REPORT.value:  # Tables of saved rows (several runs, e.g. ours and transformers').
    rows = [row for path in _REPORT.value for row in json.load(open(path))]
    text = tables(add_ratios(rows))
    print(text)
    if _MARKDOWN.value:
      with open(_MARKDOWN.value, 'w') as f:
        f.write(text + '\n')
    return
  peak, source = utilisation.peak_tflops()
  batches = [int(b) for b in _BATCHES.value]
  print(f'JAX {jax.__version__}, {utilisation.device_summary()}; peak {peak:.3g} TFLOP/s '
        f'({source}); batches {batches}, {_DTYPE.value}', flush=True)
  start, rows = time.perf_counter(), []

  def add(row):
    rows.append(row)
    print(f'  {row}', flush=True)
    if _JSON.value:  # After every row: a run cut short keeps what it measured.
      with open(_JSON.value, 'w') as f:
        json.dump(add_ratios(rows), f, indent=2)

  for variant in _VARIANTS.value:
    for merger in _MERGERS.value:
      merger_batches = batches
      if merger != 'none' and _MERGER_BATCHES.value == 'best':
        plain = [r for r in best_rows(rows) if r['variant'] == variant and r['merger'] == 'none']
        merger_batches = [plain[0]['batch_size']] if plain else batches
      for batch, attention in itertools.product(merger_batches, _ATTENTION.value or [None]):
        if _BUDGET.value and time.perf_counter() - start > _BUDGET.value:
          print(f'  skipped {variant} {merger} batch {batch}: --budget_s spent', flush=True)
          continue
        key = dict(variant=variant, merger=merger, batch_size=batch, dtype=_DTYPE.value)
        if attention:
          key['attention'] = attention
        if _HF_ONLY.value:
          if merger == 'none' and variant != 'fmnist':
            add(key | _hf_only_row(variant, batch))
          continue
        add(key | _measure_safely(variant, merger, batch, _REPEATS.value, _CALLS.value,
                                  _TRAIN.value, None, None, peak, attention))
  add_ratios(rows)
  text = tables(rows)
  print(text)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(rows, f, indent=2)
  if _MARKDOWN.value:
    with open(_MARKDOWN.value, 'w') as f:
      f.write(text + '\n')
  if _PLOT.value:
    plot([r for r in rows if 'infer_img_s' in r], _PLOT.value)


def _hf_only_row(variant: str, batch: int) -> dict:
  """transformers' timings for a plain variant, without compiling ours."""
  model_cfg, shape, classes = model_config(variant, 'none')
  model = build_model(model_cfg, classes)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((batch, *shape), np.float32))
  params = jax.jit(model.init)(jax.random.key(0), images[:1])['params']
  try:
    return hf_reference(model, params, images, batch, _REPEATS.value, _CALLS.value)
  except Exception as e:  # pylint: disable=broad-except
    return {'error': 'out of memory' if 'out of memory' in str(e).lower() else str(e)[:200]}


if __name__ == '__main__':
  app.run(main)
