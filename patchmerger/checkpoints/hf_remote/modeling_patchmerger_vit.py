"""PyTorch twin of the patchmerger (JAX) ViT, for exports opened with
`AutoModelForImageClassification.from_pretrained(DIR, trust_remote_code=True)`.

Self-contained: imports only torch, transformers and its sibling files (the configuration,
the reducers and ToMe, copied into each export). Modules and parameters carry the JAX model's
names and layouts (`Transformer.encoderblock_0.MultiHeadDotProductAttention_1.query.kernel`
is `Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel`, kernels
[in..., out...], convolutions HWIO), so the export is a renaming and each matmul runs in the
JAX orientation; the logits match the JAX model's within float32 rounding.
"""
import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration_patchmerger_vit import PatchMergerViTConfig
from .reducers_patchmerger_vit import Dense, LayerNorm, between_blocks, gelu, grid_after
from .tome_patchmerger_vit import bipartite_merge, proportional_bias


class Conv(nn.Module):
  """Flax's nn.Conv with an HWIO kernel; 'SAME' pads as XLA does (the extra row and column
  go after), which torch's symmetric padding cannot express."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
               same: bool):
    super().__init__()
    self.kernel = nn.Parameter(torch.empty(kernel_size, kernel_size, in_channels, out_channels))
    self.bias = nn.Parameter(torch.zeros(out_channels))
    self.stride, self.same = stride, same

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, channels, height, width]
    if self.same:
      size = self.kernel.shape[0]
      pads = []
      for length in (x.shape[3], x.shape[2]):  # F.pad lists the last axis first.
        total = max((math.ceil(length / self.stride) - 1) * self.stride + size - length, 0)
        pads += [total // 2, total - total // 2]
      x = F.pad(x, pads)
    return F.conv2d(x, self.kernel.permute(3, 2, 0, 1), self.bias, stride=self.stride)


class MlpBlock(nn.Module):

  def __init__(self, width: int, mlp_dim: int):
    super().__init__()
    self.Dense_0 = Dense((width,), (mlp_dim,))
    self.Dense_1 = Dense((mlp_dim,), (width,))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.Dense_1(gelu(self.Dense_0(x)))


class Attention(nn.Module):
  """Multi-head dot-product attention of queries from `q` over `kv` (flax's layout); `bias`
  broadcasts to the logits [batch, heads, queries, keys]."""

  def __init__(self, width: int, num_heads: int):
    super().__init__()
    heads = (num_heads, width // num_heads)
    self.query, self.key, self.value = (Dense((width,), heads) for _ in range(3))
    self.out = Dense(heads, (width,))

  def forward(self, q: torch.Tensor, kv: torch.Tensor, bias: Optional[torch.Tensor] = None,
              return_keys: bool = False):
    """The output, or (output, keys [b, n, heads, head_dim]) for ToMe's metric."""
    query, key, value = self.query(q), self.key(kv), self.value(kv)  # [b, n, heads, head_dim]
    logits = torch.einsum('bqhk,bthk->bhqt', query / math.sqrt(query.shape[-1]), key)
    if bias is not None:
      logits = logits + bias.to(logits.dtype)
    out = self.out(torch.einsum('bhqt,bthk->bqhk', logits.softmax(dim=-1), value))
    return (out, key) if return_keys else out


class EncoderBlock(nn.Module):
  """Pre-LayerNorm block; with ToMe (`tome_r` merges here) the tokens merge between attention
  and MLP, and `sizes` [b, N, 1] (patches per token; None: all 1) bias the attention."""

  def __init__(self, config: PatchMergerViTConfig, tome_r: int = 0):
    super().__init__()
    self.tome_r, self.has_cls = tome_r, config.classifier == 'token'
    self.proportional = config.tome_proportional_attention
    self.LayerNorm_0 = LayerNorm(config.width, config.layer_norm_eps)
    self.MultiHeadDotProductAttention_1 = Attention(config.width, config.num_heads)
    self.LayerNorm_2 = LayerNorm(config.width, config.layer_norm_eps)
    self.MlpBlock_3 = MlpBlock(config.width, config.mlp_dim)

  def forward(self, x: torch.Tensor, sizes: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    y = self.LayerNorm_0(x)
    bias = proportional_bias(sizes) if self.proportional else None
    y, keys = self.MultiHeadDotProductAttention_1(y, y, bias, return_keys=True)
    x = x + y
    if self.tome_r:
      x, sizes = bipartite_merge(x, keys, sizes, self.tome_r, self.has_cls)
    return x + self.MlpBlock_3(self.LayerNorm_2(x)), sizes


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.) -> torch.Tensor:
  """[1, h*w, width], the JAX model's fixed embedding (computed in float64 as numpy does)."""
  quarter = width // 4
  omega = 1. / temperature ** (torch.arange(quarter, dtype=torch.float64) / (quarter - 1 or 1))
  y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                        torch.arange(w, dtype=torch.float64), indexing='ij')
  y, x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
  return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)[None].float()


