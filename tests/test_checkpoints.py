"""Checkpoint layouts in and out: every layout loads to the same logits or is refused."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchmerger.checkpoints import export, layouts, loading, model_config
from patchmerger.models import VisionTransformer
from patchmerger.training import metrics
from tests import tiny

SMALL = dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2)


def _model(**overrides):
  return VisionTransformer(**({'num_classes': 10, 'classifier': 'token'} | SMALL | overrides))


def _init(model, size=32, seed=0):
  return model.init(jax.random.key(seed), jnp.ones((1, size, size, 3)))['params']


def _random_params(model, seed=1):
  """Random values in every parameter (init leaves heads, biases and cls at zero)."""
  rng = np.random.default_rng(seed)
  return loading.unflatten({k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
                            for k, v in loading.flatten(_init(model)).items()})


def _images(size=32, n=3):
  return jnp.asarray(np.random.default_rng(0).standard_normal((n, size, size, 3)), jnp.float32)


def _logits(model, params, size=32):
  return np.asarray(model.apply({'params': params}, _images(size)))


def _big_vision_spelling(flat, stacked, prefix=False, inline_map=False):
  """Our weights written as big_vision names them, from its model definition: per-type
  block names, position embedding added before the class token, optional scan stacking,
  `params/` prefix and inline MAP head."""
  renamed = {'LayerNorm_0': 'LayerNorm_0', 'MultiHeadDotProductAttention_1':
             'MultiHeadDotProductAttention_0', 'LayerNorm_2': 'LayerNorm_1',
             'MlpBlock_3': 'MlpBlock_0'}
  out, blocks = {}, {}
  for key, value in flat.items():
    parts = key.split('/')
    if key == 'Transformer/posembed_input/pos_embedding':
      if 'cls' in flat:  # big_vision: cls + its position row is one learned vector.
        out['cls'] = flat['cls'] + value[:, :1]
        value = value[:, 1:]
      out['pos_embedding'] = value
    elif key == 'cls':
      out.setdefault('cls', value)
    elif parts[1:2] and parts[1].startswith('encoderblock_'):
      name = '/'.join([renamed[parts[2]]] + parts[3:])
      if stacked:
        blocks.setdefault(name, []).append(value)
      else:
        out['/'.join(parts[:2] + [name])] = value
    elif inline_map and parts[0] == 'MAPHead_0':
      out['/'.join(parts[1:])] = value
    else:
      out[key] = value
  out.update({f'Transformer/encoderblock/{k}': np.stack(v) for k, v in blocks.items()})
  if prefix:
    out = {f'params/{k}': v for k, v in out.items()} | {'opt/mu/cls': np.zeros(1)}
  return out


@pytest.mark.parametrize('classifier', ['token', 'gap', 'map'])
@pytest.mark.parametrize('spelling,expected', [
    ('vision_transformer', 'vision_transformer'),
    ('big_vision', 'big_vision (Linen per-type names, position embedding without class-token '
     'row)'),
    ('big_vision_stacked', 'big_vision (stacked blocks, Linen per-type names, position '
     'embedding without class-token row)'),
    ('big_vision_stacked_prefix_inline_map', 'big_vision (stacked blocks, Linen per-type '
     'names, position embedding without class-token row, inline MAP head, params/ prefix)'),
])
def test_every_layout_loads_to_the_same_logits(classifier, spelling, expected, tmp_path):
  model = _model(classifier=classifier)
  params = _random_params(model)
  flat = loading.flatten(params)
  if spelling != 'vision_transformer':
    flat = _big_vision_spelling(flat, stacked='stacked' in spelling, prefix='prefix' in spelling,
                                inline_map='inline_map' in spelling and classifier == 'map')
  np.savez(tmp_path / 'w.npz', **flat)
  loaded, layout = loading.load(str(tmp_path / 'w.npz'))
  if classifier != 'map' or 'inline_map' not in spelling:
    expected = expected.replace(', inline MAP head', '')
  assert layout.describe() == expected
  adapted, report = loading.adapt(loaded, _init(model, seed=5), has_cls=classifier == 'token',
                                  layout=layout.describe())
  assert not report.missing and not report.new and not report.resized
  assert len(report.loaded) == len(loading.flatten(params))
  ours = _logits(model, params)
  assert np.abs(ours).max() > 0.1  # Not a trivial all-zero comparison.
  np.testing.assert_allclose(_logits(model, adapted), ours, atol=1e-5, rtol=0)


def test_old_big_vision_posemb_with_class_row_keeps_it():
  model = _model()
  flat = loading.flatten(_random_params(model))
  spelled = {('pos_embedding' if k == layouts.POSEMB else k): v for k, v in flat.items()}
  converted, layout = layouts.to_canonical(spelled)
  assert layout.top_level_posemb
  np.testing.assert_array_equal(converted[layouts.POSEMB], flat[layouts.POSEMB])


def test_missing_backbone_parameters_are_refused_naming_layout_and_count():
  model = _model(classifier='gap')
  flat = loading.flatten(_random_params(model))
  # Unconverted Linen names: what the earlier loader silently left at init.
  broken = {k.replace('LayerNorm_2', 'LayerNorm_1').replace('MlpBlock_3', 'MlpBlock_0'): v
            for k, v in flat.items()}
  with pytest.raises(loading.PretrainedMismatchError,
                     match=r'\(big_vision \(Linen per-type names\)\) would leave 12 of 39 model '
                           r'parameters at their initialisation \(Transformer/encoderblock_0/'
                           r'LayerNorm_2/scale, .*, \.\.\.\)\. .*init_strict=False'):
    loading.adapt(broken, _init(model), has_cls=False, layout='big_vision (Linen per-type names)')
  adapted, report = loading.adapt(broken, _init(model), has_cls=False, strict=False)
  assert len(report.missing) == 12 and len(report.dropped) == 12


def test_inserted_merger_new_head_and_resolution_are_allowed():
  upstream = _model(representation_size=16)
  params = _init(upstream, 32)
  downstream = _model(num_classes=5, mergers=((1, 4),))
  adapted, report = loading.adapt(loading.flatten(params), _init(downstream, 48), has_cls=True)
  assert report.resized == [layouts.POSEMB]
  assert set(report.new) == {'Transformer/patchmerger_1/kernel',
                             'Transformer/patchmerger_1/LayerNorm_0/scale',
                             'Transformer/patchmerger_1/LayerNorm_0/bias'}
  assert sorted(report.reinitialised) == ['head/bias', 'head/kernel'] and not report.missing
  assert report.dropped == ['pre_logits/bias', 'pre_logits/kernel']
  assert adapted['head']['kernel'].shape == (32, 5) and not adapted['head']['kernel'].any()
  assert downstream.apply({'params': adapted}, _images(48)).shape == (3, 5)


def test_dont_load_keeps_the_initialisation():
  params = _init(_model())
  fresh = _init(_model())
  fresh['head']['kernel'] = fresh['head']['kernel'] + 3.
  adapted, report = loading.adapt(loading.flatten(params), fresh, has_cls=True,
                                  dont_load=('head/.*',))
  assert sorted(report.reinitialised) == ['head/bias', 'head/kernel']
  assert (adapted['head']['kernel'] == 3.).all()
  np.testing.assert_array_equal(adapted['cls'], params['cls'])


def test_mismatched_weights_name_the_first_bad_key():
  params = _init(_model())
  with pytest.raises(loading.PretrainedMismatchError,
                     match=r'(cls|embedding/\w+|Transformer/\S+) has shape .* in the checkpoint'):
    loading.adapt(loading.flatten(params), _init(_model(width=48)), has_cls=True)


def test_posemb_resize_identity_and_smooth_with_class_token_kept():
  rng = np.random.default_rng(0)
  posemb = rng.standard_normal((1, 1 + 14 * 14, 4)).astype(np.float32)
  np.testing.assert_array_equal(loading.resize_posemb(posemb, 1 + 196, True), posemb)
  ramp = np.linspace(0, 1, 14, dtype=np.float32)
  grid = (ramp[:, None] + ramp[None, :])[..., None].repeat(4, -1).reshape(1, 196, 4)
  posemb = np.concatenate([np.full((1, 1, 4), 7., np.float32), grid], axis=1)
  resized = loading.resize_posemb(posemb, 1 + 24 * 24, True)
  assert resized.shape == (1, 1 + 576, 4)
  np.testing.assert_array_equal(resized[:, 0], posemb[:, 0])  # The class token is untouched.
  new_grid = resized[0, 1:, 0].reshape(24, 24)
  assert new_grid.min() >= -1e-6 and new_grid.max() <= 2 + 1e-6
  steps = np.diff(new_grid, axis=1)[2:-2, 2:-2]
  assert np.all(steps > 0) and np.ptp(steps) < 1e-5  # Monotone, evenly spaced inside.


@pytest.mark.parametrize('fmt', ['npz', 'big_vision'])
@pytest.mark.parametrize('overrides', [dict(mergers=((1, 4),)), dict(classifier='gap'),
                                       dict(classifier='map')])
def test_export_round_trips_to_identical_logits(fmt, overrides, tmp_path):
  model = _model(**overrides)
  params = _random_params(model)
  path = str(tmp_path / 'w.npz')
  export.export(params, fmt, path)
  with np.load(path) as data:
    stacked = any(k.startswith('Transformer/encoderblock/') for k in data.files)
  assert stacked == (fmt == 'big_vision')
  loaded, layout = loading.load(path)
  assert layout.name == ('big_vision' if fmt == 'big_vision' else 'vision_transformer')
  adapted, report = loading.adapt(loaded, _init(model, seed=3),
                                  has_cls=model.classifier == 'token')
  assert not report.missing and not report.new and not report.dropped
  np.testing.assert_array_equal(_logits(model, adapted), _logits(model, params))


def test_transformers_export_opens_with_from_pretrained(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  model = _model(num_classes=4)
  params = _random_params(model)
  export.export(params, 'transformers', str(tmp_path / 'hf'))
  reloaded = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / 'hf')).eval()
  images = np.asarray(_images())
  with torch.no_grad():
    theirs = reloaded(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()
  ours = _logits(model, params)
  assert np.abs(ours).max() > 0.1
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize('overrides,reason', [
    (dict(mergers=((1, 4),)), 'has no token merging, and this model has patchmerger_1'),
    (dict(classifier='gap'), 'classifies from the class token'),
])
def test_transformers_export_refuses_what_it_cannot_hold(overrides, reason, tmp_path):
  with pytest.raises(ValueError, match=reason):
    export.export(_init(_model(**overrides)), 'transformers', str(tmp_path / 'hf'))
  assert not (tmp_path / 'hf').exists()


def test_finetuning_from_a_big_vision_export_of_a_run(tmp_path, caplog):
  upstream = tiny.tiny_config(total_steps=4, **{'evals.test.every': 4}, checkpoint_every=4)
  tiny.run(str(tmp_path / 'up'), upstream)
  export.export(loading.load_orbax_params(str(tmp_path / 'up')), 'big_vision',
                str(tmp_path / 'bv.npz'))
  caplog.set_level('INFO')
  for source in ('up', 'bv.npz'):
    finetune = tiny.tiny_config(total_steps=2, **{'evals.test.every': 2}, checkpoint_every=2,
                                init_from=str(tmp_path / source))
    tiny.run(str(tmp_path / f'ft_{source}'), finetune)
    with open(tmp_path / f'ft_{source}' / 'init_report.json') as f:
      report = json.load(f)
    assert report['init_from'] == str(tmp_path / source)
    assert not report['missing'] and not report['new'] and not report['reinitialised']
    assert len(report['loaded']) == len(loading.load_orbax_params(str(tmp_path / 'up')))
  with open(tmp_path / 'ft_bv.npz' / 'init_report.json') as f:
    assert json.load(f)['layout'].startswith('big_vision (stacked blocks')
  first_loss = lambda d: [r['train/loss'] for r in metrics.read_metrics(str(tmp_path / d))
                          if 'train/loss' in r][0]
  assert first_loss('ft_up') == first_loss('ft_bv.npz')  # The same weights either way.
  tiny.run(str(tmp_path / 'scratch'), tiny.tiny_config(total_steps=2, **{'evals.test.every': 2},
                                                       checkpoint_every=2))
  assert first_loss('ft_up') != first_loss('scratch')  # It did not start from the init.


def test_refused_weights_leave_no_workdir(tmp_path):
  upstream = tiny.tiny_config(total_steps=3)
  tiny.run(str(tmp_path / 'up'), upstream)
  flat = loading.load_orbax_params(str(tmp_path / 'up'))
  np.savez(tmp_path / 'partial.npz', **{k: v for k, v in flat.items() if 'encoderblock_1' not in k})
  before = os.path.getmtime(tmp_path / 'partial.npz'), (tmp_path / 'partial.npz').read_bytes()
  finetune = tiny.tiny_config(init_from=str(tmp_path / 'partial.npz'))
  with pytest.raises(loading.PretrainedMismatchError, match=r'vision_transformer\) would leave'):
    tiny.run(str(tmp_path / 'ft'), finetune)
  assert not (tmp_path / 'ft').exists()
  assert (os.path.getmtime(tmp_path / 'partial.npz'),
          (tmp_path / 'partial.npz').read_bytes()) == before
  finetune.init_strict = False
  tiny.run(str(tmp_path / 'ft'), finetune)
  with open(tmp_path / 'ft' / 'init_report.json') as f:
    assert len(json.load(f)['missing']) > 0


def test_export_command_writes_npz_and_a_transformers_directory_for_a_merger_run(tmp_path):
  import subprocess
  import sys
  from tests import test_cli
  tiny.run(str(tmp_path), tiny.tiny_config(total_steps=3))
  env = dict(os.environ, PYTHONPATH=test_cli.ROOT)
  command = [sys.executable, 'export.py', f'--workdir={tmp_path}']
  done = subprocess.run(command + ['--to=npz'], cwd=test_cli.ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'to {tmp_path}/export/params.npz' in done.stdout
  loaded, layout = loading.load(str(tmp_path / 'export' / 'params.npz'))
  saved = loading.load_orbax_params(str(tmp_path))
  assert layout.name == 'vision_transformer' and loaded.keys() == saved.keys()
  for key in saved:
    np.testing.assert_array_equal(loaded[key], saved[key])
  # A PatchMerger model goes to transformers with our own modeling code (tests/test_hf_export.py
  # checks its logits); a resolution of the run's own is accepted too.
  done = subprocess.run(command + ['--to=transformers', '--image_size=32'], cwd=test_cli.ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  directory = tmp_path / 'export' / 'transformers'
  with open(directory / 'config.json') as f:
    written = json.load(f)
  assert written['auto_map']['AutoModelForImageClassification'].startswith(
      'modeling_patchmerger_vit.') and written['mergers'] == [[1, 4]]
  assert (directory / 'modeling_patchmerger_vit.py').exists()
  assert (directory / 'patchmerger_model.json').exists()
  # Reading parameters names what is missing: a step, or a run directory.
  from patchmerger import errors as errors_lib
  with pytest.raises(errors_lib.CheckpointNotFoundError, match=r'No checkpoint at step 5 .*\[3\]'):
    loading.load_orbax_params(str(tmp_path), step=5)
  with pytest.raises(errors_lib.CheckpointNotFoundError, match='is not a run directory'):
    loading.load_orbax_params(str(tmp_path / 'export' / 'params.npz'))


def _tiny_model_config(**model):
  config = tiny.tiny_config()
  for key, value in (dict(classifier='token', merger=None) | model).items():
    if isinstance(value, dict) and key != 'merger':
      config.model[key].update(value)
    else:
      config.model[key] = value
  return config.model


def test_transformers_export_writes_tome_models_with_their_schedule(tmp_path):
  """ToMe has no parameters: only the model config tells the merges, and the export keeps
  them (its logits: tests/test_hf_export.py)."""
  pytest.importorskip('transformers')
  config = _tiny_model_config(reducer={'kind': 'tome', 'r': 2})
  params = _init(_model(patch_size=8, width=16, depth=2, mlp_dim=32, num_heads=2,
                        posemb=config.posemb), size=32)
  export.export(params, 'transformers', str(tmp_path / 'hf'), model_config=config)
  with open(tmp_path / 'hf' / 'config.json') as f:
    written = json.load(f)
  assert written['reducer'] == 'tome' and written['tome_r'] == [2, 2]
  assert written['tome_proportional_attention'] is True
  assert 'auto_map' in written  # Our code, not the stock ViT, which cannot merge.


@pytest.mark.parametrize('fmt, out, beside', [
    ('npz', 'w.npz', 'w.model.json'), ('big_vision', 'w.npz', 'w.model.json'),
    ('transformers', 'hf', 'hf/patchmerger_model.json')])
def test_every_export_writes_the_model_config_beside_the_weights(fmt, out, beside, tmp_path):
  if fmt == 'transformers':
    pytest.importorskip('transformers')
  config = _tiny_model_config()
  model = _model(patch_size=8, width=16, depth=2, mlp_dim=32, num_heads=2)
  export.export(_init(model), fmt, str(tmp_path / out), model_config=config)
  with open(tmp_path / beside) as f:
    written = json.load(f)
  assert written == json.loads(config.to_json_best_effort())
  # Read back from the export (a transformers directory also holds transformers' own
  # config.json, which is not ours).
  assert model_config.saved(str(tmp_path / out)) == written
  changed = _tiny_model_config(classifier='gap')
  assert model_config.differences(written, changed) == ['classifier: token -> gap']


def test_runs_record_their_config_and_a_changed_model_is_reported(tmp_path, caplog):
  upstream = tiny.tiny_config(total_steps=2, **{'evals.test.every': 2}, checkpoint_every=2)
  upstream.model.merger = None
  tiny.run(str(tmp_path / 'up'), upstream)
  assert model_config.saved(str(tmp_path / 'up')) == json.loads(
      upstream.model.to_json_best_effort())
  # Fine-tuning with a merger inserted: allowed, and reported.
  finetune = tiny.tiny_config(total_steps=2, **{'evals.test.every': 2}, checkpoint_every=2,
                              init_from=str(tmp_path / 'up'))
  caplog.set_level('WARNING')
  tiny.run(str(tmp_path / 'ft'), finetune)
  with open(tmp_path / 'ft' / 'init_report.json') as f:
    assert json.load(f)['model_changes'] == ['mergers: [] -> [[1, 4]]']
  assert 'this config differs in mergers: [] -> [[1, 4]]' in caplog.text
  # The export command reads the run's config; without one it says what to pass.
  import subprocess
  import sys
  from tests import test_cli
  env = dict(os.environ, PYTHONPATH=test_cli.ROOT)
  os.remove(tmp_path / 'up' / model_config.RUN_CONFIG)
  refused = subprocess.run([sys.executable, 'export.py',
                            f'--workdir={tmp_path / "up"}', '--to=npz'], cwd=test_cli.ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
  errors = test_cli.error_lines(refused.stderr)
  assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-2000:]
  assert 'config.json does not exist: pass the run\'s config, e.g. --config=' in errors[0]
  assert not (tmp_path / 'up' / 'export').exists()


def test_transformers_export_without_torch_names_the_install(tmp_path, monkeypatch):
  import sys
  from patchmerger import cli, errors
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` raises ImportError.
  params = _init(_model(patch_size=8, width=16, depth=2, mlp_dim=32, num_heads=2))
  run = lambda: export.export(params, 'transformers', str(tmp_path / 'hf'),
                              model_config=_tiny_model_config())
  with pytest.raises(errors.MissingDependencyError, match='needs torch and transformers'):
    run()
  with pytest.raises(SystemExit) as exit_info:  # One line at the command line.
    cli.run_reporting_errors(run)
  assert exit_info.value.code == 2 and not (tmp_path / 'hf').exists()
