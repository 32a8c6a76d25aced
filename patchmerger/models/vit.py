"""Vision Transformer with token-reducer slots (PatchMerger and the others).

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
import jax
import jax.numpy as jnp
import numpy as np

from patchmerger.models import reducers, tome
from patchmerger.models.attention import IMPLEMENTATIONS, MultiHeadAttention

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
POSEMBS = ('learn', 'sincos2d')


def parse_variant(variant: str) -> dict:
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  name, sep, patch = str(variant).partition('/')
  if not sep or name not in VARIANTS or not patch.isdigit() or int(patch) < 1:
    raise ValueError(
        f'Unknown model variant {variant!r}: expected NAME/PATCH with NAME in '
        f'{sorted(VARIANTS)} and PATCH a positive integer, e.g. "B/16".')
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch_size=int(patch))


def posemb_sincos_2d(h: int, w: int, width: int,
                     temperature: float = 10_000.) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding, [1, h*w, width]."""
  if width % 4:
    raise ValueError(f'sincos2d position embedding needs width % 4 == 0, got {width}')
  y, x = np.mgrid[:h, :w]
  omega = 1. / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class AddPositionEmbs(nn.Module):
  """Adds a learned or fixed position embedding to [batch, tokens, width]."""
  kind: str
  grid: tuple[int, int]
  has_cls_token: bool

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    num_tokens, width = x.shape[1:]
    if self.kind == 'learn':
      posemb = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                          (1, num_tokens, width), jnp.float32)
    else:
      posemb = posemb_sincos_2d(*self.grid, width)
      if self.has_cls_token:  # The class token gets no position.
        posemb = np.concatenate([np.zeros((1, 1, width), np.float32), posemb], 1)
    if posemb.shape[1] != num_tokens:
      raise ValueError(
          f'Position embedding holds {posemb.shape[1]} tokens but the input has '
          f'{num_tokens}: resize it for the new resolution before loading.')
    return x + posemb.astype(x.dtype)


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout_rate: float = 0.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    dense = lambda n, name: nn.Dense(
        n, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    y = nn.gelu(dense(self.mlp_dim, 'Dense_0')(x))
    y = nn.Dropout(self.dropout_rate)(y, deterministic)
    y = dense(x.shape[-1], 'Dense_1')(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm transformer block (attention, then MLP, both residual).

  `merge` is an optional step between attention and MLP that reduces the tokens
  using the attention keys (ToMe's tome.BipartiteMerge). `sizes` [batch, N, 1]
  (how many patches each token stands for, None: all 1) add log(size) to the
  attention logits when `proportional_attention`. Returns (tokens, sizes).
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.
  attention_dropout_rate: float = 0.
  dtype: Dtype = jnp.float32
  merge: Optional[tome.BipartiteMerge] = None
  attention: str = 'auto'                  # xla | cudnn | auto (attention.py)
  proportional_attention: bool = True      # Add log(sizes) to the attention logits.

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool,
               sizes: Optional[jnp.ndarray] = None) -> tuple[jnp.ndarray, Optional[jnp.ndarray]]:
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(x)
    y, keys = MultiHeadAttention(
        self.num_heads, self.dtype, self.attention_dropout_rate, self.attention,
        name='MultiHeadDotProductAttention_1')(
            y, tome.proportional_bias(sizes) if self.proportional_attention else None,
            deterministic, return_keys=True)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic)
    if self.merge is not None:
      x, sizes = self.merge(x, keys, sizes)
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_2')(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name='MlpBlock_3')(
        y, deterministic)
    return x + y, sizes


# Rematerialisation policies of model.remat_policy besides 'none' and 'full' (save
# nothing): jax.checkpoint_policies that take no arguments.
REMAT_POLICIES = ('nothing_saveable', 'everything_saveable', 'dots_saveable',
                  'checkpoint_dots', 'dots_with_no_batch_dims_saveable',
                  'checkpoint_dots_with_no_batch_dims')


def check_remat_policy(name: str) -> str:
  if name not in ('none', 'full') + REMAT_POLICIES:
    raise ValueError(f"model.remat_policy must be 'none', 'full' or one of {REMAT_POLICIES}, "
                     f'got {name!r}')
  return name


def block_runs(depth: int, reducer_blocks: Sequence[int]) -> list[tuple[int, int]]:
  """[start, stop) runs of consecutive blocks between reducers: before the first,
  between two, after the last (a reducer before block 0 starts the first run)."""
  bounds = sorted({0, depth} | {b for b in reducer_blocks if 0 < b < depth})
  return list(zip(bounds[:-1], bounds[1:]))


