"""The model, the train step and the benchmark path import without TensorFlow
(GPU machines often have none); only the input pipeline needs it."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCK_TENSORFLOW = '''
import importlib.abc, sys
class NoTensorFlow(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, NoTensorFlow())
'''

TF_FREE = ('configs.fashion_mnist', 'configs.imagenet21k', 'configs.imagenet2012',
           'patchmerger.models', 'patchmerger.flops', 'patchmerger.checkpoints.layouts',
           'patchmerger.checkpoints.export',
           'patchmerger.training.state', 'patchmerger.training.step',
           'patchmerger.training.sharding', 'patchmerger.training.utilisation',
           'benchmarks.throughput')


def test_model_step_and_benchmark_import_without_tensorflow():
  code = BLOCK_TENSORFLOW + f'''
import importlib
for name in {TF_FREE!r}:
  importlib.import_module(name)
try:
  importlib.import_module('patchmerger.data.input_pipeline')
except ImportError as e:
  print('blocked:', e)
assert not any(m.split('.')[0] == 'tensorflow' for m in sys.modules)
print('imported without tensorflow')
'''
  # Keep the caller's path: on GPU machines ml-collections is only on a carried one.
  path = os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')]))
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=path))
  assert result.returncode == 0, result.stderr[-3000:]
  # The blocker works: the input pipeline, which needs TensorFlow, fails to import.
  assert 'blocked: tensorflow is blocked in this test' in result.stdout
  assert 'imported without tensorflow' in result.stdout
