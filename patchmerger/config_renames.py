"""Config keys that moved. A config or `--config.KEY` override that still sets one stops
with one line naming the new key. No imports: flag parsing reads it before jax loads."""
from typing import Optional

RENAMED = {
    'eval_every': 'evals.test.every',
    'fewshot': 'evals.fewshot',
}


def renamed_key(key: str) -> Optional[str]:
  """The one-line error for dotted `key` if it (or a section above it) moved."""
  for old, new in RENAMED.items():
    if key == old or key.startswith(old + '.'):
      moved = new + key[len(old):]
      return f'config.{key} is now config.{moved} (e.g. --config.{moved}=...).'
  return None
