"""Attention through jax.nn.dot_product_attention: the implementation choice, equality
with flax's attention, and bfloat16 against float32."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from patchmerger.checkpoints import loading
from patchmerger.models import VisionTransformer, build_model
from patchmerger.models import attention
from patchmerger.models.attention import MultiHeadAttention, choose_implementation


@pytest.mark.parametrize('implementation', ['xla', 'auto'])
def test_float32_attention_equals_flax_attention(implementation):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 16)), jnp.float32)
  ours = MultiHeadAttention(num_heads=4, implementation=implementation)
  params = ours.init(jax.random.key(0), x)
  flax_attention = nn.MultiHeadDotProductAttention(num_heads=4)
  # The same parameter names and shapes: every checkpoint still loads.
  assert (jax.tree.map(jnp.shape, params)
          == jax.tree.map(jnp.shape, flax_attention.init(jax.random.key(1), x)))
  with jax.default_matmul_precision('float32'):  # No TF32 on GPUs.
    np.testing.assert_allclose(ours.apply(params, x), flax_attention.apply(params, x),
                               atol=1e-5, rtol=0)


def test_auto_picks_cudnn_only_where_it_applies():
  bf16, f32 = jnp.bfloat16, jnp.float32

  def on_gpu(requested, dtype, head_dim, has_bias=False, capability=(9, 0)):  # H100: 9.0
    return choose_implementation(requested, dtype, head_dim, has_bias, backend='gpu',
                                 compute_capability=capability)

  assert on_gpu('auto', bf16, 64) == 'cudnn'
  assert on_gpu('auto', jnp.float16, 128) == 'cudnn'
  assert on_gpu('auto', bf16, 64, capability=(8, 0)) == 'cudnn'  # A100
  assert on_gpu('auto', bf16, 64, capability=(7, 5)) == 'xla'    # T4: no cuDNN SDPA
  assert on_gpu('auto', bf16, 64, capability=(7, 0)) == 'xla'    # V100
  assert on_gpu('auto', f32, 64) == 'xla'                        # f32: no kernel
  assert on_gpu('auto', bf16, 12) == 'xla'                       # head size
  assert on_gpu('auto', bf16, 64, has_bias=True) == 'xla'
  assert on_gpu(None, bf16, 64) == 'xla'
  assert choose_implementation('auto', bf16, 64, backend='cpu') == 'xla'
  assert choose_implementation('auto', bf16, 64, backend='tpu') == 'xla'
  # A 'gpu' backend whose device reports no CUDA capability (here: a CPU) is not taken.
  capability = attention.gpu_compute_capability()
  assert choose_implementation('auto', bf16, 64, backend='gpu') == (
      'cudnn' if capability and capability >= (8, 0) else 'xla')
  assert choose_implementation('cudnn', f32, 64, backend='cpu') == 'cudnn'  # As asked.
  with pytest.raises(ValueError, match='model.attention'):
    choose_implementation('flash', bf16, 64)


def test_cudnn_without_a_gpu_fails_at_build_with_one_line():
  config = common.model_config('Ti/16', 'none', attention='cudnn', dtype='bfloat16')
  if jax.default_backend() == 'gpu':
    pytest.skip('this machine has a GPU')
  with pytest.raises(ValueError, match="model.attention='cudnn' needs an NVIDIA GPU"):
    build_model(config, 10)
  config.attention = 'flash'
  with pytest.raises(ValueError, match='model.attention must be one of'):
    build_model(config, 10)


@pytest.mark.parametrize('scan', [False, True])
def test_bfloat16_forward_is_finite_and_close_to_float32(scan):
  model = VisionTransformer(num_classes=10, patch_size=4, width=32, depth=4, mlp_dim=64,
                            num_heads=4, mergers=((2, 4),), classifier='token', scan=scan,
                            remat_policy='full' if scan else 'none')
  images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 3)), jnp.float32)
  flat = loading.flatten(model.init(jax.random.key(0), images[:1])['params'])
  rng = np.random.default_rng(1)  # A random head: it starts at zero.
  flat = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in flat.items()}
  params = loading.unflatten(flat)
  with jax.default_matmul_precision('float32'):  # The reference: no TF32 on GPUs.
    f32 = np.asarray(model.apply({'params': params}, images))
  bf16 = np.asarray(model.clone(dtype=jnp.bfloat16).apply({'params': params}, images))
  assert bf16.dtype == np.float32  # Logits (and the loss) stay float32.
  assert np.isfinite(bf16).all() and np.abs(f32).max() > 0.1
  assert np.linalg.norm(bf16 - f32) / np.linalg.norm(f32) < 2e-2
