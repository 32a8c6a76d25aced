"""Downstream fine-tuning: configs/transfer.py on every dataset it names and
configs/finetune_folder.py on an image folder, from a run at another resolution."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import finetune_folder, transfer
from patchmerger import cli
from patchmerger.data import local
from patchmerger.training import loop
from tests.image_files import mock_images, write_image_folder

TINY_MODEL = dict(width=16, depth=2, mlp_dim=32, num_heads=2)
ARG = 'variant=Ti/8,merger=4@1'


def _tiny(config, res):
  config.model.update(**TINY_MODEL)
  config.input.update(image_size=res, shuffle_buffer=16)
  config.update(batch_size=4, total_steps=2, log_every=1, checkpoint_every=2)
  config.evals.test.every = 2
  config.lr.warmup_steps = 1
  return config


@pytest.fixture(scope='module')
def upstream_run(tmp_path_factory):
  """One step of the transfer model at 16px: 2 x 2 patches (the fine-tunes use 32px)."""
  workdir = tmp_path_factory.mktemp('upstream')
  config = _tiny(transfer.get_config(f'dataset=cifar10,{ARG},res=16'), 16)
  config.total_steps = 1
  with mock_images(8):
    loop.train_and_evaluate(config, str(workdir), tfds.builder('cifar10'))
  return str(workdir)


@pytest.mark.parametrize('dataset', sorted(transfer.DATASETS))
def test_transfer_fine_tunes_every_dataset_at_another_resolution(dataset, upstream_run, tmp_path):
  config = _tiny(transfer.get_config(f'dataset={dataset},{ARG},res=32'), 32)
  assert (config.optim.name, config.optim.b1, config.optim.weight_decay,
          config.optim.clip_norm) == ('sgd', 0.9, 0.0, 1.0)
  config.init_from = upstream_run
  with mock_images(12):
    builder = tfds.builder(dataset)
    summary = loop.train_and_evaluate(config, str(tmp_path), builder)
  assert summary['step'] == 2 and np.isfinite(summary['train/loss'])
  assert 0 <= summary['test/accuracy'] <= 1


def test_transfer_recipe_follows_the_papers():
  assert transfer.DATASETS['imagenet2012'][1:4] == ('train[:99%]', 'validation', 20_000)
  for name, steps in [('cifar10', 10_000), ('cifar100', 10_000), ('oxford_iiit_pet', 500),
                      ('oxford_flowers102', 500)]:
    config = transfer.get_config(f'dataset={name}')
    assert (config.total_steps, config.batch_size, config.input.image_size) == (steps, 512, 384)
    assert (config.train_split, config.test_split) == ('train', 'test')
    assert config.lr.decay == 'cosine' and 0 < config.lr.warmup_steps < steps
  with pytest.raises(ValueError, match='Unknown transfer dataset'):
    transfer.get_config('dataset=mnist')


def _folder_config(root, num_classes):
  config = finetune_folder.get_config(f'path={root},num_classes={num_classes},{ARG},res=32')
  return _tiny(config, 32)


def test_image_folder_fine_tunes_from_one_of_our_runs(upstream_run, tmp_path):
  root = tmp_path / 'images'
  write_image_folder(root)
  config = _folder_config(root, 3)
  config.update(init_from=upstream_run, data_dir=str(tmp_path / 'tfds'))
  builder = local.ensure_prepared(config.dataset, config.data_dir)
  summary = loop.train_and_evaluate(config, str(tmp_path / 'run'), builder)
  assert summary['step'] == 2 and summary['test/examples'] == 12
  # The fine-tuned PatchMerger model in PyTorch: exported, opened by a Python that imports
  # nothing of this repository, it gives our logits in float32 (the run computed in bfloat16).
  pytest.importorskip('transformers')
  from patchmerger.checkpoints import export, loading
  from patchmerger.models import build_model
  from tests import test_hf_export
  params = loading.load_orbax_params(str(tmp_path / 'run'))
  export.export(params, 'transformers', str(tmp_path / 'hf'), model_config=config.model)
  images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  float32 = config.model.to_dict() | {'dtype': 'float32'}
  ours = np.asarray(build_model(float32, 3).apply({'params': loading.unflatten(params)}, images))
  theirs = test_hf_export.logits_in_clean_process(tmp_path / 'hf', images)
  assert np.abs(ours).max() > 0 and theirs.shape == ours.shape == (2, 3)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_folder_with_another_class_count_fails_with_one_line_and_keeps_the_workdir(
    tmp_path, capsys):
  root = tmp_path / 'images'
  write_image_folder(root)  # 3 classes
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('mine')
  config = _folder_config(root, 5)
  config.data_dir = str(tmp_path / 'tfds')

  def run():  # As train.py runs it.
    loop.train_and_evaluate(config, str(workdir))

  with pytest.raises(SystemExit) as exit_info:
    cli.run_reporting_errors(run)
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and error[0].startswith('error: Dataset folder_images_')
  assert 'has 3 classes but num_classes is 5; set --config.num_classes=3' in error[0]
  assert os.listdir(workdir) == ['notes.txt']
