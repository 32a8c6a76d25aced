"""The PatchMerger module: shapes, convex weights, permutation invariance, dtypes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchmerger.models import PatchMerger


def _apply(module, x, seed=0):
  variables = module.init(jax.random.key(seed), x)
  y, state = module.apply(variables, x, mutable=['intermediates'])
  return variables, y, state['intermediates']['merge_weights'][0]


@pytest.mark.parametrize('num_inputs', [1, 49, 196, 577])
def test_any_number_of_inputs_gives_m_outputs(num_inputs):
  x = jax.random.normal(jax.random.key(1), (2, num_inputs, 32))
  _, y, weights = _apply(PatchMerger(num_tokens=8), x)
  assert y.shape == (2, 8, 32)
  assert weights.shape == (2, 8, num_inputs)


def test_merge_weights_are_convex():
  x = 3. * jax.random.normal(jax.random.key(2), (4, 49, 32))
  _, _, weights = _apply(PatchMerger(num_tokens=8), x)
  assert bool(jnp.all(weights >= 0))
  np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1., atol=1e-6)


def test_output_is_weighted_sum_of_normalised_inputs():
  x = jax.random.normal(jax.random.key(3), (2, 10, 16))
  merger = PatchMerger(num_tokens=3)
  variables, y, weights = _apply(merger, x)
  mean = x.mean(-1, keepdims=True)
  normed = (x - mean) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)  # LN at init.
  np.testing.assert_allclose(np.asarray(y), np.asarray(weights @ normed), atol=1e-5)
  scores = jnp.einsum('bnd,dm->bmn', normed, variables['params']['kernel'])
  np.testing.assert_allclose(np.asarray(weights),
                             np.asarray(jax.nn.softmax(scores, -1)), atol=1e-6)


def test_permuting_inputs_leaves_output_unchanged():
  x = jax.random.normal(jax.random.key(4), (2, 49, 32))
  merger = PatchMerger(num_tokens=8)
  variables = merger.init(jax.random.key(0), x)
  perm = np.random.default_rng(0).permutation(49)
  y = merger.apply(variables, x)
  y_perm = merger.apply(variables, x[:, perm])
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_perm), atol=1e-5)
  # And it is not trivially constant: other inputs give other outputs.
  assert not np.allclose(np.asarray(y), np.asarray(merger.apply(variables, x[::-1])))


def test_bfloat16_compute_keeps_float32_softmax():
  x = jax.random.normal(jax.random.key(5), (2, 49, 32))
  merger = PatchMerger(num_tokens=8, dtype=jnp.bfloat16)
  _, y, weights = _apply(merger, x)
  assert y.dtype == jnp.bfloat16
  assert weights.dtype == jnp.float32
  _, y32, _ = _apply(PatchMerger(num_tokens=8), x)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32), atol=5e-2)


def test_merging_raw_stream_option():
  x = 5. + jax.random.normal(jax.random.key(6), (1, 12, 16))
  _, y, weights = _apply(PatchMerger(num_tokens=2, merge_normalized=False), x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(weights @ x), atol=1e-4)


def test_rejects_unbatched_input():
  with pytest.raises(ValueError, match=r'\[batch, tokens, dim\]'):
    PatchMerger(num_tokens=2).init(jax.random.key(0), jnp.zeros((10, 16)))
