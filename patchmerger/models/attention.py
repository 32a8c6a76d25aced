"""Multi-head self-attention with an optional logit bias, returning its keys on request.

Parameter names and shapes are those of `flax.linen.MultiHeadDotProductAttention`
(`query`, `key`, `value`: [D, heads, head_dim]; `out`: [heads, head_dim, D]), so
public checkpoints and our older runs load unchanged. It exists for ToMe, which
needs the keys (to measure token similarity) and adds log(token size) to the
attention logits (proportional attention).
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from patchmerger.errors import ConfigError

Dtype = Any


IMPLEMENTATIONS = ('xla', 'cudnn', 'auto')


def gpu_compute_capability() -> Optional[tuple[int, int]]:
  """(major, minor) of the first local device when it is an NVIDIA GPU, else None."""
  device = jax.local_devices()[0]
  capability = getattr(device, 'compute_capability', None)
  if device.platform != 'gpu' or not capability or 'cuda' not in getattr(
      device.client, 'platform_version', 'cuda').lower():
    return None
  return tuple(int(part) for part in str(capability).split('.')[:2])


def cudnn_supports(dtype: Any, head_dim: int, has_bias: bool = False,
                   backend: Optional[str] = None,
                   compute_capability: Optional[tuple[int, int]] = None) -> bool:
  """Whether cuDNN's fused attention takes these inputs: an NVIDIA GPU of compute
  capability 8.0 or newer (Ampere, Hopper, ...; cuDNN's SDPA does not run on V100 or
  T4), bfloat16 or float16, a head size that is a multiple of 8 up to 128 (256 on
  Hopper; 128 is safe), and, for `auto`, no logit bias (with a bias, cuDNN's backward
  pass needs even token counts, which a class token makes odd). `backend` and
  `compute_capability` default to the first local device's."""
  backend = backend or jax.default_backend()
  if backend not in ('gpu', 'cuda'):
    return False
  capability = compute_capability or gpu_compute_capability()
  return (capability is not None and capability >= (8, 0)
          and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128 and not has_bias)


def choose_implementation(requested: Optional[str], dtype: Any, head_dim: int,
                          has_bias: bool = False, backend: Optional[str] = None,
                          compute_capability: Optional[tuple[int, int]] = None) -> str:
  """The `jax.nn.dot_product_attention` implementation for `requested`."""
  if requested in (None, 'xla'):
    return 'xla'
  if requested == 'cudnn':
    return 'cudnn'
  if requested == 'auto':
    return ('cudnn' if cudnn_supports(dtype, head_dim, has_bias, backend, compute_capability)
            else 'xla')
  raise ConfigError(f'model.attention must be one of {IMPLEMENTATIONS}, got {requested!r}')


class MultiHeadAttention(nn.Module, kw_only=True):
  """Self-attention over [batch, tokens, D].

  Attributes:
    num_heads: number of heads; D must divide by it.
    dtype: compute dtype.
    dropout_rate: dropout on the attention weights (training only).
    implementation: 'xla', 'cudnn' (the fused flash-attention kernel of a GPU) or
      'auto' (cuDNN where `choose_implementation` allows it, XLA otherwise); None: 'xla'.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: Optional[jnp.ndarray] = None,
               deterministic: bool = True, return_keys: bool = False):
    """`bias` broadcasts to [batch, heads, queries, keys] and is added to the
    logits. Returns the output, or (output, keys [batch, tokens, heads, head_dim])."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ConfigError(f'width {width} is not divisible by num_heads {self.num_heads}')
    project = functools.partial(
        nn.DenseGeneral, features=(self.num_heads, width // self.num_heads), axis=-1,
        dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())
    query, key, value = (project(name=name)(x) for name in ('query', 'key', 'value'))
    if bias is not None:
      bias = bias.astype(query.dtype)
    implementation = choose_implementation(self.implementation, query.dtype,
                                           query.shape[-1], bias is not None)
    if self.dropout_rate > 0. and not deterministic:
      # jax.nn.dot_product_attention has no dropout; flax's reference path does.
      y = nn.dot_product_attention(
          query, key, value, bias=bias, dropout_rng=self.make_rng('dropout'),
          dropout_rate=self.dropout_rate, broadcast_dropout=False, deterministic=False,
          dtype=self.dtype, force_fp32_for_softmax=True)
    else:
      # Softmax in float32 either way (XLA's path casts the logits; cuDNN's kernel).
      y = jax.nn.dot_product_attention(query, key, value, bias=bias,
                                       implementation=implementation)
    y = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype,
                        kernel_init=nn.initializers.xavier_uniform(), name='out')(y)
    return (y, key) if return_keys else y
