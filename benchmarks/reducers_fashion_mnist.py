r"""Accuracy of the token reducers at equal steps on Fashion-MNIST, with 64 tokens.

  python -m benchmarks.reducers_fashion_mnist --workdir=workdirs/reducers
  python -m benchmarks.reducers_fashion_mnist --workdir=W --steps=50 --seeds=0 --tome_r=8

The model: 32px images, patch 4 without a convolution stem (8x8 = 64 tokens),
width 64, depth 4, MLP 128, 4 heads, GAP head; otherwise configs/fashion_mnist.py.
Every method trains --steps steps per seed through `loop.train_and_evaluate` (train.py's code):
plain (`reducer=none`), PatchMerger, TokenLearner and pool in the --merger slot,
and ToMe with --train_tome_r merges per block (without proportional attention, as
ToMe's authors train it); warm-up is a tenth of the steps.
Then every run is evaluated with `evaluate.evaluate_checkpoint` (eval.py's code) for
its test accuracy, and ToMe is applied without training to each trained plain
model at every --tome_r (as `eval.py --checkpoint=PLAIN_RUN --config.model.reducer.kind=tome
--config.model.reducer.r=R` does). Inference images/s time the compiled forward
pass alone on a device-resident batch of --infer_batch images (median of
--infer_repeats), so the input pipeline, which feeds this tiny model slower than
it computes, does not hide the reducers' differences; training images/s are the
loop's own (input included). Writes WORKDIR/results.csv, results.md and
results.png (test accuracy against inference images/s). Finished runs and
evaluations are kept and skipped when the command runs again.
"""
import csv
import os


from absl import app, flags, logging

from benchmarks import runs, throughput
from configs import fashion_mnist

