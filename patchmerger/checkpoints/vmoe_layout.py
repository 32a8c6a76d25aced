"""google-research/vmoe's parameter layout (`vmoe/nn/vit_moe.py`, VisionTransformerMoe)
and conversions to and from ours; layouts.py detects it and calls these.

vmoe names differently, with the same shapes (flax attention kernels [D, heads, head_dim],
experts stacked on a leading E axis, a position embedding with a class-token row when the
classifier is the class token, as vit_jax's AddPositionEmbs):

  ours                                               vmoe
  Transformer/posembed_input, .../encoder_norm       Encoder/posembed_input, .../encoder_norm
  Transformer/encoderblock_N/LayerNorm_0             Encoder/encoderblock_N/LayerNorm_0
    .../MultiHeadDotProductAttention_1                 .../SelfAttention
    .../LayerNorm_2                                    .../LayerNorm_1
    .../MlpBlock_3/Dense_{0,1}                         .../Mlp/Dense_{0,1}
    .../Moe/{Router, Mlp}                              .../Moe/{Router, Mlp} (the same)
  MAPHead_0/{probe, MultiHeadDotProductAttention_0,  MapHead/{probe, MultiHeadDotProductAttention,
             LayerNorm_0, MlpBlock_0}                        LayerNorm, Mlp}
  embedding, cls, pre_logits, head                   the same (no pre_logits without
                                                     representation_size: an IdentityLayer)

A block part or MAP-head part outside these tables keeps its name (under the renamed
prefix), so that loading reports it instead of silently renaming it; other keys (a
merger's `Transformer/patchmerger_K`, a conv stem) move with the `Encoder` prefix or stay,
so our models round-trip exactly (vmoe itself has no such parameters).
All functions work on flat dicts {'a/b/c': np.ndarray}.
"""
import re
from typing import Iterable, Mapping

import numpy as np

NAME = 'vmoe'
# vmoe name -> ours, for the top-level modules, a block's parts and the MAP head's parts.
PREFIXES = {'Encoder': 'Transformer', 'MapHead': 'MAPHead_0'}
BLOCK_PARTS = {'LayerNorm_0': 'LayerNorm_0', 'SelfAttention': 'MultiHeadDotProductAttention_1',
               'LayerNorm_1': 'LayerNorm_2', 'Mlp': 'MlpBlock_3', 'Moe': 'Moe'}
MAP_HEAD_PARTS = {'probe': 'probe', 'MultiHeadDotProductAttention':
                  'MultiHeadDotProductAttention_0', 'LayerNorm': 'LayerNorm_0',
                  'Mlp': 'MlpBlock_0'}
_BLOCK = re.compile(r'^encoderblock_\d+$')


def _invert(table: Mapping[str, str]) -> dict[str, str]:
  return {v: k for k, v in table.items()}


def detect(keys: Iterable[str]) -> bool:
  """Whether flat keys (without a `params/` prefix) are in vmoe's layout: blocks under
  `Encoder/` with a `SelfAttention`."""
  return any(k.startswith('Encoder/encoderblock_') and k.split('/')[2:3] == ['SelfAttention']
             for k in keys)


def _rename(key: str, prefixes: Mapping[str, str], block_parts: Mapping[str, str],
            head_parts: Mapping[str, str]) -> str:
  parts = key.split('/')
  if parts[0] not in prefixes:
    return key
  if parts[0] in ('MapHead', 'MAPHead_0'):  # Either direction: the head's own parts.
    if len(parts) > 1:
      parts[1] = head_parts.get(parts[1], parts[1])
  elif len(parts) > 2 and _BLOCK.match(parts[1]):
    parts[2] = block_parts.get(parts[2], parts[2])
  return '/'.join([prefixes[parts[0]]] + parts[1:])


def to_canonical(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """vmoe's names -> ours; the arrays are unchanged (the logits too)."""
  return {_rename(k, PREFIXES, BLOCK_PARTS, MAP_HEAD_PARTS): v for k, v in flat.items()}


def to_vmoe(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Ours (blocks unstacked) -> vmoe's names, the same arrays. A VisionTransformerMoe
  reading them needs `encoder.moe.layers` = the blocks with `Moe`, and its router's kind
  and options from the run's `model.moe` (the weights do not hold them)."""
  return {_rename(k, _invert(PREFIXES), _invert(BLOCK_PARTS), _invert(MAP_HEAD_PARTS)): v
          for k, v in flat.items()}
