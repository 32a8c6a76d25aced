"""Checkpoint layouts of public ViTs and conversions to and from ours.

Our model's own layout (the "canonical" one here) is google-research/vision_transformer's:
blocks `Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3}` (pre-Linen global numbering), the position embedding at
`Transformer/posembed_input/pos_embedding` including a class-token row, a MAP head under
`MAPHead_0`. Mergers and other token reducers sit at `Transformer/<kind>_K`.

big_vision differs in five independent ways, each detected and undone separately:
- a `params/` prefix (its training checkpoints also hold `opt/...`);
- Linen per-type numbering inside a block: `LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0`;
- blocks stacked along a leading axis under `Transformer/encoderblock/` (its `scan=True`);
- a top-level `pos_embedding` (or `Transformer/pos_embedding`) without a class-token row:
  big_vision adds the position embedding before it prepends the class token, so a zero row
  for the class token gives the same logits;
- a MAP head stored inline at the top level (`probe`, `MultiHeadDotProductAttention_0`, ...).

Our scanned models (`model.scan=True`) stack each run of blocks between reducers along a
leading axis under `Transformer/encoderblocks_START/` (blocks START, START+1, ...);
`unstack_runs` and `stack_runs` convert, so any checkpoint loads into either model.

google-research/vmoe's layout (`Encoder/encoderblock_N/{LayerNorm_0, SelfAttention,
LayerNorm_1, Mlp | Moe}`, `MapHead`) is renamed by vmoe_layout.py, which holds its table.
The `transformers` layout (Hugging Face `ViTForImageClassification`) is export-only.
All functions work on flat dicts {'a/b/c': np.ndarray}.
"""
import dataclasses
import re
from typing import Mapping

import numpy as np

from patchmerger.checkpoints import vmoe_layout
from patchmerger.errors import CheckpointError

Flat = dict[str, np.ndarray]

POSEMB = 'Transformer/posembed_input/pos_embedding'
BLOCK = 'Transformer/encoderblock_{}'
STACKED = 'Transformer/encoderblock/'
# One block's submodules: vision_transformer (global numbering) <-> Linen per-type numbering.
GLOBAL_TO_PER_TYPE = {'LayerNorm_0': 'LayerNorm_0', 'MultiHeadDotProductAttention_1':
                      'MultiHeadDotProductAttention_0', 'LayerNorm_2': 'LayerNorm_1',
                      'MlpBlock_3': 'MlpBlock_0'}
PER_TYPE_TO_GLOBAL = {v: k for k, v in GLOBAL_TO_PER_TYPE.items()}
MAP_HEAD_PARTS = ('probe', 'MultiHeadDotProductAttention_0', 'LayerNorm_0', 'MlpBlock_0')
_BLOCK_KEY = re.compile(r'^Transformer/encoderblock_(\d+)/([^/]+)/(.*)$')
RUN = 'Transformer/encoderblocks_{}/'
_RUN_KEY = re.compile(r'^Transformer/encoderblocks_(\d+)/')


class LayoutError(CheckpointError):
  """The weights are in no layout this module knows."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a checkpoint's keys looked like before conversion."""
  params_prefix: bool = False
  per_type_numbering: bool = False
  stacked_blocks: bool = False
  top_level_posemb: bool = False
  inline_map_head: bool = False
  scanned_runs: bool = False
  vmoe: bool = False

  @property
  def name(self) -> str:
    if self.vmoe:
      return vmoe_layout.NAME
    big_vision = (self.per_type_numbering or self.stacked_blocks or self.top_level_posemb
                  or self.inline_map_head or self.params_prefix)
    return 'big_vision' if big_vision else 'vision_transformer'

  def describe(self) -> str:
    details = [text for flag, text in (
        (self.stacked_blocks, 'stacked blocks'),
        (self.per_type_numbering, 'Linen per-type names'),
        (self.top_level_posemb, 'position embedding without class-token row'),
        (self.inline_map_head, 'inline MAP head'),
        (self.params_prefix, 'params/ prefix'),
        (self.scanned_runs, 'scanned runs of blocks')) if flag]
    return f'{self.name} ({", ".join(details)})' if details else self.name


def detect(flat: Mapping[str, np.ndarray]) -> Layout:
  """The layout of a checkpoint's flat keys."""
  keys = list(flat)
  prefix = bool(keys) and any(k.startswith('params/') for k in keys)
  if prefix:
    keys = [k.removeprefix('params/') for k in keys if k.startswith('params/')]
  block_parts = {k.split('/')[2] for k in keys
                 if k.startswith(('Transformer/encoderblock_', STACKED)) and k.count('/') >= 2}
  return Layout(
      params_prefix=prefix,
      per_type_numbering=bool(block_parts & {'MultiHeadDotProductAttention_0', 'LayerNorm_1',
                                             'MlpBlock_0'}),
      stacked_blocks=any(k.startswith(STACKED) for k in keys),
      top_level_posemb='pos_embedding' in keys or 'Transformer/pos_embedding' in keys,
      inline_map_head='probe' in keys,
      scanned_runs=any(map(_RUN_KEY.match, keys)),
      vmoe=vmoe_layout.detect(keys))


