"""Mixtures of experts: sparse routing against a brute-force reference, the capacity,
the auxiliary losses, SparseMoe and SoftMoe against independent computations,
PatchMerger's merge unchanged, parameter names, and the `model.moe` config."""
import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from configs import common, fashion_mnist
from patchmerger.errors import ConfigError
from patchmerger.models import (PatchMerger, build_model, experts, routing, soft_moe,
                                sparse_moe)
from patchmerger.models.mlp import MlpBlock
from tests.test_cli import _run, error_lines


# Independent references (plain numpy and Python loops).

def reference_positions(gates: np.ndarray, k: int, capacity: int,
                        batch_priority: bool) -> np.ndarray:
  """[S, E] buffer position of each (token, expert), -1 where not chosen or dropped.

  One counter per expert; all first choices are placed before any second choice;
  within a choice tokens go in order, or by their highest gate with batch priority."""
  num_tokens, num_experts = gates.shape
  choices = [sorted(range(num_experts), key=lambda e: -gates[t, e])[:k]
             for t in range(num_tokens)]
  order = list(range(num_tokens))
  if batch_priority:
    order.sort(key=lambda t: -max(gates[t]))
  count = [0] * num_experts
  position = np.full((num_tokens, num_experts), -1)
  for choice in range(k):
    for t in order:
      e = choices[t][choice]
      if count[e] < capacity:
        position[t, e] = count[e]
        count[e] += 1
  return position


def positions_of(dispatch: np.ndarray) -> np.ndarray:
  """[S, E, C] bool -> [S, E] position, -1 where empty; checks one slot at most."""
  dispatch = np.asarray(dispatch)
  assert dispatch.dtype == np.bool_
  assert dispatch.sum(-1).max(initial=0) <= 1  # A (token, expert) takes one position.
  assert dispatch.sum(0).max(initial=0) <= 1  # A position holds one token.
  return np.where(dispatch.any(-1), dispatch.argmax(-1), -1)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def gelu(x: np.ndarray) -> np.ndarray:  # flax's nn.gelu: the tanh approximation.
  return 0.5 * x * (1. + np.tanh(math.sqrt(2. / math.pi) * (x + 0.044715 * x ** 3)))


def mlp(params: dict, x: np.ndarray) -> np.ndarray:
  d0, d1 = params['Dense_0'], params['Dense_1']
  hidden = gelu(x @ np.asarray(d0['kernel'], np.float64) + np.asarray(d0['bias'], np.float64))
  return hidden @ np.asarray(d1['kernel'], np.float64) + np.asarray(d1['bias'], np.float64)


def expert_params(stacked: dict, e: int) -> dict:
  return jax.tree.map(lambda a: np.asarray(a[e]), stacked)


def random_params(module: nn.Module, x: jax.Array, seed: int, scale: float = 0.3) -> dict:
  """The module's parameter tree (from an abstract init: no compile) with every entry
  drawn from N(0, scale^2), so that experts, biases and routers are all distinct."""
  shapes = jax.eval_shape(functools.partial(module.init, deterministic=True),
                          jax.random.key(0), x)['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype),
                      shapes)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _route_both(gates, k, capacity):
  """top_experts_per_token without and with batch priority: one compile for both."""
  return {priority: routing.top_experts_per_token(gates, k, capacity, priority)
          for priority in (False, True)}


def _route(gates, k, capacity, batch_priority):
  return _route_both(jnp.asarray(gates), k, capacity)[batch_priority]


def _random_gates(rng, num_tokens, num_experts, scale=2.):
  logits = scale * rng.standard_normal((num_tokens, num_experts))
  return softmax(logits, -1).astype(np.float32)


# 1. Routing.

