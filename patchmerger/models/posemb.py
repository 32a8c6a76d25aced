"""Position embeddings of the patch tokens: learned, or fixed 2-D sine-cosine.

The encoder adds them as `Transformer/posembed_input` (a learned one is the
parameter `pos_embedding`, [1, tokens, width], as in the public ViT checkpoints).
"""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from patchmerger.errors import ConfigError

POSEMBS = ('learn', 'sincos2d')


def posemb_sincos_2d(h: int, w: int, width: int,
                     temperature: float = 10_000.) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding, [1, h*w, width]."""
  if width % 4:
    raise ConfigError(f'sincos2d position embedding needs width % 4 == 0, got {width}')
  y, x = np.mgrid[:h, :w]
  omega = 1. / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class AddPositionEmbs(nn.Module, kw_only=True):
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
      raise ConfigError(
          f'Position embedding holds {posemb.shape[1]} tokens but the input has '
          f'{num_tokens}: resize it for the new resolution before loading.')
    return x + posemb.astype(x.dtype)
