"""Pictures of what each merged token looks at: the first PatchMerger's weights
over the input patches, upsampled onto the image (like the paper's figures)."""
import io
import os
from typing import Any

import jax
import numpy as np
from etils import epath

from patchmerger.data import input_pipeline
from patchmerger.errors import ConfigError
from patchmerger.evaluators import common
from patchmerger.training import sharding

# Reducers whose merged tokens are weighted sums over the patches (ToMe merges pairs).
DRAWABLE = ('patchmerger', 'tokenlearner', 'pool')


def merge_weights(model: Any, params: Any, images: np.ndarray) -> np.ndarray:
  """[batch, M, grid_h, grid_w] weights of the first between-block reducer
  (PatchMerger, TokenLearner or pooling) over the patch grid."""
  if not model.mergers:
    raise ConfigError('This model has no PatchMerger: no merge weights to draw.')
  _, state = model.apply({'params': params}, images, mutable=['intermediates'])
  first_block = min(block for block, _ in model.mergers)
  weights = np.asarray(jax.device_get(state['intermediates']['Transformer'][
      f'{model.reducer}_{first_block}']['merge_weights'][0]))
  grid = int(round(np.sqrt(weights.shape[-1])))
  return weights.reshape(*weights.shape[:2], grid, grid)


def draw(images: np.ndarray, weights: np.ndarray, path: str, mean: float = 0.,
         std: float = 1.) -> int:
  """One row per image: the image, then one heatmap per merged token; returns the
  number of token panels drawn."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  num_images, num_tokens = weights.shape[:2]
  fig, axes = plt.subplots(num_images, num_tokens + 1, squeeze=False,
                           figsize=(1.4 * (num_tokens + 1), 1.5 * num_images))
  panels = 0
  for row in range(num_images):
    image = np.clip(images[row] * std + mean, 0, 1)
    image = image[..., 0] if image.shape[-1] == 1 else image
    size = image.shape[:2]
    axes[row, 0].imshow(image, cmap='gray')
    axes[row, 0].set_title('input' if row == 0 else '', fontsize=7)
    for token in range(num_tokens):
      grid = weights[row, token]
      heat = np.kron(grid, np.ones((size[0] // grid.shape[0], size[1] // grid.shape[1])))
      axis = axes[row, token + 1]
      axis.imshow(image, cmap='gray')
      axis.imshow(heat, cmap='inferno', alpha=0.6, vmin=0, vmax=grid.max())
      if row == 0:
        axis.set_title(f'token {token}', fontsize=7)
      panels += 1
  for axis in axes.ravel():
    axis.axis('off')
  fig.suptitle('PatchMerger: weight of each input patch in each merged token', fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=110)
  plt.close(fig)
  path = epath.Path(path)  # Local or object storage (gs://...).
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    f.write(buffer.getvalue())
  return panels


class Evaluator(common.Evaluator):
  """Draws the first `images` test images with their merge weights at `path` (default:
  WORKDIR/merge_pictures.png); models without a drawable reducer are skipped.
  Spec: `every`, `images`, `path`."""

  def run(self, params: Any) -> dict:
    context = self.context
    model = context.model
    if not model.mergers or model.reducer not in DRAWABLE:
      return {}
    params = sharding.to_host(params)  # On every process: a collective when FSDP spans hosts.
    path = self.spec.get('path') or os.path.join(context.workdir, 'merge_pictures.png')
    if jax.process_index() == 0:
      config = context.config
      images = input_pipeline.first_images(context.builder, config.test_split, config.input,
                                           int(self.spec.get('images', 4)))
      draw(images, merge_weights(model, params, images), path, config.input.mean,
           config.input.std)
    return {f'{self.name}/path': path}
