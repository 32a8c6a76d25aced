"""Few-shot probes, merge pictures and the full checkpoint evaluation."""
import numpy as np
import pytest
import tensorflow_datasets as tfds
from matplotlib import image as mpimg

from patchmerger import evaluate
from patchmerger.checkpoints import export, loading
from patchmerger.evaluators import fewshot, merge_pictures
from patchmerger.models import build_model
from patchmerger.training import metrics, setup as setup_lib
from tests import tiny


def test_fewshot_separable_problem_is_solved():
  rng = np.random.default_rng(1)
  centres = rng.standard_normal((5, 16)) * 4
  labels = np.repeat(np.arange(5), 70)
  x = centres[labels] + 0.3 * rng.standard_normal((len(labels), 16))
  train, test = (x[::2], labels[::2]), (x[1::2], labels[1::2])
  results = fewshot.fewshot_accuracies(train, test, 5, shots=(1, 5, 10))
  assert results['fewshot/5shot'] >= 0.99 and results['fewshot/10shot'] >= 0.99


def test_fewshot_random_labels_are_at_chance():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4000, 32))
  y = rng.integers(0, 10, 4000)
  results = fewshot.fewshot_accuracies((x[:2000], y[:2000]), (x[2000:], y[2000:]), 10,
                                       shots=(25,))
  assert abs(results['fewshot/25shot'] - 0.1) < 0.03


def test_sample_shots_takes_k_per_class():
  labels = np.array([0, 1, 2] * 10)
  chosen = fewshot.sample_shots(labels, 4, 3)
  assert sorted(np.bincount(labels[chosen])) == [4, 4, 4] and len(set(chosen)) == 12


def test_merge_picture_has_one_panel_per_merged_token(tmp_path):
  config = tiny.tiny_config()
  model = build_model(config.model, 10)  # merger 4@1 over a 4x4 grid
  import jax
  images = np.random.default_rng(0).standard_normal((2, 32, 32, 1)).astype(np.float32)
  params = model.init(jax.random.key(0), images)['params']
  weights = merge_pictures.merge_weights(model, params, images)
  assert weights.shape == (2, 4, 4, 4)
  np.testing.assert_allclose(weights.sum((2, 3)), 1, rtol=1e-5)  # Softmax over the patches.
  panels = merge_pictures.draw(images, weights, str(tmp_path / 'm.png'))
  assert panels == 2 * 4
  picture = mpimg.imread(str(tmp_path / 'm.png'))
  assert picture.ndim == 3 and picture.shape[1] > picture.shape[0]  # A 2 x 5 grid of panels.


def test_evaluate_checkpoint_reports_everything_and_exports_npz(tmp_path):
  config = tiny.tiny_config(total_steps=3)
  config.evals.fewshot.update(shots=(1, 2), pool_examples=48, test_examples=48)
  config.evals.merge_pictures.path = str(tmp_path / 'merge.png')
  summary = tiny.run(str(tmp_path), config)
  with tfds.testing.mock_data(num_examples=tiny.MOCK_EXAMPLES):
    builder = tfds.builder(config.dataset)
    results = evaluate.evaluate_checkpoint(config, str(tmp_path), builder)
  assert results['test/accuracy'] == summary['test/accuracy']
  counts = len(results['test/class_accuracy'])
  assert counts == 10 and all(0 <= a <= 1 for a in results['test/class_accuracy'])
  assert set(k for k in results if k.startswith('fewshot/')) == {'fewshot/1shot',
                                                                 'fewshot/2shot'}
  assert results['test/images_per_sec'] > 0
  assert (tmp_path / 'merge.png').read_bytes()[:4] == b'\x89PNG'
  # export.py --to=npz, then eval.py --checkpoint=w.npz: the same accuracy.
  export.export(loading.load_orbax_params(str(tmp_path)), 'npz', str(tmp_path / 'w.npz'),
                model_config=config.model)
  with tfds.testing.mock_data(num_examples=tiny.MOCK_EXAMPLES):
    from_npz = evaluate.evaluate_checkpoint(config, str(tmp_path / 'other'), builder,
                                            skip=('fewshot', 'merge_pictures'),
                                            source=str(tmp_path / 'w.npz'))
  assert from_npz['test/accuracy'] == results['test/accuracy']
  # The exported weights reproduce the checkpoint's logits.
  model = build_model(config.model, 10)
  state = setup_lib.setup(config).state
  from patchmerger.checkpoints import manager as checkpoint
  restored = checkpoint.restore(checkpoint.make_manager(str(tmp_path), 5), 3, state)
  flat, _ = loading.load(str(tmp_path / 'w.npz'))
  adapted, report = loading.adapt(flat, restored.params, has_cls=False)
  assert report.loaded and not report.new and not report.dropped and not report.missing
  images = np.random.default_rng(0).standard_normal((2, 32, 32, 1)).astype(np.float32)
  np.testing.assert_array_equal(model.apply({'params': adapted}, images),
                                model.apply({'params': restored.params}, images))


def test_fewshot_pool_is_clipped_to_small_splits():
  from types import SimpleNamespace
  from patchmerger.evaluators import fewshot as evaluators
  builder = SimpleNamespace(info=SimpleNamespace(splits={'train': SimpleNamespace(
      num_examples=1437)}))
  assert evaluators._head(builder, 'train', 2000) == 'train'
  assert evaluators._head(builder, 'train', 100) == 'train[:100]'
  assert evaluators._head(builder, 'train[99%:]', 100) == 'train[99%:]'  # Used whole.


def test_ridge_probe_equals_the_one_hot_regression_it_stands_for():
  rng = np.random.default_rng(5)
  train_x, train_y = rng.standard_normal((60, 7)), rng.integers(0, 4, 60)
  test_x, test_y = rng.standard_normal((50, 7)), rng.integers(0, 4, 50)
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  design = lambda x: np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
  x = design(train_x)
  regulariser = 2.0 * np.eye(8)
  regulariser[-1, -1] = 0.
  weights = np.linalg.solve(x.T @ x + regulariser, x.T @ (2 * np.eye(4)[train_y] - 1))
  expected = np.mean(np.argmax(design(test_x) @ weights, axis=1) == test_y)
  for chunk in (1, 7, 1024):  # Chunked scoring counts every test example once.
    assert fewshot.ridge_accuracy(train_x, train_y, test_x, test_y, 4, l2=2.0,
                                  chunk=chunk) == expected


def test_each_evaluator_runs_at_its_own_every_in_training(tmp_path):
  config = tiny.tiny_config(total_steps=4)
  config.evals.test.every = 3                # Steps 3 and 4 (the last).
  config.evals.fewshot.update(every=2, shots=(1,), pool_examples=32, test_examples=32)
  config.evals.throughput.every = 0          # eval.py only.
  tiny.run(str(tmp_path), config)
  records = metrics.read_metrics(str(tmp_path))
  logged = lambda key: [r['step'] for r in records if key in r]
  assert logged('test/accuracy') == [3, 4]
  assert logged('fewshot/1shot') == [2, 4]
  assert logged('test/images_per_sec') == []
  assert not (tmp_path / 'merge_pictures.png').exists()


def test_evaluators_run_in_one_fixed_order_with_pictures_last():
  from patchmerger import evaluators
  config = tiny.tiny_config()
  config.evals.val = dict(kind='classification', every=0, split='test')
  names = [e.name for e in evaluators.from_config(config, context=None)]
  assert names == ['test', 'val', 'throughput', 'fewshot', 'merge_pictures']
  assert [e.name for e in evaluators.from_config(config, None, skip=('val', 'fewshot'))] == [
      'test', 'throughput', 'merge_pictures']
