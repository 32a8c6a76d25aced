"""FLOPs and parameter counts."""
import jax
import jax.numpy as jnp
import pytest

from patchmerger import flops
from patchmerger.models import build_model


@pytest.fixture(scope='module')
def vit_b16_pair():
  plain = build_model(dict(variant='B/16', merger=None), num_classes=1000)
  merged = build_model(dict(variant='B/16', merger=dict(num_tokens=8, before_block=None)), 1000)
  return plain, merged


def test_vit_b16_halfway_merger_costs_40_to_60_percent(vit_b16_pair):
  plain, merged = vit_b16_pair
  ratio = flops.measured_gflops(merged, (224, 224, 3)) / flops.measured_gflops(plain, (224, 224, 3))
  assert 0.4 <= ratio <= 0.6


@pytest.mark.parametrize('which', [0, 1])
def test_measured_flops_agree_with_analytic_count(vit_b16_pair, which):
  model = vit_b16_pair[which]
  measured = flops.measured_gflops(model, (224, 224, 3))
  analytic = flops.analytic_gflops(model, (224, 224, 3))
  assert abs(measured - analytic) / analytic < 0.05
  if which == 0:  # ViT-B/16 is 17.6 GMACs in the literature.
    assert 34.5 < analytic < 35.7


def test_parameter_counts_and_merger_share():
  model = build_model(dict(variant='B/16', merger=dict(num_tokens=8, before_block=None),
                           representation_size=768), num_classes=21843)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  counts = flops.count_params(variables['params'])
  # ViT-B/16 with a 1000-class head has 86,567,656 parameters; the i21k model
  # swaps in a 21843-class head and adds a 768x768 pre-logits layer; the
  # merger adds its LayerNorm (2 x 768) and W (768 x 8).
  merger = 2 * 768 + 768 * 8
  total = 86_567_656 + (21843 - 1000) * 769 + 768 * 769 + merger
  assert counts == dict(total=total, merger=merger)


def test_report_combines_flops_and_parameters():
  model = build_model(dict(variant='Ti/4', depth=2, width=16, mlp_dim=32, num_heads=2,
                           merger=dict(num_tokens=4, before_block=1)), num_classes=10)
  result = flops.report(model, (28, 28, 1))
  assert result['params_merger'] == 2 * 16 + 16 * 4
  assert abs(result['gflops'] - flops.analytic_gflops(model, (28, 28, 1))) / result['gflops'] < 0.2
