"""patchmerger.data.prepare: ImageNet-21k from per-class tars (with ImageNet's bad
files), resume after a kill, and training on the result through its config."""
import hashlib
import os

import pytest
import tensorflow_datasets as tfds

from configs import imagenet21k
from patchmerger import errors
from patchmerger.data import local, prepare
from patchmerger.training import loop
from tests.image_files import write_class_tars, write_image_folder


def _example_hashes(data_dir, name='imagenet21k', split='full'):
  """sha256 of (file name, image bytes, label) of every example, in read order."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  data = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
  return [hashlib.sha256(ex['file_name'] + ex['image'] + bytes([ex['label']])).hexdigest()
          for ex in data.as_numpy_iterator()]


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  root = tmp_path_factory.mktemp('imagenet21k_tars')
  write_class_tars(root)
  return root


@pytest.fixture(scope='module')
def prepared(source, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  report = prepare.prepare('imagenet21k', str(data_dir), str(source), workers=1, num_shards=3)
  return data_dir, report


def test_bad_files_are_counted_not_fatal(prepared):
  data_dir, report = prepared
  assert report.counts == {'ok': 15, 'skipped_corrupt': 1, 'reencoded_cmyk_jpeg': 1,
                           'reencoded_png': 1}
  assert report.skipped == ['full/n02/n02_1.JPEG']
  assert report.examples == {'full': 17}
  text = '\n'.join(report.lines())
  assert 'skipped_corrupt: 1' in text and 'reencoded_cmyk_jpeg: 1' in text
  builder = tfds.builder('imagenet21k', data_dir=str(data_dir))
  assert builder.info.splits['full'].num_examples == 17
  assert len(builder.info.splits['full'].shard_lengths) == 3
  # Labels: WordNet ids sorted; every stored image is a JPEG that TF decodes in RGB.
  assert builder.info.features['label'].names == ['n01', 'n02', 'n03']
  for example in builder.as_dataset(split='full').as_numpy_iterator():
    name = example['file_name'].decode()
    assert builder.info.features['label'].names[example['label']] == name.split('/')[0]
    assert example['image'].shape[-1] == 3


def test_class_list_sets_the_label_order(source, tmp_path):
  class_list = tmp_path / 'classes.txt'
  class_list.write_text('n03\nn_unused\nn01\nn02\n')
  prepare.prepare('imagenet21k', str(tmp_path / 'd'), str(source), str(class_list), workers=1)
  builder = tfds.builder('imagenet21k', data_dir=str(tmp_path / 'd'))
  assert builder.info.features['label'].names == ['n03', 'n_unused', 'n01', 'n02']
  class_list.write_text('n01\nn02\n')
  with pytest.raises(ValueError, match='1 classes of the source are not in'):
    prepare.prepare('imagenet21k', str(tmp_path / 'e'), str(source), str(class_list), workers=1)


def test_a_prepare_killed_after_its_first_shard_resumes_to_the_same_dataset(
    prepared, source, tmp_path):
  class Killed(Exception):
    pass

  def kill(split, shard):
    raise Killed()

  with pytest.raises(Killed):
    prepare.prepare('imagenet21k', str(tmp_path), str(source), workers=1, num_shards=3,
                    shard_done=kill)
  out_dir = tmp_path / 'imagenet21k' / prepare.VERSION
  finished = sorted(p.name for p in out_dir.glob('*.tfrecord-*') if not p.name.endswith('.tmp'))
  assert len(finished) == 1
  first = out_dir / finished[0]
  mtime = first.stat().st_mtime_ns
  # A kill during the next shard leaves a partial file behind.
  (out_dir / (prepare.shard_file_name('imagenet21k', 'full', 1, 3) + '.tmp')).write_bytes(b'x')
  prepare.prepare('imagenet21k', str(tmp_path), str(source), workers=1)
  assert first.stat().st_mtime_ns == mtime  # Finished shards are left untouched.
  hashes = _example_hashes(tmp_path)
  assert len(hashes) == 17 and hashes == _example_hashes(prepared[0])


def test_tiny_imagenet21k_trains_through_its_config(prepared, tmp_path):
  data_dir = prepared[0]
  config = imagenet21k.get_config('variant=Ti/8,merger=4@1')
  config.model.update(width=16, depth=2, mlp_dim=32, num_heads=2, representation_size=16)
  config.input.update(image_size=32, shuffle_buffer=16)
  config.update(data_dir=str(data_dir), train_split='full', test_split='full[:8]',
                num_classes=3, batch_size=4, total_steps=2, log_every=1,
                checkpoint_every=2)
  config.evals.test.every = 2
  config.lr.warmup_steps = 1
  config.mesh.data = -1
  builder = local.ensure_prepared(config.dataset, config.data_dir)
  summary = loop.train_and_evaluate(config, str(tmp_path), builder)
  assert summary['step'] == 2 and summary['test/examples'] == 8


def test_image_folder_is_prepared_with_its_splits_and_classes(tmp_path):
  root = tmp_path / 'my images'
  write_image_folder(root)
  builder = local.ensure_prepared(f'folder:{root}', str(tmp_path / 'd'))
  assert builder.name == prepare.folder_dataset_name(str(root)) and builder.name.startswith(
      'folder_my_images_')
  assert builder.info.features['label'].names == ['cat', 'dog', 'owl']
  assert {s: builder.info.splits[s].num_examples for s in ('train', 'test')} == {
      'train': 12, 'test': 12}
  # Kept as they are: JPEGs in train, PNGs in test.
  raw = builder.as_dataset(split='test', decoders={'image': tfds.decode.SkipDecoding()})
  assert all(ex['image'][:4] == b'\x89PNG' for ex in raw.as_numpy_iterator())
  again = local.ensure_prepared(f'folder:{root}', str(tmp_path / 'd'))  # Reused, not rewritten.
  assert again.info.splits['train'].num_examples == 12


@pytest.mark.parametrize('dataset,message', [
    ('imagenet21k', 'python prepare_data.py --dataset=imagenet21k'),
    ('imagenet2012', 'tfds build imagenet2012'),
    ('folder:/nonexistent/images', 'does not exist')])
def test_check_data_says_what_is_missing(dataset, message, tmp_path):
  config = imagenet21k.get_config()
  config.update(dataset=dataset, data_dir=str(tmp_path))
  with pytest.raises(errors.DataError, match=message):
    local.check_data(config)


def test_check_data_on_prepared_and_preparable_datasets(prepared, tmp_path):
  config = imagenet21k.get_config()
  config.update(data_dir=str(prepared[0]), num_classes=3)
  with pytest.raises(errors.DataError, match=r"split 'full\[51200:\]' \(it has full \(17\)\)"):
    local.check_data(config)  # 17 examples: nothing after the held-out 51,200.
  config.update(train_split='full', test_split='full[:8]')
  assert 'full: 17 examples; full[:8]: 8 examples' in local.check_data(config)
  config.num_classes = 4
  with pytest.raises(ValueError, match='has 3 classes but num_classes is 4'):
    local.check_data(config)
  write_image_folder(tmp_path / 'images')
  config.update(dataset=f'folder:{tmp_path}/images', train_split='train', test_split='test',
                num_classes=3, data_dir=str(tmp_path / 'd'))
  assert 'prepared into' in local.check_data(config)
  config.test_split = 'validation'
  with pytest.raises(errors.DataError, match='no split folder for validation'):
    local.check_data(config)


@pytest.mark.slow
def test_command_line_with_two_workers_gives_the_same_dataset_and_a_report(
    prepared, source, tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, 'prepare_data.py', '--dataset=imagenet21k',
       f'--source={source}', f'--data_dir={tmp_path}', '--workers=2', '--num_shards=3'],
      cwd=root, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '17 examples written (full: 17) from 18 files' in result.stdout
  assert 'skipped files: full/n02/n02_1.JPEG' in result.stdout
  assert _example_hashes(tmp_path) == _example_hashes(prepared[0])
  missing = subprocess.run(
      [sys.executable, 'prepare_data.py', '--dataset=imagenet21k',
       f'--source={tmp_path}/absent', f'--data_dir={tmp_path}'],
      cwd=root, capture_output=True, text=True, timeout=600)
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines()[-1] == (
      f'error: Source directory {tmp_path}/absent does not exist.')


@pytest.mark.slow
def test_train_check_data_exit_codes(prepared, tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def check(*overrides):
    return subprocess.run([sys.executable, 'train.py', '--config=configs/imagenet21k.py',
                           '--check_data', *overrides], cwd=root, capture_output=True,
                          text=True, timeout=600)
  ready = check(f'--config.data_dir={prepared[0]}', '--config.num_classes=3',
                '--config.train_split=full', '--config.test_split=full[:8]')
  assert ready.returncode == 0, ready.stderr[-2000:]
  assert ready.stdout.strip() == (f'imagenet21k: prepared in {prepared[0]} '
                                  '(full: 17 examples; full[:8]: 8 examples).')
  missing = check(f'--config.data_dir={tmp_path}')
  assert missing.returncode == 2 and missing.stdout == ''
  error = [l for l in missing.stderr.splitlines() if l.startswith('error:')]
  assert len(error) == 1 and 'python prepare_data.py --dataset=imagenet21k' in error[0]
  assert not os.listdir(tmp_path)  # Checking writes nothing.


def test_fewshot_pools_take_the_first_examples_of_sliced_splits_too(prepared):
  from patchmerger.evaluators import fewshot as evaluators
  builder = tfds.builder('imagenet21k', data_dir=str(prepared[0]))
  assert evaluators._head(builder, 'full', 5) == 'full[:5]'
  assert evaluators._head(builder, 'full', 50) == 'full'
  assert evaluators._head(builder, 'full[3:]', 5) == 'full[3:8]'    # As full[51200:] is.
  assert evaluators._head(builder, 'full[:50%]', 4) == 'full[0:4]'  # As train[:99%] is.
  assert evaluators._head(builder, 'full[3:]', 50) == 'full[3:]'    # Smaller: whole.
  assert evaluators._head(builder, 'full[:2]+full[5:]', 3) == 'full[:2]+full[5:]'
  examples = builder.as_dataset(split=evaluators._head(builder, 'full[3:]', 5))
  assert sum(1 for _ in examples) == 5
