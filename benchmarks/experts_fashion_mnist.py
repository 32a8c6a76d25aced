r"""PatchMerger, sparse experts (V-MoE) and soft experts (Soft MoE), alone and
together, at equal steps on Fashion-MNIST; then the sparse models' capacity factor
swept at evaluation, with and without batch priority.

  python -m benchmarks.experts_fashion_mnist --workdir=workdirs/experts
  python -m benchmarks.experts_fashion_mnist --workdir=W --steps=50 --seeds=0

The model is the default's (configs/fashion_mnist.py: convolution stem, 16 tokens,
width 128, depth 4, GAP); every method trains --steps steps per seed through
`loop.train_and_evaluate` (train.py's code), warm-up a tenth of the steps:
- plain: `merger=none`;
- patchmerger: `merger=8@1` (the default);
- sparse: `experts=sparse:8x2@1+3` (V-MoE's defaults otherwise: capacity factor
  1.05, groups of 8 images, noise 1/E, importance and load losses 0.005);
- soft: `experts=soft:8@1+3` (one slot per expert, one image per group);
- patchmerger+sparse and patchmerger+soft: both.
Each run is evaluated with `evaluate.evaluate_checkpoint` (eval.py's code); GFLOPs
per image are XLA's count of the forward pass, parameters counted from the tree.
Then each sparse model is evaluated at every --capacity_factors, with and without
batch priority (`--config.model.moe.eval_capacity_factor=C
--config.model.moe.eval_batch_priority=B` in eval.py), recording the fraction of
assignments dropped. Writes WORKDIR/results.csv, capacity.csv, results.md and
results.png. Finished runs and evaluations are kept and skipped when run again.
"""
import csv
import os

from absl import app, flags, logging

from benchmarks import runs
from configs import fashion_mnist

