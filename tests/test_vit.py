"""The ViT: variants, merger slots, heads, public parameter layout, gradients."""
import functools
import importlib
import pkgutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchmerger import models
from patchmerger.models import build_model, parse_variant
from patchmerger.models.vit import VARIANTS, VisionTransformer

TINY = dict(width=16, mlp_dim=32, num_heads=2)


def _trace(model, image_shape, batch=2):
  """Shapes of (logits, variables) and the token count seen by each block,
  from one abstract (no compute) initialisation."""
  counts = {}
  def record(next_fun, args, kwargs, context):
    name = context.module.name or ''
    if context.method_name == '__call__' and name.startswith('encoderblock_'):
      counts[int(name.split('_')[1])] = args[0].shape[1]
    return next_fun(*args, **kwargs)
  images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  with flax.linen.intercept_methods(record):
    logits, variables = jax.eval_shape(
        functools.partial(model.init_with_output, mutable=True), jax.random.key(0), images)
  return logits, variables, [counts[i] for i in range(model.depth)]


@pytest.mark.parametrize('name', sorted(VARIANTS))
@pytest.mark.parametrize('merger', ['none', 'one', 'two'])
def test_every_variant_and_merger_count(name, merger):
  depth = VARIANTS[name][1]
  spec = {'none': None, 'one': dict(num_tokens=8, before_block=None),
          'two': (dict(num_tokens=16, before_block=depth // 4),
                  dict(num_tokens=4, before_block=depth // 2))}[merger]
  model = build_model(dict(variant=f'{name}/16', merger=spec, classifier='gap', **TINY),
                      num_classes=7)
  assert model.depth == depth
  logits, variables, tokens = _trace(model, (64, 64, 3))
  assert variables['intermediates']['features'][0].shape == (2, 16)
  assert logits.shape == (2, 7)
  expected = [16] * depth  # 64/16 = 4x4 patches
  for before_block, m in sorted(model.mergers):
    expected[before_block:] = [m] * (depth - before_block)
  assert tokens == expected


@pytest.mark.parametrize('image,patch,tokens', [(28, 4, 49), (224, 16, 196), (224, 14, 256),
                                                 (256, 32, 64), (64, 8, 64)])
def test_token_count_for_any_resolution(image, patch, tokens):
  model = build_model(dict(variant=f'S/{patch}', depth=4, merger=dict(num_tokens=8, before_block=2),
                           classifier='token', **TINY), num_classes=3)
  _, _, counts = _trace(model, (image, image, 3))
  assert counts == [tokens + 1] * 2 + [8 + 1] * 2  # class token carried past the merger


@pytest.mark.parametrize('classifier', ['token', 'gap', 'map'])
@pytest.mark.parametrize('posemb', ['learn', 'sincos2d'])
def test_heads_and_position_embeddings_run(classifier, posemb):
  model = build_model(dict(variant='Ti/4', depth=2, merger=dict(num_tokens=4, before_block=1),
                           classifier=classifier, posemb=posemb, **TINY), num_classes=5)
  images = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  logits = jax.jit(model.apply)(variables, images)
  assert logits.shape == (3, 5) and bool(jnp.all(jnp.isfinite(logits)))
  has_posemb_param = 'posembed_input' in variables['params']['Transformer']
  assert has_posemb_param == (posemb == 'learn')


def test_bfloat16_compute_float32_params_and_logits():
  model = build_model(dict(variant='Ti/4', depth=2, merger=dict(num_tokens=4, before_block=1),
                           dtype='bfloat16', **TINY), num_classes=5)
  images = jnp.ones((2, 28, 28, 1))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert jax.jit(model.apply)(variables, images).dtype == jnp.float32


# The public google-research/vision_transformer ViT-B_16.npz layout (ImageNet-21k
# models with a pre-logits layer), written out rather than derived from our code.
def _public_vit_b16_layout(num_classes=21843):
  d, mlp, h = 768, 3072, 12
  layout = {'cls': (1, 1, d), 'embedding/kernel': (16, 16, 3, d), 'embedding/bias': (d,),
            'Transformer/posembed_input/pos_embedding': (1, 197, d),
            'Transformer/encoder_norm/scale': (d,), 'Transformer/encoder_norm/bias': (d,),
            'pre_logits/kernel': (d, d), 'pre_logits/bias': (d,),
            'head/kernel': (d, num_classes), 'head/bias': (num_classes,)}
  for i in range(12):
    b = f'Transformer/encoderblock_{i}'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      layout[f'{b}/{ln}/scale'] = (d,)
      layout[f'{b}/{ln}/bias'] = (d,)
    for qkv in ('query', 'key', 'value'):
      layout[f'{b}/MultiHeadDotProductAttention_1/{qkv}/kernel'] = (d, h, d // h)
      layout[f'{b}/MultiHeadDotProductAttention_1/{qkv}/bias'] = (h, d // h)
    layout[f'{b}/MultiHeadDotProductAttention_1/out/kernel'] = (h, d // h, d)
    layout[f'{b}/MultiHeadDotProductAttention_1/out/bias'] = (d,)
    layout[f'{b}/MlpBlock_3/Dense_0/kernel'] = (d, mlp)
    layout[f'{b}/MlpBlock_3/Dense_0/bias'] = (mlp,)
    layout[f'{b}/MlpBlock_3/Dense_1/kernel'] = (mlp, d)
    layout[f'{b}/MlpBlock_3/Dense_1/bias'] = (d,)
  return layout


def _flat_shapes(variables):
  flat = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  return {k: tuple(v.shape) for k, v in flat.items()}


def test_vit_b16_matches_public_checkpoint_layout():
  model = build_model(dict(variant='B/16', merger=None, classifier='token',
                           representation_size=768), num_classes=21843)
  variables = _trace(model, (224, 224, 3), batch=1)[1]
  assert _flat_shapes(variables) == _public_vit_b16_layout()


def test_merger_adds_only_its_own_parameters():
  plain = build_model(dict(variant='B/16', merger=None, representation_size=768), 21843)
  merged = build_model(dict(variant='B/16', merger=dict(num_tokens=8, before_block=None),
                            representation_size=768), 21843)
  plain_shapes = _flat_shapes(_trace(plain, (224, 224, 3), 1)[1])
  merged_shapes = _flat_shapes(_trace(merged, (224, 224, 3), 1)[1])
  extra = {k: v for k, v in merged_shapes.items() if k not in plain_shapes}
  assert extra == {'Transformer/patchmerger_6/kernel': (768, 8),
                   'Transformer/patchmerger_6/LayerNorm_0/scale': (768,),
                   'Transformer/patchmerger_6/LayerNorm_0/bias': (768,)}
  assert all(merged_shapes[k] == v for k, v in plain_shapes.items())


def test_gradients_reach_merger_and_every_block_before_it():
  model = build_model(dict(variant='Ti/4', depth=4, merger=dict(num_tokens=4, before_block=2),
                           classifier='gap', **TINY), num_classes=3)
  images = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  params = jax.jit(model.init)(jax.random.key(1), images)['params']
  # The zero-initialised head blocks gradients to everything below it; use a
  # random head so that the test sees the whole path.
  params['head']['kernel'] = jax.random.normal(jax.random.key(2), params['head']['kernel'].shape)
  labels = jnp.array([0, 1, 2, 0])
  def loss(p):
    logits = model.apply({'params': p}, images)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
  grads = jax.jit(jax.grad(loss))(params)
  tree = grads['Transformer']
  norm = lambda t: float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(t))))
  assert norm(tree['patchmerger_2']['kernel']) > 0
  for i in range(4):
    assert norm(tree[f'encoderblock_{i}']) > 0, i
  assert norm(grads['embedding']) > 0 and norm(tree['posembed_input']) > 0


def test_parse_variant():
  assert parse_variant('L/14') == dict(width=1024, depth=24, mlp_dim=4096, num_heads=16,
                                       patch_size=14)
  for bad in ('X/16', 'B16', 'B/', 'B/0', 'B/sixteen', ''):
    with pytest.raises(ValueError, match='Unknown model variant'):
      parse_variant(bad)


@pytest.mark.parametrize('fields,message', [
    (dict(mergers=((6, 8),)), 'does not fit a model of depth'),
    (dict(mergers=((-1, 8),)), 'does not fit'),
    (dict(mergers=((2, 0),)), 'num_tokens >= 1'),
    (dict(mergers=((2, 8), (2, 4))), 'same block'),
    (dict(classifier='cls'), 'classifier must be one of'),
    (dict(posemb='rope'), 'posemb must be one of'),
    (dict(num_heads=5), 'not divisible by num_heads'),
])
def test_bad_model_settings_fail_clearly(fields, message):
  kwargs = dict(num_classes=3, patch_size=4, width=16, depth=6, mlp_dim=32, num_heads=2) | fields
  with pytest.raises(ValueError, match=message):
    VisionTransformer(**kwargs)


def test_image_not_divisible_by_patch_fails_clearly():
  model = build_model(dict(variant='Ti/16', depth=1, **TINY), num_classes=2)
  with pytest.raises(ValueError, match='not divisible by the patch size 16'):
    model.init(jax.random.key(0), jnp.zeros((1, 30, 30, 3)))


def test_modules_refuse_positional_fields():
  # Encoder has 17 fields: a positional call could silently shift them by one.
  libs = [importlib.import_module(f'patchmerger.models.{info.name}')
          for info in pkgutil.iter_modules(models.__path__)]
  modules = {cls for lib in libs for cls in vars(lib).values()
             if isinstance(cls, type) and issubclass(cls, flax.linen.Module)
             and cls is not flax.linen.Module}
  assert len(modules) == 16  # 10, plus MoeLayer, ExpertMlp, Router, SparseMoe, SoftRouter, SoftMoe.
  for cls in modules:
    with pytest.raises(TypeError, match='takes 1 positional argument but 2 were given'):
      cls(1)