class PositionEmbedding(nn.Module):

  def __init__(self, config: PatchMergerViTConfig, num_tokens: int):
    super().__init__()
    self.kind = config.posemb
    if self.kind == 'learn':
      self.pos_embedding = nn.Parameter(torch.empty(1, num_tokens, config.width))

  def forward(self, x: torch.Tensor, grid: tuple[int, int], has_cls: bool) -> torch.Tensor:
    if self.kind == 'learn':
      posemb = self.pos_embedding
    else:
      posemb = posemb_sincos_2d(*grid, x.shape[-1]).to(x.device, x.dtype)
      if has_cls:  # The class token gets no position.
        posemb = F.pad(posemb, (0, 0, 1, 0))
    if posemb.shape[1] != x.shape[1]:
      raise ValueError(f'The position embedding holds {posemb.shape[1]} tokens but the input '
                       f'has {x.shape[1]}: feed images of the size the model was trained on.')
    return x + posemb


class Encoder(nn.Module):
  """Position embedding, blocks with between-block reducers (`config.reducer`: patchmerger,
  tokenlearner or pool) before some of them or ToMe inside them (`config.tome_r`), final norm;
  the class token (if any) is carried past each reducer."""

  def __init__(self, config: PatchMergerViTConfig):
    super().__init__()
    has_cls = config.classifier == 'token'
    grid = config.grid or [1, 1]
    self.posembed_input = PositionEmbedding(config, grid[0] * grid[1] + has_cls)
    self.reducer = config.reducer
    self.mergers = {int(b): int(m) for b, m in config.mergers}
    for before_block, num_tokens in self.mergers.items():
      self.add_module(f'{self.reducer}_{before_block}',
                      between_blocks(self.reducer, config.width, num_tokens,
                                     config.merge_normalized, config.layer_norm_eps))
    tome_r = list(config.tome_r or [0] * config.depth)
    for i in range(config.depth):
      self.add_module(f'encoderblock_{i}', EncoderBlock(config, tome_r[i]))
    self.encoder_norm = LayerNorm(config.width, config.layer_norm_eps)
    self.depth = config.depth

  def forward(self, x: torch.Tensor, grid: tuple[int, int],
              has_cls: bool
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], Optional[torch.Tensor]]:
    """(tokens, merge weights, sizes); sizes is None unless ToMe merged."""
    x = self.posembed_input(x, grid, has_cls)
    merge_weights, sizes = [], None
    current: Optional[tuple[int, int]] = grid  # The patch tokens' layout (pool needs it).
    for i in range(self.depth):
      if i in self.mergers:
        reduce = getattr(self, f'{self.reducer}_{i}')
        merged, weights = reduce(x[:, 1:] if has_cls else x, current)
        current = grid_after(self.reducer, self.mergers[i], current)
        x = torch.cat([x[:, :1], merged], dim=1) if has_cls else merged
        merge_weights.append(weights)
      x, sizes = getattr(self, f'encoderblock_{i}')(x, sizes)
    return self.encoder_norm(x), tuple(merge_weights), sizes


