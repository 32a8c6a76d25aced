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
  assert counts == dict(total=total, merger=merger, experts=0, active=total)


def test_report_combines_flops_and_parameters():
  model = build_model(dict(variant='Ti/4', depth=2, width=16, mlp_dim=32, num_heads=2,
                           merger=dict(num_tokens=4, before_block=1)), num_classes=10)
  result = flops.report(model, (28, 28, 1))
  assert result['params_merger'] == 2 * 16 + 16 * 4
  assert abs(result['gflops'] - flops.analytic_gflops(model, (28, 28, 1))) / result['gflops'] < 0.2


@pytest.mark.parametrize('kind', ['sparse', 'soft'])
@pytest.mark.parametrize('merger', [None, dict(num_tokens=16, before_block=2)])
def test_measured_flops_agree_with_analytic_count_with_experts(kind, merger):
  """An S/16-sized model with experts in blocks 1, 3 (after the merger when there is
  one): XLA's count of what runs, and ours of its matmuls."""
  model = build_model(dict(variant='S/16', depth=4, merger=merger, classifier='gap',
                           moe=dict(kind=kind, num_experts=8, layers='every2',
                                    group_images=2)), num_classes=1000)
  measured = flops.measured_gflops(model, (224, 224, 3))
  analytic = flops.analytic_gflops(model, (224, 224, 3))
  assert abs(measured - analytic) / analytic < 0.05, (measured, analytic)
  dense = flops.analytic_gflops(model.clone(moe=None), (224, 224, 3))
  # Sparse, top-2 at capacity factor 1.05: about twice the MLP work in MoE blocks; soft
  # with one slot per expert (8 slots for 196 or 16 tokens): less than dense.
  assert (analytic > dense) if kind == 'sparse' else (analytic < dense)


def test_expert_parameters_total_and_active_per_token():
  model = build_model(dict(variant='Ti/16', depth=2, merger=None, moe=dict(
      kind='sparse', num_experts=4, num_selected_experts=2, layers=(1,))), num_classes=10)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  counts = flops.count_params(variables['params'], num_selected_experts=2)
  mlp = 192 * 768 + 768 + 768 * 192 + 192  # One expert: Dense_0 and Dense_1.
  assert counts['experts'] == 4 * mlp
  assert counts['active'] == counts['total'] - 2 * mlp  # Two of the four experts.
  dense = build_model(dict(variant='Ti/16', depth=2, merger=None), num_classes=10)
  dense_total = flops.count_params(jax.eval_shape(
      dense.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params'])['total']
  assert counts['total'] == dense_total - mlp + 4 * mlp + 192 * 4  # Experts and router.
