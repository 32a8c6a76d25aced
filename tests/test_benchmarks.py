"""benchmarks/throughput.py end to end on a tiny variant (structure, not timings)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_throughput_benchmark_runs_and_computes_ratios_from_its_measurements(tmp_path):
  out_json, out_png = tmp_path / 'rows.json', tmp_path / 'plot.png'
  result = subprocess.run(
      [sys.executable, 'benchmarks/throughput.py', '--variants=Ti/8', '--image_size=16',
       '--mergers=none,2@1/4', '--batch_size=2', '--repeats=2', '--calls=1',
       f'--json={out_json}', f'--plot={out_png}'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out_json.read_text())
  assert [r['merger'] for r in rows] == ['none', '2@1/4']
  assert [r['mergers'] for r in rows] == [[], [[3, 2]]]  # Ti has 12 blocks.
  for row in rows:
    for key in ('variant', 'merger', 'gflops', 'params', 'infer_img_s', 'train_img_s',
                'speedup_infer', 'flops_ratio', 'compile_s'):
      assert key in row, key
    assert row['infer_img_s'] > 0 and row['train_img_s'] > 0
    assert row['speedup_infer'] == row['infer_img_s'] / rows[0]['infer_img_s']
    assert row['flops_ratio'] == rows[0]['gflops'] / row['gflops']
  assert rows[0]['flops_ratio'] == 1.0 and rows[1]['flops_ratio'] > 1.0
  assert '| Ti/8 | 2@1/4 |' in result.stdout
  try:
    import torch, transformers  # noqa: F401  The reference is timed when it is installed.
  except ImportError:
    return
  assert rows[0]['hf_infer_img_s'] > 0
  assert rows[0]['ours_vs_hf'] == rows[0]['ours_token_infer_img_s'] / rows[0]['hf_infer_img_s']
  assert out_png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


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