def _has_class_token_row(num_tokens: int) -> bool:
  """Whether a position embedding of `num_tokens` is a square grid plus one class row."""
  return int(np.sqrt(num_tokens - 1)) ** 2 == num_tokens - 1 and num_tokens > 1


def unstack_blocks(flat: Mapping[str, np.ndarray], prefix: str = STACKED,
                   block: str = BLOCK, first: int = 0) -> Flat:
  """Leaves [depth, ...] under `prefix` -> one block per index (`block`.format(first + i))."""
  out = {}
  for key, value in flat.items():
    if not key.startswith(prefix):
      out[key] = value
      continue
    rest = key.removeprefix(prefix)
    for i, leaf in enumerate(np.asarray(value)):
      out[f'{block.format(first + i)}/{rest}'] = leaf
  return out


def stack_blocks(flat: Mapping[str, np.ndarray], indices, prefix: str = STACKED,
                 block: str = BLOCK) -> Flat:
  """The blocks `indices` (in order) stacked along a new leading axis under `prefix`."""
  heads = tuple(f'{block.format(i)}/' for i in indices)
  out = {k: v for k, v in flat.items() if not k.startswith(heads)}
  first = f'{block.format(indices[0])}/'
  for key in (k for k in flat if k.startswith(first)):
    rest = key.removeprefix(first)
    out[prefix + rest] = np.stack([flat[f'{block.format(i)}/{rest}'] for i in indices])
  return out


def scanned_runs(flat: Mapping[str, np.ndarray]) -> dict[int, int]:
  """{first block: number of blocks} of the scanned runs in `flat` (ours, scan=True)."""
  runs = {}
  for key, value in flat.items():
    match = _RUN_KEY.match(key)
    if match:
      runs[int(match.group(1))] = int(np.shape(value)[0])
  return dict(sorted(runs.items()))


def unstack_runs(flat: Mapping[str, np.ndarray]) -> Flat:
  """Scanned runs -> one `encoderblock_N` per block; other keys unchanged."""
  flat = dict(flat)
  for start in scanned_runs(flat):
    flat = unstack_blocks(flat, prefix=RUN.format(start), first=start)
  return flat


def stack_runs(flat: Mapping[str, np.ndarray], runs: Mapping[int, int]) -> Flat:
  """`encoderblock_N` blocks -> the scanned runs {first block: number of blocks}."""
  flat = dict(flat)
  for start, length in runs.items():
    flat = stack_blocks(flat, list(range(start, start + length)), prefix=RUN.format(start))
  return flat


def num_blocks(flat: Mapping[str, np.ndarray]) -> int:
  return len({m.group(1) for m in map(_BLOCK_KEY.match, flat) if m})


def _renumber_blocks(flat: Mapping[str, np.ndarray], table: Mapping[str, str]) -> Flat:
  out = {}
  for key, value in flat.items():
    match = _BLOCK_KEY.match(key)
    if match and match.group(2) in table:
      key = f'{BLOCK.format(match.group(1))}/{table[match.group(2)]}/{match.group(3)}'
    out[key] = value
  return out


def to_canonical(flat: Mapping[str, np.ndarray]) -> tuple[Flat, Layout]:
  """Any known layout -> ours, with the layout that was found. Logits are unchanged."""
  layout = detect(flat)
  if layout.params_prefix:  # Keep the parameters; drop optimizer state and the like.
    flat = {k.removeprefix('params/'): v for k, v in flat.items() if k.startswith('params/')}
  flat = dict(flat)
  if layout.vmoe:
    flat = vmoe_layout.to_canonical(flat)
  if layout.stacked_blocks:
    flat = unstack_blocks(flat)
  if layout.scanned_runs:
    flat = unstack_runs(flat)
  if layout.per_type_numbering:
    flat = _renumber_blocks(flat, PER_TYPE_TO_GLOBAL)
  if layout.inline_map_head:
    for part in MAP_HEAD_PARTS:
      for key in [k for k in flat if k == part or k.startswith(part + '/')]:
        flat[f'MAPHead_0/{key}'] = flat.pop(key)
  if layout.top_level_posemb:
    posemb = flat.pop('pos_embedding', None)
    posemb = flat.pop('Transformer/pos_embedding', posemb)
    if 'cls' in flat and not _has_class_token_row(posemb.shape[1]):
      # big_vision adds the embedding before prepending the class token: a zero row for
      # the class token gives the same logits in our model.
      posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    flat[POSEMB] = posemb
  return flat, layout


