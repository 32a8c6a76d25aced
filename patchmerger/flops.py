"""FLOPs and parameter counts: measured (XLA cost analysis) and analytic."""
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from patchmerger.models import routing, soft_moe
from patchmerger.models.vit import VisionTransformer


def count_params(params: Any, num_selected_experts: int = 1) -> dict:
  """Total parameters, the learned reducers' (PatchMerger, TokenLearner) share, the
  experts' (`Moe/Mlp`, all E of every MoE layer) and those active per token: all but
  the experts, plus `num_selected_experts` of each layer's E experts (sparse: k; soft:
  each slot goes through one expert)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  size = lambda v: int(np.prod(v.shape))
  total = sum(size(v) for v in flat.values())
  merger = sum(size(v) for k, v in flat.items() if '/patchmerger_' in k or '/tokenlearner_' in k)
  experts = sum(size(v) for k, v in flat.items() if '/Moe/Mlp/' in k)
  active = total - experts + sum(size(v) // v.shape[0] * num_selected_experts
                                 for k, v in flat.items() if '/Moe/Mlp/' in k)
  return dict(total=total, merger=merger, experts=experts, active=active)


def cost_flops(stage: Any) -> float:
  """FLOPs of one call of a lowered or compiled computation by XLA's cost analysis
  (per device for a partitioned executable); NaN where the backend has none."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax returns one dict per device.
    cost = cost[0]
  return float((cost or {}).get('flops', float('nan')))


def lowered_flops(fn: Callable[..., Any], *args: Any) -> float:
  """FLOPs of one call of `jax.jit(fn)(*args)` (arrays or jax.ShapeDtypeStruct),
  counted before XLA's optimisations on a lowering for the host CPU.

  GPU and TPU backends, served through PJRT's C API, have no cost analysis
  before compilation, and compiling an unrolled deep model just to count it
  would take minutes; the computation is the same on any platform. Without a
  CPU backend (JAX_PLATFORMS=cuda) it is compiled on the accelerator instead.
  """
  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
  try:
    host = jax.local_devices(backend='cpu')[0]
  except RuntimeError:
    return cost_flops(jax.jit(fn).lower(*specs).compile())
  with jax.default_device(host):
    return cost_flops(jax.jit(fn).lower(*specs))


def counted_model(model: VisionTransformer) -> VisionTransformer:
  """`model` as XLA's cost analysis can count it: blocks unrolled (a while loop's
  body is counted once), no rematerialisation (recomputation is not model FLOPs)
  and XLA attention (a fused kernel is a custom call that counts nothing)."""
  plain = {'scan': False, 'remat_policy': 'none', 'attention': 'xla'}
  return model.clone(**{k: v for k, v in plain.items() if hasattr(model, k)})


def forward_flops(model: VisionTransformer, image_shape: tuple[int, ...],
                  batch_size: int = 1) -> float:
  """FLOPs of the jitted forward pass on `batch_size` images, from XLA's cost
  analysis of `counted_model(model)` (the same computation, whatever scan or
  remat say), lowered but not compiled: no compilation of an unrolled deep model
  at start (the count before XLA's optimisations is within 0.1% of the compiled one)."""
  model = counted_model(model)
  images = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  return lowered_flops(model.apply, variables, images)


def measured_gflops(model: VisionTransformer, image_shape: tuple[int, int, int],
                    batch_size: int = 1) -> float:
  """GFLOPs per image of the forward pass (`forward_flops`). With experts, on at least
  one routing group of images: expert buffers are sized per group."""
  if getattr(model, 'moe', None) is not None:
    batch_size = max(batch_size, model.moe.group_images)
  return forward_flops(model, image_shape, batch_size) / batch_size / 1e9


def analytic_gflops(model: VisionTransformer, image_shape: tuple[int, int, int]) -> float:
  """GFLOPs per image counting the matmuls only (2 FLOPs per multiply-add).

  Blocks before a merger see N tokens, blocks after it see its M (plus the class
  token, which is carried past mergers). Elementwise work (norms, softmax,
  GELU) is left out: it is a few percent at ViT widths. An MoE block counts
  `moe_macs` in place of its MLP.
  """
  height, width, channels = image_shape
  d, p = model.width, model.patch_size
  cls = 1 if model.classifier == 'token' else 0
  tokens = (height // p) * (width // p)
  if model.conv_stem:
    raise ValueError('analytic_gflops covers the plain patchify stem only')
  if model.reducer not in ('patchmerger', 'pool', 'none'):
    raise ValueError(f'analytic_gflops does not count {model.reducer}; use measured_gflops')
  macs = tokens * p * p * channels * d  # Patch embedding.
  mergers = dict(model.mergers)
  for block in range(model.depth):
    if block in mergers:
      m = mergers[block]
      # Scores plus weighted sums (pooling: the weighted sums only).
      macs += (1 if model.reducer == 'pool' else 2) * tokens * m * d
      tokens = m
    n = tokens + cls
    macs += 4 * n * d * d + 2 * n * n * d
    if model.moe is not None and block in model.moe.layers:
      macs += moe_macs(model.moe, n, d, model.mlp_dim)
    else:
      macs += 2 * n * d * model.mlp_dim
  if model.classifier == 'map':
    n = tokens + cls
    macs += 2 * d * d + 2 * n * d * d + 2 * n * d + 2 * d * model.mlp_dim
  if model.representation_size is not None:
    macs += d * model.representation_size
    d = model.representation_size
  macs += d * model.num_classes
  return 2 * macs / 1e9


def moe_macs(spec: Any, tokens: int, width: int, mlp_dim: int) -> float:
  """Multiply-adds per image of one MoE layer at evaluation, as it computes them: a
  group of `group_images` images (S tokens) fills E buffers of C positions (sparse:
  the capacity; soft: the slots) through one-hot (sparse) or softmax (soft) weights,
  every position goes through its expert's MLP, and outputs come back the same way."""
  group_tokens = tokens * spec.group_images
  experts = spec.num_experts
  if spec.kind == 'sparse':
    positions = routing.capacity(group_tokens, experts, spec.num_selected_experts,
                                 spec.eval_capacity_factor)
  else:
    positions = soft_moe.num_slots(spec, tokens)
  router = group_tokens * width * experts * (1 if spec.kind == 'sparse' else positions)
  moves = 2 * group_tokens * experts * positions * width  # Dispatch and combine.
  mlps = experts * positions * 2 * width * mlp_dim
  return (router + moves + mlps) / spec.group_images


def report(model: VisionTransformer, image_shape: tuple[int, int, int]) -> Mapping[str, float]:
  """GFLOPs per image and parameter counts of one model."""
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  selected = model.moe.num_selected_experts if getattr(model, 'moe', None) else 1
  return dict(gflops=measured_gflops(model, image_shape), **{
      f'params_{k}': v for k, v in count_params(variables['params'], selected).items()})
