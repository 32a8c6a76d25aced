"""The transformer encoder of the ViT: its blocks, the reducers between them, and
how runs of blocks are scanned and rematerialised.

Parameters sit where the public vision_transformer checkpoints put them, under the
ViT's `Transformer`: `posembed_input`, `encoderblock_N/{LayerNorm_0,
MultiHeadDotProductAttention_1,LayerNorm_2,MlpBlock_3}`, `encoder_norm`; a
between-block reducer before block K is `<kind>_K` (e.g. `patchmerger_K`), and with
`scan` a run of blocks from START is stacked under `encoderblocks_START`.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from patchmerger.errors import ConfigError
from patchmerger.models import experts, reducers, soft_moe, sparse_moe, tome
from patchmerger.models.attention import MultiHeadAttention
from patchmerger.models.mlp import MlpBlock
from patchmerger.models.posemb import AddPositionEmbs

Dtype = Any

# Rematerialisation policies of model.remat_policy besides 'none' and 'full' (save
# nothing): jax.checkpoint_policies that take no arguments.
REMAT_POLICIES = ('nothing_saveable', 'everything_saveable', 'dots_saveable',
                  'checkpoint_dots', 'dots_with_no_batch_dims_saveable',
                  'checkpoint_dots_with_no_batch_dims')


def check_remat_policy(name: str) -> str:
  if name not in ('none', 'full') + REMAT_POLICIES:
    raise ConfigError(f"model.remat_policy must be 'none', 'full' or one of {REMAT_POLICIES}, "
                      f'got {name!r}')
  return name


def block_runs(depth: int, reducer_blocks: Sequence[int]) -> list[tuple[int, int]]:
  """[start, stop) runs of consecutive blocks between reducers: before the first,
  between two, after the last (a reducer before block 0 starts the first run)."""
  bounds = sorted({0, depth} | {b for b in reducer_blocks if 0 < b < depth})
  return list(zip(bounds[:-1], bounds[1:]))


def moe_layer(spec: experts.MoeSpec, *, mlp_dim: int, dropout_rate: float, dtype: Any,
              name: str = 'Moe') -> nn.Module:
  """The mixture of experts of `spec.kind` in place of a block's MLP."""
  kinds = {'sparse': sparse_moe.SparseMoe, 'soft': soft_moe.SoftMoe}
  if spec.kind not in kinds:
    raise ConfigError(f'model.moe.kind {spec.kind!r} has no layer; expected one of '
                      f'{", ".join(experts.KINDS)}.')
  return kinds[spec.kind](spec=spec, mlp_dim=mlp_dim, dropout_rate=dropout_rate, dtype=dtype,
                          name=name)


