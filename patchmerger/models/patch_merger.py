"""The PatchMerger module (Renggli et al., 2022, arXiv 2202.12015).

Maps N input tokens to M output tokens. Each output is a convex combination of
the inputs, with weights given by a softmax over the N inputs of learned
per-output scores:  Y = softmax_N(W^T LN(X)^T) LN(X).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class PatchMerger(nn.Module, kw_only=True):
  """Learned merging of [batch, N, D] tokens into [batch, M, D] tokens.

  Attributes:
    num_tokens: M, the number of output tokens (independent of N).
    merge_normalized: average the layer-normalised tokens (as in the paper's
      description) rather than the raw residual stream.
    dtype: compute dtype of the matmuls; the softmax is always float32.

  The merge weights [batch, M, N] are sown into the 'intermediates' collection
  under 'merge_weights', so callers can inspect or plot them with
  `model.apply(..., mutable=['intermediates'])`.
  """
  num_tokens: int
  merge_normalized: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    del deterministic  # No dropout; the argument is the between-block reducers' interface.
    if x.ndim != 3:
      raise ValueError(f'PatchMerger expects [batch, tokens, dim], got {x.shape}')
    normed = nn.LayerNorm(name='LayerNorm_0', dtype=self.dtype)(x)
    # The learned "queries": one column of D weights per output token.
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (x.shape[-1], self.num_tokens), jnp.float32)
    # Scores stay [batch, N, M], the matmul's natural layout: producing [batch, M, N]
    # directly made XLA's CPU matmul 4x slower (1.3 against 0.3 ms for ViT-B at batch 8).
    scores = jnp.einsum('bnd,dm->bnm', normed, kernel.astype(self.dtype))
    merged, weights = merge_tokens(scores, normed if self.merge_normalized else x, self.dtype)
    self.sow('intermediates', 'merge_weights', jnp.swapaxes(weights, 1, 2))
    return merged


def merge_tokens(scores: jnp.ndarray, values: jnp.ndarray,
                 dtype: Dtype = jnp.float32) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The learned merge shared by PatchMerger and Soft MoE's dispatch: scores
  [batch, N, M] of every input for every output -> ([batch, M, D] outputs, each a
  convex combination of the N `values` [batch, N, D]; the [batch, N, M] weights, a
  float32 softmax over the N inputs)."""
  weights = nn.softmax(scores.astype(jnp.float32), axis=1)
  merged = jnp.einsum('bnm,bnd->bmd', weights.astype(dtype), values.astype(dtype))
  return merged, weights
