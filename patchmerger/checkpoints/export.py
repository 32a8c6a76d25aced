"""Writing a model's parameters in the public layouts.

- `npz`: google-research/vision_transformer's layout (ours), one array per parameter;
- `big_vision`: big_vision's stacked (scan) layout, loadable by its `vit.load`;
- `vmoe`: google-research/vmoe's VisionTransformerMoe names (vmoe_layout.py): blocks under
  `Encoder/` with `SelfAttention`, `Mlp` or `Moe` (experts and router as ours), `MapHead`;
- `transformers`: a directory that transformers opens (needs torch and transformers):
  plain class-token ViTs as its stock `ViTForImageClassification`; given the model config,
  PatchMergers, TokenLearner, pooling, ToMe, GAP/MAP heads, pre-logits, sincos2d and conv
  stems with our own code (hf_export.py, opened with `trust_remote_code=True`).
The npz layouts reload through `loading.load` to identical logits, the transformers
directories give them within 1e-4 (tests/test_hf_export.py). Given the model config of the
run, `export` refuses what the layout cannot compute and writes the config beside the
weights (model_config.py).
"""
from typing import Any, Mapping, Optional

import numpy as np
from etils import epath

from patchmerger.checkpoints import (hf_export, layouts, loading,
                                     model_config as model_config_lib)
from patchmerger.errors import CheckpointError, ConfigError, MissingDependencyError

FORMATS = ('npz', 'big_vision', 'vmoe', 'transformers')


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


def export_vmoe(params: Any, path: str) -> None:
  """`params` in vmoe's `.npz` layout (the same arrays under its names)."""
  _write_npz(layouts.to_vmoe(_canonical(params)), path)


def transformers_model(params: Any):
  """A `ViTForImageClassification` (eval mode) holding exactly `params`."""
  flat = _canonical(params)
  refusal = layouts.transformers_refusal(flat)
  if refusal:
    raise CheckpointError(f'Cannot export to transformers: {refusal}')
  import torch
  from transformers import ViTConfig, ViTForImageClassification
  model = ViTForImageClassification(ViTConfig(**layouts.transformers_config(flat)))
  state = {k: torch.from_numpy(np.array(v))  # A writable copy.
           for k, v in layouts.to_transformers(flat).items()}
  model.load_state_dict(state, strict=True)
  return model.eval()


def require_torch() -> None:
  """One line naming the install when torch or transformers is missing (they are not in
  the training requirements)."""
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    raise MissingDependencyError(
        f'--to=transformers needs torch and transformers ({e}): pip install torch '
        'transformers, or the tested pins with pip install -r requirements-dev.txt.') from None


def resized(flat: Mapping[str, np.ndarray], model_config: Any,
            image_size: int) -> dict[str, np.ndarray]:
  """`flat` for images of `image_size`: a learned position embedding resized as
  fine-tuning resizes it (`loading.resize_posemb`); sincos2d ones need nothing."""
  arch = model_config_lib.architecture(model_config)
  if image_size % arch['patch_size']:
    raise ConfigError(f'--image_size {image_size} is not a multiple of the patch size '
                      f'{arch["patch_size"]}.')
  if layouts.POSEMB not in flat:
    return dict(flat)
  has_cls = arch['classifier'] == 'token'
  grid = image_size // arch['patch_size']
  return dict(flat) | {layouts.POSEMB: loading.resize_posemb(
      flat[layouts.POSEMB], grid * grid + has_cls, has_cls)}


def export_transformers(params: Any, directory: str, model_config: Optional[Any] = None) -> None:
  """A transformers model directory holding `params`: transformers' stock ViT when it can
  compute the model, else (which needs the run's `model_config`) our own code."""
  require_torch()
  flat = _canonical(params)
  if model_config is not None and hf_export.needs_own_code(flat, model_config):
    hf_export.export(flat, model_config, directory)
    return
  refusal = layouts.transformers_refusal(flat)
  if refusal:  # Without the model config, the weights cannot tell how it computes.
    raise CheckpointError(f'Cannot export to transformers: {refusal} (Given the run\'s model '
                          'config, export() writes it with its own modeling code.)')
  transformers_model(flat).save_pretrained(directory)


def export(params: Any, fmt: str, out: str, model_config: Optional[Any] = None,
           image_size: Optional[int] = None) -> None:
  """Writes `params` in layout `fmt` at `out` (refusing, before writing anything, what the
  layout cannot compute); with the run's `model_config`, writes it beside the weights.
  `image_size` (needs the model config) exports for another resolution."""
  if fmt not in FORMATS:
    raise ConfigError(f'--to must be one of {", ".join(FORMATS)}, got {fmt!r}')
  params = _canonical(params)  # Once: every writer below takes the flat dict as it is.
  if image_size:
    if model_config is None:
      raise ConfigError('Exporting for another image size needs the run\'s model config.')
    params = resized(params, model_config, image_size)
  moe_blocks = sorted({k.split('/')[1] for k in params if '/Moe/' in k})
  if moe_blocks and fmt in ('transformers', 'big_vision'):
    raise CheckpointError(f'--to={fmt} has no mixtures of experts, and this model has them in '
                          f'{", ".join(moe_blocks)}: export it with --to=vmoe or --to=npz.')
  if fmt == 'transformers':
    export_transformers(params, out, model_config)
  else:
    {'npz': export_npz, 'big_vision': export_big_vision, 'vmoe': export_vmoe}[fmt](params, out)
  if model_config is not None:
    model_config_lib.write_beside(out, fmt, model_config)
