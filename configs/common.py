"""Shared pieces of the configs: arg-string parsing and the model section.

A config file's `get_config(arg)` takes an arg string such as
`variant=B/16,merger=8@6,reducer=tokenlearner` (the text after `:` in
`--config=configs/X.py:...`). Every key must be one the config declares.
"""
from typing import Any, Optional

import ml_collections
from ml_collections import config_dict


def parse_merger(spec: str) -> Any:
  """'none' -> None; '8' -> M=8 halfway; '8@3' -> M=8 before block 3;
  '16@4+8@8' -> two mergers."""
  spec = spec.strip().lower()
  if spec in ('', 'none', 'off', '0'):
    return None
  mergers = []
  for part in spec.split('+'):
    tokens, _, block = part.partition('@')
    try:
      mergers.append(dict(num_tokens=int(tokens),
                          before_block=int(block) if block else None))
    except ValueError:
      raise ValueError(f'Bad merger spec {spec!r}: expected M, M@BLOCK or '
                       'M@BLOCK+M@BLOCK (e.g. 8@6), or none.') from None
  return mergers[0] if len(mergers) == 1 else tuple(mergers)


def parse_arg(arg: Optional[str], **defaults: Any) -> ml_collections.ConfigDict:
  """'a=1,b=x' -> ConfigDict, values typed like the defaults; unknown keys fail."""
  result = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    key = key.strip()
    if not sep or key not in defaults:
      raise ValueError(f'Unknown config argument {item!r}; this config takes '
                       f'{", ".join(f"{k}=..." for k in defaults)}.')
    default = defaults[key]
    if isinstance(default, bool):
      result[key] = value.lower() in ('1', 'true', 'yes')
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
      result[key] = type(default)(value)
    else:
      result[key] = value
  return ml_collections.ConfigDict(result)


def parse_experts(spec: str) -> dict:
  """'none' -> {kind: none}; 'KIND[:E[xK]][@WHERE]' -> the `model.moe` fields it sets.

  KIND is sparse or soft; E the number of experts; K the experts per token (sparse)
  or slots per expert (soft); WHERE the blocks: everyN (blocks N-1, 2N-1, ...),
  lastN, or indices joined by '+'. E.g. sparse:8x2@every2, soft:16@last2, sparse:4x1@1+3.
  """
  text = spec.strip().lower()
  if text in ('', 'none', 'off'):
    return dict(kind='none')
  head, at, where = text.partition('@')
  kind, colon, sizes = head.partition(':')
  fields = dict(kind=kind)
  try:
    if kind not in ('sparse', 'soft') or (at and not where) or (colon and not sizes):
      raise ValueError  # Also an empty E or WHERE after its ':' or '@'.
    if sizes:
      experts, times, per = sizes.partition('x')
      fields['num_experts'] = int(experts)
      if times:  # int('') refuses an empty K after 'x'.
        fields['num_selected_experts' if kind == 'sparse' else 'num_slots'] = int(per)
    if where:
      fields['layers'] = (tuple(int(b) for b in where.split('+'))
                          if where[0].isdigit() else where)
  except ValueError:
    raise ValueError(f'Bad experts spec {spec!r}: expected none or KIND[:E[xK]][@WHERE] with '
                     'KIND sparse or soft and WHERE everyN, lastN or BLOCK+BLOCK (e.g. '
                     'sparse:8x2@every2, soft:16@last2).') from None
  return fields


def moe_config(spec: str = 'none') -> ml_collections.ConfigDict:
  """The `model.moe` entry (patchmerger/models/experts.py). None: the kind's default,
  after vmoe's configs (sparse: V-MoE paper; soft: Soft MoE paper)."""
  typed = lambda kind: config_dict.placeholder(kind)
  moe = ml_collections.ConfigDict(dict(
      kind='none',                       # none | sparse | soft
      layers=config_dict.FieldReference(None, field_type=object),  # indices, everyN,
                                         # lastN, lasthalf (sparse: every2; soft: lasthalf)
      num_experts=typed(int),            # sparse 32; soft 128
      num_selected_experts=typed(int),   # sparse: top-k, 2
      capacity_factor=typed(float),      # sparse 1.05; soft (num_slots=0 only) 1.0
      eval_capacity_factor=typed(float),  # None: capacity_factor
      batch_priority=typed(bool),        # sparse: False (training)
      eval_batch_priority=typed(bool),   # None: batch_priority
      group_images=typed(int),           # images per routing group: sparse 8, soft 1
      noise_std=typed(float),            # sparse 1.0 (x 1/E, training only); soft 0.0
      num_slots=typed(int),              # soft: slots per expert, 1 (0: from capacity)
      importance_loss_weight=typed(float),  # sparse 0.005
      load_loss_weight=typed(float),     # sparse 0.005
  ))
  moe.update(parse_experts(spec))
  return moe


