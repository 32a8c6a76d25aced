"""Orbax checkpoints of a run: the manager, listing steps, save, restore and resume.

Training, `eval.py`, `init_from` and export all read and write checkpoints here.

Orbax writes each step into a temporary directory and renames it when complete,
so a run killed mid-save leaves no half checkpoint behind. A checkpoint that is
complete but unreadable (truncated or corrupted files) is moved aside to
`checkpoints_unreadable/` (never deleted) and the previous one is used.
"""
import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from patchmerger.errors import CheckpointError, CheckpointNotFoundError, UserError


class CheckpointMismatchError(CheckpointError):
  """The checkpoint holds a different model or optimizer than the config builds."""


class UnreadableCheckpointError(CheckpointError):
  """A checkpoint's files cannot be read (truncated or corrupted)."""


def make_manager(workdir: str, keep: Optional[int] = None, read_only: bool = False,
                 partial: bool = False) -> ocp.CheckpointManager:
  """The orbax manager of `workdir`'s checkpoints. `partial` managers read a subtree
  (the parameters without the optimizer) and are always read-only."""
  read_only = read_only or partial
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only)
  # The handler is named up front so that metadata can be read before a restore.
  handler = ocp.PyTreeCheckpointHandler() if partial else ocp.StandardCheckpointHandler()
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=handler)


def checkpoint_dir(workdir: str) -> str:
  if '://' in workdir:  # Object storage (gs://...): already absolute, not a local path.
    return workdir.rstrip('/') + '/checkpoints'
  return os.path.abspath(os.path.join(workdir, 'checkpoints'))


def steps(workdir: str) -> list[int]:
  """The finished checkpoint steps of a run directory, oldest first (read-only; orbax
  renames a step's temporary directory to its number only when the step is complete)."""
  directory = epath.Path(workdir) / 'checkpoints'
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves asynchronously; orbax finalises the step directory atomically."""
  manager.save(step, args=ocp.args.StandardSave(state))


def _describe(path: tuple) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def check_compatible(manager: ocp.CheckpointManager, step: int, target: Any) -> None:
  """Raises CheckpointMismatchError naming the first key whose presence or shape
  differs between checkpoint `step` and `target`."""
  metadata = manager.item_metadata(step)
  metadata = getattr(metadata, 'tree', metadata)
  if not metadata:
    raise OSError(f'checkpoint {step} has no readable metadata')
  saved = {_describe(p): tuple(m.shape)
           for p, m in jax.tree_util.tree_flatten_with_path(metadata)[0]}
  wanted = {_describe(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  where = os.path.join(str(manager.directory), str(step))
  # Parameters first: a model mismatch is the likely cause and the clearest name.
  for key in sorted(set(saved) | set(wanted), key=lambda k: (not k.startswith('params/'), k)):
    if key not in saved:
      problem = 'is missing from the checkpoint'
    elif key not in wanted:
      problem = 'is in the checkpoint but not in this model'
    elif saved[key] != wanted[key]:
      problem = f'has shape {saved[key]} in the checkpoint but {wanted[key]} in this model'
    else:
      continue
    raise CheckpointMismatchError(
        f'Checkpoint {where} does not fit this config: {key} {problem}. Use another '
        '--workdir, or the config that wrote the checkpoint.')


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Checkpoint `step` restored onto `target`'s shapes, dtypes and shardings."""
  check_compatible(manager, step, target)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _out_of_memory(error: Exception) -> bool:
  """Whether `error` is a lack of device or host memory: a fact about this machine,
  not about the checkpoint, which must then stay where it is."""
  text = str(error)
  return (isinstance(error, MemoryError) or 'RESOURCE_EXHAUSTED' in text
          or 'out of memory' in text.lower())


class OutOfMemoryOnRestore(UserError, RuntimeError):
  """Restoring a checkpoint ran out of memory; the checkpoint was left in place."""


