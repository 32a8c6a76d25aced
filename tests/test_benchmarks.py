"""benchmarks/throughput.py end to end on a tiny variant (structure, not timings)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  result = subprocess.run([sys.executable, '-m', 'benchmarks.throughput', *args], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow
def test_throughput_benchmark_runs_and_computes_ratios_from_its_measurements(tmp_path):
  out_json, out_png, out_md = tmp_path / 'rows.json', tmp_path / 'plot.png', tmp_path / 'rows.md'
  stdout = _run('--variants=Ti/8', '--image_size=16', '--mergers=none,2@1/4',
                '--batch_sizes=2,4', '--merger_batches=best', '--dtype=bfloat16', '--repeats=2',
                '--calls=1', f'--json={out_json}', f'--plot={out_png}', f'--markdown={out_md}')
  rows = json.loads(out_json.read_text())
  assert [(r['merger'], r['batch_size']) for r in rows][:2] == [('none', 2), ('none', 4)]
  plain_best = max(rows[:2], key=lambda r: r['train_img_s'])
  # The merger model is timed only at the plain model's best batch.
  assert [(r['merger'], r['batch_size']) for r in rows[2:]] == [
      ('2@1/4', plain_best['batch_size'])]
  assert rows[2]['mergers'] == [[3, 2]]  # Ti has 12 blocks.
  for row in rows:
    for key in ('variant', 'merger', 'gflops', 'params', 'infer_img_s', 'train_img_s',
                'speedup_infer', 'flops_ratio', 'compile_s', 'train_gflops', 'train_mfu',
                'infer_mfu'):
      assert key in row, key
    assert row['dtype'] == 'bfloat16'
    assert row['infer_img_s'] > 0 and row['train_img_s'] > 0
    assert row['train_mfu'] > 0 and row['train_gflops'] > 2 * row['gflops']
    base = rows[[2, 4].index(row['batch_size'])]
    assert row['speedup_infer'] == row['infer_img_s'] / base['infer_img_s']
    assert row['flops_ratio'] == base['gflops'] / row['gflops']
  assert rows[0]['flops_ratio'] == 1.0 and rows[2]['flops_ratio'] > 1.0
  assert f'| Ti/8 | 2@1/4 | auto | False | none | {plain_best["batch_size"]} | bfloat16 |' in stdout
  assert 'At the best batch size of each model' in out_md.read_text()
  # Saved rows give the same tables again.
  assert out_md.read_text().strip() in _run(f'--report={out_json}')
  assert out_png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  try:
    import torch, transformers  # noqa: F401  The reference is timed when it is installed.
  except ImportError:
    return
  assert rows[0]['hf_infer_img_s'] > 0 and rows[0]['hf_train_img_s'] > 0
  assert rows[0]['ours_vs_hf'] == rows[0]['ours_token_infer_img_s'] / rows[0]['hf_infer_img_s']
  assert rows[0]['ours_vs_hf_train'] == rows[0]['train_img_s'] / rows[0]['hf_train_img_s']
  assert rows[0]['xla_matmul_tflops'] > 0 and rows[0]['torch_matmul_tflops'] > 0


def test_gpu_check_script_parses():
  """bash -n: the prepared GPU script has no syntax error (its CPU dry path,
  GPU_CHECK_TINY=1, takes minutes and is run by hand)."""
  result = subprocess.run(['bash', '-n', 'benchmarks/gpu_check.sh'], cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_input_pipeline_benchmark_prepares_and_reads_imagenet_sized_jpegs(tmp_path):
  out_json = tmp_path / 'input.json'
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.input_pipeline', '--images=20', '--seconds=0.5',
       '--batch_size=4', '--image_size=32', '--threads=1,2', f'--json={out_json}'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(out_json.read_text())
  assert results['images'] == 20 and 90 < results['mean_jpeg_kb'] < 130
  (prepared,) = results['prepare']
  assert prepared['workers'] == 1 and prepared['images_per_sec'] > 0
  assert prepared['dataset_bytes'] > 20 * 90_000  # The JPEGs are stored as they are.
  assert [row['threads'] for row in results['pipeline']] == [1, 2]
  assert all(row['images'] > 0 and row['images_per_sec'] > 0 for row in results['pipeline'])
  assert 'training pipeline, 2 thread(s):' in result.stdout
  assert set(results['decode_one_thread']) == {'whole', 'crop_window'}
  assert all(rate > 0 for rate in results['decode_one_thread'].values())


@pytest.fixture
def default_flags():
  """The benchmark's absl flags at their defaults, as its command line would leave them."""
  from absl import flags
  from benchmarks import reducers  # noqa: F401 (defines the flags)
  flags.FLAGS(['benchmark'])
  yield
  flags.FLAGS.unparse_flags()


@pytest.mark.slow  # About 10 compilations (30 s to 100 s on a shared 2-core CPU).
def test_reducer_benchmark_finds_the_tome_r_nearest_a_flops_target(default_flags):
  from benchmarks import reducers
  from patchmerger import flops
  from patchmerger.models import build_model

  def gflops(r):
    model_cfg, shape, classes = reducers.throughput.model_config('fmnist', 'none',
                                                                 {'kind': 'tome', 'r': r})
    return flops.measured_gflops(build_model(model_cfg, classes), shape)
  plain = gflops(0)
  r, found = reducers.search_tome_r('fmnist', 0.8 * plain)
  assert found == gflops(r) and 0 < r <= 8  # The default model has 16 tokens.
  neighbours = [gflops(n) for n in (r - 1, r + 1) if 0 <= n <= 8]
  assert all(abs(found - 0.8 * plain) <= abs(g - 0.8 * plain) for g in neighbours)
  assert reducers.time_tome_merges('fmnist', r, batch=2, repeats=1, calls=1) > 0
  rows = reducers.add_ratios([
      dict(batch_size=2, reducer='none', gflops=2., infer_img_s=10., train_img_s=4.),
      dict(batch_size=2, reducer='tome', gflops=1., infer_img_s=15., train_img_s=6.,
           merge_ms=20.)])
  assert rows[1]['flops_ratio'] == 2 and rows[1]['speedup_infer'] == 1.5
  assert rows[1]['speedup_per_flops'] == 0.75 and rows[1]['speedup_train'] == 1.5
  assert rows[1]['merge_share'] == pytest.approx(20 / (1000 * 2 / 15.))


