"""Mixtures of experts in place of a block's MLP: what `model.moe` asks for
(MoeSpec), the experts themselves (ExpertMlps) and how their buffers move between
devices when the mesh has an `expert` axis.

Two kinds sit behind one interface, each a module `Moe` (encoder.moe_layer picks it)
called as moe(x [batch, tokens, D], deterministic) -> y, sowing its metrics into the
'moe' collection:
- `sparse` (sparse_moe.py): V-MoE, top-k experts per token under a capacity;
- `soft` (soft_moe.py): Soft MoE, every slot a convex combination of the tokens.
Both route tokens in groups of `group_images` whole images, so a block after a
PatchMerger, with fewer tokens per image, routes the same images together.
"""
import dataclasses
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from patchmerger.errors import ConfigError
from patchmerger.models.mlp import MlpBlock

KINDS = ('none', 'sparse', 'soft')
EXPERT_AXIS = 'expert'  # The mesh axis that splits the experts (training/sharding.py).


@dataclasses.dataclass(frozen=True)
class MoeSpec:
  """`model.moe`, resolved: every default filled in for its kind."""
  kind: str
  layers: tuple[int, ...]
  num_experts: int
  num_selected_experts: int = 2
  capacity_factor: float = 1.05
  eval_capacity_factor: float = 1.05
  batch_priority: bool = False
  eval_batch_priority: bool = False
  group_images: int = 8
  noise_std: float = 1.0
  num_slots: Optional[int] = 1
  importance_loss_weight: float = 0.005
  load_loss_weight: float = 0.005

  def group_size(self, batch: int) -> int:
    """Images per routing group for a batch: `group_images`, or the whole batch when
    it is smaller (model.init and FLOP counts run one image)."""
    if batch <= self.group_images:
      return batch
    if batch % self.group_images:
      raise ConfigError(f'A batch of {batch} images does not split into routing groups of '
                        f'model.moe.group_images={self.group_images}; use a batch size (per '
                        'evaluation too) that is a multiple of it.')
    return self.group_images


class ExpertMlp(MlpBlock, kw_only=True):
  """One expert: the block's MLP, with `deterministic` fixed so that nn.vmap maps
  only the tokens."""
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:  # pylint: disable=arguments-differ
    return super().__call__(x, self.deterministic)


def expert_mlps(num_experts: int, mlp_dim: int, dropout_rate: float, dtype: Any,
                deterministic: bool, name: str = 'Mlp') -> nn.Module:
  """E MLPs with weights stacked on a leading E axis (`Mlp/Dense_0/kernel`
  [E, D, H]), called on [E, tokens, D]. As in vmoe's V-MoE configs (split_rngs
  False), every expert starts from the same initial weights: routing breaks the tie."""
  stacked = nn.vmap(ExpertMlp, in_axes=0, out_axes=0, variable_axes={'params': 0},
                    split_rngs={'params': False, 'dropout': True}, axis_size=num_experts)
  return stacked(mlp_dim=mlp_dim, dropout_rate=dropout_rate, dtype=dtype,
                 deterministic=deterministic, name=name)


class MoeLayer(nn.Module, kw_only=True):
  """What the MoE layers (sparse_moe.SparseMoe, soft_moe.SoftMoe) share: their fields,
  the grouping of the tokens and the stacked experts."""
  spec: MoeSpec
  mlp_dim: int
  dropout_rate: float = 0.
  dtype: Any = jnp.float32

  @nn.nowrap
  def groups(self, x: jax.Array) -> jax.Array:
    """[batch, N, D] -> [groups, group_images * N, D]."""
    return to_groups(x, self.spec.group_size(x.shape[0]))

  @nn.nowrap
  def expert_mlps(self, deterministic: bool) -> nn.Module:
    return expert_mlps(self.spec.num_experts, self.mlp_dim, self.dropout_rate, self.dtype,
                       deterministic)