def test_routing_equals_brute_force_reference_on_random_cases():
  drops = second_choices_kept = 0
  for seed in range(12):
    rng = np.random.default_rng(seed)
    num_tokens, num_experts = int(rng.integers(5, 41)), int(rng.integers(2, 9))
    k = int(rng.integers(1, min(3, num_experts) + 1))
    capacity = int(rng.integers(1, max(2, math.ceil(num_tokens * k / num_experts)) + 1))
    gates = _random_gates(rng, num_tokens, num_experts)
    routed = _route_both(jnp.asarray(gates), k, capacity)
    for batch_priority, (dispatch, combine) in routed.items():
      assert dispatch.shape == combine.shape == (num_tokens, num_experts, capacity)
      expected = reference_positions(gates, k, capacity, batch_priority)
      np.testing.assert_array_equal(positions_of(dispatch), expected,
                                    err_msg=f'seed {seed}, S={num_tokens}, E={num_experts}, '
                                    f'k={k}, C={capacity}, priority={batch_priority}')
      kept = np.asarray(dispatch)
      np.testing.assert_array_equal(np.asarray(combine),
                                    np.where(kept, gates[:, :, None], 0.))
      # No expert over capacity; drops are exactly what exceeds it.
      top = np.argsort(-gates, axis=1)[:, :k]
      demand = np.bincount(top.ravel(), minlength=num_experts)
      np.testing.assert_array_equal(kept.sum((0, 2)), np.minimum(demand, capacity))
      drops += int((demand - np.minimum(demand, capacity)).sum())
      if k > 1:
        second_choices_kept += int(kept[np.arange(num_tokens), top[:, 1]].sum())
  # The cases exercised drops and kept second choices, so the comparisons mean something.
  assert drops > 50 and second_choices_kept > 20, (drops, second_choices_kept)


def test_every_first_choice_is_placed_before_any_second_choice():
  # Token 0 prefers expert 0 then 1; token 1 expert 1 then 0; token 2 expert 0.
  # Token-major filling would give expert 0's second position to token 1's second
  # choice and drop token 2's first choice; choice-major keeps token 2.
  gates = np.array([[.7, .3], [.4, .6], [.8, .2]], np.float32)
  dispatch, combine = _route(jnp.asarray(gates), 2, 2, False)
  np.testing.assert_array_equal(positions_of(dispatch), [[0, 1], [-1, 0], [1, -1]])
  np.testing.assert_array_equal(np.asarray(combine).sum(-1),
                                np.where([[1, 1], [0, 1], [1, 0]], gates, 0.))


@pytest.mark.parametrize('capacity,without,with_priority', [
    (1, [0, -1, -1], [-1, 0, -1]),
    (2, [0, 1, -1], [-1, 0, 1]),
])
def test_batch_priority_lets_the_highest_top_gate_win(capacity, without, with_priority):
  # All prefer expert 0; top gates .6, .9, .7: with priority token 1, then token 2.
  gates = np.array([[.6, .4], [.9, .1], [.7, .3]], np.float32)
  for priority, expected in ((False, without), (True, with_priority)):
    dispatch, combine = _route(jnp.asarray(gates), 1, capacity, priority)
    np.testing.assert_array_equal(positions_of(dispatch)[:, 0], expected)
    np.testing.assert_array_equal(positions_of(dispatch)[:, 1], [-1, -1, -1])
    np.testing.assert_array_equal(np.asarray(combine).sum((1, 2)),
                                  np.where(np.array(expected) >= 0, gates[:, 0], 0.))


# 2. Capacity.

@pytest.mark.parametrize('tokens,num_experts,k,factor,expected', [
    (16, 8, 2, 1.05, 8),       # 4.2 -> 5 -> 8
    (128, 8, 2, 1.05, 36),     # 33.6 -> 34 -> 36
    (64, 4, 1, 1.0, 16),       # 16 exactly
    (10, 4, 1, 1.0, 4),        # 2.5 -> 3 -> 4
    (17, 4, 1, 1.0, 8),        # 4.25 -> 5 -> 8
    (1, 32, 2, 1.05, 4),       # 0.066 -> 1 -> 4
    (1568, 32, 2, 1.05, 104),  # 8 images of 196 tokens: 102.9 -> 103 -> 104
    (40, 2, 1, 1.05, 24),      # 21 -> 24
    (8, 2, 2, 1.0, 8),
])
def test_capacity_table(tokens, num_experts, k, factor, expected):
  assert routing.capacity(tokens, num_experts, k, factor) == expected