def merger_config(spec: str) -> Any:
  """The `model.merger` entry: a ConfigDict for one merger (so that
  `--config.model.merger.num_tokens=16` works), a tuple for several, or None."""
  merger = parse_merger(spec)
  if isinstance(merger, dict):
    merger = ml_collections.ConfigDict(dict(
        num_tokens=merger['num_tokens'],
        before_block=(config_dict.placeholder(int) if merger['before_block'] is None
                      else merger['before_block'])))
  return merger


def reducer_config(kind: str = 'patchmerger') -> ml_collections.ConfigDict:
  """The `model.reducer` entry (patchmerger/models/reducers.py). `merger` places
  patchmerger, tokenlearner and pool; tome uses r and start_block instead."""
  return ml_collections.ConfigDict(dict(
      kind=kind.strip().lower(),       # patchmerger | tokenlearner | pool | tome | none
      # ToMe (patchmerger/models/tome.py), read as the authors' parse_r reads r:
      r=config_dict.FieldReference(0, field_type=object),  # int, or a list per block
      inflection=0.0,                  # with an int r: -1 decreasing .. 0 constant .. +1
      start_block=0,                   # blocks before it merge nothing
      proportional_attention=True,     # log(size) on the attention logits
      size_weighted_gap=False,         # GAP weights tokens by size (ToMe's MAE patch)
  ))


def fewshot_config(pool_examples: int, test_examples: int,
                   shots: tuple[int, ...] = (1, 5, 10, 25)) -> dict:
  """A `fewshot` evaluator: linear probes on the pre-logits, fitted on `shots` examples
  per class drawn from the first `pool_examples` of the train split, scored on the first
  `test_examples` of the test split."""
  return dict(kind='fewshot', every=0, shots=shots, pool_examples=pool_examples,
              test_examples=test_examples, l2=1.0)


def evals_config(every: int, fewshot: Optional[dict] = None) -> ml_collections.ConfigDict:
  """The `evals` section (patchmerger/evaluators): NAME -> {kind, every, ...}. `every`:
  steps between evaluations in training (and the last step); 0: only in eval.py."""
  evals = dict(
      test=dict(kind='classification', every=every,
                split=''),                 # '': config.test_split
      throughput=dict(kind='throughput', every=0, batches=10,
                      prefix='test'),      # metric test/images_per_sec
      merge_pictures=dict(kind='merge_pictures', every=0, images=4,
                          path=''),        # '': WORKDIR/merge_pictures.png
  )
  if fewshot:
    evals['fewshot'] = fewshot
  return ml_collections.ConfigDict(evals)


def model_config(variant: str, merger: str, reducer: str = 'patchmerger',
                 experts: str = 'none', **fields: Any) -> ml_collections.ConfigDict:
  """The `model` section. Sizes default to the variant's; set width, depth,
  mlp_dim or num_heads to override them (e.g. tiny widths in tests)."""
  return ml_collections.ConfigDict(dict(
      variant=variant,                           # NAME/PATCH, e.g. B/16
      width=config_dict.placeholder(int),
      depth=config_dict.placeholder(int),
      mlp_dim=config_dict.placeholder(int),
      num_heads=config_dict.placeholder(int),
      merger=merger_config(merger),              # None: plain ViT
      reducer=reducer_config(reducer),           # what sits in the merger slots
      moe=moe_config(experts),                   # experts in place of block MLPs
      classifier='token',                        # token | gap | map
      posemb='learn',                            # learn | sincos2d
      conv_stem=(),                              # channels of 3x3/2 convs
      representation_size=config_dict.placeholder(int),
      dropout_rate=0.0,
      attention_dropout_rate=0.0,
      merge_normalized=True,
      dtype='float32',                           # compute dtype; params stay f32
      attention='auto',                          # xla | cudnn | auto (cuDNN where it can)
      scan=False,                                # one nn.scan per run of blocks
      remat_policy='none',                       # none | full | a jax.checkpoint_policies name
  ) | fields)
