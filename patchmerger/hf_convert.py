"""Public-layout ViT weights -> Hugging Face `transformers` (5.x) ViTForImageClassification.

Used to check our model against an independent implementation; needs torch and
transformers (requirements-dev.txt). Our MLP uses flax's tanh-approximated GELU,
so the HF config uses `gelu_pytorch_tanh`.
"""
from typing import Mapping

import numpy as np


def hf_config(flat: Mapping[str, np.ndarray], num_heads: int, image_size: int):
  from transformers import ViTConfig
  patch, _, channels, width = flat['embedding/kernel'].shape
  depth = len({k.split('/')[1] for k in flat if k.startswith('Transformer/encoderblock_')})
  return ViTConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=num_heads,
                   intermediate_size=flat['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'
                                          ].shape[1],
                   hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6, image_size=image_size,
                   patch_size=patch, num_channels=channels,
                   num_labels=flat['head/kernel'].shape[1], qkv_bias=True)


def hf_state_dict(flat: Mapping[str, np.ndarray]) -> dict:
  """Torch tensors named as ViTForImageClassification's parameters."""
  import torch
  width = flat['embedding/kernel'].shape[-1]
  dense = lambda k: k.reshape(width, -1).T if k.ndim == 3 and k.shape[0] == width else k.T
  out = {
      'vit.embeddings.cls_token': flat['cls'],
      'vit.embeddings.position_embeddings': flat['Transformer/posembed_input/pos_embedding'],
      'vit.embeddings.patch_embeddings.projection.weight':
          flat['embedding/kernel'].transpose(3, 2, 0, 1),
      'vit.embeddings.patch_embeddings.projection.bias': flat['embedding/bias'],
      'vit.layernorm.weight': flat['Transformer/encoder_norm/scale'],
      'vit.layernorm.bias': flat['Transformer/encoder_norm/bias'],
      'classifier.weight': flat['head/kernel'].T,
      'classifier.bias': flat['head/bias'],
  }
  depth = len({k.split('/')[1] for k in flat if k.startswith('Transformer/encoderblock_')})
  for i in range(depth):
    ours, theirs = f'Transformer/encoderblock_{i}', f'vit.layers.{i}'
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
  return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in out.items()}


def hf_model(flat: Mapping[str, np.ndarray], num_heads: int, image_size: int):
  """A ViTForImageClassification holding exactly the weights of `flat`."""
  from transformers import ViTForImageClassification
  model = ViTForImageClassification(hf_config(flat, num_heads, image_size))
  model.load_state_dict(hf_state_dict(flat), strict=True)
  return model.eval()
