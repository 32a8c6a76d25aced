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
                 **fields: Any) -> ml_collections.ConfigDict:
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
