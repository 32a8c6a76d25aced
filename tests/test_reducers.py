"""Token reducers: our attention, ToMe, TokenLearner, pooling, and runs through the loop."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import fashion_mnist
from patchmerger import evaluate, flops
from patchmerger.models import build_model, pooling, tome
from patchmerger.models.attention import MultiHeadAttention
from patchmerger.models.tokenlearner import TokenLearner
from patchmerger.training import loop
from tests import tiny

RNG = np.random.default_rng(0)


def _model_config(kind: str, merger: str = '4@1', classifier: str = 'gap', **reducer):
  config = fashion_mnist.get_config(f'merger={merger},reducer={kind}')
  config.model.update(width=16, depth=3, mlp_dim=32, num_heads=2, conv_stem=(),
                      classifier=classifier)
  config.model.reducer.update(reducer)
  return config.model


def _images(batch=2, size=32):
  return jnp.asarray(RNG.standard_normal((batch, size, size, 1)), jnp.float32)


def _block_token_counts(model, images):
  counts = {}
  def record(next_fun, args, kwargs, context):
    name = context.module.name or ''
    if context.method_name == '__call__' and name.startswith('encoderblock_'):
      counts[int(name.split('_')[1])] = args[0].shape[1]
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    variables = model.init(jax.random.key(0), images)
  return variables, [counts[i] for i in range(model.depth)]


# Attention.

def test_attention_equals_flax_attention_with_the_same_parameters():
  x = jnp.asarray(RNG.standard_normal((2, 7, 24)), jnp.float32)
  ours = MultiHeadAttention(num_heads=3)
  reference = nn.MultiHeadDotProductAttention(
      num_heads=3, kernel_init=nn.initializers.xavier_uniform())
  params = ours.init(jax.random.key(1), x)['params']
  reference_params = reference.init(jax.random.key(1), x, x)['params']
  assert (jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference_params))
  np.testing.assert_allclose(ours.apply({'params': params}, x),
                             reference.apply({'params': params}, x, x), atol=1e-5, rtol=1e-5)


def test_attention_returns_its_keys_and_adds_the_bias():
  x = jnp.asarray(RNG.standard_normal((2, 5, 8)), jnp.float32)
  attention = MultiHeadAttention(num_heads=2)
  params = attention.init(jax.random.key(0), x)['params']
  out, keys = attention.apply({'params': params}, x, return_keys=True)
  expected_keys = jnp.einsum('bnd,dhk->bnhk', x, params['key']['kernel']) + params['key']['bias']
  np.testing.assert_allclose(keys, expected_keys, atol=1e-5)
  # A -inf bias on every key but the first: each query reads only the first value.
  bias = jnp.where(jnp.arange(5) == 0, 0., -jnp.inf)[None, None, None, :]
  masked = attention.apply({'params': params}, x, bias)
  first_only = attention.apply({'params': params}, jnp.broadcast_to(x[:, :1], x.shape))
  np.testing.assert_allclose(masked, first_only, atol=1e-5)


def test_proportional_attention_with_all_sizes_one_equals_plain_attention():
  x = jnp.asarray(RNG.standard_normal((2, 6, 8)), jnp.float32)
  attention = MultiHeadAttention(num_heads=2)
  params = attention.init(jax.random.key(0), x)['params']
  bias = tome.proportional_bias(jnp.ones((2, 6, 1)))
  np.testing.assert_array_equal(attention.apply({'params': params}, x, bias),
                                attention.apply({'params': params}, x))
  # Sizes other than 1 do change it (the bias is used).
  sizes = jnp.asarray(RNG.integers(1, 5, (2, 6, 1)), jnp.float32)
  assert not np.allclose(attention.apply({'params': params}, x, tome.proportional_bias(sizes)),
                         attention.apply({'params': params}, x))


# ToMe.

@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_tome_with_r_zero_equals_the_plain_model_exactly(classifier):
  plain = build_model(_model_config('none', classifier=classifier), 10)
  merged = build_model(_model_config('tome', classifier=classifier, r=0), 10)
  assert merged.tome_r == (0, 0, 0)
  images = _images()
  params = plain.init(jax.random.key(0), images)['params']
  np.testing.assert_array_equal(merged.apply({'params': params}, images),
                                plain.apply({'params': params}, images))


def test_tome_merge_keeps_the_size_weighted_mean_and_the_total_size():
  x = jnp.asarray(RNG.standard_normal((3, 11, 6)), jnp.float32)
  keys = jnp.asarray(RNG.standard_normal((3, 11, 2, 4)), jnp.float32)
  sizes = jnp.asarray(RNG.integers(1, 6, (3, 11, 1)), jnp.float32)
  merged, new_sizes = tome.BipartiteMerge(r=4, has_cls_token=False)(x, keys, sizes)
  assert merged.shape == (3, 7, 6) and new_sizes.shape == (3, 7, 1)
  np.testing.assert_allclose(new_sizes.sum(1), sizes.sum(1))
  np.testing.assert_allclose((merged * new_sizes).sum(1), (x * sizes).sum(1), rtol=1e-5,
                             atol=1e-5)


def test_tome_merges_the_most_similar_pairs():
  # Tokens 0..5: A = {0, 2, 4}, B = {1, 3, 5}. Token 2 has the same key as 5, the rest
  # are orthogonal: r = 1 merges 2 into 5, and their values average (sizes 1 and 3).
  keys = jnp.eye(6)[None, :, None, :].at[0, 2, 0].set(jnp.eye(6)[5])
  x = jnp.arange(6, dtype=jnp.float32)[None, :, None]
  sizes = jnp.asarray([1, 1, 1, 1, 1, 3], jnp.float32)[None, :, None]
  merged, new_sizes = tome.BipartiteMerge(r=1, has_cls_token=False)(x, keys, sizes)
  # Unmerged A in their order (0, 4), then B (1, 3, 5 with 2 merged in).
  np.testing.assert_allclose(merged[0, :, 0], [0, 4, 1, 3, (2 * 1 + 5 * 3) / 4])
  np.testing.assert_allclose(new_sizes[0, :, 0], [1, 1, 1, 1, 4])


def test_tome_never_merges_the_class_token():
  # All keys equal: every pair is a perfect match, the class token included.
  x = jnp.asarray(RNG.standard_normal((2, 9, 4)), jnp.float32)
  keys = jnp.ones((2, 9, 2, 3))
  merged, sizes = tome.BipartiteMerge(r=4, has_cls_token=True)(x, keys, None)
  assert merged.shape == (2, 5, 4)
  np.testing.assert_array_equal(merged[:, 0], x[:, 0])
  np.testing.assert_array_equal(sizes[:, 0, 0], [1, 1])
  np.testing.assert_allclose(sizes[:, 1:].sum((1, 2)), [8, 8])
  # r larger than half the patch tokens merges as many as it can.
  merged, sizes = tome.BipartiteMerge(r=100, has_cls_token=True)(x, keys, None)
  assert merged.shape == (2, 5, 4)


@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_tome_model_jits_with_static_shapes_carries_sizes_and_trains(classifier):
  model = build_model(_model_config('tome', classifier=classifier, r=3, start_block=1), 10)
  assert model.tome_r == (0, 3, 3)
  images = _images()
  variables, counts = _block_token_counts(model, images)
  cls = classifier == 'token'
  assert counts == [16 + cls, 16 + cls, 13 + cls]  # Block 1 merges 3 after its attention.
  params = variables['params']
  logits = jax.jit(model.apply)({'params': params}, images)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  # Gradients flow through the merges into every block (the head starts at zero:
  # give it weights, or no gradient reaches the blocks).
  params = {**params, 'head': {**params['head'], 'kernel': jnp.asarray(
      RNG.standard_normal(params['head']['kernel'].shape), jnp.float32)}}
  labels = jax.nn.one_hot(jnp.arange(2), 10)
  def loss(p):
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(model.apply({'params': p}, images)), -1))
  grads = jax.jit(jax.grad(loss))(params)
  for block in range(3):
    block_grads = grads['Transformer'][f'encoderblock_{block}']
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(block_grads))) > 0, block


# TokenLearner and pooling.

def test_tokenlearner_weights_are_a_softmax_over_the_inputs():
  x = jnp.asarray(RNG.standard_normal((2, 10, 8)), jnp.float32)
  learner = TokenLearner(num_tokens=3)
  variables = learner.init(jax.random.key(0), x)
  assert set(variables['params']) == {'LayerNorm_0', 'Dense_0', 'Dense_1'}
  assert variables['params']['Dense_0']['kernel'].shape == (8, 64)
  out, state = learner.apply({'params': variables['params']}, x, mutable=['intermediates'])
  weights = state['intermediates']['merge_weights'][0]
  assert out.shape == (2, 3, 8) and weights.shape == (2, 3, 10)
  assert np.all(weights > 0)
  np.testing.assert_allclose(weights.sum(-1), 1, rtol=1e-6)
  np.testing.assert_allclose(out, jnp.einsum('bmn,bnd->bmd', weights, x), rtol=1e-5, atol=1e-6)


def test_tokenlearner_scoring_mlp_starts_and_drops_out_as_scenics():
  # scenic's MlpBlock: xavier-uniform kernels, normal(1e-6) biases, dropout after the GELU
  # and after the output, at the encoder's rate.
  x = jnp.asarray(RNG.standard_normal((4, 50, 96)), jnp.float32)
  learner = TokenLearner(num_tokens=8, dropout_rate=0.5)
  params = learner.init(jax.random.key(0), x)['params']
  for name, fan_in, fan_out in (('Dense_0', 96, 64), ('Dense_1', 64, 8)):
    kernel, bias = np.asarray(params[name]['kernel']), np.asarray(params[name]['bias'])
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
    np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.1)
    assert 0 < np.abs(bias).max() < 1e-5
  evaluate = learner.apply({'params': params}, x)
  np.testing.assert_array_equal(evaluate, learner.apply({'params': params}, x, True))
  trained = learner.apply({'params': params}, x, False, rngs={'dropout': jax.random.key(1)})
  assert trained.shape == evaluate.shape and not np.allclose(trained, evaluate, atol=1e-3)
  # The model hands its dropout rate to the reducer.
  config = _model_config('tokenlearner')
  config.dropout_rate = 0.25
  rates = []
  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, TokenLearner):
      rates.append(context.module.dropout_rate)
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    build_model(config, 10).init(jax.random.key(0), _images())
  assert rates == [0.25]


def test_pool_equals_a_hand_computed_average():
  grid = np.arange(2 * 16 * 3, dtype=np.float32).reshape(2, 4, 4, 3)  # [batch, h, w, D]
  pool = pooling.TokenPooling(num_tokens=4, grid=(4, 4))
  out, state = pool.apply({}, jnp.asarray(grid.reshape(2, 16, 3)), mutable=['intermediates'])
  expected = grid.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4)).reshape(2, 4, 3)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  assert state['intermediates']['merge_weights'][0].shape == (2, 4, 16)


def test_pool_grids_for_any_token_count():
  assert pooling.output_grid(8, (14, 14)) == (2, 4)
  assert pooling.output_grid(8, (14, 7)) == (4, 2)
  assert pooling.output_grid(9, (4, 4)) == (3, 3)
  weights = pooling.pooling_matrix(8, (14, 14))
  np.testing.assert_allclose(weights.sum(1), 1, rtol=1e-6)
  # 14 columns into 4 windows: widths 4 (0-3), 4 (3-6), 4 (7-10), 4 (10-13).
  assert [int(np.count_nonzero(weights[m].reshape(14, 14)[0])) for m in range(4)] == [4] * 4
  with pytest.raises(ValueError, match='cannot give'):
    pooling.output_grid(25, (4, 4))


@pytest.mark.parametrize('kind', ['patchmerger', 'tokenlearner', 'pool'])
def test_between_block_reducers_keep_the_class_token_and_their_names(kind):
  model = build_model(_model_config(kind, classifier='token'), 10)
  variables, counts = _block_token_counts(model, _images())
  assert counts == [17, 5, 5]
  names = set(variables['params']['Transformer'])
  assert (f'{kind}_1' in names) == (kind != 'pool')
  plain = build_model(_model_config('none', classifier='token'), 10)
  plain_names = set(plain.init(jax.random.key(0), _images())['params']['Transformer'])
  assert names - plain_names == ({f'{kind}_1'} if kind != 'pool' else set())


def test_reducer_kind_is_checked():
  with pytest.raises(ValueError, match='model.reducer.kind must be one of'):
    build_model(_model_config('merge'), 10)


# Through the training loop and evaluation.

@pytest.mark.parametrize('kind', [  # patchmerger and none also run in tests/test_train.py.
    pytest.param('patchmerger', marks=pytest.mark.slow), 'tokenlearner', 'pool', 'tome',
    pytest.param('none', marks=pytest.mark.slow)])
def test_every_reducer_trains_through_the_loop(kind, tmp_path):
  config = tiny.tiny_config(total_steps=2, **{'evals.test.every': 2}, checkpoint_every=2)
  config.model.reducer.update(kind=kind, r=4)
  summary = tiny.run(str(tmp_path), config)
  assert summary['step'] == 2 and math.isfinite(summary['train/loss'])
  assert 0 <= summary['test/accuracy'] <= 1
  plain = build_model(tiny.tiny_config(**{'model.reducer.kind': 'none'}).model, 10)
  plain_gflops = flops.measured_gflops(plain, (32, 32, 1))
  if kind == 'none':
    assert summary['gflops_per_image'] == pytest.approx(plain_gflops)
  else:  # Every reducer saves compute on 16 tokens (4 merged, or 4 per block).
    assert summary['gflops_per_image'] < plain_gflops


def test_a_plain_checkpoint_evaluates_under_tome(tmp_path):
  plain = tiny.tiny_config(total_steps=3, **{'evals.test.every': 3}, checkpoint_every=3)
  plain.model.merger = None
  plain.lr.update(base=0.01, warmup_steps=1)  # Move the zero-initialised head.
  summary = tiny.run(str(tmp_path), plain)
  results = {}
  for r in (0, 4):
    config = tiny.tiny_config()
    config.model.merger = None
    config.model.reducer.update(kind='tome', r=r)
    with tfds.testing.mock_data(num_examples=tiny.MOCK_EXAMPLES):
      results[r] = evaluate.evaluate_checkpoint(
          config, str(tmp_path), tfds.builder(config.dataset),
          skip=('fewshot', 'merge_pictures', 'throughput'))
  assert results[0]['test/accuracy'] == summary['test/accuracy']
  assert results[0]['test/loss'] == pytest.approx(summary['test/loss'], rel=1e-6)
  assert 0 <= results[4]['test/accuracy'] <= 1 and math.isfinite(results[4]['test/loss'])
  assert results[4]['test/loss'] != results[0]['test/loss']  # ToMe did merge.


@pytest.mark.parametrize('name', ['fashion_mnist', 'finetune_digits', 'imagenet21k',
                                  'imagenet2012', 'transfer', 'finetune_folder'])
def test_every_config_takes_the_reducer_arg_and_keeps_its_merger(name):
  import importlib
  module = importlib.import_module(f'configs.{name}')
  default = module.get_config()
  assert default.model.reducer.kind == 'patchmerger' and default.model.reducer.r == 0
  config = module.get_config('reducer=tokenlearner,merger=4@1')
  assert config.model.reducer.kind == 'tokenlearner'
  assert config.model.merger.num_tokens == 4 and config.model.merger.before_block == 1
  config.model.reducer.r = (1, 2)  # An int or one entry per block.
  assert config.model.reducer.r == (1, 2)