def to_big_vision(flat: Mapping[str, np.ndarray]) -> Flat:
  """Ours -> big_vision's stacked (scan) layout, with the same logits in big_vision's
  ViT: the class token's position row is folded into `cls` and the blocks stacked."""
  flat = _renumber_blocks(flat, GLOBAL_TO_PER_TYPE)
  depth = num_blocks(flat)
  if depth:
    flat = stack_blocks(flat, list(range(depth)))
  if POSEMB in flat:
    posemb = flat.pop(POSEMB)
    if 'cls' in flat:
      flat['cls'] = flat['cls'] + posemb[:, :1]
      posemb = posemb[:, 1:]
    flat['pos_embedding'] = posemb
  return flat


to_vmoe = vmoe_layout.to_vmoe  # Ours -> vmoe's names (the same arrays).


def to_transformers(flat: Mapping[str, np.ndarray]) -> Flat:
  """Ours (class-token ViT without pre-logits or reducers) -> the parameter names of
  transformers' `ViTForImageClassification`, as numpy arrays."""
  width = flat['embedding/kernel'].shape[-1]
  dense = lambda kernel: kernel.reshape(width, -1).T  # [D, heads, head_dim] -> [out, in].
  out = {
      'vit.embeddings.cls_token': flat['cls'],
      'vit.embeddings.position_embeddings': flat[POSEMB],
      'vit.embeddings.patch_embeddings.projection.weight':
          flat['embedding/kernel'].transpose(3, 2, 0, 1),
      'vit.embeddings.patch_embeddings.projection.bias': flat['embedding/bias'],
      'vit.layernorm.weight': flat['Transformer/encoder_norm/scale'],
      'vit.layernorm.bias': flat['Transformer/encoder_norm/bias'],
      'classifier.weight': flat['head/kernel'].T,
      'classifier.bias': flat['head/bias'],
  }
  for i in range(num_blocks(flat)):
    ours, theirs = BLOCK.format(i), f'vit.layers.{i}'
    attention = f'{ours}/MultiHeadDotProductAttention_1'
    for name, proj in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
      out[f'{theirs}.attention.{proj}.weight'] = dense(flat[f'{attention}/{name}/kernel'])
      out[f'{theirs}.attention.{proj}.bias'] = flat[f'{attention}/{name}/bias'].ravel()
    out[f'{theirs}.attention.o_proj.weight'] = flat[f'{attention}/out/kernel'].reshape(
        -1, width).T
    out[f'{theirs}.attention.o_proj.bias'] = flat[f'{attention}/out/bias']
    for norm, hf_norm in (('LayerNorm_0', 'layernorm_before'), ('LayerNorm_2', 'layernorm_after')):
      out[f'{theirs}.{hf_norm}.weight'] = flat[f'{ours}/{norm}/scale']
      out[f'{theirs}.{hf_norm}.bias'] = flat[f'{ours}/{norm}/bias']
    for dense_name, hf_name in (('Dense_0', 'mlp.fc1'), ('Dense_1', 'mlp.fc2')):
      out[f'{theirs}.{hf_name}.weight'] = flat[f'{ours}/MlpBlock_3/{dense_name}/kernel'].T
      out[f'{theirs}.{hf_name}.bias'] = flat[f'{ours}/MlpBlock_3/{dense_name}/bias']
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def transformers_config(flat: Mapping[str, np.ndarray]) -> dict:
  """The `ViTConfig` fields of the model in `flat` (all derivable from the shapes).
  Our MLP uses flax's tanh-approximated GELU, hence `gelu_pytorch_tanh`."""
  patch, _, channels, width = flat['embedding/kernel'].shape
  grid = int(round(np.sqrt(flat[POSEMB].shape[1] - 1)))
  return dict(hidden_size=int(width), num_hidden_layers=num_blocks(flat),
              num_attention_heads=int(flat[f'{BLOCK.format(0)}/MultiHeadDotProductAttention_1/'
                                           'query/kernel'].shape[1]),
              intermediate_size=int(flat[f'{BLOCK.format(0)}/MlpBlock_3/Dense_0/kernel'].shape[1]),
              hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6, image_size=int(grid * patch),
              patch_size=int(patch), num_channels=int(channels),
              num_labels=int(flat['head/kernel'].shape[1]), qkv_bias=True)


def transformers_refusal(flat: Mapping[str, np.ndarray]) -> str:
  """Why `flat` cannot become a transformers ViT ('' when it can)."""
  reducers = sorted({k.split('/')[1] for k in flat if k.startswith('Transformer/')
                     and not k.split('/')[1].startswith(('encoderblock', 'encoder_norm',
                                                         'posembed_input'))})
  if reducers:
    return (f'transformers\' ViT has no token merging, and this model has {", ".join(reducers)}; '
            'export it with --to=npz or --to=big_vision instead.')
  if 'cls' not in flat:
    return ('transformers\' ViTForImageClassification classifies from the class token, and '
            'this model has none (GAP or MAP head).')
  if any(k.startswith(('pre_logits/', 'MAPHead_0/')) for k in flat):
    return 'transformers\' ViTForImageClassification has no pre-logits layer or MAP head.'
  return ''
