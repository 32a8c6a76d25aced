"""Token Merging (ToMe; Bolya et al., ICLR 2023, arXiv 2210.09461): bipartite soft
matching inside the encoder blocks, with no parameters and no training.

In a block with merge count r, after attention and before the MLP: the patch
tokens alternate between sets A (even positions) and B (odd positions); each A
token's similarity to B is the cosine of the head-averaged attention keys; the r
A tokens with the most similar best match are merged into that B token. Merged
tokens are size-weighted averages and the sizes (how many input patches each
token stands for) are carried to the next blocks, whose attention adds log(size)
to the logits (proportional attention). The class token is never merged. r is a
Python int per block, so every shape is static and the model jits.
"""
import dataclasses
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp


def schedule(r: Union[int, Sequence[int]], start_block: int, depth: int) -> tuple[int, ...]:
  """Merges per block: `r` for every block from `start_block` on (an int), or
  one entry per block (a list of length `depth`, zeroed before `start_block`)."""
  if not 0 <= int(start_block) < depth:
    raise ValueError(f'model.reducer.start_block must be in 0..{depth - 1}, got {start_block}.')
  if isinstance(r, (int,)) and not isinstance(r, bool):
    per_block = [int(r)] * depth
  elif isinstance(r, (list, tuple)) and all(isinstance(v, int) for v in r):
    per_block = [int(v) for v in r]
    if len(per_block) != depth:
      raise ValueError(f'model.reducer.r lists {len(per_block)} merge counts for a model of '
                       f'depth {depth}: give one per block, or one int.')
  else:
    raise ValueError(f'model.reducer.r must be an int or a list of ints, got {r!r}.')
  if any(v < 0 for v in per_block):
    raise ValueError(f'model.reducer.r must be >= 0, got {r!r}.')
  return tuple(0 if block < start_block else v for block, v in enumerate(per_block))


def _gather(tokens: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
  """tokens [b, n, d], index [b, k] -> [b, k, d]."""
  return jnp.take_along_axis(tokens, index[..., None], axis=1)


_scatter_add = jax.vmap(lambda tokens, index, values: tokens.at[index].add(values))


@dataclasses.dataclass(frozen=True)
class BipartiteMerge:
  """One block's merge step: r merges, the class token (first) kept apart.

  Called as merge(x [b, N, D], keys [b, N, heads, head_dim], sizes [b, N, 1] or
  None) -> (x, sizes) with N - r' tokens, r' = min(r, patch tokens // 2).
  """
  r: int
  has_cls_token: bool

  def __call__(self, x: jnp.ndarray, keys: jnp.ndarray,
               sizes: Optional[jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
    if sizes is None:
      sizes = jnp.ones((*x.shape[:2], 1), jnp.float32)
    kept = 1 if self.has_cls_token else 0
    r = min(self.r, (x.shape[1] - kept) // 2)
    if r <= 0:
      return x, sizes
    cls_x, patches = x[:, :kept], x[:, kept:].astype(jnp.float32)
    cls_sizes, sizes = sizes[:, :kept], sizes[:, kept:]

    metric = keys[:, kept:].mean(axis=2).astype(jnp.float32)
    metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True).clip(1e-6)
    scores = jnp.einsum('bic,bjc->bij', metric[:, ::2], metric[:, 1::2])  # A x B cosines
    best, match = scores.max(axis=-1), scores.argmax(axis=-1)
    order = jnp.argsort(-best, axis=-1)
    merged, unmerged = order[:, :r], jnp.sort(order[:, r:], axis=-1)
    destination = jnp.take_along_axis(match, merged, axis=1)

    # Sums of size-weighted tokens and of sizes; their ratio is the weighted mean.
    weighted = patches * sizes
    set_a, set_b = weighted[:, ::2], weighted[:, 1::2]
    sizes_a, sizes_b = sizes[:, ::2], sizes[:, 1::2]
    set_b = _scatter_add(set_b, destination, _gather(set_a, merged))
    sizes_b = _scatter_add(sizes_b, destination, _gather(sizes_a, merged))
    new_sizes = jnp.concatenate([_gather(sizes_a, unmerged), sizes_b], axis=1)
    new_patches = jnp.concatenate([_gather(set_a, unmerged), set_b], axis=1) / new_sizes
    return (jnp.concatenate([cls_x, new_patches.astype(x.dtype)], axis=1),
            jnp.concatenate([cls_sizes, new_sizes], axis=1))


def proportional_bias(sizes: Optional[jnp.ndarray]) -> Optional[jnp.ndarray]:
  """sizes [b, N, 1] -> log(size) on the keys' axis, [b, 1, 1, N]; None stays None."""
  return None if sizes is None else jnp.log(sizes)[:, None, None, :, 0]

