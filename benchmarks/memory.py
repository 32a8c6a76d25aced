r"""Per-device memory of the train step, from XLA's memory analysis of an ahead-of-time
compilation (nothing runs, nothing is allocated), on a forced mesh of CPU devices.

  python -m benchmarks.memory --variants=g/14 --remat=none,full --fsdp=8 --batch_size=64
  python -m benchmarks.memory --variants=B/16,L/16,H/14,g/14 --scan --json=/tmp/memory.json

The step is train.py's: AdamW, the state sharded FSDP-style over `--fsdp` devices,
the global batch split over all of them. Memory per device = arguments + outputs +
temporaries - donated (aliased) bytes. CPU compilation stands in for an accelerator's:
same program, same buffers (an accelerator's compiler may schedule them differently).
"""
import functools
import json
import os
import time

# Forced CPU devices must be set before jax starts.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax
import jax.numpy as jnp
from absl import app, flags

from configs import common, fashion_mnist
from patchmerger.models import build_model, parse_variant
from patchmerger.training import sharding, state as state_lib, step

_VARIANTS = flags.DEFINE_list('variants', ['g/14'], 'NAME/PATCH variants.')
_MERGER = flags.DEFINE_string('merger', '8@1/2', 'none, or M@1/2 (M tokens halfway).')
_REMAT = flags.DEFINE_list('remat', ['none', 'full'], 'Remat policies, one row each.')
_DTYPE = flags.DEFINE_string('dtype', 'bfloat16', 'Compute dtype.')
_SCAN = flags.DEFINE_boolean('scan', False, 'Scanned blocks (compiles much faster).')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Global batch.')
_FSDP = flags.DEFINE_integer('fsdp', 8, 'Devices the state is sharded over (mesh.fsdp).')
_IMAGE = flags.DEFINE_integer('image_size', 224, 'Image size.')
_JSON = flags.DEFINE_string('json', None, 'Write the rows here.')


def measure(variant: str, remat: str) -> dict:
  depth = parse_variant(variant)['depth']
  merger = 'none' if _MERGER.value == 'none' else (
      f'{_MERGER.value.split("@")[0]}@{depth // 2}')
  model_cfg = common.model_config(variant, merger, classifier='token', dtype=_DTYPE.value,
                                  scan=_SCAN.value, remat_policy=remat)
  model = build_model(model_cfg, 1000)
  config = fashion_mnist.get_config()
  config.update(batch_size=_BATCH.value, loss='softmax_xent', label_smoothing=0.)
  config.mesh = dict(data=-1, fsdp=_FSDP.value)
  mesh = sharding.make_mesh(config.mesh)
  shape = (_IMAGE.value, _IMAGE.value, 3)
  create = functools.partial(state_lib.create_state, model, config, image_shape=shape)
  abstract_state = jax.eval_shape(create, jax.random.key(0))
  state_sharding = sharding.fsdp_sharding(abstract_state, mesh)
  data_sharding = sharding.batch_sharding(mesh)
  with_sharding = lambda tree, shardings: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
  state = with_sharding(abstract_state, state_sharding)
  batch = {'image': jax.ShapeDtypeStruct((_BATCH.value, *shape), jnp.float32,
                                         sharding=data_sharding),
           'label': jax.ShapeDtypeStruct((_BATCH.value,), jnp.int32, sharding=data_sharding)}
  train_fn = jax.jit(
      functools.partial(step.train_step, loss='softmax_xent', label_smoothing=0., accum_steps=1),
      in_shardings=(state_sharding, data_sharding, sharding.replicated(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
  start = time.perf_counter()
  compiled = train_fn.lower(state, batch, jax.random.key(0)).compile()
  analysis = compiled.memory_analysis()
  gib = lambda n: n / 2 ** 30
  total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
  return dict(variant=variant, merger=merger, remat=remat, dtype=_DTYPE.value, scan=_SCAN.value,
              batch_size=_BATCH.value, devices=jax.device_count(), fsdp=_FSDP.value,
              arguments_gib=gib(analysis.argument_size_in_bytes),
              temporaries_gib=gib(analysis.temp_size_in_bytes), total_gib=gib(total),
              compile_s=time.perf_counter() - start)


def main(argv):
  del argv
  print(f'JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}',
        flush=True)
  rows = []
  for variant in _VARIANTS.value:
    for remat in _REMAT.value:
      rows.append(measure(variant, remat))
      print('  ' + json.dumps(rows[-1]), flush=True)
  base = {r['variant']: r for r in rows if r['remat'] == 'none'}
  print('| variant | merger | remat | dtype | scan | global batch | devices (fsdp) | '
        'arguments GiB | temporaries GiB | per device GiB | vs no remat |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    ratio = r['total_gib'] / base[r['variant']]['total_gib'] if r['variant'] in base else None
    r['vs_no_remat'] = ratio
    print(f'| {r["variant"]} | {r["merger"]} | {r["remat"]} | {r["dtype"]} | {r["scan"]} | '
          f'{r["batch_size"]} | {r["devices"]} ({r["fsdp"]}) | {r["arguments_gib"]:.2f} | '
          f'{r["temporaries_gib"]:.2f} | {r["total_gib"]:.2f} | '
          f'{"-" if ratio is None else f"{ratio:.2f}"} |')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  app.run(main)
