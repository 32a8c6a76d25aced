"""Sparse routing of V-MoE (Riquelme et al., 2021, arXiv 2106.05974), as
google-research/vmoe computes it: noisy top-k experts per token under a capacity,
and the importance and load auxiliary losses. Our own implementation.

Every function here works on one routing group: `gates` or `logits` [S, E] for S
tokens and E experts. The sparse layer (sparse_moe.py) vmaps them over groups.
"""
import math

import jax
import jax.numpy as jnp

from patchmerger.errors import ConfigError

CAPACITY_MULTIPLE = 4  # vmoe rounds every capacity up to a multiple of 4.


def capacity(group_tokens: int, num_experts: int, num_selected: int,
             capacity_factor: float) -> int:
  """Buffer positions per expert: ceil(S * k * capacity_factor / E), rounded up to a
  multiple of 4 (vmoe.moe.compute_capacity with its defaults)."""
  raw = math.ceil(group_tokens * num_selected * capacity_factor / num_experts)
  if raw < 1:
    raise ConfigError(
        f'{group_tokens} tokens per group, {num_experts} experts and capacity factor '
        f'{capacity_factor} leave an expert no buffer position; raise '
        'model.moe.capacity_factor or model.moe.group_images.')
  return raw + (-raw) % CAPACITY_MULTIPLE


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """jax.lax.top_k over the last axis as k rounds of argmax (the same values and
  indices; ties go to the lower index): XLA partitions these along the leading
  axes, where it gathers a TopK over all devices."""
  values, indices = [], []
  for _ in range(k):
    index = jnp.argmax(x, axis=-1)
    values.append(jnp.take_along_axis(x, index[..., None], axis=-1)[..., 0])
    indices.append(index)
    x = jnp.where(jax.nn.one_hot(index, x.shape[-1], dtype=jnp.bool_), -jnp.inf, x)
  return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


def top_experts_per_token(gates: jax.Array, num_selected: int, capacity_per_expert: int,
                          batch_priority: bool) -> tuple[jax.Array, jax.Array]:
  """(dispatch [S, E, C] bool, combine [S, E, C]) for one group of gates [S, E].

  Each token picks its `num_selected` highest gates. Expert buffers fill with every
  token's first choice before any second choice; within a choice, tokens go in
  order, or by their highest gate with `batch_priority`. Assignments past an
  expert's capacity are dropped. `combine` holds the softmax gate of each kept
  assignment (not renormalised over the chosen experts).
  """
  num_tokens, num_experts = gates.shape
  top_gates, experts = top_k(gates, num_selected)  # [S, k]
  order = (jnp.argsort(-top_gates[:, 0]) if batch_priority
           else jnp.arange(num_tokens))
  # Choices laid out choice-major ([k, S] flattened) in priority order, so a running
  # count per expert gives each assignment its buffer position.
  chosen = jax.nn.one_hot(experts[order].T.reshape(-1), num_experts, dtype=jnp.int32)
  position = (jnp.cumsum(chosen, axis=0) * chosen - 1).reshape(num_selected, num_tokens,
                                                               num_experts)
  position = jnp.max(position, axis=0)  # [S, E]: -1 where not chosen.
  position = position[jnp.argsort(order)]  # Back to token order.
  dispatch = jax.nn.one_hot(position, capacity_per_expert, dtype=jnp.bool_)  # >= C: none.
  combine = gates[:, :, None] * dispatch
  return dispatch, combine


def importance_loss(gates: jax.Array) -> jax.Array:
  """The squared coefficient of variation of each expert's summed gate."""
  importance = gates.sum(axis=0)
  return (jnp.std(importance) / jnp.mean(importance)) ** 2


def load_loss(logits: jax.Array, noisy_logits: jax.Array, noise_std: float,
              num_selected: int) -> jax.Array:
  """The squared coefficient of variation of each expert's expected load: the
  probability, over fresh noise, that an expert's logit beats the token's k-th
  highest noisy logit, averaged over tokens."""
  threshold = top_k(noisy_logits, num_selected)[0][:, -1:]
  p_selected = 1. - jax.scipy.stats.norm.cdf((threshold - logits) / noise_std)
  load = p_selected.mean(axis=0)
  return (jnp.std(load) / jnp.mean(load)) ** 2