def _constrain(x: jax.Array, spec: P) -> jax.Array:
  """A sharding constraint when the mesh in context splits experts; else `x`."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get(EXPERT_AXIS, 1) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, spec)


def _batch_axes() -> tuple[str, ...]:
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(mesh.axis_names) if not mesh.empty else ()


def by_group(x: jax.Array) -> jax.Array:
  """`x` [G, ...] kept split by routing group over every batch axis: routing is local
  to a group, and without this XLA gathers the gates to shard them by expert."""
  return _constrain(x, P(_batch_axes() or None))


def run_experts(experts: nn.Module, buffers: jax.Array) -> jax.Array:
  """Applies expert e to buffers [G, E, C, D] [:, e] -> [G, E, C, D'].

  With an `expert` mesh axis, the groups G are split over every batch axis and
  the experts E over `expert`: the buffers move to their experts' devices in one
  all-to-all, and back in another (as vmoe's dispatch and receive).
  """
  groups, num_experts, slots, dim = buffers.shape
  others = tuple(a for a in _batch_axes() if a != EXPERT_AXIS) or None
  x = _constrain(jnp.swapaxes(by_group(buffers), 0, 1), P(EXPERT_AXIS, others))
  y = experts(x.reshape(num_experts, groups * slots, dim))
  y = _constrain(y.reshape(num_experts, groups, slots, -1), P(EXPERT_AXIS, others))
  return by_group(jnp.swapaxes(y, 0, 1))


def to_groups(x: jax.Array, group_images: int) -> jax.Array:
  """[batch, N, D] -> [batch / group_images, group_images * N, D]."""
  batch, tokens, dim = x.shape
  return by_group(x.reshape(batch // group_images, group_images * tokens, dim))


# `model.moe` fields left None take their kind's default: vmoe's V-MoE paper configs
# (vmoe/configs/vmoe_paper/common.py) for sparse, its soft_moe configs for soft.
DEFAULTS = {
    'sparse': dict(num_experts=32, layers='every2', num_selected_experts=2,
                   capacity_factor=1.05, group_images=8, noise_std=1.0),
    'soft': dict(num_experts=128, layers='lasthalf', num_selected_experts=1,
                 capacity_factor=1.0, group_images=1, noise_std=0.0, num_slots=1),
}
FIELDS = ('kind', 'layers', 'num_experts', 'num_selected_experts', 'capacity_factor',
          'eval_capacity_factor', 'batch_priority', 'eval_batch_priority', 'group_images',
          'noise_std', 'num_slots', 'importance_loss_weight', 'load_loss_weight')


def resolve_layers(layers: Any, depth: int) -> tuple[int, ...]:
  """Block indices from a sequence, 'everyN' (blocks N-1, 2N-1, ...: vmoe's Every-N),
  'lastN' (the last N blocks) or 'lasthalf'."""
  if isinstance(layers, str):
    text = layers.strip().lower()
    if text == 'lasthalf':
      return tuple(range(depth - depth // 2, depth))
    for prefix in ('every', 'last'):
      count = text.removeprefix(prefix)
      if text.startswith(prefix) and count.isdigit() and int(count) >= 1:
        n = int(count)
        return (tuple(range(n - 1, depth, n)) if prefix == 'every'
                else tuple(range(max(depth - n, 0), depth)))
    raise ConfigError(f"model.moe.layers {layers!r}: expected block indices, 'everyN', "
                      "'lastN' or 'lasthalf'.")
  try:
    blocks = tuple(int(b) for b in ([layers] if isinstance(layers, int) else layers))
  except (TypeError, ValueError):
    raise ConfigError(f'model.moe.layers {layers!r}: expected block indices.') from None
  bad = [b for b in blocks if not 0 <= b < depth]
  if bad or len(set(blocks)) != len(blocks):
    raise ConfigError(f'model.moe.layers {layers!r}: blocks must be distinct and in '
                      f'0..{depth - 1} for a depth of {depth}.')
  return tuple(sorted(blocks))


def resolve(moe: Any, depth: int) -> Optional[MoeSpec]:
  """`model.moe` (a mapping, or None) -> MoeSpec, or None for kind 'none'."""
  if moe is None:
    return None
  moe = moe.to_dict() if hasattr(moe, 'to_dict') else dict(moe)
  unknown = sorted(set(moe) - set(FIELDS))
  if unknown:
    raise ConfigError(f'Unknown model.moe field(s) {unknown}; expected {", ".join(FIELDS)}.')
  kind = str(moe.get('kind', 'none')).strip().lower()
  if kind not in KINDS:
    raise ConfigError(f'model.moe.kind must be one of {", ".join(KINDS)}; got {kind!r}.')
  if kind == 'none':
    return None
  given = {k: v for k, v in moe.items() if v is not None and k != 'kind'}
  fields = DEFAULTS[kind] | given
  fields.setdefault('eval_capacity_factor', fields['capacity_factor'])
  fields.setdefault('eval_batch_priority', fields.get('batch_priority', False))
  if kind == 'soft' and fields.get('num_slots') == 0:
    fields['num_slots'] = None  # 0: slots from the capacity factor (soft_moe.num_slots).
  spec = MoeSpec(kind=kind, **(fields | {'layers': resolve_layers(fields['layers'], depth)}))
  checks = (
      (spec.num_experts >= 1, 'num_experts must be >= 1'),
      (1 <= spec.num_selected_experts <= spec.num_experts,
       'num_selected_experts must be between 1 and num_experts'),
      (spec.capacity_factor > 0 and spec.eval_capacity_factor > 0,
       'capacity_factor and eval_capacity_factor must be > 0'),
      (spec.group_images >= 1, 'group_images must be >= 1'),
      (spec.noise_std >= 0, 'noise_std must be >= 0'),
      (spec.num_slots is None or spec.num_slots >= 1, 'num_slots must be >= 0'),
      (spec.importance_loss_weight >= 0 and spec.load_loss_weight >= 0,
       'the auxiliary loss weights must be >= 0'),
  )
  for ok, message in checks:
    if not ok:
      raise ConfigError(f'model.moe: {message}; got {dict(given, kind=kind)}.')
  return spec


def summarise(collection: Any) -> tuple[jax.Array, dict]:
  """The 'moe' collection a forward pass sowed -> (the auxiliary loss summed over
  layers, {'moe/auxiliary_loss': ..., 'moe/encoderblock_N/<metric>': ...})."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(collection))
  metrics, aux = {}, jnp.zeros((), jnp.float32)
  for path, values in flat.items():
    block = next((p for p in path if p.startswith('encoderblock_')), '/'.join(path[:-2]))
    metrics[f'moe/{block}/{path[-1]}'] = values[-1]
    if path[-1] == 'auxiliary_loss':
      aux = aux + values[-1]
  if metrics:
    metrics['moe/auxiliary_loss'] = aux
  return aux, metrics
