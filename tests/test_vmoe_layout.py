"""google-research/vmoe's checkpoint layout in and out, and sparse upcycling of a dense
checkpoint into a model with experts."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchmerger.checkpoints import export, layouts, loading, vmoe_layout
from patchmerger.errors import CheckpointError
from patchmerger.models import build_model
from tests import tiny

SIZE = 16  # Patch 8: 2 x 2 tokens.


def _model(kind='sparse', classifier='token', representation_size=None, num_experts=4,
           layers=(1,), depth=2):
  moe = None if kind == 'none' else dict(kind=kind, num_experts=num_experts, layers=list(layers))
  return build_model(dict(variant='Ti/8', width=16, depth=depth, mlp_dim=32, num_heads=2,
                          classifier=classifier, representation_size=representation_size,
                          merger=None, attention='xla', moe=moe), num_classes=5)


def _init(model, seed=0):
  return model.init(jax.random.key(seed), jnp.ones((1, SIZE, SIZE, 3)))['params']


def _random_flat(model, seed=1):
  """Random values in every parameter (init leaves heads, biases and cls at zero)."""
  rng = np.random.default_rng(seed)
  return {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
          for k, v in loading.flatten(_init(model)).items()}


def _logits(model, params):
  images = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
  return np.asarray(model.apply({'params': params}, jnp.asarray(images)))


def _one_line(error: Exception) -> str:
  text = str(error)
  assert '\n' not in text, text
  return text


CASES = [(kind, classifier, rep) for kind in ('sparse', 'soft', 'none')
         for classifier in ('token', 'gap', 'map') for rep in (None, 8)]


@pytest.mark.parametrize('kind, classifier, representation_size', CASES)
def test_round_trip_through_vmoe_and_detection(kind, classifier, representation_size):
  flat = loading.flatten(_init(_model(kind, classifier, representation_size)))
  theirs = layouts.to_vmoe(flat)
  assert not any(k.startswith(('Transformer/', 'MAPHead_0/')) or 'MlpBlock_' in k
                 or 'MultiHeadDotProductAttention_1' in k for k in theirs), sorted(theirs)
  assert any('/SelfAttention/' in k for k in theirs)
  assert (kind != 'none') == any(k.startswith('Encoder/encoderblock_1/Moe/') for k in theirs)
  back, layout = layouts.to_canonical(theirs)
  assert layout.vmoe and layout.name == 'vmoe' and layout.describe() == 'vmoe'
  assert back.keys() == flat.keys()
  for key in flat:
    np.testing.assert_array_equal(back[key], flat[key], err_msg=key)
  assert layouts.detect(flat).name == 'vision_transformer'  # Ours is not taken for vmoe.
  # A vmoe training state's parameters (a `params/` prefix) are found as well.
  prefixed = layouts.detect({f'params/{k}': v for k, v in theirs.items()})
  assert prefixed.name == 'vmoe' and prefixed.describe() == 'vmoe (params/ prefix)'


def _leaves(module, names):
  return [f'{module}/{n}' for n in names]


KB, NORM = ('kernel', 'bias'), ('scale', 'bias')
ATTENTION = [f'{p}/{leaf}' for p in ('query', 'key', 'value', 'out') for leaf in KB]
MLP = [f'Dense_{i}/{leaf}' for i in (0, 1) for leaf in KB]


def _expected_names(kind, classifier, representation_size):
  """{vmoe name: our name}, written from vmoe/nn/vit_moe.py (VisionTransformerMoe,
  EncoderMoe, EncoderBlock, MlpMoeBlock, MapHead) for a depth-2 model with experts in
  block 1."""
  table = {'embedding/kernel': 'embedding/kernel', 'embedding/bias': 'embedding/bias',
           'Encoder/posembed_input/pos_embedding': 'Transformer/posembed_input/pos_embedding',
           'Encoder/encoder_norm/scale': 'Transformer/encoder_norm/scale',
           'Encoder/encoder_norm/bias': 'Transformer/encoder_norm/bias',
           'head/kernel': 'head/kernel', 'head/bias': 'head/bias'}
  if classifier == 'token':
    table['cls'] = 'cls'
  if representation_size:
    table |= {'pre_logits/kernel': 'pre_logits/kernel', 'pre_logits/bias': 'pre_logits/bias'}
  for block in (0, 1):
    theirs, ours = f'Encoder/encoderblock_{block}', f'Transformer/encoderblock_{block}'
    parts = [('LayerNorm_0', 'LayerNorm_0', NORM),
             ('SelfAttention', 'MultiHeadDotProductAttention_1', ATTENTION),
             ('LayerNorm_1', 'LayerNorm_2', NORM)]
    if block == 0 or kind == 'none':
      parts.append(('Mlp', 'MlpBlock_3', MLP))
    else:
      router = ['dense/kernel'] if kind == 'sparse' else ['mu', 'scale']
      parts += [('Moe/Router', 'Moe/Router', router), ('Moe/Mlp', 'Moe/Mlp', MLP)]
    for vmoe_part, our_part, leaves in parts:
      table |= dict(zip(_leaves(f'{theirs}/{vmoe_part}', leaves),
                        _leaves(f'{ours}/{our_part}', leaves)))
  if classifier == 'map':
    table['MapHead/probe'] = 'MAPHead_0/probe'
    for vmoe_part, our_part, leaves in (
        ('MultiHeadDotProductAttention', 'MultiHeadDotProductAttention_0', ATTENTION),
        ('LayerNorm', 'LayerNorm_0', NORM), ('Mlp', 'MlpBlock_0', MLP)):
      table |= dict(zip(_leaves(f'MapHead/{vmoe_part}', leaves),
                        _leaves(f'MAPHead_0/{our_part}', leaves)))
  return table


@pytest.mark.parametrize('kind, classifier, representation_size',
                         [('sparse', 'map', 8), ('soft', 'token', None), ('sparse', 'gap', None)])
def test_a_hand_written_vmoe_checkpoint_is_our_model(kind, classifier, representation_size,
                                                     tmp_path):
  model = _model(kind, classifier, representation_size)
  flat = _random_flat(model)
  table = _expected_names(kind, classifier, representation_size)
  assert sorted(table.values()) == sorted(flat)  # The table names every parameter once.
  theirs = {name: flat[ours] for name, ours in table.items()}
  assert layouts.to_vmoe(flat).keys() == theirs.keys()  # Export writes the same names.
  converted, layout = layouts.to_canonical(theirs)
  assert layout.name == 'vmoe'
  assert jax.tree.structure(loading.unflatten(converted)) == jax.tree.structure(_init(model))
  for key in flat:
    np.testing.assert_array_equal(converted[key], flat[key], err_msg=key)
  # Through the loader, as --config.init_from=vmoe.npz reads it: the same logits.
  np.savez(tmp_path / 'vmoe.npz', **theirs)
  params, report = loading.load_and_adapt(str(tmp_path / 'vmoe.npz'), _init(model, seed=7),
                                          has_cls=classifier == 'token')
  assert report.layout == 'vmoe' and len(report.loaded) == len(flat)
  assert not (report.missing or report.new or report.dropped or report.reinitialised)
  ours = _logits(model, loading.unflatten(flat))
  assert np.abs(ours).max() > 0.1  # Not a trivial all-zero comparison.
  np.testing.assert_array_equal(_logits(model, params), ours)


def _vmoe_npz(tmp_path, flat, name='vmoe.npz'):
  path = str(tmp_path / name)
  np.savez(path, **vmoe_layout.to_vmoe(flat))
  return path


@pytest.mark.parametrize('extra', ['Encoder/encoderblock_0/Adapter/kernel',
                                   'Encoder/encoderblock_1/SelfAttention/query_ln/scale'])
def test_an_unknown_block_part_is_refused_under_strict_loading(extra, tmp_path):
  model = _model('sparse')
  flat = vmoe_layout.to_vmoe(_random_flat(model)) | {extra: np.ones((16,), np.float32)}
  np.savez(tmp_path / 'w.npz', **flat)
  with pytest.raises(CheckpointError) as refused:
    loading.load_and_adapt(str(tmp_path / 'w.npz'), _init(model), has_cls=True)
  message = _one_line(refused.value)
  assert message.startswith('Pretrained weights (vmoe) hold 1 parameters inside this model')
  assert vmoe_layout.to_canonical({extra: 0}).popitem()[0] in message
  assert 'init_strict=False' in message
  _, report = loading.load_and_adapt(str(tmp_path / 'w.npz'), _init(model), has_cls=True,
                                     strict=False)
  assert report.dropped == [vmoe_layout.to_canonical({extra: 0}).popitem()[0]]


@pytest.mark.parametrize('kind', ['sparse', 'soft'])
def test_another_number_of_experts_is_refused_in_one_line(kind, tmp_path):
  path = _vmoe_npz(tmp_path, _random_flat(_model(kind, num_experts=2)))
  with pytest.raises(CheckpointError) as refused:
    loading.load_and_adapt(path, _init(_model(kind, num_experts=4)), has_cls=True,
                           strict=False)  # Always refused: the shapes cannot be adapted.
  message = _one_line(refused.value)
  assert message.startswith('Pretrained weights (vmoe) do not fit this model: '
                            'Transformer/encoderblock_1/Moe/')
  assert ('encoderblock_1 has 2 experts in the checkpoint and 4 in the model: set '
          'model.moe.num_experts' in message)


def test_a_dense_checkpoint_into_experts_needs_upcycling(tmp_path):
  moe = _model('sparse', layers=(1, 3), depth=4)
  dense4 = _model('none', depth=4)
  dense_flat = _random_flat(dense4)
  path = _vmoe_npz(tmp_path, dense_flat, 'dense.npz')  # A dense vmoe (ViT) checkpoint.
  init = _init(moe, seed=3)
  with pytest.raises(CheckpointError) as refused:
    loading.load_and_adapt(path, init, has_cls=True)
  assert _one_line(refused.value) == (
      'Pretrained weights (vmoe) hold a dense MLP (MlpBlock_3) in encoderblock_1, '
      'encoderblock_3, where this model has experts (Moe): set init_upcycle=True to start '
      'every expert as a copy of it (sparse upcycling), or load a checkpoint with experts.')
  params, report = loading.load_and_adapt(path, init, has_cls=True, upcycle=True)
  assert report.upcycled == ['Transformer/encoderblock_1', 'Transformer/encoderblock_3']
  assert sorted(report.new) == ['Transformer/encoderblock_1/Moe/Router/dense/kernel',
                                'Transformer/encoderblock_3/Moe/Router/dense/kernel']
  assert not report.missing and not report.dropped and not report.reinitialised
  flat, fresh = loading.flatten(params), loading.flatten(init)
  for block in (1, 3):
    ours = f'Transformer/encoderblock_{block}'
    for leaf in MLP:
      experts = flat[f'{ours}/Moe/Mlp/{leaf}']
      assert experts.shape[0] == 4
      for expert in experts:
        np.testing.assert_array_equal(expert, dense_flat[f'{ours}/MlpBlock_3/{leaf}'])
    router = f'{ours}/Moe/Router/dense/kernel'
    np.testing.assert_array_equal(flat[router], fresh[router])  # Its initial value.
  for key in dense_flat:  # Everything else as the checkpoint holds it.
    if 'MlpBlock_3' not in key or key.split('/')[1] in ('encoderblock_0', 'encoderblock_2'):
      np.testing.assert_array_equal(flat[key], dense_flat[key], err_msg=key)
  assert np.isfinite(_logits(moe, params)).all()
  # Without strict loading and without upcycling: the experts stay at their initialisation.
  _, lax = loading.load_and_adapt(path, init, has_cls=True, strict=False)
  assert not lax.upcycled and len(lax.missing) == 2 * (1 + len(MLP))
  assert len(lax.dropped) == 2 * len(MLP)


def test_init_upcycle_reaches_the_report_of_a_run(tmp_path):
  """`--config.init_upcycle=True` on a run whose model has experts (load_pretrained, as
  training's start calls it; init_report.json is this dict)."""
  from patchmerger.training import loop, setup as setup_lib
  config = tiny.tiny_config()
  config.model.merger = None
  dense = build_model(config.model, config.num_classes)
  images = jnp.ones((1, config.input.image_size, config.input.image_size, config.input.channels))
  np.savez(tmp_path / 'dense.npz',
           **loading.flatten(dense.init(jax.random.key(0), images)['params']))
  config.model.moe.update(kind='soft', num_experts=2, layers=[1])
  config.init_from = str(tmp_path / 'dense.npz')
  assert config.init_upcycle is False  # Declared, off by default.
  run = setup_lib.setup(config)
  with pytest.raises(CheckpointError, match='set init_upcycle=True'):
    loop.load_pretrained(config, run, run.state)
  config.init_upcycle = True
  state, report = loop.load_pretrained(config, run, run.state)
  assert json.loads(json.dumps(report))['upcycled'] == ['Transformer/encoderblock_1']
  assert report['layout'] == 'vision_transformer' and not report['missing']
  assert sorted(report['new']) == ['Transformer/encoderblock_1/Moe/Router/mu',
                                   'Transformer/encoderblock_1/Moe/Router/scale']
  dense_mlp = np.asarray(state.params['Transformer']['encoderblock_1']['Moe']['Mlp']['Dense_0'][
      'kernel'])
  np.testing.assert_array_equal(dense_mlp[0], dense_mlp[1])


@pytest.mark.parametrize('kind, classifier', [('sparse', 'map'), ('soft', 'gap'),
                                              ('none', 'token')])
def test_export_to_vmoe_writes_its_names_and_loads_back(kind, classifier, tmp_path):
  model = _model(kind, classifier, representation_size=8)
  flat = _random_flat(model)
  path = str(tmp_path / 'vmoe.npz')
  model_config = dict(variant='Ti/8', width=16, depth=2, mlp_dim=32, num_heads=2,
                      classifier=classifier, representation_size=8, merger=None,
                      moe=None if kind == 'none' else dict(kind=kind, num_experts=4, layers=[1]))
  export.export(loading.unflatten(flat), 'vmoe', path, model_config=model_config)
  assert 'vmoe' in export.FORMATS
  with np.load(path) as data:
    written = set(data.files)
  assert written == set(_expected_names(kind, classifier, 8))
  assert (tmp_path / 'vmoe.model.json').exists()
  loaded, layout = loading.load(path)
  assert layout.name == 'vmoe'
  params, report = loading.adapt(loaded, _init(model, seed=4), has_cls=classifier == 'token',
                                 layout=layout.describe())
  assert not (report.missing or report.new or report.dropped)
  np.testing.assert_array_equal(_logits(model, params), _logits(model, loading.unflatten(flat)))
