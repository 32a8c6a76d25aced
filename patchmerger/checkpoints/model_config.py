"""The model config that travels with the weights.

Weights alone do not say how a model computes: pooling and ToMe have no parameters,
and a GAP and a class-token model can hold the same arrays. So train.py writes the
run's whole config to WORKDIR/config.json, every export writes the model section
beside the weights (`<name>.model.json` next to an `.npz`, `patchmerger_model.json`
in a transformers directory), and loading compares it with the model that reads them.
"""
import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Optional

from etils import epath

from patchmerger.errors import CheckpointError
from patchmerger.models import build_model

RUN_CONFIG = 'config.json'
TRANSFORMERS_FILE = 'patchmerger_model.json'
# What decides the computation, as the built VisionTransformer holds it.
ARCHITECTURE = ('patch_size', 'width', 'depth', 'mlp_dim', 'num_heads', 'classifier', 'posemb',
                'conv_stem', 'representation_size', 'merge_normalized', 'reducer', 'mergers',
                'tome_r', 'tome_proportional_attention', 'tome_size_weighted_gap', 'moe')


def _as_dict(model_config: Any) -> dict:
  if hasattr(model_config, 'to_json_best_effort'):  # A ConfigDict: placeholders become null.
    return json.loads(model_config.to_json_best_effort())
  return json.loads(json.dumps(dict(model_config)))


def _write_json(path: str, value: Any) -> None:
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)  # Local or gs://.
  epath.Path(path).write_text(json.dumps(value, indent=1, sort_keys=True))


def write_run_config(workdir: str, config: Any) -> None:
  """The run's whole config, for exports and evaluations of its checkpoints."""
  _write_json(os.path.join(workdir, RUN_CONFIG), _as_dict(config))


def sidecar(out: str, fmt: str) -> str:
  """Where an export in `fmt` at `out` keeps its model config."""
  if fmt == 'transformers':
    return os.path.join(out, TRANSFORMERS_FILE)
  return (out[:-len('.npz')] if out.endswith('.npz') else out) + '.model.json'


def write_beside(out: str, fmt: str, model_config: Any) -> str:
  path = sidecar(out, fmt)
  _write_json(path, _as_dict(model_config))
  return path


def saved(source: str) -> Optional[dict]:
  """The model config stored with a run directory, an `.npz` export or a transformers
  export; None when there is none (public checkpoints, runs older than this file)."""
  # A transformers directory holds transformers' own config.json beside ours: ours first.
  candidates = ([sidecar(source, 'npz')] if source.endswith('.npz') else
                [os.path.join(source, TRANSFORMERS_FILE), os.path.join(source, RUN_CONFIG)])
  for path in candidates:
    if epath.Path(path).is_file():
      try:
        value = json.loads(epath.Path(path).read_text())
      except json.JSONDecodeError as e:
        raise CheckpointError(f'{path} is not readable JSON ({e}); restore it, or pass the '
                              'run\'s --config.') from None
      if not path.endswith(RUN_CONFIG):
        return value
      if isinstance(value.get('model'), dict):  # Not some other tool's config.json.
        return value['model']
  return None


def architecture(model_config: Any) -> dict:
  """The fields of ARCHITECTURE of the model a config builds (variant and overrides
  resolved, merger placements as (before_block, num_tokens), ToMe's schedule per block)."""
  config = _as_dict(model_config) | {'attention': 'xla'}  # Any machine can describe it.
  model = build_model(config, num_classes=1)
  def value(v):
    if dataclasses.is_dataclass(v):  # The experts' MoeSpec.
      return {k: list(x) if isinstance(x, tuple) else x for k, x in dataclasses.asdict(v).items()}
    if isinstance(v, (tuple, list)):
      return [list(x) if isinstance(x, tuple) else x for x in v]
    return v
  return {name: value(getattr(model, name)) for name in ARCHITECTURE}


def differences(stored: Mapping[str, Any], current: Any) -> list[str]:
  """'field: stored -> current' for each architecture field that differs."""
  before, after = architecture(stored), architecture(current)
  return [f'{name}: {before[name]} -> {after[name]}' for name in ARCHITECTURE
          if before[name] != after[name]]


def warn_if_different(source: str, current: Any) -> list[str]:
  """Logs, in one warning, how the model reading `source` differs from the one that
  was trained (a merger inserted at fine-tuning time is such a difference, on purpose)."""
  stored = saved(source)
  if stored is None:
    return []
  changes = differences(stored, current)
  if changes:
    logging.warning('%s was trained as another model; this config differs in %s', source,
                    '; '.join(changes))
  return changes


def transformers_refusal(model_config: Any) -> str:
  """Why transformers' stock ViTForImageClassification cannot compute this model ('' when
  it can): it has learned position embeddings, a patchify stem, no token reduction and a
  class-token head without pre-logits."""
  arch = architecture(model_config)
  reasons = []
  if arch['mergers']:
    reasons.append(f'{arch["reducer"]} before blocks '
                   f'{", ".join(str(b) for b, _ in arch["mergers"])}')
  if any(arch['tome_r']):
    reasons.append(f'ToMe merges {arch["tome_r"]}')
  if arch['classifier'] != 'token':
    reasons.append(f'a {arch["classifier"]} head')
  if arch['representation_size']:
    reasons.append('a pre-logits layer')
  if arch['posemb'] != 'learn':
    reasons.append(f'{arch["posemb"]} position embeddings')
  if arch['conv_stem']:
    reasons.append('a convolution stem')
  if not reasons:
    return ''
  return (f'transformers\' ViTForImageClassification cannot compute this model '
          f'({"; ".join(reasons)}): export it with --to=npz or --to=big_vision instead.')
