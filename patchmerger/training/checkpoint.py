"""Orbax checkpoints of the train state: save every N steps, keep K, resume."""
import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves asynchronously; orbax finalises the step directory atomically."""
  manager.save(step, args=ocp.args.StandardSave(state))


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Checkpoint `step` restored onto `target`'s shapes, dtypes and shardings."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> Optional[Any]:
  """The latest checkpoint restored onto `target`, or None when there is none."""
  step = manager.latest_step()
  if step is None:
    return None
  logging.info('Resuming from checkpoint at step %d', step)
  return restore(manager, step, target)
