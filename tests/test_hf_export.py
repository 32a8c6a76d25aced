"""`--to=transformers` with our own modeling code: PatchMergers, GAP/MAP heads, pre-logits,
sincos2d and conv stems open with `AutoModelForImageClassification.from_pretrained(DIR,
trust_remote_code=True)` in a Python that imports no patchmerger, to the JAX logits and
merge weights; so do TokenLearner and pooling in the merger slots, and ToMe in the blocks."""
import json
import os
import pickle
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from patchmerger.checkpoints import export, hf_export, layouts, loading
from patchmerger.models import build_model
from tests import tiny

pytest.importorskip('torch')
pytest.importorskip('transformers')

MERGER = {'num_tokens': 4, 'before_block': 1}
CASES = {
    'merger_gap': dict(merger=MERGER, classifier='gap'),
    'two_mergers_token': dict(depth=3, classifier='token', merger=[
        {'num_tokens': 6, 'before_block': 1}, {'num_tokens': 3, 'before_block': 2}]),
    'merger_token_prelogits': dict(merger=MERGER, classifier='token', representation_size=12),
    'merger_before_0_map': dict(merger={'num_tokens': 5, 'before_block': 0}, classifier='map'),
    'map_prelogits': dict(merger=None, classifier='map', representation_size=8),
    'sincos2d_token': dict(merger=MERGER, classifier='token', posemb='sincos2d'),
    'conv_stem_gap': dict(merger=MERGER, classifier='gap', conv_stem=(8,)),
    'conv_stem2_token': dict(merger=None, classifier='token', conv_stem=(8, 8),
                             posemb='sincos2d'),
    'unnormalized_merge': dict(merger=MERGER, classifier='gap', merge_normalized=False),
    'scanned_runs': dict(merger=MERGER, classifier='token', scan=True),  # Stacked params.
    'tokenlearner_gap': dict(merger=MERGER, classifier='gap', reducer={'kind': 'tokenlearner'}),
    'tokenlearner_token': dict(merger=MERGER, classifier='token',
                               reducer={'kind': 'tokenlearner'}),
    'two_tokenlearners_map': dict(depth=3, classifier='map', reducer={'kind': 'tokenlearner'},
                                  merger=[{'num_tokens': 6, 'before_block': 1},
                                          {'num_tokens': 3, 'before_block': 2}]),
    'pool_token': dict(merger=MERGER, classifier='token', reducer={'kind': 'pool'}),  # 2x2.
    'pool_gap': dict(merger=MERGER, classifier='gap', reducer={'kind': 'pool'}),
    # 4x4 -> 2x3 (overlapping adaptive windows) -> 1x2: the second pool needs the first's grid.
    'two_pools_token': dict(depth=3, classifier='token', reducer={'kind': 'pool'},
                            merger=[{'num_tokens': 6, 'before_block': 1},
                                    {'num_tokens': 2, 'before_block': 2}]),
    'pool_before_0_sincos2d': dict(merger={'num_tokens': 8, 'before_block': 0}, classifier='gap',
                                   posemb='sincos2d', reducer={'kind': 'pool'}),
    # ToMe: 16 patches (+ the class token), merging inside each of 3 blocks; no merge weights.
    'tome_token': dict(depth=3, merger=None, classifier='token', reducer={'kind': 'tome', 'r': 2}),
    'tome_gap': dict(depth=3, merger=None, classifier='gap', reducer={'kind': 'tome', 'r': 2}),
    'tome_gap_size_weighted': dict(depth=3, merger=None, classifier='gap',
                                   reducer={'kind': 'tome', 'r': 2, 'size_weighted_gap': True}),
    'tome_no_proportional': dict(depth=3, merger=None, classifier='token',
                                 reducer={'kind': 'tome', 'r': 2,
                                          'proportional_attention': False}),
    'tome_schedule_list': dict(depth=3, merger=None, classifier='gap',
                               reducer={'kind': 'tome', 'r': [0, 3, 2]}),
    # More merges than A holds: capped at (N - has_cls) // 2, 17 -> 9 -> 5 -> 3 tokens.
    'tome_token_capped': dict(depth=3, merger=None, classifier='token',
                              reducer={'kind': 'tome', 'r': [8, 8, 8]}),
    # The decreasing schedule [6, 3, 0] under a MAP head with pre-logits.
    'tome_map_inflection': dict(depth=3, merger=None, classifier='map', representation_size=8,
                                reducer={'kind': 'tome', 'r': 3, 'inflection': -1.}),
}
# Exported with --image_size: (case, image size); 32px models at 48px (a 6 x 6 patch grid).
RESIZED = {f'{case}_48': (case, 48) for case in (  # Each kind once: heads, stems, reducers.
    'merger_gap', 'merger_before_0_map', 'sincos2d_token', 'conv_stem_gap', 'tokenlearner_token',
    'two_pools_token', 'tome_token')}
