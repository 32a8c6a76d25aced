"""The token reducers behind one interface: `model.reducer.kind` picks one.

- `patchmerger`, `tokenlearner`, `pool` sit between blocks, in the slots that
  `model.merger` places (M tokens before block K); a slot before block K is the
  module `Transformer/<kind>_K` (pool has no parameters).
- `tome` merges inside every block from `model.reducer.start_block` on
  (tome.BipartiteMerge, r per block), needs no training and no parameters.
- `none`: the plain ViT, whatever `model.merger` says.
"""
from typing import Any, Optional

import flax.linen as nn

from patchmerger.errors import ConfigError
from patchmerger.models.patch_merger import PatchMerger
from patchmerger.models.pooling import TokenPooling, output_grid
from patchmerger.models.tokenlearner import TokenLearner

KINDS = ('patchmerger', 'tokenlearner', 'pool', 'tome', 'none')
BETWEEN_BLOCKS = ('patchmerger', 'tokenlearner', 'pool')
TRAINED = ('patchmerger', 'tokenlearner')  # Kinds with parameters of their own.


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ConfigError(f'model.reducer.kind must be one of {", ".join(KINDS)}; got {kind!r}.')
  return kind


def between_blocks(kind: str, num_tokens: int, grid: Optional[tuple[int, int]],
                   merge_normalized: bool, dtype: Any, name: str,
                   dropout_rate: float = 0.) -> nn.Module:
  """The module that turns [batch, N, D] patch tokens into [batch, M, D], called as
  module(x, deterministic); `grid` is the (h, w) layout of the N tokens, or None
  when they have none. `dropout_rate` is the model's (TokenLearner uses it)."""
  if kind == 'patchmerger':
    return PatchMerger(num_tokens=num_tokens, merge_normalized=merge_normalized, dtype=dtype,
                       name=name)
  if kind == 'tokenlearner':
    return TokenLearner(num_tokens=num_tokens, dropout_rate=dropout_rate, dtype=dtype,
                        name=name)
  if kind == 'pool':
    if grid is None:
      raise ConfigError('pool needs tokens on a grid.')
    return TokenPooling(num_tokens=num_tokens, grid=tuple(grid), dtype=dtype, name=name)
  raise ConfigError(f'{kind!r} is not a between-block reducer ({", ".join(BETWEEN_BLOCKS)}).')


def grid_after(kind: str, num_tokens: int,
               grid: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
  """The token grid after a between-block reducer (None: the tokens lost it)."""
  return output_grid(num_tokens, grid) if kind == 'pool' and grid else None
