"""benchmarks/compute_cost.py: the pretraining cost table from the analytic FLOPs count."""
import json
import os
import subprocess
import sys

import pytest

from configs import imagenet21k
from patchmerger import flops
from patchmerger.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cost_rows_follow_the_flops_count_and_the_stated_utilisation():
  # In a subprocess: the script's flags share names with benchmarks/throughput.py's.
  script = ('import json; from benchmarks import compute_cost; print(json.dumps('
            "compute_cost.rows('imagenet21k', ['Ti/16'], '8', epochs=90, peak_tflops=100., "
            'mfu=0.5)))')
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  plain, merged = json.loads(result.stdout.strip().splitlines()[-1])
  assert (plain['merger'], merged['merger']) == ('none', '8')
  config = imagenet21k.get_config('variant=Ti/16,merger=none')
  expected = flops.analytic_gflops(build_model(config.model, config.num_classes), (224, 224, 3))
  assert plain['gflops'] == pytest.approx(expected)
  assert merged['gflops'] < 0.6 * plain['gflops']  # M = 8 halfway: about half the FLOPs.
  assert plain['images'] == 90 * 13_000_000
  train_flops = 3 * plain['gflops'] * 1e9 * plain['images']
  assert plain['train_exaflops'] == pytest.approx(train_flops / 1e18)
  assert plain['device_hours'] == pytest.approx(train_flops / (100e12 * 0.5) / 3600)