def _refuse_out_of_memory(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
  """Raises OutOfMemoryOnRestore, naming the checkpoint, when `error` is a lack of memory."""
  if _out_of_memory(error):
    where = os.path.join(str(manager.directory), str(step))
    raise OutOfMemoryOnRestore(
        f'Restoring checkpoint {where} ran out of memory ({_first_line(error)}); it was left '
        'in place. Free memory or use more devices (mesh.fsdp); if the checkpoint itself is '
        'damaged, move it out of the checkpoints directory and rerun.') from error


def _first_line(error: Exception) -> str:
  return f'{type(error).__name__}: {(str(error).splitlines() or [""])[0][:200]}'


def restore_step(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Checkpoint `step` onto `target`; an unreadable one raises UnreadableCheckpointError
  naming the steps that do restore (tried one by one), and touches nothing."""
  try:
    return restore(manager, step, target)
  except CheckpointMismatchError:
    raise
  except Exception as e:  # Truncated or corrupted files.
    _refuse_out_of_memory(manager, step, e)
    readable = []
    for other in sorted(set(manager.all_steps()) - {step}):
      try:
        restore(manager, other, target)
        readable.append(other)
      except Exception:  # Unreadable too (or another model): not offered.
        pass
    where = os.path.join(str(manager.directory), str(step))
    offer = (f'readable steps: {", ".join(map(str, readable))} (choose one with --step=N)'
             if readable else 'no other step is readable')
    raise UnreadableCheckpointError(
        f'Checkpoint step {step} ({where}) is unreadable ({_first_line(e)}); {offer}.') from None


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves an unreadable checkpoint out of the manager's sight; keeps its files."""
  source = os.path.join(str(manager.directory), str(step))
  aside_dir = os.path.join(os.path.dirname(str(manager.directory)), 'checkpoints_unreadable')
  destination = os.path.join(aside_dir, str(step))
  if jax.process_index() == 0:
    epath.Path(aside_dir).mkdir(parents=True, exist_ok=True)
    suffix = 0
    while epath.Path(destination).exists():
      suffix += 1
      destination = os.path.join(aside_dir, f'{step}.{suffix}')
    epath.Path(source).rename(destination)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'checkpoint_set_aside_{step}')
  manager.reload()
  return destination


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> Optional[Any]:
  """The newest readable checkpoint restored onto `target`, or None when there is
  none. A checkpoint of another model raises CheckpointMismatchError."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = restore(manager, step, target)
    except CheckpointMismatchError:
      raise
    except Exception as e:  # Truncated or corrupted files: fall back, keep the evidence.
      _refuse_out_of_memory(manager, step, e)  # Not the checkpoint's fault: stop.
      moved_to = _set_aside(manager, step)
      logging.warning('Checkpoint at step %d is unreadable (%s: %s); moved it to %s and '
                      'trying the previous one.', step, type(e).__name__,
                      str(e).splitlines()[0][:200] if str(e) else '', moved_to)
      continue
    logging.info('Resuming from checkpoint at step %d', step)
    return restored
  return None


def restore_for_eval(run_dir: str, step: Optional[int], target: Any) -> Any:
  """Checkpoint `step` (default: the latest) of `run_dir` onto `target`, read-only."""
  manager = make_manager(run_dir, read_only=True)
  try:  # Closed on every path: its background threads must not outlive an error.
    available = manager.all_steps()
    step = max(available, default=None) if step is None else step
    if step is None:
      raise CheckpointNotFoundError(f'No checkpoint in {checkpoint_dir(run_dir)}')
    if step not in available:
      raise CheckpointNotFoundError(f'No checkpoint at step {step} in '
                                    f'{checkpoint_dir(run_dir)}; steps: {sorted(available)}.')
    return restore_step(manager, step, target)
  finally:
    manager.close()


def read_params(workdir: str, step: Optional[int] = None) -> Any:
  """The parameters of checkpoint `step` (default: the latest) of one of our runs, on
  one host device, whatever devices wrote them; the optimizer state stays on disk."""
  available = steps(workdir)
  if not available:
    raise CheckpointNotFoundError(f'{workdir} is not a run directory with checkpoints '
                                  f'({checkpoint_dir(workdir)} holds no finished step).')
  step = available[-1] if step is None else step
  if step not in available:
    raise CheckpointNotFoundError(f'No checkpoint at step {step} in {checkpoint_dir(workdir)}; '
                                  f'steps: {available}.')
  manager = make_manager(workdir, partial=True)
  try:
    # Without a target, orbax would rebuild the writer's shardings, and fail on any
    # other device count.
    metadata = manager.item_metadata(step)
    metadata = getattr(metadata, 'tree', metadata)
    try:
      host = jax.local_devices(backend='cpu')[0]
    except RuntimeError:  # No CPU backend (JAX_PLATFORMS=cuda): the first device.
      host = jax.local_devices()[0]
    on_host = jax.sharding.SingleDeviceSharding(host)
    target = {'params': jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=on_host), metadata['params'])}
    restored = manager.restore(step, args=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  finally:
    manager.close()
  return restored['params']