class MAPHead(nn.Module):
  """Attention pooling with one learned probe, then a residual MLP (big_vision's)."""

  def __init__(self, config: PatchMergerViTConfig):
    super().__init__()
    self.probe = nn.Parameter(torch.empty(1, 1, config.width))
    self.MultiHeadDotProductAttention_0 = Attention(config.width, config.num_heads)
    self.LayerNorm_0 = LayerNorm(config.width, config.layer_norm_eps)
    self.MlpBlock_0 = MlpBlock(config.width, config.mlp_dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.MultiHeadDotProductAttention_0(self.probe.expand(x.shape[0], -1, -1), x)
    return (x + self.MlpBlock_0(self.LayerNorm_0(x)))[:, 0]


@dataclasses.dataclass
class PatchMergerViTOutput(ImageClassifierOutput):
  """Logits (and loss), plus each reducer's merge weights [batch, M, N], in block order
  (the JAX model's 'intermediates' `Transformer/<reducer>_K/merge_weights`)."""
  merge_weights: Optional[tuple[torch.Tensor, ...]] = None


class PatchMergerViTForImageClassification(PreTrainedModel):
  config_class = PatchMergerViTConfig
  base_model_prefix = 'patchmerger_vit'
  main_input_name = 'pixel_values'

  def __init__(self, config: PatchMergerViTConfig):
    super().__init__(config)
    channels = config.num_channels
    for i, out in enumerate(config.conv_stem):
      self.add_module(f'stem_conv_{i}', Conv(channels, out, 3, 2, same=True))
      channels = out
    stride = config.patch_size // 2 ** len(config.conv_stem)
    kernel = max(stride, 3) if config.conv_stem else stride
    self.embedding = Conv(channels, config.width, kernel, stride, same=bool(config.conv_stem))
    if config.classifier == 'token':
      self.cls = nn.Parameter(torch.zeros(1, 1, config.width))
    self.Transformer = Encoder(config)
    if config.classifier == 'map':
      self.MAPHead_0 = MAPHead(config)
    features = config.width
    if config.representation_size:
      self.pre_logits = Dense((config.width,), (config.representation_size,))
      features = config.representation_size
    self.head = Dense((features,), (config.num_classes,))
    self.post_init()

  def _init_weights(self, module: nn.Module) -> None:
    # Only for parameters a checkpoint does not hold; exports hold all of them.
    for name, param in module.named_parameters(recurse=False):
      with torch.no_grad():
        if name == 'scale':
          param.fill_(1.)
        elif name == 'bias':
          param.zero_()
        else:
          param.normal_(0., 0.02)

  def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None,
              return_dict: Optional[bool] = None, **kwargs) -> PatchMergerViTOutput:
    """`pixel_values` [batch, channels, height, width], normalised as in training."""
    x = pixel_values.to(self.embedding.kernel.dtype)
    for i in range(len(self.config.conv_stem)):
      x = gelu(getattr(self, f'stem_conv_{i}')(x))
    x = self.embedding(x)
    grid = tuple(x.shape[2:])
    x = x.flatten(2).transpose(1, 2)  # Row-major tokens, as the JAX reshape of NHWC.
    has_cls = self.config.classifier == 'token'
    if has_cls:
      x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
    x, merge_weights, sizes = self.Transformer(x, grid, has_cls)
    if self.config.classifier == 'token':
      x = x[:, 0]
    elif (self.config.classifier == 'gap' and sizes is not None
          and self.config.tome_size_weighted_gap):  # The mean over patches, not tokens.
      x = (x * sizes.to(x.dtype)).sum(dim=1) / sizes.sum(dim=1).to(x.dtype)
    elif self.config.classifier == 'gap':
      x = x.mean(dim=1)
    else:
      x = self.MAPHead_0(x)
    if self.config.representation_size:
      x = torch.tanh(self.pre_logits(x))
    logits = self.head(x)
    loss = F.cross_entropy(logits, labels) if labels is not None else None
    return PatchMergerViTOutput(loss=loss, logits=logits, merge_weights=merge_weights)
