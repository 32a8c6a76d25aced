"""Checks of a whole config before anything is touched: the workdir, the data, the devices.

Every number with a valid range is checked here, so that a bad value fails with one line
naming the field instead of deep inside JAX or TensorFlow after files were written.
"""
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from patchmerger import config_renames, evaluators
from patchmerger.checkpoints import loading
from patchmerger.data import input_pipeline
from patchmerger.errors import ConfigError
from patchmerger.models import build_model
from patchmerger.training import sharding

_positive = (lambda v: v >= 1, 'an integer >= 1')
_non_negative = (lambda v: v >= 0, '>= 0')
_fraction = (lambda v: 0 <= v < 1, 'in [0, 1)')
_beta = (lambda v: 0 <= v < 1, 'in [0, 1)')

# Field path -> (predicate, what a valid value is). Fields a config lacks are skipped;
# None means "unset" and is left to the code that reads it.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    'batch_size': _positive,
    'total_steps': _positive,
    'accum_steps': _positive,
    'num_classes': _positive,
    'log_every': _positive,
    'checkpoint_every': _positive,
    'keep_checkpoints': _positive,
    'seed': _non_negative,
    'label_smoothing': _fraction,
    'skip_nonfinite_updates': _non_negative,
    'lr.base': (lambda v: v > 0, '> 0'),
    'lr.warmup_steps': _non_negative,
    'lr.end_value': _non_negative,
    'optim.b1': _beta,
    'optim.b2': _beta,
    'optim.weight_decay': _non_negative,
    'optim.clip_norm': _non_negative,
    'input.image_size': _positive,
    'input.channels': _positive,
    'input.std': (lambda v: v > 0, '> 0'),
    'input.shuffle_buffer': _positive,
    'input.data_threads': _non_negative,
    'input.num_shards': _non_negative,
    'model.width': _positive,
    'model.depth': _positive,
    'model.mlp_dim': _positive,
    'model.num_heads': _positive,
    'model.representation_size': _positive,
    'model.dropout_rate': _fraction,
    'model.attention_dropout_rate': _fraction,
    'model.merger.num_tokens': _positive,
    'model.merger.before_block': _non_negative,
    'mesh.data': (lambda v: v == -1 or v >= 1, '-1 (all remaining devices) or >= 1'),
    'mesh.fsdp': (lambda v: v == -1 or v >= 1, '-1 (all remaining devices) or >= 1'),
    'mesh.fsdp_min_size': _non_negative,
}
# Fields of the evaluators in config.evals, by kind ('*': every kind).
EVAL_RANGES: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    '*': {'every': _non_negative},
    'fewshot': {'pool_examples': _positive, 'test_examples': _positive, 'l2': _non_negative},
    'throughput': {'batches': _positive},
    'merge_pictures': {'images': _positive},
}
# Fields an evaluator of a kind cannot run without.
EVAL_REQUIRED = {'fewshot': ('shots', 'pool_examples', 'test_examples')}


def check_renamed(config: Any) -> None:
  """ConfigError naming the new key when `config` still has a moved one."""
  for old in config_renames.RENAMED:
    if old in config:
      raise ConfigError(config_renames.renamed_key(old))


def ranges(config: Any) -> dict[str, tuple[Callable[[Any], bool], str]]:
  """Every range-checked field path of `config`: RANGES plus its evaluators' fields."""
  checked = dict(RANGES)
  for name, spec in (config.get('evals') or {}).items():
    kind = evaluators.kind_of(name, spec)
    for field, check in (EVAL_RANGES['*'] | EVAL_RANGES.get(kind, {})).items():
      checked[f'evals.{name}.{field}'] = check
  return checked


def _lookup(config: Any, path: str) -> tuple[bool, Any]:
  node = config
  for part in path.split('.'):
    if node is None or not hasattr(node, 'get') or part not in node:
      return False, None
    node = node[part]
  return True, node


def check_ranges(config: Any) -> None:
  """ConfigError naming the first field whose value is out of its range (or, for an
  evaluator, missing)."""
  check_renamed(config)
  for name, spec in (config.get('evals') or {}).items():
    kind = evaluators.kind_of(name, spec)
    for field in EVAL_REQUIRED.get(kind, ()):
      if field not in spec:
        raise ConfigError(f'config.evals.{name} needs a {field} field ({kind} evaluators '
                          f'take {", ".join(EVAL_REQUIRED[kind])}).')
  for path, (valid, expected) in ranges(config).items():
    present, value = _lookup(config, path)
    if not present or value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not math.isfinite(value)) or not valid(value):
      raise ConfigError(f'config.{path} must be {expected}, got {value!r}.')
  for name, spec in (config.get('evals') or {}).items():
    if 'shots' in spec and any(int(s) < 1 for s in spec['shots']):
      raise ConfigError(f'config.evals.{name}.shots must all be >= 1, got {tuple(spec["shots"])}.')
  present, mergers = _lookup(config, 'model.merger')
  if present and isinstance(mergers, (tuple, list)):
    for merger in mergers:
      if int(merger['num_tokens']) < 1:
        raise ConfigError(f'config.model.merger num_tokens must be >= 1, got {mergers}.')


def check_batch(config: Any) -> None:
  """The batch arithmetic against devices, gradient accumulation and data shards."""
  num_devices = jax.device_count()
  if config.batch_size % num_devices:
    raise ConfigError(f'batch_size {config.batch_size} is not divisible by the '
                      f'{num_devices} devices.')
  if config.batch_size % (config.accum_steps * num_devices):
    raise ConfigError(f'batch_size {config.batch_size} is not divisible by accum_steps '
                      f'{config.accum_steps} x {num_devices} devices.')
  input_pipeline.check_shards(config.input, config.batch_size, jax.process_count())


def check_experts(config: Any, moe: Any) -> None:
  """Routing groups against the (micro-)batch, experts against the mesh's expert axis."""
  micro_batch = config.batch_size // config.accum_steps
  if micro_batch % moe.group_images:
    raise ConfigError(f'batch_size {config.batch_size} / accum_steps {config.accum_steps} = '
                      f'{micro_batch} images do not split into routing groups of '
                      f'model.moe.group_images={moe.group_images}.')
  experts = int(config.mesh.get('expert', 1))
  if experts > 1 and moe.num_experts % experts:
    raise ConfigError(f'model.moe.num_experts={moe.num_experts} does not split over '
                      f'mesh.expert={experts}: use an expert axis that divides it.')


def validate(config: Any) -> None:
  """Ranges, batch and mesh arithmetic, `init_from` (read-only) and the model built
  abstractly: bad settings fail with one clear line before any data or compute."""
  check_ranges(config)
  check_batch(config)
  sharding.make_mesh(config.mesh)
  if config.get('init_from'):
    loading.check_source(config.init_from)
  model = build_model(config.model, config.num_classes)
  if model.moe is not None:
    check_experts(config, model.moe)
  if model.reducer == 'tome' and not any(model.tome_r):
    reducer = config.model.reducer
    raise ConfigError(f'model.reducer.kind=tome merges nothing with r={reducer.get("r")!r}, '
                      f'start_block={reducer.get("start_block", 0)}: set '
                      f'--config.model.reducer.r (e.g. 8), or use kind=none for the plain ViT.')
  images = jax.ShapeDtypeStruct(
      (1, config.input.image_size, config.input.image_size, config.input.channels), jnp.float32)
  jax.eval_shape(model.init, jax.random.key(0), images)