@pytest.mark.slow
def test_reducer_benchmark_runs_every_reducer(tmp_path):
  out_json, out_md = tmp_path / 'rows.json', tmp_path / 'rows.md'
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.reducers', '--variant=Ti/8', '--image_size=32',
       '--batch_sizes=2', '--merger=4@1/2', '--repeats=1', '--calls=1', '--notrain',
       '--tome_r=2',  # The search for r has its own test (finds_the_tome_r_nearest...).
       f'--json={out_json}', f'--markdown={out_md}'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out_json.read_text())
  assert [r['reducer'] for r in rows] == ['none', 'patchmerger', 'tokenlearner', 'pool', 'tome']
  for row in rows[1:]:
    assert row['flops_ratio'] == rows[0]['gflops'] / row['gflops'] > 1
    assert row['speedup_per_flops'] == row['speedup_infer'] / row['flops_ratio']
  assert rows[4]['tome_r'] > 0 and rows[4]['merge_ms'] > 0
  # Inference rates come from the round-robin timing of all five models.
  assert all(row['timing'] == 'interleaved' and row['infer_img_s'] > 0 for row in rows)
  assert result.stdout.count('(interleaved)') == 5
  assert '| Ti/8 | 2 | tome |' in out_md.read_text()


def test_against_commit_times_both_checkouts_and_removes_its_worktree():
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.against_commit', '--commit=HEAD', '--variant=Ti/16',
       '--image_size=32', '--batch_size=2', '--rounds=1', '--repeats=1'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'round 1, HEAD: inference' in result.stdout
  assert 'round 1, this checkout: inference' in result.stdout
  assert 'Ti/16 batch 2 train: this checkout' in result.stdout
  worktrees = subprocess.run(['git', 'worktree', 'list'], cwd=ROOT, capture_output=True,
                             text=True).stdout
  assert 'against_commit_' not in worktrees


def test_reducer_accuracy_tables_average_the_seeds_and_plot_their_range(tmp_path):
  # In a subprocess: the script's flags share names with benchmarks/reducers.py's.
  script = f'''
from benchmarks import reducers_fashion_mnist as experiment
rows = [dict(method='none', trained='yes', r='', seed=0, test_accuracy=0.80,
             gflops_per_image=0.02, train_images_per_sec=400., infer_images_per_sec=1800.),
        dict(method='none', trained='yes', r='', seed=1, test_accuracy=0.82,
             gflops_per_image=0.02, train_images_per_sec=420., infer_images_per_sec=1900.),
        dict(method='tome', trained='no (plain model)', r=8, seed=0, test_accuracy=0.79,
             gflops_per_image=0.015, train_images_per_sec=None, infer_images_per_sec=2500.)]
experiment.write({str(tmp_path)!r}, rows)
'''
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  table = (tmp_path / 'results.md').read_text()
  assert '| none | yes |  | 80.00%, 82.00% | 81.00% | 0.0200 | 410 | 1850 |' in table
  assert '| tome | no (plain model) | 8 | 79.00% | 79.00% | 0.0150 | - | 2500 |' in table
  assert len((tmp_path / 'results.csv').read_text().splitlines()) == 4
  assert (tmp_path / 'results.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_experts_experiment_configs_and_tables(tmp_path):
  script = f'''
from absl import flags
from benchmarks import experts_fashion_mnist as experiment
from patchmerger.models import build_model
flags.FLAGS(['experiment', '--workdir={tmp_path}', '--steps=50'])
for method in experiment.METHODS:
  config = experiment.experiment_config(method, seed=1)
  model = build_model(config.model, config.num_classes)
  print(method, config.seed, config.total_steps, config.lr.warmup_steps,
        config.evals.test.every, model.mergers, model.moe and (model.moe.kind, model.moe.layers))
row = lambda method, seed, accuracy, dropped: dict(
    method=method, seed=seed, test_accuracy=accuracy, gflops_per_image=0.03, params_total=1000,
    params_experts=600, params_active=700, dropped_fraction=dropped)
sweep = [dict(method='sparse', seed=s, eval_capacity_factor=1.0, eval_batch_priority=True,
              test_accuracy=a, dropped_fraction=0.1, gflops_per_image=0.03)
         for s, a in ((0, 0.8), (1, 0.9))]
experiment.write({str(tmp_path)!r}, [row('sparse', 0, 0.80, 0.1), row('sparse', 1, 0.90, 0.3)],
                 sweep)
'''
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert "plain 1 50 5 50 () None" in lines
  assert "patchmerger+sparse 1 50 5 50 ((1, 8),) ('sparse', (1, 3))" in lines
  assert "soft 1 50 5 50 () ('soft', (1, 3))" in lines
  table = (tmp_path / 'results.md').read_text()
  assert '| sparse | 80.00%, 90.00% | 85.00% | 0.0300 | 1,000 | 600 | 700 | 20.0% |' in table
  assert '| sparse | 1.0 | yes | 85.00% | 10.0% | 0.0300 |' in table
  assert len((tmp_path / 'capacity.csv').read_text().splitlines()) == 3
  assert (tmp_path / 'results.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
