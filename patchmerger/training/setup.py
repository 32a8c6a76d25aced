"""From a config to a model, a mesh and the initial train state in its shardings."""
import functools
from typing import Any, Callable, NamedTuple

import jax

from patchmerger.models import build_model
from patchmerger.training import sharding, state as state_lib


class Setup(NamedTuple):
  model: Any
  mesh: Any
  image_shape: tuple[int, ...]
  state: Any  # The initial train state, or its abstract shapes and shardings.
  state_sharding: Any
  make_state: Callable[[], Any]  # Makes the initial state (in its shardings).


def setup(config: Any, initialise: bool = True) -> Setup:
  """Model, mesh, image shape, the initial train state, its shardings and a function
  that makes the initial state. With `initialise=False` the state is abstract
  (shapes, dtypes and shardings only): a checkpoint restores onto it without a
  fresh state beside it in device memory."""
  mesh = sharding.make_mesh(config.mesh)
  image_shape = (config.input.image_size, config.input.image_size, config.input.channels)
  model = build_model(config.model, config.num_classes)
  init_rng = jax.random.split(jax.random.key(config.seed))[0]
  create = functools.partial(state_lib.create_state, model, config, image_shape=image_shape)
  abstract = jax.eval_shape(create, init_rng)
  state_sharding = sharding.fsdp_sharding(abstract, mesh,
                                          config.mesh.get('fsdp_min_size', 2 ** 12))

  def make_state():  # The same `create`: jit reuses the trace the shardings came from.
    return jax.jit(create, out_shardings=state_sharding)(init_rng)

  if initialise:
    state = make_state()
  else:
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         abstract, state_sharding)
  return Setup(model, mesh, image_shape, state, state_sharding, make_state)
