"""sweep.py: cross products of overrides, resumable, dry-run commands, clear errors."""
import os
import shlex
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from patchmerger import sweep
from patchmerger.training import config_checks
from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = ['model.width=8,16', 'model.merger.num_tokens=2,4']


def test_two_by_two_sweep_runs_four_and_resumes_nothing(tmp_path):
  config = tiny.tiny_config(total_steps=2, **{'evals.test.every': 2}, checkpoint_every=2)
  runs = sweep.parse_sweeps(config, SPECS)
  assert runs == [{'model.width': 8, 'model.merger.num_tokens': 2},
                  {'model.width': 8, 'model.merger.num_tokens': 4},
                  {'model.width': 16, 'model.merger.num_tokens': 2},
                  {'model.width': 16, 'model.merger.num_tokens': 4}]
  trained = []

  def train_fn(run_config, workdir):
    trained.append((run_config.model.width, run_config.model.merger.num_tokens))
    return tiny.run(workdir, run_config)

  rows = sweep.run_sweep(config, str(tmp_path), runs, train_fn, config_checks.validate)
  assert trained == [(8, 2), (8, 4), (16, 2), (16, 4)]
  assert sorted(os.listdir(tmp_path)) == ['width=16,num_tokens=2', 'width=16,num_tokens=4',
                                          'width=8,num_tokens=2', 'width=8,num_tokens=4']
  assert {r['run'] for r in rows} == {'width=8,num_tokens=2', 'width=8,num_tokens=4',
                                      'width=16,num_tokens=2', 'width=16,num_tokens=4'}
  assert all(r['step'] == 2 and 0 <= r['test/accuracy'] <= 1 for r in rows)
  # The wider model costs more: the table's GFLOPs come from each run.
  assert rows[2]['gflops_per_image'] > rows[0]['gflops_per_image']
  table = sweep.write_results(str(tmp_path), rows, list(runs[0]))
  assert len(table.splitlines()) == 2 + 4
  with open(tmp_path / 'results.csv') as f:
    assert len(f.read().strip().splitlines()) == 1 + 4
  with open(tmp_path / 'results.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  again = sweep.run_sweep(config, str(tmp_path), runs, train_fn, config_checks.validate)
  assert len(trained) == 4 and all(r['skipped'] for r in again)
  assert [r['test/accuracy'] for r in again] == [r['test/accuracy'] for r in rows]


def _run_sweep_cli(*args):
  result = subprocess.run([sys.executable, 'sweep.py', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
  return result.returncode, result.stdout, result.stderr


def test_dry_run_prints_valid_train_commands(tmp_path):
  code, stdout, stderr = _run_sweep_cli(
      '--config=configs/fashion_mnist.py:steps=100', f'--workdir={tmp_path}',
      '--config.batch_size=64', *(f'--sweep={s}' for s in SPECS), '--dry_run')
  assert code == 0, stderr[-2000:]
  commands = stdout.strip().splitlines()
  assert len(commands) == 4
  seen = set()
  for command in commands:
    argv = shlex.split(command)
    assert argv[:2] == ['python', 'train.py']
    parser = flags.FlagValues()  # train.py's own config flag, parsed the same way.
    config_flags.DEFINE_config_file('config', None, '', flag_values=parser, lock_config=True,
                                    sys_argv=argv[1:])
    flags.DEFINE_string('workdir', None, '', flag_values=parser)
    parser([argv[1], *argv[2:]])
    config = parser.config
    assert config.total_steps == 100 and config.batch_size == 64
    seen.add((config.model.width, config.model.merger.num_tokens))
    assert parser.workdir.startswith(str(tmp_path))
  assert seen == {(8, 2), (8, 4), (16, 2), (16, 4)}
  assert not os.listdir(tmp_path)  # A dry run trains nothing.


@pytest.mark.parametrize('spec,error,message', [
    ('model.widht=8,16', KeyError, "Unknown sweep key 'model.widht'"),
    ('model.width=', ValueError, 'at least one value'),
    ('model.width=8,wide', ValueError, "Sweep value 'wide' for model.width is not a int"),
    ('lr.base=fast', ValueError, "Sweep value 'fast' for lr.base is not a float"),
    ('eval_every=5,10', KeyError, 'config.eval_every is now config.evals.test.every'),
])
def test_bad_sweeps_are_rejected(spec, error, message):
  config = tiny.tiny_config()
  with pytest.raises(error, match=message):
    sweep.parse_sweeps(config, [spec])


def test_bad_sweep_fails_with_one_line_before_any_run(tmp_path):
  code, _, stderr = _run_sweep_cli('--config=configs/fashion_mnist.py', f'--workdir={tmp_path}',
                                   '--sweep=model.widht=8,16')
  assert code == 2 and 'Traceback' not in stderr, stderr[-2000:]
  assert "Unknown sweep key 'model.widht'" in stderr
  assert not os.listdir(tmp_path)


def test_config_get_sweep_dry_run(tmp_path):
  code, stdout, stderr = _run_sweep_cli('--config=configs/fashion_mnist.py',
                                        f'--workdir={tmp_path}', '--dry_run')
  assert code == 0, stderr[-2000:]
  lines = stdout.strip().splitlines()
  assert len(lines) == 4 and all('--config.model.mlp_dim=' in l for l in lines)


def test_arg_string_sweep_switches_the_merger_off_and_on(tmp_path):
  code, stdout, stderr = _run_sweep_cli(
      '--config=configs/fashion_mnist.py:steps=50', f'--workdir={tmp_path}',
      '--sweep=arg.merger=none,4@2', '--sweep=model.depth=4', '--dry_run')
  assert code == 0, stderr[-2000:]
  mergers = []
  for command in stdout.strip().splitlines():
    argv = shlex.split(command)
    parser = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, '', flag_values=parser, lock_config=True,
                                    sys_argv=argv[1:])
    flags.DEFINE_string('workdir', None, '', flag_values=parser)
    parser([argv[1], *argv[2:]])
    assert parser.config.total_steps == 50 and parser.config.model.depth == 4
    merger = parser.config.model.merger
    mergers.append(None if merger is None else (merger.num_tokens, merger.before_block))
  assert mergers == [None, (4, 2)]


def test_overrides_for_every_run_need_a_value():
  assert sweep.flag_overrides(['--config.lr.base=0.1']) == {'lr.base': '0.1'}
  with pytest.raises(ValueError, match='--config.lr.base: give every run'):
    sweep.flag_overrides(['--config.lr.base'])