class Encoder1DBlock(nn.Module, kw_only=True):
  """Pre-LayerNorm transformer block (attention, then MLP, both residual).

  `merge` is an optional step between attention and MLP that reduces the tokens
  using the attention keys (ToMe's tome.BipartiteMerge). `sizes` [batch, N, 1]
  (how many patches each token stands for, None: all 1) add log(size) to the
  attention logits when `proportional_attention`. Returns (tokens, sizes).
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.
  attention_dropout_rate: float = 0.
  dtype: Dtype = jnp.float32
  merge: Optional[tome.BipartiteMerge] = None
  attention: str = 'auto'                  # xla | cudnn | auto (attention.py)
  proportional_attention: bool = True      # Add log(sizes) to the attention logits.
  moe: Optional[experts.MoeSpec] = None    # Experts (`Moe`) in place of `MlpBlock_3`.

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool,
               sizes: Optional[jnp.ndarray] = None) -> tuple[jnp.ndarray, Optional[jnp.ndarray]]:
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(x)
    y, keys = MultiHeadAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        dropout_rate=self.attention_dropout_rate, implementation=self.attention,
        name='MultiHeadDotProductAttention_1')(
            y, tome.proportional_bias(sizes) if self.proportional_attention else None,
            deterministic, return_keys=True)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic)
    if self.merge is not None:
      x, sizes = self.merge(x, keys, sizes)
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_2')(x)
    if self.moe is None:
      y = MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate, dtype=self.dtype,
                   name='MlpBlock_3')(y, deterministic)
    else:
      y = moe_layer(self.moe, mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                    dtype=self.dtype, name='Moe')(y, deterministic)
    return x + y, sizes


class Encoder(nn.Module, kw_only=True):
  """Position embedding, encoder blocks with reducers between or inside them,
  final norm. Returns (tokens, sizes); sizes is None unless ToMe merged.

  With `scan`, each run of blocks between reducers is one `nn.scan` whose
  parameters are stacked along a leading axis under `encoderblocks_START`
  (checkpoints/layouts.py converts to and from `encoderblock_N`); it compiles
  once per run instead of once per block. `remat_policy` rematerialises each
  block in the backward pass ('full': keeps only its input).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  mergers: Sequence[tuple[int, int]] = ()  # (before_block, num_tokens) pairs.
  posemb: str = 'learn'
  grid: tuple[int, int] = (1, 1)
  has_cls_token: bool = False
  dropout_rate: float = 0.
  attention_dropout_rate: float = 0.
  merge_normalized: bool = True
  dtype: Dtype = jnp.float32
  reducer: str = 'patchmerger'             # The kind in the `mergers` slots.
  tome_r: Sequence[int] = ()               # ToMe merges per block; () for none.
  attention: str = 'auto'
  scan: bool = False
  remat_policy: str = 'none'
  tome_proportional_attention: bool = True  # log(size) added to the attention logits.
  moe: Optional[experts.MoeSpec] = None     # Blocks moe.layers hold experts.

  def _block_type(self) -> Any:
    if self.remat_policy == 'none':
      return Encoder1DBlock
    policy = (None if self.remat_policy == 'full'
              else getattr(jax.checkpoint_policies, self.remat_policy))
    # `deterministic` (argument 2, after self and x) is a Python bool. Under scan,
    # XLA cannot merge the recomputation away, so CSE prevention is not needed.
    return nn.remat(Encoder1DBlock, policy=policy, prevent_cse=not self.scan,
                    static_argnums=(2,))

  @nn.compact
  def __call__(self, x: jnp.ndarray,
               deterministic: bool) -> tuple[jnp.ndarray, Optional[jnp.ndarray]]:
    x = AddPositionEmbs(kind=self.posemb, grid=self.grid, has_cls_token=self.has_cls_token,
                        name='posembed_input')(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic)
    merger_tokens = dict(self.mergers)
    grid, sizes = tuple(self.grid), None
    block = self._block_type()
    fields = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                  dropout_rate=self.dropout_rate,
                  attention_dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
                  attention=self.attention)
    for start, stop in block_runs(self.depth, list(merger_tokens)):
      if start in merger_tokens:
        reduce = reducers.between_blocks(self.reducer, merger_tokens[start], grid,
                                         self.merge_normalized, self.dtype,
                                         name=f'{self.reducer}_{start}',
                                         dropout_rate=self.dropout_rate)
        grid = reducers.grid_after(self.reducer, merger_tokens[start], grid)
        if self.has_cls_token:  # The class token is carried past the reducer.
          x = jnp.concatenate([x[:, :1], reduce(x[:, 1:], deterministic)], axis=1)
        else:
          x = reduce(x, deterministic)
      if self.scan:  # Tokens are the carry; `deterministic` and `sizes` (None) broadcast.
        run = nn.scan(block, variable_axes={'params': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=(nn.broadcast, nn.broadcast), length=stop - start)
        x, _ = run(**fields, name=f'encoderblocks_{start}')(x, deterministic, sizes)
        continue
      for i in range(start, stop):
        r = self.tome_r[i] if self.tome_r else 0
        x, sizes = block(**fields,
                         merge=tome.BipartiteMerge(r, self.has_cls_token) if r else None,
                         proportional_attention=self.tome_proportional_attention,
                         moe=self.moe if self.moe and i in self.moe.layers else None,
                         name=f'encoderblock_{i}')(x, deterministic, sizes)
    return nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x), sizes