def test_capacity_without_a_position_is_a_config_error():
  with pytest.raises(ConfigError, match='no buffer position'):
    routing.capacity(16, 8, 2, 0.)
  # A config never gets there: experts.resolve refuses a capacity factor of 0.
  with pytest.raises(ConfigError, match='capacity_factor'):
    experts.resolve(dict(kind='sparse', capacity_factor=0.), 4)


# 3. Auxiliary losses.

def _cv2(values: np.ndarray) -> float:
  values = np.asarray(values, np.float64)
  mean = values.mean()
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))  # Population std.
  return (std / mean) ** 2


@pytest.mark.parametrize('tokens,num_experts,k', [(7, 3, 1), (24, 8, 2), (40, 5, 3)])
def test_auxiliary_losses_equal_numpy(tokens, num_experts, k):
  rng = np.random.default_rng(tokens)
  logits = rng.standard_normal((tokens, num_experts)).astype(np.float32)
  noise_std = 1. / num_experts
  noisy = (logits + noise_std * rng.standard_normal(logits.shape)).astype(np.float32)
  gates = softmax(logits, -1).astype(np.float32)

  importance = jax.jit(routing.importance_loss)(jnp.asarray(gates))
  expected_importance = _cv2(gates.astype(np.float64).sum(0))
  assert expected_importance > 1e-4  # Not a degenerate zero.
  np.testing.assert_allclose(float(importance), expected_importance, rtol=1e-4)

  load = jax.jit(routing.load_loss, static_argnums=(2, 3))(
      jnp.asarray(logits), jnp.asarray(noisy), noise_std, k)
  threshold = np.array([sorted(row, reverse=True)[k - 1] for row in noisy.astype(np.float64)])
  p = 1. - stats.norm.cdf((threshold[:, None] - logits.astype(np.float64)) / noise_std)
  expected_load = _cv2(p.mean(0))
  assert expected_load > 1e-4
  np.testing.assert_allclose(float(load), expected_load, rtol=1e-4)


# 4. SparseMoe.

def _sparse_spec(num_experts, k, factor, group_images, batch_priority=False):
  return experts.MoeSpec(kind='sparse', layers=(0,), num_experts=num_experts,
                         num_selected_experts=k, capacity_factor=factor,
                         eval_capacity_factor=factor, batch_priority=batch_priority,
                         eval_batch_priority=batch_priority, group_images=group_images,
                         noise_std=0.)


@pytest.mark.parametrize('deterministic', [True, False])
def test_sparse_moe_of_identical_experts_with_all_selected_is_the_dense_mlp(deterministic):
  num_experts, dim, hidden = 4, 16, 32
  x = jax.random.normal(jax.random.key(1), (4, 6, dim))
  dense = MlpBlock(mlp_dim=hidden)
  dense_params = random_params(dense, x, seed=2)  # Non-trivial biases too.
  moe = sparse_moe.SparseMoe(spec=_sparse_spec(num_experts, num_experts, 4., 2),
                             mlp_dim=hidden)
  params = random_params(moe, x, seed=4)
  tiled = jax.tree.map(lambda a: jnp.tile(a[None], (num_experts,) + (1,) * a.ndim),
                       dense_params)
  assert jax.tree.map(jnp.shape, tiled) == jax.tree.map(jnp.shape, params['Mlp'])
  params = dict(params, Mlp=tiled)

  y, state = jax.jit(functools.partial(moe.apply, deterministic=deterministic,
                                       mutable=['moe']))({'params': params}, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(dense.apply({'params': dense_params},
                                                                     x, True)), atol=1e-5)
  metrics = {name: values[0] for name, values in state['moe'].items()}
  # 0 up to float32 rounding (under jit 1 - 96/96 comes out as -3e-8); one drop is 1/96.
  assert abs(float(metrics['dropped_fraction'])) < 1e-6
  # The sown importance loss: numpy's, per group of 2 images, averaged over groups.
  kernel = np.asarray(params['Router']['dense']['kernel'], np.float64)
  groups = np.asarray(x, np.float64).reshape(2, 12, dim)
  expected = np.mean([_cv2(softmax(g @ kernel, -1).sum(0)) for g in groups])
  np.testing.assert_allclose(float(metrics['importance_loss']), expected, rtol=1e-4)
  np.testing.assert_allclose(float(metrics['auxiliary_loss']), 0.005 * expected, rtol=1e-4)
  assert 'load_loss' not in metrics  # noise_std 0: no load loss.


