"""What the benchmarks that train several models at equal steps share: the run settings,
and results kept on disk so that a command run again skips finished work."""
import json
import os
from typing import Any, Callable


def at_equal_steps(config: Any, steps: int, seed: int) -> Any:
  """`config` set to train `steps` steps from `seed`, evaluated and checkpointed once at the
  end (one checkpoint kept), with a tenth of the steps as warm-up (the configs' default
  warm-up would fill a short run)."""
  config.total_steps = steps
  config.seed = seed
  config.lr.warmup_steps = steps // 10
  config.evals.test.every = steps
  config.checkpoint_every = steps
  config.keep_checkpoints = 1
  return config


def cached(path: str, compute: Callable[[], dict]) -> dict:
  """The JSON at `path`, or `compute()`, written there first."""
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  result = compute()
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  return result
