"""An independent numpy reference of ToMe (Bolya et al., 2023) and of the ViT it runs in.

Written for the tests from the paper and the documented behaviour of the authors'
implementation (facebookresearch/ToMe, whose code this project cannot ship: its licence is
non-commercial), one image and one token at a time, in float64, so that it shares no code
and no vectorised formulation with patchmerger/models/tome.py:

- the sequence, class token included, splits by position: even positions form set A
  (merged away), odd positions set B (merged into);
- an A token's score is its best cosine similarity, over B, of the head-averaged keys;
  the class token scores -inf;
- the r A tokens with the highest scores (ties: the earlier one) merge into their best B
  token (ties: the earlier B), as size-weighted averages; at most (N - protected) // 2;
- the output is [unmerged A, B]: unmerged A in position order when there is a class
  token, in score order otherwise;
- the merge counts per block are those of ToMe's `parse_r` (ref_schedule);
- the next block's attention adds log(size) to its logits when proportional.
"""
import math
from typing import Optional

import numpy as np


def ref_schedule(r, depth: int, inflection: float = 0., start_block: int = 0) -> list[int]:
  """Merges per block, as ToMe's documented schedules define them."""
  if isinstance(r, list):
    counts = r + [0] * (depth - len(r))
  else:  # From r * (1 - inflection) in block 0, in equal steps, to r * (1 + inflection).
    low = int(r * (1. - inflection))
    high = 2 * r - low
    counts = [int(low + (high - low) / (depth - 1) * i) for i in range(depth)]
  return [0 if i < start_block else c for i, c in enumerate(counts)]


def bipartite_merge(x: np.ndarray, keys: np.ndarray, sizes: np.ndarray, r: int,
                    class_token: bool) -> tuple[np.ndarray, np.ndarray, float]:
  """One image: x [N, D], keys [N, heads, head_dim], sizes [N] -> (x, sizes, margin).

  `margin` is the smallest gap between two scores whose order decided the merges (float
  noise smaller than it cannot change them); inf when nothing merged."""
  n = len(x)
  r = min(r, (n - int(class_token)) // 2)
  if r <= 0:
    return x, sizes, math.inf
  metric = keys.mean(axis=1)
  metric = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
  set_a, set_b = list(range(0, n, 2)), list(range(1, n, 2))
  best, target, runner_up = {}, {}, {}
  for a in set_a:
    if class_token and a == 0:
      best[a], target[a], runner_up[a] = -math.inf, set_b[0], -math.inf
      continue
    cosines = list(metric[set_b] @ metric[a])
    ranked = sorted(cosines, reverse=True)
    best[a], target[a] = ranked[0], set_b[cosines.index(ranked[0])]
    runner_up[a] = ranked[1] if len(ranked) > 1 else -math.inf
  by_score = sorted(set_a, key=lambda a: (-best[a], a))
  merged, unmerged = by_score[:r], by_score[r:]
  # What decided the result: each merged token's best B over its second best; the
  # r-th score over the next; without a class token, every consecutive pair of
  # scores (the unmerged keep their score order).
  gaps = [best[a] - runner_up[a] for a in merged]
  scores = [best[a] for a in by_score if best[a] > -math.inf]
  pairs = range(len(scores) - 1) if not class_token else [r - 1] if r < len(scores) else []
  gaps += [scores[i] - scores[i + 1] for i in pairs]
  margin = min(gaps, default=math.inf)
  if class_token:
    unmerged = sorted(unmerged)
  out_x, out_sizes = [], []
  for a in unmerged:
    out_x.append(x[a])
    out_sizes.append(sizes[a])
  for b in set_b:
    total = x[b] * sizes[b]
    size = sizes[b]
    for a in merged:
      if target[a] == b:
        total = total + x[a] * sizes[a]
        size = size + sizes[a]
    out_x.append(total / size)
    out_sizes.append(size)
  return np.stack(out_x), np.asarray(out_sizes), margin


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def _gelu(x):  # flax's nn.gelu: the tanh approximation.
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _attention(x, p, sizes: Optional[np.ndarray]):
  """x [N, D] -> (output [N, D], keys [N, heads, head_dim])."""
  q, k, v = (np.einsum('nd,dhk->nhk', x, p[name]['kernel']) + p[name]['bias']
             for name in ('query', 'key', 'value'))
  logits = np.einsum('qhk,nhk->hqn', q, k) / np.sqrt(q.shape[-1])
  if sizes is not None:
    logits = logits + np.log(sizes)[None, None, :]
  logits = logits - logits.max(-1, keepdims=True)
  weights = np.exp(logits)
  weights = weights / weights.sum(-1, keepdims=True)
  out = np.einsum('hqn,nhk->qhk', weights, v)
  return np.einsum('qhk,hkd->qd', out, p['out']['kernel']) + p['out']['bias'], k


def vit_logits(params, image: np.ndarray, patch: int, classifier: str, schedule: list[int],
               proportional: bool = True, size_weighted_gap: bool = False
               ) -> tuple[np.ndarray, float]:
  """One image [H, W, C] through a plain ViT (learned position embedding, no stem,
  no pre-logits) with ToMe merging `schedule[i]` tokens in block i. Returns
  (logits, the smallest ordering margin of every merge)."""
  p = {k: v for k, v in params.items()}
  h, w, c = image.shape
  patches = image.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
  patches = patches.reshape(-1, patch, patch, c)
  x = np.einsum('npqc,pqcd->nd', patches, p['embedding']['kernel']) + p['embedding']['bias']
  class_token = classifier == 'token'
  if class_token:
    x = np.concatenate([p['cls'][0], x])
  encoder = p['Transformer']
  x = x + encoder['posembed_input']['pos_embedding'][0]
  sizes, margin = None, math.inf
  for i, r in enumerate(schedule):
    block = encoder[f'encoderblock_{i}']
    y, keys = _attention(_layer_norm(x, block['LayerNorm_0']),
                         block['MultiHeadDotProductAttention_1'],
                         sizes if proportional else None)
    x = x + y
    if r:
      x, sizes, block_margin = bipartite_merge(
          x, keys, np.ones(len(x)) if sizes is None else sizes, r, class_token)
      margin = min(margin, block_margin)
    mlp = block['MlpBlock_3']
    y = _gelu(_layer_norm(x, block['LayerNorm_2']) @ mlp['Dense_0']['kernel']
              + mlp['Dense_0']['bias'])
    x = x + y @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']
  x = _layer_norm(x, encoder['encoder_norm'])
  if class_token:
    feature = x[0]
  elif size_weighted_gap and sizes is not None:
    feature = (x * sizes[:, None]).sum(0) / sizes.sum()
  else:
    feature = x.mean(0)
  return feature @ p['head']['kernel'] + p['head']['bias'], margin
