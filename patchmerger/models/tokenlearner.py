"""TokenLearner v1.1 (Ryoo et al., 2021, arXiv 2106.11297) as a between-block reducer.

Each of the M outputs is a weighted sum of the N input tokens, with weights from
a softmax over the inputs of per-token scores that a small MLP computes from
the layer-normalised tokens:  Y = softmax_N(MLP(LN(X))^T) X.

Set up for training as scenic's `TokenLearnerModuleV11` is: the scoring MLP's
kernels start xavier-uniform and its biases normal(1e-6), and dropout at the
model's rate follows its GELU and its output (before the softmax).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class TokenLearner(nn.Module, kw_only=True):
  """Learned [batch, N, D] -> [batch, M, D] reduction.

  Attributes:
    num_tokens: M, the number of output tokens.
    hidden_dim: width of the scoring MLP (64 in TokenLearner v1.1).
    dropout_rate: dropout inside the scoring MLP (scenic: the encoder's rate).
    dtype: compute dtype; the softmax is always float32.

  The weights [batch, M, N] are sown into 'intermediates' under
  'merge_weights', like PatchMerger's.
  """
  num_tokens: int
  hidden_dim: int = 64
  dropout_rate: float = 0.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    if x.ndim != 3:
      raise ValueError(f'TokenLearner expects [batch, tokens, dim], got {x.shape}')
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    dropout = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic)
    normed = nn.LayerNorm(name='LayerNorm_0', dtype=self.dtype)(x)
    hidden = dropout(nn.gelu(dense(self.hidden_dim, 'Dense_0')(normed)))
    scores = dropout(dense(self.num_tokens, 'Dense_1')(hidden))  # [b, N, M]
    weights = nn.softmax(jnp.swapaxes(scores, 1, 2).astype(jnp.float32), axis=-1)
    self.sow('intermediates', 'merge_weights', weights)
    return jnp.einsum('bmn,bnd->bmd', weights.astype(self.dtype), x.astype(self.dtype))
