"""Stopping on a signal or a preemption notice, after the loop has saved a checkpoint."""
import signal
from typing import Any, Sequence

import jax


class StopSignals:
  """Notes SIGTERM/SIGINT instead of dying, so the loop can checkpoint and stop.

  With several processes, jax's preemption service (through orbax's
  `reached_preemption`) picks one step at which all processes stop together.
  """

  def __init__(self, manager: Any, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self._manager, self._signals = manager, signals
    self._previous, self.received = {}, None

  def __enter__(self) -> 'StopSignals':
    if jax.process_count() == 1:
      for sig in self._signals:
        try:
          self._previous[sig] = signal.signal(sig, self._note)
        except ValueError:  # Not the main thread: leave signals alone.
          pass
    return self

  def _note(self, signum, frame):
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc_info) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def should_stop(self, step_index: int) -> bool:
    if jax.process_count() > 1 and self._manager.reached_preemption(step_index):
      self.received = self.received or 'preemption notice'
    return self.received is not None
