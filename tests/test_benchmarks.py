"""benchmarks/throughput.py end to end on a tiny variant (structure, not timings)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  result = subprocess.run([sys.executable, 'benchmarks/throughput.py', *args], cwd=ROOT,
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
      [sys.executable, 'benchmarks/input_pipeline.py', '--images=20', '--seconds=0.5',
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