# Loads every export in a Python that cannot import this repository, and checks it did not.
LOADER = """
import os, sys, numpy as np, torch
from transformers import AutoModelForImageClassification
for name in sys.argv[1:]:
  own = f'{name}.images.npy'  # Cases at another resolution bring their images.
  images = torch.from_numpy(np.load(own if os.path.exists(own) else 'images.npy'))
  images = images.permute(0, 3, 1, 2)
  model = AutoModelForImageClassification.from_pretrained(name, trust_remote_code=True).eval()
  with torch.no_grad():
    out = model(pixel_values=images)
  np.save(f'{name}.logits.npy', out.logits.numpy())
  for i, weights in enumerate(out.merge_weights):
    np.save(f'{name}.merge{i}.npy', weights.numpy())
assert not any(m.split('.')[0] in ('patchmerger', 'jax', 'flax') for m in sys.modules)
"""


def _clean_env(root) -> dict:
  """No path to this repository, and a Hugging Face home of the test's own."""
  return {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'} | {
      'HF_HOME': str(root / 'hf_home'), 'HF_HUB_OFFLINE': '1'}


def logits_in_clean_process(directory, images: np.ndarray) -> np.ndarray:
  """The logits of the export in `directory` on `images`, computed by a Python that
  imports nothing of this repository."""
  root, name = directory.parent, directory.name
  np.save(root / f'{name}.images.npy', images)
  done = subprocess.run([sys.executable, '-c', LOADER, name], cwd=root, env=_clean_env(root),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return np.load(root / f'{name}.logits.npy')


def _model_config(**overrides) -> dict:
  model = tiny.tiny_config().model.to_dict() | {'attention': 'xla'}
  return model | overrides


def _random_params(model, images):
  """Random values everywhere (init leaves heads, biases and the class token at zero)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images[:1])['params']  # No compute.
  shapes = flax.traverse_util.flatten_dict(shapes, sep='/')
  rng = np.random.default_rng(1)
  return {k: (1 + 0.1 * rng.standard_normal(v.shape) if k.endswith('scale')
              else 0.3 * rng.standard_normal(v.shape)).astype(np.float32)
          for k, v in shapes.items()}


def _apply(model, params, images):
  """Logits and intermediates, jitted: compiling is quicker than running op by op."""
  return jax.jit(lambda p, x: model.apply({'params': p}, x, mutable=['intermediates']))(
      params, images)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """{case: (jax logits, jax merge weights, torch logits, torch merge weights)}, built once
  per session: under pytest-xdist the first worker builds it, the others read its results."""
  if 'PYTEST_XDIST_WORKER' not in os.environ:
    return _export_all(tmp_path_factory.mktemp('hf'))
  from filelock import FileLock  # Comes with transformers.
  root = tmp_path_factory.getbasetemp().parent / 'hf_export'  # Shared by this session's workers.
  with FileLock(f'{root}.lock'):
    if not (root / 'results.pkl').exists():
      root.mkdir()
      results = _export_all(root)
      (root / 'results.pkl').write_bytes(pickle.dumps(results))
    return pickle.loads((root / 'results.pkl').read_bytes())


def _export_all(root) -> dict:
  images = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
  np.save(root / 'images.npy', images)
  ours = {}
  for name, overrides in CASES.items():
    config = _model_config(**overrides)
    model = build_model(config, num_classes=5)
    flat = _random_params(model, images)
    logits, state = _apply(model, loading.unflatten(flat), images)
    merges = [np.asarray(state['intermediates']['Transformer'][f'{model.reducer}_{b}']
                         ['merge_weights'][0]) for b, _ in model.mergers]
    ours[name] = np.asarray(logits), merges
    export.export(flat, 'transformers', str(root / name), model_config=config)
  for name, (case, size) in RESIZED.items():  # Exported for another resolution.
    config = _model_config(**CASES[case])
    model = build_model(config, num_classes=5)
    flat = _random_params(model, images)
    big = np.random.default_rng(2).standard_normal((2, size, size, 3)).astype(np.float32)
    np.save(root / f'{name}.images.npy', big)
    # Our model at that size, its position embedding resized as fine-tuning resizes it.
    init = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), jax.eval_shape(
        model.init, jax.random.key(0), big[:1])['params'])
    params, _ = loading.adapt(layouts.unstack_runs(flat), init,  # As loading reads a run.
                              has_cls=model.classifier == 'token')
    logits, state = _apply(model, params, big)
    merges = [np.asarray(state['intermediates']['Transformer'][f'{model.reducer}_{b}']
                         ['merge_weights'][0]) for b, _ in model.mergers]
    ours[name] = np.asarray(logits), merges
    export.export(flat, 'transformers', str(root / name), model_config=config, image_size=size)
  done = subprocess.run([sys.executable, '-c', LOADER, *CASES, *RESIZED], cwd=root,
                        env=_clean_env(root),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return {name: (*ours[name], np.load(root / f'{name}.logits.npy'),
                 [np.load(root / f'{name}.merge{i}.npy') for i in range(len(ours[name][1]))])
          for name in [*CASES, *RESIZED]} | {'_root': root}


@pytest.mark.parametrize('name', [*CASES, *RESIZED])
def test_exports_give_the_jax_logits_and_merge_weights(name, exported):
  logits, merges, torch_logits, torch_merges = exported[name]
  assert logits.shape == torch_logits.shape == ((2, 5) if name in RESIZED else (3, 5))
  assert np.abs(logits).max() > 0.1  # Not a trivial all-zero comparison.
  print(f'{name}: max abs diff logits {np.abs(logits - torch_logits).max():.2e}, merge weights '
        f'{max((np.abs(a - b).max() for a, b in zip(merges, torch_merges)), default=0):.2e}')
  np.testing.assert_allclose(torch_logits, logits, atol=1e-4, rtol=0)
  merger = CASES[RESIZED[name][0] if name in RESIZED else name]['merger']
  expected = 0 if merger is None else len(merger) if isinstance(merger, list) else 1
  assert len(torch_merges) == len(merges) == expected
  for ours, theirs in zip(merges, torch_merges):
    assert ours.shape == theirs.shape  # [batch, M, N]
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


def test_the_export_directory_holds_our_code_config_and_safetensors(exported):
  directory = exported['_root'] / 'two_mergers_token'
  with open(directory / 'config.json') as f:
    config = json.load(f)
  assert config['auto_map'] == hf_export.AUTO_MAP
  assert config['mergers'] == [[1, 6], [2, 3]] and config['classifier'] == 'token'
  assert config['grid'] == [4, 4] and config['layer_norm_eps'] == 1e-6
  assert config['reducer'] == 'patchmerger'
  assert {*hf_export.CODE_FILES, 'model.safetensors',
          'patchmerger_model.json'} <= set(os.listdir(directory))
  for code in hf_export.CODE_FILES:
    assert 'patchmerger.' not in (directory / code).read_text().replace(
        'patchmerger_vit', '')  # Self-contained: no import of this package.


def test_plain_class_token_vits_still_export_to_the_stock_vit(tmp_path):
  config = _model_config(merger=None, classifier='token')
  model = build_model(config, num_classes=5)
  flat = _random_params(model, np.zeros((1, 32, 32, 3), np.float32))
  export.export(flat, 'transformers', str(tmp_path / 'hf'), model_config=config)
  with open(tmp_path / 'hf' / 'config.json') as f:
    written = json.load(f)
  assert written['model_type'] == 'vit' and 'auto_map' not in written


@pytest.mark.parametrize('kind', ['tokenlearner', 'pool'])
def test_the_config_names_the_reducer(kind, exported):
  with open(exported['_root'] / f'{kind}_token' / 'config.json') as f:
    assert json.load(f)['reducer'] == kind


@pytest.mark.parametrize('name, tome_r, proportional, size_weighted', [
    ('tome_token', [2, 2, 2], True, False), ('tome_schedule_list', [0, 3, 2], True, False),
    ('tome_no_proportional', [2, 2, 2], False, False),
    ('tome_gap_size_weighted', [2, 2, 2], True, True)])
def test_the_config_holds_the_tome_schedule(name, tome_r, proportional, size_weighted,
                                            exported):
  directory = exported['_root'] / name
  with open(directory / 'config.json') as f:
    config = json.load(f)
  assert config['reducer'] == 'tome' and config['tome_r'] == tome_r and config['mergers'] == []
  assert config['tome_proportional_attention'] is proportional
  assert config['tome_size_weighted_gap'] is size_weighted
  assert hf_export.TOME_FILE in os.listdir(directory)