class Encoder(nn.Module):
  """Position embedding, encoder blocks with reducers between or inside them,
  final norm. Returns (tokens, sizes); sizes is None unless ToMe merged.

  With `scan`, each run of blocks between reducers is one `nn.scan` whose
  parameters are stacked along a leading axis under `encoderblocks_START`
  (checkpoints/layouts.py converts to and from `encoderblock_N`); it compiles
  once per run instead of once per block. `remat_policy` rematerialises each
  block in the backward pass ('full': keeps only its input).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  mergers: Sequence[tuple[int, int]] = ()  # (before_block, num_tokens) pairs.
  posemb: str = 'learn'
  grid: tuple[int, int] = (1, 1)
  has_cls_token: bool = False
  dropout_rate: float = 0.
  attention_dropout_rate: float = 0.
  merge_normalized: bool = True
  dtype: Dtype = jnp.float32
  reducer: str = 'patchmerger'             # The kind in the `mergers` slots.
  tome_r: Sequence[int] = ()               # ToMe merges per block; () for none.
  attention: str = 'auto'
  scan: bool = False
  remat_policy: str = 'none'
  tome_proportional_attention: bool = True  # log(size) added to the attention logits.

  def _block_type(self) -> Any:
    if self.remat_policy == 'none':
      return Encoder1DBlock
    policy = (None if self.remat_policy == 'full'
              else getattr(jax.checkpoint_policies, self.remat_policy))
    # `deterministic` (argument 2, after self and x) is a Python bool. Under scan,
    # XLA cannot merge the recomputation away, so CSE prevention is not needed.
    return nn.remat(Encoder1DBlock, policy=policy, prevent_cse=not self.scan,
                    static_argnums=(2,))

  @nn.compact
  def __call__(self, x: jnp.ndarray,
               deterministic: bool) -> tuple[jnp.ndarray, Optional[jnp.ndarray]]:
    x = AddPositionEmbs(self.posemb, self.grid, self.has_cls_token,
                        name='posembed_input')(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic)
    merger_tokens = dict(self.mergers)
    grid, sizes = tuple(self.grid), None
    block = self._block_type()
    fields = (self.mlp_dim, self.num_heads, self.dropout_rate, self.attention_dropout_rate,
              self.dtype)
    for start, stop in block_runs(self.depth, list(merger_tokens)):
      if start in merger_tokens:
        reduce = reducers.between_blocks(self.reducer, merger_tokens[start], grid,
                                         self.merge_normalized, self.dtype,
                                         name=f'{self.reducer}_{start}',
                                         dropout_rate=self.dropout_rate)
        grid = reducers.grid_after(self.reducer, merger_tokens[start], grid)
        if self.has_cls_token:  # The class token is carried past the reducer.
          x = jnp.concatenate([x[:, :1], reduce(x[:, 1:], deterministic)], axis=1)
        else:
          x = reduce(x, deterministic)
      if self.scan:  # Tokens are the carry; `deterministic` and `sizes` (None) broadcast.
        run = nn.scan(block, variable_axes={'params': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=(nn.broadcast, nn.broadcast), length=stop - start)
        x, _ = run(*fields, None, self.attention, name=f'encoderblocks_{start}')(
            x, deterministic, sizes)
        continue
      for i in range(start, stop):
        r = self.tome_r[i] if self.tome_r else 0
        x, sizes = block(*fields, tome.BipartiteMerge(r, self.has_cls_token) if r else None,
                         self.attention, self.tome_proportional_attention,
                         name=f'encoderblock_{i}')(x, deterministic, sizes)
    return nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x), sizes


class MAPHead(nn.Module):
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
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, name='MlpBlock_0')(
        y, deterministic=True)
    return x[:, 0]


class VisionTransformer(nn.Module):
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
  remat_policy: str = 'none'               # none | full | REMAT_POLICIES
  tome_proportional_attention: bool = True
  tome_size_weighted_gap: bool = False     # GAP over patches (sizes) instead of tokens

  def __post_init__(self):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'classifier must be one of {CLASSIFIERS}, got {self.classifier!r}')
    if self.posemb not in POSEMBS:
      raise ValueError(f'posemb must be one of {POSEMBS}, got {self.posemb!r}')
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} is not divisible by num_heads {self.num_heads}')
    if self.patch_size % (2 ** len(self.conv_stem)):
      raise ValueError(f'patch_size {self.patch_size} is not divisible by the '
                       f'conv stem stride {2 ** len(self.conv_stem)}')
    blocks = [b for b, _ in self.mergers]
    for before_block, num_tokens in self.mergers:
      if not 0 <= before_block < self.depth:
        raise ValueError(f'A merger before block {before_block} does not fit a '
                         f'model of depth {self.depth} (blocks 0..{self.depth - 1}).')
      if num_tokens < 1:
        raise ValueError(f'A merger needs num_tokens >= 1, got {num_tokens}.')
    if len(set(blocks)) != len(blocks):
      raise ValueError(f'Two mergers before the same block: {self.mergers}')
    reducers.check_kind(self.reducer)
    if self.mergers and self.reducer not in reducers.BETWEEN_BLOCKS:
      raise ValueError(f'Reducer {self.reducer!r} takes no merger slots; got {self.mergers}.')
    if self.tome_r and (len(self.tome_r) != self.depth or self.reducer != 'tome'):
      raise ValueError(f'tome_r needs reducer "tome" and one entry per block '
                       f'({self.depth}); got {self.reducer!r} with {self.tome_r}.')
    if self.attention not in IMPLEMENTATIONS:
      raise ValueError(f'model.attention must be one of {IMPLEMENTATIONS}, '
                       f'got {self.attention!r}')
    check_remat_policy(self.remat_policy)
    if self.scan and any(self.tome_r):
      raise ValueError('model.scan needs blocks of equal token counts; ToMe changes them '
                       'in every block: use scan=False with ToMe.')
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if images.ndim != 4:
      raise ValueError(f'Expected images [batch, height, width, channels], got {images.shape}')
    height, width = images.shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(f'Image size {height}x{width} is not divisible by the '
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

    x, sizes = Encoder(self.depth, self.mlp_dim, self.num_heads, tuple(self.mergers),
                       self.posemb, (gh, gw), has_cls, self.dropout_rate,
                       self.attention_dropout_rate, self.merge_normalized, self.dtype,
                       self.reducer, tuple(self.tome_r), self.attention, self.scan,
                       self.remat_policy, self.tome_proportional_attention,
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
      x = MAPHead(self.mlp_dim, self.num_heads, self.dtype, name='MAPHead_0')(x)

    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                           name='pre_logits')(x))
    self.sow('intermediates', 'features', x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      kernel_init=nn.initializers.zeros, name='head')(x)
    return logits.astype(jnp.float32)
