"""Shared behaviour of the command-line entry points (train.py, eval.py, sweep.py,
export.py, prepare_data.py): one clear line per bad input. The library never imports
this module."""
import logging as std_logging
import os
import re
import sys
from typing import Callable, NoReturn, Union

from absl import flags

from patchmerger import config_renames, errors

# Errors that mean "the input is wrong", reported as one line: ours, and the operating
# system's about a path the user gave. Anything else is a bug of ours and keeps its
# traceback.
USER_ERRORS = (errors.UserError, FileNotFoundError, PermissionError)


# Multi-process runs (train.py, eval.py); each defaults to its JAX_* environment variable.
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 ($JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes ($JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process ($JAX_PROCESS_ID).')


def initialize_distributed(requested: Union[bool, str]) -> None:
  """jax.distributed from the cluster flags, the environment or config.distributed."""
  from patchmerger.training import sharding  # Imports jax: not before flags are parsed.
  sharding.maybe_initialize_distributed(requested, _COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)


def fail(message: str) -> NoReturn:
  sys.stderr.write(f'error: {message}\n')
  sys.exit(2)


def _innermost_message(text: str) -> str:
  """The last 'SomeError: message' line of a (possibly embedded) traceback."""
  text = text.encode().decode('unicode_escape', errors='ignore')
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  matches = [l for l in lines if re.match(r'^[\w.]*(Error|Exception): ', l)]
  line = matches[-1] if matches else lines[-1] if lines else text
  return re.sub(r"^[\w.]*(Error|Exception): ", '', line).strip('\'" ')


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose config-file and override errors are one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(_innermost_message(str(e)))
  except (KeyError, AttributeError, ValueError, TypeError) as e:  # Bad --config.* override.
    for arg in argv:  # A key that moved: name where it went.
      if arg.startswith('--config.'):
        moved = config_renames.renamed_key(arg[len('--config.'):].split('=', 1)[0])
        if moved:
          fail(moved)
    fail(f'bad config override: {_innermost_message(str(e))}')


# Exit codes of a run stopped by a signal after checkpointing, as a shell reports
# a process killed by that signal (so launchers see a preemption, not a failure).
SIGNAL_EXIT_CODES = {'SIGTERM': 143, 'SIGINT': 130}


def run_reporting_errors(fn: Callable[[], None], read_only: bool = False) -> None:
  """Runs `fn`; a user error ends the program with one line and exit code 2.

  `read_only` programs (eval.py) leave at once after that line: a checkpoint that failed
  to restore can leave tensorstore/orbax threads whose asyncio callbacks print pages of
  tracebacks during interpreter shutdown, and such a program has nothing to flush.
  """
  try:
    fn()
  except errors.Preempted as e:
    sys.stderr.write(f'{e}\n')
    sys.exit(SIGNAL_EXIT_CODES.get(e.signal_name, 143))
  except USER_ERRORS as e:
    message = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    if read_only:
      sys.stderr.write(f'error: {message.splitlines()[0] if message else type(e).__name__}\n')
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(2)
    fail(f'{message.splitlines()[0] if message else type(e).__name__}')


class QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of orbax and TFDS internals; keeps their warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    noisy = ('/orbax/', '/tensorflow_datasets/', 'signaling_client')
    return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in noisy)
