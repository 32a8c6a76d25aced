"""PyTorch twin of the patchmerger (JAX) Token Merging (ToMe, Bolya et al., 2023), the
bipartite soft matching of patchmerger/models/tome.py, for `--to=transformers` exports.

Self-contained: imports only torch (the modeling file imports this one relatively). ToMe has
no parameters: in a block with merge count r, after attention and before the MLP,
- the sequence (class token included) splits by position parity: A = even (merged away),
  B = odd (merged into);
- each A token scores its best B token by the cosine of their head-averaged keys; the
  class token (A's row 0) scores -inf and never merges;
- the r best-scoring A tokens are added into their best B token as size-weighted means;
- the output is [unmerged A, B], the unmerged A in position order with a class token (so
  it stays first), in score order (highest first) without one.
Orderings use stable sorts and first-maximum argmax, as jnp.argsort/argmax do, so exact
ties resolve as in the JAX model.
"""
from typing import Optional

import torch


def _gather(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
  """tokens [b, n, d], index [b, k] -> [b, k, d]."""
  return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def bipartite_merge(x: torch.Tensor, keys: torch.Tensor, sizes: Optional[torch.Tensor],
                    r: int, has_cls: bool) -> tuple[torch.Tensor, torch.Tensor]:
  """x [b, N, D], keys [b, N, heads, head_dim], sizes [b, N, 1] or None (all 1) ->
  (x, sizes) with N - r' tokens, r' = min(r, (N - has_cls) // 2) (A minus the class
  token can give at most that many)."""
  if sizes is None:
    sizes = torch.ones(*x.shape[:2], 1, dtype=torch.float32, device=x.device)
  r = min(r, (x.shape[1] - int(has_cls)) // 2)
  if r <= 0:
    return x, sizes

  metric = keys.float().mean(dim=2)  # float32 as in JAX: low precision would blur near-ties.
  metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-6)
  scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # [b, |A|, |B|] cosines
  if has_cls:
    scores[:, 0, :] = -float('inf')
  best, match = scores.max(dim=-1)  # First maximum on ties, as jnp.argmax.
  order = torch.argsort(best, dim=-1, descending=True, stable=True)
  merged, unmerged = order[:, :r], order[:, r:]
  if has_cls:
    unmerged = unmerged.sort(dim=-1).values
  destination = match.gather(1, merged)

  # Sums of size-weighted tokens and of sizes; their ratio is the weighted mean.
  weighted = x.float() * sizes
  set_a, set_b = weighted[:, ::2], weighted[:, 1::2]
  sizes_a, sizes_b = sizes[:, ::2], sizes[:, 1::2]
  width = x.shape[-1]
  set_b = set_b.scatter_add(1, destination[..., None].expand(-1, -1, width),
                            _gather(set_a, merged))
  sizes_b = sizes_b.scatter_add(1, destination[..., None], _gather(sizes_a, merged))
  new_sizes = torch.cat([_gather(sizes_a, unmerged), sizes_b], dim=1)
  new_x = torch.cat([_gather(set_a, unmerged), set_b], dim=1) / new_sizes
  return new_x.to(x.dtype), new_sizes


def proportional_bias(sizes: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
  """sizes [b, N, 1] -> log(size) added to the attention logits over keys, [b, 1, 1, N]."""
  return None if sizes is None else sizes.log()[:, None, None, :, 0]