_WORKDIR = flags.DEFINE_string('workdir', None, 'Root directory of the runs.', required=True)
_STEPS = flags.DEFINE_integer('steps', 1000, 'Training steps of every method.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'Seeds; every method trains once per seed.')
_CAPACITY_FACTORS = flags.DEFINE_list('capacity_factors', ['0.25', '0.5', '0.75', '1.0',
                                                           '1.05', '1.5', '2.0'],
                                      'Evaluation capacity factors of the sweep.')
METHODS = {  # name -> (merger, experts)
    'plain': ('none', 'none'),
    'patchmerger': (fashion_mnist.MERGER, 'none'),
    'sparse': ('none', 'sparse:8x2@1+3'),
    'soft': ('none', 'soft:8@1+3'),
    'patchmerger+sparse': (fashion_mnist.MERGER, 'sparse:8x2@1+3'),
    'patchmerger+soft': (fashion_mnist.MERGER, 'soft:8@1+3'),
}
COLUMNS = ('method', 'seed', 'test_accuracy', 'gflops_per_image', 'params_total',
           'params_experts', 'params_active', 'dropped_fraction')
SWEEP_COLUMNS = ('method', 'seed', 'eval_capacity_factor', 'eval_batch_priority',
                 'test_accuracy', 'dropped_fraction', 'gflops_per_image')


def experiment_config(method: str, seed: int):
  merger, experts = METHODS[method]
  config = fashion_mnist.get_config(f'merger={merger},experts={experts},steps={_STEPS.value}')
  return runs.at_equal_steps(config, _STEPS.value, seed)


def _dropped(result: dict) -> float:
  """Mean over MoE layers of the fraction of assignments dropped (0 without)."""
  values = [v for k, v in result.items() if k.endswith('/dropped_fraction')]
  return sum(values) / len(values) if values else 0.


def main(argv):
  del argv
  from patchmerger import evaluate as evaluate_lib, flops
  from patchmerger.data import local
  from patchmerger.models import build_model
  from patchmerger.training import loop
  root = _WORKDIR.value
  os.makedirs(root, exist_ok=True)
  builder, rows, sweep = None, [], []

  def evaluate(config, workdir):
    result = evaluate_lib.evaluate_checkpoint(config, workdir, builder,
                                              skip=('fewshot', 'merge_pictures', 'throughput'))
    image_shape = (config.input.image_size,) * 2 + (config.input.channels,)
    report = flops.report(build_model(config.model, config.num_classes), image_shape)
    return {'test/accuracy': result['test/accuracy'], 'dropped_fraction': _dropped(result),
            **report}

  for seed in map(int, _SEEDS.value):
    for method in METHODS:
      config = experiment_config(method, seed)
      builder = builder or local.ensure_prepared(config.dataset, config.data_dir)
      workdir = os.path.join(root, f'{method}_seed{seed}')
      logging.info('Training %s', workdir)
      runs.cached(os.path.join(workdir, 'train_result.json'), lambda: {
          k: v for k, v in loop.train_and_evaluate(config, workdir, builder).items()
          if isinstance(v, (int, float))})
      result = runs.cached(os.path.join(workdir, 'eval_result.json'),
                       lambda: evaluate(config, workdir))
      rows.append(dict(method=method, seed=seed, test_accuracy=result['test/accuracy'],
                       gflops_per_image=result['gflops'], params_total=result['params_total'],
                       params_experts=result['params_experts'],
                       params_active=result['params_active'],
                       dropped_fraction=result['dropped_fraction']))
      if 'sparse' not in method:
        continue
      for factor in map(float, _CAPACITY_FACTORS.value):
        for priority in (False, True):
          config.model.moe.eval_capacity_factor = factor
          config.model.moe.eval_batch_priority = priority
          path = os.path.join(workdir, f'eval_c{factor}_bpr{int(priority)}.json')
          result = runs.cached(path, lambda: evaluate(config, workdir))
          sweep.append(dict(method=method, seed=seed, eval_capacity_factor=factor,
                            eval_batch_priority=priority,
                            test_accuracy=result['test/accuracy'],
                            dropped_fraction=result['dropped_fraction'],
                            gflops_per_image=result['gflops']))
  write(root, rows, sweep)


def _mean(values):
  return sum(values) / len(values)


def write(root: str, rows: list[dict], sweep: list[dict]) -> None:
  """results.csv, capacity.csv (one row per run or evaluation), results.md (means over
  seeds) and results.png (accuracy against GFLOPs, parameters, dropped fraction)."""
  for name, columns, table in (('results.csv', COLUMNS, rows),
                               ('capacity.csv', SWEEP_COLUMNS, sweep)):
    with open(os.path.join(root, name), 'w', newline='') as f:
      writer = csv.DictWriter(f, columns)
      writer.writeheader()
      writer.writerows(table)
  methods = {}
  for row in rows:
    methods.setdefault(row['method'], []).append(row)
  lines = ['| method | test accuracy (per seed) | mean | GFLOPs/image | parameters | '
           'of which experts | active per token | dropped |', '|' + '---|' * 8]
  for method, group in methods.items():
    first = group[0]
    per_seed = ', '.join(f'{100 * g["test_accuracy"]:.2f}%' for g in group)
    lines.append(f'| {method} | {per_seed} | {100 * _mean([g["test_accuracy"] for g in group]):.2f}% '
                 f'| {first["gflops_per_image"]:.4f} | {first["params_total"]:,} | '
                 f'{first["params_experts"]:,} | {first["params_active"]:,} | '
                 f'{100 * _mean([g["dropped_fraction"] for g in group]):.1f}% |')
  points = {}
  for row in sweep:
    key = (row['method'], row['eval_capacity_factor'], row['eval_batch_priority'])
    points.setdefault(key, []).append(row)
  lines += ['', '| method | eval capacity factor | batch priority | test accuracy (mean) | '
            'dropped | GFLOPs/image |', '|' + '---|' * 6]
  for (method, factor, priority), group in points.items():
    lines.append(f'| {method} | {factor} | {"yes" if priority else "no"} | '
                 f'{100 * _mean([g["test_accuracy"] for g in group]):.2f}% | '
                 f'{100 * _mean([g["dropped_fraction"] for g in group]):.1f}% | '
                 f'{group[0]["gflops_per_image"]:.4f} |')
  table = '\n'.join(lines)
  with open(os.path.join(root, 'results.md'), 'w') as f:
    f.write(table + '\n')
  print(table)
  plot(os.path.join(root, 'results.png'), methods, points)


def plot(path: str, methods: dict, points: dict) -> None:
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  for method, group in methods.items():
    accuracies = [100 * g['test_accuracy'] for g in group]
    mean = _mean(accuracies)
    spread = [[mean - min(accuracies)], [max(accuracies) - mean]]  # Range over seeds.
    for axis, x in zip(axes[:2], (group[0]['gflops_per_image'], group[0]['params_total'])):
      axis.errorbar(x, mean, yerr=spread, capsize=3, fmt='o')
      axis.annotate(method, (x, mean), fontsize=7, textcoords='offset points', xytext=(4, 3))
  axes[0].set(xlabel='GFLOPs per image (XLA count, forward)',
              ylabel='test accuracy (%): mean, range over seeds', title='Accuracy against compute')
  axes[1].set(xlabel='parameters (all experts counted)', title='Accuracy against parameters')
  curves = {}
  for (method, factor, priority), group in points.items():
    curves.setdefault((method, priority), []).append(
        (100 * _mean([g['dropped_fraction'] for g in group]),
         100 * _mean([g['test_accuracy'] for g in group]), factor))
  for (method, priority), curve in curves.items():
    curve.sort()
    axes[2].plot([c[0] for c in curve], [c[1] for c in curve], 'o-' if priority else 's--',
                 label=f'{method}, batch priority {"on" if priority else "off"}')
    for dropped, accuracy, factor in curve:
      axes[2].annotate(f'{factor:g}', (dropped, accuracy), fontsize=6,
                       textcoords='offset points', xytext=(3, -8))
  axes[2].set(xlabel='assignments dropped at evaluation (%)', ylabel='test accuracy (%)',
              title='Sparse: evaluation capacity factor (labels)')
  axes[2].legend(fontsize=7)
  for axis in axes:
    axis.grid(alpha=0.3)
  fig.suptitle(f'Experts and PatchMerger on Fashion-MNIST, equal steps')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  app.run(main)
