r"""Token reducers side by side at matched FLOPs: plain, PatchMerger, TokenLearner,
pooling and ToMe on one ViT, in one process.

  python -m benchmarks.reducers                                # B/16 @224, batch 8 and 64
  python -m benchmarks.reducers --batch_sizes=8 --notrain --json=/tmp/r.json --markdown=/tmp/r.md
  python -m benchmarks.reducers --variant=Ti/16 --image_size=64 --batch_sizes=2 --repeats=1

PatchMerger, TokenLearner and pool sit in the `--merger` slot (M@FRACTION of the
depth, default 8@1/2). ToMe merges r tokens in every block; r is searched with
XLA's cost analysis so that its GFLOPs/image come nearest to the PatchMerger
row's (or to plain / --tome_flops_ratio), unless --tome_r fixes it. Columns: the
FLOPs ratio against plain, the inference (and training-step) speedup, and the
speedup divided by the FLOPs ratio (1.0: the saved FLOPs turn fully into speed).
ToMe's merge steps (similarity, sort, gathers, scatter-adds) are also timed on
their own at the shapes of each block (`merge_ms`, and `merge_share` of the ToMe
forward pass), so their cost is visible apart from the smaller blocks'.
Inference is timed round-robin over the rows of a batch size (--interleave, the
default): every model is compiled first, then each takes one timed turn of
--calls calls per round, for --repeats rounds, so the machine's drift falls on
all rows alike. --image_size, --repeats, --calls, --train and --json are those
of benchmarks/throughput.py.
"""
import json


import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import throughput
from patchmerger import flops
from patchmerger.models import build_model, tome

_VARIANT = flags.DEFINE_string('variant', 'B/16', 'NAME/PATCH, or fmnist.')
_REDUCERS = flags.DEFINE_list('reducers', ['none', 'patchmerger', 'tokenlearner', 'pool', 'tome'],
                              'Rows: reducer kinds (none is the plain model).')
_MERGER = flags.DEFINE_string('merger', '8@1/2', 'M@FRACTION slot of patchmerger, '
                              'tokenlearner and pool.')
_TOME_R = flags.DEFINE_integer('tome_r', -1, 'ToMe merges per block; -1: search the r whose '
                               'FLOPs match the PatchMerger row (or --tome_flops_ratio).')
_INTERLEAVE = flags.DEFINE_boolean(
    'interleave', True, 'Time the inference of all rows of a batch size in alternation '
    '(one call of each in turn, --repeats rounds), so that drift of the machine\'s speed falls '
    'on every row alike; off: each row on its own, one after another.')
_TOME_RATIO = flags.DEFINE_float('tome_flops_ratio', None, 'Target plain/ToMe FLOPs ratio of '
                                 'the r search; default: that of the --merger PatchMerger.')

COLUMNS = ('variant', 'batch_size', 'reducer', 'merger', 'tome_r', 'gflops', 'flops_ratio',
           'infer_img_s', 'speedup_infer', 'speedup_per_flops', 'train_img_s', 'speedup_train',
           'merge_ms', 'merge_share')


def _gflops(variant: str, merger: str, reducer: dict) -> float:
  model_cfg, shape, classes = throughput.model_config(variant, merger, reducer)
  return flops.measured_gflops(build_model(model_cfg, classes), shape)


