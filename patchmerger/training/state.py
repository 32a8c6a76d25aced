"""Optimizer, learning-rate schedule and train state from the config."""
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from patchmerger.errors import ConfigError


def learning_rate_schedule(lr: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warm-up to lr.base, then cosine, linear or constant decay."""
  warmup, base, end = int(lr['warmup_steps']), float(lr['base']), float(lr['end_value'])
  decay_steps = max(total_steps - warmup, 1)
  decays = {
      'cosine': lambda: optax.cosine_decay_schedule(base, decay_steps, end / base if base else 0.),
      'linear': lambda: optax.linear_schedule(base, end, decay_steps),
      'constant': lambda: optax.constant_schedule(base),
  }
  if lr['decay'] not in decays:
    raise ConfigError(f'lr.decay must be one of {sorted(decays)}, got {lr["decay"]!r}')
  return optax.join_schedules([optax.linear_schedule(0., base, warmup), decays[lr['decay']]()],
                              [warmup])


def decay_mask(params: Any) -> Any:
  """Weight decay on kernels only: not on biases, norms, embeddings or tokens."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: k[-1] == 'kernel' for k in flat})


# Dtypes of Adam's first moment; bfloat16 halves its memory (the second moment
# and the parameters stay float32).
MU_DTYPES = (None, 'float32', 'bfloat16')


def make_optimizer(config: Any) -> optax.GradientTransformation:
  optim = config.optim
  schedule = learning_rate_schedule(config.lr, config.total_steps)
  mu_dtype = optim.get('mu_dtype')  # None: the parameters' float32.
  if mu_dtype not in MU_DTYPES:
    raise ConfigError(f'optim.mu_dtype must be one of {MU_DTYPES}, got {mu_dtype!r}')
  if optim.name == 'adamw':
    update = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                         mask=decay_mask, mu_dtype=mu_dtype and jnp.dtype(mu_dtype))
  elif optim.name == 'sgd':
    update = optax.sgd(schedule, momentum=optim.b1)
  else:
    raise ConfigError(f"optim.name must be 'adamw' or 'sgd', got {optim.name!r}")
  if optim.clip_norm:
    update = optax.chain(optax.clip_by_global_norm(optim.clip_norm), update)
  if config.skip_nonfinite_updates:  # Skip (and count) up to N bad updates in a row.
    update = optax.apply_if_finite(update, config.skip_nonfinite_updates)
  return update


class TrainState(train_state.TrainState):
  """flax's TrainState: step, params, opt_state (apply_fn and tx are static)."""


def create_state(model: flax.linen.Module, config: Any, rng: jax.Array,
                 image_shape: tuple[int, ...]) -> TrainState:
  images = jax.numpy.zeros((1, *image_shape), jax.numpy.float32)
  params = model.init(rng, images)['params']
  return TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(config))
