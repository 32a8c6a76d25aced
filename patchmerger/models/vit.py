"""Vision Transformer with token-reducer slots (PatchMerger and the others): the
patch embedding, the classifier heads and the model variants around the encoder
(patchmerger/models/encoder.py).

Parameter names and shapes follow the public checkpoints of
google-research/vision_transformer (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_N/...`,
`Transformer/encoder_norm`, `pre_logits`, `head`), so their `.npz` files map
onto this tree one to one. Between-block reducers live at
`Transformer/<kind>_K` (e.g. `Transformer/patchmerger_K`), where K is the index
of the encoder block they precede; ToMe merges inside the blocks and has no
parameters (patchmerger/models/reducers.py).
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from patchmerger.errors import ConfigError
from patchmerger.models import experts, reducers
from patchmerger.models.attention import IMPLEMENTATIONS
from patchmerger.models.encoder import Encoder, check_remat_policy
from patchmerger.models.mlp import MlpBlock
from patchmerger.models.posemb import POSEMBS

Dtype = Any

# name -> (width, depth, mlp_dim, num_heads), as in the ViT papers.
VARIANTS = {
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
    'g': (1408, 40, 6144, 16),
    'G': (1664, 48, 8192, 16),
}
CLASSIFIERS = ('token', 'gap', 'map')


def parse_variant(variant: str) -> dict:
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  name, sep, patch = str(variant).partition('/')
  if not sep or name not in VARIANTS or not patch.isdigit() or int(patch) < 1:
    raise ConfigError(
        f'Unknown model variant {variant!r}: expected NAME/PATCH with NAME in '
        f'{sorted(VARIANTS)} and PATCH a positive integer, e.g. "B/16".')
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch_size=int(patch))


class MAPHead(nn.Module, kw_only=True):
  """Multihead attention pooling with one learned probe (as in big_vision)."""
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    probe = self.param('probe', nn.initializers.xavier_uniform(),
                       (1, 1, x.shape[-1]), jnp.float32)
    probe = jnp.tile(probe, (x.shape[0], 1, 1)).astype(self.dtype)
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        name='MultiHeadDotProductAttention_0')(probe, x)
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, name='MlpBlock_0')(
        y, deterministic=True)
    return x[:, 0]


class VisionTransformer(nn.Module, kw_only=True):
  """ViT classifier; `mergers` lists (before_block, num_tokens) slots of the
  between-block `reducer` (patchmerger, tokenlearner or pool); `tome_r` gives
  ToMe's merges per block (one int per block, or () for no ToMe).

  `conv_stem` optionally replaces the single patchify convolution by 3x3
  stride-2 convolutions with the given channels (an "early convolution" stem),
  followed by the `embedding` convolution for the remaining stride.
  Pre-logits are sown into 'intermediates' under 'features'.
  """
  num_classes: int
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  mergers: Sequence[tuple[int, int]] = ()
  classifier: str = 'token'
  posemb: str = 'learn'
  conv_stem: Sequence[int] = ()
  representation_size: Optional[int] = None
  dropout_rate: float = 0.
  attention_dropout_rate: float = 0.
  merge_normalized: bool = True
  dtype: Dtype = jnp.float32
  reducer: str = 'patchmerger'
  tome_r: Sequence[int] = ()
  attention: str = 'auto'                  # xla | cudnn | auto
  scan: bool = False                       # one nn.scan per run of blocks between reducers
  remat_policy: str = 'none'               # none | full | encoder.REMAT_POLICIES
  tome_proportional_attention: bool = True
  tome_size_weighted_gap: bool = False     # GAP over patches (sizes) instead of tokens
  moe: Optional[experts.MoeSpec] = None    # Mixture-of-experts MLPs (models/experts.py)

  def __post_init__(self):
    if self.classifier not in CLASSIFIERS:
      raise ConfigError(f'classifier must be one of {CLASSIFIERS}, got {self.classifier!r}')
    if self.posemb not in POSEMBS:
      raise ConfigError(f'posemb must be one of {POSEMBS}, got {self.posemb!r}')
    if self.width % self.num_heads:
      raise ConfigError(f'width {self.width} is not divisible by num_heads {self.num_heads}')
    if self.patch_size % (2 ** len(self.conv_stem)):
      raise ConfigError(f'patch_size {self.patch_size} is not divisible by the '
                        f'conv stem stride {2 ** len(self.conv_stem)}')
    blocks = [b for b, _ in self.mergers]
    for before_block, num_tokens in self.mergers:
      if not 0 <= before_block < self.depth:
        raise ConfigError(f'A merger before block {before_block} does not fit a '
                          f'model of depth {self.depth} (blocks 0..{self.depth - 1}).')
      if num_tokens < 1:
        raise ConfigError(f'A merger needs num_tokens >= 1, got {num_tokens}.')
    if len(set(blocks)) != len(blocks):
      raise ConfigError(f'Two mergers before the same block: {self.mergers}')
    reducers.check_kind(self.reducer)
    if self.mergers and self.reducer not in reducers.BETWEEN_BLOCKS:
      raise ConfigError(f'Reducer {self.reducer!r} takes no merger slots; got {self.mergers}.')
    if self.tome_r and (len(self.tome_r) != self.depth or self.reducer != 'tome'):
      raise ConfigError(f'tome_r needs reducer "tome" and one entry per block '
                        f'({self.depth}); got {self.reducer!r} with {self.tome_r}.')
    if self.attention not in IMPLEMENTATIONS:
      raise ConfigError(f'model.attention must be one of {IMPLEMENTATIONS}, '
                        f'got {self.attention!r}')
    check_remat_policy(self.remat_policy)
    if self.scan and any(self.tome_r):
      raise ConfigError('model.scan needs blocks of equal token counts; ToMe changes them '
                        'in every block: use scan=False with ToMe.')
    if self.moe is not None:
      if self.scan:
        raise ConfigError('model.moe with model.scan is not supported: a scanned run needs '
                          'identical blocks; use scan=False with experts.')
      if self.reducer == 'tome':
        raise ConfigError('model.moe with ToMe is not supported: ToMe changes the token count '
                          'in every block, routing groups need a fixed one.')
      if max(self.moe.layers, default=-1) >= self.depth:
        raise ConfigError(f'model.moe.layers {self.moe.layers} do not fit a model of depth '
                          f'{self.depth}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if images.ndim != 4:
      raise ValueError(f'Expected images [batch, height, width, channels], got {images.shape}')
    height, width = images.shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      raise ConfigError(f'Image size {height}x{width} is not divisible by the '
                        f'patch size {self.patch_size}.')
    x = images.astype(self.dtype)
    for i, channels in enumerate(self.conv_stem):
      x = nn.Conv(channels, (3, 3), strides=2, padding='SAME', dtype=self.dtype,
                  name=f'stem_conv_{i}')(x)
      x = nn.gelu(x)
    stride = self.patch_size // (2 ** len(self.conv_stem))
    kernel = stride if not self.conv_stem else max(stride, 3)
    x = nn.Conv(self.width, (kernel, kernel), strides=stride,
                padding='VALID' if not self.conv_stem else 'SAME',
                dtype=self.dtype, name='embedding')(x)
    batch, gh, gw, _ = x.shape
    x = x.reshape(batch, gh * gw, self.width)

    has_cls = self.classifier == 'token'
    if has_cls:
      cls = self.param('cls', nn.initializers.zeros, (1, 1, self.width), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (batch, 1, 1)), x], axis=1)

    x, sizes = Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        mergers=tuple(self.mergers), posemb=self.posemb, grid=(gh, gw),
        has_cls_token=has_cls, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        merge_normalized=self.merge_normalized, dtype=self.dtype, reducer=self.reducer,
        tome_r=tuple(self.tome_r), attention=self.attention, scan=self.scan,
        remat_policy=self.remat_policy,
        tome_proportional_attention=self.tome_proportional_attention, moe=self.moe,
        name='Transformer')(x, deterministic=not train)

    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap' and sizes is not None and self.tome_size_weighted_gap:
      # ToMe's tokens stand for `sizes` patches each: the mean over the patches (as
      # ToMe's MAE patch pools). Its timm patch, the default here, takes the plain mean.
      x = (jnp.sum(x * sizes.astype(x.dtype), axis=1)
           / jnp.sum(sizes, axis=1).astype(x.dtype))
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=1)
    else:
      x = MAPHead(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype=self.dtype,
                  name='MAPHead_0')(x)

    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                           name='pre_logits')(x))
    self.sow('intermediates', 'features', x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      kernel_init=nn.initializers.zeros, name='head')(x)
    return logits.astype(jnp.float32)

