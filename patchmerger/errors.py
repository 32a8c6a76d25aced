"""The exceptions that reach the entry points. Errors that mean the user's input cannot
work (a config value, a dataset, a checkpoint, a workdir) print their first line and
exit with code 2; a preempted run exits as the signal's; any other exception is a bug
of ours and keeps its traceback. No imports: the entry points load this before jax."""


class UserError(Exception):
  """Base of the errors a user can fix by changing what they gave us."""


class ConfigError(UserError, ValueError):
  """A config value (or flag) that cannot work; the message names the field."""


class DataError(UserError, ValueError):
  """A dataset that is missing, not prepared, or not what the config says."""


class CheckpointError(UserError, ValueError):
  """A checkpoint or weights file that cannot be used as asked."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """No checkpoint (or no checkpoint at the requested step) where one was expected."""


class WorkdirError(UserError, PermissionError):
  """A workdir that cannot hold the run's files."""


class DivergedError(UserError, FloatingPointError):
  """Training met a non-finite loss, gradient or parameter and stopped before saving it."""


class ClusterError(UserError, RuntimeError):
  """jax.distributed was asked for but no cluster could be found or joined."""


class Preempted(Exception):
  """Training stopped on a signal after saving a checkpoint at `step`."""

  def __init__(self, step: int, signal_name: str, checkpoint_dir: str):
    super().__init__(f'Stopped by {signal_name} at step {step}; checkpoint saved in '
                     f'{checkpoint_dir}. Run the same command to resume.')
    self.step, self.signal_name = step, signal_name


class UnknownKeyError(ConfigError, KeyError):
  """A config key (in an override or a sweep) that the config does not have."""

  def __str__(self) -> str:  # The message, not KeyError's quoted repr of it.
    return str(self.args[0]) if self.args else ''


class MissingDependencyError(UserError, ImportError):
  """An optional package (torch, transformers) that a requested feature needs."""
