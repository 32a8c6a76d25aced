"""Scanned and rematerialised blocks give the unrolled model's logits and gradients,
and checkpoints convert between the stacked and unrolled layouts."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchmerger.checkpoints import layouts, loading
from patchmerger.models import VisionTransformer
from patchmerger.models.encoder import block_runs

DEPTH = 4
# Mergers before block 0, in the middle and before the last block.
PLACES = {'first': ((0, 6),), 'middle': ((2, 6),), 'last': ((DEPTH - 1, 6),),
          'two': ((1, 8), (3, 4))}


def _model(mergers, **fields):
  return VisionTransformer(num_classes=5, patch_size=4, width=16, depth=DEPTH, mlp_dim=32,
                           num_heads=2, mergers=mergers, classifier='token', **fields)


def _random_params(model, images):
  """Initial parameters with a random head (it starts at zero) and non-trivial norms."""
  params = loading.flatten(model.init(jax.random.key(0), images[:1])['params'])
  rng = np.random.default_rng(1)
  return {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
          for k, v in params.items()}


def _logits_and_grads(model, params, images, labels):
  """Logits and gradients in full float32 (GPUs would otherwise use TF32 matmuls)."""
  with jax.default_matmul_precision('float32'):
    return _logits_and_grads_traced(model, params, images, labels)


def _logits_and_grads_traced(model, params, images, labels):
  def loss(p):
    logits = model.apply({'params': p}, images)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return np.asarray(logits), loading.flatten(grads)


def _inputs():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal((3, 16, 16, 3)), jnp.float32),
          jnp.asarray(rng.integers(0, 5, 3)))


def test_block_runs_split_at_the_reducers():
  assert block_runs(4, []) == [(0, 4)]
  assert block_runs(4, [0]) == [(0, 4)]
  assert block_runs(4, [2]) == [(0, 2), (2, 4)]
  assert block_runs(4, [3]) == [(0, 3), (3, 4)]
  assert block_runs(6, [1, 3]) == [(0, 1), (1, 3), (3, 6)]


@pytest.mark.parametrize('place', PLACES)
def test_scan_gives_the_unrolled_logits_and_gradients(place):
  images, labels = _inputs()
  unrolled, scanned = _model(PLACES[place]), _model(PLACES[place], scan=True)
  flat = _random_params(unrolled, images)
  runs = {start: stop - start for start, stop in block_runs(DEPTH, [b for b, _ in PLACES[place]])}
  stacked = layouts.stack_runs(flat, runs)
  # The conversion yields exactly the scanned model's parameter tree.
  expected = flax.traverse_util.flatten_dict(
      jax.eval_shape(scanned.init, jax.random.key(0), images[:1])['params'], sep='/')
  assert {k: v.shape for k, v in stacked.items()} == {k: v.shape for k, v in expected.items()}
  assert layouts.scanned_runs(stacked) == runs
  assert layouts.unstack_runs(stacked).keys() == flat.keys()

  logits_u, grads_u = _logits_and_grads(unrolled, loading.unflatten(flat), images, labels)
  logits_s, grads_s = _logits_and_grads(scanned, loading.unflatten(stacked), images, labels)
  assert np.abs(logits_u).max() > 0.1  # Not a trivial comparison.
  np.testing.assert_allclose(logits_s, logits_u, atol=1e-5, rtol=0)
  grads_s = layouts.unstack_runs(grads_s)
  assert grads_s.keys() == grads_u.keys()
  for key in grads_u:
    np.testing.assert_allclose(grads_s[key], grads_u[key], atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.parametrize('scan', [False, True])
@pytest.mark.parametrize('policy', ['full', 'dots_saveable'])
def test_remat_gives_the_same_gradients(scan, policy):
  images, labels = _inputs()
  mergers = PLACES['middle']
  plain = _model(mergers, scan=scan)
  flat = _random_params(_model(mergers), images)
  if scan:
    flat = layouts.stack_runs(flat, {0: 2, 2: 2})
  params = loading.unflatten(flat)
  logits, grads = _logits_and_grads(plain, params, images, labels)
  logits_r, grads_r = _logits_and_grads(plain.clone(remat_policy=policy), params, images, labels)
  np.testing.assert_allclose(logits_r, logits, atol=1e-6, rtol=0)
  for key in grads:
    np.testing.assert_allclose(grads_r[key], grads[key], atol=1e-6, rtol=0, err_msg=key)


def test_checkpoints_load_into_either_layout():
  images, _ = _inputs()
  mergers = PLACES['middle']
  unrolled, scanned = _model(mergers), _model(mergers, scan=True)
  flat = _random_params(unrolled, images)
  # Unrolled weights into the scanned model (a plain public checkpoint, say) ...
  scanned_init = scanned.init(jax.random.key(1), images[:1])['params']
  params_s, report = loading.adapt(flat, scanned_init, has_cls=True)
  assert not report.missing and len(report.loaded) == len(flat)
  assert set(loading.flatten(params_s)) == set(loading.flatten(scanned_init))
  logits_u = unrolled.apply({'params': loading.unflatten(flat)}, images)
  np.testing.assert_allclose(scanned.apply({'params': params_s}, images), logits_u, atol=1e-5)
  # ... and scanned weights (one of our scan=True runs) back into the unrolled one.
  canonical, layout = layouts.to_canonical(loading.flatten(params_s))
  assert layout.scanned_runs and 'scanned runs' in layout.describe()
  params_u, _ = loading.adapt(canonical, unrolled.init(jax.random.key(2), images[:1])['params'],
                              has_cls=True)
  np.testing.assert_allclose(unrolled.apply({'params': params_u}, images), logits_u, atol=1e-5)


def test_bad_scan_and_remat_settings_fail_clearly():
  with pytest.raises(ValueError, match='remat_policy'):
    _model((), remat_policy='sometimes')
  with pytest.raises(ValueError, match='ToMe'):
    VisionTransformer(num_classes=5, patch_size=4, width=16, depth=2, mlp_dim=32, num_heads=2,
                      reducer='tome', tome_r=(1, 1), scan=True)
