"""Public-layout .npz weights, big_vision spellings, adaptation for fine-tuning."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchmerger import pretrained
from patchmerger.models import VisionTransformer
from patchmerger.training import metrics
from tests import tiny

SMALL = dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2)


def _model(**overrides):
  return VisionTransformer(**({'num_classes': 10, 'classifier': 'token'} | SMALL | overrides))


def _init(model, size=32):
  images = jnp.ones((1, size, size, 3))
  return model.init(jax.random.key(0), images)['params']


def _images(size=32, n=3):
  return jnp.asarray(np.random.default_rng(0).standard_normal((n, size, size, 3)), jnp.float32)


def test_npz_round_trip_gives_identical_logits(tmp_path):
  model = _model(mergers=((1, 4),))
  params = _init(model)
  pretrained.export_npz(params, str(tmp_path / 'w.npz'))
  loaded = pretrained.load_npz(str(tmp_path / 'w.npz'))
  assert 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' in loaded
  assert 'Transformer/patchmerger_1/kernel' in loaded
  other_init = _init(model) | {}
  adapted, report = pretrained.adapt(loaded, other_init, has_cls=True)
  assert not report['new'] and not report['dropped'] and not report['resized']
  np.testing.assert_array_equal(model.apply({'params': adapted}, _images()),
                                model.apply({'params': params}, _images()))


def test_big_vision_scan_layout_loads(tmp_path):
  model = _model()
  params = _init(model)
  flat = pretrained.flatten(params)
  stacked = {}
  for key, value in flat.items():
    if key.startswith('Transformer/encoderblock_'):
      rest = key.split('/', 2)[2]
      stacked.setdefault(f'Transformer/encoderblock/{rest}', []).append(value)
    elif key == pretrained.POSEMB:
      stacked['pos_embedding'] = value
    else:
      stacked[key] = value
  np.savez(tmp_path / 'bv.npz', **{k: np.stack(v) if isinstance(v, list) else v
                                   for k, v in stacked.items()})
  adapted, report = pretrained.adapt(pretrained.load_npz(str(tmp_path / 'bv.npz')), params,
                                     has_cls=True)
  assert len(report['loaded']) == len(flat)
  np.testing.assert_array_equal(model.apply({'params': adapted}, _images()),
                                model.apply({'params': params}, _images()))


def test_posemb_resize_identity_and_smooth_with_class_token_kept():
  rng = np.random.default_rng(0)
  posemb = rng.standard_normal((1, 1 + 14 * 14, 4)).astype(np.float32)
  np.testing.assert_array_equal(pretrained.resize_posemb(posemb, 1 + 196, True), posemb)
  # A linear ramp over the grid stays a ramp (up to interpolation at the border).
  ramp = np.linspace(0, 1, 14, dtype=np.float32)
  grid = (ramp[:, None] + ramp[None, :])[..., None].repeat(4, -1).reshape(1, 196, 4)
  posemb = np.concatenate([np.full((1, 1, 4), 7., np.float32), grid], axis=1)
  resized = pretrained.resize_posemb(posemb, 1 + 24 * 24, True)
  assert resized.shape == (1, 1 + 576, 4)
  np.testing.assert_array_equal(resized[:, 0], posemb[:, 0])  # The class token is untouched.
  new_grid = resized[0, 1:, 0].reshape(24, 24)
  assert new_grid.min() >= -1e-6 and new_grid.max() <= 2 + 1e-6
  steps = np.diff(new_grid, axis=1)[2:-2, 2:-2]
  assert np.all(steps > 0) and np.ptp(steps) < 1e-5  # Monotone, evenly spaced inside.


def test_new_resolution_new_head_and_inserted_merger():
  upstream = _model(representation_size=16)
  params = _init(upstream, 32)
  downstream = _model(num_classes=5, mergers=((1, 4),))
  target = _init(downstream, 48)
  adapted, report = pretrained.adapt(pretrained.flatten(params), target, has_cls=True)
  assert report['resized'] == [pretrained.POSEMB]
  assert set(report['new']) == {'head/kernel', 'head/bias', 'Transformer/patchmerger_1/kernel',
                                'Transformer/patchmerger_1/LayerNorm_0/scale',
                                'Transformer/patchmerger_1/LayerNorm_0/bias'}
  assert report['dropped'] == ['pre_logits/bias', 'pre_logits/kernel']
  assert adapted['head']['kernel'].shape == (32, 5) and not adapted['head']['kernel'].any()
  assert downstream.apply({'params': adapted}, _images(48)).shape == (3, 5)


def test_dont_load_keeps_the_initialisation():
  params = _init(_model())
  fresh = _init(_model())
  fresh['head']['kernel'] = fresh['head']['kernel'] + 3.
  adapted, report = pretrained.adapt(pretrained.flatten(params), fresh, has_cls=True,
                                     dont_load=('head/.*',))
  assert sorted(report['new']) == ['head/bias', 'head/kernel']
  assert (adapted['head']['kernel'] == 3.).all()
  np.testing.assert_array_equal(adapted['cls'], params['cls'])


def test_mismatched_weights_name_the_first_bad_key():
  params = _init(_model())
  with pytest.raises(pretrained.PretrainedMismatchError,
                     match=r'(cls|embedding/\w+|Transformer/\S+) has shape .* in the checkpoint'):
    pretrained.adapt(pretrained.flatten(params), _init(_model(width=48)), has_cls=True)


def test_finetuning_run_starts_from_an_upstream_run(tmp_path, caplog):
  upstream = tiny.tiny_config(total_steps=4, eval_every=4, checkpoint_every=4)
  tiny.run(str(tmp_path / 'up'), upstream)
  finetune = tiny.tiny_config(total_steps=2, eval_every=2, checkpoint_every=2,
                              init_from=str(tmp_path / 'up'))
  caplog.set_level('INFO')
  tiny.run(str(tmp_path / 'ft'), finetune)
  assert 'Pretrained weights: ' in caplog.text
  line = next(l for l in caplog.text.splitlines() if 'Pretrained weights:' in l)
  assert '0 resized [], 0 new [], 0 dropped []' in line, line
  scratch = tiny.tiny_config(total_steps=2, eval_every=2, checkpoint_every=2)
  tiny.run(str(tmp_path / 'scratch'), scratch)
  first = lambda d: [r['train/loss'] for r in metrics.read_metrics(str(tmp_path / d))
                     if 'train/loss' in r][0]
  assert first('ft') != first('scratch')  # It did not start from the initialisation.
