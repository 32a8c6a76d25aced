"""The run directory: checked before any work, created only once every check passed."""
import os

import jax
import tensorflow as tf

from patchmerger.errors import WorkdirError


def ensure_writable(workdir: str) -> None:
  """Fails at start, with one line, when `workdir` could not hold checkpoints; creates
  nothing (the workdir is made only once every check has passed)."""
  if '://' in workdir:  # Remote storage: permissions show only when writing.
    return
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f'Workdir {workdir} is not writable: {existing} is a file.')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise WorkdirError(f'Workdir {workdir} is not writable: no write permission on '
                       f'{existing}.')


def make_workdir(workdir: str) -> None:
  """Creates `workdir` and proves that it takes files (remote storage included)."""
  probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
  try:
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(probe, 'w') as f:
      f.write('ok')
    tf.io.gfile.remove(probe)
  except (OSError, tf.errors.OpError) as e:
    reason = getattr(e, 'message', None) or getattr(e, 'strerror', None) or str(e)
    raise WorkdirError(f'Workdir {workdir} is not writable: {reason}') from None