@pytest.mark.parametrize('batch_priority', [False, True])
def test_sparse_moe_with_drops_equals_the_reference(batch_priority):
  num_experts, k, dim, hidden = 4, 2, 16, 24
  x = jax.random.normal(jax.random.key(5), (4, 8, dim))
  # Groups of 2 images, 16 tokens: capacity ceil(16 * 2 * 0.5 / 4) = 4 of 32 assignments.
  moe = sparse_moe.SparseMoe(spec=_sparse_spec(num_experts, k, .5, 2, batch_priority),
                             mlp_dim=hidden)
  params = random_params(moe, x, seed=7)
  params['Router']['dense']['kernel'] = 2. * params['Router']['dense']['kernel']
  y, state = jax.jit(functools.partial(moe.apply, deterministic=True, mutable=['moe']))(
      {'params': params}, x)

  kernel = np.asarray(params['Router']['dense']['kernel'], np.float64)
  groups = np.asarray(x, np.float64).reshape(2, 16, dim)
  outputs = np.zeros_like(groups)
  kept = 0
  for g, tokens in enumerate(groups):
    gates = softmax(tokens @ kernel, -1).astype(np.float32)
    position = reference_positions(gates, k, 4, batch_priority)
    kept += int((position >= 0).sum())
    for e in range(num_experts):
      out = mlp(expert_params(params['Mlp'], e), tokens)
      outputs[g] += np.where(position[:, e:e + 1] >= 0, gates[:, e:e + 1] * out, 0.)
  assert 0 < kept < 2 * 16 * k  # Something was dropped, something kept.
  np.testing.assert_allclose(np.asarray(y), outputs.reshape(x.shape), atol=1e-5)
  np.testing.assert_allclose(float(state['moe']['dropped_fraction'][0]),
                             1. - kept / (2 * 16 * k), atol=1e-7)


# 5. SoftMoe.

def _soft_spec(num_experts=4, slots=2, group_images=1, **fields):
  return experts.resolve(dict(kind='soft', num_experts=num_experts, num_slots=slots,
                              group_images=group_images, layers=(0,), **fields), 1)


