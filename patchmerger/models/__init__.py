"""Models: the ViT, its token reducers (PatchMerger, TokenLearner, pooling, ToMe)."""
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from patchmerger.errors import ConfigError
from patchmerger.models import attention as attention_lib, experts, reducers, tome
from patchmerger.models.patch_merger import PatchMerger
from patchmerger.models.vit import VisionTransformer, parse_variant

MergerSpec = Union[None, Mapping[str, Any], Sequence[Mapping[str, Any]]]
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def resolve_mergers(merger: MergerSpec, depth: int) -> tuple[tuple[int, int], ...]:
  """Config merger spec -> sorted (before_block, num_tokens) pairs.

  `merger` is None (no merger), one mapping {num_tokens, before_block}, or a
  sequence of them. before_block=None means halfway: before block depth // 2.
  """
  if merger is None:
    return ()
  as_dict = lambda spec: spec.to_dict() if hasattr(spec, 'to_dict') else dict(spec)
  single = isinstance(merger, Mapping) or hasattr(merger, 'to_dict')
  specs = [merger] if single else list(merger)
  pairs = []
  for spec in map(as_dict, specs):
    unknown = set(spec) - {'num_tokens', 'before_block'}
    if unknown:
      raise ConfigError(f'Unknown merger field(s) {sorted(unknown)}; expected '
                        'num_tokens and before_block.')
    before_block = spec.get('before_block')
    pairs.append((depth // 2 if before_block is None else int(before_block),
                  int(spec['num_tokens'])))
  return tuple(sorted(pairs))


def build_model(model_config: Mapping[str, Any], num_classes: int) -> VisionTransformer:
  """Builds the ViT described by a config's `model` section."""
  arch = parse_variant(model_config['variant'])
  for key in ('width', 'depth', 'mlp_dim', 'num_heads'):
    if model_config.get(key) is not None:  # Explicit sizes override the variant's.
      arch[key] = int(model_config[key])
  dtype = model_config.get('dtype', 'float32')
  if dtype not in DTYPES:
    raise ConfigError(f'model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
  representation_size: Optional[int] = model_config.get('representation_size')
  reducer = model_config.get('reducer') or {}  # Configs from before reducers lack it.
  kind = reducers.check_kind(reducer.get('kind', 'patchmerger'))
  # `merger` places the between-block reducers; tome and none use no slots.
  mergers = (resolve_mergers(model_config.get('merger'), arch['depth'])
             if kind in reducers.BETWEEN_BLOCKS else ())
  tome_r = (tome.schedule(reducer.get('r', 0), arch['depth'],
                          inflection=reducer.get('inflection', 0.),
                          start_block=reducer.get('start_block', 0))
            if kind == 'tome' else ())
  attention = model_config.get('attention', 'auto')
  if attention == 'cudnn' and not attention_lib.cudnn_supports(DTYPES[dtype], 8):
    raise ConfigError(f"model.attention='cudnn' needs an NVIDIA GPU of compute capability 8.0 "
                      f"or newer and model.dtype bfloat16 or float16 (here: "
                      f"{jax.local_devices()[0].device_kind}, {dtype}); use 'auto' or 'xla'.")
  return VisionTransformer(
      num_classes=num_classes,
      attention=attention,
      scan=bool(model_config.get('scan', False)),
      remat_policy=model_config.get('remat_policy', 'none'),
      mergers=mergers,
      reducer=kind,
      tome_r=tome_r,
      tome_proportional_attention=bool(reducer.get('proportional_attention', True)),
      tome_size_weighted_gap=bool(reducer.get('size_weighted_gap', False)),
      classifier=model_config.get('classifier', 'token'),
      posemb=model_config.get('posemb', 'learn'),
      conv_stem=tuple(model_config.get('conv_stem') or ()),
      representation_size=representation_size,
      dropout_rate=model_config.get('dropout_rate', 0.),
      attention_dropout_rate=model_config.get('attention_dropout_rate', 0.),
      merge_normalized=model_config.get('merge_normalized', True),
      dtype=DTYPES[dtype],
      moe=experts.resolve(model_config.get('moe'), arch['depth']),
      **arch)


__all__ = ['PatchMerger', 'VisionTransformer', 'build_model', 'parse_variant',
           'resolve_mergers']
