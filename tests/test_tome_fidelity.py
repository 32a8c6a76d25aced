"""ToMe computes what its authors' implementation computes: checked against an independent
numpy reference (tests/tome_reference.py), hand-built sequences and whole ViTs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist
from patchmerger.models import build_model, tome
from tests import tome_reference


def _merge(x, keys, r, class_token):
  """Ours and the reference on one image [N, D], keys [N, 1, dim]."""
  ours, sizes = tome.BipartiteMerge(r, class_token)(
      jnp.asarray(x, jnp.float32)[None], jnp.asarray(keys, jnp.float32)[None], None)
  ref, ref_sizes, _ = tome_reference.bipartite_merge(
      np.asarray(x, np.float64), np.asarray(keys, np.float64), np.ones(len(x)), r, class_token)
  np.testing.assert_allclose(ours[0], ref, atol=1e-6)
  np.testing.assert_allclose(sizes[0, :, 0], ref_sizes)
  return np.asarray(ours[0, :, 0]), np.asarray(sizes[0, :, 0])


def test_the_split_runs_over_the_whole_sequence_class_token_included():
  # Positions: cls, p0 .. p5, valued by position. The reference's split takes A = {cls,
  # p1, p3, p5}, B = {p0, p2, p4}: p1 (cosine 0.995 to p0) and p3 (0.958 to p4) merge.
  # A split of the patches alone (A = {p0, p2, p4}) would merge p0 and p2 both into p1.
  # cls has p0's key: it would be the best match of all, were it not protected.
  keys = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [1, .1, 0, 0], [1, 0, .1, 0],
                   [0, 0, 0, 1], [0, 0, .3, 1], [0, 1, 0, 0]], np.float64)[:, None, :]
  x = np.arange(7.)[:, None]
  merged, sizes = _merge(x, keys, r=2, class_token=True)
  # [cls, unmerged A in position order (p5), B: p0 + p1, p2, p3 + p4].
  np.testing.assert_allclose(merged, [0, 6, 1.5, 3, 4.5])
  np.testing.assert_array_equal(sizes, [1, 1, 2, 1, 2])


def test_without_a_class_token_the_unmerged_keep_their_score_order():
  # A = {t0, t2, t4} with best cosines 0.2, 0.9 (to t3) and 0.71: r = 1 merges t2 into
  # t3, and the unmerged A come out in score order, t4 before t0.
  keys = np.array([[.2, -.5, -.84], [1, 0, 0], [0, .9, .436], [0, 1, 0],
                   [.5, .5, .707], [0, 0, 1]], np.float64)[:, None, :]
  merged, sizes = _merge(np.arange(6.)[:, None], keys, r=1, class_token=False)
  np.testing.assert_allclose(merged, [4, 0, 1, 2.5, 5])
  np.testing.assert_array_equal(sizes, [1, 1, 1, 2, 1])


def test_merges_of_random_sequences_match_the_reference():
  rng = np.random.default_rng(3)
  for class_token in (True, False):
    for n, r in ((11, 3), (12, 5), (9, 100)):  # Odd and even lengths; r over the cap.
      x, keys = rng.standard_normal((n, 5)), rng.standard_normal((n, 2, 4))
      sizes = rng.integers(1, 4, n).astype(np.float64)
      ours, ours_sizes = tome.BipartiteMerge(r, class_token)(
          jnp.asarray(x, jnp.float32)[None], jnp.asarray(keys, jnp.float32)[None],
          jnp.asarray(sizes, jnp.float32)[None, :, None])
      ref, ref_sizes, margin = tome_reference.bipartite_merge(x, keys, sizes, r, class_token)
      assert margin > 1e-4  # Float noise cannot reorder these scores.
      assert ours.shape[1] == n - min(r, (n - class_token) // 2)
      np.testing.assert_allclose(ours[0], ref, atol=1e-5)
      np.testing.assert_allclose(ours_sizes[0, :, 0], ref_sizes)


@pytest.mark.parametrize('r, kwargs, expected', [
    (8, {}, [8] * 12),
    ([4, 2], {}, [4, 2] + [0] * 10),                       # A short list is padded.
    (8, {'inflection': -1.}, [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]),
    (8, {'inflection': 1.}, [0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16]),
    (8, {'inflection': .5}, [4, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12]),
    (8, {'inflection': -1., 'start_block': 3}, [0, 0, 0, 11, 10, 8, 7, 5, 4, 2, 1, 0]),
    ([1, 2, 3, 4], {'start_block': 2}, [0, 0, 3, 4] + [0] * 8),
])
def test_schedules_read_r_as_tome_does(r, kwargs, expected):
  assert list(tome.schedule(r, 12, **kwargs)) == expected
  assert tome_reference.ref_schedule(r, 12, **kwargs) == expected


@pytest.mark.parametrize('r, kwargs, message', [
    ((8, -1.), {}, r'inflection=-1.0'),                    # ToMe's tuple: named, not guessed.
    ([1] * 5, {}, 'at most one per block'),
    ([1, -1], {}, '>= 0'),
    (-1, {}, '>= 0'),
    (8, {'inflection': 2.}, r'\[-1, 1\]'),
    ([1, 2], {'inflection': .5}, 'applies to an int r'),
    ('x', {}, 'int or a list'),
    (1, {'start_block': 4}, 'start_block'),
])
def test_bad_schedules_fail_with_one_line(r, kwargs, message):
  with pytest.raises(ValueError, match=message):
    tome.schedule(r, 4, **kwargs)


def _perturbed_params(model, image_size, seed=0):
  """Initial parameters plus noise, so that every weight (zero-initialised head and
  class token, unit LayerNorm scales) matters."""
  params = jax.jit(model.init)(jax.random.key(seed),
                               jnp.zeros((1, image_size, image_size, 3)))['params']
  leaves, tree = jax.tree.flatten(params)
  noise = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [leaf + 0.2 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, noise)]
  return jax.tree.unflatten(tree, leaves)


def _compare(classifier, image_size, patch, depth, reducer, seed=0, width=64, heads=4):
  config = fashion_mnist.get_config(f'variant=Ti/{patch},merger=none,reducer=tome')
  config.model.update(width=width, depth=depth, mlp_dim=2 * width, num_heads=heads,
                      conv_stem=(), classifier=classifier)
  config.model.reducer.update(reducer)
  model = build_model(config.model, 5)
  params = _perturbed_params(model, image_size, seed)
  images = np.random.default_rng(seed).standard_normal((2, image_size, image_size, 3))
  ours = jax.jit(model.apply)({'params': params}, jnp.asarray(images, jnp.float32))
  numpy_params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  for image, logits in zip(images, ours):
    ref, margin = tome_reference.vit_logits(
        numpy_params, image, patch, classifier, list(model.tome_r),
        proportional=reducer.get('proportional_attention', True),
        size_weighted_gap=reducer.get('size_weighted_gap', False))
    assert margin > 2e-5, margin  # The test is well posed: no near-tie decides a merge.
    assert np.std(ref) > 0.1      # and the logits are far from constant.
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0)
  return model


@pytest.mark.parametrize('reducer', [
    dict(r=8),
    dict(r=[16, 8, 4]),
    dict(r=8, inflection=-1.),
    dict(r=8, start_block=4),
], ids=['int', 'short-list', 'inflection', 'start_block'])
def test_class_token_vit_with_197_tokens_matches_the_reference(reducer):
  # 224px at patch 16: 196 patches and the class token; six blocks keep the compile short.
  model = _compare('token', 224, 16, 6, reducer)
  assert sum(model.tome_r) > 0


@pytest.mark.parametrize('classifier, reducer', [
    ('token', dict(r=3)),
    ('gap', dict(r=3)),
    ('gap', dict(r=[4, 3], size_weighted_gap=True)),
    ('gap', dict(r=3, proportional_attention=False)),
])
def test_the_second_block_merges_in_the_order_the_first_left(classifier, reducer):
  # Two merging blocks: the second splits the first's output, whose order decides its
  # sets A and B; 64 tokens (32px, patch 4) with and without a class token.
  _compare(classifier, 32, 4, 2, reducer, seed=1)


def test_gap_pools_tokens_plainly_unless_asked_to_weight_them_by_size():
  config = fashion_mnist.get_config('variant=Ti/4,merger=none,reducer=tome')
  config.model.update(width=16, depth=2, mlp_dim=32, num_heads=2, conv_stem=(),
                      classifier='gap')
  config.model.reducer.r = 8
  plain_mean = build_model(config.model, 5)
  config.model.reducer.size_weighted_gap = True
  by_size = build_model(config.model, 5)
  params = _perturbed_params(plain_mean, 32)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  assert not np.allclose(jax.jit(plain_mean.apply)({'params': params}, images),
                         jax.jit(by_size.apply)({'params': params}, images), atol=1e-4)
