"""The transformer block's MLP (vision_transformer's `MlpBlock_3`): Dense, GELU,
Dense, with dropout after each; also every expert of an MoE layer."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class MlpBlock(nn.Module, kw_only=True):
  mlp_dim: int
  dropout_rate: float = 0.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    dense = lambda n, name: nn.Dense(
        n, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    y = nn.gelu(dense(self.mlp_dim, 'Dense_0')(x))
    y = nn.Dropout(self.dropout_rate)(y, deterministic)
    y = dense(x.shape[-1], 'Dense_1')(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic)
