"""PyTorch twins of the patchmerger (JAX) between-block token reducers (PatchMerger,
TokenLearner, average pooling), and the layers they share with modeling_patchmerger_vit.py.

Self-contained: imports only torch, so that an export directory opens anywhere with
`trust_remote_code=True` (the modeling file imports this one relatively). Parameters carry the
JAX names and layouts; each reducer returns its output tokens and the merge weights
[batch, M, N] that the JAX module sows as 'merge_weights'.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ('patchmerger', 'tokenlearner', 'pool')
Grid = Optional[tuple[int, int]]


def gelu(x: torch.Tensor) -> torch.Tensor:
  return F.gelu(x, approximate='tanh')  # Flax's nn.gelu default is the tanh approximation.


class Dense(nn.Module):
  """Flax's Dense/DenseGeneral: contracts the last `in_axes` axes of x with the leading
  axes of `kernel` [*in_shape, *out_shape]."""

  def __init__(self, in_shape: tuple, out_shape: tuple):
    super().__init__()
    self.kernel = nn.Parameter(torch.empty(*in_shape, *out_shape))
    self.bias = nn.Parameter(torch.zeros(*out_shape))
    self.in_axes = len(in_shape)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    in_shape, out_shape = self.kernel.shape[:self.in_axes], self.kernel.shape[self.in_axes:]
    batch = x.shape[:x.dim() - self.in_axes]
    y = x.reshape(-1, math.prod(in_shape)) @ self.kernel.reshape(math.prod(in_shape), -1)
    return (y + self.bias.reshape(-1)).reshape(*batch, *out_shape)


class LayerNorm(nn.Module):

  def __init__(self, width: int, eps: float):
    super().__init__()
    self.scale = nn.Parameter(torch.ones(width))
    self.bias = nn.Parameter(torch.zeros(width))
    self.eps = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), self.scale, self.bias, self.eps)


class PatchMerger(nn.Module):
  """Y = softmax_N(LN(X) W)^T V with V = LN(X) (or X when not `merge_normalized`)."""

  def __init__(self, width: int, num_tokens: int, merge_normalized: bool, eps: float):
    super().__init__()
    self.LayerNorm_0 = LayerNorm(width, eps)
    self.kernel = nn.Parameter(torch.empty(width, num_tokens))
    self.merge_normalized = merge_normalized

  def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    del grid  # Learned weights: the layout of the tokens does not matter.
    normed = self.LayerNorm_0(x)
    weights = (normed @ self.kernel).softmax(dim=1).transpose(1, 2)  # [b, M, N], over N.
    return weights @ (normed if self.merge_normalized else x), weights


class TokenLearner(nn.Module):
  """TokenLearner v1.1: Y = softmax_N(MLP(LN(X))^T) X; the values are the raw tokens X, not
  the normalised ones (unlike PatchMerger's default)."""

  def __init__(self, width: int, num_tokens: int, eps: float, hidden_dim: int = 64):
    super().__init__()
    self.LayerNorm_0 = LayerNorm(width, eps)
    self.Dense_0 = Dense((width,), (hidden_dim,))
    self.Dense_1 = Dense((hidden_dim,), (num_tokens,))

  def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    del grid
    scores = self.Dense_1(gelu(self.Dense_0(self.LayerNorm_0(x))))  # [b, N, M]
    weights = scores.transpose(1, 2).float().softmax(dim=-1)  # [b, M, N]; JAX: float32.
    return weights.to(x.dtype) @ x, weights


def output_grid(num_tokens: int, grid: tuple[int, int]) -> tuple[int, int]:
  """The oh x ow grid of M pooled tokens: the most square factorisation of M, its longer
  side along the input grid's longer side (ties: the columns)."""
  short = max(d for d in range(1, math.isqrt(num_tokens) + 1) if num_tokens % d == 0)
  out = (short, num_tokens // short) if grid[0] <= grid[1] else (num_tokens // short, short)
  if out[0] > grid[0] or out[1] > grid[1]:
    raise ValueError(f'Pooling a {grid[0]}x{grid[1]} token grid cannot give {num_tokens} '
                     f'tokens ({out[0]}x{out[1]}).')
  return out


def pooling_matrix(num_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
  """[M, h*w] averaging weights, rows in row-major order of the output grid; windows are
  adaptive average pooling's (rows floor(i*h/oh) to ceil((i+1)*h/oh)), so they may overlap
  when the grid does not divide."""
  (h, w), (oh, ow) = grid, output_grid(num_tokens, grid)

  def windows(size: int, out: int) -> torch.Tensor:
    rows = torch.zeros(out, size)
    for i in range(out):
      rows[i, (i * size) // out:-(-(i + 1) * size // out)] = 1.
    return rows

  weights = torch.einsum('ay,bx->abyx', windows(h, oh), windows(w, ow)).reshape(oh * ow, h * w)
  return weights / weights.sum(dim=1, keepdim=True)


class TokenPooling(nn.Module):
  """Average pooling of the [batch, h*w, D] token grid to M tokens; no parameters."""

  def __init__(self, num_tokens: int):
    super().__init__()
    self.num_tokens = num_tokens

  def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    if grid is None or x.shape[1] != grid[0] * grid[1]:
      raise ValueError(f'Pooling expects tokens on a grid, got {x.shape[1]} tokens on {grid}.')
    # Built per call (cheap) rather than kept as a buffer, so the state dict stays the JAX one.
    weights = pooling_matrix(self.num_tokens, grid).to(x.device, x.dtype)
    return weights @ x, weights.expand(x.shape[0], -1, -1)


def between_blocks(kind: str, width: int, num_tokens: int, merge_normalized: bool,
                   eps: float) -> nn.Module:
  """The reducer of `kind` (the JAX model's `model.reducer.kind`) producing `num_tokens`."""
  if kind == 'patchmerger':
    return PatchMerger(width, num_tokens, merge_normalized, eps)
  if kind == 'tokenlearner':
    return TokenLearner(width, num_tokens, eps)
  if kind == 'pool':
    return TokenPooling(num_tokens)
  raise ValueError(f'Reducer kind must be one of {", ".join(KINDS)}; got {kind!r}.')


def grid_after(kind: str, num_tokens: int, grid: Grid) -> Grid:
  """The token grid after a reducer: pooling keeps one, the learned reducers lose it."""
  return output_grid(num_tokens, grid) if kind == 'pool' and grid else None