def search_tome_r(variant: str, target_gflops: float) -> tuple[int, float]:
  """The constant r whose GFLOPs/image (XLA cost analysis) are nearest the target.

  GFLOPs fall as r grows, so bisect on r between 0 and half the tokens."""
  model_cfg, shape, classes = throughput.model_config(variant, 'none')
  model = build_model(model_cfg, classes)
  tokens = (shape[0] // model.patch_size) * (shape[1] // model.patch_size)
  cost = {}
  def gflops(r):
    if r not in cost:
      cost[r] = _gflops(variant, 'none', {'kind': 'tome', 'r': r})
    return cost[r]
  low, high = 0, tokens // 2
  while high - low > 1:  # Invariant: gflops(low) >= target > gflops(high), or the ends.
    middle = (low + high) // 2
    if gflops(middle) >= target_gflops:
      low = middle
    else:
      high = middle
  best = min((low, high), key=lambda r: abs(gflops(r) - target_gflops))
  return best, gflops(best)


def time_tome_merges(variant: str, r: int, batch: int, repeats: int, calls: int) -> float:
  """Milliseconds per batch of ToMe's merge steps alone (all blocks, in sequence,
  at the token counts of each block), from random tokens and keys."""
  model_cfg, shape, classes = throughput.model_config(variant, 'none', {'kind': 'tome', 'r': r})
  model = build_model(model_cfg, classes)
  has_cls = model.classifier == 'token'
  tokens = (shape[0] // model.patch_size) * (shape[1] // model.patch_size) + has_cls
  head_dim = model.width // model.num_heads
  rng = np.random.default_rng(0)
  inputs = []
  for block_r in model.tome_r:
    if block_r:
      inputs.append((jnp.asarray(rng.standard_normal((batch, tokens, model.width)), jnp.float32),
                     jnp.asarray(rng.standard_normal((batch, tokens, model.num_heads, head_dim)),
                                 jnp.float32),
                     jnp.ones((batch, tokens, 1), jnp.float32),
                     tome.BipartiteMerge(block_r, has_cls)))
      tokens -= min(block_r, (tokens - has_cls) // 2)

  @jax.jit
  def merges(arrays):
    return [merge(x, keys, sizes) for (x, keys, sizes), (*_, merge) in zip(arrays, inputs)]
  arrays = [item[:3] for item in inputs]
  jax.block_until_ready(merges(arrays))  # Compile and warm up.
  rate = throughput._median_rate(lambda: merges(arrays), batch, repeats, calls)
  return 1000 * batch / rate


def interleaved_inference(variant: str, settings: list[tuple[str, dict]], batch: int,
                          repeats: int, calls: int) -> list[float]:
  """Inference images/s of each (merger slot, reducer) setting, all compiled first,
  then timed round-robin: median over `repeats` rounds of `calls` calls each."""
  compiled = []
  for slot, reducer in settings:
    model_cfg, shape, classes = throughput.model_config(variant, slot, reducer)
    model = build_model(model_cfg, classes)
    compiled.append(throughput.compiled_forward(model, batch, shape)[:3])  # Kept: reused.
  rates = [[] for _ in compiled]
  for _ in range(repeats):
    for index, (forward, params, images) in enumerate(compiled):
      rates[index].append(throughput._median_rate(lambda: forward(params, images), batch, 1,
                                                  calls))
  return [float(np.median(r)) for r in rates]


def add_ratios(rows: list[dict]) -> list[dict]:
  """FLOPs ratio and speedups against the plain row of the same batch size."""
  plain = {r['batch_size']: r for r in rows if r['reducer'] == 'none'}
  for row in rows:
    base = plain.get(row['batch_size'])
    if not base:
      continue
    row['flops_ratio'] = base['gflops'] / row['gflops']
    row['speedup_infer'] = row['infer_img_s'] / base['infer_img_s']
    row['speedup_per_flops'] = row['speedup_infer'] / row['flops_ratio']
    if 'train_img_s' in row and 'train_img_s' in base:
      row['speedup_train'] = row['train_img_s'] / base['train_img_s']
    if 'merge_ms' in row:
      row['merge_share'] = row['merge_ms'] / (1000 * row['batch_size'] / row['infer_img_s'])
  return rows


def main(argv):
  del argv
  variant, merger = _VARIANT.value, _MERGER.value
  repeats, calls, train = throughput._REPEATS.value, throughput._CALLS.value, throughput._TRAIN.value
  print(f'JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, '
        f'{variant}, batch sizes {throughput._BATCHES.value}', flush=True)
  tome_r = _TOME_R.value
  if 'tome' in _REDUCERS.value and tome_r < 0:
    plain_gflops = _gflops(variant, 'none', {'kind': 'none'})
    ratio = _TOME_RATIO.value or plain_gflops / _gflops(variant, merger, {'kind': 'patchmerger'})
    tome_r, tome_gflops = search_tome_r(variant, plain_gflops / ratio)
    print(f'  ToMe r = {tome_r}: {tome_gflops:.4g} GFLOPs/image, FLOPs ratio '
          f'{plain_gflops / tome_gflops:.3f} (target {ratio:.3f})', flush=True)
  rows = []
  for batch in map(int, throughput._BATCHES.value):
    settings, batch_rows = [], []
    for kind in _REDUCERS.value:
      slot = merger if kind in ('patchmerger', 'tokenlearner', 'pool') else 'none'
      reducer = {'kind': kind, 'r': max(tome_r, 0)}
      settings.append((slot, reducer))
      # Interleaved: this call gives cost, memory and (with --train) the step; the
      # inference rate comes from the round-robin below.
      row = throughput.measure(variant, slot, batch, 1 if _INTERLEAVE.value else repeats,
                               1 if _INTERLEAVE.value else calls, train, reducer, hf=False,
                               keep_compiled=_INTERLEAVE.value)
      row['tome_r'] = tome_r if kind == 'tome' else None  # Constant r, from block 0.
      if kind == 'tome':
        row['merge_ms'] = time_tome_merges(variant, tome_r, batch, repeats, calls)
      batch_rows.append(row)
      if not _INTERLEAVE.value:
        print(f'  batch {batch} {kind}: {row["infer_img_s"]:.1f} img/s', flush=True)
    if _INTERLEAVE.value:
      rates = interleaved_inference(variant, settings, batch, repeats, calls)
      throughput._COMPILED.clear()  # This batch size's models: freed before the next.
      for row, rate in zip(batch_rows, rates):
        row.update(infer_img_s=rate, timing='interleaved')
        print(f'  batch {batch} {row["reducer"]}: {rate:.1f} img/s (interleaved)', flush=True)
    rows += batch_rows
  add_ratios(rows)
  table = throughput.markdown(rows, COLUMNS)
  print(table)
  if throughput._JSON.value:
    with open(throughput._JSON.value, 'w') as f:
      json.dump(rows, f, indent=2)
  if throughput._MARKDOWN.value:
    with open(throughput._MARKDOWN.value, 'w') as f:
      f.write(table + '\n')


if __name__ == '__main__':
  app.run(main)
