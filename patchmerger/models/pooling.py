"""Average pooling of the token grid as a between-block reducer (no parameters).

M tokens are laid out on an oh x ow grid, the most square factorisation of M
(oriented like the input grid): M = 4 on a 4x4 grid averages 2x2 windows, M = 8
on a 14x14 grid gives a 2x4 grid. When the input grid divides, every window is
an equal block; otherwise the windows are those of adaptive average pooling
(rows floor(i*h/oh) to ceil((i+1)*h/oh)), so the output has exactly M tokens.
"""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from patchmerger.errors import ConfigError

Dtype = Any


def output_grid(num_tokens: int, grid: tuple[int, int]) -> tuple[int, int]:
  """The oh x ow grid of M tokens pooled from `grid` (h, w)."""
  if num_tokens < 1:
    raise ConfigError(f'Pooling needs num_tokens >= 1, got {num_tokens}.')
  short = max(d for d in range(1, math.isqrt(num_tokens) + 1) if num_tokens % d == 0)
  out = (short, num_tokens // short) if grid[0] <= grid[1] else (num_tokens // short, short)
  if out[0] > grid[0] or out[1] > grid[1]:
    raise ConfigError(f'Pooling a {grid[0]}x{grid[1]} token grid cannot give {num_tokens} '
                      f'tokens ({out[0]}x{out[1]}): choose M with a grid inside it.')
  return out


def pooling_matrix(num_tokens: int, grid: tuple[int, int]) -> np.ndarray:
  """[M, h*w] averaging weights, rows in row-major order of the output grid."""
  (h, w), (oh, ow) = grid, output_grid(num_tokens, grid)
  def windows(size, out):  # One 0/1 row per output position, normalised below.
    rows = np.zeros((out, size), np.float32)
    for i in range(out):
      rows[i, (i * size) // out:-(-(i + 1) * size // out)] = 1.
    return rows
  weights = np.einsum('ay,bx->abyx', windows(h, oh), windows(w, ow)).reshape(oh * ow, h * w)
  return weights / weights.sum(axis=1, keepdims=True)


class TokenPooling(nn.Module, kw_only=True):
  """[batch, h*w, D] tokens on `grid` -> [batch, M, D] averages.

  The weights [batch, M, N] are sown into 'intermediates' under
  'merge_weights', like PatchMerger's.
  """
  num_tokens: int
  grid: tuple[int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    del deterministic  # No dropout; the argument is the between-block reducers' interface.
    if x.ndim != 3 or x.shape[1] != self.grid[0] * self.grid[1]:
      raise ValueError(f'Pooling expects [batch, {self.grid[0]}x{self.grid[1]} tokens, dim], '
                       f'got {x.shape}')
    weights = jnp.asarray(pooling_matrix(self.num_tokens, self.grid))
    self.sow('intermediates', 'merge_weights',
             jnp.broadcast_to(weights, (x.shape[0], *weights.shape)))
    return jnp.einsum('mn,bnd->bmd', weights.astype(self.dtype), x.astype(self.dtype))