def test_soft_moe_weights_are_convex_and_match_the_formulas(monkeypatch):
  num_experts, slots, dim, hidden, tokens = 4, 2, 16, 24, 6
  x = jax.random.normal(jax.random.key(8), (2, tokens, dim))
  moe = soft_moe.SoftMoe(spec=_soft_spec(num_experts, slots), mlp_dim=hidden)
  params = random_params(moe, x, seed=10)
  params['Router']['scale'] = jnp.asarray(3.)  # Not 1: the scale must be used.

  captured = {}
  run_experts = experts.run_experts

  def spy(mlps, buffers):
    captured['buffers'] = buffers
    captured['outputs'] = run_experts(mlps, buffers)
    return captured['outputs']

  monkeypatch.setattr(experts, 'run_experts', spy)
  y, state = moe.apply({'params': params}, x, True, mutable=['moe'])
  slots_total = num_experts * slots
  buffers = np.asarray(captured['buffers'], np.float64).reshape(2, slots_total, dim)
  outputs = np.asarray(captured['outputs'], np.float64).reshape(2, slots_total, dim)
  y = np.asarray(y, np.float64)

  # Independent logits: L2-normalised tokens and slot vectors, times the scale.
  mu = np.asarray(params['Router']['mu'], np.float64)
  mu = mu / np.sqrt((mu ** 2).sum(0, keepdims=True) + 1e-6)
  dispatch_max, combine_max = [], []
  for g in range(2):
    tokens_g = np.asarray(x[g], np.float64)
    normed = tokens_g / np.sqrt((tokens_g ** 2).sum(-1, keepdims=True) + 1e-6)
    logits = 3. * np.einsum('sd,dep->sep', normed, mu).reshape(tokens, slots_total)
    # The module's weights, recovered from what it computed: buffers = D^T x (x has
    # full row rank: 6 tokens of 16 dims) and y = C outputs (8 slot outputs of 16 dims).
    dispatch = np.linalg.lstsq(tokens_g.T, buffers[g].T, rcond=None)[0]  # [S, slots]
    combine = np.linalg.lstsq(outputs[g].T, y[g].T, rcond=None)[0].T  # [S, slots]
    np.testing.assert_allclose(dispatch.sum(0), 1., atol=1e-4)  # Over tokens, per slot.
    np.testing.assert_allclose(combine.sum(1), 1., atol=1e-4)  # Over all slots, per token.
    assert dispatch.min() > -1e-4 and combine.min() > -1e-4
    np.testing.assert_allclose(dispatch, softmax(logits, 0), atol=1e-4)
    np.testing.assert_allclose(combine, softmax(logits, 1), atol=1e-4)
    dispatch_max.append(softmax(logits, 0).max(0))
    combine_max.append(softmax(logits, 1).max(1))
  np.testing.assert_allclose(float(state['moe']['dispatch_weights_max_mean'][0]),
                             np.mean(dispatch_max), rtol=1e-5)
  np.testing.assert_allclose(float(state['moe']['combine_weights_max_mean'][0]),
                             np.mean(combine_max), rtol=1e-5)
  assert np.mean(dispatch_max) < 0.99  # Not one-hot: the sums above are not trivial.


def test_soft_moe_is_permutation_equivariant_within_an_image():
  x = jax.random.normal(jax.random.key(11), (2, 9, 16))
  moe = soft_moe.SoftMoe(spec=_soft_spec(4, 2), mlp_dim=24)
  params = random_params(moe, x, seed=13)
  apply = jax.jit(lambda inputs: moe.apply({'params': params}, inputs, True))
  perm = np.random.default_rng(0).permutation(9)
  y, y_perm = np.asarray(apply(x)), np.asarray(apply(x[:, perm]))
  np.testing.assert_allclose(y_perm, y[:, perm], atol=1e-5)
  assert not np.allclose(y_perm, y, atol=1e-3)  # The output does depend on the token.


def test_soft_moe_without_a_slot_is_a_config_error_naming_the_cause():
  spec = experts.resolve(dict(kind='soft', num_experts=128, num_slots=0, capacity_factor=1.0,
                              group_images=1, layers=(0,)), 1)
  assert spec.num_slots is None
  moe = soft_moe.SoftMoe(spec=spec, mlp_dim=8)
  with pytest.raises(ConfigError) as error:
    moe.init(jax.random.key(0), jnp.zeros((1, 4, 8)), True)
  message = str(error.value)
  assert '4 tokens per group' in message and '128 experts' in message
  assert '= 0 slots' in message and 'num_slots' in message
  # With enough tokens the same spec gets round(256 / 128) = 2 slots per expert.
  assert soft_moe.num_slots(spec, 256) == 2


# 6. PatchMerger's merge, unchanged.

