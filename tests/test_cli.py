"""train.py / eval.py: bad input stops the run with one clear line."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_lines(stderr: str) -> list[str]:
  """stderr without the start-up chatter TensorFlow's C++ logging prints."""
  return [l for l in stderr.splitlines()
          if l.strip() and not re.match(r'^(WARNING: All log messages before|[IWE]\d{4} )', l)]


def _run(script, *args, data_dir=None):
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  return result.returncode, result.stderr


@pytest.mark.parametrize('args,message', [
    (['--config=configs/fashion_mnist.py', '--config.model.widht=3'], 'widht'),
    (['--config=configs/fashion_mnist.py:varaint=B/16'], "Unknown config argument 'varaint=B/16'"),
    (['--config=configs/fashion_mnist.py:variant=Q/4'], "Unknown model variant 'Q/4'"),
    (['--config=configs/fashion_mnist.py:merger=8@9'], 'does not fit a model of depth 4'),
    (['--config=configs/fashion_mnist.py:merger=0@2'], 'num_tokens must be an integer >= 1'),
    (['--config=configs/fashion_mnist.py', '--config.input.image_size=30'],
     'Image size 30x30 is not divisible by the patch size 8'),
    (['--config=configs/fashion_mnist.py:variant=Ti/6'], 'not divisible by the conv stem stride'),
    # distributed='auto': one host gets past jax.distributed to the data check.
    (['--config=configs/imagenet2012.py'], "Dataset 'imagenet2012' is not prepared"),
    (['--config=configs/imagenet2012.py', '--config.distributed=True'], 'no cluster was found'),
])
def test_bad_input_fails_with_one_line(args, message, tmp_path):
  workdir = tmp_path / 'run'
  code, stderr = _run('train.py', *args, f'--workdir={workdir}', f'--config.data_dir={tmp_path}')
  assert code != 0
  assert 'Traceback' not in stderr, stderr[-2000:]
  assert message in stderr, stderr[-2000:]


def test_eval_without_checkpoint_fails_with_one_line(tmp_path):
  code, stderr = _run('eval.py', '--config=configs/fashion_mnist.py', f'--workdir={tmp_path}',
                      '--config.dataset=mnist_absent')
  assert code != 0 and 'Traceback' not in stderr
  assert "'mnist_absent'" in stderr


def test_unwritable_workdir_fails_with_one_line(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('keep me')
  code, stderr = _run('train.py', '--config=configs/fashion_mnist.py',
                      f'--workdir={blocker}/run', f'--config.data_dir={tmp_path}')
  assert code == 2 and 'Traceback' not in stderr, stderr[-2000:]
  assert f'Workdir {blocker}/run is not writable' in stderr
  assert blocker.read_text() == 'keep me'


@pytest.mark.parametrize('make_args,message', [
    (lambda tmp: ['--config.batch_size=-4'], 'config.batch_size must be an integer >= 1, got -4'),
    (lambda tmp: [f'--config.init_from={tmp}/absent'], f'absent does not exist'),
    (lambda tmp: [f'--config.init_from={tmp}/weights.txt'], 'is a file but not a .npz'),
    (lambda tmp: [f'--config.init_from={tmp}/empty_run'], 'is a directory without checkpoints'),
])
def test_bad_input_leaves_workdir_and_init_from_untouched(make_args, message, tmp_path):
  (tmp_path / 'weights.txt').write_text('not weights')
  (tmp_path / 'empty_run' / 'checkpoints').mkdir(parents=True)
  before = sorted((str(p), p.read_bytes() if p.is_file() else b'') for p in tmp_path.rglob('*'))
  workdir = tmp_path / 'run'
  code, stderr = _run('train.py', '--config=configs/fashion_mnist.py', *make_args(tmp_path),
                      f'--workdir={workdir}', f'--config.data_dir={tmp_path}/data')
  lines = error_lines(stderr)
  assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), stderr[-2000:]
  assert message in lines[0]
  assert not workdir.exists()
  after = sorted((str(p), p.read_bytes() if p.is_file() else b'') for p in tmp_path.rglob('*'))
  assert after == before


@pytest.mark.parametrize('script,args,message', [
    ('train.py', ['--config.eval_every=5'],
     'config.eval_every is now config.evals.test.every'),
    ('train.py', ['--config.fewshot.every=5'],
     'config.fewshot.every is now config.evals.fewshot.every'),
    ('eval.py', ['--export_npz=w.npz'], '--export_npz moved to export.py: python export.py'),
])
def test_moved_keys_and_flags_name_their_new_home(script, args, message, tmp_path):
  code, stderr = _run(script, '--config=configs/fashion_mnist.py', f'--workdir={tmp_path}',
                      *args)
  assert code == 2 and error_lines(stderr) == [f'error: {error_lines(stderr)[0][7:]}']
  assert message in stderr, stderr[-2000:]


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(capsys):
  from patchmerger import cli, errors

  def bug():
    return {}['missing']

  with pytest.raises(KeyError):  # Not turned into "error: 'missing'".
    cli.run_reporting_errors(bug)

  def bad_config():
    raise errors.ConfigError('config.x must be >= 1, got 0.\nmore detail')

  with pytest.raises(SystemExit) as exit_info:
    cli.run_reporting_errors(bad_config)
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == 'error: config.x must be >= 1, got 0.\n'
