"""Writing a model's parameters in the public layouts.

- `npz`: google-research/vision_transformer's layout (ours), one array per parameter;
- `big_vision`: big_vision's stacked (scan) layout, loadable by its `vit.load`;
- `transformers`: a directory that `ViTForImageClassification.from_pretrained` opens
  (plain class-token ViTs only; needs torch and transformers).
Each reloads through `loading.load` to identical logits. Given the model config of the
run, `export` refuses what the layout cannot compute and writes the config beside the
weights (model_config.py).
"""
from typing import Any, Mapping, Optional

import numpy as np
from etils import epath

from patchmerger.checkpoints import layouts, loading, model_config as model_config_lib
from patchmerger.errors import CheckpointError, ConfigError

FORMATS = ('npz', 'big_vision', 'transformers')


def _write_npz(flat: Mapping[str, np.ndarray], path: str) -> None:
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  with epath.Path(path).open('wb') as f:
    np.savez(f, **flat)


def _canonical(params: Any) -> dict[str, np.ndarray]:
  """Flat parameters with the blocks of a scanned model unstacked."""
  return layouts.unstack_runs(loading.flatten(params))


def export_npz(params: Any, path: str) -> None:
  """`params` (a tree or a flat dict) in the vision_transformer `.npz` layout."""
  _write_npz(_canonical(params), path)


def export_big_vision(params: Any, path: str) -> None:
  """`params` in big_vision's stacked `.npz` layout."""
  _write_npz(layouts.to_big_vision(_canonical(params)), path)


def transformers_model(params: Any):
  """A `ViTForImageClassification` (eval mode) holding exactly `params`."""
  flat = _canonical(params)
  refusal = layouts.transformers_refusal(flat)
  if refusal:
    raise CheckpointError(f'Cannot export to transformers: {refusal}')
  import torch
  from transformers import ViTConfig, ViTForImageClassification
  model = ViTForImageClassification(ViTConfig(**layouts.transformers_config(flat)))
  state = {k: torch.from_numpy(v) for k, v in layouts.to_transformers(flat).items()}
  model.load_state_dict(state, strict=True)
  return model.eval()


def export_transformers(params: Any, directory: str) -> None:
  """A transformers model directory (config.json + weights) holding `params`."""
  transformers_model(params).save_pretrained(directory)


def export(params: Any, fmt: str, out: str, model_config: Optional[Any] = None) -> None:
  """Writes `params` in layout `fmt` at `out`; with the run's `model_config`, first
  refuses what the layout cannot compute, then writes the config beside the weights."""
  if fmt not in FORMATS:
    raise ConfigError(f'--to must be one of {", ".join(FORMATS)}, got {fmt!r}')
  if model_config is not None and fmt == 'transformers':
    refusal = (layouts.transformers_refusal(_canonical(params))
               or model_config_lib.transformers_refusal(model_config))
    if refusal:
      raise CheckpointError(f'Cannot export to transformers: {refusal}')
  {'npz': export_npz, 'big_vision': export_big_vision,
   'transformers': export_transformers}[fmt](params, out)
  if model_config is not None:
    model_config_lib.write_beside(out, fmt, model_config)
