r"""ViT speed of this checkout against an earlier commit, alternated on one machine.

  python -m benchmarks.against_commit --commit=0eff4c7            # B/16, batch 8, 3 rounds
  python -m benchmarks.against_commit --commit=HEAD~5 --variant=S/16 --rounds=5

Checks the commit out into a temporary git worktree, then times the same model
(a plain GAP ViT of --variant at --image_size, float32, the model defaults of each
checkout) in a fresh process per checkout and round, alternating the two so that
drift of the machine's speed falls on both: inference images/s of the jitted
forward pass and of one AdamW training step, medians of --repeats calls. Prints
each round and the ratio of medians (this checkout / the commit). Both checkouts
must have `configs.common.model_config`, `patchmerger.models.build_model`,
`patchmerger.training.state.make_optimizer` and `step.train_step` (true from
commit 0eff4c7 on). Nothing else should run on the machine meanwhile.
"""
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

_COMMIT = flags.DEFINE_string('commit', '0eff4c7', 'The commit to compare against.')
_VARIANT = flags.DEFINE_string('variant', 'B/16', 'NAME/PATCH of the plain ViT.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Images per call.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Image size.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternations (one process per checkout each).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per measurement (median).')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run with cwd = a checkout; prints "infer=<img/s> train=<img/s>".
_TIMER = r'''
import functools, statistics, sys, time  # python -c: the checkout (cwd) comes first
import jax, jax.numpy as jnp, numpy as np
from configs import common, fashion_mnist
from patchmerger.models import build_model
from patchmerger.training import state as state_lib, step
variant, batch, repeats, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = build_model(common.model_config(variant, 'none', classifier='gap'), 1000)
images = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3), np.float32))
data = {'image': images, 'label': jnp.zeros((batch,), jnp.int32)}
params = jax.jit(model.init)(jax.random.key(0), images[:1])['params']

def rate(fn):
  jax.block_until_ready(fn())  # Compile and warm up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return batch / statistics.median(times)

forward = jax.jit(lambda p, x: model.apply({'params': p}, x))
infer = rate(lambda: forward(params, images))
train_state = state_lib.TrainState.create(apply_fn=model.apply, params=params,
                                          tx=state_lib.make_optimizer(fashion_mnist.get_config()))
train_step = jax.jit(functools.partial(step.train_step, loss='softmax_xent',
                                       label_smoothing=0., accum_steps=1))
train = rate(lambda: train_step(train_state, data, jax.random.key(1)))
print(f'infer={infer:.4f} train={train:.4f}')
'''


def time_checkout(root: str) -> dict:
  result = subprocess.run(
      [sys.executable, '-c', _TIMER, _VARIANT.value, str(_BATCH.value), str(_REPEATS.value),
       str(_IMAGE_SIZE.value)],
      cwd=root, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root))
  line = [l for l in result.stdout.splitlines() if l.startswith('infer=')]
  if result.returncode or not line:
    raise RuntimeError(f'timing in {root} failed:\n{result.stderr[-2000:]}')
  return {k: float(v) for k, v in (part.split('=') for part in line[-1].split())}


def main(argv):
  del argv
  worktree = tempfile.mkdtemp(prefix='against_commit_')
  subprocess.run(['git', 'worktree', 'add', '--detach', worktree, _COMMIT.value], cwd=ROOT,
                 check=True, capture_output=True)
  try:
    rows = {'this checkout': [], _COMMIT.value: []}
    for round_index in range(_ROUNDS.value):
      for name, root in ((_COMMIT.value, worktree), ('this checkout', ROOT)):
        rows[name].append(time_checkout(root))
        print(f'round {round_index + 1}, {name}: inference {rows[name][-1]["infer"]:.2f}, '
              f'training {rows[name][-1]["train"]:.2f} images/s', flush=True)
    for kind in ('infer', 'train'):
      ours = statistics.median(r[kind] for r in rows['this checkout'])
      theirs = statistics.median(r[kind] for r in rows[_COMMIT.value])
      print(f'{_VARIANT.value} batch {_BATCH.value} {kind}: this checkout {ours:.2f}, '
            f'{_COMMIT.value} {theirs:.2f} images/s (medians); ratio {ours / theirs:.3f}')
  finally:
    subprocess.run(['git', 'worktree', 'remove', '--force', worktree], cwd=ROOT,
                   capture_output=True)


if __name__ == '__main__':
  app.run(main)
