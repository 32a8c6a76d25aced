"""Our ViT-B/16 against Hugging Face transformers' PyTorch ViT on the same weights."""
import jax
import numpy as np
import pytest

from patchmerger.checkpoints import export, loading
from patchmerger.models import VisionTransformer, parse_variant

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')


@pytest.mark.slow
def test_vit_b16_logits_match_transformers(tmp_path):
  arch = parse_variant('B/16')
  model = VisionTransformer(num_classes=7, classifier='token', **arch)
  images = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
  params = model.init(jax.random.key(0), images[:1])['params']
  # Random values everywhere (the head and biases start at zero), norms near 1.
  rng = np.random.default_rng(1)
  flat = {k: (1 + 0.1 * rng.standard_normal(v.shape) if k.endswith('scale') else
              0.05 * rng.standard_normal(v.shape)).astype(np.float32)
          for k, v in loading.flatten(params).items()}
  export.export_npz(flat, str(tmp_path / 'ViT-B_16.npz'))

  loaded, _ = loading.load(str(tmp_path / 'ViT-B_16.npz'))
  ours = np.asarray(model.apply({'params': loading.unflatten(loaded)}, images))
  reference = export.transformers_model(loaded)
  with torch.no_grad():
    theirs = reference(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()
  assert ours.shape == theirs.shape == (2, 7)
  assert np.abs(ours).max() > 0.1  # Not a trivial all-zero comparison.
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