@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('merge_normalized', [True, False])
def test_patch_merger_is_the_old_formula_bit_for_bit(dtype, merge_normalized):
  x = jax.random.normal(jax.random.key(14), (2, 10, 16))
  merger = PatchMerger(num_tokens=3, dtype=dtype, merge_normalized=merge_normalized)
  params = merger.init(jax.random.key(15), x)['params']
  params['kernel'] = 4. * params['kernel']  # Sharper weights.
  y = merger.apply({'params': params}, x)

  normed = nn.LayerNorm(dtype=dtype).apply({'params': params['LayerNorm_0']}, x)
  scores = jnp.einsum('bnd,dm->bnm', normed, params['kernel'].astype(dtype))
  weights = jax.nn.softmax(scores.astype(jnp.float32), axis=1)
  values = normed if merge_normalized else x
  expected = jnp.einsum('bnm,bnd->bmd', weights.astype(dtype), values.astype(dtype))
  assert y.dtype == expected.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(expected, np.float32))


# 7. Parameter names and shapes.

def _tiny_model_config(spec: str = 'none'):
  config = fashion_mnist.get_config(f'merger=4@1,experts={spec}')
  config.model.update(width=16, depth=4, mlp_dim=32, num_heads=2, conv_stem=())
  return config.model


def _shapes(model_config):
  model = build_model(model_config, 10)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  flat = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  return {name: value.shape for name, value in flat.items()}


@pytest.mark.parametrize('spec,moe_blocks,router', [
    ('sparse:4x2@1+3', (1, 3), {'Router/dense/kernel': (16, 4)}),
    ('soft:4x2', (2, 3), {'Router/mu': (16, 4, 2), 'Router/scale': ()}),
])
def test_moe_parameter_names_and_shapes(spec, moe_blocks, router):
  shapes = _shapes(_tiny_model_config(spec))
  expert = {'Mlp/Dense_0/kernel': (4, 16, 32), 'Mlp/Dense_0/bias': (4, 32),
            'Mlp/Dense_1/kernel': (4, 32, 16), 'Mlp/Dense_1/bias': (4, 16)}
  for block in range(4):
    prefix = f'Transformer/encoderblock_{block}/'
    own = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    if block in moe_blocks:
      moe = {k[len('Moe/'):]: v for k, v in own.items() if k.startswith('Moe/')}
      assert moe == expert | router, block
      assert not any(k.startswith('MlpBlock_3') for k in own)
    else:
      assert own['MlpBlock_3/Dense_0/kernel'] == (16, 32)
      assert not any(k.startswith('Moe') for k in own)
  assert shapes['Transformer/patchmerger_1/kernel'] == (16, 4)


def test_kind_none_is_the_model_without_a_moe_section():
  with_none = _tiny_model_config('none')
  assert with_none.moe.kind == 'none'
  without = with_none.to_dict()
  del without['moe']
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 1)), jnp.float32)
  trees = [jax.jit(build_model(c, 10).init)(jax.random.key(0), images)['params']
           for c in (with_none, without)]
  assert jax.tree.structure(trees[0]) == jax.tree.structure(trees[1])
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, *trees)))


# 8. The config.

@pytest.mark.parametrize('spec,fields', [
    ('none', dict(kind='none')),
    ('sparse', dict(kind='sparse')),
    ('sparse:8x2@every2', dict(kind='sparse', num_experts=8, num_selected_experts=2,
                               layers='every2')),
    ('soft:16@last2', dict(kind='soft', num_experts=16, layers='last2')),
    ('soft:16x2', dict(kind='soft', num_experts=16, num_slots=2)),
    ('sparse:4x1@1+3', dict(kind='sparse', num_experts=4, num_selected_experts=1,
                            layers=(1, 3))),
])
def test_parse_experts(spec, fields):
  assert common.parse_experts(spec) == fields


@pytest.mark.parametrize('spec', ['dense:4', 'sparse:x2', 'sparse:8@', 'soft:a', 'sparse:8x',
                                  'sparse:@1', 'sparse:4@1+'])
