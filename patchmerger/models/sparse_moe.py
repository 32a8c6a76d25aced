"""V-MoE's sparse mixture of experts (Riquelme et al., 2021, arXiv 2106.05974),
computed as google-research/vmoe computes it; our own implementation.

Tokens route in groups of whole images. In each group a bias-free router scores
every token for every expert; in training, Gaussian noise of std noise_std / E is
added to the scores. The gates are a softmax over all experts. Each token goes to
its k highest-gated experts while their buffers of `routing.capacity` positions
last, and comes back as the sum of those experts' outputs weighted by their gates
(not renormalised over the k). A dropped assignment adds nothing; a token with no
expert keeps only the block's residual.

Parameters: `Moe/Router/dense/kernel` [D, E], `Moe/Mlp/Dense_{0,1}` stacked on E.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from patchmerger.models import experts, routing


class Router(nn.Module, kw_only=True):
  """Gate logits [..., E] of every token for every expert."""
  num_experts: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return nn.Dense(self.num_experts, use_bias=False, dtype=self.dtype, name='dense')(x)


class SparseMoe(experts.MoeLayer, kw_only=True):
  """[batch, N, D] -> [batch, N, D]. Sows into the 'moe' collection: the auxiliary
  loss (weighted importance and load losses, mean over groups) and the fraction of
  token-expert assignments dropped at capacity."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    spec = self.spec
    num_experts, k = spec.num_experts, spec.num_selected_experts
    batch, tokens, dim = x.shape
    groups = self.groups(x)  # [G, S, D]
    train = not deterministic
    capacity = routing.capacity(groups.shape[1], num_experts, k,
                                spec.capacity_factor if train else spec.eval_capacity_factor)

    logits = Router(num_experts=num_experts, dtype=self.dtype, name='Router')(groups)
    logits = logits.astype(jnp.float32)
    importance = jax.vmap(routing.importance_loss)(jax.nn.softmax(logits))
    losses = {'importance_loss': (spec.importance_loss_weight, importance)}
    if train and spec.noise_std > 0:
      noise_std = spec.noise_std / num_experts
      noisy = logits + noise_std * jax.random.normal(self.make_rng('gating'), logits.shape)
      load = jax.vmap(functools.partial(routing.load_loss, noise_std=noise_std,
                                        num_selected=k))(logits, noisy)
      losses['load_loss'] = (spec.load_loss_weight, load)
      logits = noisy
    gates = experts.by_group(jax.nn.softmax(logits))
    dispatch, combine = jax.vmap(functools.partial(
        routing.top_experts_per_token, num_selected=k, capacity_per_expert=capacity,
        batch_priority=spec.batch_priority if train else spec.eval_batch_priority))(gates)

    dispatch, combine = experts.by_group(dispatch), experts.by_group(combine)
    buffers = jnp.einsum('gsec,gsd->gecd', dispatch.astype(self.dtype),
                         groups.astype(self.dtype))
    outputs = experts.run_experts(self.expert_mlps(deterministic), buffers)
    y = experts.by_group(jnp.einsum('gsec,gecd->gsd', combine.astype(self.dtype), outputs))

    # As vmoe's _weighted_sum: a loss of weight 0 is left out (its value may be NaN).
    self.sow('moe', 'auxiliary_loss', sum(
        (w * jnp.mean(v) for w, v in losses.values() if w > 0), jnp.zeros(())))
    for name, (_, value) in losses.items():
      self.sow('moe', name, jnp.mean(value))
    assignments = groups.shape[0] * groups.shape[1] * k  # Counted exactly, in integers.
    self.sow('moe', 'dropped_fraction',
             (assignments - dispatch.sum(dtype=jnp.int32)).astype(jnp.float32) / assignments)
    return y.reshape(batch, tokens, -1)