_WORKDIR = flags.DEFINE_string('workdir', None, 'Root directory of the runs.', required=True)
_STEPS = flags.DEFINE_integer('steps', 600, 'Training steps of every method.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'Seeds; every method trains once per seed.')
_MERGER = flags.DEFINE_string('merger', '16@2', 'M@BLOCK of patchmerger, tokenlearner, pool.')
_TRAIN_TOME_R = flags.DEFINE_integer('train_tome_r', 12, 'ToMe merges per block when trained '
                                     '(12 from 64 tokens: about the FLOPs of 16@2).')
_TRAIN_TOME_PROPORTIONAL = flags.DEFINE_bool(
    'train_tome_proportional', False, 'Proportional attention in trained ToMe (its authors '
    'turn it off for training, on for ToMe applied to a model off the shelf).')
_TOME_R = flags.DEFINE_list('tome_r', ['4', '8', '12', '16'],
                            'r of ToMe applied without training to the plain models.')
_INFER_BATCH = flags.DEFINE_integer('infer_batch', 256, 'Images per timed forward call.')
_INFER_REPEATS = flags.DEFINE_integer('infer_repeats', 7, 'Timed forward repeats (median).')
METHODS = ('none', 'patchmerger', 'tokenlearner', 'pool', 'tome')
COLUMNS = ('method', 'trained', 'r', 'seed', 'test_accuracy', 'gflops_per_image',
           'train_images_per_sec', 'infer_images_per_sec')


def experiment_config(kind: str, seed: int, r: int = 0, trained: bool = True):
  config = fashion_mnist.get_config(
      f'variant=Ti/4,merger={_MERGER.value},reducer={kind},steps={_STEPS.value}')
  config.model.update(conv_stem=(), width=64, depth=4, mlp_dim=128, num_heads=4)
  config.model.reducer.r = r
  if kind == 'tome' and trained:
    config.model.reducer.proportional_attention = _TRAIN_TOME_PROPORTIONAL.value
  return runs.at_equal_steps(config, _STEPS.value, seed)


def inference_rate(config) -> float:
  """Median images/s of the jitted forward pass (eval mode) on a fixed batch."""
  from patchmerger.models import build_model
  model = build_model(config.model, config.num_classes)
  shape = (config.input.image_size,) * 2 + (config.input.channels,)
  forward, params, images, _ = throughput.compiled_forward(model, _INFER_BATCH.value, shape)
  return throughput._median_rate(lambda: forward(params, images), _INFER_BATCH.value,
                                 _INFER_REPEATS.value, 1)


def main(argv):
  del argv
  from patchmerger import evaluate as evaluate_lib, flops
  from patchmerger.data import local
  from patchmerger.models import build_model
  from patchmerger.training import loop
  root = _WORKDIR.value
  os.makedirs(root, exist_ok=True)
  builder = None
  rows = []

  def evaluate(config, workdir, source=None):
    result = evaluate_lib.evaluate_checkpoint(config, workdir, builder, source=source,
                                              skip=('fewshot', 'merge_pictures', 'throughput'))
    image_shape = (config.input.image_size,) * 2 + (config.input.channels,)
    return {'test/accuracy': result['test/accuracy'],
            'infer_images_per_sec': inference_rate(config),
            'gflops_per_image': flops.measured_gflops(build_model(config.model, 10), image_shape)}

  for seed in map(int, _SEEDS.value):
    for kind in METHODS:
      config = experiment_config(kind, seed, _TRAIN_TOME_R.value if kind == 'tome' else 0)
      builder = builder or local.ensure_prepared(config.dataset, config.data_dir)
      workdir = os.path.join(root, f'{kind}_seed{seed}')
      logging.info('Training %s', workdir)
      summary = runs.cached(os.path.join(workdir, 'train_result.json'), lambda: {
          k: v for k, v in loop.train_and_evaluate(config, workdir, builder).items()
          if isinstance(v, (int, float))})
      evaluation = runs.cached(os.path.join(workdir, 'eval_result.json'),
                           lambda: evaluate(config, workdir))
      rows.append(dict(method=kind, trained='yes', seed=seed,
                       r=_TRAIN_TOME_R.value if kind == 'tome' else '',
                       test_accuracy=evaluation['test/accuracy'],
                       gflops_per_image=evaluation['gflops_per_image'],
                       train_images_per_sec=summary.get('train/images_per_sec'),
                       infer_images_per_sec=evaluation['infer_images_per_sec']))
    for r in map(int, _TOME_R.value):
      config = experiment_config('tome', seed, r, trained=False)
      workdir = os.path.join(root, f'tome_untrained_r{r}_seed{seed}')
      os.makedirs(workdir, exist_ok=True)
      evaluation = runs.cached(os.path.join(workdir, 'eval_result.json'), lambda: evaluate(
          config, workdir, source=os.path.join(root, f'none_seed{seed}')))
      rows.append(dict(method='tome', trained='no (plain model)', r=r, seed=seed,
                       test_accuracy=evaluation['test/accuracy'],
                       gflops_per_image=evaluation['gflops_per_image'],
                       train_images_per_sec=None,
                       infer_images_per_sec=evaluation['infer_images_per_sec']))
  write(root, rows)


def write(root: str, rows: list[dict]) -> None:
  """results.csv (one row per run), results.md (mean over seeds), results.png."""
  with open(os.path.join(root, 'results.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  groups = {}
  for row in rows:
    groups.setdefault((row['method'], row['trained'], row['r']), []).append(row)
  mean = lambda values: (sum(values) / len(values)) if values and None not in values else None
  lines = ['| method | trained | r | test accuracy (per seed) | mean | GFLOPs/image | '
           'training images/s | inference images/s |', '|' + '---|' * 8]
  summary = []
  for (method, trained, r), group in groups.items():
    accuracy = mean([g['test_accuracy'] for g in group])
    train_rate = mean([g['train_images_per_sec'] for g in group])
    infer_rate = mean([g['infer_images_per_sec'] for g in group])
    accuracies = [100 * g['test_accuracy'] for g in group]
    summary.append((method, trained, r, accuracy, infer_rate, min(accuracies), max(accuracies)))
    per_seed = ', '.join(f'{100 * g["test_accuracy"]:.2f}%' for g in group)
    lines.append(f'| {method} | {trained} | {r} | {per_seed} | {100 * accuracy:.2f}% | '
                 f'{group[0]["gflops_per_image"]:.4f} | '
                 f'{"-" if train_rate is None else f"{train_rate:.0f}"} | {infer_rate:.0f} |')
  table = '\n'.join(lines)
  with open(os.path.join(root, 'results.md'), 'w') as f:
    f.write(table + '\n')
  print(table)

  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  fig, axis = plt.subplots(figsize=(7, 4.5))
  for method, trained, r, accuracy, infer_rate, low, high in summary:
    label = {'none': 'plain', 'tome': f'tome r={r}'}.get(method, method)
    label += '' if trained == 'yes' else ', untrained'
    # The vertical bar spans the seeds' accuracies: differences inside it are noise.
    spread = [[100 * accuracy - low], [high - 100 * accuracy]]
    axis.errorbar(infer_rate, 100 * accuracy, yerr=spread, capsize=3,
                  fmt='o' if trained == 'yes' else 'x')
    # Untrained ToMe sits at the plain model's accuracy: its labels go below the points.
    axis.annotate(label, (infer_rate, 100 * accuracy), fontsize=7, textcoords='offset points',
                  xytext=(3, 3) if trained == 'yes' else (3, -11))
  axis.set(xlabel='inference images / second', ylabel='test accuracy (%): mean, range over seeds',
           title='Token reducers on Fashion-MNIST (64 tokens), equal training steps')
  axis.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(root, 'results.png'), dpi=120)
  plt.close(fig)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  app.run(main)
