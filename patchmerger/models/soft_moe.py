"""Soft MoE (Puigcerver et al., 2023, arXiv 2308.00951), computed as
google-research/vmoe's projects/soft_moe computes it; our own implementation.

Tokens route in groups of whole images. Tokens and the learned slot vectors
`Router/mu` [D, E, slots] are L2-normalised and their dot products scaled by the
learned `Router/scale`. Each slot's input is a softmax over the group's tokens of
those logits: PatchMerger's merge (patch_merger.merge_tokens, the same function).
Expert e processes its slots, and each token's output is a softmax over all E x
slots of the same logits, weighting the slots' outputs. Nothing is dropped and
there is no auxiliary loss.

Parameters: `Moe/Router/{mu, scale}`, `Moe/Mlp/Dense_{0,1}` stacked on E.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from patchmerger.errors import ConfigError
from patchmerger.models import experts
from patchmerger.models.patch_merger import merge_tokens


def l2_normalize(x: jnp.ndarray, axis: int) -> jnp.ndarray:
  """x / |x| with vmoe's epsilon: x * rsqrt(sum(x^2) + 1e-6)."""
  return x * jax.lax.rsqrt(jnp.square(x).sum(axis=axis, keepdims=True) + 1e-6)


def num_slots(spec: experts.MoeSpec, tokens_per_image: int) -> int:
  """Slots per expert: `spec.num_slots`, or with None round(S * capacity_factor / E)
  for S tokens in a group of `group_images` as vmoe computes it (one number for
  training and evaluation: it shapes `Router/mu`), which must leave every expert a slot."""
  if spec.num_slots is not None:
    return spec.num_slots
  factor, group_tokens = spec.capacity_factor, tokens_per_image * spec.group_images
  slots = int(round(group_tokens * factor / spec.num_experts))
  if slots < 1:
    raise ConfigError(
        f'Soft MoE: {group_tokens} tokens per group, {spec.num_experts} experts and capacity '
        f'factor {factor} give each expert round({group_tokens} x {factor} / '
        f'{spec.num_experts}) = 0 slots; set model.moe.num_slots, or raise '
        'capacity_factor or group_images.')
  return slots


class SoftRouter(nn.Module, kw_only=True):
  """Logits [G, S, E, slots] of every token for every slot."""
  num_experts: int
  num_slots: int
  noise_std: float = 0.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    dim = x.shape[-1]
    x = l2_normalize(x.astype(self.dtype), axis=-1)
    mu = self.param('mu', nn.initializers.lecun_normal(),
                    (dim, self.num_experts, self.num_slots), jnp.float32)
    mu = l2_normalize(mu.astype(self.dtype), axis=0)
    scale = self.param('scale', nn.initializers.ones, (), jnp.float32).astype(self.dtype)
    if x.size < mu.size:  # Scale whichever operand is smaller (vmoe's choice).
      x = x * scale
    else:
      mu = mu * scale
    logits = jnp.einsum('gsd,dep->gsep', x, mu)
    if not deterministic and self.noise_std > 0:
      logits = logits + self.noise_std * jax.random.normal(
          self.make_rng('gating'), logits.shape, logits.dtype)
    return logits


class SoftMoe(experts.MoeLayer, kw_only=True):
  """[batch, N, D] -> [batch, N, D]. Sows the mean over tokens of the largest combine
  weight and over slots of the largest dispatch weight into the 'moe' collection."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    spec = self.spec
    batch, tokens, dim = x.shape
    groups = self.groups(x)  # [G, S, D]
    num_groups, group_tokens, _ = groups.shape
    slots = num_slots(spec, tokens)
    logits = SoftRouter(num_experts=spec.num_experts, num_slots=slots,
                        noise_std=spec.noise_std, dtype=self.dtype, name='Router')(
                            groups, deterministic)
    logits = experts.by_group(
        logits.reshape(num_groups, group_tokens, spec.num_experts * slots))
    buffers, dispatch = merge_tokens(logits, groups, self.dtype)  # [G, E * slots, D]
    outputs = experts.run_experts(self.expert_mlps(deterministic),
                                  buffers.reshape(num_groups, spec.num_experts, slots, dim))
    combine = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # Over all slots.
    y = experts.by_group(jnp.einsum('gsn,gnd->gsd', combine.astype(self.dtype),
                                    outputs.reshape(num_groups, spec.num_experts * slots, -1)))
    self.sow('moe', 'combine_weights_max_mean', combine.max(axis=-1).mean())
    self.sow('moe', 'dispatch_weights_max_mean', dispatch.max(axis=1).mean())
    return y.reshape(batch, tokens, -1)
