"""`--to=transformers` for the models transformers' stock ViT cannot compute (PatchMergers,
TokenLearners or pooling between blocks, ToMe inside them, GAP and MAP heads, pre-logits,
sincos2d position embeddings, convolution stems): a directory with our own configuration,
modeling, reducer and ToMe code (hf_remote/, plain PyTorch), opened by
`AutoModelForImageClassification.from_pretrained(DIR, trust_remote_code=True)` without this
package. Parameters keep our names ('/' -> '.') and layouts, so the export is a renaming.
"""
import json
import shutil
from typing import Any, Mapping

import numpy as np
from etils import epath

from patchmerger.checkpoints import layouts, model_config as model_config_lib
from patchmerger.errors import CheckpointError

REMOTE_CODE = epath.Path(__file__).parent / 'hf_remote'
CONFIG_FILE = 'configuration_patchmerger_vit.py'
MODELING_FILE = 'modeling_patchmerger_vit.py'
REDUCERS_FILE = 'reducers_patchmerger_vit.py'  # Imported relatively by MODELING_FILE.
TOME_FILE = 'tome_patchmerger_vit.py'  # Likewise.
CODE_FILES = (CONFIG_FILE, MODELING_FILE, REDUCERS_FILE, TOME_FILE)
AUTO_MAP = {'AutoConfig': 'configuration_patchmerger_vit.PatchMergerViTConfig',
            'AutoModelForImageClassification':
                'modeling_patchmerger_vit.PatchMergerViTForImageClassification'}


def needs_own_code(flat: Mapping[str, np.ndarray], model_config: Any) -> bool:
  """Whether the model is beyond transformers' stock ViTForImageClassification."""
  return bool(layouts.transformers_refusal(flat)
              or model_config_lib.transformers_refusal(model_config))


def config_fields(flat: Mapping[str, np.ndarray], arch: Mapping[str, Any]) -> dict:
  """PatchMergerViTConfig's fields: the architecture, plus what only the weights say (input
  channels, classes, the patch grid of a learned position embedding)."""
  first_conv = flat['stem_conv_0/kernel' if arch['conv_stem'] else 'embedding/kernel']
  fields = {name: arch[name] for name in ('width', 'depth', 'mlp_dim', 'num_heads', 'patch_size',
                                          'classifier', 'posemb', 'conv_stem',
                                          'representation_size', 'merge_normalized',
                                          'reducer', 'tome_proportional_attention',
                                          'tome_size_weighted_gap')}
  fields.update(num_channels=int(first_conv.shape[2]),
                num_classes=int(flat['head/kernel'].shape[-1]),
                mergers=[[int(b), int(m)] for b, m in arch['mergers']], layer_norm_eps=1e-6,
                tome_r=[int(r) for r in arch['tome_r']])
  if arch['posemb'] == 'learn':
    patches = flat[layouts.POSEMB].shape[1] - (arch['classifier'] == 'token')
    side = int(round(np.sqrt(patches)))
    if side * side != patches:
      raise CheckpointError(f'Cannot export to transformers: the position embedding holds '
                            f'{patches} patches, not a square grid.')
    fields.update(grid=[side, side], image_size=side * arch['patch_size'])
  return fields


def export(flat: Mapping[str, np.ndarray], model_config: Any, directory: str) -> None:
  """Writes canonical `flat` parameters of the model `model_config` describes to `directory`:
  config.json (with `auto_map`), model.safetensors and the code files."""
  arch = model_config_lib.architecture(model_config)
  import torch
  from patchmerger.checkpoints.hf_remote import configuration_patchmerger_vit as configuration
  from patchmerger.checkpoints.hf_remote import modeling_patchmerger_vit as modeling
  config = configuration.PatchMergerViTConfig(**config_fields(flat, arch))
  config.auto_map = dict(AUTO_MAP)
  config.architectures = ['PatchMergerViTForImageClassification']
  model = modeling.PatchMergerViTForImageClassification(config)
  state = {k.replace('/', '.'): torch.from_numpy(np.array(v, np.float32))  # A writable copy.
           for k, v in flat.items()}
  missing, unexpected = (sorted(set(model.state_dict()) - set(state)),
                         sorted(set(state) - set(model.state_dict())))
  if missing or unexpected:
    raise CheckpointError(f'Cannot export to transformers: the weights do not fit the model '
                          f'config (missing {missing[:3]}, unexpected {unexpected[:3]}).')
  model.load_state_dict(state, strict=True)
  model.eval().save_pretrained(directory)
  for name in CODE_FILES:
    shutil.copyfile(REMOTE_CODE / name, epath.Path(directory) / name)
  written = json.loads((epath.Path(directory) / 'config.json').read_text())
  if written.get('auto_map') != AUTO_MAP:  # Without it, AutoModel cannot find our code.
    raise CheckpointError(f'transformers dropped auto_map from {directory}/config.json.')