def test_parse_experts_refuses_bad_specs_in_one_line(spec):
  with pytest.raises(ValueError) as error:
    common.parse_experts(spec)
  assert str(error.value).startswith(f'Bad experts spec {spec!r}')
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('fields,message', [
    (dict(kind='sparse', num_experts=4, num_selected_experts=5), 'num_selected_experts'),
    (dict(kind='sparse', layers=(1, 4)), 'in 0..3 for a depth of 4'),
    (dict(kind='sparse', layers='every0'), "'everyN'"),
    (dict(kind='sparse', top_k=2), "Unknown model.moe field(s) ['top_k']"),
    (dict(kind='dense'), "got 'dense'"),
    (dict(kind='sparse', capacity_factor=0.), 'capacity_factor'),
    (dict(kind='soft', group_images=0), 'group_images must be >= 1'),
    (dict(kind='soft', num_slots=-1), 'num_slots'),
])
def test_resolve_refuses_bad_values(fields, message):
  with pytest.raises(ConfigError) as error:
    experts.resolve(fields, 4)
  assert message in str(error.value)


def test_resolve_fills_defaults_and_layers():
  assert experts.resolve_layers('every2', 4) == (1, 3)
  assert experts.resolve_layers('last2', 4) == (2, 3)
  assert experts.resolve_layers('lasthalf', 12) == tuple(range(6, 12))
  assert experts.resolve_layers((3, 1), 4) == (1, 3)
  assert experts.resolve(None, 4) is None
  assert experts.resolve(common.moe_config('none'), 4) is None
  sparse = experts.resolve(common.moe_config('sparse:8x1@1+3'), 4)
  assert (sparse.num_experts, sparse.num_selected_experts, sparse.layers) == (8, 1, (1, 3))
  assert (sparse.capacity_factor, sparse.eval_capacity_factor, sparse.group_images,
          sparse.noise_std) == (1.05, 1.05, 8, 1.0)
  soft = experts.resolve(common.moe_config('soft'), 12)
  assert (soft.num_experts, soft.num_slots, soft.layers, soft.group_images,
          soft.noise_std) == (128, 1, tuple(range(6, 12)), 1, 0.)


def test_models_with_experts_refuse_scan_and_tome():
  scanned = _tiny_model_config('sparse:4x2')
  scanned.scan = True
  with pytest.raises(ConfigError, match='model.moe with model.scan'):
    build_model(scanned, 10)
  tome = _tiny_model_config('sparse:4x2')
  tome.merger = None
  tome.reducer.kind = 'tome'
  with pytest.raises(ConfigError, match='model.moe with ToMe'):
    build_model(tome, 10)


def test_cli_refuses_a_bad_experts_spec_in_one_line(tmp_path):
  workdir = tmp_path / 'run'
  code, stderr = _run('train.py', '--config=configs/fashion_mnist.py:experts=dense:4',
                      f'--workdir={workdir}')
  lines = error_lines(stderr)
  assert code != 0 and len(lines) == 1, stderr[-2000:]
  assert lines[0].startswith("error: Bad experts spec 'dense:4'"), lines
  assert not workdir.exists()


@pytest.mark.parametrize('kind', ['sparse', 'soft'])
def test_rematerialised_blocks_give_the_same_gradients_and_metrics(kind):
  fields = dict(variant='Ti/8', width=32, depth=2, mlp_dim=64, num_heads=2, classifier='gap',
                merger=None, moe=dict(kind=kind, num_experts=4, layers=(1,), group_images=2))
  images = jax.random.normal(jax.random.key(3), (4, 16, 16, 1))

  def gradients(model, params):
    def loss(p):
      logits, state = model.apply({'params': p}, images, train=True, mutable=['moe'],
                                  rngs={'dropout': jax.random.key(1), 'gating': jax.random.key(2)})
      aux, metrics = experts.summarise(state['moe'])
      return logits.sum() + aux, metrics
    return jax.jit(jax.grad(loss, has_aux=True))(params)

  plain = build_model(fields, 10)
  params = plain.init(jax.random.key(0), images[:1])['params']
  expected, expected_metrics = gradients(plain, params)
  got, metrics = gradients(build_model(dict(fields, remat_policy='full'), 10), params)
  assert metrics.keys() == expected_metrics.keys() and len(metrics) >= 3
  for key in metrics:
    np.testing.assert_allclose(metrics[key], expected_metrics[key], rtol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
