"""Every range-checked config field: a bad value is one `error:` line and exit code 2."""
import pytest

from patchmerger import cli, errors
from patchmerger.training import config_checks
from tests import tiny

# Fields where zero is also invalid (the rest accept 0 and refuse negatives).
ZERO_INVALID = {
    'batch_size', 'total_steps', 'accum_steps', 'num_classes', 'log_every',
    'checkpoint_every', 'keep_checkpoints', 'lr.base', 'input.image_size', 'input.channels',
    'input.std', 'input.shuffle_buffer', 'model.width', 'model.depth', 'model.mlp_dim',
    'model.num_heads', 'model.representation_size', 'model.merger.num_tokens', 'mesh.data',
    'mesh.fsdp', 'evals.fewshot.pool_examples', 'evals.fewshot.test_examples',
    'evals.throughput.batches', 'evals.merge_pictures.images'}
# Fields below 1 by definition (probabilities, Adam betas): 1.0 is invalid too.
ONE_INVALID = {'label_smoothing', 'optim.b1', 'optim.b2', 'model.dropout_rate',
               'model.attention_dropout_rate'}
# Every other checked field refuses negatives only.
NEGATIVE_INVALID = {'seed', 'skip_nonfinite_updates', 'lr.warmup_steps', 'lr.end_value',
                    'optim.weight_decay', 'optim.clip_norm', 'input.data_threads',
                    'input.num_shards', 'model.merger.before_block', 'mesh.fsdp_min_size',
                    'evals.fewshot.every', 'evals.fewshot.l2', 'evals.test.every',
                    'evals.throughput.every', 'evals.merge_pictures.every'}


def test_every_checked_field_is_covered_here():
  assert set(config_checks.ranges(tiny.tiny_config())) == ZERO_INVALID | ONE_INVALID | NEGATIVE_INVALID


def _cases():
  for path in sorted(config_checks.ranges(tiny.tiny_config())):
    yield path, -2
    if path in ZERO_INVALID:
      yield path, 0
    if path in ONE_INVALID:
      yield path, 1.0


@pytest.mark.parametrize('path,value', list(_cases()))
def test_out_of_range_value_is_one_error_line(path, value, capsys):
  config = tiny.tiny_config()
  config.evals.fewshot.every = 0
  if path == 'model.representation_size':
    config.model.representation_size = 8
  if isinstance(config_checks._lookup(config, path)[1], float):
    value = float(value)
  config_checks.check_ranges(config)
  *parents, leaf = path.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  with pytest.raises(SystemExit) as exit_info:
    cli.run_reporting_errors(lambda: config_checks.validate(config))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith(f'error: config.{path} must be ')
  assert f'got {value!r}' in err


def test_negative_shots_are_refused():
  config = tiny.tiny_config()
  config.evals.fewshot.shots = (1, 0)
  with pytest.raises(ValueError, match=r'config.evals.fewshot.shots must all be >= 1'):
    config_checks.check_ranges(config)


@pytest.mark.parametrize('reducer', [dict(kind='tome'), dict(kind='tome', r=[0, 0]),
                                     dict(kind='tome', r=[2], start_block=1)])
def test_tome_that_would_merge_nothing_is_one_error_line(reducer, capsys):
  config = tiny.tiny_config()
  config.model.merger = None
  config.model.reducer.update(reducer)
  with pytest.raises(SystemExit) as exit_info:
    cli.run_reporting_errors(lambda: config_checks.validate(config))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'model.reducer.kind=tome merges nothing' in err
  config.model.reducer.update(r=2, start_block=1)  # Merges in block 1: accepted.
  config_checks.validate(config)


@pytest.mark.parametrize('old,value,new', [('eval_every', 5, 'evals.test.every'),
                                           ('fewshot', {'every': 5}, 'evals.fewshot')])
def test_a_config_that_sets_a_moved_key_names_its_new_home(old, value, new):
  config = tiny.tiny_config()
  config[old] = value
  with pytest.raises(errors.ConfigError, match=rf'config.{old} is now config.{new}'):
    config_checks.validate(config)


def test_unknown_evaluator_kind_is_refused():
  config = tiny.tiny_config()
  config.evals.test.kind = 'clasification'
  with pytest.raises(errors.ConfigError, match=r"config.evals.test: unknown kind 'clasification'"):
    config_checks.validate(config)


def test_fewshot_evaluator_without_its_pool_is_refused_before_training():
  config = tiny.tiny_config()
  del config.evals.fewshot['pool_examples']
  with pytest.raises(errors.ConfigError,
                     match='config.evals.fewshot needs a pool_examples field'):
    config_checks.validate(config)
