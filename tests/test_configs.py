"""Every config file and arg string builds a model; bad ones fail clearly."""
import glob
import importlib
import os

import jax
import ml_collections
import jax.numpy as jnp
import pytest

from configs import common
from patchmerger.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(f'{ROOT}/configs/*.py')
                      if not p.endswith(('__init__.py', 'common.py')))
ARGS = [None, 'variant=S/{patch}', 'merger=none', 'merger=4', 'merger=16@1+8@2',
        'variant=Ti/{patch},merger=8@1']


def _build(name, arg):
  module = importlib.import_module(f'configs.{name}')
  if arg:  # Keep each config's own patch size, so the image size fits.
    arg = arg.format(patch=module.get_config().model.variant.split('/')[1])
  config = module.get_config(arg)
  model = build_model(config.model, config.num_classes)
  size = config.input.image_size
  # Check the arg-string result at a cheap size: abstract evaluation only.
  images = jax.ShapeDtypeStruct((1, size, size, config.input.channels), jnp.float32)
  logits = jax.eval_shape(model.init_with_output, jax.random.key(0), images)[0]
  return config, model, logits


def test_config_files_exist():
  assert {'fashion_mnist', 'imagenet21k', 'imagenet2012'} <= set(CONFIG_FILES)


@pytest.mark.parametrize('name', CONFIG_FILES)
@pytest.mark.parametrize('arg', ARGS)
def test_every_config_and_arg_string_builds(name, arg):
  config, model, logits = _build(name, arg)
  assert logits.shape == (1, config.num_classes)
  assert config.batch_size % config.accum_steps == 0
  if arg == 'merger=none':
    assert model.mergers == ()
  elif arg == 'merger=16@1+8@2':
    assert model.mergers == ((1, 16), (2, 8))
  elif arg in (None, 'variant=S/{patch}'):  # The config's default: halfway unless it names a block.
    default = common.parse_merger(getattr(importlib.import_module(f'configs.{name}'), 'MERGER', '8'))
    block = model.depth // 2 if default['before_block'] is None else default['before_block']
    assert len(model.mergers) == 1 and model.mergers[0] == (block, default['num_tokens'])


def test_overrides_reach_the_model():
  config = importlib.import_module('configs.fashion_mnist').get_config()
  config.model.merger.num_tokens = 16
  config.model.merger.before_block = 1
  config.model.width = 64
  model = build_model(config.model, config.num_classes)
  assert model.mergers == ((1, 16),) and model.width == 64


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_unknown_arg_fails_with_one_clear_message(name):
  module = importlib.import_module(f'configs.{name}')
  with pytest.raises(ValueError, match="Unknown config argument 'varaint=B/16'"):
    module.get_config('varaint=B/16')


@pytest.mark.parametrize('arg,message', [('variant=Q/16', 'Unknown model variant'),
                                         ('variant=B16', 'Unknown model variant'),
                                         ('merger=8@x', 'Bad merger spec')])
def test_bad_values_fail_with_one_clear_message(arg, message):
  with pytest.raises(ValueError, match=message):
    _build('fashion_mnist', arg)


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_unknown_override_key_fails(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  config.lock()  # As config_flags does before applying --config.* overrides.
  with pytest.raises(AttributeError, match='widht'):
    config.model.widht = 3


def test_parse_merger():
  assert common.parse_merger('none') is None
  assert common.parse_merger('8') == dict(num_tokens=8, before_block=None)
  assert common.parse_merger('8@3') == dict(num_tokens=8, before_block=3)
  assert common.parse_merger('16@4+8@8') == (dict(num_tokens=16, before_block=4),
                                             dict(num_tokens=8, before_block=8))


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_every_empty_field_has_a_type_so_it_can_be_overridden(name):
  """A bare None cannot be set from the command line; placeholders can."""
  config = importlib.import_module(f'configs.{name}').get_config()

  def untyped(node, prefix=''):
    for key in node.keys():
      value = node[key]
      if isinstance(value, ml_collections.ConfigDict):
        yield from untyped(value, f'{prefix}{key}.')
      elif value is None and key != 'merger' and node.get_type(key) is type(None):
        yield prefix + key
  assert list(untyped(config)) == []


@pytest.mark.parametrize('variant, width', [('Ti/16', 192), ('B/16', 768), ('L/16', 1024),
                                            ('H/14', 1280)])
def test_imagenet21k_pre_logits_are_as_wide_as_the_model(variant, width):
  # As in the public ImageNet-21k ViT checkpoints (ViT-L/16: a 1024-wide pre_logits).
  config = importlib.import_module('configs.imagenet21k').get_config(f'variant={variant}')
  assert config.model.representation_size == width
