"""Token Merging (ToMe; Bolya et al., ICLR 2023, arXiv 2210.09461): bipartite soft
matching inside the encoder blocks, with no parameters and no training.

Computed as the authors' implementation (facebookresearch/ToMe, `bipartite_soft_matching`
and `merge_wavg`, applied through its timm patch) computes it. In a block with merge
count r, after attention and before the MLP:
- the whole sequence, class token included, alternates between set A (positions 0, 2,
  4, ...: merged away) and set B (positions 1, 3, 5, ...: merged into);
- each A token scores every B token by the cosine of their head-averaged attention
  keys; the class token (row 0 of A) scores -inf, so it is never merged;
- the r A tokens with the highest best score are added into their best B token;
  merged tokens are size-weighted averages, and the sizes (how many patches each
  token stands for) go on to the next blocks, whose attention can add log(size) to
  the logits (proportional attention);
- the output is [unmerged A, B]. With a class token the unmerged A keep their
  original order, so the class token stays first; without one they stay in the
  order of their scores, highest first.
r per block is a Python int, so every shape is static and the model jits.
"""
import dataclasses
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from patchmerger.errors import ConfigError

MergeCounts = Union[int, Sequence[int]]


def schedule(r: MergeCounts, depth: int, *, inflection: float = 0.,
             start_block: int = 0) -> tuple[int, ...]:
  """Merges per block, read as ToMe's `parse_r` reads r, then zeroed before `start_block`.

  - An int r with `inflection` in [-1, 1]: merge counts on a straight line from
    int(r * (1 - inflection)) in the first block to 2r minus that in the last, each
    truncated to an int. 0 is a constant r, -1 ToMe's "decreasing schedule" (2r down
    to 0), +1 an increasing one. ToMe writes this as the tuple (r, inflection).
  - A list of ints: one merge count per block; a short list is padded with zeros.
  `start_block` s sets the first s entries to 0, whatever the rest say.
  """
  if not 0 <= int(start_block) < depth:
    raise ConfigError(f'model.reducer.start_block must be in 0..{depth - 1}, got {start_block}.')
  inflection = float(inflection)
  if not -1. <= inflection <= 1.:
    raise ConfigError(f'model.reducer.inflection must be in [-1, 1], got {inflection}.')
  if isinstance(r, int) and not isinstance(r, bool):
    if r < 0:
      raise ConfigError(f'model.reducer.r must be >= 0, got {r}.')
    first = int(r * (1. - inflection))
    step = (2 * r - 2 * first) / (depth - 1) if depth > 1 else 0.
    per_block = [int(first + step * block) for block in range(depth)]
  elif isinstance(r, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                            for v in r):
    if inflection:
      raise ConfigError('model.reducer.inflection applies to an int r, not to a list of '
                        f'merge counts per block (r={list(r)}).')
    if len(r) > depth or any(v < 0 for v in r):
      raise ConfigError(f'model.reducer.r lists merge counts >= 0, at most one per block of '
                        f'the {depth}; got {list(r)}.')
    per_block = list(r) + [0] * (depth - len(r))
  elif isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[1], float):
    raise ConfigError(f'model.reducer.r={tuple(r)} reads as ToMe\'s (r, inflection) pair: '
                      f'write model.reducer.r={r[0]} and model.reducer.inflection={r[1]}.')
  else:
    raise ConfigError(f'model.reducer.r must be an int or a list of ints, got {r!r}.')
  return tuple(0 if block < start_block else v for block, v in enumerate(per_block))


def _gather(tokens: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
  """tokens [b, n, d], index [b, k] -> [b, k, d]."""
  return jnp.take_along_axis(tokens, index[..., None], axis=1)


_scatter_add = jax.vmap(lambda tokens, index, values: tokens.at[index].add(values))


@dataclasses.dataclass(frozen=True)
class BipartiteMerge:
  """One block's merge step: r merges, the class token (first, if any) protected.

  Called as merge(x [b, N, D], keys [b, N, heads, head_dim], sizes [b, N, 1] or
  None) -> (x, sizes) with N - r' tokens, r' = min(r, (N - has_cls_token) // 2).
  """
  r: int
  has_cls_token: bool

  def __call__(self, x: jnp.ndarray, keys: jnp.ndarray,
               sizes: Optional[jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
    if sizes is None:
      sizes = jnp.ones((*x.shape[:2], 1), jnp.float32)
    r = min(self.r, (x.shape[1] - int(self.has_cls_token)) // 2)
    if r <= 0:
      return x, sizes

    metric = keys.astype(jnp.float32).mean(axis=2)  # In float32: bf16 would blur near-ties.
    metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True).clip(1e-6)
    scores = jnp.einsum('bic,bjc->bij', metric[:, ::2], metric[:, 1::2])  # A x B cosines
    if self.has_cls_token:  # The class token is A's first row: it never merges.
      scores = scores.at[:, 0, :].set(-jnp.inf)
    best, match = scores.max(axis=-1), scores.argmax(axis=-1)
    order = jnp.argsort(best, axis=-1, descending=True)
    merged, unmerged = order[:, :r], order[:, r:]
    if self.has_cls_token:
      unmerged = jnp.sort(unmerged, axis=-1)
    destination = jnp.take_along_axis(match, merged, axis=1)

    # Sums of size-weighted tokens and of sizes; their ratio is the weighted mean.
    weighted = x.astype(jnp.float32) * sizes
    set_a, set_b = weighted[:, ::2], weighted[:, 1::2]
    sizes_a, sizes_b = sizes[:, ::2], sizes[:, 1::2]
    set_b = _scatter_add(set_b, destination, _gather(set_a, merged))
    sizes_b = _scatter_add(sizes_b, destination, _gather(sizes_a, merged))
    new_sizes = jnp.concatenate([_gather(sizes_a, unmerged), sizes_b], axis=1)
    new_x = jnp.concatenate([_gather(set_a, unmerged), set_b], axis=1) / new_sizes
    return new_x.astype(x.dtype), new_sizes


def proportional_bias(sizes: Optional[jnp.ndarray]) -> Optional[jnp.ndarray]:
  """sizes [b, N, 1] -> log(size) on the keys' axis, [b, 1, 1, N]; None stays None."""
  return None if sizes is None else jnp.log(sizes)[:, None, None, :, 0]
