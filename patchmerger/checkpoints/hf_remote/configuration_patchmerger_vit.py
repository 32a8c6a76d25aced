"""Configuration of a PatchMerger ViT exported from the patchmerger (JAX) codebase.

Self-contained: imports only transformers, so that an export directory opens anywhere with
`trust_remote_code=True`. Field names follow the JAX model's (patchmerger/models/vit.py).
"""
from typing import Optional, Sequence

from transformers import PretrainedConfig


class PatchMergerViTConfig(PretrainedConfig):
  """A ViT with optional token reducers between blocks (`reducer`: patchmerger, tokenlearner
  or pool, the JAX `model.reducer.kind`; `mergers`: [[before_block, num_tokens], ...]), a
  `token`, `gap` or `map` head, `learn` or `sincos2d` position embeddings, an optional
  stride-2 convolution stem and an optional tanh pre-logits layer. ToMe (`reducer` tome) merges
  `tome_r[i]` tokens inside block i ([] or all zeros: no ToMe), optionally adding log(token
  size) to the attention logits and taking a GAP head's mean over patches, not tokens."""
  model_type = 'patchmerger_vit'

  def __init__(self, width: int = 768, depth: int = 12, mlp_dim: int = 3072,
               num_heads: int = 12, patch_size: int = 16, num_channels: int = 3,
               num_classes: int = 1000, mergers: Sequence[Sequence[int]] = (),
               classifier: str = 'token', posemb: str = 'learn',
               grid: Optional[Sequence[int]] = None, image_size: Optional[int] = None,
               conv_stem: Sequence[int] = (), representation_size: Optional[int] = None,
               merge_normalized: bool = True, layer_norm_eps: float = 1e-6,
               reducer: str = 'patchmerger', tome_r: Sequence[int] = (),
               tome_proportional_attention: bool = True, tome_size_weighted_gap: bool = False,
               **kwargs):
    self.width = width
    self.depth = depth
    self.mlp_dim = mlp_dim
    self.num_heads = num_heads
    self.patch_size = patch_size
    self.num_channels = num_channels
    self.num_classes = num_classes
    self.mergers = [list(m) for m in mergers]
    self.classifier = classifier
    self.posemb = posemb
    # The patch grid a learned position embedding was trained for (None: any, sincos2d).
    self.grid = list(grid) if grid is not None else None
    self.image_size = image_size
    self.conv_stem = list(conv_stem)
    self.representation_size = representation_size
    self.merge_normalized = merge_normalized
    self.layer_norm_eps = layer_norm_eps  # Flax's LayerNorm default.
    self.reducer = reducer
    self.tome_r = [int(r) for r in tome_r]  # Merges per block, as the JAX model's tome_r.
    self.tome_proportional_attention = tome_proportional_attention
    self.tome_size_weighted_gap = tome_size_weighted_gap
    kwargs.setdefault('num_labels', num_classes)
    super().__init__(**kwargs)
